"""Reading one field of a row: present, of the right JSON type, exactly as written.

The messages name the field (and where it sits, as ``messages[1]: ``); the file and line are added by
:func:`~kubetune.trainer.data.formats.registry.parse_rows`.
"""

from __future__ import annotations

from kubetune.trainer.data.errors import DataError
from kubetune.trainer.data.sources import Row, json_type


class Missing(DataError):
    """A required field is absent: worth saying which format the row looks like instead."""


def string(row: Row, key: str, *, where: str = "", optional: bool = False) -> str:
    """The string at ``key``, as written; an ``optional`` field that is absent or null is ``""``.

    Example:

    >>> string({"prompt": " 2+2?"}, "prompt")
    ' 2+2?'
    >>> string({"input": None}, "input", optional=True)
    ''
    >>> string({"prompt": 7}, "prompt")
    Traceback (most recent call last):
    ...
    kubetune.trainer.data.errors.DataError: "prompt" must be a string, got number
    """
    if key not in row or (optional and row[key] is None):
        if optional:
            return ""
        raise Missing(f'{where}missing "{key}"')
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f'{where}"{key}" must be a string, got {json_type(value)}')
    return value


def one_of(row: Row, keys: tuple[str, str]) -> str | None:
    """Which of two alternative keys the row has (None: neither); both is an error.

    Example:

    >>> one_of({"instruction": "i", "response": "r"}, ("output", "response"))
    'response'
    >>> one_of({"instruction": "i"}, ("output", "response")) is None
    True
    """
    present = [k for k in keys if k in row]
    if len(present) == 2:
        raise DataError(f'both "{keys[0]}" and "{keys[1]}": keep one')
    return present[0] if present else None
