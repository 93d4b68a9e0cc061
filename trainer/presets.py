"""Built-in model presets: small models built on this machine, so kubetune runs offline.

The table of presets (names and shapes) is ``kubetune.presets``, shared with the memory plan;
this module builds them. `kubetune/tiny-llama` is a ~3M-parameter Llama with a byte-level BPE
tokenizer trained on the bundled datasets. It is built once, deterministically, and cached
under the user's cache directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kubetune import contract
from kubetune.presets import PRESETS, TIE_WORD_EMBEDDINGS, is_preset

__all__ = [
    "BUILTIN_DATA",
    "CHATML_TEMPLATE",
    "PRESETS",
    "PRESET_VERSION",
    "cache_root",
    "is_preset",
    "load_tokenizer",
    "preset_path",
]

BUILTIN_DATA = Path(__file__).resolve().parent / "builtin"
PRESET_VERSION = "2"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_root() -> Path:
    if explicit := os.environ.get(contract.CACHE_ENV):
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubetune"


def preset_path(name: str) -> Path:
    """The directory of a preset in Hugging Face layout, built on first use."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    target = cache_root() / "models" / f"{name.replace('/', '--')}-v{PRESET_VERSION}"
    if not (target / "model.safetensors").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            _build(name, Path(scratch) / "model")
            try:
                (Path(scratch) / "model").replace(target)
            except OSError:  # built concurrently by another process: theirs is identical
                if not (target / "model.safetensors").exists():
                    raise
    return target


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(preset_path(name))


def _corpus() -> list[str]:
    import json

    lines = []
    for file in sorted(BUILTIN_DATA.glob("*.jsonl")):
        for line in file.read_text(encoding="utf-8").splitlines():
            lines.append("".join(str(v) for v in json.loads(line).values()))
    return lines


def _build(name: str, out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    sizes = PRESETS[name]
    special = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    # Digits one by one, as Llama's tokenizer does: numbers are then composed, not memorized.
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=sizes["vocab_size"],
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=sizes["max_position_embeddings"],
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        **sizes,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=TIE_WORD_EMBEDDINGS,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)
    if not (out / "model.safetensors").exists():
        shutil.rmtree(out)
        raise RuntimeError(f"building {name} wrote no model.safetensors")
