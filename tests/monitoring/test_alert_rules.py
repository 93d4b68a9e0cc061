"""The chart's PrometheusRule: rendered by the real helm, checked and unit-tested by the real
promtool (tests in alert-rules-test.yaml: each alert fires where it should and nowhere else)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_testkit.prometheus import Binaries

from ..chart.conftest import VALUES_ALL, Helm, find, one

UNIT_TESTS = Path(__file__).with_name("alert-rules-test.yaml")
ALERTS = {
    "KubetuneJobStuckPending",
    "KubetuneTrainerLossNaN",
    "KubetuneTrainerThroughputZero",
    "KubetuneTrainerStalled",
    "KubetuneReconcileErrors",
}


def rule(helm: Helm, **values: Any) -> dict[str, Any]:
    manifests = helm.template(
        namespace="monitoring",
        set_json={"metrics.prometheusRule.enabled": True}
        | {f"metrics.prometheusRule.{k}": v for k, v in values.items()},
    )
    return one(manifests, "PrometheusRule")


def promtool(binaries: Binaries, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [str(binaries.promtool), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def write_rules(spec: dict[str, Any], folder: Path) -> Path:
    path = folder / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": spec["groups"]}, sort_keys=False))
    return path


def test_the_rule_is_off_by_default_and_on_in_the_release_namespace(helm: Helm) -> None:
    assert not find(helm.template(), "PrometheusRule")
    assert not find(helm.template(values=[VALUES_ALL]), "PrometheusRule")
    manifest = rule(helm, labels={"release": "prometheus"})
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["metadata"]["namespace"] == "monitoring"
    assert manifest["metadata"]["labels"]["release"] == "prometheus"
    alerts = {r["alert"] for group in manifest["spec"]["groups"] for r in group["rules"]}
    assert alerts == ALERTS


def test_promtool_checks_the_rules_and_the_unit_tests_pass(
    helm: Helm, prometheus_binaries: Binaries, tmp_path: Path
) -> None:
    write_rules(rule(helm)["spec"], tmp_path)
    out = promtool(prometheus_binaries, "check", "rules", "rules.yaml", cwd=tmp_path)
    assert f"SUCCESS: {len(ALERTS)} rules found" in out
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    out = promtool(prometheus_binaries, "test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert "SUCCESS" in out
    # Every alert is tested both ways: firing somewhere, and silent somewhere.
    cases = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    checks = [check for case in cases for check in case["alert_rule_test"]]
    assert {c["alertname"] for c in checks if c["exp_alerts"]} == ALERTS
    assert {c["alertname"] for c in checks if not c["exp_alerts"]} == ALERTS


def test_the_unit_tests_fail_when_an_alert_is_broken(
    helm: Helm, prometheus_binaries: Binaries, tmp_path: Path
) -> None:
    """promtool really evaluates the rules: a wrong threshold makes the tests fail."""
    spec = rule(helm)["spec"]
    for r in spec["groups"][0]["rules"]:
        if r["alert"] == "KubetuneJobStuckPending":
            r["expr"] = r["expr"].replace("> 0", "> 1")
    write_rules(spec, tmp_path)
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    result = subprocess.run(
        [str(prometheus_binaries.promtool), "test", "rules", UNIT_TESTS.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "KubetuneJobStuckPending" in result.stdout + result.stderr


def test_values_set_the_durations_and_alert_labels(
    helm: Helm, prometheus_binaries: Binaries, tmp_path: Path
) -> None:
    spec = rule(
        helm,
        pendingFor="2h",
        lossNaNFor="5m",
        stalledFor="45m",
        reconcileErrorsFor="1h",
        alertLabels={"team": "ml-platform"},
    )["spec"]
    rules = {r["alert"]: r for group in spec["groups"] for r in group["rules"]}
    assert rules["KubetuneJobStuckPending"]["for"] == "2h"
    assert rules["KubetuneTrainerLossNaN"]["for"] == "5m"
    assert rules["KubetuneTrainerThroughputZero"]["for"] == "45m"
    assert "[45m]" in rules["KubetuneTrainerStalled"]["expr"]
    assert rules["KubetuneReconcileErrors"]["for"] == "1h"
    assert all(r["labels"]["team"] == "ml-platform" and r["labels"]["severity"] for r in rules.values())
    write_rules(spec, tmp_path)
    promtool(prometheus_binaries, "check", "rules", "rules.yaml", cwd=tmp_path)


@pytest.mark.parametrize("value", ["", "0", "0m", "soon", "15"])
def test_the_schema_refuses_a_duration_that_is_no_period(helm: Helm, value: str) -> None:
    args = helm.template_args(
        set_json={"metrics.prometheusRule.enabled": True, "metrics.prometheusRule.stalledFor": value}
    )
    result = helm.run("template", *args, check=False)
    assert result.returncode != 0
    assert "stalledFor" in result.stderr
