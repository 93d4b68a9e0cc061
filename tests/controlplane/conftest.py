"""What the control plane tests share: the API groups of the test control plane's admin client,
and whether a Job is complete."""

from __future__ import annotations

import pytest
from kubernetes import client as k8s


@pytest.fixture
def core(control_plane_api_client: k8s.ApiClient) -> k8s.CoreV1Api:
    return k8s.CoreV1Api(control_plane_api_client)


@pytest.fixture
def batch(control_plane_api_client: k8s.ApiClient) -> k8s.BatchV1Api:
    return k8s.BatchV1Api(control_plane_api_client)


def job_complete(batch: k8s.BatchV1Api, name: str, namespace: str = "default") -> bool:
    """Whether the Job has the condition Complete."""
    status = batch.read_namespaced_job_status(name, namespace).status
    conditions = (status.conditions if status else None) or []
    return any(c.type == "Complete" and c.status == "True" for c in conditions)
