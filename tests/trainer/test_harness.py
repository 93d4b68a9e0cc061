"""lm-evaluation-harness before and after training, on the custom tasks of examples/harness/:
real lm-eval, real training, the baseline cache and the regression gate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from kubetune import api, contract
from kubetune.trainer import harness
from kubetune.trainer.pipeline import execute
from kubetune.trainer.run import run_job_file
from kubetune.validation import InvalidJob

from .conftest import tiny_job
from .test_pipeline import Recorder

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "examples" / "harness"
pytestmark = pytest.mark.training


class LogRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def harness_spec(**extra: Any) -> dict[str, Any]:
    return {
        "metrics": ["loss"],
        "harness": {"tasks": ["dates_choice", "dates_iso"], "include": str(TASKS), "limit": 24},
        **extra,
    }


# Trains the embeddings and head beside the adapter, as the quickstart does: the preset starts
# from random weights, and the harness's tasks need a model that learned the dates. In fp32 on
# every CPU: on an AVX512-BF16 CPU, where auto is bf16 autocast, the same 120 steps knew 11 of 24
# dates, and 19 in fp32 on a CPU without it.
LEARN_DATES: dict[str, Any] = {
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "modulesToSave": ["embed_tokens", "lm_head"]},
    "training": {
        "maxSteps": 120,
        "learningRate": 0.003,
        "batchSize": 16,
        "maxSeqLength": 48,
        "precision": "fp32",
    },
    "export": {"merge": True},
}


def unrelated_rows() -> str:
    """JSONL rows of a task that has nothing to do with dates: spelling words backwards."""
    words = ["kettle", "harbor", "violet", "timber", "saddle", "meadow", "copper", "lantern"]
    return "".join(
        json.dumps({"prompt": f"Word: {w}{i}\nReversed:", "completion": f" {(w + str(i))[::-1]}"}) + "\n"
        for i in range(40)
        for w in words
    )


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A quickstart with the harness and the regression gate; its merged model is the base of
    the run that regresses."""
    out = tmp_path_factory.mktemp("learned") / "run"
    job = tiny_job("learned", evaluation=harness_spec(regression={"maxDrop": 0.02}), **LEARN_DATES)
    ctx = execute(job, LogRecorder(), workdir=out.parent / "work", output=str(out))
    return ctx, out


def test_the_harness_scores_the_base_and_the_result(learned: tuple[Any, Path]) -> None:
    ctx, out = learned
    for key in ("dates_choice/acc", "dates_iso/exact_match"):
        assert key in ctx.before and key in ctx.after
    # Chance is 0.25 on four choices; the fine-tune learned the held-out dates.
    assert ctx.after["dates_choice/acc"] > ctx.before["dates_choice/acc"] + 0.3
    assert ctx.after["dates_iso/exact_match"] > 0.5 > ctx.before["dates_iso/exact_match"]
    assert ctx.regressions == []  # the gate does not trip on a run that improved
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["harness"]["after"] == {k: v for k, v in ctx.after.items() if "/" in k}
    assert metrics["harness"]["regressions"] == []
    assert {"harness-before", "harness-after"} <= set(metrics["stageSeconds"])
    card = (out / "README.md").read_text()
    assert "| dates_choice/acc |" in card and "Regression gate (maxDrop 0.02)" in card


def test_a_result_that_forgets_trips_the_gate_after_publishing(
    learned: tuple[Any, Path], tmp_path: Path
) -> None:
    """The learned model fine-tuned hard on unrelated rows forgets the dates: Regressed, and with
    failOnRegression the distinct exit code, after the artifacts are published."""
    _, base = learned
    unrelated = tmp_path / "reverse.jsonl"
    unrelated.write_text(unrelated_rows())
    job = tiny_job(
        "forgets",
        model={"uri": str(base / "merged")},
        dataset={"train": str(unrelated), "validationSplit": 0.05, "format": "prompt-completion"},
        method="full",
        training={"maxSteps": 40, "learningRate": 0.003, "batchSize": 16, "maxSeqLength": 48},
        evaluation=harness_spec(regression={"maxDrop": 0.02, "failOnRegression": True}),
    )
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job.to_wire()))
    out = tmp_path / "out"
    console = Console(record=True, width=200)
    code = run_job_file(path, LogRecorder(), console, output=str(out), workdir=tmp_path / "work")

    assert code == contract.REGRESSED_EXIT_CODE, console.export_text()
    assert "regressed beyond maxDrop 0.02" in console.export_text()
    assert (out / "manifest.json").exists()  # published first, then failed
    drops = json.loads((out / "metrics.json").read_text())["harness"]["regressions"]
    assert "dates_iso/exact_match" in {d["score"] for d in drops}
    assert all(d["drop"] > 0.02 and d["before"] - d["after"] == pytest.approx(d["drop"]) for d in drops)


def test_the_base_models_scores_are_kept_for_the_next_run(tmp_path: Path) -> None:
    quick = {"training": {"maxSteps": 2, "batchSize": 8, "maxSeqLength": 32}}
    job = tiny_job("first", evaluation=harness_spec(), **quick)
    first = LogRecorder()
    a = execute(job, first, workdir=tmp_path / "w1", output=str(tmp_path / "sweep" / "first"))
    cached = list((tmp_path / "sweep" / ".harness-baselines").glob("*.json"))
    assert len(cached) == 1
    second = LogRecorder()
    job = tiny_job("second", evaluation=harness_spec(), **quick)
    b = execute(job, second, workdir=tmp_path / "w2", output=str(tmp_path / "sweep" / "second"))
    assert "harness-before" in a.timings and "harness-before" not in b.timings
    assert any("scores from" in line for line in second.lines)
    assert b.harness_before == a.harness_before

    # Another task set is another baseline.
    job = tiny_job(
        "third",
        evaluation={
            **harness_spec(),
            "harness": {"tasks": ["dates_choice"], "include": str(TASKS), "limit": 24},
        },
        **quick,
    )
    c = execute(job, LogRecorder(), workdir=tmp_path / "w3", output=str(tmp_path / "sweep" / "third"))
    assert "harness-before" in c.timings
    assert set(c.harness_before.values if c.harness_before else {}) == {"dates_choice/acc"}


def test_a_task_that_does_not_exist_fails_before_training(tmp_path: Path) -> None:
    evaluation = harness_spec()
    evaluation["harness"]["tasks"] = ["dates_choice", "dates_isoo"]
    recorder = LogRecorder()
    with pytest.raises(InvalidJob) as caught:
        execute(
            tiny_job(evaluation=evaluation), recorder, workdir=tmp_path / "w", output=str(tmp_path / "out")
        )
    assert "spec.evaluation.harness.tasks[1]" in str(caught.value)
    assert "did you mean dates_iso" in str(caught.value)
    assert api.Stage.TRAIN.value not in recorder.stages


def test_the_baseline_key_follows_the_task_files(tmp_path: Path) -> None:
    include = tmp_path / "tasks"
    shutil.copytree(TASKS, include)
    spec = tiny_job(evaluation=harness_spec()).spec
    key = harness.baseline_key(spec, include)
    assert harness.baseline_key(spec, include) == key
    data = include / "dates.jsonl"
    data.write_text(data.read_text().replace("ISO: ", "ISO:  ", 1))
    assert harness.baseline_key(spec, include) != key
    other = tiny_job(evaluation=harness_spec(harness={"tasks": ["dates_iso"], "include": str(include)})).spec
    assert harness.baseline_key(other, include) != harness.baseline_key(spec, include)


def test_scores_name_the_task_and_metric_and_filter_only_when_several() -> None:
    results: dict[str, dict[str, Any]] = {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.01, "acc_norm,none": 0.55},
        "gsm8k": {"exact_match,strict": 0.2, "exact_match,flexible": 0.3, "exact_match_stderr,strict": "N/A"},
        "wikitext": {"word_perplexity,none": 30.0},
    }
    better = {
        "arc_easy": {"acc": True, "acc_norm": True},
        "gsm8k": {"exact_match": True},
        "wikitext": {"word_perplexity": False},
    }
    scores = harness.scores(results, better)
    assert scores.values == {
        "arc_easy/acc": 0.5,
        "arc_easy/acc_norm": 0.55,
        "gsm8k/exact_match@strict": 0.2,
        "gsm8k/exact_match@flexible": 0.3,
        "wikitext/word_perplexity": 30.0,
    }
    assert scores.higher_is_better["wikitext/word_perplexity"] is False


def test_a_drop_is_measured_in_the_direction_that_is_worse() -> None:
    better = {"a/acc": True, "w/word_perplexity": False}
    before = harness.Scores({"a/acc": 0.60, "w/word_perplexity": 30.0}, better)
    after = harness.Scores({"a/acc": 0.59, "w/word_perplexity": 30.5}, better)
    assert harness.regressions(before, after, max_drop=0.02) == [
        api.ScoreDrop(score="w/word_perplexity", before=30.0, after=30.5, drop=0.5)
    ]
    improved = harness.Scores({"a/acc": 0.9, "w/word_perplexity": 10.0}, better)
    assert harness.regressions(before, improved, max_drop=0.02) == []


def test_validate_names_an_unknown_task_of_a_local_include(tmp_path: Path) -> None:
    manifest = (ROOT / "examples" / "quickstart-harness.yaml").read_text()
    assert "include: examples/harness" in manifest
    manifest = manifest.replace("include: examples/harness", f"include: {TASKS}")
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(manifest)
    bad.write_text(manifest.replace("dates_iso]", "dates_isoo]"))
    run = [sys.executable, "-m", "kubetune", "validate"]
    assert subprocess.run([*run, str(good)], cwd=tmp_path, check=False).returncode == 0
    result = subprocess.run([*run, str(bad)], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert f"{bad}: spec.evaluation.harness.tasks[1]: no task, group or tag 'dates_isoo'" in result.stderr
