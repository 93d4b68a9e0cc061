"""Generate the FineTuneJob CustomResourceDefinition from the API models.

pydantic's JSON Schema is turned into the structural OpenAPI v3 schema the API server
requires: references inlined, nullable unions collapsed, bounds in OpenAPI's form, defaults
that let the server fill nested objects, and the CEL rules of ``api.RULES`` attached where
they belong.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from kubetune import api

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
    {
        "name": "Progress",
        "type": "integer",
        "jsonPath": ".status.progress.percent",
        "description": "Percent of training steps done.",
    },
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

_KEPT_KEYWORDS = (
    "type", "description", "enum", "minimum", "maximum", "minLength", "maxLength",
    "pattern", "minItems", "maxItems", "maxProperties", "required",
)  # fmt: skip


def _models() -> dict[str, type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {}
    pending: list[type[BaseModel]] = [api.FineTuneJob]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        for info in cls.model_fields.values():
            for arg in _type_args(info.annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel) and arg.__name__ not in found:
                    pending.append(arg)
    return found


def _type_args(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", None)
    if not args:
        return [annotation]
    return [a for arg in args for a in _type_args(arg)]


def _default(info: Any) -> Any:
    """The default the API server should fill in, or None when omitting is the same."""
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.is_required() or info.default is None:
        return None
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return {}  # the server then fills the nested object's own defaults
    if isinstance(value, list | dict):
        dumped = [getattr(v, "value", v) for v in value] if isinstance(value, list) else value
        return dumped or None
    return getattr(value, "value", value)


class _Converter:
    def __init__(self, schema: dict[str, Any]) -> None:
        self.defs: dict[str, Any] = schema.get("$defs", {})
        self.models = _models()

    def node(self, schema: dict[str, Any], path: str, model: str | None = None) -> dict[str, Any]:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            merged = {**self.defs[name], **{k: v for k, v in schema.items() if k != "$ref"}}
            return self.node(merged, path, name if "properties" in self.defs[name] else None)
        if "anyOf" in schema:
            options = [o for o in schema["anyOf"] if o.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"{path}: unions are not structural")
            outer = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
            return self.node({**options[0], **outer}, path)
        out: dict[str, Any] = {k: schema[k] for k in _KEPT_KEYWORDS if k in schema}
        if "const" in schema:  # a Literal of one value
            out["enum"] = [schema["const"]]
        for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if bound in schema:
                out[plain] = schema[bound]
                out[bound] = True
        if "enum" in schema and "type" not in out:
            out["type"] = "string" if isinstance(schema["enum"][0], str) else "integer"
        if out.get("type") == "array":
            out["items"] = self.node(schema["items"], path + "[]")
        if out.get("type") == "object":
            self._object(schema, out, path, model)
        rules = [self._rule(r) for r in api.RULES if r.path == path]
        if rules:
            out["x-kubernetes-validations"] = rules
        return out

    def _object(self, schema: dict[str, Any], out: dict[str, Any], path: str, model: str | None) -> None:
        extra = schema.get("additionalProperties")
        if "properties" in schema:
            cls = self.models[model or schema["title"]]
            by_alias = {info.alias or name: info for name, info in cls.model_fields.items()}
            props = {}
            for key, sub in schema["properties"].items():
                props[key] = self.node(sub, f"{path}.{key}")
                default = _default(by_alias[key]) if key in by_alias else None
                if default is not None and key not in schema.get("required", []):
                    props[key]["default"] = default
            out["properties"] = props
        elif isinstance(extra, dict):
            out["additionalProperties"] = self.node(extra, path + "{}")
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True

    @staticmethod
    def _rule(rule: api.Rule) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": rule.cel, "message": rule.message}
        if rule.field:
            out["fieldPath"] = f".{rule.field}"
        return out


def _free_form(schema: dict[str, Any]) -> bool:
    return "x-kubernetes-preserve-unknown-fields" in schema


def _freeze_rules(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Root rules: once the operator has started a job, its spec is frozen but for suspend."""
    compared: list[tuple[str, bool]] = []  # (field path under spec, always present)
    for field, sub in spec["properties"].items():
        if field in api.MUTABLE_WHEN_STARTED:
            continue
        children = sub.get("properties", {})
        if any(_free_form(child) for child in children.values()):
            # CEL cannot see inside free-form maps: compare their siblings one by one.
            compared += [(f"{field}.{name}", False) for name, c in children.items() if not _free_form(c)]
        else:
            compared.append((field, "default" in sub or field in spec.get("required", [])))
    rules = []
    for ref, always in compared:
        new, old = f"self.spec.{ref}", f"oldSelf.spec.{ref}"
        same = (
            f"{new} == {old}" if always else f"(has({new}) == has({old}) && (!has({new}) || {new} == {old}))"
        )
        rules.append(
            {
                "rule": f"!has(oldSelf.status) || !has(oldSelf.status.startTime) || {same}",
                "message": "is immutable once the job has started (only suspend may change)",
                "fieldPath": f".spec.{ref}",
            }
        )
    return rules


def openapi_schema() -> dict[str, Any]:
    raw = api.FineTuneJob.model_json_schema(by_alias=True, mode="validation")
    converter = _Converter(raw)
    spec = converter.node(raw["$defs"]["FineTuneJobSpec"], "spec", "FineTuneJobSpec")
    status = converter.node(raw["$defs"]["FineTuneJobStatus"], "status", "FineTuneJobStatus")
    conditions = status["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    # apiVersion and kind take only their descriptions from the models; metadata may hold nothing
    # else than name and generateName (the API server explains it from its own ObjectMeta).
    described = {
        (info.alias or name): info.description for name, info in api.FineTuneJob.model_fields.items()
    }
    return {
        "type": "object",
        "description": api.FineTuneJob.__doc__,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": described["apiVersion"]},
            "kind": {"type": "string", "description": described["kind"]},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": _freeze_rules(spec),
    }


def custom_resource_definition() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": ["all", "kubetune"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated by `kubetune crd` from kubetune/api/. Do not edit.\n"
    return header + yaml.safe_dump(custom_resource_definition(), sort_keys=False, width=100)
