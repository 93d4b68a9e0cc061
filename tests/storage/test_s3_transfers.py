"""How transfers use the server: one request per small file, parts for large ones, parallel files,
and a body cut off mid-stream resumed from where it broke."""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from kubetune.storage import ObjectStore
from kubetune_testkit.s3 import RequestRecorder, S3Server

pytestmark = pytest.mark.s3

MiB = 1024 * 1024


def _model(directory: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"hidden_size": 64}',
        "tokenizer.json": os.urandom(200_000),
        "tokenizer_config.json": b"{}",
        "special_tokens_map.json": b"{}",
        "model-00001-of-00002.safetensors": os.urandom(11 * MiB + 5),
        "model-00002-of-00002.safetensors": os.urandom(6 * MiB),
    }
    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return files


def test_one_request_per_small_file_and_parts_for_large_ones(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    config = s3_server.storage_config(multipart_threshold=8 * MiB, multipart_chunksize=5 * MiB)
    store = ObjectStore(config)
    recorder = RequestRecorder(store.client)
    files = _model(tmp_path / "model")
    prefix = f"s3://{s3_bucket}/models/tiny"

    seen: list[tuple[int, int]] = []
    up = store.upload_prefix(
        tmp_path / "model", prefix, progress=lambda done, total: seen.append((done, total))
    )
    total = sum(len(d) for d in files.values())
    assert sorted((t.dest.name, t.size, t.sha256) for t in up) == sorted(
        (n, len(d), hashlib.sha256(d).hexdigest()) for n, d in files.items()
    )
    # A fresh prefix: one listing, no HEAD; 5 small files in one PUT each, 11 MiB in 3 parts.
    assert recorder.count("ListObjectsV2") == 1
    assert recorder.count("HeadObject") == 0
    assert recorder.count("PutObject") == 5
    assert (recorder.count("CreateMultipartUpload"), recorder.count("UploadPart")) == (1, 3)
    assert seen[-1] == (total, total) and all(b[0] >= a[0] for a, b in itertools.pairwise(seen))

    seen.clear()
    down = store.download_prefix(prefix, tmp_path / "back", progress=lambda d, t: seen.append((d, t)))
    assert not any(t.skipped for t in down)
    for name, data in files.items():
        assert (tmp_path / "back" / name).read_bytes() == data
    # No HEAD: size and ETag come from the listing, the SHA-256 with the GET; 3 ranged GETs for 11 MiB.
    assert recorder.count("HeadObject") == 0
    assert recorder.count("GetObject") == 5 + 3
    assert seen[-1] == (total, total)
    assert [p.name for p in (tmp_path / "back").iterdir() if ".kubetune-part" in p.name] == []


def test_parallel_uploads_and_downloads_overlap(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    """Files move in parallel: several GETs are in flight at once (max_concurrency)."""
    store = ObjectStore(s3_server.storage_config(max_concurrency=4))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"f{i}.bin").write_bytes(os.urandom(2 * MiB))
    prefix = f"s3://{s3_bucket}/many"
    store.upload_prefix(src, prefix)

    lock = threading.Lock()
    state = {"now": 0, "peak": 0}

    def before(**kwargs: Any) -> None:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])

    def after(**kwargs: Any) -> None:
        with lock:
            state["now"] -= 1

    # Counted from the request's start to the end of its body (the part task returns).
    original = store._downloads._part

    def part(*args: Any, **kwargs: Any) -> None:
        before()
        try:
            original(*args, **kwargs)
        finally:
            after()

    store._downloads._part = part  # type: ignore[method-assign]
    store.download_prefix(prefix, tmp_path / "back")
    assert 2 <= state["peak"] <= 4
    for i in range(8):
        assert (tmp_path / "back" / f"f{i}.bin").read_bytes() == (src / f"f{i}.bin").read_bytes()


@pytest.mark.timeout(120)
def test_a_body_cut_off_mid_stream_is_resumed_where_it_broke(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    store = ObjectStore(s3_server.storage_config(max_attempts=20))
    data = os.urandom(48 * MiB)  # one GET (under the 64 MiB threshold)
    (tmp_path / "w.bin").write_bytes(data)
    uri = f"s3://{s3_bucket}/w.bin"
    store.upload_file(tmp_path / "w.bin", uri)

    ranges: list[str | None] = []

    def record(request: Any, **kwargs: Any) -> None:
        value = request.headers.get("Range")
        ranges.append(value.decode() if isinstance(value, bytes) else value)

    store.client.meta.events.register("before-send.s3.GetObject", record)
    cut = threading.Event()

    def progress(done: int, total: int) -> None:
        if done >= 4 * MiB and not cut.is_set():
            cut.set()
            s3_server.kill()  # mid-body: the connection drops with most of the object unsent
            threading.Timer(1.0, s3_server.start).start()

    result = store.download_file(uri, tmp_path / "dl" / "w.bin", progress=progress)
    assert cut.is_set()
    assert (tmp_path / "dl" / "w.bin").read_bytes() == data
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    resumed = [r for r in ranges if r is not None]
    assert ranges[0] is None and resumed, ranges
    start = int(resumed[-1].removeprefix("bytes=").split("-")[0])
    assert 4 * MiB <= start < 48 * MiB  # not from the start: the bytes already written were kept
