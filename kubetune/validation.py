"""Offline validation of FineTuneJob manifests, by the same rules as the API server.

One parsed manifest or spec at a time; reading manifest files is ``kubetune.manifests``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from kubetune import api


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest: where (a dotted field path) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InvalidJob(ValueError):
    """A manifest or spec that does not validate; ``problems`` lists every error."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


_PATTERN_MEANINGS = {
    api.MODEL_NAME_PATTERN: "must be a model id like org/name (letters, digits, '-', '_', '.')",
    api.DNS_SUBDOMAIN_PATTERN: "must be a DNS subdomain: lowercase letters, digits, '-' and '.'",
    api.DNS_LABEL_PATTERN: "must be a DNS label: lowercase letters, digits and '-'",
    api.QUANTITY_PATTERN: "must be a Kubernetes quantity such as 8, 500m or 32Gi",
    api.DATA_URI_PATTERN: "must be s3://bucket/key, file://path, a local path, hf://id or builtin:name",
    api.OUTPUT_URI_PATTERN: "must be s3://bucket/prefix, file://path or a local path",
    api.NETWORK_ATTACHMENT_PATTERN: "must be a network attachment: [namespace/]name[@interface]",
}

_TYPE_NAMES = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
    "dict": "a mapping", "list": "a list", "model": "a mapping",
}  # fmt: skip


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(err: ErrorDetails) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    field = err["loc"][-1] if err["loc"] else ""
    match kind:
        case "missing":
            return "required value"
        case "extra_forbidden":
            return f'unknown field "{field}"'
        case "greater_than":
            return f"must be greater than {_number(ctx['gt'])}"
        case "greater_than_equal":
            return f"must be greater than or equal to {_number(ctx['ge'])}"
        case "less_than":
            return f"must be less than {_number(ctx['lt'])}"
        case "less_than_equal":
            return f"must be less than or equal to {_number(ctx['le'])}"
        case "string_pattern_mismatch":
            return _PATTERN_MEANINGS.get(ctx["pattern"], f"must match {ctx['pattern']}")
        case "literal_error" | "enum":
            return f"must be one of: {ctx['expected']}"
        case "string_too_long" | "too_long":
            unit = "characters" if kind == "string_too_long" else "items"
            return f"must have at most {ctx.get('max_length')} {unit}"
        case "string_too_short" | "too_short":
            return "must not be empty"
    for prefix, name in _TYPE_NAMES.items():
        if kind.startswith(prefix + "_") or kind == f"{prefix}_type":
            return f"must be {name}"
    return str(err["msg"]).lower()


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_spec_rules(spec: api.FineTuneJobSpec) -> list[Problem]:
    problems = []
    for rule in api.RULES:
        if not rule.holds(spec):
            path = f"{rule.path}.{rule.field}" if rule.field else rule.path
            problems.append(Problem(path, rule.message))
    return problems


def problems_in(document: Any) -> list[Problem]:
    """Every error in one parsed manifest, each with its dotted field path."""
    if not isinstance(document, dict):
        return [Problem("", "a FineTuneJob manifest must be a mapping")]
    head = []
    if document.get("apiVersion") != api.API_VERSION:
        head.append(Problem("apiVersion", f"must be {api.API_VERSION}"))
    if document.get("kind") != api.KIND:
        head.append(Problem("kind", f"must be {api.KIND}"))
    try:
        job = api.FineTuneJob.model_validate(document)
    except ValidationError as exc:
        errors = [
            Problem(_dotted(e["loc"]), _message(e))
            for e in exc.errors()
            if e["loc"][:1] not in (("apiVersion",), ("kind",))
        ]
        return head + errors
    return head + check_spec_rules(job.spec)


def parse_job(document: Any, source: str = "<manifest>") -> api.FineTuneJob:
    """The validated FineTuneJob of one manifest, or InvalidJob naming every problem."""
    problems = problems_in(document)
    if problems:
        raise InvalidJob(source, problems)
    return api.FineTuneJob.model_validate(document)


def export_problems(spec: api.FineTuneJobSpec, model_type: str) -> list[Problem]:
    """The exports of ``spec`` a model of ``model_type`` (config.json's) cannot have."""
    return [
        Problem(f"spec.export.formats[{i}]", f"{name}: {why}")
        for i, name in enumerate(spec.export.formats)
        if (why := api.EXPORTS[name].refusal(model_type)) is not None
    ]


def model_type_matters(spec: api.FineTuneJobSpec) -> bool:
    """Whether an export of ``spec`` supports only some model types, so that
    ``export_problems`` needs the model's."""
    return any(api.EXPORTS[name].model_types is not None for name in spec.export.formats)
