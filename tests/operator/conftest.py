"""Fixtures of the operator tests that run against the test control plane.

A test module may define a fixture of the same name to stand in for one of these (test_kueue.py
brings its own cluster). ``operator_config`` is the one to override for another OperatorConfig.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes.client import ApiClient

from kubetune.operator.kube import Kube
from kubetune.operator.planning import OperatorConfig
from kubetune_testkit.operator_runner import OperatorRunner, install_crd


@pytest.fixture(scope="module")
def crd_installed(control_plane_api_client: ApiClient) -> None:
    install_crd(control_plane_api_client)


@pytest.fixture
def ns(control_plane_namespace: str, crd_installed: None) -> str:
    return control_plane_namespace


@pytest.fixture
def kube(control_plane_api_client: ApiClient) -> Kube:
    return Kube(control_plane_api_client)


@pytest.fixture
def operator_config() -> OperatorConfig | None:
    """None: OperatorRunner's own (the trainer image registry.test/kubetune-trainer:test)."""
    return None


@pytest.fixture
def operator(
    control_plane_api_client: ApiClient, ns: str, operator_config: OperatorConfig | None
) -> Iterator[OperatorRunner]:
    with OperatorRunner(control_plane_api_client, [ns], config=operator_config) as runner:
        yield runner
