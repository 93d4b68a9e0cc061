"""Starting and stopping control planes of their own: nothing is left behind, also when
startup fails, and the failure says why."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from kubernetes import client as k8s

from kubetune_testkit.controlplane import ControlPlane, ControlPlaneError, find_binaries, wait_until

pytestmark = pytest.mark.controlplane

REPO = Path(__file__).resolve().parents[2]


def processes_using(path: Path) -> list[int]:
    """Pids whose command line mentions ``path``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(int(entry.name))
    return found


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make the control plane create its temporary work dir under ``tmp_path``."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_stop_kills_processes_and_removes_the_work_dir(private_tmp: Path) -> None:
    with ControlPlane(controller_manager=False) as plane:
        work_dir = plane.work_dir
        assert work_dir.parent == private_tmp
        assert len(processes_using(work_dir)) == 2
        with plane.admin_api_client() as api:
            assert k8s.CoreV1Api(api).read_namespace("default").status is not None
        assert set(plane.process_logs()) == {"etcd", "kube-apiserver"}
    assert not work_dir.exists()
    assert processes_using(work_dir) == []
    plane.stop()  # a second stop is harmless


def test_failed_start_reports_the_log_and_cleans_up(private_tmp: Path) -> None:
    plane = ControlPlane(controller_manager=False, apiserver_args=["--no-such-flag=1"])
    with pytest.raises(ControlPlaneError) as raised:
        plane.start()
    message = str(raised.value)
    assert "kube-apiserver exited" in message
    assert "no-such-flag" in message
    assert list(private_tmp.iterdir()) == []
    assert processes_using(private_tmp) == []
    assert not plane.started


def test_processes_die_with_their_parent(tmp_path: Path) -> None:
    work_dir = tmp_path / "plane"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from kubetune_testkit.controlplane import ControlPlane\n"
            f"ControlPlane(controller_manager=False, work_dir={str(work_dir)!r}).start()\n"
            "print('ready', flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline().strip() == "ready"
        assert len(set(processes_using(work_dir)) - {parent.pid}) == 2
    finally:
        parent.kill()
        parent.wait()
    # SIGTERM starts kube-apiserver's graceful shutdown, which takes a while on a loaded machine.
    wait_until(lambda: not processes_using(work_dir), timeout=90, what="etcd and kube-apiserver to exit")


def test_dev_cluster_up_and_down(tmp_path: Path) -> None:
    find_binaries()  # build outside the script's startup timeout if needed
    script = REPO / "hack" / "dev-cluster"
    env = {**os.environ, "DEV_CLUSTER_DIR": str(tmp_path / "dev")}
    try:
        up = subprocess.run(
            [str(script), "up"], env=env, capture_output=True, text=True, check=False, timeout=300
        )
        assert up.returncode == 0, up.stderr
        kubeconfig = Path(up.stdout.strip().splitlines()[-1])
        assert kubeconfig == tmp_path / "dev" / "kubeconfig"
        kubectl = find_binaries(build=False).kubectl

        def names(kind: str) -> str:
            command = [str(kubectl), f"--kubeconfig={kubeconfig}", "get", kind, "-o", "name"]
            return subprocess.run(command, capture_output=True, text=True, check=True).stdout

        assert "namespace/kube-system" in names("namespaces")
        if (REPO / "crds").is_dir():
            assert "finetunejobs.kubetune.io" in names("crd")
        again = subprocess.run(
            [str(script), "up"], env=env, capture_output=True, text=True, check=False, timeout=60
        )
        assert again.returncode == 0 and again.stdout.strip() == str(kubeconfig)
    finally:
        down = subprocess.run(
            [str(script), "down"], env=env, capture_output=True, text=True, check=False, timeout=120
        )
    assert down.returncode == 0, down.stderr
    assert processes_using(tmp_path / "dev") == []
    status = subprocess.run(
        [str(script), "status"], env=env, capture_output=True, text=True, check=False, timeout=60
    )
    assert status.returncode == 1
