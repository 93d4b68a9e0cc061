"""The configuration files of containerd, the CNI bridge plugin and the kubelet."""

from __future__ import annotations

from pathlib import Path

from .layout import (
    BRIDGE,
    CNI_BIN_DIR,
    GATEWAY,
    PAUSE_IMAGE,
    POD_SUBNET,
    Layout,
)


def containerd_toml(layout: Layout) -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{layout.containerd_root}"
state = "{layout.containerd_state}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{layout.containerd_socket}"

[ttrpc]
  address = "{layout.dir / "containerd-ttrpc.sock"}"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{layout.dir / "opt"}"

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # Root in this VM lacks CAP_SYS_RESOURCE: never ask for a lower oom_score_adj than ours.
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true
  max_container_log_line_size = 16384

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  BinaryName = "/usr/bin/runc"
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{layout.dir / "cni"}"
  max_conf_num = 1
"""


def cni_conflist(layout: Layout) -> dict[str, object]:
    return {
        "cniVersion": "1.0.0",
        "name": "kubetune",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(POD_SUBNET), "gateway": GATEWAY}]],
                    # Through the host: the Service IP is DNATed there; the rest is dropped.
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(layout.dir / "cni-ipam"),
                },
            }
        ],
    }


def kubelet_configuration(layout: Layout, client_ca: Path, port: int, healthz_port: int) -> dict[str, object]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cgroupDriver": "cgroupfs",
        # This machine kind has cgroup v1 only; 1.33 still runs there when told to.
        "failCgroupV1": False,
        "containerRuntimeEndpoint": f"unix://{layout.containerd_socket}",
        "address": GATEWAY,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(client_ca)},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(layout.dir / "pki" / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(layout.dir / "pki" / "kubelet-serving.key"),
        "clusterDomain": "cluster.local",
        "clusterDNS": [],
        "resolvConf": "",
        "failSwapOn": False,
        "makeIPTablesUtilChains": False,
        "volumePluginDir": str(layout.dir / "volume-plugins"),
        "podLogsDir": str(layout.dir / "pod-logs"),
        # The disk is shared with builds and other test runs: never evict or collect images
        # because of it.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "serializeImagePulls": False,
        "maxPods": 50,
        "registerNode": True,
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
    }
