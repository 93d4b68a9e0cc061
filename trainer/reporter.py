"""One interface through which every stage reports: start, progress, results, end.

`kubetune run` reports to the console; inside a pod the same calls patch the FineTuneJob's
status and feed the trainer's Prometheus metrics (see ``trainer/status.py``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from kubetune import api


class Reporter(Protocol):
    def stage_started(self, stage: api.Stage) -> None: ...
    def stage_finished(self, stage: api.Stage, seconds: float) -> None: ...
    def progress(self, progress: api.Progress) -> None: ...
    def results(self, results: api.Results) -> None: ...
    def artifacts(self, artifacts: api.Artifacts) -> None: ...
    def log(self, message: str) -> None: ...


class Reporters:
    """Fan-out to several reporters."""

    def __init__(self, reporters: Sequence[Reporter]) -> None:
        self._all = list(reporters)

    def stage_started(self, stage: api.Stage) -> None:
        for r in self._all:
            r.stage_started(stage)

    def stage_finished(self, stage: api.Stage, seconds: float) -> None:
        for r in self._all:
            r.stage_finished(stage, seconds)

    def progress(self, progress: api.Progress) -> None:
        for r in self._all:
            r.progress(progress)

    def results(self, results: api.Results) -> None:
        for r in self._all:
            r.results(results)

    def artifacts(self, artifacts: api.Artifacts) -> None:
        for r in self._all:
            r.artifacts(artifacts)

    def log(self, message: str) -> None:
        for r in self._all:
            r.log(message)


class ConsoleReporter:
    """Stages as lines, training as a progress bar."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(soft_wrap=True)
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._last_line = 0.0

    def stage_started(self, stage: api.Stage) -> None:
        self.console.print(f"[bold]▶ {stage.value}[/bold]")

    def stage_finished(self, stage: api.Stage, seconds: float) -> None:
        self._close_bar()
        self.console.print(f"[green]✓[/green] {stage.value} [dim]{seconds:.1f}s[/dim]")

    def progress(self, progress: api.Progress) -> None:
        if progress.stage != api.Stage.TRAIN or not progress.total_steps:
            return
        if self._bar is None:
            self._bar = Progress(
                TextColumn("  train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=progress.total_steps, info="")
        assert self._task is not None
        info = " ".join(
            part
            for part in (
                f"loss {progress.loss:.4f}" if progress.loss is not None else "",
                f"eval {progress.eval_loss:.4f}" if progress.eval_loss is not None else "",
                f"{progress.tokens_per_second:,.0f} tok/s" if progress.tokens_per_second else "",
            )
            if part
        )
        self._bar.update(self._task, completed=progress.step or 0, info=info)
        if not self.console.is_terminal and time.monotonic() - self._last_line > 10:
            self._last_line = time.monotonic()
            self.console.print(f"  step {progress.step}/{progress.total_steps} {info}")

    def results(self, results: api.Results) -> None:
        pass  # shown in the summary table at the end

    def artifacts(self, artifacts: api.Artifacts) -> None:
        pass

    def log(self, message: str) -> None:
        self._close_bar()
        self.console.print(f"  {message}", markup=False, highlight=False)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            self._task = None


class SilentReporter:
    """For every process but rank 0: it trains, rank 0 speaks. Also the base of reporters
    that hear only some of the calls."""

    def stage_started(self, stage: api.Stage) -> None:
        pass

    def stage_finished(self, stage: api.Stage, seconds: float) -> None:
        pass

    def progress(self, progress: api.Progress) -> None:
        pass

    def results(self, results: api.Results) -> None:
        pass

    def artifacts(self, artifacts: api.Artifacts) -> None:
        pass

    def log(self, message: str) -> None:
        pass
