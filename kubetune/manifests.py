"""FineTuneJob manifest files, for the command line and the trainer: read, validate and plan them.

Above both ``kubetune.validation`` (the rules of one spec) and ``kubetune.memory`` (the plan of
one spec): a file's exports (GGUF's) are judged by the model type the memory tables know, and a
file's plan needs its jobs validated first. Neither of those two imports this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from kubetune import api
from kubetune.memory import Plan, model_type, plan_job
from kubetune.validation import (
    InvalidJob,
    Problem,
    export_problems,
    model_type_matters,
    parse_job,
    problems_in,
)


def documents(path: Path) -> Iterator[tuple[str, Any]]:
    """Each YAML document of a file, labelled `file` or `file[doc N]` when there are several."""
    text = path.read_text(encoding="utf-8")
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    for index, doc in enumerate(docs, start=1):
        yield (f"{path}[doc {index}]" if len(docs) > 1 else str(path)), doc


def load_job(path: Path) -> api.FineTuneJob:
    """The single FineTuneJob in a file; InvalidJob for anything else."""
    try:
        docs = list(documents(path))
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidJob(str(path), [Problem("", _yaml_error(exc))]) from exc
    if len(docs) != 1:
        raise InvalidJob(str(path), [Problem("", f"expected one FineTuneJob, found {len(docs)}")])
    source, doc = docs[0]
    return parse_job(doc, source)


def validate_files(paths: list[Path]) -> list[str]:
    """Error lines (`file: field.path: message`) for every manifest in every file."""
    lines: list[str] = []
    for path in paths:
        try:
            docs = list(documents(path))
        except (OSError, yaml.YAMLError) as exc:
            lines.append(f"{path}: {_yaml_error(exc)}")
            continue
        if not docs:
            lines.append(f"{path}: no FineTuneJob in file")
        for source, doc in docs:
            found = problems_in(doc)
            if not found:
                found = _offline_export_problems(parse_job(doc, source).spec)
            lines.extend(f"{source}: {p}" for p in found)
    return lines


def plan_files(
    paths: list[Path], *, config_path: Path | None = None, online: bool = True
) -> list[tuple[str, Plan | str]]:
    """The plan of every FineTuneJob in ``paths``, or why there is none (an invalid manifest,
    an unknown model). ``online`` reads an s3:// model's config.json from storage."""
    out: list[tuple[str, Plan | str]] = []
    for path in paths:
        try:
            docs = list(documents(path))
        except (OSError, yaml.YAMLError) as error:
            out.append((str(path), _yaml_error(error)))
            continue
        for source, doc in docs:
            try:
                job = parse_job(doc, source)
                if model_type_matters(job.spec):
                    refused = export_problems(job.spec, model_type(job.spec, config_path=config_path))
                    if refused:
                        out.append((source, "; ".join(str(p) for p in refused)))
                        continue
                out.append(
                    (source, plan_job(job.spec, config_path=config_path, store=_store(job.spec, online)))
                )
            except InvalidJob as error:
                out.append((source, "; ".join(str(p) for p in error.problems)))
            except ValueError as error:
                out.append((source, str(error)))
    return out


def _yaml_error(exc: Exception) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def _offline_export_problems(spec: api.FineTuneJobSpec) -> list[Problem]:
    """Known offline from the model's config.json or the built-in table; a model it cannot look
    up is left to the trainer, which checks before it trains."""
    if not model_type_matters(spec):
        return []
    try:
        return export_problems(spec, model_type(spec))
    except ValueError:
        return []


def _store(spec: api.FineTuneJobSpec, online: bool) -> Any:
    if not online:
        return None
    from kubetune.storage import ObjectStore, StorageConfig, is_s3_uri  # boto3: only when asked

    if not spec.model.uri or not is_s3_uri(spec.model.uri):
        return None

    return ObjectStore(StorageConfig(endpoint=spec.storage.endpoint, region=spec.storage.region))
