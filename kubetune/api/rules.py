"""Cross-field rules, each written once as CEL for the API server and as a Python predicate."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic.alias_generators import to_snake

from kubetune.api.common import EXTENDED_RESOURCE_PATTERN, NCCL_ENV_PATTERN, PARENT_SEGMENT
from kubetune.api.enums import Method
from kubetune.api.resource import FineTuneJobSpec


def _value(spec: FineTuneJobSpec, parent: str, field: str) -> Any:
    """spec.<parent>.<field> by wire (camelCase) names; None where a section on the way is unset."""
    node: Any = spec
    for name in (*parent.split("."), field):
        node = getattr(node, to_snake(name)) if node is not None else None
    return node


def _no_parent_segment(parent: str, field: str) -> Callable[[FineTuneJobSpec], bool]:
    def holds(spec: FineTuneJobSpec) -> bool:
        uri = _value(spec, parent, field)
        return uri is None or not re.search(PARENT_SEGMENT, uri)

    return holds


# The resource names Kubernetes keeps for itself; an extended resource is none of these.
RESERVED_RESOURCE_DOMAIN = r"(^|[.])kubernetes[.]io/"
RESOURCE_NAME_MAX = 253
NCCL_ENV_NAME_MAX = 128


def extended_resource_name(name: str) -> bool:
    return (
        len(name) <= RESOURCE_NAME_MAX
        and re.match(EXTENDED_RESOURCE_PATTERN, name) is not None
        and not re.search(RESERVED_RESOURCE_DOMAIN, name)
        and not name.startswith("requests.")
    )


def nccl_env_name(name: str) -> bool:
    return len(name) <= NCCL_ENV_NAME_MAX and re.match(NCCL_ENV_PATTERN, name) is not None


def _keys(parent: str, field: str, valid: Callable[[str], bool]) -> Callable[[FineTuneJobSpec], bool]:
    def holds(spec: FineTuneJobSpec) -> bool:
        return all(valid(key) for key in _value(spec, parent, field) or {})

    return holds


@dataclass(frozen=True)
class Rule:
    """A cross-field rule: CEL for the API server, the same predicate in Python for us."""

    path: str  # the schema node the rule sits on, e.g. "spec.training"
    cel: str
    message: str
    holds: Callable[[FineTuneJobSpec], bool]
    field: str | None = None  # the reported child field, for the API server's fieldPath


def _at_most_one(parent: str, first: str, second: str) -> Rule:
    """spec.<parent> sets at most one of two exclusive fields; the second is reported."""
    return Rule(
        path=f"spec.{parent}",
        cel=f"!(has(self.{first}) && has(self.{second}))",
        message=f"set at most one of {first} and {second}",
        holds=lambda s: _value(s, parent, first) is None or _value(s, parent, second) is None,
        field=second,
    )


def _needs(parent: str, field: str, needed: str, message: str) -> Rule:
    """spec.<parent>.<field> is set only together with spec.<parent>.<needed>."""
    return Rule(
        path=f"spec.{parent}",
        cel=f"!has(self.{field}) || has(self.{needed})",
        message=message,
        holds=lambda s: _value(s, parent, field) is None or _value(s, parent, needed) is not None,
        field=field,
    )


RULES: tuple[Rule, ...] = (
    _at_most_one("training", "epochs", "maxSteps"),
    Rule(
        path="spec",
        cel="!has(self.quantization) || self.method == 'qlora'",
        message="quantization applies only to method qlora",
        holds=lambda s: s.quantization is None or s.method == Method.QLORA,
        field="quantization",
    ),
    _at_most_one("dataset", "validation", "validationSplit"),
    Rule(
        path="spec.model",
        cel="has(self.name) || has(self.uri)",
        message="set name (a hub id or preset) or uri (a model in HF layout)",
        holds=lambda s: s.model.name is not None or s.model.uri is not None,
        field="name",
    ),
    _needs("evaluation", "regression", "harness", "regression gates the harness scores: set harness"),
    _needs("training", "earlyStopping", "evalEvery", "earlyStopping needs evalEvery"),
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
    # Map keys have no schema pattern in a structural schema: these two check them.
    Rule(
        path="spec.resources.network",
        cel="!has(self.extendedResources) || self.extendedResources.all(k, "
        f"size(k) <= {RESOURCE_NAME_MAX} && k.matches('{EXTENDED_RESOURCE_PATTERN}') "
        f"&& !k.matches('{RESERVED_RESOURCE_DOMAIN}') && !k.startsWith('requests.'))",
        message="keys must be extended resource names, domain/name such as rdma/rdma_shared_device_a "
        "(not in kubernetes.io)",
        holds=_keys("resources.network", "extendedResources", extended_resource_name),
        field="extendedResources",
    ),
    Rule(
        path="spec.resources.network",
        cel="!has(self.ncclEnv) || self.ncclEnv.all(k, "
        f"size(k) <= {NCCL_ENV_NAME_MAX} && k.matches('{NCCL_ENV_PATTERN}'))",
        message="keys must be NCCL_ variable names in upper case, such as NCCL_IB_HCA",
        holds=_keys("resources.network", "ncclEnv", nccl_env_name),
        field="ncclEnv",
    ),
    Rule(
        path="spec.export",
        cel="!(has(self.formats) && has(self.quantize))",
        message="set formats or its deprecated name quantize, not both",
        holds=lambda s: s.export.quantize is None,  # alone, quantize was read as formats
        field="quantize",
    ),
    Rule(
        path="spec",
        cel="((!has(self.export.formats) || size(self.export.formats) == 0)"
        " && (!has(self.export.quantize) || size(self.export.quantize) == 0))"
        " || self.export.merge || self.method == 'full'",
        message="exports are made from the merged model: set export.merge",
        holds=lambda s: not s.export.formats or s.export.merge or s.method == Method.FULL,
        field="export.formats",
    ),
)

# Fields a running job may still change. The others are frozen once the operator has started it.
MUTABLE_WHEN_STARTED = frozenset({"suspend"})


def started(obj: dict[str, Any]) -> bool:
    return bool((obj.get("status") or {}).get("startTime"))
