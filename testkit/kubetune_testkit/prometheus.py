"""A real Prometheus on loopback for tests: scrapes given targets, answers PromQL over HTTP.

The binaries (``prometheus`` and ``promtool``) are looked up in this order:

1. ``KUBETUNE_PROMETHEUS_DIR`` (a folder holding both);
2. the folder ``hack/build-prometheus --print`` names (the project cache);
3. otherwise ``hack/build-prometheus`` builds them there from their Go module (minutes, once).

Usage::

    with PrometheusServer(tmp_path, {"operator": ["127.0.0.1:8080"]}, scrape_interval=0.5) as prom:
        prom.wait_for_targets()
        prom.query('sum by (phase) (kubetune_jobs)')
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import yaml

from kubetune_testkit import REPO_ROOT
from kubetune_testkit.controlplane import free_port, wait_until
from kubetune_testkit.controlplane.processes import Process

BUILD_SCRIPT = REPO_ROOT / "hack" / "build-prometheus"
_BUILD_LOCK = threading.Lock()

T = TypeVar("T")


class PrometheusError(RuntimeError):
    """Prometheus could not be found, built, started, or it refused a query."""


@dataclass(frozen=True)
class Binaries:
    prometheus: Path
    promtool: Path


def _binaries_in(folder: Path) -> Binaries | None:
    found = Binaries(folder / "prometheus", folder / "promtool")
    if all(path.is_file() and os.access(path, os.X_OK) for path in (found.prometheus, found.promtool)):
        return found
    return None


def _run_build_script(*args: str) -> Path:
    if not BUILD_SCRIPT.is_file():
        raise PrometheusError(
            f"no {BUILD_SCRIPT}; set KUBETUNE_PROMETHEUS_DIR to a folder with prometheus and promtool"
        )
    proc = subprocess.run(
        [str(BUILD_SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise PrometheusError(
            f"{BUILD_SCRIPT} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return Path(proc.stdout.strip().splitlines()[-1])


def find_binaries(*, build: bool = True) -> Binaries:
    """prometheus and promtool, built into the cache by ``hack/build-prometheus`` when missing."""
    if explicit := os.environ.get("KUBETUNE_PROMETHEUS_DIR"):
        found = _binaries_in(Path(explicit))
        if found is None:
            raise PrometheusError(
                f"KUBETUNE_PROMETHEUS_DIR={explicit} holds no executable prometheus and promtool"
            )
        return found
    with _BUILD_LOCK:
        folder = _run_build_script("--print")
        found = _binaries_in(folder)
        if found is None and build:
            folder = _run_build_script()
            found = _binaries_in(folder)
    if found is None:
        raise PrometheusError(f"prometheus and promtool not found in {folder}; run {BUILD_SCRIPT}")
    return found


@dataclass(frozen=True)
class Sample:
    """One series of an instant query's answer."""

    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class Series:
    """One series of a range query's answer, its points in time order."""

    labels: dict[str, str]
    points: list[tuple[float, float]] = field(default_factory=list)

    @property
    def values(self) -> list[float]:
        return [value for _, value in self.points]

    @property
    def finite(self) -> list[float]:
        return [value for value in self.values if math.isfinite(value)]


@dataclass(frozen=True)
class ScrapeJob:
    """A ``scrape_configs`` entry with static targets, as the chart's monitors scrape: the
    target's own ``namespace`` label wins (``honorLabels``)."""

    name: str
    targets: Sequence[str]
    path: str = "/metrics"
    honor_labels: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)

    def config(self) -> dict[str, Any]:
        static: dict[str, Any] = {"targets": list(self.targets)}
        if self.labels:
            static["labels"] = dict(self.labels)
        return {
            "job_name": self.name,
            "metrics_path": self.path,
            "honor_labels": self.honor_labels,
            "static_configs": [static],
        }


def _duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


class PrometheusServer:
    """Prometheus with its TSDB under ``data_dir``, listening on ``127.0.0.1:<free port>``.

    ``jobs`` are the scrape jobs: :class:`ScrapeJob` objects, or a mapping of job name to
    ``host:port`` targets. A target that is not up yet is simply down until it is.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        jobs: Sequence[ScrapeJob] | Mapping[str, Sequence[str]],
        *,
        scrape_interval: float = 0.5,
        evaluation_interval: float | None = None,
        rule_files: Sequence[Path] = (),
        binaries: Binaries | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        if isinstance(jobs, Mapping):
            jobs = [ScrapeJob(name, targets) for name, targets in jobs.items()]
        self.jobs = list(jobs)
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval or scrape_interval
        self.rule_files = list(rule_files)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.config_path = self.data_dir / "prometheus.yml"
        self._binaries = binaries
        self._start_timeout = start_timeout
        self._process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def config(self) -> dict[str, Any]:
        interval = _duration(self.scrape_interval)
        config: dict[str, Any] = {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": _duration(self.evaluation_interval),
            },
            "scrape_configs": [job.config() for job in self.jobs],
        }
        if self.rule_files:
            config["rule_files"] = [str(path) for path in self.rule_files]
        return config

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> PrometheusServer:
        binaries = self._binaries or find_binaries()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        argv = [
            str(binaries.prometheus),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
            f"--web.listen-address={self.host}:{self.port}",
            "--log.level=warn",
        ]
        self._process = Process("prometheus", argv, self.data_dir / "prometheus.log")
        self._process.start()
        try:
            wait_until(
                self._ready,
                timeout=self._start_timeout,
                interval=0.1,
                what=f"Prometheus ready on {self.url}",
                processes=[self._process],
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()

    def log_tail(self, lines: int = 40) -> str:
        return self._process.log_tail(lines) if self._process else "(not started)"

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ HTTP API

    def api(self, path: str, **params: str | Sequence[str]) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; a query error raises PrometheusError."""
        query = urllib.parse.urlencode(params, doseq=True)
        url = f"{self.url}/api/v1/{path}?{query}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            body = json.loads(error.read() or b"{}")
            raise PrometheusError(
                f"{path} {params}: {error.code} {body.get('errorType')}: {body.get('error')}"
            ) from error
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        """An instant query (at ``at``, a Unix time, or now); scalars come back as one sample."""
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        data = self.api("query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [Sample({}, float(data["result"][1]))]
        return [Sample(item["metric"], float(item["value"][1])) for item in data["result"]]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")
        return [
            Series(item["metric"], [(float(t), float(v)) for t, v in item["values"]])
            for item in data["result"]
        ]

    def label_values(self, label: str, match: Sequence[str] = (), start: float | None = None) -> list[str]:
        """What Grafana's ``label_values(<match>, <label>)`` lists."""
        params: dict[str, str | Sequence[str]] = {"match[]": list(match)} if match else {}
        if start is not None:
            params["start"] = f"{start:.3f}"
        values: list[str] = self.api(f"label/{urllib.parse.quote(label)}/values", **params)
        return values

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return active

    def wait_for_targets(self, jobs: Sequence[str] | None = None, timeout: float = 30.0) -> None:
        """Until every target of ``jobs`` (default: all) has been scraped successfully."""
        names = set(jobs) if jobs is not None else {job.name for job in self.jobs}

        def up() -> bool:
            chosen = [t for t in self.targets() if t["labels"].get("job") in names]
            return bool(chosen) and all(t["health"] == "up" for t in chosen)

        self.wait(up, timeout=timeout, what=f"targets of {sorted(names)} up")

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[Sample]:
        """Until the instant query ``expr`` returns something, and return that."""
        return self.wait(lambda: self.query(expr), timeout=timeout, what=f"data for {expr}")

    def wait(self, predicate: Callable[[], T | None], *, timeout: float, what: str) -> T:
        """Poll ``predicate`` until it returns something truthy; fails at once if Prometheus exits."""
        processes = [self._process] if self._process else []
        return wait_until(
            predicate, timeout=timeout, interval=self.scrape_interval / 2, what=what, processes=processes
        )
