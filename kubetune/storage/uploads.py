"""Uploads to S3: files in parallel, one PUT each below the multipart threshold and a multipart
upload in parallel parts above it; every body carries a checksum the server verifies."""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import logging
import os
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from awscrt.checksums import crc64nvme  # type: ignore[import-untyped]

from kubetune.storage.checksums import crc64_hex, file_digests, hex_to_b64, recorded_sha256
from kubetune.storage.config import DEFAULT_PART_SIZE
from kubetune.storage.errors import TRANSFER_ERRORS, ObjectNotFoundError
from kubetune.storage.s3 import S3Backend
from kubetune.storage.transfer import Batch, Transfer, part_ranges, pread_exact
from kubetune.storage.uri import StorageURI, parse_uri

log = logging.getLogger(__name__)

_PART_CHECKSUMS = ("ChecksumCRC64NVME", "ChecksumSHA256", "ChecksumSHA1", "ChecksumCRC32", "ChecksumCRC32C")


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


def _part_checksum(algorithm: str | None, data: bytes) -> dict[str, Any]:
    """The flexible checksum of one part, computed here: botocore then reads the body only to send it."""
    if algorithm == "CRC64NVME":
        return {"ChecksumCRC64NVME": hex_to_b64(crc64_hex(crc64nvme(data)))}
    if algorithm == "SHA256":
        return {"ChecksumSHA256": base64.b64encode(hashlib.sha256(data).digest()).decode()}
    if algorithm == "SHA1":
        return {"ChecksumSHA1": base64.b64encode(hashlib.sha1(data).digest()).decode()}
    if algorithm == "CRC32":
        return {"ChecksumCRC32": base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()}
    if algorithm:
        return {"ChecksumAlgorithm": algorithm}
    return {}


class S3Uploads:
    """Uploads of local files to S3 objects, on a :class:`~kubetune.storage.transfer.Batch`."""

    def __init__(self, s3: S3Backend) -> None:
        self._s3 = s3
        self._config = s3.config
        self._errors = s3.errors

    def start(
        self,
        batch: Batch,
        index: int,
        src: Path,
        dest: StorageURI,
        skip_unchanged: bool,
        existing: Mapping[str, int] | None,
    ) -> None:
        """Upload one file: in one PUT, or its first part here and the others as tasks of ``batch``.
        ``existing`` (sizes by key, from a listing) spares the HEAD of objects that cannot match."""
        with self._errors.during("upload", src):
            size = src.stat().st_size
            single = size < self._config.multipart_threshold
            data = src.read_bytes() if single else None
            if data is not None:
                sha, crc = hashlib.sha256(data).hexdigest(), crc64_hex(crc64nvme(data))
            else:
                sha, crc = file_digests(src)
        may_exist = existing is None or existing.get(dest.key) == size
        if skip_unchanged and may_exist and self._remote_matches(dest, size, sha):
            log.debug("upload %s: %s is up to date", src, dest)
            batch.results[index] = Transfer(parse_uri(src), dest, size, sha, skipped=True, crc64nvme=crc)
            batch.progress.add(size)
            return
        args = self._s3.upload_args(sha, crc, single_part=single)
        client = self._s3.client
        with self._errors.during("upload", dest):
            if data is not None:
                client.put_object(Bucket=dest.bucket, Key=dest.key, Body=data, **args)
                batch.progress.add(size)
                log.info("uploaded %s -> %s (%d bytes)", src, dest, size)
                batch.results[index] = Transfer(parse_uri(src), dest, size, sha, skipped=False, crc64nvme=crc)
                return
            chunk = self._config.multipart_chunksize or DEFAULT_PART_SIZE
            ranges = part_ranges(size, self._config.multipart_threshold, chunk)
            fd = os.open(src, os.O_RDONLY)
            try:
                created = client.create_multipart_upload(Bucket=dest.bucket, Key=dest.key, **args)
            except BaseException:
                os.close(fd)
                raise
        state = _FileUpload(src, dest, size, sha, crc, fd, created["UploadId"], parts_left=len(ranges))
        batch.on_failure(functools.partial(self._abandon, state))
        for number, (start, end) in enumerate(ranges[1:], start=2):
            batch.group.submit(functools.partial(self._part, batch, index, state, number, start, end))
        self._part(batch, index, state, 1, *ranges[0])

    def _part(self, batch: Batch, index: int, state: _FileUpload, number: int, start: int, end: int) -> None:
        dest = state.dest
        client = self._s3.client
        with self._errors.during("upload", dest):
            data = pread_exact(state.fd, end - start, start)
            checksum = _part_checksum(self._config.checksum_algorithm, data)
            resp = client.upload_part(
                Bucket=dest.bucket,
                Key=dest.key,
                UploadId=state.upload_id,
                PartNumber=number,
                Body=data,
                **checksum,
            )
            del data
            part: dict[str, Any] = {"PartNumber": number, "ETag": resp["ETag"]}
            for name in _PART_CHECKSUMS:
                if value := resp.get(name) or checksum.get(name):
                    part[name] = value
            batch.progress.add(end - start)
            with state.lock:
                state.parts[number] = part
                state.parts_left -= 1
                last = state.parts_left == 0
            if not last:
                return
            state.close()
            whole: dict[str, Any] = {}
            if self._config.checksum_algorithm == "CRC64NVME":
                whole = {
                    "ChecksumCRC64NVME": hex_to_b64(state.crc64nvme),
                    "ChecksumType": "FULL_OBJECT",
                }
            client.complete_multipart_upload(
                Bucket=dest.bucket,
                Key=dest.key,
                UploadId=state.upload_id,
                MultipartUpload={"Parts": [state.parts[n] for n in sorted(state.parts)]},  # type: ignore[misc]
                **whole,
            )
            state.completed = True
        log.info("uploaded %s -> %s (%d bytes)", state.src, dest, state.size)
        batch.results[index] = Transfer(
            parse_uri(state.src), dest, state.size, state.sha256, skipped=False, crc64nvme=state.crc64nvme
        )

    def _abandon(self, state: _FileUpload) -> None:
        """Best effort: an upload that cannot be aborted now is left to ``abort_multipart_uploads``
        or the bucket's lifecycle rule; it is never visible as an object."""
        with contextlib.suppress(OSError):
            state.close()
        if state.completed:
            return
        try:
            self._s3.client.abort_multipart_upload(
                Bucket=state.dest.bucket, Key=state.dest.key, UploadId=state.upload_id
            )
        except TRANSFER_ERRORS as exc:
            log.warning(
                "upload %s: could not abort the unfinished multipart upload: %s",
                state.dest,
                self._errors.redact(str(exc)),
            )

    def _remote_matches(self, dest: StorageURI, size: int, sha: str) -> bool:
        try:
            head = self._s3.head(dest, "upload")
        except ObjectNotFoundError:
            return False
        return int(head["ContentLength"]) == size and recorded_sha256(head) == sha
