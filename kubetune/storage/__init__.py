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

from kubetune.storage.checksums import (
    CRC64_METADATA_KEY,
    SHA256_METADATA_KEY,
    crc64_file,
    crc64_hex,
    file_digests,
    sha256_file,
)
from kubetune.storage.config import MiB, StorageConfig, StorageCredentials
from kubetune.storage.errors import ChecksumMismatchError, InvalidURIError, ObjectNotFoundError, StorageError
from kubetune.storage.local import PARTIAL_SUFFIX
from kubetune.storage.store import ObjectStore
from kubetune.storage.transfer import ObjectInfo, ProgressCallback, Transfer
from kubetune.storage.uri import StorageURI, URILike, is_s3_uri, join_uri, parse_uri

__all__ = [
    "CRC64_METADATA_KEY",
    "PARTIAL_SUFFIX",
    "SHA256_METADATA_KEY",
    "ChecksumMismatchError",
    "InvalidURIError",
    "MiB",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectStore",
    "ProgressCallback",
    "StorageConfig",
    "StorageCredentials",
    "StorageError",
    "StorageURI",
    "Transfer",
    "URILike",
    "crc64_file",
    "crc64_hex",
    "file_digests",
    "is_s3_uri",
    "join_uri",
    "parse_uri",
    "sha256_file",
]
