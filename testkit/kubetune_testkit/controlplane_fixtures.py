"""pytest plugin: a session-wide real control plane (etcd, kube-apiserver,
kube-controller-manager). Load it with ``pytest_plugins =
["kubetune_testkit.controlplane_fixtures"]`` or ``-p kubetune_testkit.controlplane_fixtures``.

The CRDs in ``<rootdir>/crds/`` are installed before the controller manager starts, so
its garbage collector follows their objects at once. No scheduler or kubelet runs: Pods
that the Job controller creates stay Pending until a test sets their status, as a kubelet
would.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client as k8s

from kubetune_testkit.controlplane import ControlPlane, wait_until


@pytest.fixture(scope="session")
def control_plane(pytestconfig: pytest.Config) -> Iterator[ControlPlane]:
    """The running control plane, shared by the whole test session."""
    crds = pytestconfig.rootpath / "crds"
    with ControlPlane(controller_manager=True, crds=[crds] if crds.is_dir() else []) as plane:
        yield plane


@pytest.fixture(scope="session")
def control_plane_api_client(control_plane: ControlPlane) -> Iterator[k8s.ApiClient]:
    """A ``kubernetes.client.ApiClient`` for an admin of the control plane."""
    with control_plane.admin_api_client() as api:
        yield api


@pytest.fixture
def control_plane_namespace(control_plane_api_client: k8s.ApiClient) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards. Returned once
    its default ServiceAccount exists, so Pods can be created in it right away."""
    core = k8s.CoreV1Api(control_plane_api_client)
    name = f"test-{uuid.uuid4().hex[:10]}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))

    def has_default_service_account() -> bool:
        return bool(core.list_namespaced_service_account(name, field_selector="metadata.name=default").items)

    wait_until(has_default_service_account, timeout=30, what=f"ServiceAccount {name}/default")
    yield name
    try:
        core.delete_namespace(name)
    except k8s.ApiException as error:
        if error.status != 404:
            raise
