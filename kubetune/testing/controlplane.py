"""A real Kubernetes control plane on loopback: etcd, kube-apiserver and, optionally,
kube-controller-manager, plus kube-scheduler and kwok for fake nodes, started from local
binaries the way envtest does it.

Binaries are looked up per name in this order:

1. ``TEST_ASSET_ETCD``, ``TEST_ASSET_KUBE_APISERVER``, ``TEST_ASSET_KUBE_CONTROLLER_MANAGER``,
   ``TEST_ASSET_KUBECTL``, ``TEST_ASSET_KUBE_SCHEDULER``, ``TEST_ASSET_KWOK``;
2. ``$KUBEBUILDER_ASSETS/<name>``;
3. the project cache ``${XDG_CACHE_HOME:-~/.cache}/kubetune/assets/<version>/<name>``;
4. otherwise ``hack/build-test-assets`` builds them into that cache.

Command line (used by ``hack/dev-cluster``)::

    python -m kubetune.testing.controlplane assets            # print binaries, build if missing
    python -m kubetune.testing.controlplane serve --dir DIR   # run until SIGTERM
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import datetime
import functools
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client as k8s

KUBERNETES_VERSION = "v1.33.13"
"""The version ``hack/build-test-assets`` builds (the k8s.io/kubernetes requirement in
``hack/controlplane/go.mod``); also the name of the cache directory."""

ETCD_VERSION = "v3.5.21"

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
CONTEXT_NAME = "kubetune-test"
ADMIN_USER = "kubetune-admin"

ASSET_ENV_VARS = {
    "etcd": "TEST_ASSET_ETCD",
    "kube-apiserver": "TEST_ASSET_KUBE_APISERVER",
    "kube-controller-manager": "TEST_ASSET_KUBE_CONTROLLER_MANAGER",
    "kubectl": "TEST_ASSET_KUBECTL",
    "kube-scheduler": "TEST_ASSET_KUBE_SCHEDULER",
    "kwok": "TEST_ASSET_KWOK",
}
BINARY_NAMES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")
FAKE_NODE_BINARY_NAMES = ("kube-scheduler", "kwok")
"""Only needed for fake nodes."""

_REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = _REPO_ROOT / "hack" / "build-test-assets"


class ControlPlaneError(RuntimeError):
    """The control plane could not be found, built, started or reached."""


# --------------------------------------------------------------------------- binaries


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kubectl: Path

    def as_dict(self) -> dict[str, Path]:
        return {
            "etcd": self.etcd,
            "kube-apiserver": self.kube_apiserver,
            "kube-controller-manager": self.kube_controller_manager,
            "kubectl": self.kubectl,
        }


@dataclass(frozen=True)
class FakeNodeBinaries:
    kube_scheduler: Path
    kwok: Path

    def as_dict(self) -> dict[str, Path]:
        return {"kube-scheduler": self.kube_scheduler, "kwok": self.kwok}


def assets_cache_dir(version: str = KUBERNETES_VERSION) -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "kubetune" / "assets" / version


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def locate_binary(name: str) -> Path | None:
    """Where ``name`` is found without building, or None. A ``TEST_ASSET_*`` variable
    naming a missing file is an error rather than a silent fallback."""
    if name not in ASSET_ENV_VARS:
        raise ValueError(f"unknown control plane binary {name!r}; expected one of {tuple(ASSET_ENV_VARS)}")
    env_var = ASSET_ENV_VARS[name]
    explicit = os.environ.get(env_var)
    if explicit:
        path = Path(explicit)
        if not _is_executable(path):
            raise ControlPlaneError(f"{env_var}={explicit} is not an executable file")
        return path
    candidates = []
    kubebuilder_assets = os.environ.get("KUBEBUILDER_ASSETS")
    if kubebuilder_assets:
        candidates.append(Path(kubebuilder_assets) / name)
    candidates.append(assets_cache_dir() / name)
    return next((path for path in candidates if _is_executable(path)), None)


def _build_command(*args: str) -> str:
    script = BUILD_SCRIPT.relative_to(Path.cwd()) if BUILD_SCRIPT.is_relative_to(Path.cwd()) else BUILD_SCRIPT
    return " ".join([str(script), *args])


def build_assets(*args: str, output: IO[str] | None = None) -> None:
    """Run ``hack/build-test-assets`` with ``args`` (it builds only what is missing)."""
    if not BUILD_SCRIPT.is_file():
        raise ControlPlaneError(
            f"control plane binaries are missing and {BUILD_SCRIPT} is not there to build them; "
            f"set KUBEBUILDER_ASSETS or TEST_ASSET_* to existing binaries "
            f"(Kubernetes {KUBERNETES_VERSION})"
        )
    stream = output if output is not None else sys.__stderr__
    result = subprocess.run(
        [str(BUILD_SCRIPT), *args],
        stdout=stream,
        stderr=stream,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if result.returncode != 0:
        raise ControlPlaneError(
            f"`{_build_command(*args)}` failed with exit code {result.returncode}; run it by hand to see why"
        )


def _find(names: Sequence[str], *, build: bool) -> dict[str, Path]:
    found = {name: locate_binary(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing and build:
        build_assets()
        found = {name: locate_binary(name) for name in names}
        missing = [name for name, path in found.items() if path is None]
    if missing:
        raise ControlPlaneError(
            f"control plane binaries not found: {', '.join(missing)}. "
            f"Run `{_build_command()}` (builds Kubernetes {KUBERNETES_VERSION} into "
            f"{assets_cache_dir()}), or point KUBEBUILDER_ASSETS or "
            f"{', '.join(ASSET_ENV_VARS[name] for name in missing)} at existing binaries."
        )
    return {name: path for name, path in found.items() if path is not None}


def find_binaries(*, build: bool = True) -> Binaries:
    """Find etcd, kube-apiserver, kube-controller-manager and kubectl (see the module
    docstring for the order); build missing ones with ``hack/build-test-assets`` when
    ``build`` is true."""
    paths = _find(BINARY_NAMES, build=build)
    return Binaries(
        etcd=paths["etcd"],
        kube_apiserver=paths["kube-apiserver"],
        kube_controller_manager=paths["kube-controller-manager"],
        kubectl=paths["kubectl"],
    )


def find_fake_node_binaries(*, build: bool = True) -> FakeNodeBinaries:
    """Find kube-scheduler and kwok like :func:`find_binaries`."""
    paths = _find(FAKE_NODE_BINARY_NAMES, build=build)
    return FakeNodeBinaries(kube_scheduler=paths["kube-scheduler"], kwok=paths["kwok"])


# ------------------------------------------------------------------------ certificates


@dataclass(frozen=True)
class _Credential:
    cert: Path
    key: Path


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=ca,
        crl_sign=ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


class _CertificateAuthority:
    """A self-signed CA that writes ``<stem>.crt``/``<stem>.key`` files under ``directory``."""

    def __init__(self, directory: Path, stem: str, common_name: str) -> None:
        self.directory = directory
        self._now = datetime.datetime.now(datetime.UTC)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            self._builder(self._name, self._key.public_key(), days=3650)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.credential = _Credential(
            cert=_write(directory / f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM)),
            key=_write(directory / f"{stem}.key", _pem_key(self._key), 0o600),
        )

    def _builder(
        self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey, *, days: int
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now - datetime.timedelta(hours=1))
            .not_valid_after(self._now + datetime.timedelta(days=days))
        )

    def issue(
        self,
        stem: str,
        common_name: str,
        *,
        organizations: Sequence[str] = (),
        server: bool = False,
        client: bool = False,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
    ) -> _Credential:
        key = ec.generate_private_key(ec.SECP256R1())
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            self._builder(x509.Name(attributes), key.public_key(), days=365)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )
        alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
        alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return _Credential(
            cert=_write(self.directory / f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM)),
            key=_write(self.directory / f"{stem}.key", _pem_key(key), 0o600),
        )


class _Pki:
    """Everything a kubeadm-style control plane needs, written under ``directory``: the
    cluster CA, the front-proxy CA (aggregation layer and delegated authentication) and
    the service account signing key pair."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.cluster = _CertificateAuthority(directory, "ca", "kubetune-test-ca")
        self.ca = self.cluster.credential
        self.front_proxy = _CertificateAuthority(directory, "front-proxy-ca", "kubetune-test-front-proxy-ca")
        self.front_proxy_client = self.front_proxy.issue(
            "front-proxy-client", "front-proxy-client", client=True
        )
        # Kubernetes accepts RSA and ECDSA service account keys; RSA (RS256) is what
        # every token consumer understands.
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.service_account = _Credential(
            cert=_write(
                directory / "sa.pub",
                sa_key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                ),
            ),
            key=_write(directory / "sa.key", _pem_key(sa_key), 0o600),
        )

    def issue(
        self,
        stem: str,
        common_name: str,
        *,
        organizations: Sequence[str] = (),
        server: bool = False,
        client: bool = False,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
    ) -> _Credential:
        """A certificate signed by the cluster CA."""
        return self.cluster.issue(
            stem,
            common_name,
            organizations=organizations,
            server=server,
            client=client,
            dns_names=dns_names,
            ip_addresses=ip_addresses,
        )


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _write_kubeconfig(path: Path, server: str, ca: Path, user: str, credential: _Credential) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": CONTEXT_NAME, "cluster": {"server": server, "certificate-authority-data": _b64(ca)}}
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": _b64(credential.cert),
                    "client-key-data": _b64(credential.key),
                },
            }
        ],
        "contexts": [
            {"name": CONTEXT_NAME, "context": {"cluster": CONTEXT_NAME, "user": user, "namespace": "default"}}
        ],
        "current-context": CONTEXT_NAME,
        "preferences": {},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # Children of a process killed with SIGKILL would otherwise keep running and
    # holding ports; PR_SET_PDEATHSIG (1) asks the kernel to SIGTERM them instead.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)


class _Process:
    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        on_main_thread = threading.current_thread() is threading.main_thread()
        with self.log_path.open("wb") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # PDEATHSIG follows the creating thread, so only tie children to the
                # main thread, which lives as long as the process.
                preexec_fn=_die_with_parent if sys.platform == "linux" and on_main_thread else None,  # noqa: PLW1509
            )

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def exit_code(self) -> int | None:
        return self._popen.poll() if self._popen else None

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        popen = self._popen
        if popen is None or popen.poll() is not None:
            return
        popen.terminate()
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _wait_for(
    check: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    processes: Iterable[_Process] = (),
    interval: float = 0.2,
) -> None:
    deadline = time.monotonic() + timeout
    watched = list(processes)
    while True:
        for process in watched:
            if not process.running():
                raise _ProcessExited(process)
        if check():
            return
        if time.monotonic() > deadline:
            tails = "".join(
                f"\n--- {process.name} ({process.log_path}) ---\n{process.log_tail()}" for process in watched
            )
            raise ControlPlaneError(f"timed out after {timeout:.0f}s waiting for {what}{tails}")
        time.sleep(interval)


def wait_until(
    predicate: Callable[[], bool], *, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it returns true; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class _ProcessExited(ControlPlaneError):
    def __init__(self, process: _Process) -> None:
        self.process = process
        super().__init__(
            f"{process.name} exited with code {process.exit_code()} during startup "
            f"(log: {process.log_path}):\n{process.log_tail()}"
        )

    @property
    def port_in_use(self) -> bool:
        return "address already in use" in self.process.log_tail(200)


def _http_ok(url: str, context: ssl.SSLContext | None = None, expect: str | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            body = response.read().decode(errors="replace")
    except (OSError, urllib.error.URLError):
        return False
    return expect is None or expect in body


# ------------------------------------------------------------------------ control plane


@dataclass(frozen=True)
class FakeNode:
    """A node without a kubelet, kept alive by kwok. ``gpus`` become ``nvidia.com/gpu``
    capacity; ``taints`` are Kubernetes taint objects, e.g.
    ``{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}``."""

    ANNOTATION: ClassVar[str] = "kwok.x-k8s.io/node"

    name: str
    cpu: str = "32"
    memory: str = "256Gi"
    gpus: int = 0
    pods: int = 110
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: Sequence[Mapping[str, str]] = ()

    def manifest(self) -> dict[str, Any]:
        resources = {"cpu": self.cpu, "memory": self.memory, "pods": str(self.pods)}
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


class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager) on free loopback ports; with
    ``fake_nodes`` also kube-scheduler and kwok, so Pods get scheduled and "run".

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. Everything lives
    in ``work_dir`` (a fresh temporary directory, removed on stop, unless one is given):
    certificates under ``pki/``, the etcd data, one ``<process>.log`` per process, and
    ``kubeconfig`` for an admin in ``system:masters``.

    ``crds`` (YAML files, or directories of them) are installed before the controller
    manager starts, as envtest does: its garbage collector then follows owners of those
    kinds at once, whereas it discovers CRDs installed later only on its 30 s resync.

    Without the controller manager nothing creates the ``default`` ServiceAccount of a
    namespace, so the ServiceAccount admission plugin is turned off then; with it the
    API server admits Pods exactly as a cluster does.
    """

    def __init__(
        self,
        *,
        controller_manager: bool = True,
        work_dir: Path | str | None = None,
        binaries: Binaries | None = None,
        startup_timeout: float = 120.0,
        crds: Sequence[Path | str] = (),
        fake_nodes: Sequence[FakeNode] = (),
        apiserver_args: Sequence[str] = (),
        controller_manager_args: Sequence[str] = (),
        scheduler: bool = False,
    ) -> None:
        self.controller_manager = controller_manager
        self.fake_nodes = list(fake_nodes)
        # A scheduler for real nodes, which join later (kwok runs too, idle without fake nodes).
        self.scheduler = scheduler or bool(self.fake_nodes)
        self._given_work_dir = Path(work_dir).resolve() if work_dir is not None else None
        self._binaries = binaries
        self.startup_timeout = startup_timeout
        self.crds = [Path(path) for path in crds]
        self.extra_apiserver_args = list(apiserver_args)
        self.extra_controller_manager_args = list(controller_manager_args)
        self._work_dir: Path | None = None
        self._processes: list[_Process] = []
        self._pki: _Pki | None = None
        self._admin: _Credential | None = None
        self._server: str | None = None
        self.etcd_url: str | None = None

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def started(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        if self._work_dir is not None:
            raise ControlPlaneError("control plane already started")
        binaries = self._binaries or find_binaries()
        self._binaries = binaries
        # Found (or built) before anything starts, not while the rest waits.
        fake_node_binaries = find_fake_node_binaries() if self.scheduler else None
        for attempt in range(3):
            try:
                self._start_once(binaries, fake_node_binaries)
                return
            except _ProcessExited as error:
                self.stop()
                # Free ports are picked before the processes bind them; another process
                # may win the race. Anything else is a real failure.
                if not error.port_in_use or attempt == 2:
                    raise
            except BaseException:
                self.stop()
                raise

    def _start_once(self, binaries: Binaries, fake_node_binaries: FakeNodeBinaries | None) -> None:
        if self._given_work_dir is not None:
            work_dir = self._given_work_dir
            work_dir.mkdir(parents=True, exist_ok=True)
            for stale in ("etcd", "pki"):
                shutil.rmtree(work_dir / stale, ignore_errors=True)
        else:
            work_dir = Path(tempfile.mkdtemp(prefix="kubetune-controlplane-"))
        self._work_dir = work_dir

        pki = _Pki(work_dir / "pki")
        self._pki = pki
        serving = pki.issue(
            "serving",
            "kube-apiserver",
            server=True,
            dns_names=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            ip_addresses=("127.0.0.1", "::1", "10.0.0.1"),
        )
        self._admin = pki.issue("admin", ADMIN_USER, organizations=("system:masters",), client=True)

        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{etcd_port}"
        etcd = self._spawn(
            "etcd",
            [
                str(binaries.etcd),
                f"--data-dir={work_dir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                # Test data is thrown away; fsync only costs time.
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        _wait_for(
            lambda: _http_ok(f"{self.etcd_url}/health", expect='"health":"true"'),
            what="etcd /health",
            timeout=self.startup_timeout,
            processes=[etcd],
        )

        server = f"https://127.0.0.1:{api_port}"
        disabled_admission = [] if self.controller_manager else ["ServiceAccount"]
        apiserver = self._spawn(
            "kube-apiserver",
            [
                str(binaries.kube_apiserver),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--cert-dir={work_dir / 'apiserver-certs'}",
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
                *(
                    [f"--disable-admission-plugins={','.join(disabled_admission)}"]
                    if disabled_admission
                    else []
                ),
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki.service_account.cert}",
                f"--service-account-signing-key-file={pki.service_account.key}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
                # A loopback address cannot be an endpoint of the kubernetes Service;
                # nothing in-cluster needs to reach the API server through it here.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                *self.extra_apiserver_args,
            ],
        )
        context = self.ssl_context()
        _wait_for(
            lambda: _http_ok(f"{server}/readyz", context=context, expect="ok"),
            what="kube-apiserver /readyz",
            timeout=self.startup_timeout,
            processes=[etcd, apiserver],
        )
        self._server = server
        _write_kubeconfig(self.kubeconfig_path, server, pki.ca.cert, ADMIN_USER, self._admin)
        if self.crds:
            self.install_crds(*self.crds, timeout=self.startup_timeout)

        if self.controller_manager:
            self._start_controller_manager(binaries, serving, [etcd, apiserver])
        if fake_node_binaries is not None:
            self._start_fake_nodes(fake_node_binaries, serving)

    def _start_controller_manager(
        self, binaries: Binaries, serving: _Credential, running: list[_Process]
    ) -> None:
        assert self._pki is not None and self._server is not None
        pki, work_dir = self._pki, self.work_dir
        # The identity the bootstrap RBAC policy grants to the controller manager; each
        # controller then acts as its own service account, as in kubeadm clusters.
        credential = pki.issue("kube-controller-manager", "system:kube-controller-manager", client=True)
        kubeconfig = work_dir / "kube-controller-manager.kubeconfig"
        _write_kubeconfig(kubeconfig, self._server, pki.ca.cert, "system:kube-controller-manager", credential)
        port = free_port()
        manager = self._spawn(
            "kube-controller-manager",
            [
                str(binaries.kube_controller_manager),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki.service_account.key}",
                f"--root-ca-file={pki.ca.cert}",
                f"--cluster-signing-cert-file={pki.ca.cert}",
                f"--cluster-signing-key-file={pki.ca.key}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--controllers=*",
                "--profiling=false",
                *self.extra_controller_manager_args,
            ],
        )
        processes = [*running, manager]
        context = ssl.create_default_context(cafile=str(pki.ca.cert))
        _wait_for(
            lambda: _http_ok(f"https://127.0.0.1:{port}/healthz", context=context, expect="ok"),
            what="kube-controller-manager /healthz",
            timeout=self.startup_timeout,
            processes=processes,
        )
        # Pods need their namespace's default ServiceAccount; once the controller has
        # made the one in "default", controllers are running and tests can create Pods.
        with self.admin_api_client() as api:
            core = k8s.CoreV1Api(api)

            def default_service_account_exists() -> bool:
                try:
                    core.read_namespaced_service_account("default", "default")
                except k8s.ApiException:
                    return False
                return True

            _wait_for(
                default_service_account_exists,
                what="the default ServiceAccount (created by kube-controller-manager)",
                timeout=self.startup_timeout,
                processes=processes,
            )

    def _start_fake_nodes(self, binaries: FakeNodeBinaries, serving: _Credential) -> None:
        assert self._pki is not None and self._server is not None
        pki, work_dir = self._pki, self.work_dir
        scheduler_credential = pki.issue("kube-scheduler", "system:kube-scheduler", client=True)
        scheduler_kubeconfig = work_dir / "kube-scheduler.kubeconfig"
        _write_kubeconfig(
            scheduler_kubeconfig, self._server, pki.ca.cert, "system:kube-scheduler", scheduler_credential
        )
        scheduler_port = free_port()
        self._spawn(
            "kube-scheduler",
            [
                str(binaries.kube_scheduler),
                f"--kubeconfig={scheduler_kubeconfig}",
                f"--authentication-kubeconfig={scheduler_kubeconfig}",
                f"--authorization-kubeconfig={scheduler_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={scheduler_port}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                "--leader-elect=false",
                "--profiling=false",
            ],
        )
        # kwok stands in for the kubelets of every fake node, so it gets the node and pod
        # status rights of many kubelets at once: simplest as an admin.
        kwok_credential = pki.issue("kwok", "kwok", organizations=("system:masters",), client=True)
        kwok_kubeconfig = work_dir / "kwok.kubeconfig"
        _write_kubeconfig(kwok_kubeconfig, self._server, pki.ca.cert, "kwok", kwok_credential)
        kwok_port = free_port()
        self._spawn(
            "kwok",
            [
                str(binaries.kwok),
                f"--kubeconfig={kwok_kubeconfig}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={FakeNode.ANNOTATION}=fake",
                f"--server-address=127.0.0.1:{kwok_port}",
                "--cidr=10.244.0.1/16",
            ],
        )
        context = ssl.create_default_context(cafile=str(pki.ca.cert))
        _wait_for(
            lambda: _http_ok(f"https://127.0.0.1:{scheduler_port}/healthz", context=context, expect="ok"),
            what="kube-scheduler /healthz",
            timeout=self.startup_timeout,
            processes=self._processes,
        )
        _wait_for(
            lambda: _http_ok(f"http://127.0.0.1:{kwok_port}/healthz", expect="ok"),
            what="kwok /healthz",
            timeout=self.startup_timeout,
            processes=self._processes,
        )
        for node in self.fake_nodes:
            self.add_fake_node(node)

    def add_fake_node(self, node: FakeNode, *, timeout: float = 60.0) -> None:
        """Register a node that kwok keeps Ready and whose Pods it runs: Running once
        scheduled, Succeeded soon after when a Job owns them. Needs ``fake_nodes``."""
        if not any(process.name == "kwok" for process in self._processes):
            raise ControlPlaneError("fake nodes need a control plane started with fake_nodes=[...]")
        with self.admin_api_client() as api:
            core = k8s.CoreV1Api(api)
            body = k8s.V1Node.from_dict(node.manifest())
            assert body is not None
            core.create_node(body)

            def ready() -> bool:
                status = core.read_node(node.name).status
                conditions = (status.conditions if status else None) or []
                return any(c.type == "Ready" and c.status == "True" for c in conditions)

            _wait_for(
                ready, what=f"fake node {node.name} to be Ready", timeout=timeout, processes=self._processes
            )

    def _spawn(self, name: str, argv: Sequence[str]) -> _Process:
        process = _Process(name, argv, self.work_dir / f"{name}.log")
        self._processes.append(process)
        process.start()
        return process

    def stop(self) -> None:
        """Stop every process (newest first) and remove a temporary work dir. Safe to call
        twice and after a failed start."""
        errors: list[BaseException] = []
        for process in reversed(self._processes):
            try:
                process.stop()
            except BaseException as error:  # keep stopping the others
                errors.append(error)
        self._processes.clear()
        if self._work_dir is not None and self._given_work_dir is None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
        self._work_dir = None
        self._server = None
        self._pki = None
        self._admin = None
        self.etcd_url = None
        if errors:
            raise errors[0]

    def running(self) -> bool:
        return bool(self._processes) and not self.exited_processes()

    def exited_processes(self) -> list[str]:
        """Names of the processes that have died since they were started."""
        return [process.name for process in self._processes if not process.running()]

    def process_logs(self) -> dict[str, Path]:
        return {process.name: process.log_path for process in self._processes}

    # ---------------------------------------------------------------- accessors

    def _require_started(self) -> None:
        if self._server is None:
            raise ControlPlaneError("control plane is not running; call start() or use it in a with block")

    @property
    def work_dir(self) -> Path:
        if self._work_dir is None:
            raise ControlPlaneError("control plane is not running; call start() or use it in a with block")
        return self._work_dir

    @property
    def server(self) -> str:
        """The API server URL, e.g. ``https://127.0.0.1:38211``."""
        self._require_started()
        assert self._server is not None
        return self._server

    @property
    def kubeconfig_path(self) -> Path:
        """A kubeconfig for an admin (``system:masters``) with all data embedded."""
        return self.work_dir / "kubeconfig"

    @property
    def ca_cert_path(self) -> Path:
        self._require_started()
        assert self._pki is not None
        return self._pki.ca.cert

    @property
    def admin_cert_paths(self) -> tuple[Path, Path]:
        """(certificate, key) of the admin client certificate."""
        self._require_started()
        assert self._admin is not None
        return self._admin.cert, self._admin.key

    def ssl_context(self, *, client_certificate: bool = True) -> ssl.SSLContext:
        assert self._pki is not None and self._admin is not None
        context = ssl.create_default_context(cafile=str(self._pki.ca.cert))
        if client_certificate:
            context.load_cert_chain(str(self._admin.cert), str(self._admin.key))
        return context

    def _configuration(self) -> k8s.Configuration:
        configuration = k8s.Configuration()
        configuration.host = self.server
        configuration.ssl_ca_cert = str(self.ca_cert_path)
        return configuration

    def admin_api_client(self) -> k8s.ApiClient:
        """A ``kubernetes.client.ApiClient`` authenticated as a ``system:masters`` admin.
        Close it (or use it in a ``with`` block) when done."""
        configuration = self._configuration()
        configuration.cert_file, configuration.key_file = (str(path) for path in self.admin_cert_paths)
        return k8s.ApiClient(configuration)

    def token_api_client(self, token: str) -> k8s.ApiClient:
        """A ``kubernetes.client.ApiClient`` that sends ``Authorization: Bearer <token>``."""
        configuration = self._configuration()
        configuration.api_key = {"authorization": token}
        configuration.api_key_prefix = {"authorization": "Bearer"}
        return k8s.ApiClient(configuration)

    def service_account_token(
        self,
        name: str,
        namespace: str = "default",
        *,
        expiration_seconds: int = 3600,
        audiences: Sequence[str] = (SERVICE_ACCOUNT_ISSUER,),
    ) -> str:
        """A token for an existing ServiceAccount, issued by the TokenRequest API."""
        request = k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(audiences=list(audiences), expiration_seconds=expiration_seconds)
        )
        with self.admin_api_client() as api:
            response = k8s.CoreV1Api(api).create_namespaced_service_account_token(name, namespace, request)
        if response.status is None or not response.status.token:
            raise ControlPlaneError(f"TokenRequest for {namespace}/{name} returned no token")
        return str(response.status.token)

    def install_crds(self, *sources: Path | str | Mapping[str, Any], timeout: float = 60.0) -> list[str]:
        """Create or replace CustomResourceDefinitions and wait until they are established.

        ``sources`` are manifests or YAML files (several documents allowed) or directories
        of ``*.yaml``/``*.yml`` files. Returns the CRD names."""
        manifests: list[tuple[str, Mapping[str, Any]]] = []
        for source in sources:
            if isinstance(source, Mapping):
                manifests.append(("manifest", source))
                continue
            path = Path(source)
            files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
            for file in files:
                try:
                    documents = list(yaml.safe_load_all(file.read_text()))
                except (OSError, yaml.YAMLError) as error:
                    raise ControlPlaneError(f"cannot read CRDs from {file}: {error}") from error
                manifests += [(str(file), doc) for doc in documents if doc]
        names = []
        with self.admin_api_client() as api:
            extensions = k8s.ApiextensionsV1Api(api)
            for origin, manifest in manifests:
                if manifest.get("kind") != "CustomResourceDefinition":
                    raise ControlPlaneError(
                        f"{origin}: expected a CustomResourceDefinition, got {manifest.get('kind')!r}"
                    )
                names.append(_apply_crd(extensions, origin, manifest))
            for name in names:
                _wait_for(
                    functools.partial(_crd_established, extensions, name),
                    what=f"CRD {name} to be established",
                    timeout=timeout,
                    processes=self._processes,
                )
        return names

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the kubectl of the same version against this control plane."""
        binaries = self._binaries or find_binaries(build=False)
        return subprocess.run(
            [str(binaries.kubectl), f"--kubeconfig={self.kubeconfig_path}", *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )


def _apply_crd(extensions: k8s.ApiextensionsV1Api, origin: str, manifest: Mapping[str, Any]) -> str:
    crd = k8s.V1CustomResourceDefinition.from_dict(dict(manifest))
    if crd is None or crd.metadata is None or not crd.metadata.name:
        raise ControlPlaneError(f"{origin}: CustomResourceDefinition without metadata.name")
    name = crd.metadata.name
    try:
        try:
            extensions.create_custom_resource_definition(crd)
        except k8s.ApiException as error:
            if error.status != 409:
                raise
            current = extensions.read_custom_resource_definition(name)
            crd.metadata.resource_version = current.metadata.resource_version if current.metadata else None
            extensions.replace_custom_resource_definition(name, crd)
    except k8s.ApiException as error:
        raise ControlPlaneError(f"{origin}: installing CRD {name} failed: {error.body or error}") from error
    return name


def _crd_established(extensions: k8s.ApiextensionsV1Api, name: str) -> bool:
    status = extensions.read_custom_resource_definition(name).status
    conditions = (status.conditions if status else None) or []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


# --------------------------------------------------------------------------------- CLI


def _serve(work_dir: Path, controller_manager: bool, crds: Sequence[Path], fake_nodes: int) -> int:
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    ready_file = work_dir / "ready"
    ready_file.unlink(missing_ok=True)
    nodes = [FakeNode(f"fake-gpu-{index}", gpus=8) for index in range(fake_nodes)]
    plane = ControlPlane(
        controller_manager=controller_manager, work_dir=work_dir, crds=crds, fake_nodes=nodes
    )
    try:
        plane.start()
    except ControlPlaneError as error:
        print(f"control plane failed to start: {error}", file=sys.stderr)
        return 1
    try:
        state = {
            "pid": os.getpid(),
            "server": plane.server,
            "kubeconfig": str(plane.kubeconfig_path),
            "logs": {name: str(path) for name, path in plane.process_logs().items()},
        }
        ready_file.write_text(json.dumps(state, indent=2) + "\n")
        print(f"control plane ready at {plane.server}; kubeconfig: {plane.kubeconfig_path}", flush=True)
        while not stop.wait(1.0):
            exited = plane.exited_processes()
            if exited:
                print(
                    f"control plane process exited: {', '.join(exited)}; see the logs in {work_dir}",
                    file=sys.stderr,
                )
                return 1
        return 0
    finally:
        ready_file.unlink(missing_ok=True)
        plane.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune.testing.controlplane",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    assets = commands.add_parser("assets", help="print where the binaries are, building them if missing")
    assets.add_argument("--no-build", action="store_true", help="fail instead of building missing binaries")
    serve = commands.add_parser("serve", help="run a control plane in the foreground until SIGTERM or Ctrl-C")
    serve.add_argument(
        "--dir", type=Path, required=True, help="work directory (kubeconfig, logs, certificates)"
    )
    serve.add_argument(
        "--crds",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="install the CRDs in this YAML file or directory first (repeatable)",
    )
    serve.add_argument(
        "--fake-nodes",
        type=int,
        default=0,
        metavar="N",
        help="add N kwok nodes with 8 nvidia.com/gpu each, and a scheduler",
    )
    serve.add_argument(
        "--no-controller-manager", action="store_true", help="run only etcd and kube-apiserver"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "assets":
            binaries = {
                **find_binaries(build=not args.no_build).as_dict(),
                **find_fake_node_binaries(build=not args.no_build).as_dict(),
            }
            for name, path in binaries.items():
                print(f"{name}\t{path}")
            return 0
        return _serve(
            args.dir.resolve(),
            controller_manager=not args.no_controller_manager,
            crds=args.crds,
            fake_nodes=args.fake_nodes,
        )
    except ControlPlaneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
