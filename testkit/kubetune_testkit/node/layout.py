"""The e2e node's names, addresses and paths (:class:`Layout`), and running the host's tools."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kubetune_testkit.controlplane import ControlPlaneError

NODE_NAME = "kubetune-e2e"
BRIDGE = "kubetune0"
POD_SUBNET = ipaddress.ip_network("10.244.0.0/24")
GATEWAY = "10.244.0.1"
"""The host as pods see it: the bridge's address. Servers pods must reach listen here."""
SERVICE_IP = "10.0.0.1"
"""The ClusterIP of the ``kubernetes`` Service (first address of the service range)."""
RULE_COMMENT = "kubetune-e2e"

TRAINER_IMAGE = "localhost/kubetune-trainer:dev"
OPERATOR_IMAGE = "localhost/kubetune-operator:dev"
PAUSE_IMAGE = "localhost/kubetune-pause:3.10"
IMAGE_ID_LABEL = "io.kubetune.image-id"

CNI_BIN_DIR = Path("/usr/lib/cni")
SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
"""What the kubelet sets at start (protectKernelDefaults is off)."""
FIXED_PATHS = (
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/var/lib/cni",
    "/run/containerd",
    "/run/netns",
    "/var/run/netns",
    "/opt/cni",
    "/etc/cni",
)
"""Where the kubelet, containerd and the CNI plugins write whatever their configuration says."""


class NodeError(ControlPlaneError):
    """The node could not be set up, started or cleaned up."""


def node_cache_dir() -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "kubetune" / "node"


@dataclass(frozen=True)
class Layout:
    """Every path of one node, under its state directory ``dir`` (fresh on every start) and
    the persistent containerd root in the cache."""

    dir: Path

    @property
    def containerd_root(self) -> Path:
        return node_cache_dir() / "containerd"

    @property
    def containerd_state(self) -> Path:
        return self.dir / "containerd-state"

    @property
    def containerd_socket(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def kubelet_root(self) -> Path:
        return self.dir / "kubelet"

    @property
    def controlplane(self) -> Path:
        return self.dir / "controlplane"

    @property
    def saved(self) -> Path:
        """What cleanup needs: saved sysctls, the fixed paths that existed before."""
        return self.dir / "saved.json"

    @property
    def kubeconfig(self) -> Path:
        return self.controlplane / "kubeconfig"


def run(*argv: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as error:
        raise NodeError(f"{argv[0]} is not installed (hack/e2e-cluster installs it with apt-get)") from error
    if check and result.returncode != 0:
        raise NodeError(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def log(message: str) -> None:
    print(f"e2e-node: {message}", file=sys.stderr, flush=True)
