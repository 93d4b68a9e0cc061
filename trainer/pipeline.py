"""The trainer's flow: every stage in order, each reported, the manifest last."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kubetune import api
from kubetune.storage import ObjectStore, StorageConfig, StorageURI, join_uri, parse_uri
from kubetune.trainer import distributed
from kubetune.trainer.context import RunContext
from kubetune.trainer.reporter import Reporter
from kubetune.trainer.stages import baseline, evaluate, fetch, merge, prepare, push, quantize, train


def _always(spec: api.FineTuneJobSpec) -> bool:
    return True


@dataclass(frozen=True)
class Step:
    """One stage of the flow: what it does, for which specs, and on which processes."""

    stage: api.Stage
    run: Callable[[RunContext], None]
    when: Callable[[api.FineTuneJobSpec], bool] = _always
    # Every rank trains; rank 0 alone evaluates, merges, quantizes, publishes and reports.
    main_only: bool = False
    # The node's first process does the work; the others then find every file in place.
    once_per_node: bool = False
    # A stage that does not apply still shows in the status and stageSeconds, taking 0s.
    reported_if_skipped: bool = False


STAGES: list[Step] = [
    Step(api.Stage.FETCH, fetch.run, once_per_node=True),
    Step(api.Stage.PREPARE, prepare.run),
    Step(
        api.Stage.BASELINE,
        baseline.run,
        when=lambda spec: spec.evaluation.baseline or spec.evaluation.harness is not None,
        main_only=True,
    ),
    Step(api.Stage.TRAIN, train.run),
    Step(api.Stage.EVALUATE, evaluate.run, main_only=True),
    Step(
        api.Stage.MERGE,
        merge.run,
        when=lambda spec: spec.method != api.Method.FULL and spec.export.merge,
        main_only=True,
        reported_if_skipped=True,
    ),
    Step(
        api.Stage.QUANTIZE,
        quantize.run,
        when=lambda spec: bool(spec.export.formats),
        main_only=True,
        reported_if_skipped=True,
    ),
    Step(api.Stage.PUSH, push.run, main_only=True),
]


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
        for index, step in enumerate(STAGES):
            applies = step.when(job.spec)
            if (applies or step.reported_if_skipped) and (distributed.is_main() or not step.main_only):
                reporter.stage_started(step.stage)
                started = time.monotonic()
                if applies:
                    _run(step, ctx)
                ctx.timings[step.stage.value] = round(time.monotonic() - started, 2)
                reporter.stage_finished(step.stage, ctx.timings[step.stage.value])
            if step.main_only and applies and any(not later.main_only for later in STAGES[index + 1 :]):
                # Not in the next stage's first collective, bounded by collectiveTimeoutSeconds:
                # a 70B model's baseline takes longer than a training collective may.
                distributed.wait_for_main()
        # No rank ends before rank 0 has published: should rank 0 fail now, every peer fails
        # with it (peer lost) and the whole group restarts, instead of pod 0 waiting alone for
        # peers whose pods already succeeded.
        distributed.wait_for_main()
    finally:
        distributed.shutdown()
    return ctx


def _run(step: Step, ctx: RunContext) -> None:
    if not step.once_per_node:
        step.run(ctx)
        return
    if distributed.local_rank() != 0:
        distributed.barrier()
    step.run(ctx)
    if distributed.local_rank() == 0:
        distributed.barrier()
