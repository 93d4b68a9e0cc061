"""How the result is judged: held-out metrics, lm-evaluation-harness tasks and the regression gate."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from kubetune.api.common import Model, OutputUri
from kubetune.api.enums import EvalMetric

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
    """Metrics on the held-out data, computed on the base model and on the result."""

    metrics: list[EvalMetric] = Field(
        default_factory=lambda: [
            EvalMetric.LOSS,
            EvalMetric.PERPLEXITY,
            EvalMetric.EXACT_MATCH,
            EvalMetric.ROUGE_L,
            EvalMetric.BLEU,
        ],
        max_length=8,
        description=(
            "Metrics on the validation data: loss and perplexity from the labels, exact_match, "
            "rouge_l and bleu from generated completions. Default: all of them."
        ),
    )
    baseline: bool = Field(True, description="Evaluate the base model before training.")
    max_samples: int = Field(
        64,
        ge=1,
        le=100000,
        description="Held-out rows generated from for the generation metrics. Default 64.",
    )
    max_loss_samples: int = Field(
        1000,
        ge=1,
        le=10000000,
        description=(
            "Validation examples (the first ones) the loss and perplexity before and after training "
            "are computed on; bounds the baseline, which rank 0 runs alone while the others wait."
        ),
    )
    max_new_tokens: int = Field(
        64, ge=1, le=8192, description="Most tokens generated per held-out prompt. Default 64."
    )
    harness: Harness | None = Field(None, description="General-capability checks before and after.")
    regression: Regression | None = Field(None, description="Gate on the harness scores; needs harness.")
