"""Inside the pod: progress to the FineTuneJob's status and to the trainer's /metrics.

The trainer patches only its own part of the status (stage, progress, results, artifacts)
through the status subresource, at a bounded rate; phase and conditions belong to the
operator. It may patch no other FineTuneJob: its Role names this one job only.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from rich.console import Console

from kubetune import api, contract
from kubetune.trainer.reporter import ConsoleReporter, Reporter, Reporters, SilentReporter

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
_LABELS = ("namespace", "finetunejob")


def _gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
    return Gauge(f"kubetune_trainer_{name}", doc, (*_LABELS, *extra), registry=REGISTRY)


STEP = _gauge("step", "Optimizer steps done.")
TOTAL_STEPS = _gauge("total_steps", "Optimizer steps planned.")
EPOCH = _gauge("epoch", "Epochs done (fractional).")
LOSS = _gauge("loss", "Latest training loss (completion tokens).")
EVAL_LOSS = _gauge("eval_loss", "Latest validation loss.")
LEARNING_RATE = _gauge("learning_rate", "Current learning rate.")
TOKENS_PER_SECOND = _gauge("tokens_per_second", "Training throughput in non-padding tokens per second.")
ETA = _gauge("eta_seconds", "Estimated seconds until training ends.")
STAGE = _gauge("stage", "1 for the stage running now, 0 for the others.", ("stage",))
GPU_MEMORY = _gauge("gpu_memory_bytes", "Peak GPU memory allocated by the trainer.", ("gpu",))


class MetricsReporter(SilentReporter):
    """Feeds the trainer's Prometheus gauges; results, artifacts and log lines have none."""

    def __init__(self, namespace: str, job: str) -> None:
        self.labels = {"namespace": namespace, "finetunejob": job}

    def stage_started(self, stage: api.Stage) -> None:
        for s in api.Stage:
            STAGE.labels(**self.labels, stage=s.value).set(1 if s == stage else 0)

    def stage_finished(self, stage: api.Stage, seconds: float) -> None:
        STAGE.labels(**self.labels, stage=stage.value).set(0)

    def progress(self, progress: api.Progress) -> None:
        for gauge, value in (
            (STEP, progress.step),
            (TOTAL_STEPS, progress.total_steps),
            (EPOCH, progress.epoch),
            (LOSS, progress.loss),
            (EVAL_LOSS, progress.eval_loss),
            (LEARNING_RATE, progress.learning_rate),
            (TOKENS_PER_SECOND, progress.tokens_per_second),
            (ETA, progress.eta_seconds),
        ):
            if value is not None:
                gauge.labels(**self.labels).set(value)
        for index, used in gpu_memory().items():
            GPU_MEMORY.labels(**self.labels, gpu=str(index)).set(used)


def gpu_memory() -> dict[int, int]:
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {}
    return {i: int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count())}


class StatusReporter(SilentReporter):
    """Patches the FineTuneJob's status subresource: at most every `interval` seconds for
    progress, at once for stage changes, results and artifacts.

    Each request gives up after `timeout` seconds: rank 0 patches between training steps and
    every other rank waits for it at the next collective, so a hanging API server must not
    hang training. After a failed patch, progress waits `backoff` seconds before the next try.
    """

    def __init__(
        self,
        custom: Any,
        namespace: str,
        name: str,
        interval: float = 5.0,
        *,
        timeout: float = 5.0,
        backoff: float = 60.0,
    ) -> None:
        self.custom = custom  # kubernetes.client.CustomObjectsApi
        self.namespace = namespace
        self.name = name
        self.interval = interval
        self.timeout = timeout
        self.backoff = backoff
        self._last = 0.0
        self._quiet_until = 0.0
        self._stage: api.Stage | None = None
        self._pending: api.Progress | None = None

    def stage_started(self, stage: api.Stage) -> None:
        self._stage = stage
        self._patch({"stage": stage.value, "progress": self._progress(api.Progress(stage=stage))})

    def stage_finished(self, stage: api.Stage, seconds: float) -> None:
        if self._pending is not None:
            self._patch({"progress": self._progress(self._pending)})

    def progress(self, progress: api.Progress) -> None:
        self._pending = progress
        now = time.monotonic()
        if now - self._last >= self.interval and now >= self._quiet_until:
            self._patch({"progress": self._progress(progress)})

    def results(self, results: api.Results) -> None:
        self._patch({"results": results.to_wire()})

    def artifacts(self, artifacts: api.Artifacts) -> None:
        self._patch({"artifacts": artifacts.to_wire()})

    def _progress(self, progress: api.Progress) -> dict[str, Any]:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        return progress.model_copy(update={"updated_at": now}).to_wire()

    def _patch(self, status: dict[str, Any]) -> None:
        self._last = time.monotonic()
        if "progress" in status:
            self._pending = None
        try:
            self.custom.patch_namespaced_custom_object_status(
                api.GROUP,
                api.VERSION,
                self.namespace,
                api.PLURAL,
                self.name,
                {"status": status},
                _request_timeout=(self.timeout, self.timeout),
            )
        except Exception as exc:  # reporting must never stop training
            self._quiet_until = time.monotonic() + self.backoff
            reason = getattr(exc, "reason", None) or type(exc).__name__
            log.warning("could not update %s/%s status: %s", self.namespace, self.name, reason)


def pod_reporter(console: Console) -> Reporter:
    """Console plus, when the pod names its job, status patches and /metrics."""
    namespace = os.environ.get(contract.JOB_NAMESPACE_ENV)
    name = os.environ.get(contract.JOB_NAME_ENV)
    if not namespace or not name:
        return ConsoleReporter(console)
    from kubernetes import client, config

    if os.environ.get("KUBECONFIG"):
        config.load_kube_config()
    else:
        config.load_incluster_config()
    port = int(os.environ.get(contract.METRICS_PORT_ENV, contract.METRICS_PORT))
    if port:
        start_http_server(port, registry=REGISTRY)
    interval = float(os.environ.get(contract.STATUS_INTERVAL_ENV, "5"))
    timeout = float(os.environ.get(contract.STATUS_TIMEOUT_ENV, "5"))
    return Reporters(
        [
            ConsoleReporter(console),
            MetricsReporter(namespace, name),
            StatusReporter(client.CustomObjectsApi(), namespace, name, interval, timeout=timeout),
        ]
    )
