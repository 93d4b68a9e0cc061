"""The control plane's binaries: where they are found, and building them when missing.

Binaries are looked up per name in this order:

1. ``TEST_ASSET_ETCD``, ``TEST_ASSET_KUBE_APISERVER``, ``TEST_ASSET_KUBE_CONTROLLER_MANAGER``,
   ``TEST_ASSET_KUBECTL``, ``TEST_ASSET_KUBE_SCHEDULER``, ``TEST_ASSET_KWOK``;
2. ``$KUBEBUILDER_ASSETS/<name>``;
3. the project cache ``${XDG_CACHE_HOME:-~/.cache}/kubetune/assets/<version>/<name>``;
4. otherwise ``hack/build-test-assets`` builds them into that cache.

Kueue (opt-in) is looked up the same way as ``kueue``: ``TEST_ASSET_KUEUE``, then
``$KUBEBUILDER_ASSETS/kueue``, then ``<cache>/kubetune/assets/kueue-<version>/kueue``, else
``hack/build-kueue`` builds it there. Its CRDs (``crds/``) and webhook manifests
(``webhooks.yaml``) are read from beside the binary when they are there, else from that cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kubetune_testkit import REPO_ROOT

from .errors import ControlPlaneError

KUBERNETES_VERSION = "v1.33.13"
"""The version ``hack/build-test-assets`` builds (the k8s.io/kubernetes requirement in
``hack/controlplane/go.mod``); also the name of the cache directory."""

ETCD_VERSION = "v3.5.21"

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

KUEUE_VERSION = "v0.13.10"
"""The version ``hack/build-kueue`` builds: the newest Kueue on the k8s.io v0.33 libraries."""

KUEUE_ENV_VAR = "TEST_ASSET_KUEUE"

BUILD_SCRIPT = REPO_ROOT / "hack" / "build-test-assets"
KUEUE_BUILD_SCRIPT = REPO_ROOT / "hack" / "build-kueue"


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


@dataclass(frozen=True)
class KueueAssets:
    """Kueue's controller manager, the directory of its CRDs and its webhook manifests."""

    binary: Path
    crds: Path
    webhooks: Path


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


def _build_command(*args: str, script: Path | None = None) -> str:
    script = script or BUILD_SCRIPT
    shown = script.relative_to(Path.cwd()) if script.is_relative_to(Path.cwd()) else script
    return " ".join([str(shown), *args])


def build_assets(*args: str, output: IO[str] | None = None, script: Path | None = None) -> None:
    """Run ``hack/build-test-assets`` (or another build ``script``) with ``args``; it builds
    only what is missing."""
    script = script or BUILD_SCRIPT
    if not script.is_file():
        raise ControlPlaneError(
            f"control plane binaries are missing and {script} is not there to build them; "
            f"set KUBEBUILDER_ASSETS or TEST_ASSET_* to existing binaries "
            f"(Kubernetes {KUBERNETES_VERSION}, Kueue {KUEUE_VERSION})"
        )
    stream = output if output is not None else sys.__stderr__
    result = subprocess.run(
        [str(script), *args],
        stdout=stream,
        stderr=stream,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if result.returncode != 0:
        raise ControlPlaneError(
            f"`{_build_command(*args, script=script)}` failed with exit code {result.returncode}; "
            "run it by hand to see why"
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


def kueue_cache_dir(version: str = KUEUE_VERSION) -> Path:
    return assets_cache_dir(f"kueue-{version}")


def _kueue_manifests(directory: Path) -> tuple[Path, Path] | None:
    crds, webhooks = directory / "crds", directory / "webhooks.yaml"
    return (crds, webhooks) if crds.is_dir() and webhooks.is_file() else None


def locate_kueue() -> KueueAssets | None:
    """Kueue's binary and manifests found without building (see the module docstring), or
    None. ``TEST_ASSET_KUEUE`` naming a missing file is an error."""
    explicit = os.environ.get(KUEUE_ENV_VAR)
    binary: Path | None
    if explicit:
        binary = Path(explicit)
        if not _is_executable(binary):
            raise ControlPlaneError(f"{KUEUE_ENV_VAR}={explicit} is not an executable file")
    else:
        candidates = []
        kubebuilder_assets = os.environ.get("KUBEBUILDER_ASSETS")
        if kubebuilder_assets:
            candidates.append(Path(kubebuilder_assets) / "kueue")
        candidates.append(kueue_cache_dir() / "kueue")
        binary = next((path for path in candidates if _is_executable(path)), None)
    if binary is None:
        return None
    manifests = _kueue_manifests(binary.parent) or _kueue_manifests(kueue_cache_dir())
    if manifests is None:
        return None
    return KueueAssets(binary=binary, crds=manifests[0], webhooks=manifests[1])


def find_kueue(*, build: bool = True) -> KueueAssets:
    """Find Kueue like :func:`locate_kueue`; build it with ``hack/build-kueue`` when missing
    and ``build`` is true."""
    found = locate_kueue()
    if found is None and build:
        build_assets(script=KUEUE_BUILD_SCRIPT)
        found = locate_kueue()
    if found is None:
        raise ControlPlaneError(
            f"Kueue not found. Run `{_build_command(script=KUEUE_BUILD_SCRIPT)}` (builds Kueue "
            f"{KUEUE_VERSION} with its CRDs into {kueue_cache_dir()}), or point {KUEUE_ENV_VAR} "
            "at an existing binary."
        )
    return found
