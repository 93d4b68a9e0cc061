"""Credentials never appear in errors, reprs or logs, whatever goes wrong."""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path

import pytest

from kubetune.storage import ObjectNotFoundError, ObjectStore, StorageCredentials, StorageError
from kubetune_testkit.s3 import S3Server

pytestmark = pytest.mark.s3

WRONG_SECRET = "kt-WRONG-SECRET-7f3a9c2e1b4d8f60a5c3e7b9d1f2a4c6"
SESSION_TOKEN = "kt-SESSION-TOKEN-0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a"


def _all_text(exc: BaseException) -> str:
    """Everything a log or a crash report could show of an error: message, repr, full chained traceback."""
    return "\n".join([str(exc), repr(exc), "".join(traceback.format_exception(exc))])


def _clear_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_wrong_secret_gives_a_clear_error_without_the_secret(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # botocore's wire-level debug logging included
    creds = StorageCredentials.from_mapping(
        {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": WRONG_SECRET}
    )
    store = ObjectStore(s3_server.storage_config(credentials=creds, max_attempts=2))
    uri = f"s3://{s3_bucket}/out/metrics.json"

    errors = []
    for action in (
        lambda: store.write_json(uri, {"a": 1}),
        lambda: store.read_json(uri),
        lambda: store.list_prefix(f"s3://{s3_bucket}/out"),
        lambda: store.download_file(uri, tmp_path / "m.json"),
    ):
        with pytest.raises(StorageError) as info:
            action()
        errors.append(info.value)

    assert str(errors[0]) == (
        f"write {uri} failed: access denied (SignatureDoesNotMatch): "
        "check the storage credentials and their permissions"
    )
    assert [e.operation for e in errors] == ["write", "read", "list", "download"]
    assert all(e.code in {"SignatureDoesNotMatch", "403"} for e in errors)
    for error in errors:
        assert WRONG_SECRET not in _all_text(error)
    for text in (repr(store), repr(store.config), store.config.model_dump_json()):
        assert WRONG_SECRET not in text
    assert "botocore" in caplog.text  # the debug log really was captured ...
    assert WRONG_SECRET not in caplog.text  # ... and holds no secret


def test_working_secret_never_logged_or_raised(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = ObjectStore(s3_server.storage_config())
    uri = f"s3://{s3_bucket}/run/manifest.json"
    store.write_json(uri, {"ok": True})
    assert store.read_json(uri) == {"ok": True}
    store.download_file(uri, tmp_path / "manifest.json")
    with pytest.raises(ObjectNotFoundError) as info:
        store.read_bytes(f"s3://{s3_bucket}/run/missing")
    assert s3_server.secret_key not in _all_text(info.value)
    assert "botocore" in caplog.text
    assert s3_server.secret_key not in caplog.text
    assert s3_server.secret_key not in repr(store.config)


def test_credentials_from_the_environment(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storage Secret mounted with envFrom: boto3's standard chain picks the keys up."""
    _clear_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    store = ObjectStore(s3_server.storage_config(credentials=None))
    store.write_text(f"s3://{s3_bucket}/env.txt", "from env")
    assert store.read_text(f"s3://{s3_bucket}/env.txt") == "from env"

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
    with pytest.raises(StorageError) as info:
        ObjectStore(s3_server.storage_config(credentials=None, max_attempts=1)).read_text(
            f"s3://{s3_bucket}/env.txt"
        )
    assert "access denied" in str(info.value)
    assert WRONG_SECRET not in _all_text(info.value)


def test_no_credentials_at_all(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clear_aws_env(monkeypatch, tmp_path)
    store = ObjectStore(s3_server.storage_config(credentials=None))
    with pytest.raises(StorageError, match="no credentials found") as info:
        store.read_bytes(f"s3://{s3_bucket}/x")
    assert info.value.operation == "read"


def test_session_token_stays_out_of_errors_and_our_logs(
    s3_server: S3Server, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Only this package's loggers: botocore's own DEBUG wire log prints request headers, which carry
    # X-Amz-Security-Token. Production keeps botocore at INFO or above.
    caplog.set_level(logging.DEBUG, logger="kubetune")
    creds = StorageCredentials.from_mapping(
        {
            "AWS_ACCESS_KEY_ID": s3_server.access_key,
            "AWS_SECRET_ACCESS_KEY": WRONG_SECRET,
            "AWS_SESSION_TOKEN": SESSION_TOKEN,
        }
    )
    store = ObjectStore(s3_server.storage_config(credentials=creds, max_attempts=1))
    with pytest.raises(StorageError) as info:
        store.write_bytes(f"s3://{s3_bucket}/t.bin", b"x")
    for secret in (SESSION_TOKEN, WRONG_SECRET):
        assert secret not in _all_text(info.value)
        assert secret not in caplog.text
        assert secret not in repr(creds)
