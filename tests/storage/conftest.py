"""Fixtures for the storage tests. The server itself comes from ``kubetune_testkit.s3_fixtures``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kubetune.storage import ObjectStore
from kubetune_testkit.s3 import RequestRecorder, S3Server


@pytest.fixture
def store(s3_server: S3Server) -> Iterator[ObjectStore]:
    with ObjectStore(s3_server.storage_config()) as s:
        yield s


@pytest.fixture
def recorder(store: ObjectStore) -> RequestRecorder:
    return RequestRecorder(store.client)
