"""Resuming on another number of processes continues at the data position where the run stopped.

Every example the processes train is recorded (``fsdp_on_cpu/sitecustomize.py`` hashes the tokens
of each example of each micro-batch); the first attempt is stopped by SIGTERM, sent by rank 0 to
itself as a given optimizer step begins, and the second resumes from that step's checkpoint on
another number of processes. Over both attempts every example is trained exactly once (one epoch).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kubetune.trainer import presets, resume
from kubetune.validation import InvalidJob

from .conftest import EVAL, env, tiny_job
from .test_fsdp import SHIM

pytestmark = pytest.mark.training
BATCH = 8
ROWS = 96  # a multiple of every global batch below: no partial last batch
STOP_AT = 3  # the optimizer step at which the first attempt is stopped


def dates(tmp_path: Path) -> dict[str, str]:
    """A dataset section: the first ROWS distinct bundled dates to train on, 8 more to validate."""
    lines = (presets.BUILTIN_DATA / "dates.jsonl").read_text().splitlines()
    rows = list(dict.fromkeys(lines))
    train, validation = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    train.write_text("\n".join(rows[:ROWS]) + "\n")
    validation.write_text("\n".join(rows[ROWS : ROWS + 8]) + "\n")
    return {"train": str(train), "validation": str(validation), "format": "prompt-completion"}


def attempt(
    tmp_path: Path, processes: int, spec: dict[str, Any], **environ: str
) -> subprocess.CompletedProcess[str]:
    job = tmp_path / "job.json"
    job.write_text(tiny_job("resume", **spec).model_dump_json(by_alias=True))
    launch = ["--nproc-per-node", str(processes)] if processes > 1 else []
    extra = {"KUBETUNE_WORKDIR": str(tmp_path / "work" / str(processes)), "PYTHONPATH": str(SHIM), **environ}
    return subprocess.run(
        [sys.executable, "-m", "kubetune", "run", str(job), "--output", str(tmp_path / "out"), *launch],
        capture_output=True, text=True, env=env(tmp_path, **extra), timeout=600, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("method", "strategy", "first", "second"),
    [
        ("full", "fsdp", 2, 1),  # sharded checkpoint, one process
        ("full", "fsdp", 1, 2),  # whole checkpoint, sharded run
        ("lora", "ddp", 2, 1),
        ("lora", "fsdp", 1, 2),  # an adapter file into a sharded peft model
    ],
)
def test_a_run_resumed_on_another_number_of_processes_trains_every_example_once(
    tmp_path: Path, method: str, strategy: str, first: int, second: int
) -> None:
    trained = tmp_path / "trained"
    trained.mkdir()
    spec = {
        "method": method,
        "dataset": dates(tmp_path),
        "training": {"epochs": 1, "batchSize": BATCH, "maxSeqLength": 32, "learningRate": 0.003,
                     "precision": "fp32", "strategy": strategy, "checkpointEvery": 1000},
        "evaluation": EVAL,
    }  # fmt: skip
    recording = {"KUBETUNE_TEST_TRAINED_EXAMPLES": str(trained)}
    stopped = attempt(tmp_path, first, spec, KUBETUNE_TEST_SIGTERM_AT_STEP=str(STOP_AT), **recording)
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert f"stopped by SIGTERM at step {STOP_AT} after checkpointing" in stopped.stdout + stopped.stderr
    resumed = attempt(tmp_path, second, spec, **recording)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from checkpoint step {STOP_AT}" in resumed.stdout

    counts = Counter(line for log in trained.iterdir() for line in log.read_text().splitlines())
    assert sum(counts.values()) == ROWS, "examples trained over both attempts"
    assert set(counts.values()) == {1}, f"{sum(n > 1 for n in counts.values())} examples trained twice"
    global_batch = BATCH * first
    assert f"the same {global_batch} examples a step" in resumed.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["checks"]["global_step"] == ROWS // global_batch, "the steps of the first attempt's plan"
    assert metrics["history"][-1]["epoch"] == 1.0


def test_a_global_batch_the_new_processes_cannot_share_is_refused_naming_what_would_work() -> None:
    saved = resume.Layout(processes=2, batch_size=8, gradient_accumulation=1)
    assert resume.resumed_layout(saved, 1, 8, step=3) == resume.Layout(1, 8, 2)
    assert resume.resumed_layout(saved, 4, 8, step=3) == resume.Layout(4, 4, 1)
    assert resume.resumed_layout(saved, 8, 1, step=3) == resume.Layout(8, 1, 2)
    assert resume.resumed_layout(saved, 2, 4, step=3) == resume.Layout(2, 4, 2), "the spec's batch bounds it"
    with pytest.raises(InvalidJob) as refused:
        resume.resumed_layout(saved, 3, 8, step=3)
    assert "step 3 trained 16 examples a step (2 processes x 8 examples x 1 accumulation)" in str(
        refused.value
    )
    assert "resume on 1, 2, 4, 8, 16 processes" in str(refused.value)
