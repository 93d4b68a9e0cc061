"""Round trips against the real S3-compatible server (versitygw over HTTP on loopback)."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kubetune.storage import ObjectNotFoundError, ObjectStore, StorageError
from kubetune_testkit.s3 import S3Server

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

pytestmark = pytest.mark.s3


def test_small_objects_round_trip_with_recorded_checksums(
    store: ObjectStore, s3_client: S3Client, s3_bucket: str
) -> None:
    uri = f"s3://{s3_bucket}/runs/ns/job/metrics.json"
    written = store.write_json(uri, {"eval_loss": 1.25})
    assert store.read_json(uri) == {"eval_loss": 1.25}
    store.write_text(f"s3://{s3_bucket}/runs/ns/job/README.md", "card\n")
    assert store.read_text(f"s3://{s3_bucket}/runs/ns/job/README.md") == "card\n"
    assert store.read_bytes(f"s3://{s3_bucket}/runs/ns/job/README.md") == b"card\n"

    # Seen from outside the module: SHA-256 and CRC64NVME are in the metadata; the server verified the CRC.
    head = s3_client.head_object(Bucket=s3_bucket, Key="runs/ns/job/metrics.json", ChecksumMode="ENABLED")
    body = s3_client.get_object(Bucket=s3_bucket, Key="runs/ns/job/metrics.json")["Body"].read()
    assert head["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest() == written.sha256
    assert head["ContentType"] == "application/json"
    assert head.get("ChecksumType") == "FULL_OBJECT"
    assert head["Metadata"]["crc64nvme"] == written.crc64nvme
    assert base64.b64decode(head["ChecksumCRC64NVME"]).hex() == written.crc64nvme

    info = store.stat(uri)
    assert (info.size, info.sha256) == (len(body), written.sha256)


def test_list_exists_and_prefix_boundaries(store: ObjectStore, s3_bucket: str) -> None:
    base = f"s3://{s3_bucket}/models"
    store.write_bytes(f"{base}/x/config.json", b"{}")
    store.write_bytes(f"{base}/x/weights/model-00001.safetensors", b"w" * 10)
    store.write_bytes(f"{base}/x2/config.json", b"{}")

    listing = store.list_prefix(f"{base}/x")
    assert [(o.name, o.size) for o in listing] == [
        ("config.json", 2),
        ("weights/model-00001.safetensors", 10),
    ]
    assert all(o.etag for o in listing)
    assert store.list_prefix(f"{base}/x/") == listing
    assert [o.sha256 for o in store.list_prefix(f"{base}/x", checksums=True)] == [
        hashlib.sha256(b"{}").hexdigest(),
        hashlib.sha256(b"w" * 10).hexdigest(),
    ]
    assert store.list_prefix(f"{base}/nothing") == []

    assert store.exists(f"{base}/x/config.json")
    assert store.exists(f"{base}/x")  # as a prefix
    assert store.exists(f"{base}/x/weights/")
    assert not store.exists(f"{base}/x/missing.json")
    assert not store.exists(f"{base}/y")
    assert not store.exists("s3://kt-no-such-bucket/x")

    assert store.delete_prefix(f"{base}/x") == 2
    assert store.list_prefix(f"{base}/x") == []
    assert [o.name for o in store.list_prefix(base)] == ["x2/config.json"]
    store.delete(f"{base}/x2/config.json")
    assert not store.exists(base)


def test_files_and_prefixes_round_trip(
    store: ObjectStore, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "adapter"
    (src / "nested").mkdir(parents=True)
    files = {
        "adapter_config.json": b'{"r": 8}',
        "adapter_model.safetensors": os.urandom(300_000),
        "nested/empty.txt": b"",
    }
    for name, data in files.items():
        (src / name).write_bytes(data)

    dest = f"s3://{s3_bucket}/out/adapter"
    up = store.upload_prefix(src, dest)
    assert sorted(str(t.dest) for t in up) == sorted(f"{dest}/{name}" for name in files)
    assert not any(t.skipped for t in up)
    assert {o.name: o.size for o in store.list_prefix(dest)} == {n: len(d) for n, d in files.items()}

    down = store.download_prefix(dest, tmp_path / "back")
    assert not any(t.skipped for t in down)
    for name, data in files.items():
        assert (tmp_path / "back" / name).read_bytes() == data

    # Uploading unchanged files again writes nothing; a changed one is written.
    puts_before = s3_server.request_count("PutObject", s3_bucket)
    assert all(t.skipped for t in store.upload_prefix(src, dest))
    assert s3_server.request_count("PutObject", s3_bucket) == puts_before
    (src / "adapter_config.json").write_bytes(b'{"r": 16}')
    again = {t.dest.name: t.skipped for t in store.upload_prefix(src, dest)}
    assert again == {"adapter_config.json": False, "adapter_model.safetensors": True, "empty.txt": True}
    assert store.read_bytes(f"{dest}/adapter_config.json") == b'{"r": 16}'

    single = store.upload_file(
        src / "adapter_config.json", f"s3://{s3_bucket}/single/c.json", skip_unchanged=False
    )
    assert single.sha256 == hashlib.sha256(b'{"r": 16}').hexdigest()
    got = store.download_file(single.dest, tmp_path / "single" / "c.json")
    assert not got.skipped
    assert (tmp_path / "single" / "c.json").read_bytes() == b'{"r": 16}'


def test_objects_written_by_other_tools_are_verified_by_the_server_checksum(
    store: ObjectStore, s3_client: S3Client, s3_bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(50_000)
    # No sha256 metadata here, only the S3 flexible checksum.
    s3_client.put_object(Bucket=s3_bucket, Key="ext/data.bin", Body=data, ChecksumAlgorithm="SHA256")
    uri = f"s3://{s3_bucket}/ext/data.bin"
    assert store.stat(uri).sha256 == hashlib.sha256(data).hexdigest()
    result = store.download_file(uri, tmp_path / "data.bin")
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert store.download_file(uri, tmp_path / "data.bin").skipped


def test_missing_objects_and_buckets_give_clear_errors(
    store: ObjectStore, s3_bucket: str, tmp_path: Path
) -> None:
    missing = f"s3://{s3_bucket}/nope/model.safetensors"
    with pytest.raises(ObjectNotFoundError) as info:
        store.read_bytes(missing)
    assert str(info.value) == f"read {missing} failed: not found"
    with pytest.raises(ObjectNotFoundError, match=r"download .*nope/model\.safetensors failed: not found"):
        store.download_file(missing, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    with pytest.raises(ObjectNotFoundError, match="nothing under this prefix"):
        store.download_prefix(f"s3://{s3_bucket}/nope", tmp_path / "d")
    with pytest.raises(
        ObjectNotFoundError, match=r"s3://kt-no-such-bucket/x\.json failed: bucket does not exist"
    ):
        store.write_json("s3://kt-no-such-bucket/x.json", {})
    with pytest.raises(StorageError, match="refusing to delete a whole bucket"):
        store.delete_prefix(f"s3://{s3_bucket}")
    with pytest.raises(StorageError, match=r"upload .*not-there\.bin"):
        store.upload_file(tmp_path / "not-there.bin", f"s3://{s3_bucket}/x.bin")
