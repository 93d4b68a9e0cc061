"""The operator process: kopf with its health endpoint, and prometheus-client's metrics endpoint.

Run one replica (the chart uses ``replicas: 1`` and the Recreate strategy): kopf's peering,
which keeps a second replica idle, is off unless a peering name is given, and then needs
kopf's peering CRDs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import kopf
from kubernetes import config as kube_config
from kubernetes.client import ApiClient, Configuration
from prometheus_client import start_http_server

from kubetune import api

from . import handlers, planning
from .kube import Kube
from .metrics import Metrics
from .reconcile import Reconciler

logger = logging.getLogger(__name__)

Flag = asyncio.Event | threading.Event


@dataclass(frozen=True)
class Endpoints:
    host: str = "0.0.0.0"
    metrics_port: int = 8080
    health_port: int = 8081


def settings(*, peering: str | None = None, watch_timeout: int = 300) -> kopf.OperatorSettings:
    out = kopf.OperatorSettings()
    if peering:
        out.peering.name = peering
        out.peering.mandatory = True
    else:
        out.peering.standalone = True
    # Namespaces are given exactly and the CRD is installed first: no cluster-wide list/watch
    # of namespaces and CRDs is needed.
    out.scanning.disabled = True
    # Events are posted by the reconciler alone, in the same pass as the status they explain.
    out.posting.enabled = False
    out.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    out.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.GROUP, key="last-handled-configuration"
    )
    out.persistence.finalizer = f"{api.GROUP}/finalizer"
    out.watching.server_timeout = watch_timeout
    out.watching.client_timeout = watch_timeout + 30
    out.watching.connect_timeout = 30
    for selector in (("batch", "v1", "jobs"), ("", "v1", "pods")):
        out.watching.label_selectors[selector] = handlers.MANAGED_SELECTOR
    return out


async def serve(
    client: ApiClient,
    *,
    namespaces: Sequence[str] = (),
    config: planning.OperatorConfig | None = None,
    endpoints: Endpoints | None = None,
    operator_settings: kopf.OperatorSettings | None = None,
    metrics: Metrics | None = None,
    stop_flag: Flag | None = None,
    ready_flag: Flag | None = None,
) -> None:
    """Run the operator until ``stop_flag`` is set or a signal arrives (in the main thread)."""
    config = config or planning.OperatorConfig()
    endpoints = endpoints or Endpoints()
    metrics = metrics or Metrics()
    reconciler = Reconciler(Kube(client), config, metrics=metrics)
    controller = handlers.Controller(reconciler, metrics)
    memo = kopf.Memo(kubetune=handlers.HandlerContext(client.configuration, controller, metrics))
    metrics_server, _ = start_http_server(endpoints.metrics_port, endpoints.host, registry=metrics.registry)
    logger.info("serving metrics on %s:%d/metrics", endpoints.host, endpoints.metrics_port)
    try:
        await kopf.operator(
            registry=handlers.REGISTRY,
            settings=operator_settings or settings(),
            clusterwide=not namespaces,
            namespaces=list(namespaces),
            liveness_endpoint=f"http://{endpoints.host}:{endpoints.health_port}/healthz",
            memo=memo,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        await controller.close()
        await asyncio.to_thread(metrics_server.shutdown)
        metrics_server.server_close()


def api_client(kubeconfig: str | None = None) -> ApiClient:
    """In the cluster: the pod's service account; elsewhere: the kubeconfig."""
    configuration = Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        kube_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        kube_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, client_configuration=configuration
        )
    return ApiClient(configuration)


def run_operator(
    namespaces: Sequence[str],
    trainer_image: str | None = None,
    metrics_port: int = 8080,
    health_port: int = 8081,
    *,
    gpu_resource: str | None = None,
    kubeconfig: str | None = None,
    peering: str | None = None,
    log_format: str | None = None,
    allowed_images: Sequence[str] = (),
    secrets_namespaces: Sequence[str] = (),
) -> int:
    """Run the operator in this process until SIGTERM or SIGINT; the exit code."""
    fmt = (log_format or os.environ.get("KUBETUNE_LOG_FORMAT") or "full").upper()
    kopf.configure(
        log_format=kopf.LogFormat[fmt] if fmt in kopf.LogFormat.__members__ else kopf.LogFormat.FULL
    )
    config = planning.OperatorConfig(
        trainer_image=trainer_image or planning.DEFAULT_TRAINER_IMAGE,
        gpu_resource=gpu_resource or os.environ.get("KUBETUNE_GPU_RESOURCE") or planning.DEFAULT_GPU_RESOURCE,
        allowed_images=tuple(allowed_images),
        secrets_namespaces=tuple(secrets_namespaces),
    )
    try:
        client = api_client(kubeconfig)
    except Exception as error:  # a missing or broken kubeconfig: say so, no traceback
        logger.error("cannot load Kubernetes credentials: %s", error)
        return 1
    try:
        asyncio.run(
            serve(
                client,
                namespaces=namespaces,
                config=config,
                endpoints=Endpoints(metrics_port=metrics_port, health_port=health_port),
                operator_settings=settings(peering=peering or os.environ.get("KUBETUNE_PEERING")),
            )
        )
    except KeyboardInterrupt:
        pass
    except Exception:
        logger.exception("the operator stopped on an error")
        return 1
    finally:
        client.close()  # type: ignore[no-untyped-call]
    return 0
