"""Plans of the FineTuneJobs in manifest files, for the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune import api
from kubetune.memory.architecture import model_type
from kubetune.memory.plan import Plan, plan_job


def plan_files(
    paths: list[Path], *, config_path: Path | None = None, online: bool = True
) -> list[tuple[str, Plan | str]]:
    """The plan of every FineTuneJob in ``paths``, or why there is none (an invalid manifest,
    an unknown model). ``online`` reads an s3:// model's config.json from storage."""
    from kubetune.validation import InvalidJob, documents, export_problems, model_type_matters, parse_job

    out: list[tuple[str, Plan | str]] = []
    for path in paths:
        try:
            docs = list(documents(path))
        except (OSError, ValueError) as error:
            out.append((str(path), str(error)))
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


def _store(spec: api.FineTuneJobSpec, online: bool) -> Any:
    if not online:
        return None
    from kubetune.storage import ObjectStore, StorageConfig, is_s3_uri

    if not spec.model.uri or not is_s3_uri(spec.model.uri):
        return None

    return ObjectStore(StorageConfig(endpoint=spec.storage.endpoint, region=spec.storage.region))
