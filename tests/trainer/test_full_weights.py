"""A full fine-tune is published in its base model's dtype, not in its fp32 master weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kubetune.trainer import presets
from kubetune.trainer.pipeline import execute
from kubetune.trainer.reporter import SilentReporter

from .conftest import EVAL, short_training, tiny_job

pytestmark = pytest.mark.training


def bf16_base(folder: Path) -> Path:
    """The tiny preset as a bf16 checkpoint, as most published bases are."""
    source = presets.preset_path("kubetune/tiny-llama")
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def test_full_fine_tuning_publishes_the_weights_in_the_dtype_of_the_base(tmp_path: Path) -> None:
    base = bf16_base(tmp_path / "base")
    job = tiny_job(
        model={"name": "kubetune/tiny-llama", "uri": str(base)},
        method="full",
        training=short_training(2, 8, precision="fp32"),
        evaluation=EVAL,
    )
    execute(job, SilentReporter(), workdir=tmp_path / "work", output=str(tmp_path / "out"))
    merged = tmp_path / "out" / "merged"
    weights = load_file(merged / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    trained = AutoModelForCausalLM.from_pretrained(merged)
    assert trained.dtype == torch.bfloat16
