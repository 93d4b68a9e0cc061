"""Row formats: detect them, check every field, normalise each row to a typed sample.

| format            | row                                                             |
|-------------------|-----------------------------------------------------------------|
| text              | {"text"}                                                        |
| prompt-completion | {"prompt", "completion"}                                        |
| instruction       | Alpaca {"instruction", "input"?, "output"}                      |
|                   | Dolly {"instruction", "context"?, "response"}                   |
| chat              | OpenAI {"messages": [{"role", "content"}]}                      |
|                   | ShareGPT {"conversations": [{"from": human|gpt|system, "value"}]} |

Other keys of a row are ignored. Values are kept exactly as written: no stripping, no normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kubetune import api
from kubetune.trainer.data.errors import DataError
from kubetune.trainer.data.sources import Row, Rows, json_type

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")
OPENAI_ROLES: dict[str, Role] = {role: role for role in ROLES}
SHAREGPT_ROLES: dict[str, Role] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class PromptCompletion:
    prompt: str
    completion: str


@dataclass(frozen=True)
class Instruction:
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Chat:
    messages: tuple[Message, ...]


Sample = Text | PromptCompletion | Instruction | Chat


@dataclass(frozen=True)
class Record:
    """A sample and the line it was read from, kept together for error messages."""

    sample: Sample
    source: str
    line: int

    def error(self, message: str) -> DataError:
        return DataError(message, source=self.source, line=self.line)


def parse_format(name: str) -> api.DatasetFormat:
    try:
        return api.DatasetFormat(name)
    except ValueError:
        choices = ", ".join(f.value for f in api.DatasetFormat)
        raise DataError(f"unknown format {name!r} (expected one of {choices})") from None


def row_format(row: Row) -> api.DatasetFormat | None:
    """The format a row looks like by its keys, or None when it looks like none."""
    if "messages" in row or "conversations" in row:
        return api.DatasetFormat.CHAT
    if "instruction" in row:
        return api.DatasetFormat.INSTRUCTION
    if "prompt" in row or "completion" in row:
        return api.DatasetFormat.PROMPT_COMPLETION
    if "text" in row:
        return api.DatasetFormat.TEXT
    return None


def row_variant(row: Row) -> str:
    """Which dialect of the format a row is written in, for reports."""
    if "conversations" in row:
        return "ShareGPT conversations"
    if "messages" in row:
        return "OpenAI messages"
    if "instruction" in row:
        return "Dolly" if "response" in row else "Alpaca"
    if "prompt" in row:
        return "prompt/completion"
    return "text"


def _unknown(row: Row) -> str:
    keys = ", ".join(f'"{k}"' for k in list(row)[:8]) or "none"
    return (
        f"unknown row format (keys: {keys}); expected text, prompt+completion, "
        "instruction+output (Alpaca), instruction+response (Dolly), messages (OpenAI) "
        "or conversations (ShareGPT)"
    )


def detect_format(
    rows: Rows, declared: api.DatasetFormat | str = api.DatasetFormat.AUTO
) -> api.DatasetFormat:
    """The declared format, or with ``auto`` the one every row agrees on (mixed formats are an error)."""
    declared = api.DatasetFormat(declared)
    if declared != api.DatasetFormat.AUTO:
        return declared
    chosen: api.DatasetFormat | None = None
    first = 0
    for line, row in rows:
        kind = row_format(row)
        if kind is None:
            raise rows.error(line, _unknown(row))
        if chosen is None:
            chosen, first = kind, line
        elif kind != chosen:
            raise rows.error(
                line, f"mixed formats: this row looks like {kind.value}, line {first} like {chosen.value}"
            )
    assert chosen is not None, "load_rows never returns an empty table"
    return chosen


def parse_rows(rows: Rows, fmt: api.DatasetFormat) -> list[Record]:
    """Check every row against ``fmt`` and normalise it; the first bad row raises with its line."""
    records = []
    for line, row in rows:
        try:
            sample = parse_row(row, fmt)
        except DataError as e:
            raise rows.error(line, e.message) from None
        records.append(Record(sample, rows.source, line))
    return records


def parse_row(row: Row, fmt: api.DatasetFormat) -> Sample:
    """One row to a sample; raises a DataError without location (``parse_rows`` adds it)."""
    fmt = api.DatasetFormat(fmt)
    if fmt == api.DatasetFormat.AUTO:
        found = row_format(row)
        if found is None:
            raise DataError(_unknown(row))
        fmt = found
    looks = row_format(row)
    hint = f" (format {fmt.value}; this row looks like {looks.value})" if looks and looks != fmt else ""
    try:
        if fmt == api.DatasetFormat.TEXT:
            return Text(_str(row, "text"))
        if fmt == api.DatasetFormat.PROMPT_COMPLETION:
            return PromptCompletion(_str(row, "prompt"), _str(row, "completion"))
        if fmt == api.DatasetFormat.INSTRUCTION:
            return _instruction(row)
        return _chat(row)
    except _Missing as e:
        raise DataError(f"{e}{hint}") from None


class _Missing(DataError):
    """A required field is absent: worth saying which format the row looks like instead."""


def _str(row: Row, key: str, *, where: str = "", optional: bool = False) -> str:
    if key not in row or (optional and row[key] is None):
        if optional:
            return ""
        raise _Missing(f'{where}missing "{key}"')
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f'{where}"{key}" must be a string, got {json_type(value)}')
    return value


def _one_of(row: Row, keys: tuple[str, str]) -> str | None:
    present = [k for k in keys if k in row]
    if len(present) == 2:
        raise DataError(f'both "{keys[0]}" and "{keys[1]}": keep one')
    return present[0] if present else None


def _instruction(row: Row) -> Instruction:
    instruction = _str(row, "instruction")
    input_key = _one_of(row, ("input", "context"))
    output_key = _one_of(row, ("output", "response"))
    if output_key is None:
        raise _Missing('missing "output" (Alpaca) or "response" (Dolly)')
    context = _str(row, input_key, optional=True) if input_key else ""
    return Instruction(instruction, context, _str(row, output_key))


def _chat(row: Row) -> Chat:
    key = _one_of(row, ("messages", "conversations"))
    if key is None:
        raise _Missing('missing "messages" (OpenAI) or "conversations" (ShareGPT)')
    turns = row[key]
    if not isinstance(turns, list):
        raise DataError(f'"{key}" must be an array, got {json_type(turns)}')
    if not turns:
        raise DataError(f'"{key}" is empty')
    role_key, content_key = ("role", "content") if key == "messages" else ("from", "value")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]: "
        if not isinstance(turn, dict):
            raise DataError(f"{where}expected an object, got {json_type(turn)}")
        name = _str(turn, role_key, where=where)
        role = (SHAREGPT_ROLES if key == "conversations" else OPENAI_ROLES).get(name)
        if role is None:
            expected = "human, gpt or system" if key == "conversations" else "system, user or assistant"
            raise DataError(f'{where}unknown {role_key} "{name}" (expected {expected})')
        messages.append(Message(role, _str(turn, content_key, where=where)))
    if not any(m.role == "assistant" for m in messages):
        raise DataError(f'"{key}" has no assistant message to train on')
    return Chat(tuple(messages))
