"""The tokenizer saved with the artifacts renders chats as the model was trained on them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from kubetune.trainer import presets
from kubetune.trainer.data.templates import CHATML_JINJA
from kubetune.trainer.pipeline import execute
from kubetune.trainer.reporter import SilentReporter

from .conftest import tiny_job

pytestmark = pytest.mark.training


def test_a_fallback_template_is_saved_with_every_artifact(tmp_path: Path) -> None:
    """A base model without a chat template trained on ChatML: adapter/ and merged/ carry ChatML."""
    base = tmp_path / "base"
    shutil.copytree(presets.preset_path("kubetune/tiny-llama"), base)
    (base / "chat_template.jinja").unlink()
    assert AutoTokenizer.from_pretrained(base).chat_template is None
    job = tiny_job(
        model={"uri": str(base)},
        dataset={
            "train": "builtin:dates",
            "validationSplit": 0.05,
            "format": "prompt-completion",
            "template": "chatml",
        },
        training={"maxSteps": 2, "batchSize": 8, "maxSeqLength": 48},
        evaluation={"metrics": ["loss"], "baseline": False},
        export={"merge": True},
    )
    out = tmp_path / "out"
    ctx = execute(job, SilentReporter(), workdir=tmp_path / "work", output=str(out))
    assert ctx.data is not None and ctx.data.template == "chatml"
    row = json.loads((presets.BUILTIN_DATA / "dates.jsonl").read_text(encoding="utf-8").splitlines()[0])
    chat = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    trained_text = (
        f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n{row['completion']}<|im_end|>\n"
    )
    for artifact in ("adapter", "merged"):
        saved = AutoTokenizer.from_pretrained(out / artifact)
        assert saved.chat_template == CHATML_JINJA, artifact
        assert saved.apply_chat_template(chat, tokenize=False) == trained_text
