"""The trainer image and the chart spell out ports and paths that kubetune.contract defines: each
literal equals the contract's, read statically (no helm, no container engine)."""

from __future__ import annotations

import json
import re
import shlex

from kubetune import contract

from .conftest import ROOT, planned_trainer_pod
from .test_dockerfiles import final_stage

CHART = ROOT / "charts" / "kubetune"


def trainer_image() -> tuple[dict[str, str], dict[str, str], str]:
    """The final stage's last value of each instruction, its environment, and its RUN commands."""
    stage = final_stage(ROOT / "Dockerfile.trainer")
    last = {i.keyword: i.arguments for i in stage}
    words = [word for i in stage if i.keyword == "ENV" for word in shlex.split(i.arguments)]
    env = {key: value for key, _, value in (word.partition("=") for word in words)}
    runs = " ".join(i.arguments for i in stage if i.keyword == "RUN")
    return last, env, runs


def test_the_trainer_image_serves_metrics_on_the_contracts_port() -> None:
    last, env, _ = trainer_image()
    assert last["EXPOSE"].split() == [str(contract.METRICS_PORT)]
    assert env[contract.METRICS_PORT_ENV] == str(contract.METRICS_PORT)


def test_the_trainer_image_reads_its_job_where_the_operator_mounts_it() -> None:
    last, env, runs = trainer_image()
    assert json.loads(last["ENTRYPOINT"]) == list(contract.TRAINER_COMMAND)
    assert json.loads(last["CMD"]) == ["--config", contract.CONFIG_PATH]
    assert contract.CONFIG_DIR in shlex.split(runs), "the image creates the ConfigMap's mount point"
    assert last["WORKDIR"] == env["HOME"] == contract.SCRATCH_DIR


def test_the_chart_scrapes_the_trainers_metrics_port() -> None:
    [container] = planned_trainer_pod()["spec"]["containers"]
    [name] = [p["name"] for p in container["ports"] if p["containerPort"] == contract.METRICS_PORT]
    monitor = (CHART / "templates" / "podmonitor.yaml").read_text()
    assert re.search(rf"- port: {name}\n\s+path: /metrics\n", monitor)
    # Values and notes tell people the port in words: the number must be the contract's.
    mentioned = [
        int(port)
        for path in [CHART / "values.yaml", *sorted((CHART / "templates").iterdir())]
        for port in re.findall(r"trainer pod\S*[^\n]*?port (\d+)", path.read_text())
    ]
    assert mentioned and set(mentioned) == {contract.METRICS_PORT}
