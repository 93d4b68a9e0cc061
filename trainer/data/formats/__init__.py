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

A format is one file here: a :class:`Sample` subclass decorated with :func:`register` (see
``sample.py`` for what it declares). The built-in formats are the values of
``kubetune.api.DatasetFormat`` (the CRD's enum); each is imported from the file of its name
(``prompt-completion``: ``prompt_completion.py``), so a new built-in format is a new file and a new
enum value.
"""

from __future__ import annotations

import importlib

from kubetune import api
from kubetune.trainer.data.formats.fields import Missing, one_of, string
from kubetune.trainer.data.formats.registry import (
    AUTO,
    detect_format,
    get_format,
    names,
    parse_format,
    parse_row,
    parse_rows,
    register,
    row_format,
    unknown_row,
    unregister,
)
from kubetune.trainer.data.formats.sample import Message, Record, Sample, Segment, exchange

for _fmt in api.DatasetFormat:
    if _fmt != api.DatasetFormat.AUTO:
        importlib.import_module(f"{__name__}.{_fmt.value.replace('-', '_')}")

__all__ = [
    "AUTO",
    "Message",
    "Missing",
    "Record",
    "Sample",
    "Segment",
    "detect_format",
    "exchange",
    "get_format",
    "names",
    "one_of",
    "parse_format",
    "parse_row",
    "parse_rows",
    "register",
    "row_format",
    "string",
    "unknown_row",
    "unregister",
]
