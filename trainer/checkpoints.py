"""Checkpoints in object storage, and resuming from the newest complete one.

Every `checkpointEvery` steps (and on SIGTERM, within the pod's grace period) the Trainer's
checkpoint (weights or adapter, optimizer, scheduler, RNG states, data position, global step)
is copied to ``<output>/checkpoints/step-N/`` and a ``COMPLETE`` marker is written last. On
start the newest checkpoint with its marker is restored; one without it (the pod died while
uploading) is ignored.

Uploads run on a background thread so that rank 0 does not hold every other rank at the next
collective while it talks to storage: the Trainer's files are hard-linked into a snapshot (its
own rotation may delete them meanwhile), at most one snapshot waits behind the one uploading
(then saving blocks: disk use stays bounded), and the last upload is awaited before training
is over. A failed upload fails the run at the next save or at the end.

Under FSDP every rank writes its own shard files, and on several nodes each node holds only its
ranks' files: there the first process of every node uploads what its node wrote, in the same way
beside training, and marks its part done (``.node-K``); rank 0's uploader writes ``COMPLETE`` once
every node's part is. A restore downloads every shard to every node, so a run resumes on another
number of processes too (the shards are resharded on load; see ``resume``).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from transformers import Trainer, TrainerCallback

from kubetune import contract
from kubetune.storage import StorageURI
from kubetune.trainer import distributed, resume
from kubetune.trainer.context import RunContext

MARKER = "COMPLETE"
NODE_DONE = ".node-"  # + the node's index: its part of a sharded checkpoint is in storage
KEEP = 2
POLL_SECONDS = 1.0


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
    def __init__(self, ctx: RunContext, *, waiting: int = 1) -> None:
        self.ctx = ctx
        self.remote: StorageURI = ctx.output.join(contract.CHECKPOINTS)
        self._queue: queue.Queue[Path | None] = queue.Queue(maxsize=waiting)
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None
        self.uploaded: list[int] = []  # steps whose COMPLETE marker is written, in order
        self.nodes = 1  # that upload parts of each checkpoint: several under FSDP on several nodes

    def restore(self) -> str | None:
        """The newest complete checkpoint, on local disk for every process of this node."""
        names = {info.name for info in self.ctx.store.list_prefix(self.remote)}
        step = newest_complete(names)
        if step is None:
            return None
        local = self.ctx.workdir / "trainer" / f"checkpoint-{step}"
        if distributed.local_rank() == 0:
            self.ctx.store.download_prefix(self.remote.join(f"step-{step}"), local)
            for marker in [local / MARKER, *local.glob(f"{NODE_DONE}*")]:
                marker.unlink(missing_ok=True)
        distributed.barrier()
        self.ctx.reporter.log(f"resuming from checkpoint step {step}")
        return str(local)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if distributed.is_main() and local.is_dir():
            layout = resume.Layout(
                distributed.world_size(), args.per_device_train_batch_size, args.gradient_accumulation_steps
            )
            resume.write_layout(local, layout)
        if args.fsdp:
            distributed.barrier()  # every rank's files of this step are written
            self.nodes = distributed.world_size() // distributed.local_world_size()
            uploads = distributed.local_rank() == 0
        else:
            uploads = state.is_world_process_zero
        if not uploads or not local.is_dir():
            return
        self._raise_failed()
        snapshot = self.ctx.workdir / "checkpoint-uploads" / local.name
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(local, snapshot, copy_function=_link)
        if self._worker is None:
            self._worker = threading.Thread(target=self._upload_loop, name="checkpoint-upload", daemon=True)
            self._worker.start()
        self._queue.put(snapshot)

    def wait(self) -> None:
        """Until every checkpoint saved so far is uploaded with its marker; raises its error."""
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None
        self._raise_failed()

    def _raise_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _upload_loop(self) -> None:
        while (snapshot := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._upload(snapshot)
                except BaseException as error:  # raised on the training thread
                    self._error = error
            shutil.rmtree(snapshot, ignore_errors=True)

    def _upload(self, snapshot: Path) -> None:
        step = step_of(snapshot.name)
        assert step is not None
        target = self.remote.join(f"step-{step}")
        self.ctx.store.upload_prefix(snapshot, target)
        if self.nodes > 1:
            node = distributed.rank() // distributed.local_world_size()
            self.ctx.store.write_text(target.join(f"{NODE_DONE}{node}"), f"{step}\n")
            if not distributed.is_main():
                return
            parts = {target.join(f"{NODE_DONE}{k}") for k in range(self.nodes)}
            while not all(self.ctx.store.exists(part) for part in parts):
                time.sleep(POLL_SECONDS)  # another node still uploading; should it fail, so does the job
        self.ctx.store.write_text(target.join(MARKER), f"{step}\n")
        self.uploaded.append(step)
        self._prune(step)

    def _prune(self, newest: int) -> None:
        names = {info.name.split("/")[0] for info in self.ctx.store.list_prefix(self.remote)}
        steps = sorted(s for n in names if (s := step_of(n)) is not None and s <= newest)
        for old in steps[:-KEEP]:
            self.ctx.store.delete_prefix(self.remote.join(f"step-{old}"))


def _link(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


class _StopOnSignal(TrainerCallback):
    def __init__(self) -> None:
        self.signalled = False
        self.stopped_at: int | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Every rank takes the same decision at the same step (all of them save that step),
        # whichever received the signal and whenever: no rank waits in a collective for
        # another that stopped one step earlier.
        if distributed.agree(self.signalled):
            self.stopped_at = state.global_step
            control.should_save = args.save_strategy != "no"
            control.should_training_stop = True


@contextmanager
def save_on_sigterm(trainer: Trainer) -> Iterator[None]:
    """On SIGTERM (to any rank), finish the current step, save a checkpoint on every rank at
    that step, and raise Interrupted."""
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
    if stopper.stopped_at is not None:
        raise Interrupted(
            f"stopped by SIGTERM at step {stopper.stopped_at} after checkpointing; the next attempt resumes"
        )
