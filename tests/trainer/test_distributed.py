"""Several processes and several "nodes" on the CPU, with torchrun and the gloo backend."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kubetune.trainer.distributed import Launch
from kubetune.trainer.pipeline import execute
from kubetune.trainer.reporter import SilentReporter

from .conftest import (
    EVAL,
    env,
    kill_everything_started_for,
    kubetune_run,
    short_training,
    tiny_job,
    torchrun,
    two_nodes,
    write_job,
)

pytestmark = pytest.mark.training
WORKER = Path(__file__).with_name("ddp_worker.py")


def test_launch_commands() -> None:
    assert "--standalone" in Launch(nproc_per_node=2).command(["run", "job.yaml"])
    two_nodes = Launch(nproc_per_node=8, nnodes=2, rdzv_endpoint="job-0.svc:29500", rdzv_id="ns-job")
    command = two_nodes.command(["trainer", "--config", "/etc/kubetune/job.yaml"])
    assert command[command.index("--module") :] == [
        "--module",
        "kubetune",
        "trainer",
        "--config",
        "/etc/kubetune/job.yaml",
    ]
    assert {
        "--nnodes=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=job-0.svc:29500",
        "--nproc-per-node=8",
    } <= set(command)
    assert not Launch().needed


def test_two_processes_train_identical_weights_like_doubled_accumulation(tmp_path: Path) -> None:
    training = short_training(8, 8)
    job_file = write_job(tmp_path, training=training, evaluation=EVAL)
    out = tmp_path / "ddp"
    done = torchrun(WORKER, str(job_file), str(out), env=env(tmp_path), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr

    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert (out / "artifacts" / "manifest.json").exists()

    single = tiny_job(training=training | {"gradientAccumulation": 2}, evaluation=EVAL)
    ctx = execute(single, SilentReporter(), workdir=tmp_path / "single", output=str(tmp_path / "single-out"))
    ddp = [h["loss"] for h in json.loads((out / "history0.json").read_text()) if "loss" in h]
    one = [h["loss"] for h in ctx.history if "loss" in h]
    assert len(ddp) == len(one) == 8
    for step, (a, b) in enumerate(zip(ddp, one, strict=True), start=1):
        assert abs(a - b) <= 0.15 * b + 0.1, f"step {step}: {a:.3f} (2 processes) vs {b:.3f} (1 process)"
    assert ddp[-1] < ddp[0] - 1.0, "the loss goes down"


def test_two_nodes_rendezvous_and_only_rank_0_publishes(tmp_path: Path) -> None:
    job = write_job(tmp_path, training={"maxSteps": 4, "batchSize": 8, "maxSeqLength": 32}, evaluation=EVAL)
    out = tmp_path / "out"
    launch = two_nodes()
    nodes = [kubetune_run(job, out, launch, tmp_path / f"node{i}", tmp_path) for i in range(2)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs
    assert (out / "manifest.json").exists()
    published = [log for log in logs if "▶ push" in log]
    assert len(published) == 1, "exactly one node (rank 0) publishes"
    staged = [i for i in range(2) if (tmp_path / f"node{i}" / "artifacts" / "adapter").exists()]
    assert len(staged) == 1


def test_two_processes_resume_after_kill(tmp_path: Path) -> None:
    job = write_job(tmp_path, training=short_training(40, 32, checkpointEvery=4), evaluation=EVAL)
    out = tmp_path / "out"
    first = kubetune_run(job, out, ["--nproc-per-node", "2"], tmp_path / "w1", tmp_path)
    deadline = time.monotonic() + 400
    while not (out / "checkpoints" / "step-4" / "COMPLETE").exists():
        assert first.poll() is None, first.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    kill_everything_started_for(tmp_path)  # the launcher and its workers, like a lost pod
    first.wait()
    assert not (out / "manifest.json").exists()

    second = kubetune_run(job, out, ["--nproc-per-node", "2"], tmp_path / "w2", tmp_path)
    log = second.communicate(timeout=600)[0]
    assert second.returncode == 0, log
    resumed_from = int(log.split("resuming from checkpoint step ")[1].split()[0])
    assert 4 <= resumed_from < 40
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checks"]["global_step"] == 40
    steps = [h["step"] for h in metrics["history"] if "loss" in h]
    assert steps == sorted(set(steps)) and steps[-1] == 40, "an optimizer step was repeated or lost"
