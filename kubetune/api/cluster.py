"""Where and with what the trainer runs: resources per node and pod scheduling."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from kubetune.api.common import DnsSubdomain, Model, Quantity


class Resources(Model):
    """What each trainer node (pod) gets; processes per node follow the GPUs."""

    gpus: int = Field(
        1,
        ge=0,
        le=64,
        description=(
            "GPUs per node, of the operator's GPU resource (nvidia.com/gpu unless set); "
            "0 trains on the CPU. Default 1."
        ),
    )
    nodes: int = Field(
        1,
        ge=1,
        le=1024,
        description="Trainer pods, one per node; more than 1 runs an indexed Job. Default 1.",
    )
    cpu: Quantity | None = Field(
        None, description="CPU request and limit per node; unset: a request of 1, no limit."
    )
    memory: Quantity | None = Field(
        None, description="Memory request and limit per node; unset: a request of 4Gi, no limit."
    )
    scratch: Quantity | None = Field(
        None,
        description=(
            "Local disk per node for the model, data, checkpoints and artifacts: the scratch "
            "volume's sizeLimit and the ephemeral-storage request. Unset: a 100Gi limit, a 10Gi request."
        ),
    )
    gpu_memory: Quantity = Field(
        "80Gi",
        description="Memory of one GPU: the memory plan (kubetune plan, the MemoryPlan condition) "
        "checks the job against it. Default 80Gi.",
    )


class Toleration(Model):
    """A core/v1 Toleration of the trainer pods."""

    key: Annotated[str, StringConstraints(max_length=316)] | None = Field(
        None, description="Taint key to tolerate; empty with operator Exists tolerates every taint."
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        None, description="Equal (default) matches value; Exists matches any value."
    )
    value: Annotated[str, StringConstraints(max_length=63)] | None = Field(
        None, description="Taint value to match with operator Equal."
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches every effect."
    )
    toleration_seconds: int | None = Field(
        None, description="With effect NoExecute: seconds the pod stays bound after the taint appears."
    )


class Scheduling(Model):
    """Placement of the trainer pods, passed on to their pod spec."""

    node_selector: dict[str, Annotated[str, StringConstraints(max_length=63)]] = Field(
        default_factory=dict, max_length=32, description="Node labels the trainer pods require."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=32,
        description="Taints the trainer pods tolerate, e.g. of GPU nodes.",
    )
    affinity: dict[str, Any] | None = Field(None, description="A core/v1 Affinity, passed on.")
    priority_class_name: DnsSubdomain | None = Field(
        None, description="PriorityClass of the trainer pods, for preemption order."
    )
    queue_name: DnsSubdomain | None = Field(
        None, description="Kueue LocalQueue of the trainer Job; Kueue then decides when it starts."
    )
