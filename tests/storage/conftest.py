"""Fixtures for the storage tests. The server itself comes from ``kubetune.testing.s3_fixtures``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kubetune.storage import ObjectStore
from kubetune.testing.s3 import S3Server


class RequestRecorder:
    """Every HTTP attempt the client makes (retries included), via botocore's ``before-send`` event."""

    def __init__(self, store: ObjectStore) -> None:
        self.sent: list[tuple[str, float]] = []
        self._lock = threading.Lock()
        store.client.meta.events.register("before-send.s3", self._on_send)

    def _on_send(self, event_name: str, **kwargs: Any) -> None:
        with self._lock:
            self.sent.append((event_name.rsplit(".", 1)[-1], time.monotonic()))

    def count(self, operation: str) -> int:
        with self._lock:
            return sum(1 for op, _ in self.sent if op == operation)


@pytest.fixture
def store(s3_server: S3Server) -> Iterator[ObjectStore]:
    with ObjectStore(s3_server.storage_config()) as s:
        yield s


@pytest.fixture
def recorder(store: ObjectStore) -> RequestRecorder:
    return RequestRecorder(store)
