"""A real S3-compatible server on loopback for tests: versitygw with its posix backend.

The binary is looked up in this order:

1. ``KUBETUNE_VERSITYGW`` (path of a versitygw binary);
2. the project cache ``${KUBETUNE_ASSETS:-${XDG_CACHE_HOME:-~/.cache}/kubetune/assets}/versitygw-<version>/``;
3. otherwise ``hack/build-s3-server`` builds it there from its Go module (about two minutes once).

Objects live as plain files under ``data_dir/buckets/<bucket>/<key>`` (metadata in xattrs), so
the data survives :meth:`S3Server.stop` and :meth:`S3Server.start`, which reuses the same port:
a test can take the server away for a while and bring it back.

Command line::

    python -m kubetune_testkit.s3 binary   # print the binary, build if missing
    python -m kubetune_testkit.s3 serve    # run until interrupted, print endpoint and keys
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import boto3
from botocore.config import Config

from kubetune.storage import StorageConfig, StorageCredentials
from kubetune_testkit import REPO_ROOT

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

VERSITYGW_VERSION = "v1.8.0"
"""The version ``hack/build-s3-server`` builds; also part of the cache directory's name."""

BUILD_SCRIPT = REPO_ROOT / "hack" / "build-s3-server"
_BUILD_LOCK = threading.Lock()


class S3ServerError(RuntimeError):
    """The test S3 server could not be found, built, started or reached."""


def assets_dir() -> Path:
    if root := os.environ.get("KUBETUNE_ASSETS"):
        return Path(root)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "kubetune" / "assets"


def versitygw_binary(*, build: bool = True) -> Path:
    """The versitygw binary, built into the cache by ``hack/build-s3-server`` when missing."""
    if explicit := os.environ.get("KUBETUNE_VERSITYGW"):
        path = Path(explicit)
        if not os.access(path, os.X_OK):
            raise S3ServerError(f"KUBETUNE_VERSITYGW={explicit} is not an executable file")
        return path
    cached = assets_dir() / f"versitygw-{VERSITYGW_VERSION}" / "versitygw"
    if os.access(cached, os.X_OK):
        return cached
    if not build:
        raise S3ServerError(f"versitygw not found at {cached}; run {BUILD_SCRIPT}")
    if not BUILD_SCRIPT.is_file():
        raise S3ServerError(
            f"versitygw not found at {cached} and no build script at {BUILD_SCRIPT}; "
            "set KUBETUNE_VERSITYGW to a versitygw binary"
        )
    with _BUILD_LOCK:
        env = {**os.environ, "VERSITYGW_VERSION": VERSITYGW_VERSION, "KUBETUNE_ASSETS": str(assets_dir())}
        proc = subprocess.run(
            [str(BUILD_SCRIPT)], env=env, capture_output=True, text=True, check=False, timeout=1800
        )
    if proc.returncode != 0:
        raise S3ServerError(f"{BUILD_SCRIPT} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    path = Path(proc.stdout.strip().splitlines()[-1])
    if not os.access(path, os.X_OK):
        raise S3ServerError(f"{BUILD_SCRIPT} printed {path}, which is not executable")
    return path


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class S3Server:
    """versitygw serving ``data_dir`` on ``host:port`` (loopback, a free port by default).

    ``stop()`` ends the process; ``start()`` brings it back on the same port with the same data
    and the same keys. Thread-safe, so a timer thread may restart it while a test transfers.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        binary: str | os.PathLike[str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self._owns_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="kubetune-s3-"))
        self.root = self.data_dir / "buckets"
        self.log_path = self.data_dir / "versitygw.log"
        self.access_log_path = self.data_dir / "access.log"
        self.host = host
        self.port = port or _free_port(host)
        self.access_key = access_key or "KT" + secrets.token_hex(8).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.region = region
        self._binary = Path(binary) if binary else None
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._lock = threading.RLock()
        self._admin: S3Client | None = None
        self.starts = 0

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"S3Server(endpoint={self.endpoint!r}, data_dir={str(self.data_dir)!r}, {state})"

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs (to read its CPU time, for instance)."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> S3Server:
        with self._lock:
            if self.running:
                return self
            binary = self._binary or versitygw_binary()
            self.root.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("ab")
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "ROOT_ACCESS_KEY_ID": self.access_key,
                "ROOT_SECRET_ACCESS_KEY": self.secret_key,
            }
            cmd = [
                str(binary),
                "--port", f"{self.host}:{self.port}",
                "--region", self.region,
                "--access-log", str(self.access_log_path),
                "--quiet",
                "posix", str(self.root),
            ]  # fmt: skip
            self._proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
            )
            self.starts += 1
            atexit.register(self.stop)
            try:
                self._wait_ready()
            except BaseException:
                self.stop()
                raise
            return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise S3ServerError(
                    f"versitygw exited with {self._proc.returncode} on {self.endpoint}:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise S3ServerError(
                        f"versitygw did not listen on {self.endpoint} within {self._start_timeout:.0f}s:\n"
                        f"{self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if self._log is not None:
                self._log.close()
                self._log = None
            atexit.unregister(self.stop)

    def kill(self) -> None:
        """End the process at once (SIGKILL), as a crash would: connections drop mid-request."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
        self.stop()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    # ------------------------------------------------------------------ helpers for tests

    def client(self, **config: Any) -> S3Client:
        """A plain boto3 client for this server, for doing things behind the back of the code under test."""
        client: S3Client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, **config),
        )
        return client

    def storage_config(self, **overrides: Any) -> StorageConfig:
        """A :class:`StorageConfig` pointing at this server with its keys."""
        values: dict[str, Any] = {
            "endpoint": self.endpoint,
            "region": self.region,
            "credentials": StorageCredentials.from_mapping(
                {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
            ),
        }
        values.update(overrides)
        return StorageConfig(**values)

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"kt-{secrets.token_hex(6)}"
        self._admin_client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket with everything in it, unfinished multipart uploads included."""
        client = self._admin_client()
        for uploads in client.get_paginator("list_multipart_uploads").paginate(Bucket=name):
            for upload in uploads.get("Uploads", []):
                client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            if contents := page.get("Contents"):
                client.delete_objects(
                    Bucket=name, Delete={"Objects": [{"Key": o["Key"]} for o in contents], "Quiet": True}
                )
        client.delete_bucket(Bucket=name)

    def _admin_client(self) -> S3Client:
        with self._lock:
            if self._admin is None:
                self._admin = self.client()
            return self._admin

    def object_path(self, bucket: str, key: str) -> Path:
        """Where the posix backend keeps an object's bytes (to corrupt it behind the server's back)."""
        return self.root / bucket / key

    def access_log(self) -> list[str]:
        """The server's access log lines so far (one per request)."""
        try:
            return self.access_log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def request_count(self, operation: str, bucket: str | None = None) -> int:
        """How many ``operation`` requests (e.g. ``"GetObject"``) the server logged (in ``bucket``)."""
        count = 0
        for line in self.access_log():
            fields = line.split()
            if f"s3_{operation}" in fields and (bucket is None or (len(fields) > 1 and fields[1] == bucket)):
                count += 1
        return count


class RequestRecorder:
    """Every HTTP attempt a boto3 client sends, retries included (botocore's ``before-send`` event)."""

    def __init__(self, client: S3Client) -> None:
        self.sent: list[tuple[str, float]] = []
        self._lock = threading.Lock()
        client.meta.events.register("before-send.s3", self._on_send)

    def _on_send(self, event_name: str, **kwargs: Any) -> None:
        with self._lock:
            self.sent.append((event_name.rsplit(".", 1)[-1], time.monotonic()))

    def count(self, operation: str) -> int:
        with self._lock:
            return sum(1 for op, _ in self.sent if op == operation)

    def times(self, operation: str) -> list[float]:
        with self._lock:
            return [t for op, t in self.sent if op == operation]


def _serve(args: argparse.Namespace) -> int:
    with S3Server(args.dir, port=args.port) as server:
        print(f"endpoint={server.endpoint}", flush=True)
        print(f"AWS_ACCESS_KEY_ID={server.access_key}", flush=True)
        print(f"AWS_SECRET_ACCESS_KEY={server.secret_key}", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_testkit.s3")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("binary", help="print the versitygw binary, building it if missing")
    serve = sub.add_parser("serve", help="run a server until interrupted")
    serve.add_argument("--dir", help="data directory (default: a temporary one)")
    serve.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args(argv)
    if args.command == "binary":
        print(versitygw_binary())
        return 0
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
