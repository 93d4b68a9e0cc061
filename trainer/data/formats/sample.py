"""What every format shares: chat messages, rendered segments, and :class:`Sample`, the base of a format.

A format is a frozen dataclass subclass of :class:`Sample`, registered with
:func:`~kubetune.trainer.data.formats.registry.register`. The class says how a row of the format is
found (:meth:`Sample.detect`) and checked (:meth:`Sample.parse`); an instance is one checked row and
says how it reads as a conversation (:meth:`Sample.conversation`), what a model should answer
(:meth:`Sample.reference`) and how it reads with no template (:meth:`Sample.as_written`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Self

from kubetune.trainer.data.errors import DataError
from kubetune.trainer.data.sources import Row

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")
Fallback = Literal["chatml", "alpaca", "none"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered text; ``trained`` pieces carry loss."""

    text: str
    trained: bool


class Sample:
    """One row of a format, checked and normalised; a subclass is the format itself.

    Class attributes of a format:

    - ``name``: its ``dataset.format`` value;
    - ``keys``: a row with any of these keys looks like this format (or override :meth:`detect`);
    - ``shapes``: the row shapes it reads, for the message about a row no format reads;
    - ``priority``: formats are tried on a row highest first (a row with ``messages`` and ``text``
      is a chat);
    - ``fallback``: the template ``auto`` renders it with when the model has no chat template;
    - ``model_template``: whether ``auto`` prefers the model's chat template;
    - ``raw``: raw text for continued pretraining, never templated, every token trained, long
      documents split into pieces instead of truncated.
    """

    name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]] = ()
    shapes: ClassVar[tuple[str, ...]]
    priority: ClassVar[int] = 0
    fallback: ClassVar[Fallback] = "chatml"
    model_template: ClassVar[bool] = True
    raw: ClassVar[bool] = False

    @classmethod
    def detect(cls, row: Row) -> bool:
        """Whether a row looks like this format by its keys (its values are checked by :meth:`parse`)."""
        return any(key in row for key in cls.keys)

    @classmethod
    def variant(cls, row: Row) -> str:
        """Which dialect of the format a row is written in, for reports."""
        return cls.name

    @classmethod
    def parse(cls, row: Row) -> Self:
        """The row checked and normalised; a bad row raises :class:`DataError` (:class:`Missing` for an
        absent field), without the file and line, which :func:`parse_rows` adds."""
        raise NotImplementedError

    def conversation(self) -> list[Message]:
        """The sample as chat turns, up to its last assistant turn (later turns carry no loss)."""
        raise NotImplementedError

    def reference(self) -> str | None:
        """What the model should answer to the prompt: the last assistant turn (None: nothing to
        answer, as for raw text)."""
        return self.conversation()[-1].content

    def as_written(self) -> list[Segment]:
        """The sample without a template: its turns one per line, the assistant's trained."""
        segments: list[Segment] = []
        for i, m in enumerate(self.conversation()):
            if i:
                segments.append(Segment("\n", False))
            segments.append(Segment(m.content, m.role == "assistant"))
        return segments


@dataclass(frozen=True)
class Record:
    """A sample and the line it was read from, kept together for error messages."""

    sample: Sample
    source: str
    line: int

    def error(self, message: str) -> DataError:
        return DataError(message, source=self.source, line=self.line)


def exchange(prompt: str, reply: str) -> list[Message]:
    """One user message and the assistant's reply.

    Example:

    >>> exchange("2+2?", "4")
    [Message(role='user', content='2+2?'), Message(role='assistant', content='4')]
    """
    return [Message("user", prompt), Message("assistant", reply)]
