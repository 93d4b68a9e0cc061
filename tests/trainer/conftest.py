"""Tiny fine-tuning jobs on the built-in preset, sized to train in seconds on a CPU, and
running them in processes of their own: under torchrun, as several "nodes", stopped by SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from kubetune import api
from kubetune.trainer.run import quiet_libraries

JobFactory = Callable[..., api.FineTuneJob]
EVAL = {"metrics": ["loss"], "baseline": False}
"""An evaluation that costs next to nothing: the loss, no baseline."""


def tiny_job(name: str = "tiny", **spec: Any) -> api.FineTuneJob:
    """A short run on the dates data; keyword arguments replace whole spec sections."""
    base: dict[str, Any] = {
        "model": {"name": "kubetune/tiny-llama"},
        "dataset": {"train": "builtin:dates", "validationSplit": 0.05, "format": "prompt-completion"},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"maxSteps": 12, "learningRate": 0.003, "batchSize": 8, "maxSeqLength": 32},
        "evaluation": {"metrics": ["loss", "exact_match"], "maxSamples": 8, "maxNewTokens": 8},
        "export": {"merge": False},
        "output": {"uri": "unused"},
        "resources": {"gpus": 0},
    }
    base.update(spec)
    return api.FineTuneJob.model_validate(
        {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": base}
    )


def short_training(max_steps: int, batch_size: int, **more: Any) -> dict[str, Any]:
    """A training section: ``max_steps`` steps of ``batch_size`` 32-token sequences at learning
    rate 0.003, and ``more``."""
    return {"maxSteps": max_steps, "learningRate": 0.003, "batchSize": batch_size, "maxSeqLength": 32, **more}


def write_job(tmp_path: Path, **spec: Any) -> Path:
    """``tiny_job(**spec)`` as ``job.json`` in ``tmp_path``."""
    path = tmp_path / "job.json"
    path.write_text(tiny_job(**spec).model_dump_json(by_alias=True))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return (
        os.environ
        | {"OMP_NUM_THREADS": "1", "KUBETUNE_CACHE": str(Path.home() / ".cache" / "kubetune")}
        | extra
    )


def torchrun(
    worker: Path, *args: str, env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """The script ``worker`` with ``args`` on two processes of one node, under torchrun."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    return subprocess.run(
        [*command, str(worker), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def kubetune_run(
    job: Path, output: Path, launch: list[str], workdir: Path, tmp_path: Path
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kubetune", "run", str(job), "--output", str(output), *launch],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env(tmp_path, KUBETUNE_WORKDIR=str(workdir)), start_new_session=True,
    )  # fmt: skip


def two_nodes() -> list[str]:
    """``kubetune run`` arguments for one of two "nodes" of one process each."""
    endpoint = f"127.0.0.1:{free_port()}"
    return ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint, "--rdzv-id", "t"]


def sigterm_once_training(process: subprocess.Popen[str]) -> str:
    """Send SIGTERM to ``process`` 3 s after its log says training began; return the whole
    log once it has exited."""
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "▶ train" in line:
            break
    time.sleep(3)
    process.send_signal(signal.SIGTERM)
    lines += process.stdout.readlines()
    process.wait(timeout=120)
    return "".join(lines)


def kill_everything_started_for(tmp_path: Path) -> None:
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and str(tmp_path).encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


@pytest.fixture(scope="session", autouse=True)
def _quiet() -> None:
    quiet_libraries()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "work"
