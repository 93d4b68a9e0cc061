"""End-to-end checksums, multipart transfers, corruption detection and the download cache."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from awscrt.checksums import crc64nvme  # type: ignore[import-untyped]

from kubetune.storage import ChecksumMismatchError, ObjectStore, crc64_hex
from kubetune_testkit.s3 import RequestRecorder, S3Server

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

pytestmark = pytest.mark.s3

MiB = 1024 * 1024


def _flip_byte(path: Path, offset: int) -> None:
    """Damage an object's bytes on the server's disk, the way bit rot would: in place, metadata untouched."""
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _partial_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if ".kubetune-part" in p.name]


def test_multipart_round_trip_of_64_mib_and_corruption_is_detected(
    s3_server: S3Server, s3_client: S3Client, s3_bucket: str, tmp_path: Path
) -> None:
    config = s3_server.storage_config(
        multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=4
    )
    store = ObjectStore(config)
    src = tmp_path / "model.safetensors"
    data = os.urandom(64 * MiB + 12345)  # not a whole number of parts
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    uri = f"s3://{s3_bucket}/models/big/model.safetensors"

    up = store.upload_file(src, uri)
    assert (up.size, up.sha256, up.skipped) == (len(data), sha, False)
    head = s3_client.head_object(Bucket=s3_bucket, Key="models/big/model.safetensors", ChecksumMode="ENABLED")
    assert head["ETag"].endswith('-9"'), head["ETag"]  # really a 9-part multipart upload
    assert head["Metadata"]["sha256"] == sha
    crc = crc64_hex(crc64nvme(data))
    assert head["Metadata"]["crc64nvme"] == up.crc64nvme == crc
    # Every part was checked by the server, and it stores the whole object's CRC64NVME.
    assert head.get("ChecksumType") == "FULL_OBJECT"
    assert base64.b64decode(head["ChecksumCRC64NVME"]).hex() == crc
    assert s3_server.request_count("UploadPart", s3_bucket) == 9

    gets_before = s3_server.request_count("GetObject", s3_bucket)
    down = store.download_file(uri, tmp_path / "dl" / "model.safetensors")
    assert (down.sha256, down.crc64nvme, down.skipped) == (sha, crc, False)
    assert hashlib.sha256((tmp_path / "dl" / "model.safetensors").read_bytes()).hexdigest() == sha
    assert s3_server.request_count("GetObject", s3_bucket) - gets_before == 9  # ranged GETs, in parallel

    _flip_byte(s3_server.object_path(s3_bucket, "models/big/model.safetensors"), 40 * MiB + 7)
    dest = tmp_path / "dl2" / "model.safetensors"
    with pytest.raises(ChecksumMismatchError) as info:
        store.download_file(uri, dest)
    message = str(info.value)
    assert message.startswith(f"download {uri} failed")
    assert f"CRC64NVME {crc} recorded with the object" in message and "corrupt" in message
    assert not dest.exists()
    assert _partial_files(tmp_path) == []


def test_corrupted_small_object_is_detected(
    store: ObjectStore, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    uri = f"s3://{s3_bucket}/data/train.jsonl"
    store.write_bytes(uri, b'{"text": "hello"}\n' * 1000)
    _flip_byte(s3_server.object_path(s3_bucket, "data/train.jsonl"), 100)
    with pytest.raises(ChecksumMismatchError, match=r"data/train\.jsonl"):
        store.read_bytes(uri)
    with pytest.raises(ChecksumMismatchError, match=r"data/train\.jsonl"):
        store.download_file(uri, tmp_path / "train.jsonl")
    assert not (tmp_path / "train.jsonl").exists()
    assert _partial_files(tmp_path) == []


def test_object_replaced_behind_our_back_with_stale_metadata_is_detected(
    store: ObjectStore, s3_client: S3Client, s3_bucket: str, tmp_path: Path
) -> None:
    uri = f"s3://{s3_bucket}/ckpt/optimizer.pt"
    original = os.urandom(100_000)
    store.write_bytes(uri, original)
    metadata = s3_client.head_object(Bucket=s3_bucket, Key="ckpt/optimizer.pt")["Metadata"]
    s3_client.put_object(
        Bucket=s3_bucket, Key="ckpt/optimizer.pt", Body=os.urandom(100_000), Metadata=metadata
    )
    with pytest.raises(ChecksumMismatchError):
        store.download_file(uri, tmp_path / "optimizer.pt")
    with pytest.raises(ChecksumMismatchError):
        store.read_bytes(uri)


def test_download_cache_hit_issues_no_get(
    store: ObjectStore, recorder: RequestRecorder, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"hidden_size": 64}')
    (src / "model.safetensors").write_bytes(os.urandom(200_000))
    prefix = f"s3://{s3_bucket}/models/tiny"
    store.upload_prefix(src, prefix)
    cache = tmp_path / "cache"

    first = store.download_prefix(prefix, cache)
    assert [t.skipped for t in first] == [False, False]
    assert recorder.count("GetObject") == 2
    server_gets = s3_server.request_count("GetObject", s3_bucket)
    assert server_gets == 2
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}

    time.sleep(0.01)
    second = store.download_prefix(prefix, cache)
    assert [t.skipped for t in second] == [True, True]
    assert recorder.count("GetObject") == 2  # the client sent no GET ...
    assert s3_server.request_count("GetObject", s3_bucket) == server_gets  # ... and the server saw none
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes

    # Same size, different bytes: the cache entry is stale and is fetched again.
    (cache / "model.safetensors").write_bytes(os.urandom(200_000))
    third = store.download_file(f"{prefix}/model.safetensors", cache / "model.safetensors")
    assert not third.skipped
    assert recorder.count("GetObject") == 3
    assert (cache / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
