"""push: write the report, model card and metrics, publish everything, the manifest last.

A re-run of the same job never leaves a mix of two runs behind a manifest: the old manifest
is removed first, files the new run did not produce are deleted, and only then is the new
manifest written.
"""

from __future__ import annotations

import json

from kubetune import api, contract
from kubetune.trainer import artifacts
from kubetune.trainer.context import RunContext


def run(ctx: RunContext) -> None:
    staging = ctx.staging
    staging.mkdir(parents=True, exist_ok=True)
    (staging / contract.METRICS).write_text(json.dumps(artifacts.metrics_document(ctx), indent=2) + "\n")
    scores = (
        (ctx.harness_before.values, ctx.harness_after.values)
        if ctx.harness_before and ctx.harness_after
        else None
    )
    artifacts.report(
        ctx.history, staging / contract.REPORT, f"{ctx.job.metadata.name}: {ctx.spec.method}", scores
    )
    (staging / contract.MODEL_CARD).write_text(artifacts.model_card(ctx), encoding="utf-8")
    files = [f for f in staging.rglob("*") if f.is_file()]

    store, root = ctx.store, ctx.output
    store.delete(root.join(contract.MANIFEST))
    store.upload_prefix(staging, root)
    published = {f.relative_to(staging).as_posix() for f in files}
    for info in store.list_prefix(root):
        if info.name not in published and not info.name.startswith(f"{contract.CHECKPOINTS}/"):
            store.delete(info.uri)
    store.write_json(root.join(contract.MANIFEST), artifacts.manifest(ctx, files).to_wire())

    def uri(name: str) -> str | None:
        return str(root.join(name)) if (staging / name).exists() else None

    quantized = staging / contract.QUANTIZED
    exports = (
        {d.name: str(root.join(contract.QUANTIZED, d.name)) for d in sorted(quantized.iterdir())}
        if quantized.is_dir()
        else {}
    )
    ctx.reporter.artifacts(
        api.Artifacts(
            root=str(root),
            adapter=uri(contract.ADAPTER),
            merged=uri(contract.MERGED),
            quantized=exports,
            metrics=uri(contract.METRICS),
            report=uri(contract.REPORT),
            model_card=uri(contract.MODEL_CARD),
            manifest=str(root.join(contract.MANIFEST)),
        )
    )
