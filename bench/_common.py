"""Pieces the benchmarks in this folder share: the machine, /proc figures, subprocess sides,
argument parsing, tables on stdout and the raw JSON they leave beside themselves.

Imported as a sibling (``from _common import ...``): ``python bench/X.py`` puts bench/ first on
sys.path. The scripts that are also run with ``python -P`` put it there themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
T = TypeVar("T")
# A column of a table: its title, the key of its figure in each row, and the figure's format spec,
# alignment and width first (">9,.0f").
Column = tuple[str, str, str]

# ----------------------------------------------------------------------------- the machine


def load1() -> float:
    """The one-minute load average, taken before each measured run."""
    return os.getloadavg()[0]


def machine() -> dict[str, Any]:
    """CPU, its bf16/AMX flags, torch and transformers: what the trainer benchmarks ran on."""
    import torch
    import transformers

    flags: set[str] = set()
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "flags": sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx512_vnni"))),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


# ----------------------------------------------------------------------------- processes


def peak_rss_mb() -> float:
    """``ru_maxrss`` of this process, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_kib(field: str, pid: int | str = "self") -> int:
    """A figure of /proc/PID/status in KiB (VmRSS, VmHWM, ...). VmHWM is the process's own peak
    RSS; ru_maxrss is not: Linux carries it over from the parent across fork and exec."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(f"no {field} in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads; Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_side(
    script: str,
    result_type: Callable[..., T],
    side: str,
    repeat: int,
    settings_file: Path,
    workdir: Path,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> T:
    """One side of a trainer benchmark in its own subprocess (``script --child SIDE SETTINGS RESULT``),
    so its peak RSS is its own. The child's figures, the load before it and its tokens per second
    make a ``result_type``."""
    result_file = workdir / f"{side}-{repeat}.json"
    load = load1()
    proc = subprocess.run(
        [sys.executable, script, "--child", side, str(settings_file), str(result_file)],
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", **(env or {})},
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    raw = json.loads(result_file.read_text())
    tokens_per_second = raw["tokens"] / raw["train_seconds"]
    return result_type(side=side, repeat=repeat, tokens_per_second=tokens_per_second, load_before=load, **raw)


# ----------------------------------------------------------------------------- arguments


def parser_for(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose --help shows the script's docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_child(parser: argparse.ArgumentParser) -> None:
    """The hidden option a script's own subprocesses are started with."""
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "SETTINGS", "RESULT"), help=argparse.SUPPRESS)


def comma_list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def sides_of(parser: argparse.ArgumentParser, text: str, known: Iterable[str]) -> list[str]:
    """The comma-separated sides of ``--sides``; an unknown one is a usage error."""
    sides = comma_list(text)
    unknown = set(sides) - set(known)
    if unknown:
        parser.error(f"unknown sides: {', '.join(sorted(unknown))}")
    return sides


# ----------------------------------------------------------------------------- output


def now() -> str:
    """When a benchmark started, as its JSON records it."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def shown(value: float | None, form: str) -> str:
    """A figure in a table, or "-" where there is none."""
    return "-" if value is None else format(value, form)


def print_table(header: str, lines: Iterable[str]) -> None:
    print(header)
    print("-" * len(header))
    for line in lines:
        print(line)


def print_columns(rows: Iterable[Mapping[str, Any]], columns: Sequence[Column]) -> None:
    """A table of ``rows`` with one column each (title, key, spec); a figure of None shows as "-"."""
    widths = [re.match(r"[<>^]?\d*", spec).group() for _, _, spec in columns]  # type: ignore[union-attr]
    header = " ".join(format(title, width) for (title, _, _), width in zip(columns, widths, strict=True))
    print_table(
        header,
        (
            " ".join(
                format("-", width) if row[key] is None else format(row[key], spec)
                for (_, key, spec), width in zip(columns, widths, strict=True)
            )
            for row in rows
        ),
    )


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_results(path: Path, script: str, started: str, figures: Mapping[str, Any]) -> None:
    """The raw figures of a run, led by the command line that made them and when it started."""
    command = " ".join([".venv/bin/python", f"bench/{Path(script).name}", *sys.argv[1:]])
    write_json(path, {"command": command, "started": started, **figures})
