"""The e2e node itself: the control plane, containerd, the kubelet and the Service forwarder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import yaml
from kubernetes import client as k8s

from kubetune_testkit.controlplane import ControlPlane, assets_cache_dir, free_port
from kubetune_testkit.controlplane.pki import CertificateAuthority, write_kubeconfig
from kubetune_testkit.controlplane.processes import Process, wait_until

from .config import cni_conflist, containerd_toml, kubelet_configuration
from .containerd import ctr, import_images, kill_tasks
from .host import add_network, cleanup, save_state
from .layout import (
    GATEWAY,
    NODE_NAME,
    OPERATOR_IMAGE,
    PAUSE_IMAGE,
    TRAINER_IMAGE,
    Layout,
    NodeError,
    run,
)


class Node:
    """The control plane, containerd, the kubelet and the Service forwarder, started in
    order; :meth:`stop` stops them and cleans up (see the module docstring)."""

    def __init__(self, directory: Path, images: Sequence[str] = (PAUSE_IMAGE, OPERATOR_IMAGE, TRAINER_IMAGE)):
        self.layout = Layout(directory.resolve())
        self.images = list(images)
        self.plane: ControlPlane | None = None
        self._processes: list[Process] = []

    def start(self, timeout: float = 180.0) -> None:
        layout = self.layout
        if os.geteuid() != 0:
            raise NodeError("a real node needs root (containerd, the kubelet, network namespaces)")
        kubelet = assets_cache_dir() / "kubelet"
        if not kubelet.is_file():
            raise NodeError(f"{kubelet} is missing; build it with `hack/build-test-assets kubelet`")
        cleanup(layout.dir)  # whatever an earlier run left behind
        for stale in ("containerd-state", "kubelet", "cni", "cni-ipam", "pki", "controlplane", "pod-logs"):
            shutil.rmtree(layout.dir / stale, ignore_errors=True)
        layout.dir.mkdir(parents=True, exist_ok=True)
        layout.containerd_root.mkdir(parents=True, exist_ok=True)
        save_state(layout)
        pki = layout.dir / "pki"
        pki.mkdir()

        # The API server's identity towards the kubelet, from a CA that only the kubelet trusts.
        kubelet_client_ca = CertificateAuthority.create(
            pki, "kubelet-client-ca", "kubetune-e2e-kubelet-client-ca"
        )
        apiserver_client = kubelet_client_ca.issue(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", organization="system:masters"
        )
        forward_port = free_port()
        add_network(layout, forward_port)

        self.plane = ControlPlane(
            controller_manager=True,
            scheduler=True,
            work_dir=layout.controlplane,
            startup_timeout=timeout,
            apiserver_args=[
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                f"--kubelet-client-certificate={apiserver_client.cert}",
                f"--kubelet-client-key={apiserver_client.key}",
            ],
        )
        self.plane.start()
        plane = self.plane
        api_port = plane.server.rsplit(":", 1)[1]
        self._spawn(
            "socat",
            [
                "socat",
                f"TCP-LISTEN:{forward_port},bind={GATEWAY},fork,reuseaddr",
                f"TCP:127.0.0.1:{api_port}",
            ],
        )

        (layout.dir / "cni").mkdir()
        (layout.dir / "cni" / "10-kubetune.conflist").write_text(json.dumps(cni_conflist(layout), indent=2))
        config = layout.dir / "containerd.toml"
        config.write_text(containerd_toml(layout))
        containerd = self._spawn("containerd", ["containerd", "--config", str(config)])
        wait_until(
            lambda: (
                run("ctr", "--address", str(layout.containerd_socket), "version", check=False).returncode == 0
            ),
            what="containerd",
            timeout=timeout,
            processes=[containerd],
        )
        import_images(layout, self.images)

        cluster_ca = CertificateAuthority.load(plane.work_dir / "pki", "ca")
        node = cluster_ca.issue(
            "kubelet", f"system:node:{NODE_NAME}", organization="system:nodes", directory=pki
        )
        kubelet_client_ca.issue(
            "kubelet-serving", NODE_NAME, organization="system:nodes", hosts=(GATEWAY, NODE_NAME)
        )
        kubeconfig = layout.dir / "kubelet.kubeconfig"
        write_kubeconfig(kubeconfig, plane.server, plane.ca_cert_path, f"system:node:{NODE_NAME}", node)
        kubelet_config = layout.dir / "kubelet.yaml"
        kubelet_config.write_text(
            yaml.safe_dump(
                kubelet_configuration(layout, kubelet_client_ca.credential.cert, free_port(), free_port()),
                sort_keys=False,
            )
        )
        kubelet_process = self._spawn(
            "kubelet",
            [
                str(kubelet),
                f"--config={kubelet_config}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={layout.kubelet_root}",
                f"--cert-dir={pki}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={GATEWAY}",
                "--v=1",
            ],
        )
        with plane.admin_api_client() as api:
            core = k8s.CoreV1Api(api)

            def ready() -> bool:
                try:
                    status = core.read_node(NODE_NAME).status
                except k8s.ApiException:
                    return False
                conditions = (status.conditions if status else None) or []
                return any(c.type == "Ready" and c.status == "True" for c in conditions)

            wait_until(
                ready,
                what=f"node {NODE_NAME} to be Ready",
                timeout=timeout,
                processes=[containerd, kubelet_process, *self._processes],
                interval=0.5,
            )

    def _spawn(self, name: str, argv: Sequence[str]) -> Process:
        process = Process(name, argv, self.layout.dir / f"{name}.log")
        self._processes.append(process)
        process.start()
        return process

    def exited_processes(self) -> list[str]:
        plane = self.plane.exited_processes() if self.plane else []
        return plane + [process.name for process in self._processes if not process.running()]

    def logs(self) -> dict[str, Path]:
        logs = {process.name: process.log_path for process in self._processes}
        return (self.plane.process_logs() if self.plane else {}) | logs

    def stop(self) -> None:
        """Delete every pod (so the kubelet tears their sandboxes down), stop everything, clean up."""
        kubelet = next((p for p in self._processes if p.name == "kubelet"), None)
        if self.plane is not None and self.plane.started and kubelet is not None and kubelet.running():
            with contextlib.suppress(Exception), self.plane.admin_api_client() as api:
                core = k8s.CoreV1Api(api)
                for pod in core.list_pod_for_all_namespaces().items:
                    meta = pod.metadata
                    if meta is not None and meta.name and meta.namespace:
                        core.delete_namespaced_pod(meta.name, meta.namespace, grace_period_seconds=0)
                deadline = time.monotonic() + 30
                while (
                    time.monotonic() < deadline and ctr(self.layout, "tasks", "ls", "-q", check=False).strip()
                ):
                    time.sleep(0.5)
        for process in reversed(self._processes):
            if process.name == "containerd":
                kill_tasks(self.layout)
            with contextlib.suppress(Exception):
                process.stop()
        self._processes.clear()
        if self.plane is not None:
            with contextlib.suppress(Exception):
                self.plane.stop()
        cleanup(self.layout.dir)
