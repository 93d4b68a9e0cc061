"""The operator turns the trainer's verdict on its harness scores into the Regressed condition."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kubetune import api
from kubetune.operator import observe as obs
from kubetune.operator.conditions import ConditionType

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SPEC = api.FineTuneJobSpec.model_validate(
    {
        "model": {"name": "someone/unknown-model"},
        "dataset": {"train": "s3://data/t.jsonl"},
        "output": {"uri": "s3://out/"},
        "evaluation": {"harness": {"tasks": ["arc_easy"]}, "regression": {"maxDrop": 0.02}},
    }
)
DROP = {"score": "arc_easy/acc", "before": 0.61, "after": 0.52, "drop": 0.09}


def update(status: dict[str, Any]) -> obs.StatusUpdate:
    return obs.observe(None, [], spec=SPEC, status=status, generation=1, job_name="j", now=NOW)


def regressed(u: obs.StatusUpdate) -> dict[str, Any] | None:
    return next((c for c in u.fields()["conditions"] if c["type"] == ConditionType.REGRESSED), None)


def test_no_condition_before_the_trainer_has_judged() -> None:
    assert regressed(update({"results": {"before": {"arc_easy/acc": 0.61}}})) is None


def test_a_drop_beyond_the_gate_is_a_true_condition_with_one_warning() -> None:
    first = update({"results": {"regressions": [DROP]}})
    condition = regressed(first)
    assert condition is not None
    assert condition["status"] == "True" and condition["reason"] == "ScoresDropped"
    assert condition["message"] == "arc_easy/acc 0.61 -> 0.52 (-0.09)"
    assert [e.reason for e in first.events if e.type == "Warning"] == ["Regressed"]
    again = update({**first.fields(), "results": {"regressions": [DROP]}})
    assert not [e for e in again.events if e.reason == "Regressed"]


def test_no_drop_is_a_false_condition() -> None:
    condition = regressed(update({"results": {"regressions": []}}))
    assert condition is not None and condition["status"] == "False" and condition["reason"] == "WithinMaxDrop"
