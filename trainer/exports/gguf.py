"""GGUF exports (gguf-f16, gguf-q8_0, gguf-q4_k_m) for llama.cpp, Ollama and LM Studio.

The merged model is written as f16 GGUF with the ``gguf`` package (its writer, its tensor-name
map, its reader of the tokenizer's special tokens, merges and chat template); llama.cpp's own
quantizer (through llama-cpp-python) makes the smaller types from it. Every file is then loaded
by llama.cpp, which must tokenize a few validation prompts as transformers does, agree with the
merged model's next-token logits within the format's tolerance and generate; the figures go into
``metrics.json``. Each format's folder holds ``model.gguf`` and an Ollama ``Modelfile``.

Supported: Llama and Mistral (GGUF architecture ``llama``) and Qwen2 (``qwen2``) with a BPE
tokenizer (``tokenizer.json``: Llama 3, Qwen2, byte-level BPE). SentencePiece tokenizers
(Llama 2, Mistral v0.1-v0.3) are refused before training.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kubetune import api, contract
from kubetune.trainer import modeling
from kubetune.trainer.context import RunContext
from kubetune.trainer.data.templates import ALPACA_PREAMBLE
from kubetune.validation import InvalidJob, Problem, gguf_refusal

QUANTIZE_FIELD = "spec.export.quantize"

# config.json model_type (api.GGUF_MODEL_TYPES) -> GGUF architecture name
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

# A tokenizer's pre-tokenization, as tokenizer.json spells it -> llama.cpp's name for it.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class Tolerance:
    """How close llama.cpp must stay to the merged model on the validation prompts."""

    kl: float  # mean KL(merged || gguf) of the next-token distributions, nats
    top1: float  # least fraction of positions with the same most likely next token
    greedy: float  # least fraction of prompts with the same greedy continuation


FORMATS: dict[api.ExportFormat, tuple[int, Tolerance]] = {
    # (llama.cpp's LLAMA_FTYPE, tolerance)
    api.ExportFormat.GGUF_F16: (1, Tolerance(kl=1e-3, top1=0.98, greedy=0.9)),
    api.ExportFormat.GGUF_Q8_0: (7, Tolerance(kl=1e-2, top1=0.95, greedy=0.75)),
    api.ExportFormat.GGUF_Q4_K_M: (15, Tolerance(kl=0.1, top1=0.85, greedy=0.5)),
}
PROMPTS = 8  # validation prompts the check runs
CHECK_CONTEXT = 1024  # most tokens of llama.cpp's context in the check; longer prompts are skipped
CONTINUATION = 8  # tokens of each greedy continuation


class GGUF:
    def __init__(self) -> None:
        self._cached: tuple[str, Reference] | None = None

    def unsupported(self, config: dict[str, Any], tokenizer: Any) -> list[str]:
        return unsupported(config, _tokenizer_json(tokenizer))

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


def unsupported(config: dict[str, Any], tokenizer_json: dict[str, Any]) -> list[str]:
    """Why a model of this ``config.json`` and ``tokenizer.json`` cannot be written as GGUF."""
    why = gguf_refusal(str(config.get("model_type", "")))
    if why is not None:
        return [why]
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = model.get("type") or "not a tokenizers"
        return [
            f"GGUF export supports byte-level BPE tokenizers; this one is {kind} "
            "(SentencePiece-style, as Llama 2 and Mistral v0.x have)"
        ]
    if pre_tokenizer(tokenizer_json) is None:
        return ["GGUF export: the tokenizer's pre-tokenization is not one llama.cpp knows"]
    kind = rope(config)["rope_type"]
    if kind not in ("default", "linear", "llama3"):
        return [f"GGUF export: rope scaling {kind!r} is not supported"]
    return []


def rope(config: dict[str, Any]) -> dict[str, Any]:
    """Rotary settings with rope_theta and rope_type, as transformers 5 writes them
    (rope_parameters) or as older config.json files do (rope_theta, rope_scaling)."""
    found = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    found.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    found["rope_type"] = found.get("rope_type") or found.get("type") or "default"
    return found


def pre_tokenizer(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's name (tokenizer.ggml.pre) for the pre-tokenization of ``tokenizer_json``."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    regexes = [((s.get("pattern") or {}).get("Regex")) for s in steps if s.get("type") == "Split"]
    if regexes == [LLAMA3_REGEX]:
        return "llama-bpe"
    if regexes == [QWEN2_REGEX]:
        return "qwen2"
    byte_level = next((s for s in steps if s.get("type") == "ByteLevel"), None)
    if byte_level is None or not byte_level.get("use_regex", True):
        return None
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    digits = next((s for s in steps if s.get("type") == "Digits"), None)
    if kinds == ["Digits", "ByteLevel"] and digits and digits.get("individual_digits"):
        return "starcoder"  # \p{N} apart, then GPT-2's expression: what llama.cpp calls starcoder
    return None


def f16_file(ctx: RunContext, merged: Path) -> Path:
    """The merged model as f16 GGUF, written once per run for all the GGUF formats."""
    path = ctx.workdir / "gguf" / "model-f16.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        write_f16(merged, partial, name=ctx.job.metadata.name)
        partial.replace(path)
    return path


@dataclass(frozen=True)
class Shape:
    """What the writer needs of config.json."""

    arch: str  # GGUF's architecture name
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: dict[str, Any]) -> Shape:
        heads = int(config["num_attention_heads"])
        return cls(
            arch=ARCHITECTURES[config["model_type"]],
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
        )


def write_f16(model_dir: Path, path: Path, *, name: str) -> None:
    """The model in ``model_dir`` (HF layout) as f16 GGUF at ``path``, one tensor in memory at a time."""
    import gguf

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    problems = unsupported(config, tokenizer_json)
    if problems:
        raise InvalidJob("export", [Problem(QUANTIZE_FIELD, p) for p in problems])
    shape = Shape.of(config)
    writer = gguf.GGUFWriter(path, shape.arch)
    _hyperparameters(writer, config, shape, name)
    _tokenizer(writer, model_dir, tokenizer_json, int(config["vocab_size"]))
    tensors = list(_weights(model_dir, config, shape))
    for gguf_name, numpy_shape, dtype, _ in tensors:
        nbytes = int(np.prod(numpy_shape)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(gguf_name, numpy_shape, np.dtype(dtype), nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, _, _, load in tensors:
        writer.write_tensor_data(load())
    writer.close()


def _hyperparameters(writer: Any, config: dict[str, Any], shape: Shape, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(float(rope(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    scaling = rope(config)
    if scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def _tokenizer(writer: Any, model_dir: Path, tokenizer_json: dict[str, Any], vocab_size: int) -> None:
    """Tokens, their types, llama.cpp's pre-tokenizer name; merges, special tokens and the chat
    template as gguf's SpecialVocab reads them from the model's folder."""
    import gguf
    from transformers import AutoTokenizer

    tokens, types = vocabulary(AutoTokenizer.from_pretrained(model_dir), vocab_size)
    pre = pre_tokenizer(tokenizer_json)
    assert pre is not None  # unsupported() refused it otherwise
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


Loader = Callable[[], np.ndarray]


def _weights(
    model_dir: Path, config: dict[str, Any], shape: Shape
) -> Iterator[tuple[str, tuple[int, ...], type, Loader]]:
    """(GGUF name, shape, dtype, loader) of every tensor: matrices in f16, vectors in f32."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(
        next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == shape.arch), shape.layers
    )
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            keys = list(f.keys())
            dims = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        for key in keys:
            if key.endswith("rotary_emb.inv_freq"):
                continue
            gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ValueError(f"GGUF export: no GGUF name for the tensor {key}")
            dtype = np.float16 if len(dims[key]) == 2 else np.float32
            yield gguf_name, dims[key], dtype, _loader(shard, key, shape, dtype)
    if rope(config)["rope_type"] == "llama3":
        factors = llama3_rope_factors(config, shape.head_dim)
        yield (
            gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
            factors.shape,
            np.float32,
            lambda: factors,
        )


def _loader(shard: Path, key: str, shape: Shape, dtype: type) -> Loader:
    def load() -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as f:
            tensor = f.get_tensor(key)
        if shape.arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = _unpermute(tensor, shape.heads if "q_proj" in key else shape.kv_heads)
        out: np.ndarray = tensor.float().numpy().astype(dtype)
        return out

    return load


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their GGUF types: added special tokens are control tokens, other added
    tokens user-defined, ids without a token unused padding."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def llama3_rope_factors(config: dict[str, Any], head_dim: int) -> np.ndarray:
    """Llama 3.1's frequency scaling as the per-dimension factors llama.cpp reads (rope_freqs)."""
    scaling = rope(config)
    base = float(scaling["rope_theta"])
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    context = float(scaling.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * base ** (i / head_dim)
        if wavelength < context / high:
            out.append(1.0)
        elif wavelength > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers keeps q and k with rotary halves apart; llama.cpp's rope wants them interleaved."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


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


def prompts(ctx: RunContext) -> list[str]:
    """Held-out prompts as the model saw them in training (raw text for text datasets)."""
    assert ctx.data is not None
    texts = [p.prompt for p in ctx.data.eval_pairs[:PROMPTS]]
    if not texts:
        source = ctx.data.validation or ctx.data.train
        texts = [ctx.tokenizer.decode(e.input_ids[:64], skip_special_tokens=True) for e in source[:PROMPTS]]
    return [t for t in texts if t.strip()] or ["The"]


@dataclass(frozen=True)
class Reference:
    """The merged model's answers on the check's prompts, computed once for all the formats."""

    texts: list[str]
    ids: list[list[int]]
    bos: list[bool]  # whether transformers put BOS first
    logits: list[torch.Tensor]  # [positions, vocabulary], fp32
    greedy: list[list[int]]  # CONTINUATION tokens, or fewer up to EOS


@torch.no_grad()
def reference(model: Any, tokenizer: Any, texts: list[str]) -> Reference:
    model.eval()
    device = next(model.parameters()).device
    longest = (
        min(CHECK_CONTEXT, int(getattr(model.config, "max_position_embeddings", CHECK_CONTEXT)))
        - CONTINUATION
    )
    kept, ids, bos, logits, greedy = [], [], [], [], []
    for text in texts:
        row = list(tokenizer(text)["input_ids"])
        if len(row) > longest:
            continue  # a long document: the check's context is for short prompts
        kept.append(text)
        batch = torch.tensor([row], device=device)
        ids.append(row)
        bos.append(bool(row and row[0] == tokenizer.bos_token_id))
        logits.append(model(batch).logits[0].float().cpu())
        out = model.generate(
            batch, max_new_tokens=CONTINUATION, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        greedy.append(out[0, len(row) :].tolist())
    if not kept:
        raise RuntimeError(
            f"no prompt of the GGUF check is shorter than {CHECK_CONTEXT - CONTINUATION} tokens"
        )
    return Reference(kept, ids, bos, logits, greedy)


def check(path: Path, expected: Reference, tolerance: Tolerance, name: str) -> dict[str, float]:
    """llama.cpp loads ``path``, tokenizes like transformers, agrees with the merged model within
    ``tolerance`` and generates; the figures, or an error naming what failed."""
    import llama_cpp

    from kubetune.trainer.stages.merge import agreement

    context = min(CHECK_CONTEXT, max(len(i) for i in expected.ids) + CONTINUATION + 1)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, logits_all=True, verbose=False, seed=0)
    try:
        kls, top1s, max_abs, same, generated = [], [], 0.0, 0, 0
        for text, ids, bos, logits, greedy in zip(
            expected.texts, expected.ids, expected.bos, expected.logits, expected.greedy, strict=True
        ):
            theirs = list(llm.tokenize(text.encode("utf-8"), add_bos=bos, special=True))
            if theirs != ids:
                raise RuntimeError(f"{name}: llama.cpp tokenizes {text!r} as {theirs}, transformers as {ids}")
            llm.reset()
            llm.eval(ids)
            found = agreement(logits, torch.tensor(np.asarray(llm.scores[: len(ids)]), dtype=torch.float32))
            kls.append(found.kl)
            top1s.append(found.top1)
            max_abs = max(max_abs, found.max_abs)
            continuation = _greedy(llm, ids, len(greedy))
            same += continuation == greedy
            generated += bool(continuation)
    finally:
        llm.close()
    count = len(expected.texts)
    result = {
        "kl": float(np.mean(kls)),
        "top1": float(np.mean(top1s)),
        "max_abs_logit_diff": max_abs,
        "greedy_same": same / count,
        "prompts": float(count),
    }
    if not generated:
        raise RuntimeError(f"{name}: llama.cpp loaded the file but generated nothing")
    if (
        result["kl"] > tolerance.kl
        or result["top1"] < tolerance.top1
        or result["greedy_same"] < tolerance.greedy
    ):
        raise RuntimeError(
            f"{name}: llama.cpp disagrees with the merged model on {count} validation prompts: "
            f"mean KL {result['kl']:.3g} (at most {tolerance.kl:g}), top-1 {result['top1']:.1%} "
            f"(at least {tolerance.top1:.0%}), same greedy continuation on {result['greedy_same']:.0%} "
            f"(at least {tolerance.greedy:.0%})"
        )
    return result


def _greedy(llm: Any, ids: list[int], count: int) -> list[int]:
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if len(out) == count:
            break
        out.append(int(token))
        if token == llm.token_eos():
            break
    return out


def modelfile(ctx: RunContext) -> str:
    """An Ollama Modelfile: the file, the template the model was trained with, its stop tokens."""
    assert ctx.data is not None
    template, stops = ollama_template(ctx.data.template, ctx.tokenizer)
    lines = [
        f"# ollama create <name> -f Modelfile (in this folder); or: llama-cli -m {contract.GGUF_MODEL}",
        f"FROM ./{contract.GGUF_MODEL}",
    ]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


CHATML = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
)
LLAMA3 = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
)
ALPACA = (
    "{{ if .System }}{{ .System }}\n\n{{ else }}" + ALPACA_PREAMBLE + "{{ end }}"
    "### Instruction:\n{{ .Prompt }}\n\n### Response:\n{{ .Response }}"
)


def ollama_template(trained: str, tokenizer: Any) -> tuple[str | None, list[str]]:
    """Ollama's Go template for the prompt format the job trained with, and its stop strings.

    Prompt-completion and text jobs trained on raw text: the prompt goes in as it is. A chat
    template llama.cpp and Ollama know from the file's metadata but not listed here is left to
    them (no TEMPLATE line).
    """
    eos = [tokenizer.eos_token] if tokenizer.eos_token else []
    chat = tokenizer.chat_template or ""
    if trained == "chatml" or (trained == "model" and "<|im_start|>" in chat):
        return CHATML, ["<|im_end|>", *eos]
    if trained == "model" and "<|start_header_id|>" in chat:
        return LLAMA3, ["<|eot_id|>", *eos]
    if trained == "alpaca":
        return ALPACA, eos
    if trained in ("none", "text"):
        return "{{ .Prompt }}", eos
    return None, eos
