"""Baseline evaluation where training runs, with bounded work, and collectives that wait long enough."""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kubetune import api, contract
from kubetune.trainer import distributed, modeling, pipeline
from kubetune.trainer.context import RunContext
from kubetune.trainer.evaluation import evaluate, validation_loss
from kubetune.trainer.reporter import SilentReporter
from kubetune.trainer.stages.train import training_arguments

from .conftest import tiny_job, torchrun, write_job

pytestmark = pytest.mark.training
WORKER = Path(__file__).with_name("pg_timeout_worker.py")


def test_the_training_device_is_the_local_ranks_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert modeling.device() == torch.device("cpu")  # this machine has no GPU
    # No GPU here, so CUDA's availability is faked: device() only asks whether there is one.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert modeling.device() == torch.device("cuda", 3)
    monkeypatch.delenv("LOCAL_RANK")
    assert modeling.device() == torch.device("cuda", 0)


class Stop(Exception):
    pass


def test_baseline_runs_with_the_model_on_the_training_device(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The meta device stands in for the GPU this machine lacks: the model must be on it at baseline."""
    monkeypatch.setattr(modeling, "device", lambda: torch.device("meta"))
    seen: set[torch.device] = set()

    def baseline(ctx: RunContext) -> None:
        seen.update(p.device for p in ctx.model.parameters())
        raise Stop

    stages = [replace(s, run=baseline) if s.stage == api.Stage.BASELINE else s for s in pipeline.STAGES]
    monkeypatch.setattr(pipeline, "STAGES", stages)
    with pytest.raises(Stop):
        pipeline.execute(
            tiny_job(), SilentReporter(), workdir=tmp_path / "work", output=str(tmp_path / "out")
        )
    assert seen == {torch.device("meta")}


def test_validation_work_is_capped_with_sensible_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    defaults = api.Evaluation()
    assert (defaults.max_loss_samples, defaults.max_samples) == (1000, 64)
    monkeypatch.setattr(pipeline, "STAGES", pipeline.STAGES[:2])  # fetch and prepare: a model and data
    job = tiny_job(dataset={"train": "builtin:dates", "validationSplit": 0.1, "format": "prompt-completion"})
    ctx = pipeline.execute(job, SilentReporter(), workdir=tmp_path / "work", output=str(tmp_path / "out"))
    assert ctx.data is not None and len(ctx.data.validation) > 3
    capped = api.Evaluation(metrics=["loss"], max_loss_samples=3)
    metrics, _ = evaluate(ctx.model, ctx.tokenizer, ctx.data.validation, [], capped, batch_size=4)
    pad = ctx.tokenizer.pad_token_id
    ctx.model.eval()
    assert metrics["loss"] == pytest.approx(validation_loss(ctx.model, ctx.data.validation[:3], pad, 4))
    assert metrics["loss"] != pytest.approx(validation_loss(ctx.model, ctx.data.validation, pad, 4))


def test_the_loss_evaluation_holds_bounded_logits_and_gives_the_same_loss(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """At a 128k vocabulary a full evaluation batch of logits would not fit beside the model."""
    monkeypatch.setattr(pipeline, "STAGES", pipeline.STAGES[:2])
    job = tiny_job(dataset={"train": "builtin:dates", "validationSplit": 0.1, "format": "prompt-completion"})
    ctx = pipeline.execute(job, SilentReporter(), workdir=tmp_path / "work", output=str(tmp_path / "out"))
    assert ctx.data is not None
    model, examples, pad = ctx.model.eval(), ctx.data.validation[:24], ctx.tokenizer.pad_token_id
    vocab = model.get_output_embeddings().weight.shape[0]
    widest = max(len(e.input_ids) for e in examples)
    budget = 2 * widest * vocab * 4  # two full rows of fp32 logits, or a slice of positions
    rows_seen: list[int] = []
    forward = model.forward

    def counting(*args: object, **kwargs: torch.Tensor) -> object:
        rows_seen.append(kwargs["input_ids"].size(0))
        return forward(*args, **kwargs)

    unbounded = validation_loss(model, examples, pad, batch_size=8)
    monkeypatch.setattr(model, "forward", counting)
    bounded = validation_loss(model, examples, pad, batch_size=8, logits_bytes=budget)
    assert bounded == pytest.approx(unbounded, rel=1e-5)
    assert max(rows_seen) <= 2 and sum(rows_seen) == len(examples)
    sliced = validation_loss(model, examples, pad, batch_size=8, logits_bytes=vocab * 4 * 5)
    assert sliced == pytest.approx(unbounded, rel=1e-5)


def test_collective_timeout_from_the_spec_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tiny_job().spec
    assert spec.training.collective_timeout_seconds == 1800
    monkeypatch.delenv(contract.COLLECTIVE_TIMEOUT_ENV, raising=False)
    assert distributed.collective_timeout(spec.training.collective_timeout_seconds) == dt.timedelta(
        minutes=30
    )
    monkeypatch.setenv(contract.COLLECTIVE_TIMEOUT_ENV, "7200")
    assert distributed.collective_timeout(1800) == dt.timedelta(hours=2)
    monkeypatch.setenv(contract.COLLECTIVE_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=f"^{contract.COLLECTIVE_TIMEOUT_ENV}: expected seconds"):
        distributed.collective_timeout(1800)
    monkeypatch.delenv(contract.COLLECTIVE_TIMEOUT_ENV)
    longer = tiny_job(training={"maxSteps": 1, "collectiveTimeoutSeconds": 5400}).spec
    args = training_arguments(longer, Path("unused"), has_validation=False)
    assert args.ddp_timeout == 5400


def test_the_process_group_gets_the_collective_timeout(tmp_path: Path) -> None:
    """Two ranks under torchrun: the default group of each waits as long as the spec says."""
    job_file = write_job(tmp_path, training={"maxSteps": 1, "collectiveTimeoutSeconds": 4321})
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = torchrun(WORKER, str(job_file), str(tmp_path), env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((tmp_path / f"timeout{rank}.json").read_text()) for rank in (0, 1)]
    assert seen == [4321.0, 4321.0]
