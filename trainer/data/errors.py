"""The one exception bad data raises: it names the file and the line."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data: ``train.jsonl:7: invalid JSON ...``. Printed as one line, never a traceback."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None) -> None:
        self.message = message
        self.source = source
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.source is None:
            return self.message
        if self.line is None:
            return f"{self.source}: {self.message}"
        return f"{self.source}:{self.line}: {self.message}"
