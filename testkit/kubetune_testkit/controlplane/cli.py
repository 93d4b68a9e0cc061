"""The command line of the test control plane (used by ``hack/dev-cluster``)::

python -m kubetune_testkit.controlplane assets [--kueue]            # print binaries, build if missing
python -m kubetune_testkit.controlplane serve --dir DIR [--kueue]   # run until SIGTERM
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from kubetune_testkit import controlplane as package

from . import assets
from .assets import find_binaries, find_fake_node_binaries, find_kueue
from .components import FakeNode
from .errors import ControlPlaneError
from .plane import ControlPlane
from .processes import serve_until_signal


def _serve(
    work_dir: Path, controller_manager: bool, crds: Sequence[Path], fake_nodes: int, kueue: bool
) -> int:
    nodes = [FakeNode(f"fake-gpu-{index}", gpus=8) for index in range(fake_nodes)]
    plane = ControlPlane(
        controller_manager=controller_manager, work_dir=work_dir, crds=crds, fake_nodes=nodes, kueue=kueue
    )
    return serve_until_signal(
        plane,
        work_dir,
        what="control plane",
        state=lambda: {
            "server": plane.server,
            "kubeconfig": str(plane.kubeconfig_path),
            "logs": {name: str(path) for name, path in plane.process_logs().items()},
        },
        ready=lambda: f"control plane ready at {plane.server}; kubeconfig: {plane.kubeconfig_path}",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_testkit.controlplane",
        description=f"{package.__doc__}\n{assets.__doc__}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    locate = commands.add_parser("assets", help="print where the binaries are, building them if missing")
    locate.add_argument("--no-build", action="store_true", help="fail instead of building missing binaries")
    locate.add_argument("--kueue", action="store_true", help="Kueue too")
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
    serve.add_argument(
        "--kueue", action="store_true", help="run Kueue too (Jobs only), with its CRDs and webhooks"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "assets":
            binaries = {
                **find_binaries(build=not args.no_build).as_dict(),
                **find_fake_node_binaries(build=not args.no_build).as_dict(),
            }
            if args.kueue:
                binaries["kueue"] = find_kueue(build=not args.no_build).binary
            for name, path in binaries.items():
                print(f"{name}\t{path}")
            return 0
        return _serve(
            args.dir.resolve(),
            controller_manager=not args.no_controller_manager,
            crds=args.crds,
            fake_nodes=args.fake_nodes,
            kueue=args.kueue,
        )
    except ControlPlaneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
