"""`kubetune run` (this machine) and `kubetune trainer` (inside the operator's pod)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import warnings
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from kubetune.trainer.context import RunContext

from kubetune import contract
from kubetune.manifests import load_job
from kubetune.storage import StorageError
from kubetune.trainer import distributed
from kubetune.trainer.distributed import Launch
from kubetune.trainer.presets import cache_root
from kubetune.trainer.reporter import ConsoleReporter, Reporter, SilentReporter
from kubetune.validation import InvalidJob


def quiet_libraries() -> None:
    """Our reporter speaks for the run; the libraries' own bars and notices would drown it."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="(transformers|peft|bitsandbytes|torch|accelerate)")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def run_job_file(
    path: Path, reporter: Reporter, console: Console, *, output: str | None, workdir: Path
) -> int:
    """Every stage of the job in this process; the exit code, also recorded for the launcher."""
    code = contract.FAILURE
    try:
        code = _run_job_file(path, reporter, console, output=output, workdir=workdir)
    except Exception as exc:
        if not distributed.peer_lost(exc):
            raise
        console.print(f"error: another process of the job went away: {exc}", markup=False, highlight=False)
        code = contract.PEER_LOST_EXIT_CODE
    finally:
        distributed.record_exit(code)
    return code


def _run_job_file(
    path: Path, reporter: Reporter, console: Console, *, output: str | None, workdir: Path
) -> int:
    try:
        job = load_job(path)
    except InvalidJob as exc:
        console.print(str(exc), markup=False, highlight=False)
        return contract.CONFIG_ERROR_EXIT_CODE
    quiet_libraries()
    from kubetune.trainer.checkpoints import Interrupted
    from kubetune.trainer.data import DataError
    from kubetune.trainer.pipeline import execute

    try:
        ctx = execute(job, reporter, workdir=workdir, output=output)
    except (DataError, InvalidJob) as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        return contract.CONFIG_ERROR_EXIT_CODE
    except (StorageError, Interrupted) as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        return contract.FAILURE
    if distributed.is_main():
        summary(ctx, console)
    gate = job.spec.evaluation.regression
    if ctx.regressions and gate is not None and gate.fail_on_regression:
        drops = "; ".join(d.summary() for d in ctx.regressions)
        console.print(
            f"error: regressed beyond maxDrop {gate.max_drop:g}: {drops}", markup=False, highlight=False
        )
        return contract.REGRESSED_EXIT_CODE
    return contract.OK


def run_local(path: Path, output: str | None = None, launch: Launch | None = None) -> int:
    """`kubetune run`: this process, or one per `--nproc-per-node` under torchrun."""
    console = Console(soft_wrap=True)
    given = os.environ.get(contract.WORKDIR_ENV)
    workdir = (
        Path(given) if given else Path(tempfile.mkdtemp(prefix="run-", dir=_ensure(cache_root() / "work")))
    )
    try:
        if launch is not None and launch.needed and not distributed.launched():
            argv = ["run", str(path), *(["--output", output] if output else [])]
            code = launch_workers(launch, argv, {contract.WORKDIR_ENV: str(workdir)})
        else:
            reporter = ConsoleReporter(console) if distributed.is_main() else SilentReporter()
            code = run_job_file(path, reporter, console, output=output, workdir=workdir)
    finally:
        if not given:
            shutil.rmtree(workdir, ignore_errors=True)
    # Bad input is exit status 1 on the command line; the pod's distinct code is for the Job.
    return contract.FAILURE if code == contract.CONFIG_ERROR_EXIT_CODE else code


def run_in_pod(config: Path) -> int:
    """`kubetune trainer`: one process per GPU (and node) under torchrun when there are several."""
    console = Console(soft_wrap=True)
    if not distributed.launched():
        try:
            job = load_job(config)
        except InvalidJob as exc:
            console.print(str(exc), markup=False, highlight=False)
            return contract.CONFIG_ERROR_EXIT_CODE
        job_id = f"{job.metadata.namespace or 'default'}-{job.metadata.name}"
        launch = distributed.pod_launch(job.spec.resources.gpus, job_id)
        if launch.needed:
            return launch_workers(launch, ["trainer", "--config", str(config)], {})
    from kubetune.trainer.status import pod_reporter

    reporter = pod_reporter(console) if distributed.is_main() else SilentReporter()
    workdir = Path(os.environ.get(contract.WORKDIR_ENV, contract.WORK_DIR))
    output = os.environ.get(contract.OUTPUT_ENV)
    return run_job_file(config, reporter, console, output=output, workdir=workdir)


def launch_workers(launch: Launch, argv: list[str], env: dict[str, str]) -> int:
    """torchrun with one process per GPU; SIGTERM and SIGINT are passed on to it.

    This process is PID 1 of the pod: the kubelet's SIGTERM reaches it alone. torchrun sends it
    on to every worker (each finishes its step and checkpoints) and kills them only after
    its --shutdown-timeout, set from the pod's grace period. The exit code is the most telling
    one the workers recorded (torchrun only says that one failed).
    """
    with tempfile.TemporaryDirectory(prefix="kubetune-exit-") as folder:
        proc = subprocess.Popen(launch.command(argv), env=os.environ | env | {contract.EXIT_DIR_ENV: folder})

        def forward(signum: int, frame: FrameType | None) -> None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            returncode = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return contract.combined(distributed.recorded_exits(Path(folder)), returncode, nodes=launch.nnodes)


def summary(ctx: RunContext, console: Console) -> None:
    table = Table(title=f"{ctx.job.metadata.name}: {ctx.spec.method}", title_justify="left")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in sorted(set(ctx.before) | set(ctx.after)):
        table.add_row(key, _cell(ctx.before.get(key)), _cell(ctx.after.get(key)))
    console.print(table)
    console.print(f"artifacts: {ctx.output}", markup=False, highlight=False)
    entries = sorted((p.name, "/" if p.is_dir() else "") for p in ctx.staging.iterdir())
    for name, note in [*entries, (contract.MANIFEST, "  (every file, with its size and SHA-256)")]:
        console.print(f"  {ctx.output.join(name)}{note}", markup=False, highlight=False)


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
