"""URI parsing and joining, configuration and credentials: pure, no I/O."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kubetune.storage import (
    InvalidURIError,
    StorageConfig,
    StorageCredentials,
    StorageError,
    StorageURI,
    join_uri,
    parse_uri,
)


def test_parse_s3_uri() -> None:
    uri = parse_uri("s3://my-bucket/models/llama/config.json")
    assert uri == StorageURI("s3", "my-bucket", "models/llama/config.json")
    assert uri.is_s3 and not uri.is_local
    assert uri.name == "config.json"
    assert str(uri) == "s3://my-bucket/models/llama/config.json"
    assert parse_uri("s3://my-bucket") == StorageURI("s3", "my-bucket", "")
    assert parse_uri("s3://my-bucket/prefix/").key == "prefix/"
    assert parse_uri("S3://my-bucket/k").bucket == "my-bucket"


def test_parse_local_paths_and_file_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_uri("file:///data/train.jsonl") == StorageURI("file", "", "/data/train.jsonl")
    assert parse_uri("file://data/train.jsonl").path == tmp_path / "data" / "train.jsonl"
    assert parse_uri("data/train.jsonl").path == tmp_path / "data" / "train.jsonl"
    assert parse_uri(Path("x") / "y").path == tmp_path / "x" / "y"
    # A plain path is resolved as a shell would; only URIs refuse `..`.
    assert parse_uri("../elsewhere").path == tmp_path.parent / "elsewhere"
    assert str(parse_uri("/abs/file")) == "/abs/file"


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("s3://bucket/a/../secret", "'..'"),
        ("s3://bucket/../x", "'..'"),
        ("s3://bucket/a/./b", "'.'"),
        ("file:///srv/../etc/passwd", "'..'"),
        ("file://../x", "'..'"),
        ("s3://bucket/a//b", "empty path segment"),
        ("s3://", "missing bucket"),
        ("s3:///key", "missing bucket"),
        ("s3://Bad_Bucket/key", "invalid bucket name"),
        ("s3://ab/key", "invalid bucket name"),
        ("gs://bucket/key", "unsupported URI scheme 'gs'"),
        ("https://example.com/model.bin", "unsupported URI scheme 'https'"),
        ("hf://org/model", "unsupported URI scheme 'hf'"),
        ("builtin:alpaca", "unsupported URI scheme 'builtin'"),
        ("s3://bucket/a\nb", "control character"),
        ("", "empty URI"),
    ],
)
def test_bad_uris_are_refused_with_a_clear_error(uri: str, fragment: str) -> None:
    with pytest.raises(InvalidURIError) as info:
        parse_uri(uri)
    assert fragment in str(info.value)
    if uri:
        assert repr(uri) in str(info.value) or uri in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, StorageError)


def test_join() -> None:
    base = parse_uri("s3://bucket/runs/ns/job")
    assert (
        str(join_uri(base, "adapter", "model.safetensors"))
        == "s3://bucket/runs/ns/job/adapter/model.safetensors"
    )
    assert str(base / "adapter/config.json") == "s3://bucket/runs/ns/job/adapter/config.json"
    assert str(join_uri("s3://bucket/prefix/", "a")) == "s3://bucket/prefix/a"
    assert str(join_uri("s3://bucket", "a", "b/")) == "s3://bucket/a/b/"
    assert join_uri("file:///srv/out", "a/b.json").path == Path("/srv/out/a/b.json")
    assert join_uri(base) == base


@pytest.mark.parametrize("part", ["..", "a/../../b", "./x", "/etc/passwd", "a//b"])
def test_join_refuses_escaping_parts(part: str) -> None:
    with pytest.raises(InvalidURIError):
        join_uri("s3://bucket/prefix", part)
    with pytest.raises(InvalidURIError):
        join_uri("/srv/cache", part)


def test_path_style_is_on_by_default_with_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert StorageConfig().effective_path_style is False
    assert StorageConfig(endpoint="http://minio:9000").effective_path_style is True
    assert StorageConfig(endpoint="https://r2.example", path_style=False).effective_path_style is False
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://ceph:7480")
    assert StorageConfig().effective_path_style is True

    config: Any = StorageConfig(
        endpoint="http://minio:9000/", retry_mode="adaptive", max_attempts=7
    ).botocore_config()
    assert config.retries == {"mode": "adaptive", "max_attempts": 7}
    assert config.s3 == {"addressing_style": "path"}
    transfer: Any = StorageConfig(max_concurrency=3, multipart_chunksize=16 * 2**20).transfer_config()
    assert (transfer.max_concurrency, transfer.multipart_chunksize) == (3, 16 * 2**20)


def test_bad_config_is_refused_without_echoing_secrets() -> None:
    with pytest.raises(ValidationError) as info:
        StorageConfig(endpoint="http://admin:hunter2-topsecret@minio:9000")
    assert "must not contain credentials" in str(info.value)
    assert "hunter2-topsecret" not in str(info.value)
    with pytest.raises(ValidationError):
        StorageConfig(endpoint="minio:9000")
    with pytest.raises(ValidationError):
        StorageConfig(max_attempts=0)
    with pytest.raises(ValidationError):
        StorageConfig(multipart_chunksize=1024)


def test_credentials_are_masked_everywhere(tmp_path: Path) -> None:
    secret = "kt-secret-Zm9vYmFyYmF6cXV4-do-not-print"
    creds = StorageCredentials.from_mapping(
        {
            "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID",
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_SESSION_TOKEN": "tok-123456",
        }
    )
    config: Any = StorageConfig(endpoint="http://minio:9000", credentials=creds)
    for text in (
        repr(creds),
        str(creds),
        repr(config),
        str(config),
        config.model_dump_json(),
        str(config.model_dump()),
    ):
        assert secret not in text
        assert "tok-123456" not in text
        assert "AKIAEXAMPLEKEYID" not in text
    assert creds.secret_access_key.get_secret_value() == secret

    (tmp_path / "AWS_ACCESS_KEY_ID").write_text("AKIAEXAMPLEKEYID\n")
    (tmp_path / "AWS_SECRET_ACCESS_KEY").write_text(secret + "\n")
    assert StorageCredentials.from_directory(tmp_path).secret_access_key.get_secret_value() == secret


def test_missing_credential_keys_are_named_not_valued() -> None:
    with pytest.raises(StorageError) as info:
        StorageCredentials.from_mapping({"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID"}, source="secret kt/storage")
    assert "missing AWS_SECRET_ACCESS_KEY" in str(info.value)
    assert "secret kt/storage" in str(info.value)
    assert "AKIAEXAMPLEKEYID" not in str(info.value)


def test_storage_imports_no_ml_framework() -> None:
    """The operator image has no torch: importing storage must not pull it (or transformers) in."""
    code = "import sys, kubetune.storage; print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
