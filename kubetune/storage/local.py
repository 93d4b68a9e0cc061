"""The local filesystem behind :class:`~kubetune.storage.ObjectStore`: paths and ``file://`` URIs.

Nothing half-written is ever visible: a file is written to a temporary file in its directory,
named with :data:`PARTIAL_SUFFIX`, and renamed into place once complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

from awscrt.checksums import crc64nvme  # type: ignore[import-untyped]

from kubetune.storage.checksums import HASH_BLOCK, crc64_hex, file_digests, file_matches, sha256_file
from kubetune.storage.errors import ChecksumMismatchError, ErrorTranslator, ObjectNotFoundError
from kubetune.storage.transfer import Fetch, ObjectInfo, Progress, Transfer
from kubetune.storage.uri import StorageURI, parse_uri

# Temporary files of in-flight local writes; listings never show them.
PARTIAL_SUFFIX = ".kubetune-part"


def partial_path(dest: Path) -> Path:
    """A new, empty temporary file next to ``dest``, to be renamed onto it once complete."""
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=PARTIAL_SUFFIX)
    os.close(fd)
    return Path(name)


def atomic_write_bytes(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(dest)
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


class LocalBackend:
    """Files under local paths. Local files have no recorded checksums: they are hashed when asked."""

    def __init__(self, errors: ErrorTranslator) -> None:
        self._errors = errors

    def stat(self, loc: StorageURI) -> ObjectInfo:
        with self._errors.during("stat", loc):
            st = loc.path.stat()
            if not loc.path.is_file():
                raise ObjectNotFoundError(f"stat {loc} failed: not a file", operation="stat", uri=str(loc))
            return ObjectInfo(loc, loc.path.name, st.st_size, None, sha256_file(loc.path))

    def exists(self, loc: StorageURI) -> bool:
        return loc.path.exists()

    def list(self, loc: StorageURI, *, checksums: bool) -> list[ObjectInfo]:
        root = loc.path
        infos: list[ObjectInfo] = []
        with self._errors.during("list", loc):
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

    def read_bytes(self, loc: StorageURI) -> bytes:
        with self._errors.during("read", loc):
            return loc.path.read_bytes()

    def write_bytes(self, loc: StorageURI, data: bytes, sha256: str, content_type: str | None) -> ObjectInfo:
        with self._errors.during("write", loc):
            atomic_write_bytes(loc.path, data)
        return ObjectInfo(loc, loc.path.name, len(data), None, sha256)

    def learn(self, fetch: Fetch) -> None:
        """The size of a file about to be copied."""
        with self._errors.during("download", fetch.src):
            fetch.size = fetch.src.path.stat().st_size

    def copy(
        self,
        src: StorageURI,
        dest: Path,
        operation: str,
        fetch: Fetch | None = None,
        progress: Progress | None = None,
    ) -> Transfer:
        """Copy a local file, checksumming it as it is copied, into a temporary file renamed into place.
        ``fetch`` carries the checksums the bytes must have (from a manifest)."""
        expected = [
            ("SHA-256", fetch.expected if fetch else None),
            ("CRC64NVME", fetch.expected_crc64nvme if fetch else None),
        ]
        source = (fetch.expected_source if fetch else "") or "the expected checksums"
        with self._errors.during(operation, src):
            size = src.path.stat().st_size
            if dest.is_file() and dest.stat().st_size == size:
                sha, crc = file_digests(src.path)
                matches = all(w is None or w == a for (_, w), a in zip(expected, [sha, crc], strict=True))
                if matches and file_matches(dest, size, None, crc):
                    if progress is not None:
                        progress.add(size)
                    return Transfer(src, parse_uri(dest), size, sha or "", skipped=True, crc64nvme=crc)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = partial_path(dest)
            try:
                digest, crc_value, copied = hashlib.sha256(), 0, 0
                with src.path.open("rb") as fin, tmp.open("wb") as fout:
                    while block := fin.read(HASH_BLOCK):
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

    def delete(self, loc: StorageURI) -> None:
        with self._errors.during("delete", loc):
            loc.path.unlink(missing_ok=True)

    def delete_prefix(self, loc: StorageURI) -> int:
        with self._errors.during("delete", loc):
            if not loc.path.is_dir():
                return 0
            count = sum(len(files) for _d, _s, files in os.walk(loc.path))
            shutil.rmtree(loc.path)
            return count

    def abort_multipart_uploads(self, loc: StorageURI) -> int:
        return 0  # local writes leave nothing behind that could be aborted
