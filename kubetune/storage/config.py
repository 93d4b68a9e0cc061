"""How to reach object storage: endpoint, retries, part sizes, checksums and credentials."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from kubetune.storage.errors import StorageError

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 64 * MiB


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
            multipart_chunksize=self.multipart_chunksize or DEFAULT_PART_SIZE,
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
            # Downloads hash what they write and compare it themselves (see s3.ask_for_checksum);
            # reads that want botocore's check ask for it with ChecksumMode.
            response_checksum_validation="when_required",
            user_agent_extra="kubetune",
        )
