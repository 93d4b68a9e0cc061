"""The operator process pieces that need no cluster: kopf settings, credentials, metrics."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client import Configuration
from prometheus_client.parser import text_string_to_metric_families

from kubetune.operator import handlers, main, observe, workload
from kubetune.operator.metrics import Metrics
from kubetune.operator.reconcile import Reconciler


def test_settings_run_one_replica_unless_peering_is_named() -> None:
    single = main.settings()
    assert single.peering.standalone is True
    assert single.scanning.disabled is True, "no cluster-wide namespace or CRD watching is needed"
    assert single.posting.enabled is False, "events come from the reconciler alone"
    assert isinstance(single.watching.server_timeout, int), "the API server parses it as an integer"
    selectors = dict(single.watching.label_selectors.items())
    assert set(selectors.values()) == {"app.kubernetes.io/managed-by=kubetune-operator"}
    assert len(selectors) == 2  # trainer Jobs and their pods

    peered = main.settings(peering="kubetune")
    assert peered.peering.standalone is False
    assert peered.peering.mandatory is True and peered.peering.name == "kubetune"


def test_handler_progress_lives_in_kubetune_annotations() -> None:
    storage = main.settings().persistence.progress_storage
    assert storage.prefix == "kubetune.io"  # type: ignore[attr-defined]
    diffbase = main.settings().persistence.diffbase_storage
    assert diffbase.prefix == "kubetune.io"  # type: ignore[attr-defined]


def handler_context(configuration: Configuration) -> handlers.HandlerContext:
    metrics = Metrics()
    controller = handlers.Controller(Reconciler(None, None), metrics)  # type: ignore[arg-type]
    return handlers.HandlerContext(configuration, controller, metrics)


@pytest.mark.parametrize(
    ("api_key", "prefix"),
    [
        ({"BearerToken": "Bearer abc.def"}, {}),  # kubeconfig loader
        ({"BearerToken": "bearer abc.def"}, {}),  # in-cluster loader
        ({"authorization": "abc.def"}, {"authorization": "Bearer"}),  # explicit token
    ],
)
def test_kopf_logs_in_with_the_clients_token(api_key: dict[str, str], prefix: dict[str, str]) -> None:
    configuration = Configuration(host="https://10.0.0.1:6443")
    configuration.api_key = api_key
    configuration.api_key_prefix = prefix
    configuration.ssl_ca_cert = "/var/run/ca.crt"
    info = handler_context(configuration).connection()
    assert (info.server, info.scheme, info.token) == ("https://10.0.0.1:6443", "Bearer", "abc.def")
    assert info.ca_path == "/var/run/ca.crt" and info.insecure is False


def test_kopf_logs_in_with_the_clients_certificate() -> None:
    configuration = Configuration(host="https://127.0.0.1:6443")
    configuration.cert_file, configuration.key_file = "/tmp/admin.crt", "/tmp/admin.key"
    info = handler_context(configuration).connection()
    assert (info.certificate_path, info.private_key_path) == ("/tmp/admin.crt", "/tmp/admin.key")
    assert info.token is None and info.scheme is None


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def body(name: str, phase: str | None, **progress: float) -> dict[str, object]:
    status: dict[str, object] = {"progress": progress}
    if phase:
        status["phase"] = phase
    return {"metadata": {"namespace": "ml", "name": name}, "status": status}


def test_job_metrics_follow_the_last_seen_state_and_vanish_with_the_job() -> None:
    metrics = Metrics()
    metrics.track(body("a", "Running", loss=0.5, step=10, tokensPerSecond=1200.0))
    metrics.track(body("b", None))
    metrics.track(body("c", "Succeeded"))
    got = samples(metrics)
    assert got[("kubetune_jobs", (("phase", "Running"),))] == 1
    assert got[("kubetune_jobs", (("phase", "Pending"),))] == 1  # no phase yet counts as Pending
    assert got[("kubetune_jobs", (("phase", "Succeeded"),))] == 1
    assert got[("kubetune_jobs", (("phase", "Failed"),))] == 0
    labels = (("finetunejob", "a"), ("namespace", "ml"))
    assert got[("kubetune_job_loss", labels)] == 0.5
    assert got[("kubetune_job_step", labels)] == 10
    assert got[("kubetune_job_tokens_per_second", labels)] == 1200
    assert ("kubetune_job_loss", (("finetunejob", "b"), ("namespace", "ml"))) not in got

    metrics.track(body("a", "Running", loss=0.25, step=20))
    got = samples(metrics)
    assert got[("kubetune_job_loss", labels)] == 0.25
    assert ("kubetune_job_tokens_per_second", labels) not in got

    metrics.forget("ml", "a")
    got = samples(metrics)
    assert not any(dict(key[1]).get("finetunejob") == "a" for key in got)
    assert got[("kubetune_jobs", (("phase", "Running"),))] == 0


def test_job_duration_is_observed_from_start_to_completion() -> None:
    metrics = Metrics()
    metrics.job_finished(observe.SUCCEEDED, "2025-03-01T12:00:00Z", "2025-03-01T12:30:00Z")
    metrics.job_finished(observe.FAILED, None, "2025-03-01T12:30:00Z")  # never started: not observed
    got = samples(metrics)
    assert got[("kubetune_job_duration_seconds_sum", (("phase", "Succeeded"),))] == 1800
    assert got[("kubetune_job_duration_seconds_count", (("phase", "Succeeded"),))] == 1
    assert ("kubetune_job_duration_seconds_count", (("phase", "Failed"),)) not in got
    assert got[("kubetune_reconcile_total", ())] == 0
    assert got[("kubetune_reconcile_errors_total", ())] == 0


def test_the_operator_imports_no_ml_framework() -> None:
    """The operator image has no torch: importing the operator must not need it."""
    import subprocess
    import sys

    code = (
        "import sys, kubetune.operator.main, kubetune_testkit.operator_runner\n"
        "heavy = ('torch', 'transformers', 'peft', 'datasets', 'bitsandbytes', 'accelerate')\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in heavy or m.startswith('kubetune.trainer')]\n"
        "print(sorted(loaded))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"


def kueue_workload(job_uid: str, *conditions: tuple[str, str, str]) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "job-tune-abc12",
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "tune", "uid": job_uid}],
        },
        "status": {
            "conditions": [
                {"type": kind, "status": value, "message": message} for kind, value, message in conditions
            ]
        },
    }


def test_kueue_workloads_give_the_reason_a_job_waits() -> None:
    waiting = kueue_workload("u1", ("QuotaReserved", "False", "insufficient quota for nvidia.com/gpu"))
    assert workload.kueue_job_uid(waiting) == "u1"
    assert workload.kueue_wait(waiting) == "insufficient quota for nvidia.com/gpu"
    admitted = kueue_workload("u1", ("QuotaReserved", "True", "reserved"), ("Admitted", "True", "admitted"))
    assert workload.kueue_wait(admitted) is None
    assert workload.kueue_wait(kueue_workload("u1")) is None  # Kueue has not looked at it yet
    assert workload.kueue_job_uid({"metadata": {"ownerReferences": [{"kind": "JobSet", "uid": "x"}]}}) is None


def test_the_controller_reconciles_a_job_when_kueues_reason_changes() -> None:
    controller = handler_context(Configuration()).controller
    job = {"metadata": {"uid": "u1", "resourceVersion": "7"}}
    waiting = kueue_workload("u1", ("QuotaReserved", "False", "insufficient quota"))
    # Kueue spoke before the Job's own watch event: nothing to reconcile yet...
    assert controller.workload_event_needs_reconcile(waiting) is None
    # ... so even the echo of the operator's own create is worth a reconciliation.
    controller._created_jobs[("ns", "tune")] = "7"
    assert controller.job_event_needs_reconcile("ns", "tune", job) is True
    assert controller.workload_event_needs_reconcile(waiting) is None, "the same reason again changes nothing"
    other = kueue_workload("u1", ("QuotaReserved", "False", "waiting for preemption"))
    assert controller.workload_event_needs_reconcile(other) == ("ns", "tune")
    admitted = kueue_workload("u1", ("QuotaReserved", "True", "reserved"), ("Admitted", "True", "admitted"))
    assert controller.workload_event_needs_reconcile(admitted) == ("ns", "tune")
    assert controller._kueue_waits == {}
    assert controller.workload_event_needs_reconcile(other, deleted=True) is None, (
        "a deleted Workload holds nothing back"
    )
    assert (
        controller.workload_event_needs_reconcile(kueue_workload("u2", ("QuotaReserved", "False", "x")))
        is None
    )
