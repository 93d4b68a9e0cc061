"""Checkpoints in object storage, and resuming from the newest complete one.

Every `checkpointEvery` steps (and on SIGTERM, within the pod's grace period) the Trainer's
checkpoint (weights or adapter, optimizer, scheduler, RNG states, data position, global step)
is copied to ``<output>/checkpoints/step-N/`` and a ``COMPLETE`` marker is written last. On
start the newest checkpoint with its marker is restored; one without it (the pod died while
uploading) is ignored.
"""

from __future__ import annotations

import json
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from transformers import Trainer, TrainerCallback

from kubetune.storage import StorageURI
from kubetune.trainer import distributed
from kubetune.trainer.context import RunContext

MARKER = "COMPLETE"
KEEP = 2


class Interrupted(RuntimeError):
    """Training stopped on SIGTERM after saving a checkpoint; the next attempt resumes."""


def step_of(name: str) -> int | None:
    match = re.fullmatch(r"(?:step|checkpoint)-(\d+)", name.rstrip("/"))
    return int(match.group(1)) if match else None


def newest_complete(names: set[str]) -> int | None:
    """The highest step N with both `step-N/...` files and `step-N/COMPLETE` (pure)."""
    steps = [
        step
        for name in names
        if name.endswith(f"/{MARKER}") and (step := step_of(name.split("/")[0])) is not None
    ]
    return max(steps, default=None)


def finished(checkpoint: str, planned_steps: int) -> bool:
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return int(state["global_step"]) >= planned_steps


class CheckpointSync(TrainerCallback):
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.remote: StorageURI = ctx.output.join("checkpoints")

    def restore(self) -> str | None:
        """The newest complete checkpoint, on local disk for every process of this node."""
        names = {info.name for info in self.ctx.store.list_prefix(self.remote)}
        step = newest_complete(names)
        if step is None:
            return None
        local = self.ctx.workdir / "trainer" / f"checkpoint-{step}"
        if distributed.local_rank() == 0:
            self.ctx.store.download_prefix(self.remote.join(f"step-{step}"), local)
            (local / MARKER).unlink(missing_ok=True)
        distributed.barrier()
        self.ctx.reporter.log(f"resuming from checkpoint step {step}")
        return str(local)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not state.is_world_process_zero or not local.is_dir():
            return
        target = self.remote.join(f"step-{state.global_step}")
        self.ctx.store.upload_prefix(local, target)
        self.ctx.store.write_text(target.join(MARKER), f"{state.global_step}\n")
        self._prune(state.global_step)

    def _prune(self, newest: int) -> None:
        names = {info.name.split("/")[0] for info in self.ctx.store.list_prefix(self.remote)}
        steps = sorted(s for n in names if (s := step_of(n)) is not None and s <= newest)
        for old in steps[:-KEEP]:
            self.ctx.store.delete_prefix(self.remote.join(f"step-{old}"))


class _StopOnSignal(TrainerCallback):
    def __init__(self) -> None:
        self.signalled = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.signalled:
            control.should_save = args.save_strategy != "no"
            control.should_training_stop = True


@contextmanager
def save_on_sigterm(trainer: Trainer) -> Iterator[None]:
    """On SIGTERM, finish the current step, save a checkpoint, and raise Interrupted."""
    stopper = _StopOnSignal()
    trainer.add_callback(stopper)

    def handle(signum: int, frame: FrameType | None) -> None:
        stopper.signalled = True

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, handle) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        trainer.remove_callback(stopper)
    if stopper.signalled:
        raise Interrupted("stopped by SIGTERM after checkpointing; the next attempt resumes")
