"""SIGTERM (a node drain, a preemption) within the pod's grace period: checkpoint, then resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import EVAL, short_training, sigterm_once_training, write_job
from .conftest import env as conftest_env

pytestmark = pytest.mark.training


def test_sigterm_saves_a_checkpoint_that_the_next_attempt_resumes(tmp_path: Path) -> None:
    job = write_job(tmp_path, training=short_training(200, 8, checkpointEvery=1000), evaluation=EVAL)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "kubetune", "run", str(job), "--output", str(out)]
    env = conftest_env(tmp_path, KUBETUNE_WORKDIR=str(tmp_path / "work"))  # one torch thread
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = sigterm_once_training(first)
    assert first.returncode == 1, log
    assert "stopped by SIGTERM at step " in log and " after checkpointing" in log
    saved = [p.parent.name for p in (out / "checkpoints").glob("step-*/COMPLETE")]
    assert len(saved) == 1, "one checkpoint, at the step where the signal arrived"
    step = int(saved[0].removeprefix("step-"))
    assert 0 < step < 200, "saved on the signal (the schedule saves every 1000 steps)"
    assert not (out / "manifest.json").exists()

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resuming from checkpoint step {step}" in second.stdout
    assert f"{out / 'manifest.json'}  (every file" in second.stdout, "the summary names the manifest"
    metrics = json.loads((out / "metrics.json").read_text())
    steps = [h["step"] for h in metrics["history"] if "loss" in h]
    assert steps == sorted(set(steps)) and steps[-1] == 200
