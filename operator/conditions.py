"""The conditions of a FineTuneJob (metav1.Condition style): their types and how one is set (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any, NamedTuple

MESSAGE_LIMIT = 1024


class ConditionType(StrEnum):
    """The condition types on a FineTuneJob; the CRD and clients know them by these values."""

    CREATED = "Created"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    MEMORY_PLAN = "MemoryPlan"  # the memory plan's verdict; informative, it never blocks
    REGRESSED = "Regressed"  # the regression gate's verdict on the trainer's harness scores


# The order of the lifecycle conditions in status; any other type follows them.
ORDER = (
    ConditionType.CREATED,
    ConditionType.RUNNING,
    ConditionType.SUSPENDED,
    ConditionType.SUCCEEDED,
    ConditionType.FAILED,
)


class Condition(NamedTuple):
    """One condition as the operator wants it; ``set_condition`` writes it."""

    type: ConditionType
    status: bool
    reason: str
    message: str


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    *,
    now: str,
    generation: int,
) -> list[dict[str, Any]]:
    """``conditions`` with one condition set; its lastTransitionTime moves only when status does."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c.get("type") == type_), None)
    since = old["lastTransitionTime"] if old and old.get("status") == value else now
    new = {
        "type": str(type_),
        "status": value,
        "reason": reason,
        "message": message[:MESSAGE_LIMIT],
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }
    out = [dict(c) for c in conditions if c.get("type") != type_]
    out.append(new)
    return sorted(out, key=lambda c: ORDER.index(c["type"]) if c["type"] in ORDER else len(ORDER))


def find_condition(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any]:
    """The condition of that type, or an empty mapping."""
    return next((c for c in conditions if c.get("type") == type_), {})
