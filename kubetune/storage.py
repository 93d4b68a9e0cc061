"""Object storage for models, data and artifacts: ``s3://bucket/key``, ``file://`` URIs and local paths.

One small interface, :class:`ObjectStore`, over S3-compatible storage (AWS S3, MinIO, Ceph, R2)
and the local filesystem. Transfers run files and parts in parallel on a thread pool over one
boto3 client: one request per small file, large parts for large files, botocore's retries for
every request and a resumed Range GET for a body cut off mid-stream. Integrity is checked end
to end: every object written here carries the SHA-256 and the CRC64NVME of its content in its
metadata (``x-amz-meta-sha256``, ``x-amz-meta-crc64nvme``) and is sent with an S3 flexible
checksum (CRC64NVME, the full-object checksum S3 stores, by default), so the server rejects bytes
damaged in transit; every download is checksummed as it is written and compared before it is
made visible: with the CRC64NVME where the object or the caller records one (about 8 GB/s on
one core, combined across parallel parts), else with the SHA-256. Nothing half-written is ever
visible: S3 shows an
object only once its PUT or multipart upload completes, and local files are written to a
temporary file in the same directory and renamed into place.

Credentials come from boto3's standard chain (environment, web identity / IRSA, instance
profile) unless given explicitly (:class:`StorageCredentials`, e.g. from the job's storage
Secret). They never appear in a repr, a log line or a :class:`StorageError`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeAlias
from urllib.parse import urlsplit

import boto3
from awscrt.checksums import combine_crc64nvme, crc64nvme  # type: ignore[import-untyped]
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    FlexibleChecksumError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from s3transfer.exceptions import RetriesExceededError, TransferNotDoneError

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

__all__ = [
    "ChecksumMismatchError",
    "InvalidURIError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectStore",
    "ProgressCallback",
    "StorageConfig",
    "StorageCredentials",
    "StorageError",
    "StorageURI",
    "Transfer",
    "crc64_file",
    "file_digests",
    "join_uri",
    "parse_uri",
    "sha256_file",
]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
SHA256_METADATA_KEY = "sha256"
CRC64_METADATA_KEY = "crc64nvme"
# Temporary files of in-flight local writes; listings never show them.
PARTIAL_SUFFIX = ".kubetune-part"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SHA256_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
_CRC64_HEX_RE = re.compile(r"^[0-9a-f]{16}$")
_PART_CHECKSUMS = ("ChecksumCRC64NVME", "ChecksumSHA256", "ChecksumSHA1", "ChecksumCRC32", "ChecksumCRC32C")
_HASH_BLOCK = 4 * MiB
_DELETE_BATCH = 1000
_MAX_PARTS = 10_000
_DEFAULT_PART = 64 * MiB
# Read size of a download stream; large reads keep the per-byte Python overhead small.
_STREAM_BLOCK = 4 * MiB


class _StreamCutError(ConnectionError):
    """The server closed the connection before the whole body came."""


# A body cut off mid-stream, after botocore's retries of the request itself.
_STREAM_ERRORS = (
    ResponseStreamingError,
    ReadTimeoutError,
    IncompleteReadError,
    ConnectionError,
    TimeoutError,
    http.client.IncompleteRead,
)
# Everything boto3 and s3transfer raise for a failed request or transfer; all become StorageError.
_TRANSFER_ERRORS = (ClientError, BotoCoreError, OSError, TransferNotDoneError, RetriesExceededError)


# --------------------------------------------------------------------------- errors


class StorageError(Exception):
    """A storage operation failed. The message names the operation and the URI, never a credential."""

    def __init__(self, message: str, *, operation: str = "", uri: str = "", code: str | None = None) -> None:
        super().__init__(message)
        self.operation = operation
        self.uri = uri
        self.code = code


class InvalidURIError(StorageError, ValueError):
    """A URI or path that this module refuses (unsupported scheme, ``..`` segment, bad bucket name)."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The object, prefix or bucket does not exist."""


class ChecksumMismatchError(StorageError):
    """The bytes read do not match the checksum recorded when the object was written."""


# --------------------------------------------------------------------------- URIs


@dataclass(frozen=True, slots=True)
class StorageURI:
    """A parsed location: ``scheme="s3"`` with bucket and key, or ``scheme="file"`` with an absolute path."""

    scheme: Literal["s3", "file"]
    bucket: str
    key: str

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def path(self) -> Path:
        """The local path (``file`` URIs only)."""
        if not self.is_local:
            raise InvalidURIError(f"{self} is not a local path", uri=str(self))
        return Path(self.key)

    @property
    def name(self) -> str:
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    def join(self, *parts: str) -> StorageURI:
        return join_uri(self, *parts)

    def __truediv__(self, part: str) -> StorageURI:
        return join_uri(self, part)

    def __str__(self) -> str:
        if self.is_s3:
            return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"
        return self.key


URILike: TypeAlias = "str | os.PathLike[str] | StorageURI"


def _check_segments(segments: list[str], uri: str, *, allow_trailing_slash: bool = True) -> None:
    for i, segment in enumerate(segments):
        if segment in ("..", "."):
            raise InvalidURIError(f"{segment!r} path segments are not allowed: {uri!r}", uri=uri)
        if not segment and not (allow_trailing_slash and i == len(segments) - 1):
            raise InvalidURIError(f"empty path segment ('//') in {uri!r}", uri=uri)
        if any(ord(c) < 0x20 or c == "\x7f" for c in segment):
            raise InvalidURIError(f"control character in {uri!r}", uri=uri)


def _abspath(path: str | os.PathLike[str]) -> str:
    # Normalises `..` like a shell without resolving symlinks (Path.resolve would).
    return os.path.abspath(path)  # noqa: PTH100


def parse_uri(uri: URILike) -> StorageURI:
    """Parse ``s3://bucket/key``, ``file://path`` or a local path.

    ``..`` and ``.`` segments are refused in URIs (a key must never climb out of its prefix);
    a plain local path such as ``../data`` is made absolute, as a shell would. ``file://x/y`` is
    the path ``x/y`` (the convention of fsspec and ``datasets``), ``file:///x/y`` the path ``/x/y``.
    """
    if isinstance(uri, StorageURI):
        return uri
    if isinstance(uri, os.PathLike):
        return StorageURI("file", "", _abspath(uri))
    if not isinstance(uri, str):
        raise InvalidURIError(f"expected a URI string or a path, got {type(uri).__name__}")
    if not uri:
        raise InvalidURIError("empty URI")
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", uri)
    if match is None:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", uri) and not Path(uri).exists():
            raise _unsupported_scheme(uri, uri.split(":", 1)[0])
        return StorageURI("file", "", _abspath(uri))
    scheme = match.group(1).lower()
    rest = uri[match.end() :]
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise InvalidURIError(f"missing bucket name in {uri!r} (expected s3://bucket/key)", uri=uri)
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise InvalidURIError(
                f"invalid bucket name {bucket!r} in {uri!r}: 3-63 lowercase letters, digits, '.' or '-'",
                uri=uri,
            )
        if key:
            _check_segments(key.split("/"), uri)
        return StorageURI("s3", bucket, key)
    if scheme == "file":
        if not rest:
            raise InvalidURIError(f"missing path in {uri!r}", uri=uri)
        _check_segments(rest.split("/")[1:] if rest.startswith("/") else rest.split("/"), uri)
        return StorageURI("file", "", _abspath(rest))
    raise _unsupported_scheme(uri, scheme)


def _unsupported_scheme(uri: str, scheme: str) -> InvalidURIError:
    return InvalidURIError(
        f"unsupported URI scheme {scheme!r} in {uri!r}: "
        "expected s3://bucket/key, file:///path or a local path",
        uri=uri,
    )


def join_uri(base: URILike, *parts: str) -> StorageURI:
    """Append relative parts (``"a/b"`` or ``"a", "b"``) to a URI.

    ``..``, ``.`` and absolute parts are refused.
    """
    uri = parse_uri(base)
    segments: list[str] = []
    for part in parts:
        if part.startswith("/"):
            raise InvalidURIError(f"cannot join absolute path {part!r} to {uri}", uri=str(uri))
        part_segments = part.split("/")
        _check_segments(part_segments, f"{uri}/{part}")
        segments.extend(s for s in part_segments if s)
    trailing = "/" if parts and parts[-1].endswith("/") else ""
    if not segments:
        return uri
    if uri.is_s3:
        prefix = uri.key.rstrip("/")
        key = "/".join([prefix, *segments]) if prefix else "/".join(segments)
        return StorageURI("s3", uri.bucket, key + trailing)
    return StorageURI("file", "", str(Path(uri.key, *segments)))


# --------------------------------------------------------------------------- configuration


class StorageCredentials(BaseModel):
    """Explicit credentials, e.g. from the job's storage Secret. Values are masked in every repr."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    access_key_id: SecretStr
    secret_access_key: SecretStr
    session_token: SecretStr | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, str], *, source: str = "mapping") -> StorageCredentials:
        """Read ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and optional ``AWS_SESSION_TOKEN``.

        ``data`` is a Secret's decoded data, ``os.environ`` (a Secret mounted with ``envFrom``) or
        the like. A missing key is named in the error; no value ever is.
        """
        missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not data.get(k)]
        if missing:
            raise StorageError(f"storage credentials from {source}: missing {', '.join(missing)}")
        token = data.get("AWS_SESSION_TOKEN") or None
        return cls(
            access_key_id=SecretStr(data["AWS_ACCESS_KEY_ID"].strip()),
            secret_access_key=SecretStr(data["AWS_SECRET_ACCESS_KEY"].strip()),
            session_token=SecretStr(token.strip()) if token else None,
        )

    @classmethod
    def from_directory(cls, directory: str | os.PathLike[str]) -> StorageCredentials:
        """Read a Secret mounted as a volume: one file per key."""
        root = Path(directory)
        data = {}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            with contextlib.suppress(FileNotFoundError):
                data[name] = (root / name).read_text()
        return cls.from_mapping(data, source=str(root))

    def secret_values(self) -> list[str]:
        values = [self.access_key_id, self.secret_access_key, self.session_token]
        return [v.get_secret_value() for v in values if v is not None and v.get_secret_value()]


class StorageConfig(BaseModel):
    """How to reach object storage. Every field has a sensible default for AWS S3."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    endpoint: str | None = Field(None, description="S3-compatible endpoint URL (MinIO, Ceph, R2).")
    region: str | None = Field(None, description="Region; None lets boto3 resolve it.")
    path_style: bool | None = Field(
        None, description="Path-style addressing; None means on when an endpoint is set."
    )
    max_concurrency: int = Field(8, ge=1, le=256, description="Parallel parts and files per transfer.")
    multipart_threshold: int = Field(
        64 * MiB,
        ge=5 * MiB,
        description="Files this large or larger move in parts; smaller ones in one request.",
    )
    multipart_chunksize: int | None = Field(
        None,
        ge=5 * MiB,
        description=(
            "Part size. None: 64 MiB parts for uploads (an upload holds up to max_concurrency parts "
            "in memory); for downloads parts of at least 64 MiB, as few as keep max_concurrency "
            "requests busy across the transfer's large files."
        ),
    )
    retry_mode: Literal["standard", "adaptive", "legacy"] = "standard"
    max_attempts: int = Field(8, ge=1, le=50, description="Attempts per request, the first included.")
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(60.0, gt=0)
    verify_tls: bool | str = Field(True, description="False, True or the path of a CA bundle.")
    checksum_algorithm: Literal["CRC64NVME", "SHA256", "CRC32", "CRC32C", "SHA1"] | None = Field(
        "CRC64NVME",
        description=(
            "S3 flexible checksum sent with uploads (CRC64NVME: stored for the whole object, multipart "
            "uploads included); None for servers without support."
        ),
    )
    credentials: StorageCredentials | None = Field(
        None, description="Explicit credentials; None uses the standard AWS chain."
    )

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("endpoint must be an http:// or https:// URL")
        if parts.username or parts.password:
            raise ValueError("endpoint must not contain credentials; use credentials or the AWS chain")
        return value.rstrip("/")

    @property
    def effective_endpoint(self) -> str | None:
        return self.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    @property
    def effective_path_style(self) -> bool:
        return self.path_style if self.path_style is not None else self.effective_endpoint is not None

    def transfer_config(self) -> TransferConfig:
        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize or _DEFAULT_PART,
            max_concurrency=self.max_concurrency,
            use_threads=True,
        )

    def botocore_config(self) -> Config:
        checksums: Literal["when_supported", "when_required"] = (
            "when_supported" if self.checksum_algorithm else "when_required"
        )
        return Config(
            retries={"mode": self.retry_mode, "max_attempts": self.max_attempts},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_pool_connections=max(10, self.max_concurrency * 2),
            s3={"addressing_style": "path" if self.effective_path_style else "auto"},
            request_checksum_calculation=checksums,
            # Downloads hash what they write and compare it themselves (see _ask_for_checksum);
            # reads that want botocore's check ask for it with ChecksumMode.
            response_checksum_validation="when_required",
            user_agent_extra="kubetune",
        )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object of a listing. ``name`` is relative to the listed prefix (``/``-separated)."""

    uri: StorageURI
    name: str
    size: int
    etag: str | None = None
    sha256: str | None = None
    last_modified: datetime | None = None
    crc64nvme: str | None = None


@dataclass(frozen=True, slots=True)
class Transfer:
    """One file moved (or found already in place, ``skipped``). ``sha256`` and ``crc64nvme`` are
    the content's, where known: taken from the bytes or recorded with the object whose bytes were
    verified against the other ("" and None where unknown)."""

    source: StorageURI
    dest: StorageURI
    size: int
    sha256: str
    skipped: bool
    crc64nvme: str | None = None


# --------------------------------------------------------------------------- helpers


def sha256_file(path: str | os.PathLike[str]) -> str:
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # reads into one reused buffer


def crc64_hex(value: int) -> str:
    return f"{value:016x}"


def _b64_to_hex(value: str, length: int) -> str | None:
    """A checksum header's base64 as hex; None unless it decodes to ``length`` bytes."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == length else None


def _hex_to_b64(value: str) -> str:
    return base64.b64encode(bytes.fromhex(value)).decode()


def _crc64_reading(path: str | os.PathLike[str], also: Any = None) -> str:
    """The CRC64NVME of a file, read once; ``also`` (a hashlib hash) sees every block too."""
    crc = 0
    buffer = memoryview(bytearray(_HASH_BLOCK))
    with Path(path).open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = crc64nvme(buffer[:n], crc)  # any buffer
            if also is not None:
                also.update(buffer[:n])
    return crc64_hex(crc)


def crc64_file(path: str | os.PathLike[str]) -> str:
    return _crc64_reading(path)


def file_digests(path: str | os.PathLike[str]) -> tuple[str, str]:
    """The SHA-256 and the CRC64NVME of a file, in one read."""
    digest = hashlib.sha256()
    crc = _crc64_reading(path, digest)
    return digest.hexdigest(), crc


def _partial_path(dest: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=PARTIAL_SUFFIX)
    os.close(fd)
    return Path(name)


def _atomic_write_bytes(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_path(dest)
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def _local_matches(path: Path, size: int, sha256: str | None, crc64: str | None = None) -> bool:
    """True when ``path`` already holds exactly the object: same size and the same CRC64NVME (where
    known; it is the cheaper check) or SHA-256."""
    if sha256 is None and crc64 is None:
        return False
    try:
        if not path.is_file() or path.stat().st_size != size:
            return False
        if crc64 is not None:
            return crc64_file(path) == crc64
        return sha256_file(path) == sha256
    except OSError:
        return False


ProgressCallback: TypeAlias = Callable[[int, int], None]
"""Called as bytes move: ``(bytes done, bytes in all)``, from any of the transfer threads."""


class _Progress:
    """Adds up the bytes moved by every thread of one transfer and reports the running total."""

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total = total
        self._callback = callback
        self._done = 0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        if self._callback is None or not nbytes:
            return
        with self._lock:
            self._done += nbytes
            done = self._done
        self._callback(done, self.total)


class _TaskGroup:
    """Tasks on a thread pool. Tasks may add tasks; the first failure stops every task not yet
    started (running ones see :attr:`failed`) and :meth:`wait` raises it once all have ended."""

    def __init__(self, workers: int) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kubetune-storage")
        self._cond = threading.Condition()
        self._pending = 0
        self._error: BaseException | None = None

    @property
    def failed(self) -> bool:
        return self._error is not None

    def submit(self, task: Callable[[], None]) -> None:
        with self._cond:
            if self._error is not None:
                return
            self._pending += 1
        self._pool.submit(self._run, task)

    def _run(self, task: Callable[[], None]) -> None:
        try:
            if self._error is None:
                task()
        except BaseException as exc:
            self.fail(exc)
        finally:
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc

    def wait(self) -> None:
        try:
            with self._cond:
                while self._pending:
                    self._cond.wait()
        except BaseException as exc:  # e.g. KeyboardInterrupt: stop the workers, then re-raise
            self.fail(exc)
            raise
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._error is not None:
            raise self._error


class _OrderedHasher:
    """SHA-256 of a file whose blocks are written out of order by parallel ranged GETs, taken
    while the file is written: the block at the frontier is hashed from the caller's buffer as it
    arrives; blocks ahead of it are read back from the file (still in the page cache, into one
    reused buffer) once the frontier reaches them. One thread hashes at a time. A block must be
    written to the file before it is added."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._digest = hashlib.sha256()
        self._next = 0
        self._ahead: dict[int, int] = {}  # offset -> length of blocks written past the frontier
        self._busy = False
        self._lock = threading.Lock()
        self._buffer: memoryview | None = None

    def add(self, offset: int, block: bytes | memoryview) -> None:
        size = len(block)
        with self._lock:
            direct = not self._busy and offset == self._next
            if not direct:
                self._ahead[offset] = size
                if self._busy:
                    return
            self._busy = True
        if direct:
            self._digest.update(block)
            with self._lock:
                self._next = offset + size
        while True:
            with self._lock:
                start = self._next
                length = self._ahead.pop(start, None)
                if length is None:
                    self._busy = False
                    return
            self._digest.update(self._read_back(start, length))
            with self._lock:
                self._next = start + length

    def _read_back(self, offset: int, length: int) -> memoryview:
        if self._buffer is None or len(self._buffer) < length:
            self._buffer = memoryview(bytearray(length))
        view = self._buffer[:length]
        got = 0
        while got < length:
            n = os.preadv(self._fd, [view[got:]], offset + got)
            if n == 0:
                raise OSError(f"unexpected end of file at byte {offset + got}")
            got += n
        return view

    @property
    def hashed(self) -> int:
        """Bytes hashed so far: the whole file once every block has been added."""
        with self._lock:
            return self._next

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) == size:
        return data
    chunks = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            raise OSError(f"unexpected end of file at byte {offset + got}")
        chunks.append(more)
        got += len(more)
    return b"".join(chunks)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class _BodyReader:
    """Reads a GET's body into the caller's buffer. Beneath botocore's StreamingBody and urllib3's
    HTTPResponse lies the standard library's HTTPResponse, whose readinto() lets the socket fill
    the buffer directly: no new bytes object (and no fresh pages to fault in) per block. Where
    the layers are not the expected ones, it falls back to StreamingBody.read()."""

    def __init__(self, body: Any) -> None:
        self._body = body
        raw = getattr(body, "_raw_stream", None)
        fp = getattr(raw, "_fp", None)
        identity = raw is not None and raw.headers.get("Content-Encoding", "identity") == "identity"
        self._raw = raw if isinstance(fp, http.client.HTTPResponse) and identity else None
        self._fp: http.client.HTTPResponse | None = fp if self._raw is not None else None

    def readinto(self, view: memoryview) -> int:
        if self._fp is not None:
            n = self._fp.readinto(view)
        else:
            data = self._body.read(len(view))
            n = len(data)
            view[:n] = data
        if n == 0 and len(view):
            raise _StreamCutError(f"the connection closed with {len(view)} or more bytes of the body unread")
        return n

    def close(self) -> None:
        if self._fp is not None and self._fp.isclosed() and self._raw is not None:
            self._raw.release_conn()  # read to the end: the connection goes back to the pool
        self._body.close()


def _part_ranges(size: int, threshold: int, chunk: int) -> list[tuple[int, int]]:
    """Byte ranges ``[start, end)`` of a transfer: one for a file under ``threshold``, else parts
    of ``chunk`` bytes (grown if needed to stay within S3's 10,000 parts)."""
    if size < threshold:
        return [(0, size)]
    chunk = max(chunk, -(-size // _MAX_PARTS))
    return [(start, min(start + chunk, size)) for start in range(0, size, chunk)]


@dataclass(slots=True)
class _Fetch:
    """One object to download and what is known of it before its first GET."""

    src: StorageURI
    dest: Path
    size: int | None = None
    etag: str | None = None
    sha256: str | None = None  # recorded with the object (from a HEAD), if known
    expected: str | None = None  # from a manifest: the bytes must match it as well
    expected_source: str = ""
    crc64nvme: str | None = None  # recorded with the object (from a HEAD), if known
    expected_crc64nvme: str | None = None  # from a manifest


@dataclass(eq=False, slots=True)
class _FileDownload:
    """A download in flight: its temporary file, each part's CRC64NVME, the SHA-256 hasher following
    the parts (used only where no CRC64NVME is known to compare with), the parts left."""

    fetch: _Fetch
    size: int
    tmp: Path
    fd: int
    hasher: _OrderedHasher
    parts_left: int
    response: dict[str, Any] | None = None
    part_crcs: dict[int, tuple[int, int]] = field(default_factory=dict)  # start -> (crc, length)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


@dataclass(eq=False, slots=True)
class _FileUpload:
    """A multipart upload in flight: the open source file, its upload id, the parts sent so far."""

    src: Path
    dest: StorageURI
    size: int
    sha256: str
    crc64nvme: str
    fd: int
    upload_id: str
    parts_left: int
    parts: dict[int, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    completed: bool = False
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


def _ask_for_checksum(request: Any, **kwargs: Any) -> None:
    """Ask for the stored checksum in every GET's response without botocore re-hashing the body:
    downloads hash what they write themselves and compare the result."""
    if "x-amz-checksum-mode" not in request.headers:
        request.headers["x-amz-checksum-mode"] = "ENABLED"


# --------------------------------------------------------------------------- the store


class ObjectStore:
    """Read and write objects under ``s3://`` URIs, ``file://`` URIs and local paths.

    Thread-safe (boto3 clients are). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, config: StorageConfig | None = None) -> None:
        self.config = config or StorageConfig()
        creds = self.config.credentials
        session = boto3.session.Session(
            aws_access_key_id=creds.access_key_id.get_secret_value() if creds else None,
            aws_secret_access_key=creds.secret_access_key.get_secret_value() if creds else None,
            aws_session_token=creds.session_token.get_secret_value()
            if creds and creds.session_token
            else None,
            region_name=self.config.region,
        )
        self._client: S3Client = session.client(
            "s3",
            endpoint_url=self.config.endpoint,
            verify=self.config.verify_tls,
            config=self._client_config(),
        )
        self._client.meta.events.register("before-sign.s3.GetObject", _ask_for_checksum)

    def _client_config(self) -> Config:
        config = self.config.botocore_config()
        if not self.config.checksum_algorithm:
            return config
        # Every object body this store sends carries a checksum the server verifies, so the SigV4
        # payload hash (one more SHA-256 of every byte over plain http) adds nothing.
        s3: Any = {**(getattr(config, "s3", None) or {}), "payload_signing_enabled": False}
        return config.merge(Config(s3=s3))

    def __repr__(self) -> str:
        return f"ObjectStore(endpoint={self.config.effective_endpoint!r}, region={self.config.region!r})"

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    @property
    def client(self) -> S3Client:
        """The underlying boto3 client (for event hooks and operations not wrapped here)."""
        return self._client

    # ------------------------------------------------------------------ errors

    def _secret_values(self) -> list[str]:
        values = self.config.credentials.secret_values() if self.config.credentials else []
        for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            if value := os.environ.get(name):
                values.append(value)
        return values

    def _redact(self, text: str) -> str:
        for value in self._secret_values():
            if len(value) >= 4:
                text = text.replace(value, "***")
        return text

    def _raise(self, operation: str, uri: object, exc: BaseException) -> NoReturn:
        code: str | None = None
        cls: type[StorageError] = StorageError
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(
                error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
            )
            message = error.get("Message") or ""
            if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound"):
                cls = ObjectNotFoundError
                reason = "bucket does not exist" if code == "NoSuchBucket" else "not found"
            elif code in ("AccessDenied", "403", "SignatureDoesNotMatch", "InvalidAccessKeyId"):
                reason = f"access denied ({code}): check the storage credentials and their permissions"
            else:
                reason = f"{code}: {message}" if message else code
        elif isinstance(exc, NoCredentialsError):
            reason = (
                "no credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "mount the storage Secret, or use a web identity (IRSA) or instance profile"
            )
        elif isinstance(exc, FlexibleChecksumError):
            cls = ChecksumMismatchError
            reason = f"checksum mismatch while reading: {exc}"
        elif isinstance(exc, FileNotFoundError):
            cls = ObjectNotFoundError
            reason = f"not found: {exc.filename or exc}"
        elif isinstance(exc, RetriesExceededError):
            reason = f"gave up after retries: {exc.last_exception}"
        elif isinstance(exc, _TRANSFER_ERRORS):
            reason = str(exc) or type(exc).__name__
        else:
            reason = f"{type(exc).__name__}: {exc}"
        message = self._redact(f"{operation} {uri} failed: {reason}")
        raise cls(message, operation=operation, uri=str(uri), code=code) from exc

    @contextlib.contextmanager
    def _errors(self, operation: str, uri: object) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except _TRANSFER_ERRORS as exc:
            self._raise(operation, uri, exc)

    # ------------------------------------------------------------------ metadata

    def _head(self, uri: StorageURI, operation: str = "stat") -> dict[str, Any]:
        with self._errors(operation, uri):
            return dict(self._client.head_object(Bucket=uri.bucket, Key=uri.key, ChecksumMode="ENABLED"))

    @staticmethod
    def _sha256_from_head(head: Mapping[str, Any]) -> str | None:
        recorded = (head.get("Metadata") or {}).get(SHA256_METADATA_KEY, "").lower()
        if _SHA256_HEX_RE.match(recorded):
            return str(recorded)
        server = head.get("ChecksumSHA256")
        if server and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
            return _b64_to_hex(server, 32)
        return None

    @staticmethod
    def _crc64_from_head(head: Mapping[str, Any], *, server: bool = True) -> str | None:
        """The CRC64NVME recorded in the metadata or, with ``server``, the one S3 stores for the whole
        object (a ranged GET may omit it, so parts of one download ask for the metadata only)."""
        recorded = (head.get("Metadata") or {}).get(CRC64_METADATA_KEY, "").lower()
        if _CRC64_HEX_RE.match(recorded):
            return str(recorded)
        value = head.get("ChecksumCRC64NVME")
        if server and value and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
            return _b64_to_hex(value, 8)
        return None

    def stat(self, uri: URILike) -> ObjectInfo:
        """Size, ETag and recorded SHA-256 of one object (local files are hashed)."""
        loc = parse_uri(uri)
        if loc.is_local:
            with self._errors("stat", loc):
                st = loc.path.stat()
                if not loc.path.is_file():
                    raise ObjectNotFoundError(
                        f"stat {loc} failed: not a file", operation="stat", uri=str(loc)
                    )
                return ObjectInfo(loc, loc.path.name, st.st_size, None, sha256_file(loc.path))
        head = self._head(loc)
        return ObjectInfo(
            uri=loc,
            name=loc.name,
            size=int(head["ContentLength"]),
            etag=head.get("ETag"),
            sha256=self._sha256_from_head(head),
            last_modified=head.get("LastModified"),
            crc64nvme=self._crc64_from_head(head),
        )

    def exists(self, uri: URILike) -> bool:
        """True when an object (or local file) exists at ``uri``, or anything exists under it as a prefix."""
        loc = parse_uri(uri)
        if loc.is_local:
            return loc.path.exists()
        if loc.key and not loc.key.endswith("/"):
            try:
                self._head(loc, "exists")
                return True
            except ObjectNotFoundError:
                pass
        prefix = self._prefix(loc)
        with self._errors("exists", loc):
            try:
                resp = self._client.list_objects_v2(Bucket=loc.bucket, Prefix=prefix, MaxKeys=1)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                    return False
                raise
        return bool(resp.get("KeyCount") or resp.get("Contents"))

    # ------------------------------------------------------------------ listing

    @staticmethod
    def _prefix(uri: StorageURI) -> str:
        return uri.key if not uri.key or uri.key.endswith("/") else uri.key + "/"

    def list_prefix(self, uri: URILike, *, checksums: bool = False) -> list[ObjectInfo]:
        """Every object under ``uri`` taken as a directory, sorted by name.

        S3 listings carry size and ETag; ``checksums=True`` also fetches each object's recorded
        SHA-256 (one HEAD each) or hashes each local file.
        """
        loc = parse_uri(uri)
        if loc.is_local:
            return self._list_local(loc, checksums=checksums)
        prefix = self._prefix(loc)
        infos: list[ObjectInfo] = []
        with self._errors("list", loc):
            for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=loc.bucket, Prefix=prefix
            ):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if key.endswith("/"):
                        continue  # a "directory" marker written by consoles and some tools
                    name = key[len(prefix) :]
                    obj_uri = StorageURI("s3", loc.bucket, key)
                    head = self._head(obj_uri, "list") if checksums else {}
                    infos.append(
                        ObjectInfo(
                            obj_uri,
                            name,
                            int(obj["Size"]),
                            obj.get("ETag"),
                            self._sha256_from_head(head),
                            obj.get("LastModified"),
                            self._crc64_from_head(head),
                        )
                    )
        return sorted(infos, key=lambda i: i.name)

    def _list_local(self, loc: StorageURI, *, checksums: bool) -> list[ObjectInfo]:
        root = loc.path
        infos: list[ObjectInfo] = []
        with self._errors("list", loc):
            if not root.is_dir():
                return []
            for dirpath, _dirs, files in os.walk(root):
                for file in files:
                    if PARTIAL_SUFFIX in file:
                        continue
                    path = Path(dirpath, file)
                    st = path.stat()
                    infos.append(
                        ObjectInfo(
                            StorageURI("file", "", str(path)),
                            path.relative_to(root).as_posix(),
                            st.st_size,
                            None,
                            sha256_file(path) if checksums else None,
                            datetime.fromtimestamp(st.st_mtime).astimezone(),
                        )
                    )
        return sorted(infos, key=lambda i: i.name)

    # ------------------------------------------------------------------ small objects

    def read_bytes(self, uri: URILike) -> bytes:
        """Read a whole (small) object, verified against its recorded SHA-256 when it has one."""
        loc = parse_uri(uri)
        with self._errors("read", loc):
            if loc.is_local:
                return loc.path.read_bytes()
            resp = self._client.get_object(Bucket=loc.bucket, Key=loc.key, ChecksumMode="ENABLED")
            data = resp["Body"].read()
        expected = self._sha256_from_head(resp)
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise ChecksumMismatchError(
                f"read {loc} failed: content does not match its recorded SHA-256 {expected}",
                operation="read",
                uri=str(loc),
            )
        return data

    def write_bytes(self, uri: URILike, data: bytes, *, content_type: str | None = None) -> ObjectInfo:
        """Write a whole (small) object atomically."""
        loc = parse_uri(uri)
        sha = hashlib.sha256(data).hexdigest()
        with self._errors("write", loc):
            if loc.is_local:
                _atomic_write_bytes(loc.path, data)
                return ObjectInfo(loc, loc.path.name, len(data), None, sha)
            crc = crc64_hex(crc64nvme(data))
            resp = self._client.put_object(
                Bucket=loc.bucket,
                Key=loc.key,
                Body=data,
                **self._upload_args(sha, crc, single_part=True, content_type=content_type),
            )
        return ObjectInfo(loc, loc.name, len(data), resp.get("ETag"), sha, crc64nvme=crc)

    def read_text(self, uri: URILike) -> str:
        loc = parse_uri(uri)
        data = self.read_bytes(loc)
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise StorageError(
                f"read {loc} failed: not UTF-8 text ({exc})", operation="read", uri=str(loc)
            ) from exc

    def write_text(self, uri: URILike, text: str) -> ObjectInfo:
        return self.write_bytes(uri, text.encode(), content_type="text/plain; charset=utf-8")

    def read_json(self, uri: URILike) -> Any:
        loc = parse_uri(uri)
        text = self.read_text(loc)
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise StorageError(
                f"read {loc} failed: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
                operation="read",
                uri=str(loc),
            ) from exc

    def write_json(self, uri: URILike, value: Any) -> ObjectInfo:
        data = (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()
        return self.write_bytes(uri, data, content_type="application/json")

    # ------------------------------------------------------------------ files

    def _upload_args(
        self, sha256: str, crc64: str, *, single_part: bool, content_type: str | None = None
    ) -> dict[str, Any]:
        args: dict[str, Any] = {"Metadata": {SHA256_METADATA_KEY: sha256, CRC64_METADATA_KEY: crc64}}
        if content_type:
            args["ContentType"] = content_type
        algorithm = self.config.checksum_algorithm
        # The server checks the body against the checksum taken from the file itself.
        if algorithm == "CRC64NVME" and single_part:
            args["ChecksumCRC64NVME"] = _hex_to_b64(crc64)
        elif algorithm == "CRC64NVME":
            args["ChecksumAlgorithm"] = algorithm
            args["ChecksumType"] = "FULL_OBJECT"  # stored for the whole object, as for a single PUT
        elif algorithm == "SHA256" and single_part:
            args["ChecksumSHA256"] = _hex_to_b64(sha256)
        elif algorithm:
            args["ChecksumAlgorithm"] = algorithm
        return args

    def _part_checksum(self, data: bytes) -> dict[str, Any]:
        """The flexible checksum of one part, computed here: botocore then reads the body only to send it."""
        algorithm = self.config.checksum_algorithm
        if algorithm == "CRC64NVME":
            return {"ChecksumCRC64NVME": _hex_to_b64(crc64_hex(crc64nvme(data)))}
        if algorithm == "SHA256":
            return {"ChecksumSHA256": base64.b64encode(hashlib.sha256(data).digest()).decode()}
        if algorithm == "SHA1":
            return {"ChecksumSHA1": base64.b64encode(hashlib.sha1(data).digest()).decode()}
        if algorithm == "CRC32":
            return {"ChecksumCRC32": base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()}
        if algorithm:
            return {"ChecksumAlgorithm": algorithm}
        return {}

    def _upload_ranges(self, size: int) -> list[tuple[int, int]]:
        chunk = self.config.multipart_chunksize or _DEFAULT_PART
        return _part_ranges(size, self.config.multipart_threshold, chunk)

    def _download_ranges(self, size: int, large_files: int) -> list[tuple[int, int]]:
        chunk = self.config.multipart_chunksize
        if chunk is None:
            # Fewer, larger ranged GETs cost both ends less per byte; split a file only as far as
            # it takes to keep max_concurrency requests busy across the transfer's large files.
            per_file = -(-self.config.max_concurrency // max(1, large_files))
            chunk = max(_DEFAULT_PART, -(-size // per_file))
        return _part_ranges(size, self.config.multipart_threshold, chunk)

    def download_file(
        self, uri: URILike, dest: str | os.PathLike[str], *, progress: ProgressCallback | None = None
    ) -> Transfer:
        """Download one object to ``dest``; skipped when ``dest`` already has the same size and SHA-256."""
        loc = parse_uri(uri)
        fetch = _Fetch(loc, Path(_abspath(dest)))
        if loc.is_s3:
            self._learn(fetch, self._head(loc, "download"))
        return self._download_many([fetch], progress)[0]

    def _learn(self, fetch: _Fetch, head: Mapping[str, Any]) -> None:
        fetch.size, fetch.etag = int(head["ContentLength"]), head.get("ETag")
        fetch.sha256, fetch.crc64nvme = self._sha256_from_head(head), self._crc64_from_head(head)

    def download_prefix(
        self,
        uri: URILike,
        dest_dir: str | os.PathLike[str],
        *,
        progress: ProgressCallback | None = None,
    ) -> list[Transfer]:
        """Download every object under ``uri`` into ``dest_dir``, keeping relative names.

        Objects come in parallel (``max_concurrency``), one GET each up to ``multipart_threshold``
        and ranged GETs of ``multipart_chunksize`` above it. Each file is hashed as it is written,
        compared with the SHA-256 recorded with its object, and renamed into place only if it
        matches.
        """
        loc = parse_uri(uri)
        objects = self.list_prefix(loc)
        if not objects and (loc.is_s3 or not loc.path.is_dir()):
            raise ObjectNotFoundError(
                f"download {loc} failed: nothing under this prefix", operation="download", uri=str(loc)
            )
        return self.download_objects(objects, dest_dir, progress=progress)

    def download_objects(
        self,
        objects: list[ObjectInfo],
        dest_dir: str | os.PathLike[str],
        *,
        expected: Mapping[str, str] | None = None,
        expected_crc64nvme: Mapping[str, str] | None = None,
        expected_source: str = "",
        progress: ProgressCallback | None = None,
    ) -> list[Transfer]:
        """Download listed objects (from :meth:`list_prefix`) to ``dest_dir/<name>``.

        ``expected`` and ``expected_crc64nvme`` map names to SHA-256s and CRC64NVMEs known from
        elsewhere (a manifest, named by ``expected_source`` in errors): a file whose bytes differ is
        refused like a corrupt one. Where a file has both, its CRC64NVME is checked.
        """
        root = Path(_abspath(dest_dir))
        fetches = []
        for obj in objects:
            _check_segments(obj.name.split("/"), str(obj.uri), allow_trailing_slash=False)
            fetches.append(
                _Fetch(
                    obj.uri,
                    root.joinpath(*obj.name.split("/")),
                    obj.size,
                    obj.etag,
                    obj.sha256,
                    (expected or {}).get(obj.name),
                    expected_source,
                    obj.crc64nvme,
                    (expected_crc64nvme or {}).get(obj.name),
                )
            )
        return self._download_many(fetches, progress)

    def _download_many(self, fetches: list[_Fetch], callback: ProgressCallback | None) -> list[Transfer]:
        results: list[Transfer | None] = [None] * len(fetches)
        progress = _Progress(sum(f.size or 0 for f in fetches), callback)
        if callback is not None and any(f.size is None for f in fetches):
            with self._errors("download", fetches[0].src):
                progress.total = sum(
                    f.size if f.size is not None else f.src.path.stat().st_size for f in fetches
                )
        inflight: list[_FileDownload] = []
        large = sum(1 for f in fetches if f.src.is_s3 and (f.size or 0) >= self.config.multipart_threshold)
        group = _TaskGroup(self.config.max_concurrency)
        try:
            for index, fetch in enumerate(fetches):
                start = functools.partial(
                    self._start_download, index, fetch, large, results, inflight, group, progress
                )
                group.submit(start)
            group.wait()
        except BaseException:
            for state in inflight:
                with contextlib.suppress(OSError):
                    state.close()
                state.tmp.unlink(missing_ok=True)
            raise
        return [r for r in results if r is not None]

    def _start_download(
        self,
        index: int,
        fetch: _Fetch,
        large_files: int,
        results: list[Transfer | None],
        inflight: list[_FileDownload],
        group: _TaskGroup,
        progress: _Progress,
    ) -> None:
        if fetch.src.is_local:
            results[index] = self._copy_local(fetch.src, fetch.dest, "download", fetch, progress)
            return
        assert fetch.size is not None
        if self._cached(fetch):
            log.debug("download %s: %s is up to date", fetch.src, fetch.dest)
            results[index] = Transfer(
                fetch.src,
                parse_uri(fetch.dest),
                fetch.size,
                fetch.sha256 or "",
                skipped=True,
                crc64nvme=fetch.expected_crc64nvme or fetch.crc64nvme,
            )
            progress.add(fetch.size)
            return
        with self._errors("download", fetch.src):
            fetch.dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = _partial_path(fetch.dest)
            try:
                fd = os.open(tmp, os.O_RDWR)  # read back by the hasher
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        ranges = self._download_ranges(fetch.size, large_files)
        state = _FileDownload(fetch, fetch.size, tmp, fd, _OrderedHasher(fd), parts_left=len(ranges))
        inflight.append(state)  # list.append is atomic; read only after every task has ended
        for start, end in ranges[1:]:
            group.submit(
                functools.partial(self._download_part, state, start, end, index, results, group, progress)
            )
        self._download_part(state, *ranges[0], index, results, group, progress)

    def _cached(self, fetch: _Fetch) -> bool:
        """True when the destination already holds this object (one HEAD when the listing had no SHA-256)."""
        try:
            if not fetch.dest.is_file() or fetch.dest.stat().st_size != fetch.size:
                return False
        except OSError:
            return False
        if fetch.sha256 is None and fetch.crc64nvme is None:
            self._learn(fetch, self._head(fetch.src, "download"))
        if fetch.expected is not None and fetch.sha256 not in (None, fetch.expected):
            return False
        if fetch.expected_crc64nvme is not None and fetch.crc64nvme not in (None, fetch.expected_crc64nvme):
            return False
        if fetch.expected_crc64nvme is not None or fetch.expected is not None:
            return _local_matches(fetch.dest, fetch.size or 0, fetch.expected, fetch.expected_crc64nvme)
        return _local_matches(fetch.dest, fetch.size or 0, fetch.sha256, fetch.crc64nvme)

    def _download_part(
        self,
        state: _FileDownload,
        start: int,
        end: int,
        index: int,
        results: list[Transfer | None],
        group: _TaskGroup,
        progress: _Progress,
    ) -> None:
        src = state.fetch.src
        whole = start == 0 and end == state.size
        offset, attempt, crc = start, 0, 0
        buffer = memoryview(bytearray(max(1, min(_STREAM_BLOCK, end - start))))
        with self._errors("download", src):
            while True:
                args: dict[str, Any] = {"Bucket": src.bucket, "Key": src.key}
                if not whole or offset:
                    args["Range"] = f"bytes={offset}-{end - 1}"
                if state.fetch.etag:
                    args["IfMatch"] = state.fetch.etag  # parts of two versions are never stitched together
                resp: dict[str, Any] = dict(self._client.get_object(**args))
                body = _BodyReader(resp.pop("Body"))
                if state.response is None:
                    state.response = resp
                sha = self._needs_sha256(state.fetch, resp, whole=whole)
                try:
                    while offset < end and not group.failed:
                        n = body.readinto(buffer[: min(len(buffer), end - offset)])
                        _pwrite_all(state.fd, buffer[:n], offset)
                        crc = crc64nvme(buffer[:n], crc)  # any buffer
                        if sha:
                            state.hasher.add(offset, buffer[:n])
                        offset += n
                        progress.add(n)
                    break
                except _STREAM_ERRORS as exc:
                    # botocore retries requests; a body cut off mid-stream resumes here where it broke.
                    attempt += 1
                    if attempt >= self.config.max_attempts:
                        raise
                    log.warning(
                        "download %s: the stream broke at byte %d (%s); resuming (attempt %d)",
                        src,
                        offset,
                        exc,
                        attempt + 1,
                    )
                    time.sleep(min(2.0**attempt * 0.1, 5.0))
                finally:
                    body.close()
        if group.failed:
            return
        with state.lock:
            state.part_crcs[start] = (crc, offset - start)
            state.parts_left -= 1
            last = state.parts_left == 0
        if last:
            results[index] = self._finish_download(state)

    def _needs_sha256(self, fetch: _Fetch, response: Mapping[str, Any], *, whole: bool) -> bool:
        """Whether a download must be hashed with SHA-256: only where no CRC64NVME is known to
        compare with, or a caller's SHA-256 is the only expectation. Every part of one object
        decides alike (the same metadata comes with every ranged GET of one ETag)."""
        if fetch.expected_crc64nvme is not None:
            return False
        if fetch.expected is not None:
            return True
        return fetch.crc64nvme is None and self._crc64_from_head(response, server=whole) is None

    def _finish_download(self, state: _FileDownload) -> Transfer:
        fetch, src = state.fetch, state.fetch.src
        with self._errors("download", src):
            state.close()
        crc, written = 0, 0
        for start in sorted(state.part_crcs):
            part_crc, length = state.part_crcs[start]
            crc, written = combine_crc64nvme(crc, part_crc, length), written + length
        actual_crc = crc64_hex(crc)
        response = state.response or {}
        whole = len(state.part_crcs) == 1
        recorded_crc = fetch.crc64nvme or self._crc64_from_head(response, server=whole)
        recorded_sha = fetch.sha256 or self._sha256_from_head(response)
        actual_sha = state.hasher.hexdigest() if state.hasher.hashed == state.size > 0 else None
        if state.size == 0:
            actual_sha = hashlib.sha256(b"").hexdigest()
        checks = [
            ("CRC64NVME", actual_crc, fetch.expected_crc64nvme, fetch.expected_source),
            ("CRC64NVME", actual_crc, recorded_crc, ""),
        ]
        if actual_sha is not None or self._needs_sha256(fetch, {}, whole=False):
            taken = actual_sha or "(not taken)"
            checks += [
                ("SHA-256", taken, fetch.expected, fetch.expected_source),
                ("SHA-256", taken, recorded_sha if actual_sha else None, ""),
            ]
        for algorithm, actual, expected, source in checks:
            if written == state.size and (expected is None or actual == expected):
                continue
            state.tmp.unlink(missing_ok=True)
            where = f"recorded in {source}" if source else "recorded with the object"
            raise ChecksumMismatchError(
                f"download {src} failed: got {written} bytes with {algorithm} {actual}, expected "
                f"{state.size} bytes with the {algorithm} {expected} {where}: "
                "the object is corrupt or changed during the download",
                operation="download",
                uri=str(src),
            )
        if not any(expected for _, _, expected, _ in checks):
            log.warning("download %s: no checksum recorded for this object; size checked only", src)
        with self._errors("download", src):
            state.tmp.replace(fetch.dest)
        log.info("downloaded %s -> %s (%d bytes)", src, fetch.dest, state.size)
        sha = actual_sha or recorded_sha or ""
        return Transfer(src, parse_uri(fetch.dest), state.size, sha, skipped=False, crc64nvme=actual_crc)

    def upload_file(
        self,
        src: str | os.PathLike[str],
        uri: URILike,
        *,
        skip_unchanged: bool = True,
        progress: ProgressCallback | None = None,
    ) -> Transfer:
        """Upload one file. With ``skip_unchanged`` an object with the same size and SHA-256 is left alone."""
        path = Path(_abspath(src))
        return self._upload_many([(path, parse_uri(uri))], skip_unchanged, None, progress)[0]

    def upload_prefix(
        self,
        src_dir: str | os.PathLike[str],
        uri: URILike,
        *,
        skip_unchanged: bool = True,
        progress: ProgressCallback | None = None,
    ) -> list[Transfer]:
        """Upload every file under ``src_dir`` to ``uri``, keeping relative names.

        Files go in parallel (``max_concurrency``): one PUT each up to ``multipart_threshold``, a
        multipart upload of ``multipart_chunksize`` parts above it. Each file is read once to hash
        it (its SHA-256 goes into the object's metadata) and once to send it; every body carries
        a checksum the server verifies. With ``skip_unchanged`` one listing of ``uri`` tells which
        files may already be there; only those cost a HEAD.
        """
        root = Path(_abspath(src_dir))
        dest = parse_uri(uri)
        if not root.is_dir():
            raise ObjectNotFoundError(
                f"upload {root} failed: not a directory", operation="upload", uri=str(root)
            )
        files = self._list_local(parse_uri(root), checksums=False)
        existing: dict[str, int] | None = None
        if skip_unchanged and dest.is_s3:
            try:
                existing = {o.uri.key: o.size for o in self.list_prefix(dest)}
            except ObjectNotFoundError:
                existing = {}
        pairs = [(Path(f.uri.key), join_uri(dest, f.name)) for f in files]
        return self._upload_many(pairs, skip_unchanged, existing, progress)

    def _upload_many(
        self,
        pairs: list[tuple[Path, StorageURI]],
        skip_unchanged: bool,
        existing: Mapping[str, int] | None,
        callback: ProgressCallback | None,
    ) -> list[Transfer]:
        results: list[Transfer | None] = [None] * len(pairs)
        progress = _Progress(0, callback)
        if callback is not None:
            with self._errors("upload", pairs[0][0] if pairs else ""):
                progress.total = sum(src.stat().st_size for src, _ in pairs)
        inflight: list[_FileUpload] = []
        group = _TaskGroup(self.config.max_concurrency)
        try:
            for index, (src, dest) in enumerate(pairs):
                task = functools.partial(
                    self._start_upload,
                    index,
                    src,
                    dest,
                    skip_unchanged,
                    existing,
                    results,
                    inflight,
                    group,
                    progress,
                )
                group.submit(task)
            group.wait()
        except BaseException:
            for state in inflight:
                with contextlib.suppress(OSError):
                    state.close()
                if not state.completed:
                    self._abort_upload(state)
            raise
        return [r for r in results if r is not None]

    def _start_upload(
        self,
        index: int,
        src: Path,
        dest: StorageURI,
        skip_unchanged: bool,
        existing: Mapping[str, int] | None,
        results: list[Transfer | None],
        inflight: list[_FileUpload],
        group: _TaskGroup,
        progress: _Progress,
    ) -> None:
        if dest.is_local:
            results[index] = self._copy_local(parse_uri(src), dest.path, "upload", progress=progress)
            return
        with self._errors("upload", src):
            size = src.stat().st_size
            single = size < self.config.multipart_threshold
            data = src.read_bytes() if single else None
            if data is not None:
                sha, crc = hashlib.sha256(data).hexdigest(), crc64_hex(crc64nvme(data))
            else:
                sha, crc = file_digests(src)
        may_exist = existing is None or existing.get(dest.key) == size
        if skip_unchanged and may_exist and self._remote_matches(dest, size, sha):
            log.debug("upload %s: %s is up to date", src, dest)
            results[index] = Transfer(parse_uri(src), dest, size, sha, skipped=True, crc64nvme=crc)
            progress.add(size)
            return
        args = self._upload_args(sha, crc, single_part=single)
        with self._errors("upload", dest):
            if data is not None:
                self._client.put_object(Bucket=dest.bucket, Key=dest.key, Body=data, **args)
                progress.add(size)
                log.info("uploaded %s -> %s (%d bytes)", src, dest, size)
                results[index] = Transfer(parse_uri(src), dest, size, sha, skipped=False, crc64nvme=crc)
                return
            ranges = self._upload_ranges(size)
            fd = os.open(src, os.O_RDONLY)
            try:
                created = self._client.create_multipart_upload(Bucket=dest.bucket, Key=dest.key, **args)
            except BaseException:
                os.close(fd)
                raise
        state = _FileUpload(src, dest, size, sha, crc, fd, created["UploadId"], parts_left=len(ranges))
        inflight.append(state)
        for number, (start, end) in enumerate(ranges[1:], start=2):
            group.submit(
                functools.partial(self._upload_part, state, number, start, end, index, results, progress)
            )
        self._upload_part(state, 1, *ranges[0], index, results, progress)

    def _upload_part(
        self,
        state: _FileUpload,
        number: int,
        start: int,
        end: int,
        index: int,
        results: list[Transfer | None],
        progress: _Progress,
    ) -> None:
        dest = state.dest
        with self._errors("upload", dest):
            data = _pread_exact(state.fd, end - start, start)
            checksum = self._part_checksum(data)
            resp = self._client.upload_part(
                Bucket=dest.bucket,
                Key=dest.key,
                UploadId=state.upload_id,
                PartNumber=number,
                Body=data,
                **checksum,
            )
            del data
            part: dict[str, Any] = {"PartNumber": number, "ETag": resp["ETag"]}
            for name in (
                "ChecksumCRC64NVME",
                "ChecksumSHA256",
                "ChecksumSHA1",
                "ChecksumCRC32",
                "ChecksumCRC32C",
            ):
                if value := resp.get(name) or checksum.get(name):
                    part[name] = value
            progress.add(end - start)
            with state.lock:
                state.parts[number] = part
                state.parts_left -= 1
                last = state.parts_left == 0
            if not last:
                return
            state.close()
            whole: dict[str, Any] = {}
            if self.config.checksum_algorithm == "CRC64NVME":
                whole = {
                    "ChecksumCRC64NVME": _hex_to_b64(state.crc64nvme),
                    "ChecksumType": "FULL_OBJECT",
                }
            self._client.complete_multipart_upload(
                Bucket=dest.bucket,
                Key=dest.key,
                UploadId=state.upload_id,
                MultipartUpload={"Parts": [state.parts[n] for n in sorted(state.parts)]},  # type: ignore[misc]
                **whole,
            )
            state.completed = True
        log.info("uploaded %s -> %s (%d bytes)", state.src, dest, state.size)
        results[index] = Transfer(
            parse_uri(state.src), dest, state.size, state.sha256, skipped=False, crc64nvme=state.crc64nvme
        )

    def _abort_upload(self, state: _FileUpload) -> None:
        """Best effort: an upload that cannot be aborted now is left to :meth:`abort_multipart_uploads`
        or the bucket's lifecycle rule; it is never visible as an object."""
        try:
            self._client.abort_multipart_upload(
                Bucket=state.dest.bucket, Key=state.dest.key, UploadId=state.upload_id
            )
        except _TRANSFER_ERRORS as exc:
            log.warning(
                "upload %s: could not abort the unfinished multipart upload: %s",
                state.dest,
                self._redact(str(exc)),
            )

    def _remote_matches(self, dest: StorageURI, size: int, sha: str) -> bool:
        try:
            head = self._head(dest, "upload")
        except ObjectNotFoundError:
            return False
        return int(head["ContentLength"]) == size and self._sha256_from_head(head) == sha

    def _copy_local(
        self,
        src: StorageURI,
        dest: Path,
        operation: str,
        fetch: _Fetch | None = None,
        progress: _Progress | None = None,
    ) -> Transfer:
        """Copy a local file, checksumming it as it is copied, into a temporary file renamed into place.
        ``fetch`` carries the checksums the bytes must have (from a manifest)."""
        expected = [
            ("SHA-256", fetch.expected if fetch else None),
            ("CRC64NVME", fetch.expected_crc64nvme if fetch else None),
        ]
        source = (fetch.expected_source if fetch else "") or "the expected checksums"
        with self._errors(operation, src):
            size = src.path.stat().st_size
            if dest.is_file() and dest.stat().st_size == size:
                sha, crc = file_digests(src.path)
                matches = all(w is None or w == a for (_, w), a in zip(expected, [sha, crc], strict=True))
                if matches and _local_matches(dest, size, None, crc):
                    if progress is not None:
                        progress.add(size)
                    return Transfer(src, parse_uri(dest), size, sha or "", skipped=True, crc64nvme=crc)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = _partial_path(dest)
            try:
                digest, crc_value, copied = hashlib.sha256(), 0, 0
                with src.path.open("rb") as fin, tmp.open("wb") as fout:
                    while block := fin.read(_HASH_BLOCK):
                        digest.update(block)
                        crc_value = crc64nvme(block, crc_value)
                        fout.write(block)
                        copied += len(block)
                        if progress is not None:
                            progress.add(len(block))
                sha, crc = digest.hexdigest(), crc64_hex(crc_value)
                for (algorithm, want), actual in zip(expected, [sha, crc], strict=True):
                    if want is not None and actual != want:
                        raise ChecksumMismatchError(
                            f"{operation} {src} failed: its {algorithm} {actual} is not the {want} "
                            f"recorded in {source}",
                            operation=operation,
                            uri=str(src),
                        )
                tmp.replace(dest)
            finally:
                tmp.unlink(missing_ok=True)
        return Transfer(src, parse_uri(dest), copied, sha, skipped=False, crc64nvme=crc)

    # ------------------------------------------------------------------ deletion

    def abort_multipart_uploads(self, uri: URILike) -> int:
        """Abort unfinished multipart uploads under ``uri`` (left behind when an upload failed while the
        server was unreachable). They are never visible as objects but hold storage until aborted or
        expired by a bucket lifecycle rule (``AbortIncompleteMultipartUpload``)."""
        loc = parse_uri(uri)
        if loc.is_local:
            return 0
        aborted = 0
        with self._errors("abort uploads", loc):
            paginator = self._client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.key):
                for upload in page.get("Uploads", []):
                    self._client.abort_multipart_upload(
                        Bucket=loc.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    aborted += 1
        return aborted

    def delete(self, uri: URILike) -> None:
        """Delete one object or local file; a missing one is not an error."""
        loc = parse_uri(uri)
        with self._errors("delete", loc):
            if loc.is_local:
                loc.path.unlink(missing_ok=True)
            else:
                self._client.delete_object(Bucket=loc.bucket, Key=loc.key)

    def delete_prefix(self, uri: URILike) -> int:
        """Delete everything under ``uri`` taken as a directory; returns how many objects went."""
        loc = parse_uri(uri)
        if loc.is_local:
            with self._errors("delete", loc):
                if not loc.path.is_dir():
                    return 0
                count = sum(len(files) for _d, _s, files in os.walk(loc.path))
                shutil.rmtree(loc.path)
                return count
        if not loc.key:
            raise InvalidURIError(
                f"refusing to delete a whole bucket: {loc}", operation="delete", uri=str(loc)
            )
        keys = [obj.uri.key for obj in self.list_prefix(loc)]
        with self._errors("delete", loc):
            for start in range(0, len(keys), _DELETE_BATCH):
                batch = keys[start : start + _DELETE_BATCH]
                resp = self._client.delete_objects(
                    Bucket=loc.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
                if errors := resp.get("Errors"):
                    first = errors[0]
                    raise StorageError(
                        f"delete {loc} failed: {len(errors)} objects not deleted, "
                        f"e.g. {first.get('Key')}: {first.get('Code')}",
                        operation="delete",
                        uri=str(loc),
                        code=first.get("Code"),
                    )
        return len(keys)
