"""Where rows come from: local files (JSONL, JSON array, gzip JSONL, Parquet), the hub, built-ins.

JSON is read with the ``json`` module, line by line: generic loaders (pyarrow, the datasets JSON
builder) infer column types and turn a string like ``"2047-03-19"`` into a timestamp, and they
cannot say on which line a row went wrong.
"""

from __future__ import annotations

import bisect
import gzip
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.storage import is_s3_uri
from kubetune.trainer.data.errors import DataError

Row = dict[str, Any]

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
BUILTIN_NAME = re.compile(r"^[a-z0-9-]+$")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
SUPPORTED = ".jsonl, .ndjson, .json, .jsonl.gz, .json.gz or .parquet"
_WS = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True)
class Rows:
    """Rows as written, each with the line (JSON) or row number (Parquet, hub) it came from."""

    source: str
    rows: list[Row]
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[tuple[int, Row]]:
        return iter(zip(self.lines, self.rows, strict=True))

    def error(self, line: int, message: str) -> DataError:
        return DataError(message, source=self.source, line=line)


def load_rows(path: str | Path) -> Rows:
    """Read every row of a dataset: a local path, ``file://``, ``hf://org/name[/split]`` or ``builtin:NAME``.

    ``s3://`` is not read here: the trainer's fetch stage downloads it to a local file first.
    """
    uri = str(path)
    if is_s3_uri(uri):
        raise DataError(
            "s3:// data is downloaded by the trainer's fetch stage; give the local file here", source=uri
        )
    if uri.startswith("hf://"):
        return _load_hub(uri)
    if uri.startswith("builtin:"):
        name = uri.removeprefix("builtin:")
        file = BUILTIN_DIR / f"{name}.jsonl"
        if not BUILTIN_NAME.match(name) or not file.is_file():
            have = ", ".join(sorted(p.name.removesuffix(".jsonl") for p in BUILTIN_DIR.glob("*.jsonl")))
            raise DataError(f"no built-in dataset {name!r} (available: {have or 'none'})", source=uri)
        return _load_file(file, source=uri)
    local = Path(uri.removeprefix("file://")) if uri.startswith("file://") else Path(path)
    return _load_file(local, source=local.name)


def _load_file(file: Path, *, source: str) -> Rows:
    name = file.name.lower()
    if name.endswith(".parquet"):
        kind = "parquet"
    elif name.endswith((".json", ".json.gz")):
        kind = "json"
    elif name.endswith(JSONL_SUFFIXES) or name.endswith(tuple(s + ".gz" for s in JSONL_SUFFIXES)):
        kind = "jsonl"
    else:
        suffix = "".join(file.suffixes) or "(none)"
        raise DataError(f"unsupported file type {suffix!r}: expected {SUPPORTED}", source=source)
    if not file.exists():
        raise DataError("no such file", source=source)
    if file.is_dir():
        raise DataError("is a directory, not a data file", source=source)
    if kind == "parquet":
        rows = _read_parquet(file, source)
    else:
        data = _read_bytes(file, source)
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        stripped = data.lstrip(b" \t\r\n")
        if kind == "json" and stripped.startswith(b"["):
            rows = _read_json_array(data, source)
        else:
            rows = _read_jsonl(data, source, single_json=kind == "json")
    if not rows.rows:
        raise DataError("empty file: no rows", source=source)
    return rows


def _read_bytes(file: Path, source: str) -> bytes:
    try:
        if file.name.lower().endswith(".gz"):
            with gzip.open(file, "rb") as f:
                return f.read()
        return file.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"not a valid gzip file ({e})", source=source) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", source=source) from None


def _decode(raw: bytes, source: str, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 (byte {e.start + 1})", source=source, line=line) from None


def _read_jsonl(data: bytes, source: str, *, single_json: bool) -> Rows:
    rows: list[Row] = []
    lines: list[int] = []
    # Split on "\n" only: str.splitlines() would also split inside strings at U+2028, U+0085, ...
    for number, raw in enumerate(data.split(b"\n"), start=1):
        text = _decode(raw, source, number)
        if not text.strip(" \t\r"):
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            if single_json and not rows:
                _refuse_single_object(data, source)
            raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", source=source, line=number) from None
        rows.append(_object(value, source, number))
        lines.append(number)
    return Rows(source, rows, lines)


def _refuse_single_object(data: bytes, source: str) -> None:
    """A .json file holding one object over many lines: say what shape is expected."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return
    if isinstance(value, dict):
        raise DataError(
            "expected a JSON array of rows or one JSON object per line (JSONL), got a single object",
            source=source,
            line=1,
        )


def _read_json_array(data: bytes, source: str) -> Rows:
    text = _decode(data, source, 1) if _is_utf8(data) else _decode_lines(data, source)
    newlines = [i for i, c in enumerate(text) if c == "\n"]

    def line_of(index: int) -> int:
        return bisect.bisect_left(newlines, index) + 1

    decoder = json.JSONDecoder()
    rows: list[Row] = []
    lines: list[int] = []
    i = _skip(text, 0) + 1  # past "["
    i = _skip(text, i)
    if text.startswith("]", i):
        i += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"invalid JSON: {e.msg} (column {e.colno})", source=source, line=e.lineno
                ) from None
            rows.append(_object(value, source, line_of(i)))
            lines.append(line_of(i))
            i = _skip(text, end)
            if text.startswith(",", i):
                i = _skip(text, i + 1)
                continue
            if text.startswith("]", i):
                i += 1
                break
            raise DataError("invalid JSON: expected ',' or ']' in the array", source=source, line=line_of(i))
    if _skip(text, i) != len(text):
        raise DataError(
            "invalid JSON: extra data after the array", source=source, line=line_of(_skip(text, i))
        )
    return Rows(source, rows, lines)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _decode_lines(data: bytes, source: str) -> str:
    """Decode line by line so that bad UTF-8 is reported with its line."""
    return "\n".join(_decode(raw, source, n) for n, raw in enumerate(data.split(b"\n"), start=1))


def _skip(text: str, i: int) -> int:
    match = _WS.match(text, i)
    return match.end() if match else i


def _object(value: Any, source: str, line: int) -> Row:
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, got {json_type(value)}", source=source, line=line)
    return value


def _read_parquet(file: Path, source: str) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable Parquet file ({e})", source=source) from None
    rows = table.to_pylist()
    return Rows(source, rows, list(range(1, len(rows) + 1)))


def _load_hub(uri: str) -> Rows:
    ref = uri.removeprefix("hf://").strip("/")
    parts = ref.split("/")
    repo, split = ("/".join(parts[:2]), parts[2]) if len(parts) == 3 else (ref, "train")
    if not HUB_ID.match(repo) or not split:
        raise DataError("expected hf://org/name or hf://org/name/split", source=uri)
    try:
        import datasets

        table = datasets.load_dataset(repo, split=split)
    except Exception as e:  # anything the hub client raises means: this dataset cannot be read here
        raise DataError(
            f"cannot load {repo!r} (split {split!r}) from the Hugging Face Hub: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''} (no network? download it and give a local path)",
            source=uri,
        ) from None
    rows = table.to_list()
    if not rows:
        raise DataError("empty dataset: no rows", source=uri)
    return Rows(uri, rows, list(range(1, len(rows) + 1)))


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
