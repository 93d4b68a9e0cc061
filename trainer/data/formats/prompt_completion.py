"""``prompt-completion``: ``{"prompt", "completion"}`` rows that carry their own prompt format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

from kubetune.trainer.data.formats.fields import string
from kubetune.trainer.data.formats.registry import register
from kubetune.trainer.data.formats.sample import Message, Sample, Segment, exchange
from kubetune.trainer.data.sources import Row


@register
@dataclass(frozen=True)
class PromptCompletion(Sample):
    """A prompt as written (``"Q: 2+2\\nA:"``) and its completion (``" 4"``).

    ``auto`` keeps it as written (template ``none``), as TRL does for non-conversational data;
    ``template: model`` or ``chatml`` wraps it as one user/assistant exchange.

    Example:

    >>> sample = PromptCompletion.parse({"prompt": "Q: 2+2\\nA:", "completion": " 4"})
    >>> sample.as_written()
    [Segment(text='Q: 2+2\\nA:', trained=False), Segment(text=' 4', trained=True)]
    >>> sample.conversation()[0]
    Message(role='user', content='Q: 2+2\\nA:')
    >>> sample.reference()
    ' 4'
    """

    name = "prompt-completion"
    keys = ("prompt", "completion")
    shapes = ("prompt+completion",)
    priority = 10
    fallback = "none"
    model_template = False

    prompt: str
    completion: str

    @classmethod
    def variant(cls, row: Row) -> str:
        return "prompt/completion"

    @classmethod
    def parse(cls, row: Row) -> Self:
        return cls(string(row, "prompt"), string(row, "completion"))

    def conversation(self) -> list[Message]:
        return exchange(self.prompt, self.completion)

    def as_written(self) -> list[Segment]:
        return [Segment(self.prompt, False), Segment(self.completion, True)]
