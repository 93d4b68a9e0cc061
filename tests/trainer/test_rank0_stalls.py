"""Rank 0's storage and API calls must not hold training: background checkpoint uploads and
status patches with a request timeout."""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kubetune import api
from kubetune.storage import ObjectStore, Transfer, URILike
from kubetune.trainer.pipeline import execute
from kubetune.trainer.reporter import SilentReporter
from kubetune.trainer.status import StatusReporter
from kubetune_testkit.s3 import S3Server

from .conftest import tiny_job


class Timeline(SilentReporter):
    """Records the steps trained and the stages started, in order, with the store's writes."""

    def __init__(self, events: list[tuple[str, Any]], reached: threading.Event, step: int) -> None:
        self.events, self.reached, self.step = events, reached, step

    def progress(self, progress: api.Progress) -> None:
        if progress.step is not None:
            self.events.append(("step", progress.step))
            if progress.step >= self.step:
                self.reached.set()

    def stage_started(self, stage: api.Stage) -> None:
        self.events.append(("stage", stage.value))


class SlowStore(ObjectStore):
    """The real S3 store whose first checkpoint upload takes until training has moved on.

    It stands in for a slow link: the upload of step 2 is held until the trainer reports a
    later step, which it can only do if the upload runs beside the training loop. A 60 s
    guard keeps a synchronous upload from deadlocking the test (it fails instead).
    """

    def __init__(self, server: S3Server, events: list[tuple[str, Any]], reached: threading.Event) -> None:
        super().__init__(server.storage_config())
        self.events, self.reached = events, reached
        self.held_until_training_moved_on: bool | None = None

    def upload_prefix(self, src_dir: str | os.PathLike[str], uri: URILike, **kwargs: Any) -> list[Transfer]:
        name = str(uri).rstrip("/").rsplit("/", 1)[-1]
        if "/checkpoints/" in str(uri) and name == "step-2":
            self.held_until_training_moved_on = self.reached.wait(timeout=60)
        result = super().upload_prefix(src_dir, uri, **kwargs)
        self.events.append(("uploaded", name))
        return result

    def write_text(self, uri: URILike, text: str) -> Any:
        result = super().write_text(uri, text)
        if str(uri).endswith("/COMPLETE"):
            self.events.append(("marker", str(uri).rsplit("/", 2)[-2]))
        return result


@pytest.mark.training
@pytest.mark.s3
def test_a_slow_checkpoint_upload_does_not_hold_the_training_loop(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    events: list[tuple[str, Any]] = []
    reached = threading.Event()
    store = SlowStore(s3_server, events, reached)
    job = tiny_job(
        training={"maxSteps": 8, "batchSize": 8, "maxSeqLength": 32, "checkpointEvery": 2},
        evaluation={"metrics": ["loss"], "baseline": False},
    )
    root = f"s3://{s3_bucket}/slow"
    execute(job, Timeline(events, reached, step=5), workdir=tmp_path / "work", output=root, store=store)

    assert store.held_until_training_moved_on is True, "training waited for the upload of step 2"
    steps_before_upload = [s for kind, s in events[: events.index(("uploaded", "step-2"))] if kind == "step"]
    assert max(steps_before_upload) >= 5, "steps 3 to 5 ran while step 2 was uploading"
    for step in ("step-2", "step-4", "step-6", "step-8"):
        assert events.index(("uploaded", step)) < events.index(("marker", step)), "COMPLETE last"
    assert events.index(("marker", "step-8")) < events.index(("stage", "push")), (
        "the final checkpoint is in storage before the artifacts are published"
    )
    kept = {info.name.split("/")[0] for info in store.list_prefix(f"{root}/checkpoints")}
    assert kept == {"step-6", "step-8"}, "older checkpoints pruned after the newer ones completed"
    assert store.exists(f"{root}/checkpoints/step-8/COMPLETE")
    assert not list((tmp_path / "work" / "checkpoint-uploads").iterdir()), "snapshots removed"


def test_a_status_patch_to_a_hanging_api_server_gives_up_after_its_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A listening socket that accepts connections and never answers: an API server that hangs
    # (overloaded, or a half-open connection through a proxy). No real server can be made to
    # hang on demand; the client's side, which is what is tested, is real.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{server.getsockname()[1]}"
        configuration.retries = 0
        custom = client.CustomObjectsApi(client.ApiClient(configuration))
        reporter = StatusReporter(custom, "ns", "job", interval=0.0, timeout=0.5, backoff=3600)

        done = threading.Event()

        def report() -> None:
            reporter.stage_started(api.Stage.TRAIN)
            reporter.progress(api.Progress(stage=api.Stage.TRAIN, step=1))  # skipped: backing off
            done.set()

        with caplog.at_level(logging.WARNING, logger="kubetune.trainer.status"):
            worker = threading.Thread(target=report, daemon=True)
            worker.start()
            # a deadlock guard, not a speed target: without a timeout the patch never returns
            assert done.wait(timeout=60), "the status patch hung on an API server that never answers"
        assert "could not update ns/job status" in caplog.text
        assert caplog.text.count("could not update") == 1, "progress waits out the back-off"
