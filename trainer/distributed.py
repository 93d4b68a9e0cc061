"""Several processes (one per GPU) and several nodes, on PyTorch's own launcher.

`kubetune run --nproc-per-node N` and a pod with `gpus > 1` or `nodes > 1` re-launch the
same command under torchrun (elastic launch, c10d rendezvous). transformers' Trainer then
trains with DDP. Rank 0 alone evaluates, merges, quantizes, pushes and reports status.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from dataclasses import dataclass

import torch


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True inside a process started by torchrun."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


COLLECTIVE_TIMEOUT_ENV = "KUBETUNE_COLLECTIVE_TIMEOUT_SECONDS"


def collective_timeout(seconds: int) -> dt.timedelta:
    """The spec's collective timeout, unless the environment sets one."""
    value = os.environ.get(COLLECTIVE_TIMEOUT_ENV)
    if value is not None:
        try:
            seconds = int(value)
        except ValueError:
            raise ValueError(f"{COLLECTIVE_TIMEOUT_ENV}: expected seconds, got {value!r}") from None
    return dt.timedelta(seconds=seconds)


def init(timeout: dt.timedelta | None = None) -> None:
    """Join the process group; ``timeout`` bounds every collective (torch's default: 10 minutes)."""
    if world_size() > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        torch.distributed.init_process_group(backend, timeout=timeout)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@dataclass(frozen=True)
class Launch:
    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None  # host:port of the rendezvous; None: this machine alone
    rdzv_id: str = "kubetune"

    @property
    def needed(self) -> bool:
        return self.nproc_per_node > 1 or self.nnodes > 1

    def command(self, argv: list[str]) -> list[str]:
        """The torchrun command that runs `kubetune <argv>` in every process (pure)."""
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={self.nproc_per_node}"]
        if self.nnodes == 1 and self.rdzv_endpoint is None:
            launcher.append("--standalone")
        else:
            launcher += [
                f"--nnodes={self.nnodes}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={self.rdzv_endpoint}",
                f"--rdzv-id={self.rdzv_id}",
            ]
        return [*launcher, "--module", "kubetune", *argv]


def pod_launch(gpus: int, job_id: str) -> Launch:
    """From the pod's environment, as the operator sets it for Indexed Jobs."""
    nodes = int(os.environ.get("KUBETUNE_NUM_NODES", "1"))
    endpoint = None
    if nodes > 1:
        endpoint = f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '29500')}"
    return Launch(nproc_per_node=max(gpus, 1), nnodes=nodes, rdzv_endpoint=endpoint, rdzv_id=job_id)
