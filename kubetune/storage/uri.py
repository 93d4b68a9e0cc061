"""Storage locations (``s3://bucket/key``, ``file://`` URIs, local paths) parsed into :class:`StorageURI`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

from kubetune.storage.errors import InvalidURIError

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


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


def check_segments(segments: list[str], uri: str, *, allow_trailing_slash: bool = True) -> None:
    """Refuse ``..``, ``.``, empty segments (one trailing ``/`` aside) and control characters."""
    for i, segment in enumerate(segments):
        if segment in ("..", "."):
            raise InvalidURIError(f"{segment!r} path segments are not allowed: {uri!r}", uri=uri)
        if not segment and not (allow_trailing_slash and i == len(segments) - 1):
            raise InvalidURIError(f"empty path segment ('//') in {uri!r}", uri=uri)
        if any(ord(c) < 0x20 or c == "\x7f" for c in segment):
            raise InvalidURIError(f"control character in {uri!r}", uri=uri)


def absolute_path(path: str | os.PathLike[str]) -> str:
    # Normalises `..` like a shell without resolving symlinks (Path.resolve would).
    return os.path.abspath(path)  # noqa: PTH100


def _scheme(uri: str) -> str | None:
    match = _SCHEME_RE.match(uri)
    return match.group(1).lower() if match else None


def is_s3_uri(uri: URILike) -> bool:
    """True for an ``s3://`` location, well-formed or not (:func:`parse_uri` says what is wrong with
    a bad one). Strings that :func:`parse_uri` refuses, such as ``hf://`` ids, are simply not S3."""
    if isinstance(uri, StorageURI):
        return uri.is_s3
    return isinstance(uri, str) and _scheme(uri) == "s3"


def parse_uri(uri: URILike) -> StorageURI:
    """Parse ``s3://bucket/key``, ``file://path`` or a local path.

    ``..`` and ``.`` segments are refused in URIs (a key must never climb out of its prefix);
    a plain local path such as ``../data`` is made absolute, as a shell would. ``file://x/y`` is
    the path ``x/y`` (the convention of fsspec and ``datasets``), ``file:///x/y`` the path ``/x/y``.
    """
    if isinstance(uri, StorageURI):
        return uri
    if isinstance(uri, os.PathLike):
        return StorageURI("file", "", absolute_path(uri))
    if not isinstance(uri, str):
        raise InvalidURIError(f"expected a URI string or a path, got {type(uri).__name__}")
    if not uri:
        raise InvalidURIError("empty URI")
    scheme = _scheme(uri)
    if scheme is None:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", uri) and not Path(uri).exists():
            raise _unsupported_scheme(uri, uri.split(":", 1)[0])
        return StorageURI("file", "", absolute_path(uri))
    rest = uri[uri.index("://") + 3 :]
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
            check_segments(key.split("/"), uri)
        return StorageURI("s3", bucket, key)
    if scheme == "file":
        if not rest:
            raise InvalidURIError(f"missing path in {uri!r}", uri=uri)
        check_segments(rest.split("/")[1:] if rest.startswith("/") else rest.split("/"), uri)
        return StorageURI("file", "", absolute_path(rest))
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
        check_segments(part_segments, f"{uri}/{part}")
        segments.extend(s for s in part_segments if s)
    trailing = "/" if parts and parts[-1].endswith("/") else ""
    if not segments:
        return uri
    if uri.is_s3:
        prefix = uri.key.rstrip("/")
        key = "/".join([prefix, *segments]) if prefix else "/".join(segments)
        return StorageURI("s3", uri.bucket, key + trailing)
    return StorageURI("file", "", str(Path(uri.key, *segments)))
