"""The operator records the memory plan's verdict as the MemoryPlan condition; it never blocks."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kubetune import api
from kubetune.operator import observe as obs
from kubetune.operator.conditions import ConditionType

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def spec(model: str, **sections: Any) -> api.FineTuneJobSpec:
    return api.FineTuneJobSpec.model_validate(
        {"model": {"name": model}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/"}}
        | sections
    )


def update(s: api.FineTuneJobSpec, status: dict[str, Any] | None = None) -> obs.StatusUpdate:
    return obs.observe(None, [], spec=s, status=status or {}, generation=1, job_name="j", now=NOW)


def condition(u: obs.StatusUpdate) -> dict[str, Any]:
    return next(c for c in u.fields()["conditions"] if c["type"] == ConditionType.MEMORY_PLAN)


def test_a_job_that_does_not_fit_gets_a_false_condition_and_one_warning_but_is_not_failed() -> None:
    big = spec("meta-llama/Llama-3.1-70B", method="lora", resources={"gpus": 1})
    first = update(big)
    plan = condition(first)
    assert plan["status"] == "False" and plan["reason"] == "DoesNotFit"
    assert "does not fit; would fit with:" in plan["message"] and "method: qlora" in plan["message"]
    assert first.phase == obs.PENDING
    assert [e.reason for e in first.events if e.type == "Warning"] == ["MemoryPlan"]
    again = update(big, first.fields())
    assert condition(again)["lastTransitionTime"] == plan["lastTransitionTime"]
    assert not [e for e in again.events if e.reason == "MemoryPlan"]


def test_a_job_that_fits_gets_a_true_condition_with_its_figures() -> None:
    fits = condition(update(spec("meta-llama/Llama-3.1-8B", method="full", resources={"gpus": 8})))
    assert fits["status"] == "True" and fits["reason"] == "Fits"
    assert "GiB per GPU of 80.0 GiB (8 process(es), fsdp): fits" in fits["message"]


def test_a_model_it_cannot_size_gets_no_condition() -> None:
    u = update(spec("someone/unknown-model"))
    assert all(c["type"] != ConditionType.MEMORY_PLAN for c in u.fields()["conditions"])
