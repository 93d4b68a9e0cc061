"""``text``: ``{"text"}`` rows, raw text for continued pretraining."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

from kubetune.trainer.data.formats.fields import string
from kubetune.trainer.data.formats.registry import register
from kubetune.trainer.data.formats.sample import Message, Sample, Segment
from kubetune.trainer.data.sources import Row


@register
@dataclass(frozen=True)
class Text(Sample):
    """Raw text: never templated, every token trained, long documents split into pieces.

    Example:

    >>> Text.detect({"text": "Paris is the capital of France."})
    True
    >>> Text.parse({"text": "Paris is the capital.", "id": 3}).as_written()
    [Segment(text='Paris is the capital.', trained=True)]
    >>> Text("Paris").reference() is None
    True
    """

    name = "text"
    keys = ("text",)
    shapes = ("text",)
    fallback = "none"
    model_template = False
    raw = True

    text: str

    @classmethod
    def parse(cls, row: Row) -> Self:
        return cls(string(row, "text"))

    def conversation(self) -> list[Message]:
        return []

    def reference(self) -> str | None:
        return None

    def as_written(self) -> list[Segment]:
        return [Segment(self.text, True)]
