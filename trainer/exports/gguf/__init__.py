"""GGUF exports (gguf-f16, gguf-q8_0, gguf-q4_k_m) for llama.cpp, Ollama and LM Studio.

The merged model is written as f16 GGUF with the ``gguf`` package (its writer, its tensor-name
map, its reader of the tokenizer's special tokens, merges and chat template); llama.cpp's own
quantizer (through llama-cpp-python) makes the smaller types from it. Every file is then loaded
by llama.cpp, which must tokenize a few validation prompts as transformers does, agree with the
merged model's next-token logits within the format's tolerance and generate; the figures go into
``metrics.json``. Each format's folder holds ``model.gguf`` and an Ollama ``Modelfile``.

Supported: the model types of ``api.GGUF_ARCHITECTURES`` with a BPE tokenizer
(``tokenizer.json``: Llama 3, Qwen2, byte-level BPE). SentencePiece tokenizers (Llama 2,
Mistral v0.1-v0.3) are refused before training.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from kubetune import api, contract
from kubetune.trainer import modeling
from kubetune.trainer.context import RunContext
from kubetune.trainer.exports.gguf.checks import Reference, Tolerance, check, prompts, reference
from kubetune.trainer.exports.gguf.ollama import modelfile, ollama_template
from kubetune.trainer.exports.gguf.support import (
    ARCHITECTURES,
    LLAMA3_REGEX,
    QWEN2_REGEX,
    pre_tokenizer,
    rope,
    tokenizer_json,
    unsupported,
)
from kubetune.trainer.exports.gguf.writer import f16_file, llama3_rope_factors, vocabulary, write_f16

FORMATS: dict[api.ExportFormat, tuple[int, Tolerance]] = {
    # (llama.cpp's LLAMA_FTYPE, tolerance)
    api.ExportFormat.GGUF_F16: (1, Tolerance(kl=1e-3, top1=0.98, greedy=0.9)),
    api.ExportFormat.GGUF_Q8_0: (7, Tolerance(kl=1e-2, top1=0.95, greedy=0.75)),
    api.ExportFormat.GGUF_Q4_K_M: (15, Tolerance(kl=0.1, top1=0.85, greedy=0.5)),
}


class GGUF:
    def __init__(self) -> None:
        self._cached: tuple[str, Reference] | None = None

    def unsupported(self, config: dict[str, Any], tokenizer: Any) -> list[str]:
        return unsupported(config, tokenizer_json(tokenizer))

    def export(self, ctx: RunContext, name: api.ExportFormat, merged: Path, target: Path) -> dict[str, float]:
        ftype, tolerance = FORMATS[name]
        target.mkdir(parents=True, exist_ok=True)
        final = target / contract.GGUF_MODEL
        partial = target / f".{contract.GGUF_MODEL}.partial"
        partial.unlink(missing_ok=True)
        f16 = f16_file(ctx, merged)
        if name == api.ExportFormat.GGUF_F16:
            _link_or_copy(f16, partial)
        else:
            quantize(f16, partial, ftype)
        checks = check(partial, self._reference(ctx, merged), tolerance, name)
        partial.replace(final)
        (target / "Modelfile").write_text(modelfile(ctx), encoding="utf-8")
        return checks

    def _reference(self, ctx: RunContext, merged: Path) -> Reference:
        if self._cached is None or self._cached[0] != ctx.run_id:
            model = modeling.load_placed(ctx.spec, merged, ctx.workdir)
            self._cached = (ctx.run_id, reference(model, ctx.tokenizer, prompts(ctx)))
            del model
        return self._cached[1]


GGUF_EXPORTER = GGUF()


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copyfile(source, target)


def quantize(source: Path, target: Path, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if code != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source.name} (type {ftype}): code {code}")


__all__ = [
    "ARCHITECTURES",
    "FORMATS",
    "GGUF",
    "GGUF_EXPORTER",
    "LLAMA3_REGEX",
    "QWEN2_REGEX",
    "Reference",
    "Tolerance",
    "check",
    "f16_file",
    "llama3_rope_factors",
    "modelfile",
    "ollama_template",
    "pre_tokenizer",
    "prompts",
    "quantize",
    "reference",
    "rope",
    "unsupported",
    "vocabulary",
    "write_f16",
]
