"""Loading rows from every file type and source, exactly as written."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import pytest

from kubetune.trainer.data import sources
from kubetune.trainer.data.errors import DataError
from kubetune.trainer.data.sources import load_rows

# Every kind of value a generic loader likes to "improve": dates, numbers as text, unicode that
# normalisation or line splitting would change, whitespace.
TRICKY = [
    "2047-03-19",
    "2047-03-19T08:15:00Z",
    "007",
    "1e5",
    "3.10",
    "true",
    "null",
    "NaN",
    "🙂🚀👩‍👩‍👧",  # emoji with zero-width joiners
    "東京で会いましょう",  # CJK
    "e\u0301 vs \u00e9",  # combining acute accent vs precomposed: NFC would merge them
    "שלום עולם مرحبا",  # right-to-left
    "line\u2028separator\u0085next",  # str.splitlines() would split here
    "  leading and trailing  \t",
    "tab\there\nnewline",
]
ROWS = [{"prompt": f"value {i}:", "completion": v} for i, v in enumerate(TRICKY)]


def write(path: Path, rows: list[dict[str, str]]) -> Path:
    name = path.name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    if name.endswith((".json", ".json.gz")):
        text = json.dumps(rows, ensure_ascii=False, indent=2)
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return path


@pytest.mark.parametrize(
    "name", ["train.jsonl", "train.ndjson", "train.json", "train.jsonl.gz", "train.json.gz", "train.parquet"]
)
def test_every_file_type_keeps_values_exactly(tmp_path: Path, name: str) -> None:
    rows = load_rows(write(tmp_path / name, ROWS))
    assert rows.rows == ROWS
    for got, want in zip(rows.rows, ROWS, strict=True):
        assert type(got["completion"]) is str
        assert got["completion"].encode("utf-8") == want["completion"].encode("utf-8")
    assert rows.source == name


def test_generic_json_loader_would_turn_dates_into_timestamps(tmp_path: Path) -> None:
    """Why the json module reads JSON here: pyarrow (under datasets' JSON builder) infers types."""
    path = write(tmp_path / "dates.jsonl", [{"prompt": "d", "completion": "2047-03-19"}] * 2)
    assert pa.types.is_timestamp(pa_json.read_json(path).schema.field("completion").type)
    assert load_rows(path).rows[0]["completion"] == "2047-03-19"


def test_jsonl_line_numbers_skip_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('\n{"text": "a"}\n\n  \n{"text": "b"}\r\n{"text": "c"}', encoding="utf-8")
    rows = load_rows(path)
    assert [r["text"] for r in rows.rows] == ["a", "b", "c"]
    assert rows.lines == [2, 5, 6]


def test_json_array_rows_carry_their_line(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text('[\n  {"text": "a"},\n\n  {"text":\n "b"}, {"text": "c"}\n]\n', encoding="utf-8")
    rows = load_rows(path)
    assert rows.lines == [2, 4, 5]
    assert [r["text"] for r in rows.rows] == ["a", "b", "c"]


def test_json_file_with_one_object_per_line_is_read_as_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert load_rows(path).rows == [{"text": "a"}, {"text": "b"}]


def test_utf8_bom_is_not_part_of_the_first_row(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n')
    assert load_rows(path).rows == [{"text": "a"}]


def test_file_uri_and_path_objects(tmp_path: Path) -> None:
    path = write(tmp_path / "train.jsonl", ROWS[:2])
    assert load_rows(f"file://{path}").rows == ROWS[:2]
    assert load_rows(path).rows == ROWS[:2]
    assert load_rows(str(path)).rows == ROWS[:2]


def test_builtin_names_a_packaged_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "mine.jsonl", ROWS[:3])
    monkeypatch.setattr(sources, "BUILTIN_DIR", tmp_path)
    rows = load_rows("builtin:mine")
    assert rows.rows == ROWS[:3]
    assert rows.source == "builtin:mine"
    with pytest.raises(DataError) as e:
        load_rows("builtin:nope")
    assert str(e.value) == "builtin:nope: no built-in dataset 'nope' (available: mine)"


def test_builtin_directory_is_the_trainer_package_data() -> None:
    assert sources.BUILTIN_DIR.name == "builtin"
    assert (sources.BUILTIN_DIR.parent / "data" / "sources.py").is_file()


def test_hub_dataset_without_network_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets.config
    import huggingface_hub.constants

    # Both libraries read these at import time; set the module values too, whatever imported first.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    with pytest.raises(DataError) as e:
        load_rows("hf://kubetune-test/no-such-dataset")
    message = str(e.value)
    assert message.startswith(
        "hf://kubetune-test/no-such-dataset: cannot load 'kubetune-test/no-such-dataset' (split 'train') "
        "from the Hugging Face Hub: "
    )
    assert message.endswith("(no network? download it and give a local path)")
    assert "\n" not in message


def test_hub_split_and_bad_ids() -> None:
    with pytest.raises(DataError, match=r"^hf://a/b/c/d: expected hf://org/name or hf://org/name/split$"):
        load_rows("hf://a/b/c/d")


def test_s3_is_fetched_by_the_caller() -> None:
    with pytest.raises(DataError, match=r"^s3://bucket/train.jsonl: s3:// data is downloaded by the trainer"):
        load_rows("s3://bucket/train.jsonl")
