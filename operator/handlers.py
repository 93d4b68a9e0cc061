"""The kopf handlers: every trigger ends in the same idempotent reconciliation.

FineTuneJob create/resume/update and changes of the trainer Jobs and pods (watched with a
server-side label selector) queue it, coalesced per FineTuneJob; the queue alone retries a
failed pass, with exponential backoff. A FineTuneJob is never reconciled by two tasks at once.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes.client import Configuration

from kubetune import api

from . import planning, workload
from .metrics import Metrics
from .reconcile import Reconciler, Result

logger = logging.getLogger(__name__)

REGISTRY = kopf.OperatorRegistry()
FINETUNEJOBS = (api.GROUP, api.VERSION, api.PLURAL)
MANAGED = {planning.LABEL_MANAGED_BY: planning.MANAGER}
MANAGED_SELECTOR = f"{planning.LABEL_MANAGED_BY}={planning.MANAGER}"
# Watched where Kueue is installed when the operator starts; elsewhere kopf leaves it out.
KUEUE_WORKLOADS = ("kueue.x-k8s.io", "workloads")
RETRY_BACKOFF = 5.0
MAX_RETRY_DELAY = 60.0

Key = tuple[str, str]


@dataclass
class Controller:
    """Serialises reconciliations per FineTuneJob and queues background ones."""

    reconciler: Reconciler
    metrics: Metrics
    _locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    _dirty: set[Key] = field(default_factory=set)
    _workers: dict[Key, asyncio.Task[None]] = field(default_factory=dict)
    _last_jobs: dict[Key, dict[str, Any]] = field(default_factory=dict)
    # resourceVersion of each trainer Job a reconciliation created; only the event loop's thread
    # touches it (the reconciler's thread reports through call_soon_threadsafe).
    _created_jobs: dict[Key, str] = field(default_factory=dict)
    # Kueue's reason for holding each trainer Job back, by the Job's uid, and whose Job it is.
    _kueue_waits: dict[str, str] = field(default_factory=dict)
    _job_keys: dict[str, Key] = field(default_factory=dict)
    reconciliations: int = 0

    async def reconcile(self, namespace: str, name: str) -> Result:
        key = (namespace, name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        loop = asyncio.get_running_loop()

        def job_created(version: str) -> None:
            loop.call_soon_threadsafe(self._created_jobs.__setitem__, key, version)

        async with lock:
            last_job = self._last_jobs.get(key)
            kueue_wait = self._kueue_waits.get(_uid(last_job)) if last_job else None
            self.reconciliations += 1
            self.metrics.reconcile_total.inc()
            with self.metrics.reconcile_duration.time():
                try:
                    return await asyncio.to_thread(
                        self.reconciler.reconcile,
                        namespace,
                        name,
                        last_seen_job=last_job,
                        job_created=job_created,
                        kueue_wait=kueue_wait,
                    )
                except Exception:
                    self.metrics.reconcile_errors.inc()
                    raise

    def job_event_needs_reconcile(self, namespace: str, name: str, job: Mapping[str, Any]) -> bool:
        """Whether a watch event of the FineTuneJob's trainer Job needs a reconciliation; it also
        remembers the Job. False when the Job is exactly as a reconciliation created it (the watch
        echoing the create)."""
        key = (namespace, name)
        self._last_jobs[key] = copy.deepcopy(dict(job))
        uid = _uid(job)
        self._job_keys[uid] = key
        version = (job.get("metadata") or {}).get("resourceVersion")
        # An echo still matters when Kueue spoke of the Job before its watch event came.
        return self._created_jobs.pop(key, None) != version or uid in self._kueue_waits

    def workload_event_needs_reconcile(self, body: Mapping[str, Any], *, deleted: bool = False) -> Key | None:
        """The FineTuneJob a watch event of a Kueue Workload needs reconciled, or None; it also
        remembers Kueue's reason for holding the trainer Job back. A FineTuneJob only when that
        reason changed and its Job is known."""
        uid = workload.kueue_job_uid(body)
        if uid is None:
            return None
        wait = None if deleted else workload.kueue_wait(body)
        if wait == self._kueue_waits.get(uid):
            return None
        if wait is None:
            self._kueue_waits.pop(uid, None)
        else:
            self._kueue_waits[uid] = wait
        return self._job_keys.get(uid)

    def queue_reconcile(self, namespace: str, name: str, delay: float = 0.0) -> None:
        """Marks the FineTuneJob for another pass; starts its worker unless one is running."""
        key = (namespace, name)
        self._dirty.add(key)
        if key not in self._workers:
            self._workers[key] = asyncio.create_task(
                self._work(key, delay), name=f"reconcile {namespace}/{name}"
            )

    async def _work(self, key: Key, delay: float) -> None:
        failures = 0
        try:
            await asyncio.sleep(delay)
            while key in self._dirty:
                self._dirty.discard(key)
                try:
                    result = await self.reconcile(*key)
                except Exception:
                    failures += 1
                    logger.exception("reconciling %s/%s failed (%d in a row)", *key, failures)
                    self._dirty.add(key)
                    await asyncio.sleep(min(RETRY_BACKOFF * 2 ** (failures - 1), MAX_RETRY_DELAY))
                    continue
                failures = 0
                if result.requeue_after is not None and key not in self._dirty:
                    await asyncio.sleep(result.requeue_after)
                    self._dirty.add(key)
        finally:
            self._workers.pop(key, None)

    def forget(self, namespace: str, name: str) -> None:
        self._locks.pop((namespace, name), None)
        job = self._last_jobs.pop((namespace, name), None)
        self._created_jobs.pop((namespace, name), None)
        if job is not None:
            self._job_keys.pop(_uid(job), None)
            self._kueue_waits.pop(_uid(job), None)

    async def close(self) -> None:
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


@dataclass
class HandlerContext:
    """What every handler needs, shared through kopf's memo."""

    configuration: Configuration
    controller: Controller
    metrics: Metrics

    def connection(self) -> kopf.ConnectionInfo:
        cfg = self.configuration
        scheme, token = None, None
        header = cfg.get_api_key_with_prefix("BearerToken", alias="authorization")
        if header:
            scheme, _, token = header.rpartition(" ")
        return kopf.ConnectionInfo(
            server=cfg.host,
            ca_path=cfg.ssl_ca_cert,
            insecure=not cfg.verify_ssl,
            certificate_path=cfg.cert_file,
            private_key_path=cfg.key_file,
            scheme=("Bearer" if not scheme or scheme.lower() == "bearer" else scheme) if token else None,
            token=token or None,
        )


def _context(memo: Any) -> HandlerContext:
    context: HandlerContext = memo["kubetune"]
    return context


def _uid(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


def owner_name(body: Mapping[str, Any]) -> str | None:
    """The FineTuneJob a Job or pod belongs to."""
    meta = body.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == api.KIND and ref.get("apiVersion", "").startswith(f"{api.GROUP}/"):
            return str(ref["name"])
    name = (meta.get("annotations") or {}).get(planning.ANNOTATION_JOB)
    return str(name) if name else None


@kopf.on.login(registry=REGISTRY)
def login(memo: Any, **_: Any) -> kopf.ConnectionInfo:
    return _context(memo).connection()


@kopf.on.probe(id="reconciliations", registry=REGISTRY)
def probe(memo: Any, **_: Any) -> float:
    return float(_context(memo).controller.reconciliations)


@kopf.on.resume(*FINETUNEJOBS, registry=REGISTRY)
@kopf.on.create(*FINETUNEJOBS, registry=REGISTRY)
@kopf.on.update(*FINETUNEJOBS, field="spec", registry=REGISTRY)
async def reconcile_finetunejob(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    assert namespace, "FineTuneJobs are namespaced"
    _context(memo).controller.queue_reconcile(namespace, name)


@kopf.on.event(*FINETUNEJOBS, registry=REGISTRY)
def track_finetunejob(
    type: str, body: kopf.Body, namespace: str | None, name: str, memo: Any, **_: Any
) -> None:
    context = _context(memo)
    assert namespace, "FineTuneJobs are namespaced"
    if type == "DELETED":
        context.metrics.forget(namespace, name)
        context.controller.forget(namespace, name)
    else:
        context.metrics.track(body)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED, registry=REGISTRY)
async def trainer_job_changed(body: kopf.Body, namespace: str | None, memo: Any, **_: Any) -> None:
    owner = owner_name(body)
    if owner and namespace:
        controller = _context(memo).controller
        if controller.job_event_needs_reconcile(namespace, owner, body):
            controller.queue_reconcile(namespace, owner)


@kopf.on.event("", "v1", "pods", labels=MANAGED, registry=REGISTRY)
async def trainer_pod_changed(body: kopf.Body, namespace: str | None, memo: Any, **_: Any) -> None:
    owner = owner_name(body)
    if owner and namespace:
        _context(memo).controller.queue_reconcile(namespace, owner)


@kopf.on.event(*KUEUE_WORKLOADS, registry=REGISTRY)
async def kueue_workload_changed(type: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    """Kueue's Workloads: why a queued trainer Job is not admitted yet, for the status."""
    controller = _context(memo).controller
    key = controller.workload_event_needs_reconcile(body, deleted=type == "DELETED")
    if key is not None:
        controller.queue_reconcile(*key)
