"""What the node changes on the host, and undoing it: the bridge and its iptables rules, the
sysctls the kubelet sets, the fixed paths, mounts, shims and cgroups it leaves (:func:`cleanup`)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .layout import (
    BRIDGE,
    FIXED_PATHS,
    GATEWAY,
    POD_SUBNET,
    RULE_COMMENT,
    SERVICE_IP,
    SYSCTLS,
    Layout,
    run,
)


def _iptables(*args: str, table: str = "filter", check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("iptables", "-w", "-t", table, *args, check=check)


def add_network(layout: Layout, forward_port: int) -> None:
    if run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
    run("ip", "addr", "replace", f"{GATEWAY}/{POD_SUBNET.prefixlen}", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
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
    if run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        run("ip", "link", "del", BRIDGE, check=False)


def _read_sysctls() -> dict[str, str]:
    values = {}
    for name in SYSCTLS:
        path = Path("/proc/sys") / name
        with contextlib.suppress(OSError):
            values[name] = path.read_text().strip()
    return values


def save_state(layout: Layout) -> None:
    if layout.saved.exists():
        return  # the state of a run that did not clean up: the original values are in there
    state = {
        "sysctls": _read_sysctls(),
        "existing_paths": [path for path in FIXED_PATHS if Path(path).exists()],
        "netns": sorted(p.name for p in Path("/run/netns").glob("*")) if Path("/run/netns").is_dir() else [],
    }
    layout.saved.write_text(json.dumps(state, indent=2) + "\n")


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
            if run("umount", mount_point, check=False).returncode != 0:
                run("umount", "--lazy", mount_point, check=False)
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
                run("umount", str(entry), check=False)
                entry.unlink(missing_ok=True)
    for path in FIXED_PATHS:
        if path not in saved.get("existing_paths", []):
            target = Path(path)
            if target.is_symlink():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
    layout.saved.unlink()
