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

    python -m kubetune.testing.node serve --dir DIR   # run until SIGTERM; DIR/ready when up
    python -m kubetune.testing.node cleanup --dir DIR # undo what a (crashed) serve left
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from kubernetes import client as k8s

from kubetune.testing.controlplane import ControlPlane, ControlPlaneError, assets_cache_dir, free_port
from kubetune.testing.controlplane.pki import (
    CertificateAuthority,
    write_kubeconfig,
)
from kubetune.testing.controlplane.processes import Process, serve_until_signal, wait_until

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

_REPO_ROOT = Path(__file__).resolve().parents[2]


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


def _run(*argv: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as error:
        raise NodeError(f"{argv[0]} is not installed (hack/e2e-cluster installs it with apt-get)") from error
    if check and result.returncode != 0:
        raise NodeError(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _log(message: str) -> None:
    print(f"e2e-node: {message}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------- network


def _iptables(*args: str, table: str = "filter", check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run("iptables", "-w", "-t", table, *args, check=check)


def _add_network(layout: Layout, forward_port: int) -> None:
    if _run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "addr", "replace", f"{GATEWAY}/{POD_SUBNET.prefixlen}", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    comment = ("-m", "comment", "--comment", RULE_COMMENT)
    # Pods reach the host (INPUT) and each other (bridged); nothing routed elsewhere.
    _iptables("-I", "FORWARD", "1", "-i", BRIDGE, "!", "-o", BRIDGE, *comment, "-j", "DROP")
    _iptables("-I", "FORWARD", "1", "-o", BRIDGE, "!", "-i", BRIDGE, *comment, "-j", "DROP")
    _iptables(
        "-I", "PREROUTING", "1", "-i", BRIDGE, "-d", f"{SERVICE_IP}/32", "-p", "tcp", "--dport", "443",
        *comment, "-j", "DNAT", "--to-destination", f"{GATEWAY}:{forward_port}",
        table="nat",
    )  # fmt: skip


def _remove_network() -> None:
    for table in ("filter", "nat"):
        listed = _iptables("-S", table=table, check=False)
        for line in listed.stdout.splitlines():
            if RULE_COMMENT in line and line.startswith("-A "):
                _iptables("-D", *shlex.split(line[3:]), table=table, check=False)
    if _run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        _run("ip", "link", "del", BRIDGE, check=False)


# ----------------------------------------------------------------------- configuration


def _containerd_config(layout: Layout) -> str:
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


def _cni_config(layout: Layout) -> dict[str, object]:
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


def _kubelet_config(layout: Layout, client_ca: Path, port: int, healthz_port: int) -> dict[str, object]:
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


# ------------------------------------------------------------------------- the node


def _read_sysctls() -> dict[str, str]:
    values = {}
    for name in SYSCTLS:
        path = Path("/proc/sys") / name
        with contextlib.suppress(OSError):
            values[name] = path.read_text().strip()
    return values


def _save_state(layout: Layout) -> None:
    if layout.saved.exists():
        return  # the state of a run that did not clean up: the original values are in there
    state = {
        "sysctls": _read_sysctls(),
        "existing_paths": [path for path in FIXED_PATHS if Path(path).exists()],
        "netns": sorted(p.name for p in Path("/run/netns").glob("*")) if Path("/run/netns").is_dir() else [],
    }
    layout.saved.write_text(json.dumps(state, indent=2) + "\n")


def _ctr(layout: Layout, *args: str, check: bool = True, timeout: float = 120.0) -> str:
    return _run(
        "ctr", "--address", str(layout.containerd_socket), "--namespace", "k8s.io", *args,
        check=check, timeout=timeout,
    ).stdout  # fmt: skip


def _buildah_image_id(image: str) -> str:
    result = _run("buildah", "inspect", "--type", "image", "--format", "{{.FromImageID}}", image, check=False)
    if result.returncode != 0:
        raise NodeError(f"image {image} is not built; run `hack/build-images` first")
    return result.stdout.strip()


def import_images(layout: Layout, images: Sequence[str]) -> None:
    """Copy ``images`` from buildah's storage into containerd, unless the same image id is
    there already (kept as a label on containerd's image)."""
    listed = _ctr(layout, "images", "ls")
    labels: dict[str, str] = {}
    for line in listed.splitlines()[1:]:
        fields = line.split()
        if fields:
            labels[fields[0]] = ""
            for label in fields[-1].split(","):
                key, _, value = label.partition("=")
                if key == IMAGE_ID_LABEL:
                    labels[fields[0]] = value
    for image in images:
        image_id = _buildah_image_id(image)
        if labels.get(image) == image_id:
            continue
        if image in labels:
            # Retagging by import leaves the old layers behind (7 GB a trainer image) until
            # a garbage collection that containerd 1.6 may not run for a long time.
            _ctr(layout, "images", "rm", "--sync", image, timeout=600)
        started = time.monotonic()
        archive = node_cache_dir() / f".import-{os.getpid()}.tar"
        archive.parent.mkdir(parents=True, exist_ok=True)
        try:
            _run("buildah", "push", "--quiet", image, f"docker-archive:{archive}:{image}", timeout=1800)
            _ctr(layout, "images", "import", "--snapshotter", "overlayfs", str(archive), timeout=1800)
        finally:
            archive.unlink(missing_ok=True)  # several GB for the trainer
        _ctr(layout, "images", "label", image, f"{IMAGE_ID_LABEL}={image_id}")
        _log(f"imported {image} in {time.monotonic() - started:.0f}s")


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
        _save_state(layout)
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
        _add_network(layout, forward_port)

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
        (layout.dir / "cni" / "10-kubetune.conflist").write_text(json.dumps(_cni_config(layout), indent=2))
        config = layout.dir / "containerd.toml"
        config.write_text(_containerd_config(layout))
        containerd = self._spawn("containerd", ["containerd", "--config", str(config)])
        wait_until(
            lambda: (
                _run("ctr", "--address", str(layout.containerd_socket), "version", check=False).returncode
                == 0
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
                _kubelet_config(layout, kubelet_client_ca.credential.cert, free_port(), free_port()),
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
                    time.monotonic() < deadline
                    and _ctr(self.layout, "tasks", "ls", "-q", check=False).strip()
                ):
                    time.sleep(0.5)
        for process in reversed(self._processes):
            if process.name == "containerd":
                _kill_tasks(self.layout)
            with contextlib.suppress(Exception):
                process.stop()
        self._processes.clear()
        if self.plane is not None:
            with contextlib.suppress(Exception):
                self.plane.stop()
        cleanup(self.layout.dir)


def _kill_tasks(layout: Layout) -> None:
    if not layout.containerd_socket.exists():
        return
    for task in _ctr(layout, "tasks", "ls", "-q", check=False).split():
        _ctr(layout, "tasks", "kill", "--signal", "SIGKILL", task, check=False)
    deadline = time.monotonic() + 15
    for task in _ctr(layout, "tasks", "ls", "-q", check=False).split():
        while time.monotonic() < deadline:
            if _run("ctr", "--address", str(layout.containerd_socket), "-n", "k8s.io", "tasks", "delete",
                    task, check=False).returncode == 0:  # fmt: skip
                break
            time.sleep(0.3)
    for container in _ctr(layout, "containers", "ls", "-q", check=False).split():
        _ctr(layout, "containers", "rm", container, check=False)


def _mounts_under(roots: Sequence[Path]) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].encode().decode("unicode_escape")
        if any(mount_point == str(root) or mount_point.startswith(f"{root}/") for root in roots):
            found.append(mount_point)
    return sorted(found, key=len, reverse=True)


def _shim_pids(layout: Layout) -> list[int]:
    """containerd-shim processes started for this node's containerd (they outlive it)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if (
                argv
                and argv[0].endswith(b"containerd-shim-runc-v2")
                and str(layout.containerd_socket).encode() in argv
            ):
                pids.append(int(proc.name))
    return pids


def _remove_cgroups() -> None:
    """The kubelet's pod cgroups (cgroupfs driver), once no process is left in them."""
    for hierarchy in Path("/sys/fs/cgroup").glob("*/kubepods"):
        for directory in sorted((p for p in hierarchy.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            hierarchy.rmdir()


def cleanup(directory: Path) -> None:
    """Undo what a node left behind: shims, mounts, network rules, sysctls, fixed paths.
    Idempotent; does nothing for a directory that never held a node."""
    layout = Layout(directory.resolve())
    for pid in _shim_pids(layout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    roots = [layout.dir, layout.containerd_root, *(Path(p) for p in ("/run/containerd", "/var/lib/kubelet"))]
    for _attempt in range(3):
        mounts = _mounts_under(roots)
        if not mounts:
            break
        for mount_point in mounts:
            if _run("umount", mount_point, check=False).returncode != 0:
                _run("umount", "--lazy", mount_point, check=False)
    _remove_network()
    _remove_cgroups()
    if not layout.saved.exists():
        return
    saved = json.loads(layout.saved.read_text())
    for name, value in saved.get("sysctls", {}).items():
        with contextlib.suppress(OSError):
            (Path("/proc/sys") / name).write_text(value + "\n")
    netns = Path("/run/netns")
    if netns.is_dir():
        for entry in netns.iterdir():
            if entry.name.startswith("cni-") and entry.name not in saved.get("netns", []):
                _run("umount", str(entry), check=False)
                entry.unlink(missing_ok=True)
    for path in FIXED_PATHS:
        if path not in saved.get("existing_paths", []):
            target = Path(path)
            if target.is_symlink():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
    layout.saved.unlink()


# --------------------------------------------------------------------------------- CLI


def _serve(directory: Path) -> int:
    node = Node(directory)

    def state() -> dict[str, object]:
        assert node.plane is not None
        return {
            "server": node.plane.server,
            "kubeconfig": str(node.plane.kubeconfig_path),
            "node": NODE_NAME,
            "gateway": GATEWAY,
            "logs": {name: str(path) for name, path in node.logs().items()},
        }

    def ready() -> str:
        assert node.plane is not None
        return f"node {NODE_NAME} ready; kubeconfig: {node.plane.kubeconfig_path}"

    return serve_until_signal(node, directory, what="node", state=state, ready=ready)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune.testing.node",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "run the control plane and the node until SIGTERM or Ctrl-C"),
        ("cleanup", "undo what a node left behind (safe to repeat)"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--dir", type=Path, required=True, help="the node's state directory")
    args = parser.parse_args(argv)
    try:
        if args.command == "cleanup":
            cleanup(args.dir)
            return 0
        return _serve(args.dir.resolve())
    except ControlPlaneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
