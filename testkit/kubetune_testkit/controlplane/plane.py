"""The test control plane: etcd, kube-apiserver and, optionally, kube-controller-manager,
plus kube-scheduler and kwok for fake nodes, and Kueue, on free loopback ports, started from
local binaries (see :mod:`.assets`) the way envtest does it."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import yaml
from kubernetes import client as k8s

from . import components, kueue
from .assets import (
    Binaries,
    FakeNodeBinaries,
    KueueAssets,
    find_binaries,
    find_fake_node_binaries,
    find_kueue,
)
from .components import SERVICE_ACCOUNT_ISSUER, FakeNode
from .crds import CrdSource, install_crds
from .errors import ControlPlaneError
from .pki import ClusterPki, Credential, write_kubeconfig
from .processes import Process, ProcessExited, free_port, http_ok, wait_until

ADMIN_USER = "kubetune-admin"


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

    kwok completes a Job's Pods as soon as they run; with ``fake_job_pods_complete=False``
    they run until a test ends them (writing their status as a kubelet would) or they are
    deleted, which preemption and deletion tests need.

    With ``kueue`` Kueue's controller manager runs too (Jobs only, see :mod:`.kueue`), its
    CRDs installed and its webhooks registered; it needs the controller manager.
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
        fake_job_pods_complete: bool = True,
        kueue: bool = False,
        kueue_assets: KueueAssets | None = None,
    ) -> None:
        if kueue and not controller_manager:
            raise ControlPlaneError(
                "Kueue needs the controller manager (its Jobs are run by the Job controller)"
            )
        self.controller_manager = controller_manager
        self.kueue = kueue
        self._kueue_assets = kueue_assets
        self.fake_nodes = list(fake_nodes)
        self.fake_job_pods_complete = fake_job_pods_complete
        # A scheduler for real nodes, which join later (kwok runs too, idle without fake nodes).
        self.scheduler = scheduler or bool(self.fake_nodes)
        self._given_work_dir = Path(work_dir).resolve() if work_dir is not None else None
        self._binaries = binaries
        self.startup_timeout = startup_timeout
        self.crds = [Path(path) for path in crds]
        self.extra_apiserver_args = list(apiserver_args)
        self.extra_controller_manager_args = list(controller_manager_args)
        self._work_dir: Path | None = None
        self._processes: list[Process] = []
        self._pki: ClusterPki | None = None
        self._admin: Credential | None = None
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
        if self.kueue and self._kueue_assets is None:
            self._kueue_assets = find_kueue()
        for attempt in range(3):
            try:
                self._start_once(binaries, fake_node_binaries)
                return
            except ProcessExited as error:
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

        pki = ClusterPki(work_dir / "pki")
        self._pki = pki
        serving = pki.cluster.issue("serving", "kube-apiserver", hosts=components.APISERVER_HOSTS)
        self._admin = pki.cluster.issue("admin", ADMIN_USER, organization="system:masters")

        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._spawn(
            "etcd", components.etcd_command(binaries.etcd, work_dir / "etcd", self.etcd_url, peer_port)
        )
        self._wait_healthy(f"{self.etcd_url}/health", "etcd /health", expect='"health":"true"')

        server = f"https://127.0.0.1:{api_port}"
        self._spawn(
            "kube-apiserver",
            components.apiserver_command(
                binaries.kube_apiserver,
                etcd_url=self.etcd_url,
                port=api_port,
                cert_dir=work_dir / "apiserver-certs",
                serving=serving,
                pki=pki,
                # Without the controller manager nothing creates default ServiceAccounts.
                disabled_admission=[] if self.controller_manager else ["ServiceAccount"],
                extra=self.extra_apiserver_args,
            ),
        )
        self._wait_healthy(f"{server}/readyz", "kube-apiserver /readyz", context=self.ssl_context())
        self._server = server
        write_kubeconfig(self.kubeconfig_path, server, pki.ca.cert, ADMIN_USER, self._admin)
        crds = [*self.crds, *([self._kueue_assets.crds] if self.kueue and self._kueue_assets else [])]
        if crds:
            self.install_crds(*crds, timeout=self.startup_timeout)

        if self.controller_manager:
            self._start_controller_manager(binaries, serving)
        if fake_node_binaries is not None:
            self._start_fake_nodes(fake_node_binaries, serving)
        if self.kueue and self._kueue_assets is not None:
            self._start_kueue(self._kueue_assets)

    def _kubeconfig_for(self, name: str, user: str, organization: str | None = None) -> Path:
        """A client certificate for ``user`` and ``<name>.kubeconfig``, which uses it."""
        assert self._pki is not None and self._server is not None
        credential = self._pki.cluster.issue(name, user, organization=organization)
        kubeconfig = self.work_dir / f"{name}.kubeconfig"
        write_kubeconfig(kubeconfig, self._server, self._pki.ca.cert, user, credential)
        return kubeconfig

    def _wait(self, predicate: Callable[[], object], what: str) -> None:
        """Wait for ``predicate`` during startup; fail if a process started so far exits."""
        wait_until(predicate, what=what, timeout=self.startup_timeout, processes=self._processes)

    def _wait_healthy(
        self, url: str, what: str, *, expect: str = "ok", context: ssl.SSLContext | None = None
    ) -> None:
        """Wait until ``url`` answers with ``expect``; an https one is checked against the
        cluster's CA, without a client certificate unless ``context`` has one."""
        if context is None and url.startswith("https:"):
            context = self.ssl_context(client_certificate=False)
        self._wait(lambda: http_ok(url, context=context, expect=expect), what)

    def _start_controller_manager(self, binaries: Binaries, serving: Credential) -> None:
        assert self._pki is not None
        # The identity the bootstrap RBAC policy grants to the controller manager; each
        # controller then acts as its own service account, as in kubeadm clusters.
        kubeconfig = self._kubeconfig_for("kube-controller-manager", "system:kube-controller-manager")
        port = free_port()
        self._spawn(
            "kube-controller-manager",
            components.controller_manager_command(
                binaries.kube_controller_manager,
                kubeconfig=kubeconfig,
                port=port,
                serving=serving,
                pki=self._pki,
                extra=self.extra_controller_manager_args,
            ),
        )
        self._wait_healthy(f"https://127.0.0.1:{port}/healthz", "kube-controller-manager /healthz")
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

            what = "the default ServiceAccount (created by kube-controller-manager)"
            self._wait(default_service_account_exists, what)

    def _start_fake_nodes(self, binaries: FakeNodeBinaries, serving: Credential) -> None:
        scheduler_kubeconfig = self._kubeconfig_for("kube-scheduler", "system:kube-scheduler")
        scheduler_port = free_port()
        self._spawn(
            "kube-scheduler",
            components.scheduler_command(
                binaries.kube_scheduler, kubeconfig=scheduler_kubeconfig, port=scheduler_port, serving=serving
            ),
        )
        # kwok stands in for the kubelets of every fake node, so it gets the node and pod
        # status rights of many kubelets at once: simplest as an admin.
        kwok_kubeconfig = self._kubeconfig_for("kwok", "kwok", organization="system:masters")
        kwok_port = free_port()
        kwok_config = None
        if not self.fake_job_pods_complete:
            kwok_config = self.work_dir / "kwok-stages.yaml"
            kwok_config.write_text(components.KWOK_POD_STAGES_WITHOUT_COMPLETION)
        self._spawn(
            "kwok",
            components.kwok_command(
                binaries.kwok, kubeconfig=kwok_kubeconfig, port=kwok_port, config=kwok_config
            ),
        )
        self._wait_healthy(f"https://127.0.0.1:{scheduler_port}/healthz", "kube-scheduler /healthz")
        self._wait_healthy(f"http://127.0.0.1:{kwok_port}/healthz", "kwok /healthz")
        for node in self.fake_nodes:
            self.add_fake_node(node)

    def _start_kueue(self, assets: KueueAssets) -> None:
        # Kueue's ClusterRole spans most of the API; in a throwaway cluster an admin is simpler.
        kubeconfig = self._kubeconfig_for("kueue", "kueue", organization="system:masters")
        webhook_port, metrics_port, health_port = free_port(), free_port(), free_port()
        cert_dir = self.work_dir / "kueue-certs"
        config = self.work_dir / "kueue-config.yaml"
        settings = kueue.configuration(
            webhook_port=webhook_port, cert_dir=cert_dir, metrics_port=metrics_port, health_port=health_port
        )
        config.write_text(yaml.safe_dump(settings, sort_keys=False))
        with self.admin_api_client() as api:
            kueue.set_up(api, manifests=assets.webhooks, cert_dir=cert_dir, webhook_port=webhook_port)
        self._spawn("kueue", kueue.command(assets.binary, config=config, kubeconfig=kubeconfig))
        self._wait_healthy(f"http://127.0.0.1:{health_port}/readyz", "kueue /readyz")
        with self.admin_api_client() as api:
            self._wait(lambda: kueue.webhook_in_effect(api), "Kueue's Job webhook to be in effect")

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

            wait_until(
                ready, what=f"fake node {node.name} to be Ready", timeout=timeout, processes=self._processes
            )

    def _spawn(self, name: str, argv: Sequence[str]) -> Process:
        process = Process(name, argv, self.work_dir / f"{name}.log")
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

    def install_crds(self, *sources: CrdSource, timeout: float = 60.0) -> list[str]:
        """Create or replace CustomResourceDefinitions and wait until they are established.

        ``sources`` are manifests or YAML files (several documents allowed) or directories
        of ``*.yaml``/``*.yml`` files. Returns the CRD names (see :func:`.crds.install_crds`)."""
        with self.admin_api_client() as api:
            return install_crds(api, *sources, timeout=timeout, processes=self._processes)

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
