"""What the operator and the trainer report back: phase, conditions, progress, results, artifacts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubetune.api.common import Model
from kubetune.api.enums import Phase, Stage


class Condition(Model):
    """A metav1.Condition: one aspect of the job's state, keyed by type."""

    type: str = Field(description="Created, Running, Suspended, Succeeded, Failed, MemoryPlan or Regressed.")
    status: Literal["True", "False", "Unknown"] = Field(description="Whether the condition holds.")
    reason: str = Field(description="CamelCase cause of the last transition, for tools.")
    message: str = Field("", description="What happened, for people.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        None, description="metadata.generation of the spec the condition was set for."
    )


class Progress(Model):
    """The trainer's latest report; also exported as Prometheus metrics."""

    stage: Stage | None = Field(None, description="The stage running now.")
    step: int | None = Field(None, description="Optimizer steps done.")
    total_steps: int | None = Field(None, description="Optimizer steps planned.")
    percent: int | None = Field(None, description="Percent of the planned training steps done (0-100).")
    epoch: float | None = Field(None, description="Passes over the training data done, fractional.")
    loss: float | None = Field(None, description="Latest training loss.")
    eval_loss: float | None = Field(None, description="Latest validation loss.")
    learning_rate: float | None = Field(None, description="Current learning rate.")
    tokens_per_second: float | None = Field(
        None, description="Training throughput in non-padding tokens per second, all processes."
    )
    eta_seconds: int | None = Field(None, description="Estimated seconds until training ends.")
    updated_at: str | None = Field(None, description="When this report was written (RFC 3339).")


class ScoreDrop(Model):
    """A harness score that fell by more than spec.evaluation.regression.maxDrop."""

    score: str = Field(description="<task>/<metric>, as in results.before and results.after.")
    before: float = Field(description="The base model's score.")
    after: float = Field(description="The trained model's score.")
    drop: float = Field(description="How much worse, in the score's own units.")

    def summary(self) -> str:
        return f"{self.score} {self.before:.4g} -> {self.after:.4g} (-{self.drop:.4g})"


class Results(Model):
    """Evaluation before and after training; the full record is in metrics.json."""

    before: dict[str, float] = Field(
        default_factory=dict, description="Metrics of the base model; harness scores as <task>/<metric>."
    )
    after: dict[str, float] = Field(default_factory=dict, description="The same metrics after training.")
    regressions: list[ScoreDrop] | None = Field(
        None, description="Harness scores beyond the regression gate's maxDrop; empty when none."
    )


class Artifacts(Model):
    """Where the published artifacts are, under spec.output.uri/<namespace>/<job>/."""

    root: str | None = Field(None, description="The folder every artifact of this job is under.")
    adapter: str | None = Field(None, description="The LoRA adapter (PEFT layout).")
    merged: str | None = Field(
        None,
        description="Full weights in Hugging Face layout: the merged adapter, or the fully fine-tuned model.",
    )
    quantized: dict[str, str] = Field(
        default_factory=dict,
        description="Each export of spec.export.formats by format name (quantized/<format>/).",
    )
    metrics: str | None = Field(
        None, description="metrics.json: the evaluation results and the run's checks."
    )
    report: str | None = Field(None, description="report.png: loss curves (and harness scores).")
    model_card: str | None = Field(None, description="The model card (README.md).")
    manifest: str | None = Field(
        None,
        description="manifest.json: every file with size and SHA-256; written last, so marks a complete run.",
    )


class FineTuneJobStatus(Model):
    """Written by the operator and the trainer; never by users."""

    phase: Phase | None = Field(None, description="Pending, Running, Succeeded, Failed or Suspended.")
    stage: Stage | None = Field(None, description="The trainer stage running now or last run.")
    conditions: list[Condition] = Field(
        default_factory=list, description="The latest observation of each aspect of the job, by type."
    )
    observed_generation: int | None = Field(
        None, description="metadata.generation the operator last acted on."
    )
    progress: Progress | None = Field(None, description="The trainer's latest progress report.")
    results: Results | None = Field(None, description="Evaluation results, once the evaluate stage ran.")
    artifacts: Artifacts | None = Field(None, description="URIs of the published artifacts, once pushed.")
    attempts: int | None = Field(None, description="Trainer attempts started, counting retries.")
    start_time: str | None = Field(
        None,
        description="When the operator started the job (RFC 3339); from then the spec is frozen but suspend.",
    )
    completion_time: str | None = Field(None, description="When the job succeeded or failed (RFC 3339).")
    message: str | None = Field(None, description="A readable summary of the current state.")
