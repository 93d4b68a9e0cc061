"""What the test control plane runs: the command line of each component (etcd,
kube-apiserver, kube-controller-manager, kube-scheduler, kwok), and the fake nodes kwok
keeps alive."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .pki import ClusterPki, Credential

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
APISERVER_HOSTS = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "127.0.0.1",
    "::1",
    "10.0.0.1",
)
"""What the API server's serving certificate is valid for: loopback, and the names and the
first address (of :data:`SERVICE_CLUSTER_IP_RANGE`) of the ``kubernetes`` Service."""


@dataclass(frozen=True)
class FakeNode:
    """A node without a kubelet, kept alive by kwok. ``gpus`` become ``nvidia.com/gpu``
    capacity; ``taints`` are Kubernetes taint objects, e.g.
    ``{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}``."""

    ANNOTATION: ClassVar[str] = "kwok.x-k8s.io/node"

    name: str
    cpu: str = "32"
    memory: str = "256Gi"
    ephemeral_storage: str = "1Ti"
    gpus: int = 0
    pods: int = 110
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: Sequence[Mapping[str, str]] = ()

    def manifest(self) -> dict[str, Any]:
        resources = {
            "cpu": self.cpu,
            "memory": self.memory,
            "ephemeral-storage": self.ephemeral_storage,
            "pods": str(self.pods),
        }
        if self.gpus:
            resources["nvidia.com/gpu"] = str(self.gpus)
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "annotations": {self.ANNOTATION: "fake"},
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    **self.labels,
                },
            },
            "spec": {"taints": [dict(taint) for taint in self.taints]},
            "status": {"allocatable": resources, "capacity": resources},
        }


def etcd_command(binary: Path, data_dir: Path, client_url: str, peer_port: int) -> list[str]:
    return [
        str(binary),
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
        f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
        # Test data is thrown away; fsync only costs time.
        "--unsafe-no-fsync=true",
        "--log-level=warn",
    ]


def apiserver_command(
    binary: Path,
    *,
    etcd_url: str,
    port: int,
    cert_dir: Path,
    serving: Credential,
    pki: ClusterPki,
    disabled_admission: Sequence[str],
    extra: Sequence[str],
) -> list[str]:
    return [
        str(binary),
        f"--etcd-servers={etcd_url}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={cert_dir}",
        f"--tls-cert-file={serving.cert}",
        f"--tls-private-key-file={serving.key}",
        f"--client-ca-file={pki.ca.cert}",
        f"--requestheader-client-ca-file={pki.front_proxy.credential.cert}",
        "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki.front_proxy_client.cert}",
        f"--proxy-client-key-file={pki.front_proxy_client.key}",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",
        *([f"--disable-admission-plugins={','.join(disabled_admission)}"] if disabled_admission else []),
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pki.service_account.cert}",
        f"--service-account-signing-key-file={pki.service_account.key}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--allow-privileged=true",
        # A loopback address cannot be an endpoint of the kubernetes Service;
        # nothing in-cluster needs to reach the API server through it here.
        "--endpoint-reconciler-type=none",
        "--profiling=false",
        *extra,
    ]


def _client_of_apiserver(kubeconfig: Path, port: int, serving: Credential) -> list[str]:
    """What the controller manager and the scheduler share: who they are, and how they serve."""
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--tls-cert-file={serving.cert}",
        f"--tls-private-key-file={serving.key}",
        "--leader-elect=false",
    ]


def controller_manager_command(
    binary: Path, *, kubeconfig: Path, port: int, serving: Credential, pki: ClusterPki, extra: Sequence[str]
) -> list[str]:
    return [
        str(binary),
        *_client_of_apiserver(kubeconfig, port, serving),
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki.service_account.key}",
        f"--root-ca-file={pki.ca.cert}",
        f"--cluster-signing-cert-file={pki.ca.cert}",
        f"--cluster-signing-key-file={pki.ca.key}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--controllers=*",
        "--profiling=false",
        *extra,
    ]


def scheduler_command(binary: Path, *, kubeconfig: Path, port: int, serving: Credential) -> list[str]:
    return [
        str(binary),
        *_client_of_apiserver(kubeconfig, port, serving),
        "--profiling=false",
    ]


# One kwok Stage for Pods, selected by whether the Pod is being deleted (and ``selectors``);
# ``then`` is the Stage's spec.next, indented under it.
_POD_STAGE = """\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: {name}
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: '{deletion}'
{selectors}  next:
"""


def _pod_stage(name: str, *, deletion: str, then: str, selectors: str = "") -> str:
    return _POD_STAGE.format(name=name, deletion=deletion, selectors=selectors) + then


# kwok's "fast" pod stages (sigs.k8s.io/kwok kustomize/stage/pod/fast) without pod-complete:
# any Pod stage in --config replaces all of kwok's default Pod stages.
KWOK_POD_STAGES_WITHOUT_COMPLETION = "---\n".join(
    [
        _pod_stage(
            "pod-ready",
            deletion="DoesNotExist",
            selectors="    - key: '.status.podIP'\n      operator: 'DoesNotExist'\n",
            then="""\
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Initialized
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Ready
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: ContainersReady
      {{ range .spec.readinessGates }}
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: {{ .conditionType | Quote }}
      {{ end }}
      containerStatuses:
      {{ range .spec.containers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: true
        restartCount: 0
        state:
          running:
            startedAt: {{ $now | Quote }}
      {{ end }}
      hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
      podIP: {{ PodIPWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) \
      ( or .metadata.name "" ) ( or .metadata.namespace "" ) | Quote }}
      phase: Running
      startTime: {{ $now | Quote }}
""",
        ),
        _pod_stage(
            "pod-delete", deletion="Exists", then="    finalizers:\n      empty: true\n    delete: true\n"
        ),
    ]
)


def kwok_command(binary: Path, *, kubeconfig: Path, port: int, config: Path | None = None) -> list[str]:
    return [
        str(binary),
        *([f"--config={config}"] if config else []),
        f"--kubeconfig={kubeconfig}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={FakeNode.ANNOTATION}=fake",
        f"--server-address=127.0.0.1:{port}",
        "--cidr=10.244.0.1/16",
    ]
