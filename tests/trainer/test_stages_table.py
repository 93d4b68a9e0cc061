"""The stage table: which stages run for which spec, where, and how a skipped one is reported."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kubetune import api
from kubetune.trainer import pipeline
from kubetune.trainer.context import RunContext
from kubetune.trainer.reporter import SilentReporter

from .conftest import tiny_job

Stage = api.Stage
NO_BASELINE = {"metrics": ["loss"], "baseline": False}


def running(**spec: Any) -> list[Stage]:
    job = tiny_job(**spec)
    return [step.stage for step in pipeline.STAGES if step.when(job.spec)]


def test_the_table_lists_every_stage_once_in_the_flows_order() -> None:
    assert [step.stage for step in pipeline.STAGES] == list(Stage)


def test_rank_0_alone_evaluates_and_publishes_and_fetch_runs_once_per_node() -> None:
    assert {s.stage for s in pipeline.STAGES if s.main_only} == {
        Stage.BASELINE, Stage.EVALUATE, Stage.MERGE, Stage.QUANTIZE, Stage.PUSH,
    }  # fmt: skip
    assert [s.stage for s in pipeline.STAGES if s.once_per_node] == [Stage.FETCH]


@pytest.mark.parametrize(
    ("spec", "skipped"),
    [
        ({"export": {"merge": True, "formats": ["bnb-4bit"]}}, set()),
        ({}, {Stage.MERGE, Stage.QUANTIZE}),
        ({"evaluation": NO_BASELINE, "export": {"merge": True}}, {Stage.BASELINE, Stage.QUANTIZE}),
        (
            {"evaluation": {**NO_BASELINE, "harness": {"tasks": ["arc_easy"]}}, "export": {"merge": True}},
            {Stage.QUANTIZE},
        ),
        ({"method": "full", "export": {"merge": True}}, {Stage.MERGE, Stage.QUANTIZE}),
    ],
)
def test_which_stages_run_for_a_spec(spec: dict[str, Any], skipped: set[Stage]) -> None:
    assert running(**spec) == [s for s in Stage if s not in skipped]


class Recorder(SilentReporter):
    def __init__(self) -> None:
        self.started: list[Stage] = []
        self.finished: list[Stage] = []

    def stage_started(self, stage: Stage) -> None:
        self.started.append(stage)

    def stage_finished(self, stage: Stage, seconds: float) -> None:
        self.finished.append(stage)


def test_a_skipped_stage_is_reported_only_where_the_table_says(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ran: list[Stage] = []

    def stand_in(stage: Stage) -> Any:
        def run(ctx: RunContext) -> None:
            ran.append(stage)

        return run

    steps = [replace(s, run=stand_in(s.stage)) for s in pipeline.STAGES]
    monkeypatch.setattr(pipeline, "STAGES", steps)
    recorder = Recorder()
    job = tiny_job(evaluation=NO_BASELINE)
    ctx = pipeline.execute(job, recorder, workdir=tmp_path / "work", output=str(tmp_path / "out"))
    assert ran == [Stage.FETCH, Stage.PREPARE, Stage.TRAIN, Stage.EVALUATE, Stage.PUSH]
    # Merge and quantize pass through the status with nothing to do; a skipped baseline does not.
    shown = [s for s in Stage if s != Stage.BASELINE]
    assert recorder.started == recorder.finished == shown
    assert list(ctx.timings) == [s.value for s in shown]
