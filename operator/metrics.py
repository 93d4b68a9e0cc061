"""Prometheus metrics of the operator and of the jobs it runs.

Per-job series (phase counts, the trainer's last loss, step and throughput) are computed at
scrape time from the last seen state of every FineTuneJob, so a deleted job's series vanish
with it. The per-job label is ``finetunejob``, not ``job``, which Prometheus reserves for the
scrape job.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kubetune import api

JOB_DURATION_BUCKETS = (
    60,
    300,
    600,
    1800,
    3600,
    2 * 3600,
    4 * 3600,
    8 * 3600,
    16 * 3600,
    24 * 3600,
    48 * 3600,
    7 * 86400,
)
# (metric name, help, status.progress field)
PROGRESS_GAUGES = (
    ("kubetune_job_loss", "Last training loss the trainer reported.", "loss"),
    ("kubetune_job_step", "Last optimizer step the trainer reported.", "step"),
    ("kubetune_job_tokens_per_second", "Last training throughput the trainer reported.", "tokensPerSecond"),
)


@dataclass(frozen=True)
class JobSample:
    phase: str
    progress: Mapping[str, Any]


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.reconcile_total = Counter(
            "kubetune_reconcile", "Reconciliations of FineTuneJobs.", registry=self.registry
        )
        self.reconcile_errors = Counter(
            "kubetune_reconcile_errors", "Reconciliations that raised an error.", registry=self.registry
        )
        self.reconcile_duration = Histogram(
            "kubetune_reconcile_duration_seconds", "Time one reconciliation took.", registry=self.registry
        )
        self.job_duration = Histogram(
            "kubetune_job_duration_seconds",
            "From the trainer Job's creation to the FineTuneJob's end, by final phase.",
            ["phase"],
            buckets=JOB_DURATION_BUCKETS,
            registry=self.registry,
        )
        self._jobs: dict[tuple[str, str], JobSample] = {}
        self._lock = threading.Lock()
        self.registry.register(_JobCollector(self))

    def track(self, body: Mapping[str, Any]) -> None:
        """Remember a FineTuneJob's phase and the trainer's progress as last seen."""
        meta = body.get("metadata") or {}
        status = body.get("status") or {}
        sample = JobSample(
            phase=str(status.get("phase") or api.Phase.PENDING.value), progress=status.get("progress") or {}
        )
        with self._lock:
            self._jobs[(str(meta.get("namespace")), str(meta.get("name")))] = sample

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._jobs.pop((namespace, name), None)

    def job_finished(self, phase: str, start_time: str | None, completion_time: str | None) -> None:
        start, end = _parse_time(start_time), _parse_time(completion_time)
        if start and end:
            self.job_duration.labels(phase=phase).observe(max(0.0, (end - start).total_seconds()))

    def snapshot(self) -> dict[tuple[str, str], JobSample]:
        with self._lock:
            return dict(self._jobs)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _JobCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        jobs = self.metrics.snapshot()
        by_phase = GaugeMetricFamily("kubetune_jobs", "FineTuneJobs by phase.", labels=["phase"])
        for phase in api.Phase:
            by_phase.add_metric([phase.value], sum(1 for s in jobs.values() if s.phase == phase.value))
        yield by_phase
        for name, help_text, field in PROGRESS_GAUGES:
            gauge = GaugeMetricFamily(name, help_text, labels=["namespace", "finetunejob"])
            for (namespace, job), sample in sorted(jobs.items()):
                value = sample.progress.get(field)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    gauge.add_metric([namespace, job], float(value))
            yield gauge
