"""The Grafana dashboard queries only metrics that the operator or the trainer really export."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kubetune.operator.metrics import Metrics

from .conftest import CHART

DASHBOARD = CHART / "dashboards" / "kubetune.json"

# PromQL words that are not metric names where an identifier may stand.
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"}
TOKEN = re.compile(
    r"""
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<variable>\$\{[^}]*\}|\$\w+|\[\[\w+\]\])
    | (?P<range>\[[^\]]*\])
    | (?P<number>0x[0-9a-fA-F]+|\d+(?:\.\d+)?(?:e[+-]?\d+)?(?:ms|[smhdwy])?)
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<space>\s+)
    | (?P<op>==|!=|=~|!~|<=|>=|[-+*/%^<>=(){},@])
    """,
    re.VERBOSE,
)


def tokens(expr: str) -> Iterator[tuple[str, str]]:
    pos = 0
    while pos < len(expr):
        match = TOKEN.match(expr, pos)
        if not match:
            raise ValueError(f"cannot read PromQL at {expr[pos:]!r} in {expr!r}")
        pos = match.end()
        if match.lastgroup != "space":
            yield match.lastgroup or "", match.group()


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (Grafana variables allowed): identifiers that are
    not functions, aggregations, keywords, or label names in {...} and grouping lists."""
    found: set[str] = set()
    items = list(tokens(expr))
    braces = parens = 0
    in_label_list = False
    for index, (kind, text) in enumerate(items):
        following = items[index + 1][1] if index + 1 < len(items) else ""
        if text == "{":
            braces += 1
        elif text == "}":
            braces -= 1
        elif text == "(":
            parens += 1
        elif text == ")":
            parens -= 1
            in_label_list = False  # grouping lists hold no parentheses
        elif kind != "ident" or braces or in_label_list:
            continue
        elif text in GROUPING:
            in_label_list = following == "("
        elif text in KEYWORDS or following == "(" or following in ("by", "without"):
            continue  # a keyword, a function call, or an aggregation with its grouping first
        else:
            found.add(text)
    if braces or parens:
        raise ValueError(f"unbalanced brackets in {expr!r}")
    return found


def test_metric_names_are_read_correctly() -> None:
    assert metric_names('sum by (phase) (kubetune_jobs{namespace=~"$ns", job!="x"})') == {"kubetune_jobs"}
    assert metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(kubetune_reconcile_duration_seconds_bucket[$__range])))"
    ) == {"kubetune_reconcile_duration_seconds_bucket"}
    assert metric_names(
        "max by (namespace, job) (a_total{x='1'}) / on (namespace, job) group_left (stage) b > 0 or vector(0)"
    ) == {"a_total", "b"}
    assert metric_names('label_values(kubetune_trainer_step{namespace=~"$namespace"}, job)') == {
        "kubetune_trainer_step",
        "job",
    }
    assert metric_names("sum without (gpu) (m[5m] offset 1h) * 2e3 + inf") == {"m"}
    with pytest.raises(ValueError, match="unbalanced"):
        metric_names("sum(rate(x[5m])")


# The series names Prometheus stores for each metric type (prometheus-client's family name of
# a counter has no _total; the bare name of a counter or histogram is no series at all).
SERIES_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}


def exported_names(registry: CollectorRegistry) -> set[str]:
    """The names of every series a scrape of ``registry`` can show, labelled or not yet."""
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in SERIES_SUFFIXES.get(family.type, ("",))
    }


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    import kubetune.trainer.status as trainer_status  # imports no torch

    return {
        "operator": exported_names(Metrics().registry),
        "trainer": exported_names(trainer_status.REGISTRY),
    }


def test_series_names_follow_the_metric_types(exported: dict[str, set[str]]) -> None:
    operator = exported["operator"]
    assert {"kubetune_reconcile_total", "kubetune_reconcile_errors_total", "kubetune_jobs"} <= operator
    assert {"kubetune_reconcile", "kubetune_reconcile_total_total"}.isdisjoint(operator)
    histogram = "kubetune_reconcile_duration_seconds"
    assert {f"{histogram}_bucket", f"{histogram}_sum", f"{histogram}_count"} <= operator
    assert histogram not in operator
    assert "kubetune_trainer_loss" in exported["trainer"]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable."""
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} target {target['refId']}", target["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query


def test_every_query_uses_only_exported_metrics(exported: dict[str, set[str]]) -> None:
    known = exported["operator"] | exported["trainer"]
    unknown = {}
    used: set[str] = set()
    for where, expr in queries(dashboard()):
        names = metric_names(expr)
        if expr.startswith("label_values("):
            names = metric_names(expr[len("label_values(") : expr.rindex(",")])
        assert names, f"{where}: no metric in {expr!r}"
        used |= names
        missing = names - known
        if missing:
            unknown[where] = sorted(missing)
    assert not unknown, f"metrics no component exports: {unknown}"
    # The dashboard covers both components.
    assert used & exported["operator"] and used & exported["trainer"]


def test_the_trainer_exports_what_the_dashboard_expects(exported: dict[str, set[str]]) -> None:
    expected = {
        "kubetune_trainer_step",
        "kubetune_trainer_total_steps",
        "kubetune_trainer_epoch",
        "kubetune_trainer_loss",
        "kubetune_trainer_eval_loss",
        "kubetune_trainer_learning_rate",
        "kubetune_trainer_tokens_per_second",
        "kubetune_trainer_eta_seconds",
        "kubetune_trainer_stage",
        "kubetune_trainer_gpu_memory_bytes",
    }
    assert expected <= exported["trainer"]
    used = set().union(*(metric_names(expr) for _, expr in queries(dashboard())))
    assert expected <= used, f"not on the dashboard: {sorted(expected - used)}"


def test_the_dashboard_shows_what_operators_need() -> None:
    board = dashboard()
    titles = {panel["title"] for panel in panels(board) if panel["type"] != "row"}
    assert {
        "FineTuneJobs by phase",
        "Training loss",
        "Validation loss",
        "Throughput",
        "Step progress",
        "ETA and stage",
        "Job durations",
        "Reconciliations and errors",
        "Reconcile latency",
        "GPU memory",
    } <= titles
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert board["uid"] == "kubetune"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels(board):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    # Trainer series are filtered by the dashboard's namespace and FineTuneJob choices.
    for where, expr in queries(board):
        if "kubetune_trainer_" in expr and where.startswith("panel"):
            assert 'namespace=~"$namespace"' in expr and 'finetunejob=~"$finetunejob"' in expr, where


def test_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_the_trainer_labels_its_series_with_the_finetunejob() -> None:
    import kubetune.trainer.status as trainer_status
    from kubetune import api

    trainer_status.MetricsReporter("team-a", "llama-lora").progress(api.Progress(step=7, loss=1.5))
    samples = [
        sample
        for family in trainer_status.REGISTRY.collect()
        for sample in family.samples
        if sample.labels.get("finetunejob") == "llama-lora"
    ]
    values = {(s.name, s.value) for s in samples}
    assert values >= {("kubetune_trainer_step", 7), ("kubetune_trainer_loss", 1.5)}
    # The same labels as the operator's per-job series; `job` stays Prometheus' own target label.
    assert all(s.labels["namespace"] == "team-a" and "job" not in s.labels for s in samples)
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["finetunejob"]["query"]["query"].endswith(", finetunejob)")
