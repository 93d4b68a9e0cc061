"""Every query of the shipped Grafana dashboard, run by a real Prometheus against the real
operator and a real trainer run, with the dashboard's variables filled in as Grafana does.

Prometheus (built from its Go module) scrapes the operator in-process against the test control
plane and the trainer process a stand-in kubelet runs for the FineTuneJob's pod (see
tests/operator/test_trainer_pod.py), the way the chart's ServiceMonitor and PodMonitor do:
the targets' own namespace label wins. Every target is evaluated as a range query over the
run, as Grafana draws a time series; for an instant target that is the instant query at each
step, each moment someone could open the dashboard. A warm-up job finishes first, so that the job duration
histogram exists before the trained job finishes and `increase()` over the dashboard's range
sees the trained one finish; a third job stays suspended.
"""

from __future__ import annotations

import importlib.util
import math
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes.client import ApiClient, CoreV1Api, V1Namespace, V1ObjectMeta

from kubetune import contract
from kubetune.operator import planning
from kubetune.operator.kube import Kube
from kubetune.storage import ObjectStore
from kubetune_testkit.controlplane import ControlPlane, free_port
from kubetune_testkit.operator_runner import (
    OperatorRunner,
    install_crd,
    set_pod_finished,
    set_pod_running,
    wait_for,
)
from kubetune_testkit.prometheus import Binaries, PrometheusServer, ScrapeJob, Series
from kubetune_testkit.s3 import S3Server

from ..chart.test_dashboard import dashboard, queries
from ..operator.test_trainer_pod import finetunejob, run_pod, s3_secret, status_in_phase, trainer_pod

pytestmark = [pytest.mark.controlplane, pytest.mark.s3, pytest.mark.training]

SCRAPE_INTERVAL = 0.5
STEP = 1.0
# Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval).
RATE_INTERVAL = f"{round(max(STEP + SCRAPE_INTERVAL, 4 * SCRAPE_INTERVAL) * 1000)}ms"
TRAINED = "dates"


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


# Panels whose series only a GPU run has: the trainer reports peak GPU memory per device.
GPU_ONLY = {"panel 'GPU memory' target A"}


@dataclass
class Run:
    prometheus: PrometheusServer
    namespace: str
    start: float
    end: float
    status: dict[str, Any]
    history: list[dict[str, float]]  # the trainer's log, from the metrics.json it published


@pytest.fixture(scope="module")
def namespace(control_plane_api_client: ApiClient) -> Iterator[str]:
    core = CoreV1Api(control_plane_api_client)
    name = f"test-{uuid.uuid4().hex[:10]}"
    core.create_namespace(V1Namespace(metadata=V1ObjectMeta(name=name)))
    wait_for(
        lambda: core.list_namespaced_service_account(name, field_selector="metadata.name=default").items,
        what=f"ServiceAccount {name}/default",
    )
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="module")
def run(
    control_plane: ControlPlane,
    control_plane_api_client: ApiClient,
    namespace: str,
    s3_server: S3Server,
    prometheus_binaries: Binaries,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Run]:
    ns = namespace
    root = tmp_path_factory.mktemp("dashboard")
    install_crd(control_plane_api_client)
    kube = Kube(control_plane_api_client)
    s3_server.start()
    bucket = s3_server.create_bucket()
    s3_secret(kube, ns, s3_server)
    trainer_port = free_port()
    config = planning.OperatorConfig(
        trainer_image="registry.test/kubetune-trainer:test", secrets_namespaces=(ns,)
    )
    with OperatorRunner(control_plane_api_client, [ns], config=config) as operator:
        # The operator's own namespace is not the jobs': the ServiceMonitor's target label
        # would say where the operator runs, and honorLabels keeps the series' own.
        jobs = [
            ScrapeJob(
                "kubetune", [operator.metrics_url.split("/")[2]], labels={"namespace": "kubetune-system"}
            ),
            ScrapeJob("kubetune-trainers", [f"127.0.0.1:{trainer_port}"], labels={"namespace": ns}),
        ]
        with PrometheusServer(root / "prometheus", jobs, scrape_interval=SCRAPE_INTERVAL) as prometheus:
            start = time.time()
            prometheus.wait_for_targets(["kubetune"])

            warmup = finetunejob("warmup", ns, s3_server, bucket)
            kube.create(warmup)
            pod = trainer_pod(kube, ns, "warmup")
            set_pod_running(control_plane_api_client, pod)
            set_pod_finished(control_plane_api_client, kube.get("Pod", ns, pod["metadata"]["name"]) or pod, 0)
            status_in_phase(kube, ns, "warmup", "Succeeded")
            prometheus.wait_for('kubetune_job_duration_seconds_count{phase="Succeeded"} == 1')

            suspended = finetunejob("neighbour", ns, s3_server, bucket)
            suspended["spec"]["suspend"] = True
            kube.create(suspended)

            trained = finetunejob(TRAINED, ns, s3_server, bucket)
            trained["spec"]["training"]["evalEvery"] = 5  # validation loss during training
            kube.create(trained)
            pod = trainer_pod(kube, ns, TRAINED)
            code, output = run_pod(
                control_plane, kube, control_plane_api_client, pod, root / "pod", metrics_port=trainer_port
            )
            assert code == 0, output
            status = status_in_phase(kube, ns, TRAINED, "Succeeded")
            prometheus.wait_for('kubetune_job_duration_seconds_count{phase="Succeeded"} == 2')
            prometheus.wait_for('kubetune_jobs{phase="Succeeded"} == 2')
            time.sleep(2 * STEP)  # past the last scrape, so the range's last step holds it
            published = f"s3://{bucket}/runs/{ns}/{TRAINED}/{contract.METRICS}"
            history = ObjectStore(s3_server.storage_config()).read_json(published)["history"]
            yield Run(prometheus, ns, start, time.time(), status, history)
    s3_server.start()
    s3_server.delete_bucket(bucket)


def fill(expr: str, run: Run, selected: dict[str, str]) -> str:
    """The query as Grafana sends it: variables and built-in intervals substituted."""
    ranged = f"{math.ceil(run.end - run.start)}s"
    values = {
        "__rate_interval": RATE_INTERVAL,
        "__range": ranged,
        "__interval": f"{round(STEP * 1000)}ms",
        **selected,
    }

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unknown variable ${name} in {expr!r}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", substitute, expr)


def evaluate(run: Run, expr: str) -> list[Series]:
    return run.prometheus.query_range(expr, run.start, run.end, STEP)


def regex_value(value: str) -> str:
    """A single chosen value as Grafana writes it into a PromQL regex: metacharacters
    escaped, the backslash doubled inside the PromQL string."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value)


def last(series: Series) -> float:
    return series.finite[-1]


SELECTIONS = {
    "one job": lambda run: {"namespace": regex_value(run.namespace), "finetunejob": TRAINED},
    "all": lambda run: {"namespace": ".*", "finetunejob": ".*"},
}


@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_every_dashboard_query_returns_data(run: Run, selection: str) -> None:
    selected = SELECTIONS[selection](run)
    empty, without_values = [], []
    checked = 0
    for where, expr in queries(dashboard()):
        if where.startswith("variable"):
            continue
        result = evaluate(run, fill(expr, run, selected))
        checked += 1
        if where in GPU_ONLY and not cuda_available():
            assert result == [], f"{where}: a CPU run reports GPU memory"
            continue
        if not result:
            empty.append(where)
        elif not any(series.finite for series in result):
            without_values.append(where)
        for series in result:
            if "finetunejob" in series.labels:
                assert series.labels["namespace"] == run.namespace, (where, series.labels)
                assert series.labels["finetunejob"] == TRAINED, (where, series.labels)
    assert checked >= 15
    assert not empty, f"queries with no data: {empty}"
    assert not without_values, f"queries with no finite value: {without_values}"


def test_the_variables_list_the_runs_namespace_and_job(run: Run) -> None:
    variables = {
        v["name"]: v["query"]["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"
    }
    assert set(variables) == {"namespace", "finetunejob"}
    pattern = re.compile(r"label_values\((.*),\s*(\w+)\)")
    listed = {}
    for name, query in variables.items():
        match = pattern.fullmatch(query)
        assert match, query
        selector = fill(match.group(1), run, {"namespace": regex_value(run.namespace)})
        listed[name] = run.prometheus.label_values(match.group(2), [selector], start=run.start)
    assert run.namespace in listed["namespace"]
    # The trainer's series name the job it trains; the warm-up job had no trainer process.
    assert listed["finetunejob"] == [TRAINED]


def panel_query(title: str, ref: str = "A") -> str:
    [expr] = [expr for where, expr in queries(dashboard()) if where == f"panel {title!r} target {ref}"]
    return expr


def test_the_values_agree_with_the_run(run: Run) -> None:
    selected = SELECTIONS["one job"](run)
    progress = run.status["progress"]

    def final(title: str, ref: str = "A") -> dict[str, float]:
        series = evaluate(run, fill(panel_query(title, ref), run, selected))
        return {series_key(s.labels): last(s) for s in series if s.finite}

    job = f"{run.namespace}/{TRAINED}"
    # The trainer's last report, on the dashboard and in the FineTuneJob's status.
    assert final("Step progress") == {job: pytest.approx(1.0)}
    step = evaluate(run, f'max(kubetune_trainer_step{{finetunejob="{TRAINED}"}})')
    assert last(step[0]) == progress["step"] == progress["totalSteps"]
    # The last logged losses, on the dashboard and in the status (every report carries both).
    train_loss = [entry["loss"] for entry in run.history if "loss" in entry][-1]
    eval_loss = [entry["eval_loss"] for entry in run.history if "eval_loss" in entry][-1]
    assert progress["loss"] == pytest.approx(train_loss, rel=1e-6)
    assert progress["evalLoss"] == pytest.approx(eval_loss, rel=1e-6)
    assert final("Training loss") == {job: pytest.approx(train_loss, rel=1e-6)}
    assert final("Throughput")[job] > 0
    assert final("Learning rate")[job] >= 0
    assert final("ETA and stage", "B")[job] == pytest.approx(progress["epoch"], rel=1e-6)
    assert final("Validation loss") == {job: pytest.approx(eval_loss, rel=1e-6)}

    # Jobs by phase, as the operator counts them: warm-up and trained job done, one suspended.
    phases = {s.labels["phase"]: last(s) for s in evaluate(run, panel_query("FineTuneJobs by phase"))}
    assert phases == {"Pending": 0, "Running": 0, "Succeeded": 2, "Failed": 0, "Suspended": 1}
    # The first finish creates the Succeeded series, so increase() over the range sees only
    # the trained job's finish, and its duration (Job creation to completion) is under a minute.
    finished = {
        s.labels["phase"]: last(s) for s in evaluate(run, fill(panel_query("Finished jobs"), run, {}))
    }
    assert finished["Succeeded"] >= 1
    mean = {
        s.labels["phase"]: last(s) for s in evaluate(run, fill(panel_query("Job durations", "C"), run, {}))
    }
    assert 0 < mean["Succeeded"] < run.end - run.start
    # The operator reconciled and none of it failed.
    reconciles = evaluate(run, fill(panel_query("Reconciliations and errors"), run, {}))
    assert max(max(s.finite) for s in reconciles) > 0
    errors = evaluate(run, fill(panel_query("Reconciliations and errors", "B"), run, {}))
    assert all(value == 0 for s in errors for value in s.finite)


def series_key(labels: dict[str, str]) -> str:
    return f"{labels.get('namespace')}/{labels.get('finetunejob')}"
