"""Running the operator in-process against a test control plane, and standing in for a kubelet.

``OperatorRunner`` runs the real operator (kopf, metrics and health endpoints) in a thread
with its own event loop. The ``set_pod_*`` helpers write pod status the way a kubelet
would, so the real Job controller reacts to it (no kubelet runs in the test control plane).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TypeVar

from kubernetes.client import ApiClient

from kubetune import crd
from kubetune.operator import main, planning, rbac
from kubetune.operator.kube import Kube
from kubetune.operator.metrics import Metrics
from kubetune_testkit.controlplane import ControlPlane, free_port, install_crds, wait_until

T = TypeVar("T")


def wait_for(fetch: Callable[[], T | None], *, timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``fetch`` every 0.1 s until it returns something truthy, and return that."""
    return wait_until(fetch, timeout=timeout, interval=0.1, what=what)


def install_crd(client: ApiClient, timeout: float = 30.0, body: dict[str, Any] | None = None) -> None:
    """Create or update the FineTuneJob CRD (by default the generated one) and wait until it is served."""
    install_crds(client, body or crd.custom_resource_definition(), timeout=timeout)


def operator_identity(control_plane: ControlPlane, kube: Kube, ns: str) -> str:
    """A ServiceAccount ``operator`` bound to exactly rbac.OPERATOR_RULES in ``ns``; its token."""
    role = f"kubetune-operator-{ns}"
    kube.create(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "operator", "namespace": ns}}
    )
    kube.request(
        "POST",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        body={
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": role},
            "rules": rbac.OPERATOR_RULES,
        },
    )
    kube.create(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "kubetune-operator", "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": ns}],
        }
    )
    return control_plane.service_account_token("operator", ns)


def quick_settings() -> Any:
    """kopf settings for tests: shorter timeouts, so that a stop is quick."""
    settings = main.settings(watch_timeout=30)
    settings.watching.connect_timeout = 5
    settings.queueing.exit_timeout = 0.5
    settings.posting.idle_timeout = 0.5
    settings.background.instant_exit_timeout = 0.1
    return settings


class OperatorRunner:
    """The operator in a background thread: ``with OperatorRunner(client, [ns]) as op: ...``."""

    def __init__(
        self,
        client: ApiClient,
        namespaces: Sequence[str] = (),
        *,
        config: planning.OperatorConfig | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.client = client
        self.namespaces = list(namespaces)
        self.config = config or planning.OperatorConfig(trainer_image="registry.test/kubetune-trainer:test")
        self.endpoints = main.Endpoints(host="127.0.0.1", metrics_port=free_port(), health_port=free_port())
        self.metrics = Metrics()
        self.startup_timeout = startup_timeout
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://{self.endpoints.host}:{self.endpoints.metrics_port}/metrics"

    @property
    def health_url(self) -> str:
        return f"http://{self.endpoints.host}:{self.endpoints.health_port}/healthz"

    def _run(self) -> None:
        try:
            asyncio.run(
                main.serve(
                    self.client,
                    namespaces=self.namespaces,
                    config=self.config,
                    endpoints=self.endpoints,
                    operator_settings=quick_settings(),
                    metrics=self.metrics,
                    stop_flag=self._stop,
                    ready_flag=self._ready,
                )
            )
        except BaseException as error:
            self._error = error
        finally:
            self._ready.set()

    def start(self) -> OperatorRunner:
        self._thread = threading.Thread(target=self._run, name="kubetune-operator", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.startup_timeout):
            raise TimeoutError("the operator did not start")
        if self._error is not None:
            raise RuntimeError("the operator failed to start") from self._error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError("the operator did not stop")
        if self._error is not None:
            raise RuntimeError("the operator failed") from self._error

    def __enter__(self) -> OperatorRunner:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _patch_pod_status(client: ApiClient, pod: Mapping[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    meta = pod["metadata"]
    return Kube(client).patch(
        "Pod", meta["namespace"], meta["name"], {"status": status}, subresource="status"
    )


def _container(pod: Mapping[str, Any], state: dict[str, Any], *, ready: bool) -> dict[str, Any]:
    container = pod["spec"]["containers"][0]
    return {
        "name": container["name"],
        "image": container["image"],
        "imageID": "",
        "ready": ready,
        "restartCount": 0,
        "started": ready,
        "state": state,
    }


def set_pod_running(client: ApiClient, pod: Mapping[str, Any]) -> dict[str, Any]:
    now = _now()
    return _patch_pod_status(
        client,
        pod,
        {
            "phase": "Running",
            "startTime": now,
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
            "containerStatuses": [_container(pod, {"running": {"startedAt": now}}, ready=True)],
        },
    )


def set_pod_finished(
    client: ApiClient,
    pod: Mapping[str, Any],
    exit_code: int,
    *,
    reason: str | None = None,
    message: str = "",
    conditions: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    now = _now()
    terminated = {
        "exitCode": exit_code,
        "reason": reason or ("Completed" if exit_code == 0 else "Error"),
        "message": message,
        "startedAt": now,
        "finishedAt": now,
    }
    return _patch_pod_status(
        client,
        pod,
        {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "conditions": [
                {"type": "Ready", "status": "False", "lastTransitionTime": now},
                *({"lastTransitionTime": now, **c} for c in conditions),
            ],
            "containerStatuses": [_container(pod, {"terminated": terminated}, ready=False)],
        },
    )


def set_pod_waiting(client: ApiClient, pod: Mapping[str, Any], reason: str, message: str) -> dict[str, Any]:
    return _patch_pod_status(
        client,
        pod,
        {
            "phase": "Pending",
            "containerStatuses": [
                _container(pod, {"waiting": {"reason": reason, "message": message}}, ready=False)
            ],
        },
    )
