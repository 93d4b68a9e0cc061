"""S3-compatible storage behind :class:`~kubetune.storage.ObjectStore`: the client and the
operations on whole objects and prefixes. Transfers of files live in ``downloads`` and ``uploads``."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import boto3
from awscrt.checksums import crc64nvme  # type: ignore[import-untyped]
from botocore.config import Config
from botocore.exceptions import ClientError

from kubetune.storage.checksums import (
    CRC64_METADATA_KEY,
    SHA256_METADATA_KEY,
    crc64_hex,
    hex_to_b64,
    recorded_crc64,
    recorded_sha256,
)
from kubetune.storage.config import StorageConfig
from kubetune.storage.errors import (
    ChecksumMismatchError,
    ErrorTranslator,
    InvalidURIError,
    ObjectNotFoundError,
    StorageError,
)
from kubetune.storage.transfer import Fetch, ObjectInfo
from kubetune.storage.uri import StorageURI

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

_DELETE_BATCH = 1000


def ask_for_checksum(request: Any, **kwargs: Any) -> None:
    """Ask for the stored checksum in every GET's response without botocore re-hashing the body:
    downloads hash what they write themselves and compare the result."""
    if "x-amz-checksum-mode" not in request.headers:
        request.headers["x-amz-checksum-mode"] = "ENABLED"


def _client_config(config: StorageConfig) -> Config:
    botocore_config = config.botocore_config()
    if not config.checksum_algorithm:
        return botocore_config
    # Every object body this store sends carries a checksum the server verifies, so the SigV4
    # payload hash (one more SHA-256 of every byte over plain http) adds nothing.
    s3: Any = {**(getattr(botocore_config, "s3", None) or {}), "payload_signing_enabled": False}
    return botocore_config.merge(Config(s3=s3))


def _prefix(uri: StorageURI) -> str:
    return uri.key if not uri.key or uri.key.endswith("/") else uri.key + "/"


class S3Backend:
    """Objects under ``s3://`` URIs, over one boto3 client (thread-safe, as boto3 clients are)."""

    def __init__(self, config: StorageConfig, errors: ErrorTranslator) -> None:
        self.config = config
        self.errors = errors
        creds = config.credentials
        session = boto3.session.Session(
            aws_access_key_id=creds.access_key_id.get_secret_value() if creds else None,
            aws_secret_access_key=creds.secret_access_key.get_secret_value() if creds else None,
            aws_session_token=creds.session_token.get_secret_value()
            if creds and creds.session_token
            else None,
            region_name=config.region,
        )
        self.client: S3Client = session.client(
            "s3",
            endpoint_url=config.endpoint,
            verify=config.verify_tls,
            config=_client_config(config),
        )
        self.client.meta.events.register("before-sign.s3.GetObject", ask_for_checksum)

    def close(self) -> None:
        self.client.close()

    def head(self, uri: StorageURI, operation: str = "stat") -> dict[str, Any]:
        with self.errors.during(operation, uri):
            return dict(self.client.head_object(Bucket=uri.bucket, Key=uri.key, ChecksumMode="ENABLED"))

    def learn(self, fetch: Fetch) -> None:
        """What a download needs to know of its object before the first GET: one HEAD."""
        head = self.head(fetch.src, "download")
        fetch.size, fetch.etag = int(head["ContentLength"]), head.get("ETag")
        fetch.sha256, fetch.crc64nvme = recorded_sha256(head), recorded_crc64(head)

    def stat(self, loc: StorageURI) -> ObjectInfo:
        head = self.head(loc)
        return ObjectInfo(
            uri=loc,
            name=loc.name,
            size=int(head["ContentLength"]),
            etag=head.get("ETag"),
            sha256=recorded_sha256(head),
            last_modified=head.get("LastModified"),
            crc64nvme=recorded_crc64(head),
        )

    def exists(self, loc: StorageURI) -> bool:
        if loc.key and not loc.key.endswith("/"):
            try:
                self.head(loc, "exists")
                return True
            except ObjectNotFoundError:
                pass
        with self.errors.during("exists", loc):
            try:
                resp = self.client.list_objects_v2(Bucket=loc.bucket, Prefix=_prefix(loc), MaxKeys=1)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                    return False
                raise
        return bool(resp.get("KeyCount") or resp.get("Contents"))

    def list(self, loc: StorageURI, *, checksums: bool) -> list[ObjectInfo]:
        prefix = _prefix(loc)
        infos: list[ObjectInfo] = []
        with self.errors.during("list", loc):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=loc.bucket, Prefix=prefix
            ):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if key.endswith("/"):
                        continue  # a "directory" marker written by consoles and some tools
                    obj_uri = StorageURI("s3", loc.bucket, key)
                    head = self.head(obj_uri, "list") if checksums else {}
                    infos.append(
                        ObjectInfo(
                            obj_uri,
                            key[len(prefix) :],
                            int(obj["Size"]),
                            obj.get("ETag"),
                            recorded_sha256(head),
                            obj.get("LastModified"),
                            recorded_crc64(head),
                        )
                    )
        return sorted(infos, key=lambda i: i.name)

    def read_bytes(self, loc: StorageURI) -> bytes:
        with self.errors.during("read", loc):
            resp = self.client.get_object(Bucket=loc.bucket, Key=loc.key, ChecksumMode="ENABLED")
            data = resp["Body"].read()
        expected = recorded_sha256(resp)
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise ChecksumMismatchError(
                f"read {loc} failed: content does not match its recorded SHA-256 {expected}",
                operation="read",
                uri=str(loc),
            )
        return data

    def write_bytes(self, loc: StorageURI, data: bytes, sha256: str, content_type: str | None) -> ObjectInfo:
        with self.errors.during("write", loc):
            crc = crc64_hex(crc64nvme(data))
            resp = self.client.put_object(
                Bucket=loc.bucket,
                Key=loc.key,
                Body=data,
                **self.upload_args(sha256, crc, single_part=True, content_type=content_type),
            )
        return ObjectInfo(loc, loc.name, len(data), resp.get("ETag"), sha256, crc64nvme=crc)

    def upload_args(
        self, sha256: str, crc64: str, *, single_part: bool, content_type: str | None = None
    ) -> dict[str, Any]:
        """The metadata and flexible checksum of a PUT or of a multipart upload's creation."""
        args: dict[str, Any] = {"Metadata": {SHA256_METADATA_KEY: sha256, CRC64_METADATA_KEY: crc64}}
        if content_type:
            args["ContentType"] = content_type
        algorithm = self.config.checksum_algorithm
        # The server checks the body against the checksum taken from the file itself.
        if algorithm == "CRC64NVME" and single_part:
            args["ChecksumCRC64NVME"] = hex_to_b64(crc64)
        elif algorithm == "CRC64NVME":
            args["ChecksumAlgorithm"] = algorithm
            args["ChecksumType"] = "FULL_OBJECT"  # stored for the whole object, as for a single PUT
        elif algorithm == "SHA256" and single_part:
            args["ChecksumSHA256"] = hex_to_b64(sha256)
        elif algorithm:
            args["ChecksumAlgorithm"] = algorithm
        return args

    def delete(self, loc: StorageURI) -> None:
        with self.errors.during("delete", loc):
            self.client.delete_object(Bucket=loc.bucket, Key=loc.key)

    def delete_prefix(self, loc: StorageURI) -> int:
        if not loc.key:
            raise InvalidURIError(
                f"refusing to delete a whole bucket: {loc}", operation="delete", uri=str(loc)
            )
        keys = [obj.uri.key for obj in self.list(loc, checksums=False)]
        with self.errors.during("delete", loc):
            for start in range(0, len(keys), _DELETE_BATCH):
                batch = keys[start : start + _DELETE_BATCH]
                resp = self.client.delete_objects(
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

    def abort_multipart_uploads(self, loc: StorageURI) -> int:
        aborted = 0
        with self.errors.during("abort uploads", loc):
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.key):
                for upload in page.get("Uploads", []):
                    self.client.abort_multipart_upload(
                        Bucket=loc.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    aborted += 1
        return aborted
