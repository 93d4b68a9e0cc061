"""fetch: bring the base model and the datasets to local disk."""

from __future__ import annotations

from kubetune.storage import is_s3_uri, parse_uri
from kubetune.trainer import presets
from kubetune.trainer.context import RunContext


def run(ctx: RunContext) -> None:
    model = ctx.spec.model
    if model.uri is not None:
        ctx.model_source = _local(ctx, model.uri, "model", prefix=True)
    elif presets.is_preset(model.name):
        assert model.name is not None
        ctx.model_source = str(presets.preset_path(model.name))
        ctx.reporter.log(f"model: built-in preset {model.name}")
    else:
        ctx.model_source = model.name  # a hub id: transformers fetches it (and caches it)
    ctx.train_file = _local(ctx, ctx.spec.dataset.train, "data/train")
    if ctx.spec.dataset.validation is not None:
        ctx.validation_file = _local(ctx, ctx.spec.dataset.validation, "data/validation")
    harness = ctx.spec.evaluation.harness
    if harness is not None and harness.include is not None:
        local = _local(ctx, harness.include, "harness", prefix=True)
        ctx.harness_include = parse_uri(local).path


def _local(ctx: RunContext, uri: str, into: str, *, prefix: bool = False) -> str:
    """s3:// objects are downloaded (unchanged files are kept); anything else is read in place."""
    if not is_s3_uri(uri):
        return uri
    source = parse_uri(uri)
    if prefix:
        target = ctx.workdir / into
        transfers = ctx.store.download_prefix(source, target)
        fetched = sum(t.size for t in transfers if not t.skipped)
        ctx.reporter.log(f"{into}: {len(transfers)} files from {uri} ({fetched / 1e6:,.1f} MB fetched)")
        return str(target)
    target = ctx.workdir / into / source.name
    ctx.store.download_file(source, target)
    ctx.reporter.log(f"{into}: {uri}")
    return str(target)
