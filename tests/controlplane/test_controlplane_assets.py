"""Where the control plane binaries come from; no control plane is started here."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from kubetune_testkit.controlplane import (
    ControlPlaneError,
    assets,
    assets_cache_dir,
    find_binaries,
    find_fake_node_binaries,
    locate_binary,
)
from kubetune_testkit.controlplane.assets import ASSET_ENV_VARS, BINARY_NAMES, FAKE_NODE_BINARY_NAMES

REPO = Path(__file__).resolve().parents[2]


def _fake_binary(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for variable in [*ASSET_ENV_VARS.values(), "KUBEBUILDER_ASSETS"]:
        monkeypatch.delenv(variable, raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def test_version_matches_go_module() -> None:
    go_mod = (REPO / "hack" / "controlplane" / "go.mod").read_text()
    match = re.search(r"^\s*(?:require\s+)?k8s\.io/kubernetes\s+(v\S+)", go_mod, re.MULTILINE)
    assert match, "hack/controlplane/go.mod requires no k8s.io/kubernetes"
    assert match.group(1) == assets.KUBERNETES_VERSION
    etcd = re.search(r"^\s*(?:require\s+)?go\.etcd\.io/etcd/server/v3\s+(v\S+)", go_mod, re.MULTILINE)
    assert etcd and etcd.group(1) == assets.ETCD_VERSION
    for staging in ("api", "apimachinery", "apiserver", "client-go", "kubectl", "externaljwt"):
        assert f"k8s.io/{staging} => k8s.io/{staging} v0.{assets.KUBERNETES_VERSION[3:]}" in go_mod


def test_build_script_and_module_agree_on_cache_dir(clean_env: Path) -> None:
    command = [str(assets.BUILD_SCRIPT), "--print"]
    printed = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ.copy())
    cache = clean_env / "kubetune" / "assets" / assets.KUBERNETES_VERSION
    assert Path(printed.stdout.strip()) == assets_cache_dir() == cache


def test_lookup_order_env_then_kubebuilder_assets_then_cache(
    clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = {name: _fake_binary(assets_cache_dir(), name) for name in ASSET_ENV_VARS}
    assert find_binaries(build=False).as_dict() == {name: cached[name] for name in BINARY_NAMES}
    assert find_fake_node_binaries(build=False).as_dict() == {
        name: cached[name] for name in FAKE_NODE_BINARY_NAMES
    }

    kubebuilder = tmp_path / "kubebuilder"
    from_kubebuilder = _fake_binary(kubebuilder, "kube-apiserver")
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(kubebuilder))
    assert locate_binary("kube-apiserver") == from_kubebuilder
    # A name missing from KUBEBUILDER_ASSETS still comes from the cache.
    assert locate_binary("kube-controller-manager") == cached["kube-controller-manager"]

    explicit = _fake_binary(tmp_path / "explicit", "my-apiserver")
    monkeypatch.setenv("TEST_ASSET_KUBE_APISERVER", str(explicit))
    assert locate_binary("kube-apiserver") == explicit
    assert find_binaries(build=False).kube_apiserver == explicit


def test_explicit_path_to_missing_file_is_an_error(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_ASSET_ETCD", "/nonexistent/etcd")
    with pytest.raises(ControlPlaneError, match="TEST_ASSET_ETCD=/nonexistent/etcd"):
        locate_binary("etcd")


def test_missing_binaries_name_the_build_command(clean_env: Path) -> None:
    with pytest.raises(ControlPlaneError) as raised:
        find_binaries(build=False)
    message = str(raised.value)
    assert "hack/build-test-assets" in message
    assert all(name in message for name in BINARY_NAMES)
    with pytest.raises(ControlPlaneError, match="TEST_ASSET_KWOK"):
        find_fake_node_binaries(build=False)


def test_failed_build_is_reported(clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing = tmp_path / "build-test-assets"
    failing.write_text("#!/bin/sh\necho no go here >&2\nexit 3\n")
    failing.chmod(0o755)
    monkeypatch.setattr(assets, "BUILD_SCRIPT", failing)
    with pytest.raises(ControlPlaneError, match="exit code 3"):
        find_binaries(build=True)
