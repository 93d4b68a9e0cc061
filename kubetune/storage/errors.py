"""Storage errors, and the translation of what boto3, s3transfer and the OS raise into them.

A :class:`StorageError` names the operation and the URI, never a credential: every message is
redacted of the secrets this process knows before it is raised.
"""

from __future__ import annotations

import contextlib
import http.client
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, NoReturn

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    FlexibleChecksumError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from s3transfer.exceptions import RetriesExceededError, TransferNotDoneError

if TYPE_CHECKING:
    from kubetune.storage.config import StorageCredentials


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


class StreamCutError(ConnectionError):
    """The server closed the connection before the whole body came."""


# A body cut off mid-stream, after botocore's retries of the request itself.
STREAM_ERRORS = (
    ResponseStreamingError,
    ReadTimeoutError,
    IncompleteReadError,
    ConnectionError,
    TimeoutError,
    http.client.IncompleteRead,
)
# Everything boto3 and s3transfer raise for a failed request or transfer; all become StorageError.
TRANSFER_ERRORS = (ClientError, BotoCoreError, OSError, TransferNotDoneError, RetriesExceededError)

_SECRET_ENVIRONMENT = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


class ErrorTranslator:
    """Turns the exceptions of one store's operations into :class:`StorageError` s, with the store's
    explicit credentials and the ones in the environment masked in every message."""

    def __init__(self, credentials: StorageCredentials | None) -> None:
        self._credentials = credentials

    def _secret_values(self) -> list[str]:
        values = self._credentials.secret_values() if self._credentials else []
        for name in _SECRET_ENVIRONMENT:
            if value := os.environ.get(name):
                values.append(value)
        return values

    def redact(self, text: str) -> str:
        for value in self._secret_values():
            if len(value) >= 4:
                text = text.replace(value, "***")
        return text

    def raise_from(self, operation: str, uri: object, exc: BaseException) -> NoReturn:
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
        elif isinstance(exc, TRANSFER_ERRORS):
            reason = str(exc) or type(exc).__name__
        else:
            reason = f"{type(exc).__name__}: {exc}"
        message = self.redact(f"{operation} {uri} failed: {reason}")
        raise cls(message, operation=operation, uri=str(uri), code=code) from exc

    @contextlib.contextmanager
    def during(self, operation: str, uri: object) -> Iterator[None]:
        """Translate what the block raises; a :class:`StorageError` passes through as it is."""
        try:
            yield
        except StorageError:
            raise
        except TRANSFER_ERRORS as exc:
            self.raise_from(operation, uri, exc)
