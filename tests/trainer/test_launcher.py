"""The torchrun launcher as the pod's PID 1: signals, exit codes, multi-node endings."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune import contract
from kubetune.trainer.distributed import Launch, pod_launch

from .conftest import (
    EVAL,
    env,
    kill_everything_started_for,
    kubetune_run,
    short_training,
    sigterm_once_training,
    two_nodes,
    write_job,
)

STOPPED = re.compile(r"stopped by SIGTERM at step (\d+) after checkpointing")


def test_the_pod_exit_code_names_the_worst_process() -> None:
    combined = contract.combined
    config, failure, peer = (
        contract.CONFIG_ERROR_EXIT_CODE,
        contract.FAILURE,
        contract.PEER_LOST_EXIT_CODE,
    )
    # torchrun exits 1 whatever its workers returned: the recorded codes decide
    assert combined([config, peer], 1, nodes=2) == config
    assert combined([peer, failure], 1, nodes=2) == failure
    # rank 0 alone judges the regression gate; its verdict is the pod's unless another failed
    regressed = contract.REGRESSED_EXIT_CODE
    assert combined([regressed, 0], 1, nodes=1) == regressed
    assert combined([regressed, failure], 1, nodes=1) == failure
    assert combined([peer, peer], 1, nodes=2) == peer
    assert combined([0, 0], 0, nodes=2) == 0
    assert combined([9], 1, nodes=1) == failure
    # a process killed before it could record anything
    assert combined([peer], 1, nodes=2) == peer
    assert combined([], 1, nodes=2) == peer, "the rendezvous lost: a peer went away"
    assert combined([], 1, nodes=1) == failure, "one node: no peer outside this pod"
    assert combined([peer], 1, nodes=1) == failure


def test_pod_launch_hosts_the_rendezvous_on_node_rank_0_and_uses_the_grace_period() -> None:
    base = {"KUBETUNE_NUM_NODES": "2", "MASTER_ADDR": "job-0.job-workers", "MASTER_PORT": "29500"}
    node0 = pod_launch(8, "ns-job", base | {"KUBETUNE_NODE_RANK": "0", "KUBETUNE_GRACE_SECONDS": "300"})
    node1 = pod_launch(8, "ns-job", base | {"KUBETUNE_NODE_RANK": "1", "KUBETUNE_GRACE_SECONDS": "300"})
    assert node0.rdzv_host is True and node1.rdzv_host is False
    command0, command1 = node0.command(["trainer"]), node1.command(["trainer"])
    assert "--rdzv-conf=is_host=true" in command0 and "--rdzv-conf=is_host=false" in command1
    assert "--rdzv-endpoint=job-0.job-workers:29500" in command1
    assert "--shutdown-timeout=295" in command0, "the workers get the grace period, less a margin"
    single = pod_launch(2, "ns-job", {})
    assert single.rdzv_host is None and single.shutdown_timeout is None
    assert not any(a.startswith("--rdzv-conf") for a in single.command(["trainer"]))
    assert "--shutdown-timeout=7" in Launch(nproc_per_node=2, shutdown_timeout=7).command(["run"])


@pytest.mark.training
def test_sigterm_to_the_launcher_checkpoints_one_step_on_every_rank_and_resumes(tmp_path: Path) -> None:
    job = write_job(tmp_path, training=short_training(150, 8, checkpointEvery=1000), evaluation=EVAL)
    out = tmp_path / "out"
    try:
        first = kubetune_run(job, out, ["--nproc-per-node", "2"], tmp_path / "w1", tmp_path)
        log = sigterm_once_training(first)  # the launcher alone, as the kubelet signals PID 1
        assert first.returncode == contract.FAILURE, log
        stops = [int(step) for step in STOPPED.findall(log)]
        assert len(stops) == 2, f"both ranks stop on the signal: {log}"
        assert stops[0] == stops[1], f"the ranks stopped at different steps {stops}"
        saved = [p.parent.name for p in (out / "checkpoints").glob("step-*/COMPLETE")]
        assert saved == [f"step-{stops[0]}"], "one checkpoint, at the common stop step"
        assert 0 < stops[0] < 150
        assert not (out / "manifest.json").exists()

        second = kubetune_run(job, out, ["--nproc-per-node", "2"], tmp_path / "w2", tmp_path)
        log = second.communicate(timeout=900)[0]
        assert second.returncode == 0, log
        assert f"resuming from checkpoint step {stops[0]}" in log
        metrics = json.loads((out / "metrics.json").read_text())
        steps = [h["step"] for h in metrics["history"] if "loss" in h]
        # No step twice, and the history reaches the last logging step before maxSteps.
        assert steps == sorted(set(steps)) and steps[-1] > 150 - (steps[1] - steps[0])
    finally:
        kill_everything_started_for(tmp_path)


def _node_processes(workdir: Path) -> list[int]:
    """Every process of one "node": the launcher, torchrun and its workers (own sessions)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if f"KUBETUNE_WORKDIR={workdir}\0".encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
    return found


@pytest.mark.training
def test_when_rank_0_fails_after_training_no_peer_succeeds(tmp_path: Path) -> None:
    # Publishing fails on rank 0 (the output is under a regular file) after every rank trained.
    # A peer that ended on its own as soon as training was over would have succeeded (its pod
    # done for good), and the retried pod 0 would wait at the rendezvous for it forever.
    job = write_job(tmp_path, training={"maxSteps": 4, "batchSize": 8, "maxSeqLength": 32}, evaluation=EVAL)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    launch = two_nodes()
    try:
        nodes = [
            kubetune_run(job, blocker / "out", launch, tmp_path / f"node{i}", tmp_path) for i in range(2)
        ]
        logs = [node.communicate(timeout=600)[0] for node in nodes]
        codes = sorted(node.returncode for node in nodes)
        assert codes == [contract.FAILURE, contract.PEER_LOST_EXIT_CODE], logs
        assert sum("▶ push" in log for log in logs) == 1, "rank 0 got as far as publishing"
    finally:
        kill_everything_started_for(tmp_path)


@pytest.mark.training
def test_a_lost_node_makes_its_peer_exit_with_the_peer_lost_code(tmp_path: Path) -> None:
    job = write_job(tmp_path, training=short_training(400, 16), evaluation=EVAL)
    out = tmp_path / "out"
    launch = two_nodes()
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    try:
        nodes = [
            subprocess.Popen(
                [sys.executable, "-m", "kubetune", "run", str(job), "--output", str(out), *launch],
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
                env=env(tmp_path, KUBETUNE_WORKDIR=str(tmp_path / f"node{i}")),
                start_new_session=True,
            )
            for i, log in enumerate(logs)
        ]
        deadline = time.monotonic() + 300
        while not any("▶ train" in log.read_text() for log in logs):
            assert all(node.poll() is None for node in nodes), [log.read_text() for log in logs]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        time.sleep(3)
        for pid in _node_processes(tmp_path / "node1"):  # node 1 vanishes, like a preempted pod
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        nodes[0].wait(timeout=300)
        nodes[1].wait(timeout=60)
        assert nodes[0].returncode == contract.PEER_LOST_EXIT_CODE, logs[0].read_text()
        assert "another process of the job went away" in logs[0].read_text()
        assert not (out / "manifest.json").exists()
    finally:
        kill_everything_started_for(tmp_path)
