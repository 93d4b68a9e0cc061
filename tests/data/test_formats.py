"""The format registry: the built-ins are the API's enum, and a format defined here, in the test only,
goes through detection, checks, templates, the prepare stage and ``kubetune data inspect``."""

from __future__ import annotations

import doctest
import importlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest
from rich.console import Console

from kubetune import api
from kubetune.trainer.data import (
    DataError,
    EvalPair,
    Message,
    Sample,
    Segment,
    detect_format,
    get_format,
    load,
    load_rows,
    parse_format,
    prepare,
    register,
    resolve_template,
    unregister,
)
from kubetune.trainer.data.formats import exchange, names, string
from kubetune.trainer.data.inspect import run_inspect

MODULES = ["fields", "sample", "text", "prompt_completion", "instruction", "chat"]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(f"kubetune.trainer.data.formats.{module}"))
    assert result.failed == 0 and result.attempted > 0


def test_the_built_in_formats_are_the_api_enum() -> None:
    """Each ``DatasetFormat`` value but auto is a registered format, in the enum's order."""
    assert names() == [f.value for f in api.DatasetFormat if f != api.DatasetFormat.AUTO]
    assert [get_format(name).name for name in names()] == names()


@dataclass(frozen=True)
class QuestionAnswer(Sample):
    """A format of this test's own: ``{"question", "answer"}`` rows."""

    name = "question-answer"
    keys = ("question", "answer")
    shapes = ("question+answer",)

    question: str
    answer: str

    @classmethod
    def parse(cls, row: dict[str, Any]) -> Self:
        return cls(string(row, "question"), string(row, "answer"))

    def conversation(self) -> list[Message]:
        return exchange(self.question, self.answer)


@pytest.fixture
def question_answer() -> Iterator[type[QuestionAnswer]]:
    register(QuestionAnswer)
    yield QuestionAnswer
    unregister(QuestionAnswer.name)


QA_ROWS = [{"question": f"capital {i}?", "answer": f"city {i}", "id": i} for i in range(10)]


def test_a_new_format_is_detected_and_checked(
    question_answer: type[QuestionAnswer], jsonl: Callable[..., Path]
) -> None:
    rows = load_rows(jsonl(QA_ROWS))
    assert detect_format(rows) == "question-answer" == parse_format("question-answer")
    data = load(jsonl([*QA_ROWS, QA_ROWS[0]]))
    assert (data.format, data.detected, data.variant, data.duplicates) == (
        "question-answer",
        True,
        "question-answer",
        1,
    )
    assert data.records[0].sample == QuestionAnswer("capital 0?", "city 0")

    with pytest.raises(DataError) as e:
        load(jsonl([QA_ROWS[0], {"question": "q"}]))
    assert str(e.value) == 'train.jsonl:2: missing "answer"'
    with pytest.raises(DataError) as e:
        load(jsonl([QA_ROWS[0], {"text": "t"}]))
    assert (
        str(e.value) == "train.jsonl:2: mixed formats: this row looks like text, line 1 like question-answer"
    )
    with pytest.raises(DataError) as e:
        load(jsonl([{"prompt": "p", "completion": "c"}]), "question-answer")
    assert (
        str(e.value)
        == 'train.jsonl:1: missing "question" (format question-answer; this row looks like prompt-completion)'
    )
    with pytest.raises(DataError, match=r"expected .*, conversations \(ShareGPT\) or question\+answer$"):
        load(jsonl([{"q": "?"}]))


def test_the_registry_is_left_as_found(question_answer: type[QuestionAnswer]) -> None:
    assert names()[-1] == "question-answer"
    with pytest.raises(ValueError, match="already registered"):
        register(QuestionAnswer)


def test_an_unregistered_format_is_unknown() -> None:
    assert "question-answer" not in names()
    with pytest.raises(DataError, match=r"^unknown format 'question-answer' \(expected one of auto, text, "):
        parse_format("question-answer")


def test_a_new_format_renders_with_every_template(
    question_answer: type[QuestionAnswer], plain_tokenizer: Any, chat_tokenizer: Any
) -> None:
    sample = QuestionAnswer("2+2?", "4")
    assert resolve_template("auto", "question-answer", plain_tokenizer).render(sample) == [
        Segment("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        Segment("4<|im_end|>\n", True),
    ]
    model = resolve_template("auto", "question-answer", chat_tokenizer)
    assert model.name == "model"
    assert model.render(sample) == resolve_template("chatml", "question-answer").render(sample)
    assert resolve_template("none", "question-answer").render(sample) == [
        Segment("2+2?", False),
        Segment("\n", False),
        Segment("4", True),
    ]
    assert resolve_template("alpaca", "question-answer").render(sample)[-1] == Segment("4", True)


def test_a_new_format_through_prepare_and_inspect(
    question_answer: type[QuestionAnswer], jsonl: Callable[..., Path], chat_tokenizer: Any, tmp_path: Path
) -> None:
    path = jsonl(QA_ROWS)
    dataset = api.Dataset(train=str(path), validation_split=0.2)
    prepared = prepare(dataset, api.Training(max_seq_length=64), chat_tokenizer, seed=1, train_path=path)
    assert (prepared.format, prepared.template, prepared.report.variant) == (
        "question-answer",
        "model",
        "question-answer",
    )
    assert len(prepared.train) == 8 and len(prepared.validation) == 2
    answers = {f"city {i}" for i in range(10)}
    assert all(isinstance(p, EvalPair) and p.reference in answers for p in prepared.eval_pairs)
    assert prepared.eval_pairs[0].prompt.endswith("<|im_start|>assistant\n")

    chat_tokenizer.save_pretrained(tmp_path / "model")
    console = Console(file=io.StringIO(), width=100, color_system=None)
    code = run_inspect(
        str(path),
        fmt="question-answer",
        examples=1,
        model=str(tmp_path / "model"),
        max_seq_length=64,
        console=console,
    )
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert code == 0, out
    assert "format: question-answer (declared: question-answer), template: model" in out
    assert "rows: 10, duplicates removed: 0, distinct: 10" in out
    assert "<|im_start|>user\ncapital 0?<|im_end|>\n<|im_start|>assistant\n[[city 0<|im_end|>\n</s>]]" in out
    whole = prepare(
        api.Dataset(train=str(path)), api.Training(max_seq_length=64), chat_tokenizer, seed=1, train_path=path
    )
    assert f"trained tokens: {whole.report.train.trained_tokens} in {len(whole.train)} example(s)" in out


def test_inspect_counts_what_prepare_trains_on(
    jsonl: Callable[..., Path], chat_tokenizer: Any, tmp_path: Path
) -> None:
    """The same load and tokenize: inspect's counts are the prepare report's, truncation included."""
    rows = [
        {"prompt": "a long prompt " * i, "completion": f" answer {i}"}
        if i % 2
        else {"prompt": f"question {i}", "completion": " the model learns" * i}
        for i in range(12)
    ]
    path = jsonl(rows)
    prepared = prepare(
        api.Dataset(train=str(path)), api.Training(max_seq_length=24), chat_tokenizer, seed=1, train_path=path
    )
    split = prepared.report.train
    assert split.truncated and split.dropped
    chat_tokenizer.save_pretrained(tmp_path / "model")
    console = Console(file=io.StringIO(), width=100, color_system=None)
    run_inspect(
        str(path), fmt="auto", examples=0, model=str(tmp_path / "model"), max_seq_length=24, console=console
    )
    out = console.file.getvalue()  # type: ignore[attr-defined]
    s = split.lengths
    assert f"min {s.min}, median {s.median}, p95 {s.p95}, max {s.max}" in out
    assert f"{split.truncated} truncated, {split.dropped} dropped" in out
    assert f"trained tokens: {split.trained_tokens} in {split.examples} example(s)" in out
