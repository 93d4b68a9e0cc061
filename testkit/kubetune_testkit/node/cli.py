"""The command line of the e2e node (used by ``hack/e2e-cluster``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from kubetune_testkit import node as package
from kubetune_testkit.controlplane import ControlPlaneError
from kubetune_testkit.controlplane.processes import serve_until_signal

from .cluster import Node
from .host import cleanup
from .layout import (
    GATEWAY,
    NODE_NAME,
)


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
        prog="python -m kubetune_testkit.node",
        description=package.__doc__,
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
