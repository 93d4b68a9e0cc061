"""Checksums of files and objects: SHA-256 and CRC64NVME, and the ones recorded with an object."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from awscrt.checksums import crc64nvme  # type: ignore[import-untyped]

from kubetune.storage.config import MiB

SHA256_METADATA_KEY = "sha256"
CRC64_METADATA_KEY = "crc64nvme"
HASH_BLOCK = 4 * MiB
_SHA256_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
_CRC64_HEX_RE = re.compile(r"^[0-9a-f]{16}$")


def sha256_file(path: str | os.PathLike[str]) -> str:
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # reads into one reused buffer


def crc64_hex(value: int) -> str:
    return f"{value:016x}"


def b64_to_hex(value: str, length: int) -> str | None:
    """A checksum header's base64 as hex; None unless it decodes to ``length`` bytes."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == length else None


def hex_to_b64(value: str) -> str:
    return base64.b64encode(bytes.fromhex(value)).decode()


def _crc64_reading(path: str | os.PathLike[str], also: Any = None) -> str:
    """The CRC64NVME of a file, read once; ``also`` (a hashlib hash) sees every block too."""
    crc = 0
    buffer = memoryview(bytearray(HASH_BLOCK))
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


def file_matches(path: Path, size: int, sha256: str | None, crc64: str | None = None) -> bool:
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


def recorded_sha256(head: Mapping[str, Any]) -> str | None:
    """The SHA-256 a HEAD or GET response records: in the metadata, or the server's full-object one."""
    recorded = (head.get("Metadata") or {}).get(SHA256_METADATA_KEY, "").lower()
    if _SHA256_HEX_RE.match(recorded):
        return str(recorded)
    server = head.get("ChecksumSHA256")
    if server and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
        return b64_to_hex(server, 32)
    return None


def recorded_crc64(head: Mapping[str, Any], *, server: bool = True) -> str | None:
    """The CRC64NVME recorded in the metadata or, with ``server``, the one S3 stores for the whole
    object (a ranged GET may omit it, so parts of one download ask for the metadata only)."""
    recorded = (head.get("Metadata") or {}).get(CRC64_METADATA_KEY, "").lower()
    if _CRC64_HEX_RE.match(recorded):
        return str(recorded)
    value = head.get("ChecksumCRC64NVME")
    if server and value and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
        return b64_to_hex(value, 8)
    return None


class OrderedHasher:
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
