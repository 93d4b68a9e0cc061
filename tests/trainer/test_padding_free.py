"""Padding-free batches, the default without packing: a whole run trains as the padded run does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.trainer import modeling
from kubetune.trainer.data import PackedCollator, PaddingCollator
from kubetune.trainer.pipeline import execute
from kubetune.trainer.stages import train as train_stage

from .conftest import tiny_job


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None

    def log(self, message: str) -> None:
        self.lines.append(message)


def spec(**training: Any) -> dict[str, Any]:
    t: dict[str, Any] = {"maxSteps": 10, "learningRate": 0.003, "batchSize": 8, "maxSeqLength": 32}
    t.update(training)
    return {"training": t, "evaluation": {"metrics": ["loss"], "baseline": False}}


@pytest.mark.training
def test_a_padding_free_run_trains_as_the_padded_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same examples per step: the training losses of the whole run agree with padded batches'."""
    runs: dict[str, Any] = {}
    for layout in ("padding-free", "padded"):
        if layout == "padded":
            monkeypatch.setattr(modeling, "padding_free_blocker", lambda model: "forced by the test")
        log = Log()
        runs[layout] = execute(
            tiny_job(**spec(precision="fp32")), log, workdir=tmp_path / layout, output=str(tmp_path / "o")
        )
        assert any(f"batches {layout}" in line for line in log.lines), log.lines
        collator = train_stage.batches(runs[layout])[1].inner
        assert isinstance(collator, PaddingCollator if layout == "padded" else PackedCollator)
    losses = {k: [h["loss"] for h in v.history if "loss" in h] for k, v in runs.items()}
    assert len(losses["padded"]) >= 5
    assert losses["padding-free"] == pytest.approx(losses["padded"], rel=1e-3)
    assert losses["padded"][-1] < losses["padded"][0]  # it learnt: the agreement is not of two flat lines
    for (name, free), (_, padded) in zip(
        runs["padding-free"].model.named_parameters(), runs["padded"].model.named_parameters(), strict=True
    ):
        if free.requires_grad:
            torch.testing.assert_close(free, padded, rtol=1e-3, atol=1e-5, msg=name)
