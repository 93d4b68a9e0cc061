"""The registry of formats, and the functions that use it: detect a file's format, parse its rows.

A format is registered by name; ``dataset.format`` (and ``kubetune data inspect --format``) name one
of them, or ``auto``. Formats are tried on a row in order of ``priority``, highest first, then in
the order they were registered.
"""

from __future__ import annotations

from typing import TypeVar

from kubetune.trainer.data.errors import DataError
from kubetune.trainer.data.formats.fields import Missing
from kubetune.trainer.data.formats.sample import Record, Sample
from kubetune.trainer.data.sources import Row, Rows

AUTO = "auto"
S = TypeVar("S", bound=type[Sample])
_FORMATS: dict[str, type[Sample]] = {}


def register(fmt: S) -> S:
    """Add a format (a class decorator); its ``name`` must be new."""
    if fmt.name == AUTO or fmt.name in _FORMATS:
        raise ValueError(f"format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def unregister(name: str) -> None:
    """Remove a format registered by :func:`register` (tests register their own)."""
    del _FORMATS[name]


def names() -> list[str]:
    """The registered formats' names, in the order they were registered."""
    return list(_FORMATS)


def get_format(name: str) -> type[Sample]:
    """The format called ``name``; an unknown name is a :class:`DataError` listing the known ones."""
    fmt = _FORMATS.get(str(name))
    if fmt is None:
        raise _unknown_name(name)
    return fmt


def parse_format(name: str) -> str:
    """A declared format checked: ``auto`` or the name of a registered format."""
    if str(name) != AUTO and str(name) not in _FORMATS:
        raise _unknown_name(name)
    return str(name)


def _unknown_name(name: str) -> DataError:
    return DataError(f"unknown format {str(name)!r} (expected one of {', '.join([AUTO, *_FORMATS])})")


def row_format(row: Row) -> type[Sample] | None:
    """The format a row looks like by its keys, or None when it looks like none."""
    ordered = sorted(_FORMATS.values(), key=lambda fmt: -fmt.priority)
    return next((fmt for fmt in ordered if fmt.detect(row)), None)


def unknown_row(row: Row) -> str:
    """The message for a row that looks like no format: its keys, and every shape a format reads."""
    keys = ", ".join(f'"{k}"' for k in list(row)[:8]) or "none"
    shapes = [shape for fmt in _FORMATS.values() for shape in fmt.shapes]
    expected = ", ".join(shapes[:-1]) + f" or {shapes[-1]}" if len(shapes) > 1 else "".join(shapes)
    return f"unknown row format (keys: {keys}); expected {expected}"


def detect_format(rows: Rows, declared: str = AUTO) -> str:
    """The declared format, or with ``auto`` the one every row agrees on (mixed formats are an error)."""
    declared = parse_format(declared)
    if declared != AUTO:
        return declared
    chosen: type[Sample] | None = None
    first = 0
    for line, row in rows:
        kind = row_format(row)
        if kind is None:
            raise rows.error(line, unknown_row(row))
        if chosen is None:
            chosen, first = kind, line
        elif kind is not chosen:
            raise rows.error(
                line, f"mixed formats: this row looks like {kind.name}, line {first} like {chosen.name}"
            )
    assert chosen is not None, "load_rows never returns an empty table"
    return chosen.name


def parse_rows(rows: Rows, fmt: str) -> list[Record]:
    """Check every row against ``fmt`` and normalise it; the first bad row raises with its line."""
    records = []
    for line, row in rows:
        try:
            sample = parse_row(row, fmt)
        except DataError as e:
            raise rows.error(line, e.message) from None
        records.append(Record(sample, rows.source, line))
    return records


def parse_row(row: Row, fmt: str) -> Sample:
    """One row to a sample; raises a DataError without location (``parse_rows`` adds it)."""
    looks = row_format(row)
    if parse_format(fmt) == AUTO:
        if looks is None:
            raise DataError(unknown_row(row))
        kind = looks
    else:
        kind = get_format(fmt)
    try:
        return kind.parse(row)
    except Missing as e:
        if looks is None or looks is kind:
            raise DataError(str(e)) from None
        raise DataError(f"{e} (format {kind.name}; this row looks like {looks.name})") from None
