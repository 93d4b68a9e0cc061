"""Reconciling one FineTuneJob: read, create what is missing, observe, write status.

Objects are found by their planned names, so a run that stops at any line and runs again
converges to one set of children and one status. Until the trainer Job exists each child is
created first and read only when it is already there (409): a new FineTuneJob costs one
request per object rather than two.
"""

from __future__ import annotations

import logging
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubetune import api

from . import observe as obs
from . import planning
from .kube import Kube, message_of
from .metrics import Metrics

logger = logging.getLogger(__name__)

# A name clash clears itself when the garbage collector removes a previous job's children.
CONFLICT_RETRY_SECONDS = 10.0
EVENT_MESSAGE_LIMIT = 1024


@dataclass(frozen=True)
class Result:
    phase: str | None = None
    requeue_after: float | None = None


class GetOrCreateResult(NamedTuple):
    """A child found by its planned name or created; or None and why (another owner holds the name)."""

    obj: dict[str, Any] | None
    conflict: str | None = None
    created: bool = False


def utcnow() -> datetime:
    return datetime.now(UTC)


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        config: planning.OperatorConfig,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = utcnow,
        instance: str | None = None,
    ) -> None:
        self.kube = kube
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.instance = instance or socket.gethostname()

    def reconcile(
        self,
        namespace: str,
        name: str,
        *,
        last_seen_job: Mapping[str, Any] | None = None,
        job_created: Callable[[str], None] | None = None,
        kueue_wait: str | None = None,
    ) -> Result:
        """One pass. ``last_seen_job`` is the trainer Job as a watch last showed it: the only
        record of how it ended once a TTL or a person deleted it. ``job_created`` is told the
        resourceVersion of a trainer Job this pass created, as soon as it exists: the watch event
        of the create brings nothing new. ``kueue_wait`` is Kueue's reason for not admitting
        that Job yet, from its Workload."""
        body = self.kube.get(api.KIND, namespace, name)
        if body is None:
            return Result()
        status: dict[str, Any] = body.get("status") or {}
        if status.get("phase") in obs.TERMINAL:
            return Result(phase=status["phase"])
        generation = int(body["metadata"].get("generation") or 1)
        try:
            job_model = planning.parse(body)
        except ValidationError as error:
            return self._invalid(body, status, generation, error)
        if status.get("observedGeneration") != generation:
            # Once per generation (until a status records it): the spec is read by the new names.
            for warning in job_model.spec.deprecations():
                self.post_event(body, obs.Event("Warning", "DeprecatedField", warning))
        started = bool(status.get("startTime"))
        refused = None if started else planning.admission(job_model, self.config)
        if refused is not None:
            return self._fail(body, status, generation, *refused)
        plan = planning.plan(job_model, self.config)
        uid = body["metadata"]["uid"]

        conflict = None
        for obj in plan.prerequisites():
            child = self._get_or_create(obj, uid, likely_missing=not started)
            conflict = conflict or child.conflict
        # Never a second Job once one ran: after TTL cleanup or a deletion the job is over.
        trainer = self._get_or_create(
            plan.job, uid, create=conflict is None and not started, likely_missing=not started
        )
        job, conflict = trainer.obj, conflict or trainer.conflict
        if job is not None and trainer.created and job_created is not None:
            job_created(job["metadata"]["resourceVersion"])
        if job is None and not conflict and last_seen_job is not None and _owned_by(last_seen_job, uid):
            job = dict(last_seen_job)

        if job is not None and not conflict:
            patch = planning.suspend_patch(job_model.spec, job)
            if patch is not None:
                job = self.kube.patch("Job", namespace, plan.names.job, patch)
                logger.info(
                    "set suspend=%s on Job %s/%s", job["spec"].get("suspend"), namespace, plan.names.job
                )
            self._explain_drift(body, status, generation, job_model, plan)

        pods: list[dict[str, Any]] = []
        if job is not None and not trainer.created:
            job_uid = job["metadata"]["uid"]
            pods = self.kube.list(
                "Pod", namespace, label_selector=f"batch.kubernetes.io/controller-uid={job_uid}"
            )

        update = obs.observe(
            job,
            pods,
            spec=job_model.spec,
            status=status,
            generation=generation,
            job_name=plan.names.job,
            now=self.clock(),
            conflict=conflict,
            kueue_wait=kueue_wait,
        )
        if update.reason == "DisruptionLimitExceeded" and job is not None and not trainer.created:
            # The Job would replace the pod once more; suspending it ends its pods, keeps the
            # failed ones to look at, and gives the quota back (Kueue).
            self.kube.patch("Job", namespace, plan.names.job, {"spec": {"suspend": True}})
            logger.info("suspended Job %s/%s: %s", namespace, plan.names.job, update.message)
        self._write(body, status, update)
        return Result(phase=update.phase, requeue_after=CONFLICT_RETRY_SECONDS if conflict else None)

    def _get_or_create(
        self, obj: Mapping[str, Any], uid: str, *, create: bool = True, likely_missing: bool = False
    ) -> GetOrCreateResult:
        """The object by its planned name, created when missing; or a conflict when another owns it.
        ``likely_missing`` tries the create first (its 409 says it exists), else the read."""
        kind, meta = obj["kind"], obj["metadata"]
        existing = None if create and likely_missing else self.kube.get(kind, meta["namespace"], meta["name"])
        if existing is None and create:
            try:
                created = self.kube.create(obj)
            except ApiException as error:
                if error.status != 409:
                    raise
                existing = self.kube.get(kind, meta["namespace"], meta["name"])
            else:
                logger.info("created %s %s/%s", kind, meta["namespace"], meta["name"])
                return GetOrCreateResult(created, created=True)
        if existing is None or _owned_by(existing, uid):
            return GetOrCreateResult(existing)
        return GetOrCreateResult(None, self._conflict_message(existing, kind))

    @staticmethod
    def _conflict_message(existing: Mapping[str, Any], kind: str) -> str:
        meta = existing.get("metadata") or {}
        refs = [r for r in meta.get("ownerReferences") or [] if r.get("controller")]
        owner = (
            f"{refs[0].get('kind')} {refs[0].get('name')} (uid {refs[0].get('uid')})" if refs else "no owner"
        )
        return (
            f"{kind} {meta.get('name')} already exists and is controlled by {owner}; "
            "waiting for it to go away"
        )

    def _explain_drift(
        self,
        body: Mapping[str, Any],
        status: Mapping[str, Any],
        generation: int,
        job_model: api.FineTuneJob,
        plan: planning.Plan,
    ) -> None:
        """An event when the spec changed after the trainer started: the change is not applied."""
        if status.get("observedGeneration") in (None, generation):
            return
        config_map = self.kube.get(
            "ConfigMap", plan.config_map["metadata"]["namespace"], plan.names.config_map
        )
        changed = planning.spec_drift(config_map or {}, job_model)
        if changed:
            self.post_event(
                body,
                obs.Event(
                    "Warning",
                    "SpecChangeIgnored",
                    f"spec.{', spec.'.join(changed)} changed after the trainer started; the trainer keeps "
                    f"the spec in ConfigMap {plan.names.config_map}. Only spec.suspend may change; "
                    "create a new FineTuneJob to run with other settings.",
                ),
            )

    def _invalid(
        self, body: Mapping[str, Any], status: Mapping[str, Any], generation: int, error: ValidationError
    ) -> Result:
        """A spec the API server accepted but the models refuse (an older CRD): fail, do not guess."""
        problems = "; ".join(
            f"spec.{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in error.errors()[:5]
        )
        return self._fail(body, status, generation, "InvalidSpec", f"invalid spec: {problems}")

    def _fail(
        self, body: Mapping[str, Any], status: Mapping[str, Any], generation: int, reason: str, message: str
    ) -> Result:
        """Failed before anything is created: a condition, a Warning event, no children."""
        update = obs.refused(status, reason=reason, message=message, generation=generation, now=self.clock())
        self._write(body, status, update)
        return Result(phase=obs.FAILED)

    def _write(self, body: Mapping[str, Any], status: Mapping[str, Any], update: obs.StatusUpdate) -> None:
        meta = body["metadata"]
        patch = update.patch(status)
        if patch:
            self.kube.patch(
                api.KIND, meta["namespace"], meta["name"], {"status": patch}, subresource="status"
            )
            logger.info(
                "%s/%s: %s",
                meta["namespace"],
                meta["name"],
                {k: patch[k] for k in patch if k != "conditions"},
            )
        for event in update.events:
            self.post_event(body, event)
        if self.metrics and update.phase in obs.TERMINAL and status.get("phase") != update.phase:
            self.metrics.job_finished(update.phase, update.status.start_time, update.status.completion_time)

    def post_event(self, body: Mapping[str, Any], event: obs.Event) -> None:
        """A core/v1 Event on the FineTuneJob; a failure to post is logged, never raised."""
        meta = body["metadata"]
        now = self.clock()
        stamp = obs.timestamp(now)
        record = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta['name'][:236]}.{secrets.token_hex(8)}",
                "namespace": meta["namespace"],
            },
            "involvedObject": {
                "apiVersion": api.API_VERSION,
                "kind": api.KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message[:EVENT_MESSAGE_LIMIT],
            "count": 1,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "source": {"component": planning.MANAGER},
            "reportingComponent": f"{api.GROUP}/operator",
            "reportingInstance": self.instance[:128],
        }
        try:
            self.kube.create(record)
        except ApiException as error:
            logger.warning(
                "could not post event %s on %s/%s: %s",
                event.reason,
                meta["namespace"],
                meta["name"],
                message_of(error),
            )
