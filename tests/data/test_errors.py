"""Bad data: one clear DataError naming the file and line, and exit code 1 from the CLI."""

from __future__ import annotations

import gzip
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from kubetune import api
from kubetune.cli import app
from kubetune.trainer.data import DataError, parse_format, prepare

PC = '{"prompt": "p", "completion": "c"}'


def lines(*rows: str) -> bytes:
    return ("\n".join(rows) + "\n").encode("utf-8")


CASES: list[tuple[str, str, bytes, str, str]] = [
    # (kind, file name, content, declared format, exact message)
    (
        "invalid JSON",
        "train.jsonl",
        lines(PC, PC, PC, PC, PC, PC, '{"prompt": "a" "completion": "b"}'),
        "auto",
        "train.jsonl:7: invalid JSON: Expecting ',' delimiter (column 16)",
    ),
    (
        "truncated JSON",
        "train.jsonl",
        lines(PC, '{"prompt": "a", "completion": "b"'),
        "auto",
        "train.jsonl:2: invalid JSON: Expecting ',' delimiter (column 34)",
    ),
    (
        "missing field",
        "train.jsonl",
        lines(PC, PC, PC, '{"prompt": "only a prompt"}'),
        "auto",
        'train.jsonl:4: missing "completion"',
    ),
    (
        "mistyped field",
        "train.jsonl",
        lines(PC, '{"prompt": "a", "completion": 7}'),
        "auto",
        'train.jsonl:2: "completion" must be a string, got number',
    ),
    ("empty file", "train.jsonl", b"", "auto", "train.jsonl: empty file: no rows"),
    ("blank file", "train.jsonl", b"\n  \n\n", "auto", "train.jsonl: empty file: no rows"),
    ("empty array", "train.json", b"[ ]", "auto", "train.json: empty file: no rows"),
    (
        "unknown format",
        "train.jsonl",
        lines('{"question": "q", "answer": "a"}'),
        "auto",
        'train.jsonl:1: unknown row format (keys: "question", "answer"); expected text, prompt+completion, '
        "instruction+output (Alpaca), instruction+response (Dolly), messages (OpenAI) "
        "or conversations (ShareGPT)",
    ),
    (
        "mixed formats",
        "train.jsonl",
        lines(PC, PC, '{"text": "just text"}'),
        "auto",
        "train.jsonl:3: mixed formats: this row looks like text, line 1 like prompt-completion",
    ),
    (
        "row of the declared format missing",
        "train.jsonl",
        lines('{"text": "just text"}'),
        "prompt-completion",
        'train.jsonl:1: missing "prompt" (format prompt-completion; this row looks like text)',
    ),
    (
        "unsupported file type",
        "train.csv",
        b"prompt,completion\na,b\n",
        "auto",
        "train.csv: unsupported file type '.csv': expected .jsonl, .ndjson, .json, .jsonl.gz, .json.gz "
        "or .parquet",
    ),
    (
        "not an object",
        "train.jsonl",
        lines(PC, '["p", "c"]'),
        "auto",
        "train.jsonl:2: expected a JSON object, got array",
    ),
    (
        "invalid UTF-8",
        "train.jsonl",
        lines(PC, PC) + b'{"prompt": "caf\xe9", "completion": "c"}\n',
        "auto",
        "train.jsonl:3: not valid UTF-8 (byte 16)",
    ),
    (
        "invalid JSON in an array",
        "train.json",
        b'[{"text": "a"},\n {"text": "b",}\n]',
        "auto",
        "train.json:2: invalid JSON: Expecting property name enclosed in double quotes (column 15)",
    ),
    (
        "unknown chat role",
        "train.jsonl",
        lines(
            json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]})
        ),
        "auto",
        'train.jsonl:1: messages[1]: unknown role "bot" (expected system, user or assistant)',
    ),
    (
        "ShareGPT turn without value",
        "train.jsonl",
        lines(json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]})),
        "auto",
        'train.jsonl:1: conversations[1]: missing "value"',
    ),
    (
        "chat without an assistant",
        "train.jsonl",
        lines(json.dumps({"messages": [{"role": "user", "content": "hi"}]})),
        "chat",
        'train.jsonl:1: "messages" has no assistant message to train on',
    ),
    (
        "ambiguous instruction row",
        "train.jsonl",
        lines(json.dumps({"instruction": "i", "output": "o", "response": "r"})),
        "instruction",
        'train.jsonl:1: both "output" and "response": keep one',
    ),
    (
        "single JSON object",
        "train.json",
        b'{\n  "rows": [{"text": "a"}]\n}\n',
        "auto",
        "train.json:1: expected a JSON array of rows or one JSON object per line (JSONL), "
        "got a single object",
    ),
    ("missing file", "nothere.jsonl", b"", "auto", "nothere.jsonl: no such file"),
]


@pytest.mark.parametrize(("kind", "name", "content", "fmt", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_data_names_file_and_line(
    tmp_path: Path, plain_tokenizer: Any, kind: str, name: str, content: bytes, fmt: str, message: str
) -> None:
    path = tmp_path / name
    if kind != "missing file":
        path.write_bytes(content)
    dataset = api.Dataset(train=str(path), format=api.DatasetFormat(fmt))
    with pytest.raises(DataError) as e:
        prepare(dataset, api.Training(), plain_tokenizer, seed=1, train_path=path)
    assert str(e.value) == message


def test_corrupt_gzip(tmp_path: Path, plain_tokenizer: Any) -> None:
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(lines(PC))[:-12])
    with pytest.raises(DataError, match=r"^train.jsonl.gz: not a valid gzip file \("):
        prepare(api.Dataset(train=str(path)), api.Training(), plain_tokenizer, seed=1, train_path=path)


def test_parquet_typed_column_is_reported_with_its_row(tmp_path: Path, plain_tokenizer: Any) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(
        pa.table({"prompt": ["a", "b"], "completion": [datetime(2047, 3, 19), datetime(2047, 3, 20)]}), path
    )
    with pytest.raises(DataError) as e:
        prepare(api.Dataset(train=str(path)), api.Training(), plain_tokenizer, seed=1, train_path=path)
    assert str(e.value) == 'train.parquet:1: "completion" must be a string, got datetime'


def test_validation_file_in_another_format(tmp_path: Path, plain_tokenizer: Any) -> None:
    train = tmp_path / "train.jsonl"
    train.write_bytes(lines(PC))
    val = tmp_path / "val.jsonl"
    val.write_bytes(lines('{"text": "t"}'))
    with pytest.raises(DataError) as e:
        prepare(
            api.Dataset(train=str(train)),
            api.Training(),
            plain_tokenizer,
            seed=1,
            train_path=train,
            validation_path=val,
        )
    assert (
        str(e.value) == "val.jsonl:1: format text differs from the training data's format prompt-completion"
    )


def test_alpaca_template_refuses_multi_turn_chat_with_the_line(tmp_path: Path, plain_tokenizer: Any) -> None:
    chat = {"messages": [{"role": r, "content": "x"} for r in ("user", "assistant", "user", "assistant")]}
    path = tmp_path / "train.jsonl"
    path.write_bytes(lines(json.dumps({"messages": chat["messages"][:2]}), json.dumps(chat)))
    with pytest.raises(DataError) as e:
        prepare(
            api.Dataset(train=str(path), template="alpaca"),
            api.Training(),
            plain_tokenizer,
            seed=1,
            train_path=path,
        )
    assert str(e.value) == (
        "train.jsonl:2: the alpaca template takes one user message and one assistant reply "
        "(this row has 4 turns); use template chatml or model"
    )


def test_unknown_declared_format() -> None:
    with pytest.raises(DataError) as e:
        parse_format("csv")
    assert str(e.value) == (
        "unknown format 'csv' (expected one of auto, text, prompt-completion, instruction, chat)"
    )


def test_cli_prints_one_line_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(lines(PC, PC, PC, '{"prompt": "only a prompt"}'))
    result = CliRunner().invoke(app, ["data", "inspect", str(path)])
    assert result.exit_code == 1
    assert result.output.strip() == 'error: train.jsonl:4: missing "completion"'
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_rejects_an_unknown_format_option(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(lines(PC))
    result = CliRunner().invoke(app, ["data", "inspect", str(path), "--format", "csv"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: unknown format 'csv'")
