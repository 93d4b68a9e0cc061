"""Where and with what the trainer runs: resources per node and pod scheduling."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from kubetune.api.common import DnsSubdomain, Model, NetworkAttachment, Quantity


class Network(Model):
    """The trainer pods' fast network between nodes (InfiniBand, RoCE): RDMA devices, the
    capability to pin memory, secondary networks and NCCL's settings."""

    extended_resources: dict[str, Annotated[int, Field(ge=1, le=256)]] = Field(
        default_factory=dict,
        max_length=8,
        description=(
            "Extended resources per node (domain/name: count) that the trainer container requests, "
            "e.g. rdma/rdma_shared_device_a: 1 or nvidia.com/hostdev: 8 from an RDMA or SR-IOV "
            "device plugin. Not the GPU resource: that is gpus."
        ),
    )
    capabilities: list[Literal["IPC_LOCK"]] = Field(
        default_factory=list,
        max_length=1,
        description=(
            "Linux capabilities added to the trainer container, which otherwise drops all: IPC_LOCK, "
            "which RDMA asks for to pin memory. Needs a namespace at the privileged Pod Security level. "
            "containerd and CRI-O keep an added capability out of the effective set of a non-root "
            "process such as the trainer (uid 1000): pinning then depends on the node's memlock limit."
        ),
    )
    networks: list[NetworkAttachment] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "Secondary networks of the trainer pods, [namespace/]name[@interface] of Multus "
            "NetworkAttachmentDefinitions: the pods' k8s.v1.cni.cncf.io/networks annotation."
        ),
    )
    nccl_env: dict[str, Annotated[str, StringConstraints(max_length=1024)]] = Field(
        default_factory=dict,
        max_length=32,
        description=(
            "NCCL_* environment variables of the trainer, e.g. NCCL_IB_HCA or NCCL_SOCKET_IFNAME. "
            "NCCL_DEBUG here replaces the default of pods with several GPUs (INFO, subsystems INIT,NET)."
        ),
    )


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
    network: Network | None = Field(
        None,
        description="RDMA devices, capabilities, secondary networks and NCCL settings; unset: none.",
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
