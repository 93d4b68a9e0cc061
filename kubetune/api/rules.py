"""Cross-field rules, each written once as CEL for the API server and as a Python predicate."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubetune.api.common import PARENT_SEGMENT
from kubetune.api.enums import Method
from kubetune.api.resource import FineTuneJobSpec


def _no_parent_segment(parent: str, field: str) -> Callable[[FineTuneJobSpec], bool]:
    def holds(spec: FineTuneJobSpec) -> bool:
        node: Any = spec
        for name in parent.split("."):
            node = getattr(node, name) if node is not None else None
        uri = getattr(node, field) if node is not None else None
        return uri is None or not re.search(PARENT_SEGMENT, uri)

    return holds


@dataclass(frozen=True)
class Rule:
    """A cross-field rule: CEL for the API server, the same predicate in Python for us."""

    path: str  # the schema node the rule sits on, e.g. "spec.training"
    cel: str
    message: str
    holds: Callable[[FineTuneJobSpec], bool]
    field: str | None = None  # the reported child field, for the API server's fieldPath


RULES: tuple[Rule, ...] = (
    Rule(
        path="spec.training",
        cel="!(has(self.epochs) && has(self.maxSteps))",
        message="set at most one of epochs and maxSteps",
        holds=lambda s: s.training.epochs is None or s.training.max_steps is None,
        field="maxSteps",
    ),
    Rule(
        path="spec",
        cel="!has(self.quantization) || self.method == 'qlora'",
        message="quantization applies only to method qlora",
        holds=lambda s: s.quantization is None or s.method == Method.QLORA,
        field="quantization",
    ),
    Rule(
        path="spec.dataset",
        cel="!(has(self.validation) && has(self.validationSplit))",
        message="set at most one of validation and validationSplit",
        holds=lambda s: s.dataset.validation is None or s.dataset.validation_split is None,
        field="validationSplit",
    ),
    Rule(
        path="spec.model",
        cel="has(self.name) || has(self.uri)",
        message="set name (a hub id or preset) or uri (a model in HF layout)",
        holds=lambda s: s.model.name is not None or s.model.uri is not None,
        field="name",
    ),
    Rule(
        path="spec.evaluation",
        cel="!has(self.regression) || has(self.harness)",
        message="regression gates the harness scores: set harness",
        holds=lambda s: s.evaluation.regression is None or s.evaluation.harness is not None,
        field="regression",
    ),
    Rule(
        path="spec.training",
        cel="!has(self.earlyStopping) || has(self.evalEvery)",
        message="earlyStopping needs evalEvery",
        holds=lambda s: s.training.early_stopping is None or s.training.eval_every is not None,
        field="earlyStopping",
    ),
    *(
        Rule(
            path=f"spec.{parent}",
            cel=f"!has(self.{field}) || !self.{field}.matches('{PARENT_SEGMENT}')",
            message="must not contain a '..' segment",
            holds=_no_parent_segment(parent, field),
            field=field,
        )
        for parent, field in (
            ("model", "uri"),
            ("dataset", "train"),
            ("dataset", "validation"),
            ("output", "uri"),
            ("evaluation.harness", "include"),
        )
    ),
    Rule(
        path="spec",
        cel="!has(self.export.quantize) || size(self.export.quantize) == 0"
        " || self.export.merge || self.method == 'full'",
        message="quantized exports are made from the merged model: set export.merge",
        holds=lambda s: not s.export.quantize or s.export.merge or s.method == Method.FULL,
        field="export.quantize",
    ),
)

# Fields a running job may still change. The others are frozen once the operator has started it.
MUTABLE_WHEN_STARTED = frozenset({"suspend"})


def started(obj: dict[str, Any]) -> bool:
    return bool((obj.get("status") or {}).get("startTime"))
