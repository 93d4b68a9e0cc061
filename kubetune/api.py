"""The FineTuneJob API (kubetune.io/v1alpha1): the one source of truth.

The CRD in ``crds/`` is generated from these models (``kubetune crd``), ``kubetune validate``
checks manifests with them, the operator plans from them and the trainer runs them. Every
cross-field rule is written once in ``RULES`` as a CEL expression for the API server and as
the equivalent Python predicate for offline validation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
# training.gradientCheckpointing unset: on for models with at least this many base parameters.
CHECKPOINTING_FROM_PARAMETERS = 1_000_000_000

# An HF-style id: `name` or `org/name`, letters, digits and `-_.`; never free text.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$"
# s3://bucket/key, file://path or a local path; data may also name a dataset on the hub
# (hf://org/name) or one shipped with kubetune (builtin:name). A `..` segment is refused by RULES
# (the API server's regular expressions have no look-ahead).
OUTPUT_URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|file://.+|[^:]+)$"
DATA_URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|file://.+|hf://[A-Za-z0-9._/-]+|builtin:[a-z0-9-]+|[^:]+)$"
PARENT_SEGMENT = r"(^|/)[.][.](/|$)"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"

ShortStr = Annotated[str, StringConstraints(min_length=1, max_length=253)]
DnsLabel = Annotated[str, StringConstraints(max_length=63, pattern=DNS_LABEL_PATTERN)]
DnsSubdomain = Annotated[str, StringConstraints(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]
Quantity = Annotated[str, StringConstraints(max_length=64, pattern=QUANTITY_PATTERN)]
DataUri = Annotated[str, StringConstraints(min_length=1, max_length=1024, pattern=DATA_URI_PATTERN)]
OutputUri = Annotated[str, StringConstraints(min_length=1, max_length=1024, pattern=OUTPUT_URI_PATTERN)]


class Model(BaseModel):
    """Base for every API object: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Method(StrEnum):
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"


class DatasetFormat(StrEnum):
    AUTO = "auto"
    TEXT = "text"
    PROMPT_COMPLETION = "prompt-completion"
    INSTRUCTION = "instruction"
    CHAT = "chat"


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class Stage(StrEnum):
    FETCH = "fetch"
    PREPARE = "prepare"
    BASELINE = "baseline"
    TRAIN = "train"
    EVALUATE = "evaluate"
    MERGE = "merge"
    QUANTIZE = "quantize"
    PUSH = "push"


class ModelSource(Model):
    """The base model: a hub id or built-in preset (`name`), or weights in HF layout (`uri`)."""

    name: Annotated[str, StringConstraints(max_length=193, pattern=MODEL_NAME_PATTERN)] | None = Field(
        None, description="Hugging Face model id (org/name) or a built-in preset."
    )
    uri: OutputUri | None = Field(
        None, description="s3:// prefix or local path of a model in Hugging Face layout."
    )
    revision: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = Field(
        None, description="Hub revision (branch, tag or commit) when loading by name."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint. Off unless set."
    )


class Dataset(Model):
    train: DataUri = Field(description="Training data: s3://, local path, hf://id or builtin:name.")
    validation: DataUri | None = Field(None, description="Held-out data; else validationSplit.")
    validation_split: float | None = Field(
        None, gt=0, lt=1, description="Fraction of train held out (seeded) when no validation."
    )
    format: DatasetFormat = Field(DatasetFormat.AUTO, description="Row format; auto detects.")
    template: Literal["auto", "model", "chatml", "alpaca", "none"] = Field(
        "auto", description="Prompt template: the model's chat template if any, else a fallback."
    )
    train_on_inputs: bool = Field(
        False, description="Compute loss on prompt tokens too (default: completion only)."
    )


class Lora(Model):
    r: int = Field(16, ge=1, le=1024, description="Adapter rank.")
    alpha: int = Field(32, ge=1, le=4096, description="Adapter scaling numerator.")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: ["all-linear"],
        max_length=64,
        description="Module names to adapt; all-linear adapts every linear layer.",
    )
    modules_to_save: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = Field(
        default_factory=list,
        max_length=64,
        description="Modules trained in full beside the adapter (e.g. embed_tokens).",
    )


class Quantization(Model):
    bits: Literal[4, 8] = Field(4, description="Weight bits of the frozen base.")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16")


class EarlyStopping(Model):
    patience: int = Field(3, ge=1, le=1000, description="Evaluations without improvement.")
    threshold: float = Field(0.0, ge=0, description="Smallest improvement that counts.")


class Training(Model):
    epochs: float | None = Field(None, gt=0, le=1000, description="Passes over the data.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; exclusive of epochs.")
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1, le=4096, description="Examples per device per step.")
    gradient_accumulation: int = Field(1, ge=1, le=4096)
    max_seq_length: int = Field(
        1024,
        ge=16,
        le=1048576,
        description="Longer rows are truncated; longer text documents are split into pieces of this length.",
    )
    packing: bool = Field(
        False,
        description=(
            "Pack examples into full rows of maxSeqLength (no cross-attention; changes how many "
            "examples make a step). Off: each batch keeps its examples, flattened into one row "
            "without padding where the attention implementation isolates them, else padded."
        ),
    )
    gradient_checkpointing: bool | None = Field(
        None,
        description="Recompute activations in the backward pass. Unset: on from 1B base parameters.",
    )
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="Data parallelism over several processes: ddp replicates the model, fsdp shards "
        "weights, gradients and optimizer states; auto is fsdp for full fine-tuning with more than "
        "one process, else ddp.",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description=(
            "auto: bf16 on GPUs that have it and as autocast on CPUs with AVX512-BF16 or AMX-BF16, "
            "else fp32. bf16 is honoured on any CPU; fp16 needs a GPU."
        ),
    )
    attention: Literal[
        "auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"
    ] = Field(
        "auto",
        description=(
            "Attention implementation. auto: flash_attention_2 on a GPU where flash-attn is "
            "installed, else the model's default (sdpa where it has it)."
        ),
    )
    liger: bool = Field(
        False,
        description=(
            "Liger kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU): less memory for the "
            "loss at long rows and large vocabularies, slower at 1B on an H200 (bench/RESULTS.md). "
            "Needs a CUDA GPU and a model type liger-kernel supports; refused where they cannot run."
        ),
    )
    seed: int = Field(42, ge=0, le=2**32 - 1)
    eval_every: int | None = Field(None, ge=1, description="Steps between validation passes.")
    early_stopping: EarlyStopping | None = None
    checkpoint_every: int | None = Field(None, ge=1, description="Steps between checkpoints.")
    collective_timeout_seconds: int = Field(
        1800,
        ge=60,
        le=604800,
        description=(
            "How long a process waits in a collective (all-reduce, barrier) for the others before "
            "failing, e.g. while rank 0 alone runs the baseline evaluation; the process group's and "
            "the Trainer's timeout. KUBETUNE_COLLECTIVE_TIMEOUT_SECONDS in the trainer's "
            "environment overrides it."
        ),
    )

    def resolved_gradient_checkpointing(self, base_parameters: int) -> bool:
        """Unset means on from CHECKPOINTING_FROM_PARAMETERS: activations then dominate memory."""
        if self.gradient_checkpointing is not None:
            return self.gradient_checkpointing
        return base_parameters >= CHECKPOINTING_FROM_PARAMETERS


class EvalMetric(StrEnum):
    LOSS = "loss"
    PERPLEXITY = "perplexity"
    EXACT_MATCH = "exact_match"
    ROUGE_L = "rouge_l"
    BLEU = "bleu"


HarnessTask = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-*]+$")]


class Harness(Model):
    """lm-evaluation-harness tasks, scored on the base model and on the result."""

    tasks: list[HarnessTask] = Field(
        min_length=1,
        max_length=64,
        description="Task, group or tag names of lm-evaluation-harness, e.g. [mmlu, arc_easy, hellaswag].",
    )
    include: OutputUri | None = Field(
        None,
        description=(
            "A local folder or s3:// prefix of custom task YAML (and its data, named relative to "
            "that folder), for own benchmarks and offline clusters."
        ),
    )
    limit: float | None = Field(
        None, gt=0, description="Documents per task: a count (>= 1) or a fraction (< 1); all if unset."
    )
    num_fewshot: int | None = Field(
        None, ge=0, le=64, description="Few-shot examples; the task's own if unset."
    )
    batch_size: int = Field(8, ge=1, le=1024, description="Requests per forward pass.")


class Regression(Model):
    """The gate on harness scores: a drop beyond maxDrop marks the job Regressed."""

    max_drop: float = Field(
        gt=0,
        le=1,
        description="Largest allowed drop of any harness score, in its own units (0.02 = 2 points).",
    )
    fail_on_regression: bool = Field(
        False, description="Fail the job (after publishing its artifacts) when it regressed."
    )


class Evaluation(Model):
    metrics: list[EvalMetric] = Field(
        default_factory=lambda: [
            EvalMetric.LOSS,
            EvalMetric.PERPLEXITY,
            EvalMetric.EXACT_MATCH,
            EvalMetric.ROUGE_L,
            EvalMetric.BLEU,
        ],
        max_length=8,
    )
    baseline: bool = Field(True, description="Evaluate the base model before training.")
    max_samples: int = Field(64, ge=1, le=100000, description="Held-out rows for generation.")
    max_loss_samples: int = Field(
        1000,
        ge=1,
        le=10000000,
        description=(
            "Validation examples (the first ones) the loss and perplexity before and after training "
            "are computed on; bounds the baseline, which rank 0 runs alone while the others wait."
        ),
    )
    max_new_tokens: int = Field(64, ge=1, le=8192)
    harness: Harness | None = Field(None, description="General-capability checks before and after.")
    regression: Regression | None = Field(None, description="Gate on the harness scores; needs harness.")


class ExportFormat(StrEnum):
    """The exports of the merged model: bitsandbytes for transformers, GGUF for llama.cpp and Ollama."""

    BNB_4BIT = "bnb-4bit"
    BNB_8BIT = "bnb-8bit"
    GGUF_F16 = "gguf-f16"
    GGUF_Q8_0 = "gguf-q8_0"
    GGUF_Q4_K_M = "gguf-q4_k_m"


# config.json model types the GGUF exports support (the llama family of llama.cpp, and qwen2).
GGUF_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})


class Export(Model):
    merge: bool = Field(True, description="Merge the adapter into the base weights.")
    quantize: list[ExportFormat] = Field(
        default_factory=list,
        max_length=len(ExportFormat),
        description=(
            "Exports of the merged model, each in quantized/<format>/: bnb-4bit and bnb-8bit (bitsandbytes, "
            "for transformers); gguf-f16, gguf-q8_0 and gguf-q4_k_m (model.gguf and an Ollama Modelfile, "
            "for llama.cpp, Ollama and LM Studio; Llama, Mistral and Qwen2 models)."
        ),
    )


class Output(Model):
    uri: OutputUri = Field(description="s3://bucket/prefix/ or a local path for artifacts.")


class Resources(Model):
    gpus: int = Field(1, ge=0, le=64, description="GPUs per node.")
    nodes: int = Field(1, ge=1, le=1024)
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
        "checks the job against it.",
    )


class Toleration(Model):
    key: Annotated[str, StringConstraints(max_length=316)] | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: Annotated[str, StringConstraints(max_length=63)] | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class Scheduling(Model):
    node_selector: dict[str, Annotated[str, StringConstraints(max_length=63)]] = Field(
        default_factory=dict, max_length=32
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    affinity: dict[str, Any] | None = Field(None, description="A core/v1 Affinity, passed on.")
    priority_class_name: DnsSubdomain | None = None
    queue_name: DnsSubdomain | None = Field(None, description="Kueue LocalQueue name.")


class Credentials(Model):
    storage_secret: DnsSubdomain | None = Field(
        None, description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."
    )
    hugging_face_secret: DnsSubdomain | None = Field(None, description="Secret with HF_TOKEN.")


class Storage(Model):
    endpoint: Annotated[str, StringConstraints(max_length=512, pattern=r"^https?://.+")] | None = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph, R2)."
    )
    region: Annotated[str, StringConstraints(max_length=64)] | None = None


class FineTuneJobSpec(Model):
    model: ModelSource
    dataset: Dataset
    method: Method = Method.LORA
    lora: Lora = Field(default_factory=Lora)
    quantization: Quantization | None = None
    training: Training = Field(default_factory=Training)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    export: Export = Field(default_factory=Export)
    output: Output
    resources: Resources = Field(default_factory=Resources)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    credentials: Credentials = Field(default_factory=Credentials)
    storage: Storage = Field(default_factory=Storage)
    image: Annotated[str, StringConstraints(min_length=1, max_length=512)] | None = None
    backoff_limit: int = Field(2, ge=0, le=100, description="Retries of the trainer.")
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
    active_deadline_seconds: int | None = Field(None, ge=1)
    ttl_seconds_after_finished: int | None = Field(None, ge=0)
    suspend: bool = Field(False, description="Hold the job, or stop it while it runs.")

    def resolved_strategy(self, processes: int) -> Literal["ddp", "fsdp"]:
        """auto: FSDP for full fine-tuning with more than one process, DDP otherwise."""
        if self.training.strategy != "auto":
            return self.training.strategy
        return "fsdp" if self.method == Method.FULL and processes > 1 else "ddp"

    def resolved_quantization(self) -> Quantization | None:
        """QLoRA without explicit settings means 4-bit NF4 with double quantization."""
        if self.method == Method.QLORA:
            return self.quantization or Quantization()
        return None


class Condition(Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class Progress(Model):
    stage: Stage | None = None
    step: int | None = None
    total_steps: int | None = None
    percent: int | None = None
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: int | None = None
    updated_at: str | None = None


class ScoreDrop(Model):
    """A harness score that fell by more than spec.evaluation.regression.maxDrop."""

    score: str = Field(description="<task>/<metric>, as in results.before and results.after.")
    before: float
    after: float
    drop: float = Field(description="How much worse, in the score's own units.")

    def summary(self) -> str:
        return f"{self.score} {self.before:.4g} -> {self.after:.4g} (-{self.drop:.4g})"


class Results(Model):
    before: dict[str, float] = Field(
        default_factory=dict, description="Metrics of the base model; harness scores as <task>/<metric>."
    )
    after: dict[str, float] = Field(default_factory=dict, description="The same metrics after training.")
    regressions: list[ScoreDrop] | None = Field(
        None, description="Harness scores beyond the regression gate's maxDrop; empty when none."
    )


class Artifacts(Model):
    root: str | None = None
    adapter: str | None = None
    merged: str | None = None
    quantized: dict[str, str] = Field(default_factory=dict)
    metrics: str | None = None
    report: str | None = None
    model_card: str | None = None
    manifest: str | None = None


class FineTuneJobStatus(Model):
    phase: Phase | None = None
    stage: Stage | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    progress: Progress | None = None
    results: Results | None = None
    artifacts: Artifacts | None = None
    attempts: int | None = None
    start_time: str | None = None
    completion_time: str | None = None
    message: str | None = None


class ObjectMeta(BaseModel):
    """The part of metadata the API server validates for a custom resource."""

    model_config = ConfigDict(extra="allow")

    name: Annotated[str, StringConstraints(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]
    namespace: DnsLabel | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class FineTuneJob(Model):
    api_version: Literal["kubetune.io/v1alpha1"] = "kubetune.io/v1alpha1"
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None


def _no_parent_segment(parent: str, field: str) -> Callable[[FineTuneJobSpec], bool]:
    def holds(spec: FineTuneJobSpec) -> bool:
        node: Any = spec
        for name in parent.split("."):
            node = getattr(node, name) if node is not None else None
        uri = getattr(node, field) if node is not None else None
        return uri is None or not re.search(PARENT_SEGMENT, uri)

    return holds


@dataclass(frozen=True)
class Rule:
    """A cross-field rule: CEL for the API server, the same predicate in Python for us."""

    path: str  # the schema node the rule sits on, e.g. "spec.training"
    cel: str
    message: str
    holds: Callable[[FineTuneJobSpec], bool]
    field: str | None = None  # the reported child field, for the API server's fieldPath


RULES: tuple[Rule, ...] = (
    Rule(
        path="spec.training",
        cel="!(has(self.epochs) && has(self.maxSteps))",
        message="set at most one of epochs and maxSteps",
        holds=lambda s: s.training.epochs is None or s.training.max_steps is None,
        field="maxSteps",
    ),
    Rule(
        path="spec",
        cel="!has(self.quantization) || self.method == 'qlora'",
        message="quantization applies only to method qlora",
        holds=lambda s: s.quantization is None or s.method == Method.QLORA,
        field="quantization",
    ),
    Rule(
        path="spec.dataset",
        cel="!(has(self.validation) && has(self.validationSplit))",
        message="set at most one of validation and validationSplit",
        holds=lambda s: s.dataset.validation is None or s.dataset.validation_split is None,
        field="validationSplit",
    ),
    Rule(
        path="spec.model",
        cel="has(self.name) || has(self.uri)",
        message="set name (a hub id or preset) or uri (a model in HF layout)",
        holds=lambda s: s.model.name is not None or s.model.uri is not None,
        field="name",
    ),
    Rule(
        path="spec.evaluation",
        cel="!has(self.regression) || has(self.harness)",
        message="regression gates the harness scores: set harness",
        holds=lambda s: s.evaluation.regression is None or s.evaluation.harness is not None,
        field="regression",
    ),
    Rule(
        path="spec.training",
        cel="!has(self.earlyStopping) || has(self.evalEvery)",
        message="earlyStopping needs evalEvery",
        holds=lambda s: s.training.early_stopping is None or s.training.eval_every is not None,
        field="earlyStopping",
    ),
    *(
        Rule(
            path=f"spec.{parent}",
            cel=f"!has(self.{field}) || !self.{field}.matches('{PARENT_SEGMENT}')",
            message="must not contain a '..' segment",
            holds=_no_parent_segment(parent, field),
            field=field,
        )
        for parent, field in (
            ("model", "uri"),
            ("dataset", "train"),
            ("dataset", "validation"),
            ("output", "uri"),
            ("evaluation.harness", "include"),
        )
    ),
    Rule(
        path="spec",
        cel="!has(self.export.quantize) || size(self.export.quantize) == 0"
        " || self.export.merge || self.method == 'full'",
        message="quantized exports are made from the merged model: set export.merge",
        holds=lambda s: not s.export.quantize or s.export.merge or s.method == Method.FULL,
        field="export.quantize",
    ),
)

# Fields a running job may still change. The others are frozen once the operator has started it.
MUTABLE_WHEN_STARTED = frozenset({"suspend"})


def started(obj: dict[str, Any]) -> bool:
    return bool((obj.get("status") or {}).get("startTime"))
