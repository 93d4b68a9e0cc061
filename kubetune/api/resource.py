"""The FineTuneJob resource: its spec, which gathers the sections, and its metadata."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from kubetune.api.cluster import Resources, Scheduling
from kubetune.api.common import DNS_SUBDOMAIN_PATTERN, DnsLabel, Model
from kubetune.api.enums import Method
from kubetune.api.evaluation import Evaluation
from kubetune.api.sources import Credentials, Dataset, Export, ModelSource, Output, Storage
from kubetune.api.status import FineTuneJobStatus
from kubetune.api.training import Lora, Quantization, Training


class FineTuneJobSpec(Model):
    """What to fine-tune, on which data, how, and where the results go."""

    model: ModelSource = Field(
        description="The base model: a hub id or built-in preset (name), or weights in HF layout (uri)."
    )
    dataset: Dataset = Field(description="The training and validation data and how rows are read.")
    method: Method = Field(
        Method.LORA,
        description="full trains every weight, lora an adapter, qlora one on a 4-bit base. Default lora.",
    )
    lora: Lora = Field(default_factory=Lora, description="The adapter of lora and qlora.")
    quantization: Quantization | None = Field(
        None, description="The frozen base's quantization; only with qlora. Unset: 4-bit NF4, double quant."
    )
    training: Training = Field(default_factory=Training, description="Optimisation, batch and parallelism.")
    evaluation: Evaluation = Field(
        default_factory=Evaluation,
        description="Held-out metrics and harness tasks, before and after training.",
    )
    export: Export = Field(
        default_factory=Export, description="The merged model and its exports (bitsandbytes, GGUF)."
    )
    output: Output = Field(description="Where the artifacts go.")
    resources: Resources = Field(default_factory=Resources, description="GPUs, nodes, CPU, memory and disk.")
    scheduling: Scheduling = Field(
        default_factory=Scheduling, description="Node selection, tolerations, priority and Kueue queue."
    )
    credentials: Credentials = Field(
        default_factory=Credentials, description="Secrets for object storage and the Hugging Face hub."
    )
    storage: Storage = Field(default_factory=Storage, description="The S3-compatible object store.")
    image: Annotated[str, StringConstraints(min_length=1, max_length=512)] | None = Field(
        None,
        description="Trainer image; unset: the operator's. Must be one the operator allows (allowedImages).",
    )
    backoff_limit: int = Field(2, ge=0, le=100, description="Retries of the trainer. Default 2.")
    disruption_limit: int = Field(
        5,
        ge=0,
        le=1000,
        description=(
            "Attempts ended by preemption, eviction or a lost peer node that are retried without "
            "counting against backoffLimit; one more fails the job (DisruptionLimitExceeded)."
        ),
    )
    termination_grace_period_seconds: int | None = Field(
        None,
        ge=1,
        le=86400,
        description=(
            "Seconds the trainer gets after SIGTERM (preemption, drain, suspend) to save a "
            "checkpoint; unset: the operator's default (120)."
        ),
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Seconds the trainer Job may run before it is failed; unset: no limit."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Seconds after it finishes that the trainer Job is deleted; unset: kept."
    )
    suspend: bool = Field(False, description="Hold the job, or stop it while it runs.")

    def resolved_strategy(self, processes: int) -> Literal["ddp", "fsdp"]:
        """auto: FSDP for full fine-tuning with more than one process, DDP otherwise."""
        if self.training.strategy != "auto":
            return self.training.strategy
        return "fsdp" if self.method == Method.FULL and processes > 1 else "ddp"

    def deprecations(self) -> list[str]:
        """Warnings for the deprecated fields this spec was written with; each is read as its successor."""
        return self.export.deprecations("spec.export")

    def resolved_quantization(self) -> Quantization | None:
        """QLoRA without explicit settings means 4-bit NF4 with double quantization."""
        if self.method == Method.QLORA:
            return self.quantization or Quantization()
        return None


class ObjectMeta(BaseModel):
    """The part of metadata the API server validates for a custom resource."""

    model_config = ConfigDict(extra="allow")

    name: Annotated[str, StringConstraints(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]
    namespace: DnsLabel | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class FineTuneJob(Model):
    """Fine-tunes a language model on a dataset and publishes the results to object storage."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field(
        "kubetune.io/v1alpha1", description="The API group and version: kubetune.io/v1alpha1."
    )
    kind: Literal["FineTuneJob"] = Field("FineTuneJob", description="The resource kind: FineTuneJob.")
    metadata: ObjectMeta = Field(description="Standard object metadata; name is a DNS subdomain.")
    spec: FineTuneJobSpec = Field(description=FineTuneJobSpec.__doc__)
    status: FineTuneJobStatus | None = Field(None, description=FineTuneJobStatus.__doc__)
