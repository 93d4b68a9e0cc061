"""lm-evaluation-harness before and after training: task checks, scores, the baseline cache
and the regression gate.

Scores are keyed ``<task>/<metric>`` (``<task>/<metric>@<filter>`` for a filter other than the
task's only one), next to the task metrics of ``evaluation.py`` in the same before/after maps.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune import api
from kubetune.storage import parse_uri
from kubetune.validation import InvalidJob, Problem

TASKS_FIELD = "spec.evaluation.harness.tasks"


@dataclass(frozen=True)
class Scores:
    values: dict[str, float]
    higher_is_better: dict[str, bool]

    def to_json(self) -> dict[str, Any]:
        return {"values": self.values, "higherIsBetter": self.higher_is_better}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scores:
        return cls(dict(data["values"]), dict(data["higherIsBetter"]))


def task_manager(include: Path | None) -> Any:
    """lm-eval's index of its own tasks, and of the YAML under ``include``."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include) if include else None)


def check_tasks(manager: Any, harness: api.Harness, include: Path | None) -> None:
    """Every name in ``harness.tasks`` is a task, group or tag (a pattern matches one at least)."""
    known: list[str] = manager.all_tasks
    problems = []
    for index, name in enumerate(harness.tasks):
        if fnmatch.filter(known, name) if any(c in name for c in "*?[") else name in known:
            continue
        close = difflib.get_close_matches(name, known, n=3)
        where = f"lm-evaluation-harness's tasks{f' or those under {harness.include}' if include else ''}"
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        problems.append(
            Problem(f"{TASKS_FIELD}[{index}]", f"no task, group or tag {name!r} among {where}{hint}")
        )
    if problems:
        raise InvalidJob("harness", problems)


def check_local_tasks(spec: api.FineTuneJobSpec) -> list[Problem]:
    """Before submitting, offline: the task names of a harness whose include is a local folder
    (with lm-eval installed). Other jobs are checked by the trainer before it trains."""
    from importlib.util import find_spec

    harness = spec.evaluation.harness
    if harness is None or harness.include is None or harness.include.startswith("s3://"):
        return []
    if find_spec("lm_eval") is None:
        return []
    folder = parse_uri(harness.include).path
    if not folder.is_dir():
        return [Problem("spec.evaluation.harness.include", f"{folder} is not a folder")]
    try:
        check_tasks(task_manager(folder), harness, folder)
    except InvalidJob as exc:
        return exc.problems
    return []


def evaluate(
    model: Any, tokenizer: Any, manager: Any, harness: api.Harness, include: Path | None, seed: int
) -> Scores:
    """The harness's scores of ``model``; data files of ``include`` tasks resolve from that folder."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    model.eval()
    try:
        with _quiet(), contextlib.chdir(include or Path.cwd()):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=harness.batch_size)
            out = simple_evaluate(
                model=lm,
                tasks=list(harness.tasks),
                num_fewshot=harness.num_fewshot,
                limit=harness.limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=0,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    finally:
        model.train(was_training)
    assert out is not None  # None only on ranks other than 0 of lm-eval's own distribution
    return scores(out["results"], out["higher_is_better"])


def scores(results: dict[str, dict[str, Any]], higher_is_better: dict[str, dict[str, bool]]) -> Scores:
    """``<task>/<metric>`` -> value from lm-eval's results (pure).

    lm-eval keys a score ``<metric>,<filter>``; the filter is named only where a task has several.
    Standard errors, aliases and non-numbers are left out.
    """
    values: dict[str, float] = {}
    better: dict[str, bool] = {}
    for task, metrics in sorted(results.items()):
        keys = [k for k in metrics if "," in k and "_stderr," not in k]
        filters = {k.split(",", 1)[1] for k in keys}
        for key in keys:
            metric, filter_ = key.split(",", 1)
            value = metrics[key]
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            name = f"{task}/{metric}" if len(filters) == 1 else f"{task}/{metric}@{filter_}"
            values[name] = float(value)
            better[name] = bool(higher_is_better.get(task, {}).get(metric, True))
    return Scores(values, better)


def regressions(before: Scores, after: Scores, max_drop: float) -> list[api.ScoreDrop]:
    """The scores that got worse by more than ``max_drop`` (pure)."""
    out = []
    for name, old in sorted(before.values.items()):
        new = after.values.get(name)
        if new is None:
            continue
        drop = old - new if before.higher_is_better.get(name, True) else new - old
        if drop > max_drop + 1e-12:
            out.append(api.ScoreDrop(score=name, before=old, after=new, drop=round(drop, 6)))
    return out


def baseline_key(spec: api.FineTuneJobSpec, include: Path | None) -> str:
    """What the base model's scores depend on: the model as loaded, the tasks and their files."""
    from lm_eval import __version__ as lm_eval_version

    harness = spec.evaluation.harness
    assert harness is not None
    quantization = spec.resolved_quantization()
    identity = {
        "model": spec.model.name or spec.model.uri,
        "revision": spec.model.revision,
        "quantization": quantization.to_wire() if quantization else None,
        "precision": spec.training.precision,
        "harness": harness.model_dump(mode="json", exclude={"include", "batch_size"}),
        "include": _tree_digest(include) if include else None,
        "lmEval": lm_eval_version,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars (tqdm's, on sys.stderr) or per-task notices in the trainer's log; the
    errors of lm-eval's logger still reach its handlers."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
