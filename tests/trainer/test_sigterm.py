"""SIGTERM (a node drain, a preemption) within the pod's grace period: checkpoint, then resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import tiny_job

pytestmark = pytest.mark.training


def test_sigterm_saves_a_checkpoint_that_the_next_attempt_resumes(tmp_path: Path) -> None:
    training = {
        "maxSteps": 400,
        "learningRate": 0.003,
        "batchSize": 32,
        "maxSeqLength": 32,
        "checkpointEvery": 1000,
    }
    job = tmp_path / "job.json"
    job.write_text(
        tiny_job(training=training, evaluation={"metrics": ["loss"], "baseline": False}).model_dump_json(
            by_alias=True
        )
    )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "kubetune", "run", str(job), "--output", str(out)]
    env = os.environ | {"KUBETUNE_WORKDIR": str(tmp_path / "work")}
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert first.stdout is not None
    lines = []
    for line in first.stdout:
        lines.append(line)
        if "▶ train" in line:
            break
    time.sleep(3)
    first.send_signal(signal.SIGTERM)
    lines += first.stdout.readlines()
    first.wait(timeout=120)
    log = "".join(lines)
    assert first.returncode == 1, log
    assert "stopped by SIGTERM at step " in log and " after checkpointing" in log
    saved = [p.parent.name for p in (out / "checkpoints").glob("step-*/COMPLETE")]
    assert len(saved) == 1, "one checkpoint, at the step where the signal arrived"
    step = int(saved[0].removeprefix("step-"))
    assert 0 < step < 400, "saved on the signal (the schedule saves every 1000 steps)"
    assert not (out / "manifest.json").exists()

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resuming from checkpoint step {step}" in second.stdout
    assert f"{out / 'manifest.json'}  (every file" in second.stdout, "the summary names the manifest"
    metrics = json.loads((out / "metrics.json").read_text())
    steps = [h["step"] for h in metrics["history"] if "loss" in h]
    assert steps == sorted(set(steps)) and steps[-1] == 400
