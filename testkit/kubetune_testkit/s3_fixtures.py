"""pytest fixtures for a real S3-compatible server on loopback (see :mod:`kubetune_testkit.s3`).

Enable with ``pytest_plugins = ["kubetune_testkit.s3_fixtures"]`` or ``-p kubetune_testkit.s3_fixtures``.

- ``s3_server``: one :class:`~kubetune_testkit.s3.S3Server` for the whole session, started on
  first use; a test may stop and start it (it is started again for the next test).
- ``s3_bucket``: the name of a fresh, empty bucket on it, deleted with its content afterwards.
- ``s3_client``: a plain boto3 client for the server, to act behind the back of the code under test.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from kubetune_testkit.s3 import S3Server

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    s3_server.start()
    name = s3_server.create_bucket()
    yield name
    s3_server.start()
    s3_server.delete_bucket(name)


@pytest.fixture
def s3_client(s3_server: S3Server) -> Iterator[S3Client]:
    client = s3_server.client()
    yield client
    client.close()
