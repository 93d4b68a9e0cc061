"""Data preparation: dataset rows to token ids and labels, exactly, with every count reported.

The trainer calls :func:`prepare`; ``kubetune data inspect`` runs its two steps, :func:`load` and
:func:`tokenize`. Pieces: :func:`load_rows` (sources and file types), :func:`detect_format` and
:func:`parse_rows` (the formats, one file each under ``formats/``, found by :func:`register`),
:func:`resolve_template` and :func:`to_segments` (templates), :func:`tokenize_example` (ids and
labels), :func:`pack`, :class:`PaddingCollator` and :class:`PackedCollator` (batches). Bad data
raises :class:`DataError` naming the file and line.
"""

from kubetune.trainer.data.errors import DataError
from kubetune.trainer.data.formats import (
    Message,
    Record,
    Sample,
    Segment,
    detect_format,
    get_format,
    parse_format,
    parse_row,
    parse_rows,
    register,
    unregister,
)
from kubetune.trainer.data.formats.chat import Chat
from kubetune.trainer.data.formats.instruction import Instruction
from kubetune.trainer.data.formats.prompt_completion import PromptCompletion
from kubetune.trainer.data.formats.text import Text
from kubetune.trainer.data.packing import (
    PackedCollator,
    PackedRow,
    PaddingCollator,
    pack,
    pack_one,
    packing_efficiency,
)
from kubetune.trainer.data.prepare import (
    DataReport,
    LengthStats,
    Loaded,
    PreparedData,
    SplitReport,
    Tokenized,
    dedupe,
    load,
    prepare,
    split_records,
    tokenize,
)
from kubetune.trainer.data.sources import Row, Rows, load_rows
from kubetune.trainer.data.templates import (
    EvalPair,
    Template,
    eval_pair,
    resolve_template,
    to_segments,
)
from kubetune.trainer.data.tokens import (
    IGNORE_INDEX,
    Example,
    encode_prompt,
    encode_segments,
    tokenize_example,
    truncate,
)

__all__ = [
    "IGNORE_INDEX",
    "Chat",
    "DataError",
    "DataReport",
    "EvalPair",
    "Example",
    "Instruction",
    "LengthStats",
    "Loaded",
    "Message",
    "PackedCollator",
    "PackedRow",
    "PaddingCollator",
    "PreparedData",
    "PromptCompletion",
    "Record",
    "Row",
    "Rows",
    "Sample",
    "Segment",
    "SplitReport",
    "Template",
    "Text",
    "Tokenized",
    "dedupe",
    "detect_format",
    "encode_prompt",
    "encode_segments",
    "eval_pair",
    "get_format",
    "load",
    "load_rows",
    "pack",
    "pack_one",
    "packing_efficiency",
    "parse_format",
    "parse_row",
    "parse_rows",
    "prepare",
    "register",
    "resolve_template",
    "split_records",
    "to_segments",
    "tokenize",
    "tokenize_example",
    "truncate",
    "unregister",
]
