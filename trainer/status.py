"""Inside the pod: progress to the FineTuneJob's status and to the trainer's /metrics."""

from __future__ import annotations

from rich.console import Console

from kubetune.trainer.reporter import ConsoleReporter, Reporter


def pod_reporter(console: Console) -> Reporter:
    return ConsoleReporter(console)
