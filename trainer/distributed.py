"""Several processes (one per GPU) and several nodes, on PyTorch's own launcher.

`kubetune run --nproc-per-node N` and a pod with `gpus > 1` or `nodes > 1` re-launch the
same command under torchrun (elastic launch, c10d rendezvous). transformers' Trainer then
trains with DDP. Rank 0 alone evaluates, merges, quantizes, pushes and reports status; the
other ranks wait for it at a final barrier, so that a node never ends (its pod Succeeded)
while node 0 may still fail and need every peer to restart with it.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from kubetune import contract

# Rank 0 evaluates the base before training, and evaluates, merges, quantizes and uploads after
# it, while the others wait: far longer than a training collective may take. The wait is on a
# gloo group (no NCCL watchdog); a peer that dies breaks it at once (its sockets close), so only
# a hung rank 0 makes it last this long.
PATIENT_TIMEOUT = dt.timedelta(hours=24)
_patient_group: dict[str, torch.distributed.ProcessGroup] = {}


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this node."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True inside a process started by torchrun."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def collective_timeout(seconds: int) -> dt.timedelta:
    """The spec's collective timeout, unless the environment sets one."""
    value = os.environ.get(contract.COLLECTIVE_TIMEOUT_ENV)
    if value is not None:
        try:
            seconds = int(value)
        except ValueError:
            raise ValueError(f"{contract.COLLECTIVE_TIMEOUT_ENV}: expected seconds, got {value!r}") from None
    return dt.timedelta(seconds=seconds)


def init(timeout: dt.timedelta | None = None) -> None:
    """Join the process group; ``timeout`` bounds every collective (torch's default: 10 minutes)."""
    if world_size() > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        torch.distributed.init_process_group(backend, timeout=timeout)
    if world_size() > 1 and not _patient_group:
        group = torch.distributed.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)
        assert isinstance(group, torch.distributed.ProcessGroup)  # every rank is a member
        _patient_group["group"] = group


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def agree(flag: bool) -> bool:
    """True on every rank when it is True on any: one decision, taken at the same step."""
    if not torch.distributed.is_initialized():
        return flag
    device = torch.device("cuda", local_rank()) if torch.distributed.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def wait_for_main() -> None:
    """Every rank waits here until all have arrived, rank 0 after its work alone, however long."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier(group=_patient_group.get("group"))


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_lost(error: BaseException) -> bool:
    """A collective failed because another process went away, not because of this one.

    Asked after the process group is gone (the pipeline shuts it down on the way out)."""
    if world_size() <= 1:
        return False
    if isinstance(error, torch.distributed.DistError):
        return True
    # gloo reports a peer's death as a plain RuntimeError from its transport
    return isinstance(error, RuntimeError) and any(mark in str(error) for mark in _PEER_GONE)


def shutdown() -> None:
    _patient_group.clear()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def record_exit(code: int) -> None:
    """Under torchrun, leave this process's exit code where `kubetune trainer` reads it."""
    folder = os.environ.get(contract.EXIT_DIR_ENV)
    if folder and launched():
        Path(folder, f"rank-{rank()}").write_text(f"{code}\n")


def recorded_exits(folder: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(folder.glob("rank-*"))]


@dataclass(frozen=True)
class Launch:
    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None  # host:port of the rendezvous; None: this machine alone
    rdzv_id: str = "kubetune"
    # torchrun forwards SIGTERM to the workers and kills them this many seconds later
    shutdown_timeout: int | None = None
    # this machine hosts the rendezvous store (node rank 0); None: torchrun guesses from DNS
    rdzv_host: bool | None = None

    @property
    def needed(self) -> bool:
        return self.nproc_per_node > 1 or self.nnodes > 1

    def command(self, argv: list[str]) -> list[str]:
        """The torchrun command that runs `kubetune <argv>` in every process (pure)."""
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={self.nproc_per_node}"]
        if self.shutdown_timeout is not None:
            launcher.append(f"--shutdown-timeout={self.shutdown_timeout}")
        if self.nnodes == 1 and self.rdzv_endpoint is None:
            launcher.append("--standalone")
        else:
            launcher += [
                f"--nnodes={self.nnodes}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={self.rdzv_endpoint}",
                f"--rdzv-id={self.rdzv_id}",
            ]
            if self.rdzv_host is not None:
                launcher.append(f"--rdzv-conf=is_host={str(self.rdzv_host).lower()}")
        return [*launcher, "--module", "kubetune", *argv]


# Of the pod's grace period, what the launcher keeps for itself after the workers stopped.
GRACE_MARGIN_SECONDS = 5


def pod_launch(gpus: int, job_id: str, environ: dict[str, str] | None = None) -> Launch:
    """From the pod's environment, as the operator sets it for Indexed Jobs (pure given environ).

    Node rank 0 (the Indexed Job's completion index) hosts the rendezvous store: torchrun's
    own guess compares MASTER_ADDR's DNS answer with this pod's addresses, which fails while
    the headless Service has not yet published pod 0's record.
    """
    env = os.environ if environ is None else environ
    nodes = int(env.get(contract.NUM_NODES_ENV, "1"))
    endpoint, host = None, None
    if nodes > 1:
        port = env.get(contract.MASTER_PORT_ENV, str(contract.MASTER_PORT))
        endpoint = f"{env[contract.MASTER_ADDR_ENV]}:{port}"
        host = int(env.get(contract.NODE_RANK_ENV, "0")) == 0
    grace = env.get(contract.GRACE_ENV)
    return Launch(
        nproc_per_node=max(gpus, 1),
        nnodes=nodes,
        rdzv_endpoint=endpoint,
        rdzv_id=job_id,
        shutdown_timeout=max(int(grace) - GRACE_MARGIN_SECONDS, 1) if grace else None,
        rdzv_host=host,
    )
