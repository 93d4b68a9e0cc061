"""The server goes away in the middle of a transfer: botocore's retries carry the transfer over the
outage, or it fails with a clear StorageError, and no partial object is ever visible."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from kubetune.storage import ObjectStore, StorageError
from kubetune_testkit.s3 import RequestRecorder, S3Server

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

pytestmark = pytest.mark.s3

MiB = 1024 * 1024
# How long the server stays down; KUBETUNE_S3_OUTAGE_SECONDS=30 runs the long version.
OUTAGE_SECONDS = float(os.environ.get("KUBETUNE_S3_OUTAGE_SECONDS", "6"))


class Outage:
    """Stops the server just as the first ``operation`` request is sent, and restarts it ``seconds`` later
    (never, if ``seconds`` is None)."""

    def __init__(self, server: S3Server, store: ObjectStore, operation: str, seconds: float | None) -> None:
        self.server = server
        self.seconds = seconds
        self.stopped_at: float | None = None
        self.restarted_at: float | None = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        store.client.meta.events.register(f"before-send.s3.{operation}", self._on_send)

    def _on_send(self, **kwargs: Any) -> None:
        with self._lock:
            if self.stopped_at is not None:
                return
            self.stopped_at = time.monotonic()
            self.server.stop()
            if self.seconds is not None:
                self._timer = threading.Timer(self.seconds, self._restart)
                self._timer.start()

    def _restart(self) -> None:
        self.server.start()
        self.restarted_at = time.monotonic()

    def join(self) -> None:
        if self._timer is not None:
            self._timer.join()

    def attempts_while_down(self, recorder: RequestRecorder, operation: str) -> int:
        assert self.stopped_at is not None and self.restarted_at is not None
        return sum(1 for t in recorder.times(operation) if self.stopped_at <= t < self.restarted_at)


def _store(server: S3Server, max_attempts: int) -> ObjectStore:
    return ObjectStore(
        server.storage_config(
            max_attempts=max_attempts,
            multipart_threshold=5 * MiB,
            multipart_chunksize=5 * MiB,
            max_concurrency=2,
        )
    )


@pytest.mark.timeout(120 + 4 * OUTAGE_SECONDS)
def test_upload_rides_out_an_outage(
    s3_server: S3Server, s3_client: S3Client, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(s3_server, max_attempts=20)
    recorder = RequestRecorder(store.client)
    outage = Outage(s3_server, store, "UploadPart", OUTAGE_SECONDS)
    src = tmp_path / "merged.safetensors"
    data = os.urandom(25 * MiB)  # 5 parts
    src.write_bytes(data)
    uri = f"s3://{s3_bucket}/out/merged.safetensors"
    starts = s3_server.starts

    began = time.monotonic()
    result = store.upload_file(src, uri)
    elapsed = time.monotonic() - began
    outage.join()

    assert s3_server.starts == starts + 1
    assert elapsed >= OUTAGE_SECONDS
    # Parts were sent while nothing listened, and again once the server was back.
    assert outage.attempts_while_down(recorder, "UploadPart") >= 3
    assert recorder.count("UploadPart") > 5
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert store.stat(uri).sha256 == result.sha256
    body = s3_client.get_object(Bucket=s3_bucket, Key="out/merged.safetensors")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == result.sha256
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


@pytest.mark.timeout(120 + 4 * OUTAGE_SECONDS)
def test_download_rides_out_an_outage(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = _store(s3_server, max_attempts=20)
    uri = f"s3://{s3_bucket}/in/data.bin"
    data = os.urandom(12 * MiB)
    (tmp_path / "data.bin").write_bytes(data)
    store.upload_file(tmp_path / "data.bin", uri)

    recorder = RequestRecorder(store.client)
    outage = Outage(s3_server, store, "GetObject", OUTAGE_SECONDS)
    result = store.download_file(uri, tmp_path / "dl" / "data.bin")
    outage.join()

    assert outage.attempts_while_down(recorder, "GetObject") >= 3
    assert not result.skipped
    assert (tmp_path / "dl" / "data.bin").read_bytes() == data


@pytest.mark.timeout(120)
def test_upload_that_runs_out_of_retries_fails_cleanly(
    s3_server: S3Server, s3_client: S3Client, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(s3_server, max_attempts=2)
    recorder = RequestRecorder(store.client)
    Outage(s3_server, store, "UploadPart", None)
    src = tmp_path / "adapter.safetensors"
    src.write_bytes(os.urandom(12 * MiB))
    uri = f"s3://{s3_bucket}/out/adapter.safetensors"

    with pytest.raises(StorageError) as info:
        store.upload_file(src, uri)

    message = str(info.value)
    assert message.startswith(f"upload {uri} failed: ")
    assert "Could not connect to the endpoint URL" in message
    assert info.value.operation == "upload" and info.value.uri == uri
    assert recorder.count("UploadPart") >= 2  # the failing part was retried before giving up

    s3_server.start()
    assert not store.exists(uri)
    assert store.list_prefix(f"s3://{s3_bucket}/out") == []
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0
    # The abort was sent while the server was down; the unfinished upload is cleaned up explicitly.
    assert store.abort_multipart_uploads(f"s3://{s3_bucket}/out/") == 1
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
