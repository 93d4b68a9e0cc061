""":class:`ObjectStore`: one interface over S3 and the local filesystem, the backend picked by
each URI's scheme."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.storage.config import StorageConfig
from kubetune.storage.downloads import S3Downloads
from kubetune.storage.errors import ErrorTranslator, ObjectNotFoundError, StorageError
from kubetune.storage.local import LocalBackend
from kubetune.storage.s3 import S3Backend
from kubetune.storage.transfer import Batch, Fetch, ObjectInfo, Progress, ProgressCallback, Transfer
from kubetune.storage.uploads import S3Uploads
from kubetune.storage.uri import StorageURI, URILike, absolute_path, check_segments, join_uri, parse_uri

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client


class ObjectStore:
    """Read and write objects under ``s3://`` URIs, ``file://`` URIs and local paths.

    Thread-safe (boto3 clients are). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, config: StorageConfig | None = None) -> None:
        self.config = config or StorageConfig()
        self._errors = ErrorTranslator(self.config.credentials)
        self._local = LocalBackend(self._errors)
        self._s3 = S3Backend(self.config, self._errors)
        self._downloads = S3Downloads(self._s3)
        self._uploads = S3Uploads(self._s3)

    def __repr__(self) -> str:
        return f"ObjectStore(endpoint={self.config.effective_endpoint!r}, region={self.config.region!r})"

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._s3.close()

    @property
    def client(self) -> S3Client:
        """The underlying boto3 client (for event hooks and operations not wrapped here)."""
        return self._s3.client

    def _backend(self, loc: StorageURI) -> LocalBackend | S3Backend:
        return self._s3 if loc.is_s3 else self._local

    # ------------------------------------------------------------------ metadata

    def stat(self, uri: URILike) -> ObjectInfo:
        """Size, ETag and recorded SHA-256 of one object (local files are hashed)."""
        loc = parse_uri(uri)
        return self._backend(loc).stat(loc)

    def exists(self, uri: URILike) -> bool:
        """True when an object (or local file) exists at ``uri``, or anything exists under it as a prefix."""
        loc = parse_uri(uri)
        return self._backend(loc).exists(loc)

    def list_prefix(self, uri: URILike, *, checksums: bool = False) -> list[ObjectInfo]:
        """Every object under ``uri`` taken as a directory, sorted by name.

        S3 listings carry size and ETag; ``checksums=True`` also fetches each object's recorded
        SHA-256 (one HEAD each) or hashes each local file.
        """
        loc = parse_uri(uri)
        return self._backend(loc).list(loc, checksums=checksums)

    # ------------------------------------------------------------------ small objects

    def read_bytes(self, uri: URILike) -> bytes:
        """Read a whole (small) object, verified against its recorded SHA-256 when it has one."""
        loc = parse_uri(uri)
        return self._backend(loc).read_bytes(loc)

    def write_bytes(self, uri: URILike, data: bytes, *, content_type: str | None = None) -> ObjectInfo:
        """Write a whole (small) object atomically."""
        loc = parse_uri(uri)
        return self._backend(loc).write_bytes(loc, data, hashlib.sha256(data).hexdigest(), content_type)

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

    # ------------------------------------------------------------------ downloads

    def download_file(
        self, uri: URILike, dest: str | os.PathLike[str], *, progress: ProgressCallback | None = None
    ) -> Transfer:
        """Download one object to ``dest``; skipped when ``dest`` already has the same size and SHA-256."""
        loc = parse_uri(uri)
        fetch = Fetch(loc, Path(absolute_path(dest)))
        self._backend(loc).learn(fetch)
        return self._download_many([fetch], progress)[0]

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
        # An empty local directory is an empty prefix; S3 has no empty prefixes.
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
        root = Path(absolute_path(dest_dir))
        fetches = []
        for obj in objects:
            check_segments(obj.name.split("/"), str(obj.uri), allow_trailing_slash=False)
            fetches.append(
                Fetch(
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

    def _download_many(self, fetches: list[Fetch], callback: ProgressCallback | None) -> list[Transfer]:
        progress = Progress(sum(f.size or 0 for f in fetches), callback)
        large = sum(1 for f in fetches if f.src.is_s3 and self._downloads.is_large(f))
        batch = Batch(len(fetches), self.config.max_concurrency, progress)
        tasks: list[Callable[[], None]] = []
        for index, fetch in enumerate(fetches):
            if fetch.src.is_s3:
                tasks.append(functools.partial(self._downloads.start, batch, index, fetch, large))
            else:
                tasks.append(
                    functools.partial(self._copy, batch, index, fetch.src, fetch.dest, "download", fetch)
                )
        return batch.run(tasks)

    def _copy(
        self,
        batch: Batch,
        index: int,
        src: StorageURI,
        dest: Path,
        operation: str,
        fetch: Fetch | None = None,
    ) -> None:
        batch.results[index] = self._local.copy(src, dest, operation, fetch, batch.progress)

    # ------------------------------------------------------------------ uploads

    def upload_file(
        self,
        src: str | os.PathLike[str],
        uri: URILike,
        *,
        skip_unchanged: bool = True,
        progress: ProgressCallback | None = None,
    ) -> Transfer:
        """Upload one file. With ``skip_unchanged`` an object with the same size and SHA-256 is left alone."""
        path = Path(absolute_path(src))
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
        root = Path(absolute_path(src_dir))
        dest = parse_uri(uri)
        if not root.is_dir():
            raise ObjectNotFoundError(
                f"upload {root} failed: not a directory", operation="upload", uri=str(root)
            )
        files = self._local.list(parse_uri(root), checksums=False)
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
        progress = Progress(0, callback)
        if callback is not None:
            with self._errors.during("upload", pairs[0][0] if pairs else ""):
                progress.total = sum(src.stat().st_size for src, _ in pairs)
        batch = Batch(len(pairs), self.config.max_concurrency, progress)
        tasks: list[Callable[[], None]] = []
        for index, (src, dest) in enumerate(pairs):
            if dest.is_s3:
                tasks.append(
                    functools.partial(self._uploads.start, batch, index, src, dest, skip_unchanged, existing)
                )
            else:
                tasks.append(functools.partial(self._copy, batch, index, parse_uri(src), dest.path, "upload"))
        return batch.run(tasks)

    # ------------------------------------------------------------------ deletion

    def abort_multipart_uploads(self, uri: URILike) -> int:
        """Abort unfinished multipart uploads under ``uri`` (left behind when an upload failed while the
        server was unreachable). They are never visible as objects but hold storage until aborted or
        expired by a bucket lifecycle rule (``AbortIncompleteMultipartUpload``)."""
        loc = parse_uri(uri)
        return self._backend(loc).abort_multipart_uploads(loc)

    def delete(self, uri: URILike) -> None:
        """Delete one object or local file; a missing one is not an error."""
        loc = parse_uri(uri)
        self._backend(loc).delete(loc)

    def delete_prefix(self, uri: URILike) -> int:
        """Delete everything under ``uri`` taken as a directory; returns how many objects went."""
        loc = parse_uri(uri)
        return self._backend(loc).delete_prefix(loc)
