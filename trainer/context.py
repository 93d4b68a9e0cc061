"""The state one run carries from stage to stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune import api
from kubetune.storage import ObjectStore, StorageURI
from kubetune.trainer.data import PreparedData
from kubetune.trainer.harness import Scores
from kubetune.trainer.reporter import Reporter


@dataclass
class RunContext:
    job: api.FineTuneJob
    workdir: Path  # local scratch: fetched inputs, checkpoints, staged artifacts
    output: StorageURI  # the artifact root: <output.uri>/<namespace>/<name>/ or --output
    store: ObjectStore
    reporter: Reporter
    run_id: str

    model_source: str | None = None  # a local directory or a hub id, set by fetch
    train_file: str | None = None
    validation_file: str | None = None
    tokenizer: Any = None
    data: PreparedData | None = None
    model: Any = None
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    checks: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    trained_tokens: int = 0
    harness_cache: StorageURI | None = None  # where base models' harness scores are kept
    harness_include: Path | None = None  # the local folder of spec.evaluation.harness.include
    harness_tasks: Any = None  # lm-eval's TaskManager, once the task names are checked
    harness_before: Scores | None = None
    harness_after: Scores | None = None
    regressions: list[api.ScoreDrop] | None = None

    @property
    def spec(self) -> api.FineTuneJobSpec:
        return self.job.spec

    @property
    def staging(self) -> Path:
        """Artifacts are written here first; the push stage publishes them, manifest last."""
        return self.workdir / "artifacts"
