"""Tiny fine-tuning jobs on the built-in preset, sized to train in seconds on a CPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune import api
from kubetune.trainer.run import quiet_libraries

JobFactory = Callable[..., api.FineTuneJob]


def tiny_job(name: str = "tiny", **spec: Any) -> api.FineTuneJob:
    """A short run on the dates data; keyword arguments replace whole spec sections."""
    base: dict[str, Any] = {
        "model": {"name": "kubetune/tiny-llama"},
        "dataset": {"train": "builtin:dates", "validationSplit": 0.05, "format": "prompt-completion"},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"maxSteps": 12, "learningRate": 0.003, "batchSize": 8, "maxSeqLength": 32},
        "evaluation": {"metrics": ["loss", "exact_match"], "maxSamples": 8, "maxNewTokens": 8},
        "export": {"merge": False},
        "output": {"uri": "unused"},
        "resources": {"gpus": 0},
    }
    base.update(spec)
    return api.FineTuneJob.model_validate(
        {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": base}
    )


@pytest.fixture(scope="session", autouse=True)
def _quiet() -> None:
    quiet_libraries()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "work"
