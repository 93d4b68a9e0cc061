"""A real Kubernetes control plane on loopback: etcd, kube-apiserver and, optionally,
kube-controller-manager, plus kube-scheduler and kwok for fake nodes, and Kueue, started from
local binaries the way envtest does it.

Binaries come from ``TEST_ASSET_*`` variables, ``$KUBEBUILDER_ASSETS``, the project cache, or
``hack/build-test-assets`` (see :mod:`.assets`).

Command line (used by ``hack/dev-cluster``)::

    python -m kubetune_testkit.controlplane assets            # print binaries, build if missing
    python -m kubetune_testkit.controlplane serve --dir DIR   # run until SIGTERM

The parts: :mod:`.assets` (the binaries), :mod:`.pki` (certificates and kubeconfigs),
:mod:`.processes` (starting, stopping and waiting for processes), :mod:`.components` (each
component's command line, fake nodes), :mod:`.kueue` (Kueue's configuration and webhooks),
:mod:`.crds` (installing CRDs), :mod:`.plane` (the :class:`ControlPlane`), :mod:`.cli` (the
command line).
"""

from .assets import (
    ASSET_ENV_VARS,
    BINARY_NAMES,
    BUILD_SCRIPT,
    ETCD_VERSION,
    FAKE_NODE_BINARY_NAMES,
    KUBERNETES_VERSION,
    KUEUE_VERSION,
    Binaries,
    FakeNodeBinaries,
    KueueAssets,
    assets_cache_dir,
    build_assets,
    find_binaries,
    find_fake_node_binaries,
    find_kueue,
    kueue_cache_dir,
    locate_binary,
    locate_kueue,
)
from .components import SERVICE_ACCOUNT_ISSUER, SERVICE_CLUSTER_IP_RANGE, FakeNode
from .crds import install_crds
from .errors import ControlPlaneError
from .pki import CONTEXT_NAME
from .plane import ADMIN_USER, ControlPlane
from .processes import WaitTimeout, free_port, wait_until

__all__ = [
    "ADMIN_USER",
    "ASSET_ENV_VARS",
    "BINARY_NAMES",
    "BUILD_SCRIPT",
    "CONTEXT_NAME",
    "ETCD_VERSION",
    "FAKE_NODE_BINARY_NAMES",
    "KUBERNETES_VERSION",
    "KUEUE_VERSION",
    "SERVICE_ACCOUNT_ISSUER",
    "SERVICE_CLUSTER_IP_RANGE",
    "Binaries",
    "ControlPlane",
    "ControlPlaneError",
    "FakeNode",
    "FakeNodeBinaries",
    "KueueAssets",
    "WaitTimeout",
    "assets_cache_dir",
    "build_assets",
    "find_binaries",
    "find_fake_node_binaries",
    "find_kueue",
    "free_port",
    "install_crds",
    "kueue_cache_dir",
    "locate_binary",
    "locate_kueue",
    "wait_until",
]
