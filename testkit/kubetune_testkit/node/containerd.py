"""Talking to the node's containerd: images imported from buildah, tasks killed at the end."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from .layout import (
    IMAGE_ID_LABEL,
    Layout,
    NodeError,
    log,
    node_cache_dir,
    run,
)


def ctr(layout: Layout, *args: str, check: bool = True, timeout: float = 120.0) -> str:
    return run(
        "ctr", "--address", str(layout.containerd_socket), "--namespace", "k8s.io", *args,
        check=check, timeout=timeout,
    ).stdout  # fmt: skip


def _buildah_image_id(image: str) -> str:
    result = run("buildah", "inspect", "--type", "image", "--format", "{{.FromImageID}}", image, check=False)
    if result.returncode != 0:
        raise NodeError(f"image {image} is not built; run `hack/build-images` first")
    return result.stdout.strip()


def import_images(layout: Layout, images: Sequence[str]) -> None:
    """Copy ``images`` from buildah's storage into containerd, unless the same image id is
    there already (kept as a label on containerd's image)."""
    listed = ctr(layout, "images", "ls")
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
            ctr(layout, "images", "rm", "--sync", image, timeout=600)
        started = time.monotonic()
        archive = node_cache_dir() / f".import-{os.getpid()}.tar"
        archive.parent.mkdir(parents=True, exist_ok=True)
        try:
            run("buildah", "push", "--quiet", image, f"docker-archive:{archive}:{image}", timeout=1800)
            ctr(layout, "images", "import", "--snapshotter", "overlayfs", str(archive), timeout=1800)
        finally:
            archive.unlink(missing_ok=True)  # several GB for the trainer
        ctr(layout, "images", "label", image, f"{IMAGE_ID_LABEL}={image_id}")
        log(f"imported {image} in {time.monotonic() - started:.0f}s")


def kill_tasks(layout: Layout) -> None:
    if not layout.containerd_socket.exists():
        return
    for task in ctr(layout, "tasks", "ls", "-q", check=False).split():
        ctr(layout, "tasks", "kill", "--signal", "SIGKILL", task, check=False)
    deadline = time.monotonic() + 15
    for task in ctr(layout, "tasks", "ls", "-q", check=False).split():
        while time.monotonic() < deadline:
            if run("ctr", "--address", str(layout.containerd_socket), "-n", "k8s.io", "tasks", "delete",
                    task, check=False).returncode == 0:  # fmt: skip
                break
            time.sleep(0.3)
    for container in ctr(layout, "containers", "ls", "-q", check=False).split():
        ctr(layout, "containers", "rm", container, check=False)
