"""GGUF exports: written with gguf, quantized by llama.cpp, and read back by llama.cpp itself and
by gguf's reader. Small models built here: the preset (Llama), a Qwen2, a Llama with Llama 3.1
rope scaling, and a GPT-2 that the export refuses."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader

from kubetune import api
from kubetune.trainer import presets
from kubetune.trainer.exports import gguf as export
from kubetune.trainer.pipeline import execute
from kubetune.validation import InvalidJob

from .conftest import tiny_job
from .test_harness import LEARN_DATES, LogRecorder

pytestmark = pytest.mark.training
TINY = "kubetune/tiny-llama"


def tiny_model(directory: Path, model_type: str, **config: Any) -> Path:
    """A randomly initialised model of ``model_type`` with the preset's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = presets.preset_path(TINY)
    settings: dict[str, Any] = {
        "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "initializer_range": 0.2,  # peaked next-token distributions: a wrong conversion shows
    } | config  # fmt: skip
    if model_type == "gpt2":
        settings = {"vocab_size": 1024, "n_embd": 64, "n_layer": 2, "n_head": 2}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings))
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(base / name, directory / name)
    return directory


def converted(model_dir: Path, tmp_path: Path) -> dict[str, float]:
    """model_dir as f16 GGUF, checked by llama.cpp against transformers on a few prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / "model.gguf"
    export.write_f16(model_dir, path, name="t")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = ["Date: 16 April 2062\nISO:", "the 6th of July, 2091", "Jan 13 2006 -> 2006-01-13"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected = export.reference(model, tokenizer, texts)
    return export.check(path, expected, export.FORMATS[api.ExportFormat.GGUF_F16][1], "f16")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The quickstart's training with all three GGUF formats."""
    out = tmp_path_factory.mktemp("gguf") / "run"
    formats = ["gguf-f16", "gguf-q8_0", "gguf-q4_k_m"]
    job = tiny_job("dates-gguf", **{**LEARN_DATES, "export": {"merge": True, "formats": formats}})
    ctx = execute(job, LogRecorder(), workdir=out.parent / "work", output=str(out))
    return ctx, out


def test_each_format_is_written_checked_and_listed(exported: tuple[Any, Path]) -> None:
    _, out = exported
    manifest = {f["path"] for f in json.loads((out / "manifest.json").read_text())["files"]}
    checks = json.loads((out / "metrics.json").read_text())["checks"]
    for name in ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m"):
        assert {f"quantized/{name}/model.gguf", f"quantized/{name}/Modelfile"} <= manifest
        assert not list((out / "quantized" / name).glob(".*partial"))
        _, tolerance = export.FORMATS[api.ExportFormat(name)]
        assert checks[f"{name}_kl"] <= tolerance.kl and checks[f"{name}_top1"] >= tolerance.top1
        assert checks[f"{name}_greedy_same"] >= tolerance.greedy
    # f16 is the merged model to within f16 rounding; q4_k_m is further off, as it should be
    assert checks["gguf-f16_kl"] < checks["gguf-q4_k_m_kl"]
    card = (out / "README.md").read_text()
    assert "`quantized/gguf-q4_k_m/model.gguf`, checked with llama.cpp on 8 validation prompts" in card
    sizes = {
        n: (out / "quantized" / n / "model.gguf").stat().st_size
        for n in ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m")
    }
    assert sizes["gguf-f16"] > sizes["gguf-q8_0"] > sizes["gguf-q4_k_m"]


def test_gguf_reader_sees_the_architecture_tensors_types_and_tokenizer(exported: tuple[Any, Path]) -> None:
    ctx, out = exported
    f16 = GGUFReader(out / "quantized" / "gguf-f16" / "model.gguf")

    def field(reader: GGUFReader, key: str) -> Any:
        return reader.fields[key].contents()

    assert field(f16, "general.architecture") == "llama"
    assert field(f16, "llama.block_count") == 4
    assert field(f16, "tokenizer.ggml.model") == "gpt2"
    assert field(f16, "tokenizer.ggml.pre") == "starcoder"
    assert len(field(f16, "tokenizer.ggml.tokens")) == 1024 and field(f16, "tokenizer.ggml.merges")
    assert field(f16, "tokenizer.ggml.eos_token_id") == ctx.tokenizer.eos_token_id
    assert "<|im_start|>" in field(f16, "tokenizer.chat_template")
    assert len(f16.tensors) == 3 + 4 * 9  # embeddings, norm, output; 9 a block
    types = {t.name: t.tensor_type for t in f16.tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    q4 = GGUFReader(out / "quantized" / "gguf-q4_k_m" / "model.gguf")
    q4_types = {t.tensor_type for t in q4.tensors}
    assert GGMLQuantizationType.Q4_K in q4_types and len(q4.tensors) == len(f16.tensors)
    q8 = {t.tensor_type for t in GGUFReader(out / "quantized" / "gguf-q8_0" / "model.gguf").tensors}
    assert GGMLQuantizationType.Q8_0 in q8


def test_llama_cpp_loads_each_file_and_continues_a_date(exported: tuple[Any, Path]) -> None:
    """The learned task survives f16 and q8_0 exactly and q4_k_m on the whole."""
    import llama_cpp

    ctx, out = exported
    prompt = "Date: 16 April 2062\nISO:"
    for name in ("gguf-f16", "gguf-q8_0"):
        llm = llama_cpp.Llama(model_path=str(out / "quantized" / name / "model.gguf"), verbose=False)
        completion: Any = llm.create_completion(prompt, max_tokens=16, temperature=0.0, stop=["\n"])
        text = completion["choices"][0]["text"]
        llm.close()
        assert text.strip() == "2062-04-16", (name, text)
    modelfile = (out / "quantized" / "gguf-q4_k_m" / "Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile
    assert 'TEMPLATE """{{ .Prompt }}"""' in modelfile  # prompt-completion rows: the raw prompt
    assert f'PARAMETER stop "{ctx.tokenizer.eos_token}"' in modelfile


@pytest.mark.parametrize(
    ("model_type", "config"),
    [
        ("llama", {}),
        ("qwen2", {}),
        (
            "llama",
            {
                "max_position_embeddings": 2048,
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            },
        ),
    ],
    ids=["llama", "qwen2", "llama3-rope-scaling"],
)
def test_llama_cpp_agrees_with_transformers(model_type: str, config: dict[str, Any], tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "model", model_type, **config)
    checks = converted(model, tmp_path)
    assert checks["kl"] < 1e-3 and checks["top1"] == 1.0 and checks["greedy_same"] == 1.0


def test_the_check_catches_a_wrong_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the rotary un-permutation of q and k the logits are off, and the check says so.
    (A mock of the one step under test: the way to show the check is sensitive to it.)"""
    model = tiny_model(tmp_path / "model", "llama")
    monkeypatch.setattr(export.writer, "_unpermute", lambda weight, heads: weight)
    with pytest.raises(RuntimeError, match=r"llama\.cpp disagrees with the merged model"):
        converted(model, tmp_path)


def test_llama3_rope_factors_are_transformers_own(tmp_path: Path) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    parameters = {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    }  # fmt: skip
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=parameters)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    factors = export.llama3_rope_factors(config.to_dict(), 128)
    np.testing.assert_allclose(factors, (plain / scaled).numpy(), rtol=1e-4)
    assert factors[0] == 1.0 and math.isclose(factors[-1], 8.0)


def test_the_writer_maps_every_model_type_the_api_accepts() -> None:
    assert export.ARCHITECTURES is api.GGUF_ARCHITECTURES  # one table: the API's
    assert all(api.EXPORTS[name].model_types == frozenset(export.ARCHITECTURES) for name in export.FORMATS)
    assert set(export.FORMATS) == set(api.formats_of(api.ExportFamily.GGUF))


def test_pre_tokenizers_are_named_as_llama_cpp_names_them() -> None:
    def split(regex: str) -> dict[str, Any]:
        return {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        }

    assert export.pre_tokenizer({"pre_tokenizer": split(export.LLAMA3_REGEX)}) == "llama-bpe"
    assert export.pre_tokenizer({"pre_tokenizer": split(export.QWEN2_REGEX)}) == "qwen2"
    assert export.pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    assert export.pre_tokenizer({"pre_tokenizer": split(r"\s+")}) is None


def test_a_model_gguf_cannot_hold_is_refused_before_training(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "gpt2", "gpt2")
    job = tiny_job(model={"uri": str(model)}, export={"merge": True, "formats": ["gguf-f16"]}, method="full")
    recorder = LogRecorder()
    with pytest.raises(
        InvalidJob, match=r"spec\.export\.formats\[0\]: gguf-f16: GGUF export supports models of type"
    ):
        execute(job, recorder, workdir=tmp_path / "w", output=str(tmp_path / "out"))
    assert api.Stage.TRAIN.value not in recorder.stages

    manifest = tmp_path / "job.yaml"
    manifest.write_text(json.dumps(job.to_wire()))
    result = subprocess.run(
        [sys.executable, "-m", "kubetune", "validate", str(manifest)],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    refusal = "spec.export.formats[0]: gguf-f16: GGUF export supports models of type llama, mistral, qwen2; "
    assert result.returncode == 1
    assert refusal + "this one is 'gpt2'" in result.stderr
    plan = subprocess.run(
        [sys.executable, "-m", "kubetune", "plan", str(manifest)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert plan.returncode == 1 and refusal in plan.stderr
