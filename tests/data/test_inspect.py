"""`kubetune data inspect` on real files: counts, token statistics and the rendered loss mask."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from kubetune.trainer.data.inspect import run_inspect

ROWS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello 🙂"}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "date?"},
            {"role": "assistant", "content": "2047-03-19"},
        ]
    },
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello 🙂"}]},
]


@pytest.fixture
def model_dir(tmp_path: Path, chat_tokenizer: Any) -> str:
    chat_tokenizer.save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def inspect(path: Path | str, **kwargs: Any) -> tuple[int, str]:
    console = Console(file=io.StringIO(), width=100, color_system=None)
    options: dict[str, Any] = {"fmt": "auto", "examples": 2, "model": None, "max_seq_length": 1024}
    code = run_inspect(str(path), console=console, **(options | kwargs))
    return code, console.file.getvalue()  # type: ignore[attr-defined]


def lengths(tokenizer: Any) -> list[int]:
    """Token counts computed another way: the whole conversation through apply_chat_template, + BOS/EOS."""
    return [
        len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False)) + 2
        for r in ROWS[:2]
    ]


def test_with_a_model(jsonl: Callable[..., Path], model_dir: str, chat_tokenizer: Any) -> None:
    short, long = lengths(chat_tokenizer)
    code, out = inspect(jsonl(ROWS), model=model_dir, max_seq_length=short)
    assert code == 0
    lines = out.splitlines()
    assert lines[1] == "format: chat (detected: OpenAI messages), template: model"
    assert lines[2] == "rows: 3, duplicates removed: 1, distinct: 2"
    assert lines[3] == f"tokens ({model_dir} tokenizer): min {short}, median {short}, p95 {long}, max {long}"
    assert (
        lines[4]
        == f"longer than max_seq_length {short}: 1 row(s), 0 truncated, 1 dropped (no trained token left)"
    )
    reply = len(chat_tokenizer("hello 🙂<|im_end|>\n", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert lines[5] == f"trained tokens: {reply} in 1 example(s)"
    assert lines[6] == "examples: trained spans (carry loss) in [[...]]"
    assert lines[7].startswith("example 1 (train.jsonl:1) ─")
    assert "\n".join(lines[8:13]) == (
        "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n[[hello 🙂<|im_end|>\n</s>]]"
    )
    assert lines[13].startswith("example 2 (train.jsonl:2) ─")
    assert out.rstrip().endswith("tokens cut; dropped (no trained token left)")
    assert f"truncated: {long - short} of {long} tokens cut" in out


def test_trained_token_count_matches_the_mask(
    jsonl: Callable[..., Path], model_dir: str, chat_tokenizer: Any
) -> None:
    _, out = inspect(jsonl(ROWS), model=model_dir)
    reply = [
        len(chat_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in ("hello 🙂", "2047-03-19")
    ]
    # the reply, <|im_end|>, "\n" and </s> carry loss in each of the two distinct rows
    assert f"trained tokens: {sum(reply) + 3 * 2} in 2 example(s)" in out


def test_without_a_model_counts_words(jsonl: Callable[..., Path]) -> None:
    code, out = inspect(jsonl(ROWS), examples=1)
    assert code == 0
    assert "format: chat (detected: OpenAI messages), template: chatml" in out
    assert "whitespace words (no --model, so not tokens): min 5, median 5, p95 7, max 7" in out
    assert "<|im_start|>assistant\n[[hello 🙂<|im_end|>\n]] (+ EOS, trained)" in out
    assert "example 2" not in out


def test_color_output_marks_trained_spans(jsonl: Callable[..., Path], model_dir: str) -> None:
    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system="truecolor")
    assert (
        run_inspect(
            str(jsonl(ROWS)), fmt="auto", examples=1, model=model_dir, max_seq_length=64, console=console
        )
        == 0
    )
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "\x1b[1;32mhello 🙂<|im_end|>" in out
    assert "[[" not in out


def test_declared_format_and_prompt_completion(jsonl: Callable[..., Path], model_dir: str) -> None:
    path = jsonl([{"prompt": "Date: 19 March 2047\nISO:", "completion": " 2047-03-19"}])
    code, out = inspect(path, fmt="prompt-completion", model=model_dir)
    assert code == 0
    assert "format: prompt-completion (declared: prompt/completion), template: none" in out
    assert "<s>Date: 19 March 2047\nISO:[[ 2047-03-19</s>]]" in out


def test_bad_data_is_one_line_and_exit_1(jsonl: Callable[..., Path]) -> None:
    code, out = inspect(jsonl([*ROWS, {"messages": [{"role": "user", "content": 5}]}]))
    assert code == 1
    assert out == 'error: train.jsonl:4: messages[0]: "content" must be a string, got number\n'


def test_unknown_model_is_one_line(jsonl: Callable[..., Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    code, out = inspect(jsonl(ROWS), model=str(empty))
    assert code == 1
    assert out.startswith(f"error: cannot load a tokenizer for {str(empty)!r}: ")
    assert out.count("\n") == 1
