"""Object storage for models, data and artifacts: ``s3://bucket/key``, ``file://`` URIs and local paths.

One small interface, :class:`ObjectStore`, over S3-compatible storage (AWS S3, MinIO, Ceph, R2)
and the local filesystem. Transfers go through boto3's transfer manager (multipart, concurrent
parts, retries from botocore). Integrity is checked end to end: every object written here carries
the SHA-256 of its content in its metadata (``x-amz-meta-sha256``) and is sent with an S3
flexible checksum, so the server rejects bytes damaged in transit; every download is hashed
and compared before it is made visible. Nothing half-written is ever visible: S3 shows an
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
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeAlias
from urllib.parse import urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, FlexibleChecksumError, NoCredentialsError
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from s3transfer.exceptions import RetriesExceededError, TransferNotDoneError
from s3transfer.manager import TransferManager
from s3transfer.subscribers import BaseSubscriber

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
    from s3transfer.futures import TransferFuture

__all__ = [
    "ChecksumMismatchError",
    "InvalidURIError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectStore",
    "StorageConfig",
    "StorageCredentials",
    "StorageError",
    "StorageURI",
    "Transfer",
    "join_uri",
    "parse_uri",
]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
SHA256_METADATA_KEY = "sha256"
# Temporary files of in-flight local writes; listings never show them.
PARTIAL_SUFFIX = ".kubetune-part"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SHA256_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
_HASH_BLOCK = 4 * MiB
_DELETE_BATCH = 1000
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
    multipart_threshold: int = Field(8 * MiB, ge=5 * MiB)
    multipart_chunksize: int = Field(8 * MiB, ge=5 * MiB)
    retry_mode: Literal["standard", "adaptive", "legacy"] = "standard"
    max_attempts: int = Field(8, ge=1, le=50, description="Attempts per request, the first included.")
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(60.0, gt=0)
    verify_tls: bool | str = Field(True, description="False, True or the path of a CA bundle.")
    checksum_algorithm: Literal["SHA256", "CRC32", "CRC32C", "SHA1"] | None = Field(
        "SHA256", description="S3 flexible checksum sent with uploads; None for servers without support."
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
            multipart_chunksize=self.multipart_chunksize,
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
            response_checksum_validation=checksums,
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


@dataclass(frozen=True, slots=True)
class Transfer:
    """One file moved (or found already in place, ``skipped``) with the SHA-256 it was verified against."""

    source: StorageURI
    dest: StorageURI
    size: int
    sha256: str
    skipped: bool


# --------------------------------------------------------------------------- helpers


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _b64_to_hex(value: str) -> str | None:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def _hex_to_b64(value: str) -> str:
    return base64.b64encode(bytes.fromhex(value)).decode()


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


def _local_matches(path: Path, size: int, sha256: str | None) -> bool:
    """True when ``path`` already holds exactly the object: same size and same SHA-256."""
    if sha256 is None:
        return False
    try:
        if not path.is_file() or path.stat().st_size != size:
            return False
        return sha256_file(path) == sha256
    except OSError:
        return False


class _KnownObject(BaseSubscriber):
    """Tells the transfer manager the size and ETag from our HEAD: no second HEAD, and every
    ranged GET carries ``If-Match`` so parts of two different versions are never stitched together."""

    def __init__(self, size: int, etag: str | None) -> None:
        self._size = size
        self._etag = etag

    def on_queued(self, future: TransferFuture, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self._size)
        if self._etag:
            future.meta.provide_object_etag(self._etag)


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
            config=self.config.botocore_config(),
        )

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
            return _b64_to_hex(server)
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
                    sha = self._sha256_from_head(self._head(obj_uri, "list")) if checksums else None
                    infos.append(
                        ObjectInfo(
                            obj_uri, name, int(obj["Size"]), obj.get("ETag"), sha, obj.get("LastModified")
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
            resp = self._client.put_object(
                Bucket=loc.bucket,
                Key=loc.key,
                Body=data,
                **self._upload_args(sha, single_part=True, content_type=content_type),
            )
        return ObjectInfo(loc, loc.name, len(data), resp.get("ETag"), sha)

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
        self, sha256: str, *, single_part: bool, content_type: str | None = None
    ) -> dict[str, Any]:
        args: dict[str, Any] = {"Metadata": {SHA256_METADATA_KEY: sha256}}
        if content_type:
            args["ContentType"] = content_type
        algorithm = self.config.checksum_algorithm
        if algorithm == "SHA256" and single_part:
            # The server checks the body against the hash taken from the file itself.
            args["ChecksumSHA256"] = _hex_to_b64(sha256)
        elif algorithm:
            args["ChecksumAlgorithm"] = algorithm
        return args

    def _transfer_manager(self) -> TransferManager:
        return TransferManager(self._client, self.config.transfer_config())

    def download_file(self, uri: URILike, dest: str | os.PathLike[str]) -> Transfer:
        """Download one object to ``dest``; skipped when ``dest`` already has the same size and SHA-256."""
        return self._download_many([(parse_uri(uri), Path(_abspath(dest)))])[0]

    def download_prefix(self, uri: URILike, dest_dir: str | os.PathLike[str]) -> list[Transfer]:
        """Download every object under ``uri`` into ``dest_dir``, keeping relative names."""
        loc = parse_uri(uri)
        root = Path(_abspath(dest_dir))
        objects = self.list_prefix(loc)
        if not objects and (loc.is_s3 or not loc.path.is_dir()):
            raise ObjectNotFoundError(
                f"download {loc} failed: nothing under this prefix", operation="download", uri=str(loc)
            )
        pairs = []
        for obj in objects:
            _check_segments(obj.name.split("/"), str(obj.uri), allow_trailing_slash=False)
            pairs.append((obj.uri, root.joinpath(*obj.name.split("/"))))
        return self._download_many(pairs)

    def _download_many(self, pairs: list[tuple[StorageURI, Path]]) -> list[Transfer]:
        results: dict[int, Transfer] = {}
        pending: list[tuple[int, StorageURI, Path, Path, int, str | None, Any]] = []
        temps: list[Path] = []
        try:
            with self._transfer_manager() as manager:
                for index, (src, dest) in enumerate(pairs):
                    if src.is_local:
                        results[index] = self._copy_local(src, dest, "download")
                        continue
                    head = self._head(src, "download")
                    size, sha = int(head["ContentLength"]), self._sha256_from_head(head)
                    if _local_matches(dest, size, sha):
                        log.debug("download %s: %s is up to date", src, dest)
                        results[index] = Transfer(src, parse_uri(dest), size, sha or "", skipped=True)
                        continue
                    with self._errors("download", src):
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        tmp = _partial_path(dest)
                        temps.append(tmp)
                        future = manager.download(
                            src.bucket,
                            src.key,
                            str(tmp),
                            extra_args={"ChecksumMode": "ENABLED"},
                            subscribers=[_KnownObject(size, head.get("ETag"))],
                        )
                    pending.append((index, src, dest, tmp, size, sha, future))
                for index, src, dest, tmp, size, sha, future in pending:
                    with self._errors("download", src):
                        future.result()
                    results[index] = self._finish_download(src, dest, tmp, size, sha)
        except BaseException:
            for tmp in temps:
                tmp.unlink(missing_ok=True)
            raise
        return [results[i] for i in range(len(pairs))]

    def _finish_download(
        self, src: StorageURI, dest: Path, tmp: Path, size: int, sha: str | None
    ) -> Transfer:
        with self._errors("download", src):
            actual_size = tmp.stat().st_size
            actual = sha256_file(tmp)
        if actual_size != size or (sha is not None and actual != sha):
            tmp.unlink(missing_ok=True)
            raise ChecksumMismatchError(
                f"download {src} failed: got {actual_size} bytes with SHA-256 {actual}, "
                f"expected {size} bytes with SHA-256 {sha}: "
                "the object is corrupt or changed during the download",
                operation="download",
                uri=str(src),
            )
        if sha is None:
            log.warning("download %s: no SHA-256 recorded for this object; size checked only", src)
        with self._errors("download", src):
            tmp.replace(dest)
        log.info("downloaded %s -> %s (%d bytes)", src, dest, size)
        return Transfer(src, parse_uri(dest), size, actual, skipped=False)

    def upload_file(
        self, src: str | os.PathLike[str], uri: URILike, *, skip_unchanged: bool = True
    ) -> Transfer:
        """Upload one file. With ``skip_unchanged`` an object with the same size and SHA-256 is left alone."""
        return self._upload_many([(Path(_abspath(src)), parse_uri(uri))], skip_unchanged=skip_unchanged)[0]

    def upload_prefix(
        self,
        src_dir: str | os.PathLike[str],
        uri: URILike,
        *,
        skip_unchanged: bool = True,
    ) -> list[Transfer]:
        """Upload every file under ``src_dir`` to ``uri``, keeping relative names."""
        root = Path(_abspath(src_dir))
        dest = parse_uri(uri)
        if not root.is_dir():
            raise ObjectNotFoundError(
                f"upload {root} failed: not a directory", operation="upload", uri=str(root)
            )
        files = self._list_local(parse_uri(root), checksums=False)
        return self._upload_many(
            [(Path(f.uri.key), join_uri(dest, f.name)) for f in files], skip_unchanged=skip_unchanged
        )

    def _upload_many(self, pairs: list[tuple[Path, StorageURI]], *, skip_unchanged: bool) -> list[Transfer]:
        results: dict[int, Transfer] = {}
        pending: list[tuple[int, Path, StorageURI, int, str, Any]] = []
        with self._transfer_manager() as manager:
            for index, (src, dest) in enumerate(pairs):
                if dest.is_local:
                    results[index] = self._copy_local(parse_uri(src), dest.path, "upload")
                    continue
                with self._errors("upload", src):
                    size = src.stat().st_size
                    sha = sha256_file(src)
                if skip_unchanged and self._remote_matches(dest, size, sha):
                    log.debug("upload %s: %s is up to date", src, dest)
                    results[index] = Transfer(parse_uri(src), dest, size, sha, skipped=True)
                    continue
                args = self._upload_args(sha, single_part=size < self.config.multipart_threshold)
                with self._errors("upload", dest):
                    future = manager.upload(str(src), dest.bucket, dest.key, extra_args=args)
                pending.append((index, src, dest, size, sha, future))
            for index, src, dest, size, sha, future in pending:
                with self._errors("upload", dest):
                    future.result()
                log.info("uploaded %s -> %s (%d bytes)", src, dest, size)
                results[index] = Transfer(parse_uri(src), dest, size, sha, skipped=False)
        return [results[i] for i in range(len(pairs))]

    def _remote_matches(self, dest: StorageURI, size: int, sha: str) -> bool:
        try:
            head = self._head(dest, "upload")
        except ObjectNotFoundError:
            return False
        return int(head["ContentLength"]) == size and self._sha256_from_head(head) == sha

    def _copy_local(self, src: StorageURI, dest: Path, operation: str) -> Transfer:
        with self._errors(operation, src):
            size = src.path.stat().st_size
            sha = sha256_file(src.path)
            if _local_matches(dest, size, sha):
                return Transfer(src, parse_uri(dest), size, sha, skipped=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = _partial_path(dest)
            try:
                shutil.copyfile(src.path, tmp)
                if sha256_file(tmp) != sha:
                    raise ChecksumMismatchError(
                        f"{operation} {src} failed: the copy at {dest} does not match the source",
                        operation=operation,
                        uri=str(src),
                    )
                tmp.replace(dest)
            finally:
                tmp.unlink(missing_ok=True)
        return Transfer(src, parse_uri(dest), size, sha, skipped=False)

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
