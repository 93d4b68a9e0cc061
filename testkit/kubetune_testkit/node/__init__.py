"""A real single-node cluster for the end-to-end tests: the project's control plane (etcd,
kube-apiserver, kube-controller-manager, kube-scheduler) and one real kubelet on containerd,
runc and the bridge CNI plugin, all on this machine (needs root).

What the node is made of, and why:

- kubelet v1.33 (cgroup v1 still works there) from ``hack/build-test-assets kubelet``; the
  cgroupfs driver (no systemd here); containerd, runc and the CNI plugins from Debian.
- containerd's CRI with ``restrict_oom_score_adj`` (root here may lack CAP_SYS_RESOURCE, so
  lowering a process's oom_score_adj fails) and a sandbox image built locally
  (``hack/build-images pause``): no registry is reachable. Images are imported with ``ctr``
  and labelled with their buildah image id, so an unchanged image is not imported again;
  containerd's root lives in the project cache and keeps them between runs.
- Pods sit on the bridge ``kubetune0`` (10.244.0.0/24, the host is 10.244.0.1) and may reach
  only the host and each other: a FORWARD rule drops everything from the bridge to any other
  interface, and there is no masquerading. No kube-proxy and no CoreDNS: the only Service a
  pod needs is ``kubernetes`` (in-cluster config uses its IP from the environment, not DNS),
  reached through one DNAT rule for 10.0.0.1:443 to a socat forwarder on the bridge address
  that relays to the API server on loopback. Pods get no nameserver.
- The API server reaches the kubelet (logs, exec) with a client certificate of a CA of its
  own that the kubelet trusts; the kubelet accepts nothing anonymous.
- The kubelet changes a few sysctls and writes some fixed paths; :func:`cleanup` restores the
  sysctls, unmounts what the node mounted, removes its network rules, and removes the fixed
  paths that did not exist before. It runs when ``serve`` ends, and again on ``down`` (also
  after a crash), and is safe to run twice.

Command line (used by ``hack/e2e-cluster``)::

    python -m kubetune_testkit.node serve --dir DIR   # run until SIGTERM; DIR/ready when up
    python -m kubetune_testkit.node cleanup --dir DIR # undo what a (crashed) serve left
"""

from .cluster import Node
from .containerd import import_images
from .host import cleanup
from .layout import (
    BRIDGE,
    GATEWAY,
    NODE_NAME,
    OPERATOR_IMAGE,
    PAUSE_IMAGE,
    POD_SUBNET,
    SERVICE_IP,
    TRAINER_IMAGE,
    Layout,
    NodeError,
    node_cache_dir,
)

__all__ = [
    "BRIDGE",
    "GATEWAY",
    "NODE_NAME",
    "OPERATOR_IMAGE",
    "PAUSE_IMAGE",
    "POD_SUBNET",
    "SERVICE_IP",
    "TRAINER_IMAGE",
    "Layout",
    "Node",
    "NodeError",
    "cleanup",
    "import_images",
    "node_cache_dir",
]
