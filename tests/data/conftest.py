"""Test tokenizers built here (no hub access): byte-level BPE, with and without a chat template, and
a SentencePiece-style (Metaspace) BPE without ChatML tokens or a chat template, as Llama-2 and
Mistral base models have."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS_TEXT = (
    "the model learns to answer questions about dates numbers and names "
    "what is the capital of France Paris is the capital answer with one word "
    "instruction input output response context user assistant system translate "
    "summarize the following text into French German and Spanish please write a poem "
    "2047-03-19 007 1e5 3.14 true false null hello world café naïve 東京 日本語 שלום مرحبا 🙂 🚀"
)
WORDS = WORDS_TEXT.split()


def corpus() -> Iterable[str]:
    for i in range(400):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(5 + i % 11)]
        yield " ".join(words) + ("." if i % 3 else "?")
        yield f"<|im_start|>user\n{words[0]} {words[-1]}<|im_end|>\n<|im_start|>assistant\n{i}<|im_end|>\n"
        yield "### Instruction:\n" + " ".join(words[:3]) + "\n\n### Response:\n" + words[-1]


def build_tokenizer(*, chat_template: str | None = None, vocab_size: int = 700) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def build_metaspace_tokenizer(vocab_size: int = 900) -> PreTrainedTokenizerFast:
    """Llama-2 / Mistral style: spaces become ``▁``, one ``▁`` is prepended to the text; no ChatML."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    texts = list(corpus())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=sorted(set("".join(texts) + WORDS_TEXT.upper() + ALPHABET)),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        clean_up_tokenization_spaces=False,
    )


# Characters of the test rows that the corpus lacks: the Metaspace tokenizer has no byte fallback.
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,:;?!-_'\"\n()[]{}<>|/\u0301éï"


@pytest.fixture(scope="session")
def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE (Metaspace pre-tokenizer) with BOS/EOS, no ChatML tokens, no chat template."""
    return build_metaspace_tokenizer()


@pytest.fixture(scope="session")
def plain_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with BOS/EOS/pad and no chat template."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer() -> PreTrainedTokenizerFast:
    """The same tokenizer with a ChatML chat template."""
    return build_tokenizer(chat_template=CHATML_TEMPLATE)


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def jsonl(tmp_path: Path) -> Callable[..., Path]:
    def make(rows: Iterable[Any], name: str = "train.jsonl") -> Path:
        return write_jsonl(tmp_path / name, rows)

    return make


@pytest.fixture(scope="session")
def make_tokenizer() -> Callable[..., PreTrainedTokenizerFast]:
    """Build a test tokenizer with a chat template of the test's choosing."""
    return build_tokenizer
