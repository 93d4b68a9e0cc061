"""The prepare stage end to end on real files: formats, file types, dedupe, splits, counts, exactness."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubetune import api
from kubetune.trainer.data import (
    IGNORE_INDEX,
    DataError,
    EvalPair,
    LengthStats,
    Segment,
    prepare,
    tokenize_example,
)

PC_ROWS = [{"prompt": f"question {i}:", "completion": f" answer {i}"} for i in range(20)]
SAME_AS_PC: dict[str, list[dict[str, Any]]] = {
    "prompt-completion": PC_ROWS,
    "alpaca": [{"instruction": r["prompt"], "input": "", "output": r["completion"]} for r in PC_ROWS],
    "dolly": [{"instruction": r["prompt"], "context": "", "response": r["completion"]} for r in PC_ROWS],
    "openai": [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in PC_ROWS
    ],
    "sharegpt": [
        {
            "conversations": [
                {"from": "human", "value": r["prompt"]},
                {"from": "gpt", "value": r["completion"]},
            ]
        }
        for r in PC_ROWS
    ],
    "text": [{"text": r["prompt"] + r["completion"]} for r in PC_ROWS],
}
DETECTED = {
    "prompt-completion": "prompt-completion",
    "alpaca": "instruction",
    "dolly": "instruction",
    "openai": "chat",
    "sharegpt": "chat",
    "text": "text",
}


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    if path.name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.name.endswith(".json"):
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def run(tokenizer: Any, train: Path, validation: Path | None = None, seed: int = 7, **fields: Any) -> Any:
    training = api.Training(**{k: fields.pop(k) for k in ("max_seq_length", "packing") if k in fields})
    dataset = api.Dataset(train=str(train), validation=str(validation) if validation else None, **fields)
    return prepare(dataset, training, tokenizer, seed=seed, train_path=train, validation_path=validation)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".jsonl.gz", ".parquet"])
@pytest.mark.parametrize("variant", list(SAME_AS_PC))
def test_every_format_in_every_file_type(
    tmp_path: Path, chat_tokenizer: Any, variant: str, suffix: str
) -> None:
    out = run(chat_tokenizer, write(tmp_path / f"train{suffix}", SAME_AS_PC[variant]))
    reference = run(chat_tokenizer, write(tmp_path / "ref.jsonl", SAME_AS_PC[variant]))
    assert out.format == DETECTED[variant] and out.report.detected
    assert [e.input_ids for e in out.train] == [e.input_ids for e in reference.train]
    assert len(out.train) == 20 and out.report.train_rows == 20
    assert all(e.labels[-1] == chat_tokenizer.eos_token_id for e in out.train)


def test_same_content_same_tokens_across_chat_and_instruction_formats(
    tmp_path: Path, chat_tokenizer: Any
) -> None:
    """Alpaca, Dolly, OpenAI and ShareGPT rows with one exchange render through the model's template alike."""
    ids = {
        v: [e.input_ids for e in run(chat_tokenizer, write(tmp_path / f"{v}.jsonl", SAME_AS_PC[v])).train]
        for v in ("alpaca", "dolly", "openai", "sharegpt")
    }
    assert ids["alpaca"] == ids["dolly"] == ids["openai"] == ids["sharegpt"]


TRICKY = [
    "2047-03-19",
    "007",
    "1e5",
    "-0.0",
    "🙂👩‍👩‍👧",
    "東京で",
    "e\u0301",
    "שלום مرحبا",
    "a\u2028b",
    "  spaced\t",
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_values_reach_the_tokens_exactly(tmp_path: Path, chat_tokenizer: Any, suffix: str) -> None:
    rows: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": f"say {v}"}, {"role": "assistant", "content": v}]}
        for v in TRICKY
    ]
    out = run(chat_tokenizer, write(tmp_path / f"train{suffix}", rows))
    assert len(out.train) == len(TRICKY)
    for value, example in zip(TRICKY, out.train, strict=True):
        text = chat_tokenizer.decode(
            example.input_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        assert (
            text
            == f"<s><|im_start|>user\nsay {value}<|im_end|>\n<|im_start|>assistant\n{value}<|im_end|>\n</s>"
        )
        trained = [
            t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX
        ]
        assert chat_tokenizer.decode(trained, skip_special_tokens=False) == f"{value}<|im_end|>\n</s>"


def test_duplicates_are_removed_and_counted(tmp_path: Path, plain_tokenizer: Any) -> None:
    rows: list[dict[str, Any]] = [
        *PC_ROWS,
        PC_ROWS[3],
        PC_ROWS[3],
        {**PC_ROWS[5], "id": 99},
    ]  # extra keys are not content
    out = run(plain_tokenizer, write(tmp_path / "train.jsonl", rows))
    assert out.report.train_rows == 23
    assert out.report.duplicates_removed == 3
    assert len(out.train) == 20


def test_validation_split_is_seeded_and_never_leaks(tmp_path: Path, plain_tokenizer: Any) -> None:
    rows = [*PC_ROWS, *PC_ROWS[:10]]  # duplicates must not land on both sides
    path = write(tmp_path / "train.jsonl", rows)

    def split(seed: int) -> tuple[set[tuple[int, ...]], set[tuple[int, ...]]]:
        out = run(plain_tokenizer, path, seed=seed, validation_split=0.25)
        return {tuple(e.input_ids) for e in out.train}, {tuple(e.input_ids) for e in out.validation}

    train, val = split(1)
    assert len(val) == 5 and len(train) == 15
    assert not train & val
    assert split(1) == (train, val)
    assert split(2) != (train, val)
    out = run(plain_tokenizer, path, seed=1, validation_split=0.25)
    assert out.report.duplicates_removed == 10
    assert out.report.split == "validation_split 0.25, seed 1"
    assert [p.reference for p in out.eval_pairs] == [
        plain_tokenizer.decode([t for t in e.labels if t not in (IGNORE_INDEX, plain_tokenizer.eos_token_id)])
        for e in out.validation
    ]


def test_validation_file_rows_also_in_train_are_dropped(tmp_path: Path, plain_tokenizer: Any) -> None:
    train = write(tmp_path / "train.jsonl", PC_ROWS[:15])
    val_rows = [*PC_ROWS[12:20], PC_ROWS[18]]  # 12..14 also in train, 18 twice
    val = write(tmp_path / "val.parquet", val_rows)
    out = run(plain_tokenizer, train, val)
    report = out.report
    assert (
        report.validation_rows,
        report.validation_duplicates_removed,
        report.validation_overlap_removed,
    ) == (
        9,
        1,
        3,
    )
    assert len(out.validation) == 5
    assert out.eval_pairs == [EvalPair(f"question {i}:", f" answer {i}") for i in range(15, 20)]
    assert not {tuple(e.input_ids) for e in out.train} & {tuple(e.input_ids) for e in out.validation}


def test_truncation_and_drops_are_counted(tmp_path: Path, plain_tokenizer: Any) -> None:
    rows = [
        {"prompt": "short", "completion": " ok"},
        {"prompt": "short", "completion": " the model learns" * 30},  # kept, truncated
        {"prompt": "a long prompt" * 30, "completion": " lost"},  # nothing trained left: dropped
    ]
    out = run(plain_tokenizer, write(tmp_path / "train.jsonl", rows), max_seq_length=16)
    split = out.report.train
    assert (split.examples, split.truncated, split.dropped) == (2, 1, 1)
    assert all(len(e) <= 16 for e in out.train)

    def count(text: str) -> int:
        return len(plain_tokenizer(text, add_special_tokens=False)["input_ids"])

    full = sorted(2 + count(r["prompt"]) + count(r["completion"]) for r in rows)  # + BOS and EOS
    assert (split.lengths.min, split.lengths.max, split.lengths.total) == (full[0], full[-1], sum(full))
    lines = "\n".join(out.report.lines())
    assert "1 truncated to 16, 1 dropped (nothing left to train on)" in lines


def test_everything_dropped_is_an_error(tmp_path: Path, plain_tokenizer: Any) -> None:
    path = write(tmp_path / "train.jsonl", [{"prompt": "a long prompt" * 30, "completion": " lost"}])
    with pytest.raises(
        DataError, match=r"^train.jsonl: no training example left: all 1 lost every trained token"
    ):
        run(plain_tokenizer, path, max_seq_length=16)


def test_packing_in_prepare(tmp_path: Path, plain_tokenizer: Any) -> None:
    out = run(plain_tokenizer, write(tmp_path / "train.jsonl", PC_ROWS), max_seq_length=32, packing=True)
    assert out.train_packed is not None
    assert sum(len(r.lengths) for r in out.train_packed) == len(out.train)
    assert out.report.packed_rows == len(out.train_packed) < len(out.train)
    assert out.report.packing_efficiency == sum(len(r) for r in out.train_packed) / (
        32 * len(out.train_packed)
    )


def test_text_has_no_eval_pairs_and_train_on_inputs(tmp_path: Path, plain_tokenizer: Any) -> None:
    out = run(plain_tokenizer, write(tmp_path / "train.jsonl", SAME_AS_PC["text"]), validation_split=0.2)
    assert out.eval_pairs == [] and len(out.validation) == 4
    pc = run(plain_tokenizer, write(tmp_path / "pc.jsonl", PC_ROWS), train_on_inputs=True)
    assert all(e.labels == e.input_ids for e in pc.train)


def test_declared_format_and_template_are_reported(tmp_path: Path, chat_tokenizer: Any) -> None:
    path = write(tmp_path / "train.jsonl", SAME_AS_PC["sharegpt"])
    out = run(chat_tokenizer, path, format=api.DatasetFormat.CHAT, template="chatml")
    assert (out.format, out.report.detected, out.template, out.report.variant) == (
        "chat",
        False,
        "chatml",
        "ShareGPT conversations",
    )
    assert out.report.to_dict()["train"]["examples"] == 20


def test_length_stats_nearest_rank() -> None:
    assert LengthStats.of(list(range(1, 101))) == LengthStats(100, 1, 50, 95, 100, 5050)
    assert LengthStats.of([7]) == LengthStats(1, 7, 7, 7, 7, 7)
    assert LengthStats.of([]) == LengthStats()


def test_builtin_source_through_prepare(
    tmp_path: Path, plain_tokenizer: Any, monkeypatch: pytest.MonkeyPatch, jsonl: Callable[..., Path]
) -> None:
    from kubetune.trainer.data import sources

    jsonl(PC_ROWS, name="mine.jsonl")
    monkeypatch.setattr(sources, "BUILTIN_DIR", tmp_path)
    dataset = api.Dataset(train="builtin:mine", validation_split=0.1)
    out = prepare(dataset, api.Training(), plain_tokenizer, seed=3, train_path="builtin:mine")
    assert len(out.train) == 18 and len(out.validation) == 2


def test_long_text_documents_are_chunked_not_truncated(tmp_path: Path, plain_tokenizer: Any) -> None:
    """Continued pretraining keeps every token: a document longer than max_seq_length becomes pieces."""
    long_doc = " ".join(f"the model learns {i} numbers and names" for i in range(40))
    rows = [{"text": long_doc}, {"text": "a short document"}]
    out = run(plain_tokenizer, write(tmp_path / "train.jsonl", rows), max_seq_length=16)
    full = [tokenize_example([Segment(r["text"], True)], plain_tokenizer, 10**6) for r in rows]
    assert full[0] is not None and full[1] is not None and len(full[0]) > 10 * 16
    assert all(len(e) <= 16 for e in out.train)
    # every token but the document's first is a prediction target exactly once
    assert sum(e.trained_tokens for e in out.train) == full[0].trained_tokens + full[1].trained_tokens
    assert out.report.train.trained_tokens == len(full[0]) - 1 + len(full[1]) - 1
    pieces = out.train[:-1]
    assert pieces[0].input_ids[0] == plain_tokenizer.bos_token_id
    rebuilt = pieces[0].input_ids + [t for p in pieces[1:] for t in p.input_ids[1:]]  # one token shared
    assert rebuilt == full[0].input_ids
    assert out.train[-1].input_ids == full[1].input_ids
    split = out.report.train
    assert (split.examples, split.truncated, split.dropped, split.chunked) == (len(pieces) + 1, 0, 0, 1)
    assert "train: 1 document(s) longer than 16 tokens split into pieces" in "\n".join(out.report.lines())
