"""The trainer's flow: every stage in order, each reported, the manifest last."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from kubetune import api
from kubetune.storage import ObjectStore, StorageConfig, StorageURI, join_uri, parse_uri
from kubetune.trainer import distributed
from kubetune.trainer.context import RunContext
from kubetune.trainer.reporter import Reporter
from kubetune.trainer.stages import baseline, evaluate, fetch, merge, prepare, push, quantize, train

Stage = Callable[[RunContext], None]

STAGES: list[tuple[api.Stage, Stage]] = [
    (api.Stage.FETCH, fetch.run),
    (api.Stage.PREPARE, prepare.run),
    (api.Stage.BASELINE, baseline.run),
    (api.Stage.TRAIN, train.run),
    (api.Stage.EVALUATE, evaluate.run),
    (api.Stage.MERGE, merge.run),
    (api.Stage.QUANTIZE, quantize.run),
    (api.Stage.PUSH, push.run),
]


# Every rank trains; rank 0 alone evaluates, merges, quantizes, publishes and reports.
MAIN_ONLY = {api.Stage.BASELINE, api.Stage.EVALUATE, api.Stage.MERGE, api.Stage.QUANTIZE, api.Stage.PUSH}


def artifact_root(job: api.FineTuneJob, override: str | None = None) -> StorageURI:
    """`--output` as given, else `<spec.output.uri>/<namespace>/<name>/`."""
    if override is not None:
        return parse_uri(override)
    namespace = job.metadata.namespace or "default"
    return join_uri(job.spec.output.uri, namespace, job.metadata.name)


def harness_cache(job: api.FineTuneJob, override: str | None = None) -> StorageURI:
    """Base models' harness scores, beside the runs: under spec.output.uri, or next to `--output`."""
    if override is None:
        return join_uri(job.spec.output.uri, ".harness-baselines")
    root = parse_uri(override)
    parent = root.key.rstrip("/").rpartition("/")[0] or ("/" if root.is_local else "")
    return join_uri(StorageURI(root.scheme, root.bucket, parent), ".harness-baselines")


def storage_config(spec: api.FineTuneJobSpec) -> StorageConfig:
    """Credentials come from the standard AWS chain (the pod gets the job's Secret as env)."""
    return StorageConfig(endpoint=spec.storage.endpoint, region=spec.storage.region)


def execute(
    job: api.FineTuneJob,
    reporter: Reporter,
    *,
    workdir: Path,
    output: str | None = None,
    store: ObjectStore | None = None,
) -> RunContext:
    """Run every stage of `job`; the context holds metrics, checks and timings afterwards."""
    run_id = uuid.uuid4().hex[:12]
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(
        job=job,
        workdir=workdir,
        output=artifact_root(job, output),
        store=store or ObjectStore(storage_config(job.spec)),
        reporter=reporter,
        run_id=run_id,
        harness_cache=harness_cache(job, output),
    )
    distributed.init(distributed.collective_timeout(job.spec.training.collective_timeout_seconds))
    if distributed.is_main():
        shutil.rmtree(ctx.staging, ignore_errors=True)
    try:
        for stage, step in STAGES:
            if stage == api.Stage.BASELINE and not (
                job.spec.evaluation.baseline or job.spec.evaluation.harness
            ):
                continue
            if stage in MAIN_ONLY and not distributed.is_main():
                continue
            reporter.stage_started(stage)
            started = time.monotonic()
            if stage == api.Stage.FETCH:
                _fetch_once_per_node(step, ctx)
            else:
                step(ctx)
            ctx.timings[stage.value] = round(time.monotonic() - started, 2)
            reporter.stage_finished(stage, ctx.timings[stage.value])
        # No rank ends before rank 0 has published: should rank 0 fail now, every peer fails
        # with it (peer lost) and the whole group restarts, instead of pod 0 waiting alone for
        # peers whose pods already succeeded.
        distributed.finish_barrier()
    finally:
        distributed.shutdown()
    return ctx


def _fetch_once_per_node(step: Stage, ctx: RunContext) -> None:
    """The node's first process downloads; the others then find every file in place."""
    if distributed.local_rank() != 0:
        distributed.barrier()
    step(ctx)
    if distributed.local_rank() == 0:
        distributed.barrier()
