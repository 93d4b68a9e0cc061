"""``instruction``: Alpaca ``{"instruction", "input"?, "output"}`` or Dolly ``{"instruction", "context"?,
"response"}`` rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

from kubetune.trainer.data.formats.fields import Missing, one_of, string
from kubetune.trainer.data.formats.registry import register
from kubetune.trainer.data.formats.sample import Message, Sample, Segment, exchange
from kubetune.trainer.data.sources import Row


@register
@dataclass(frozen=True)
class Instruction(Sample):
    """An instruction, its optional input (Dolly: context) and the output (Dolly: response).

    Without a model chat template ``auto`` renders it with the Stanford Alpaca prompt.

    Example:

    >>> sample = Instruction.parse({"instruction": "Translate.", "context": "cheese", "response": "fromage"})
    >>> sample
    Instruction(instruction='Translate.', input='cheese', output='fromage')
    >>> Instruction.variant({"instruction": "Translate.", "context": "cheese", "response": "fromage"})
    'Dolly'
    >>> sample.conversation()[0].content
    'Translate.\\n\\ncheese'
    >>> "".join(s.text for s in sample.as_written())
    'Translate.\\ncheese\\nfromage'
    """

    name = "instruction"
    keys = ("instruction",)
    shapes = ("instruction+output (Alpaca)", "instruction+response (Dolly)")
    priority = 20
    fallback = "alpaca"

    instruction: str
    input: str
    output: str

    @classmethod
    def variant(cls, row: Row) -> str:
        return "Dolly" if "response" in row else "Alpaca"

    @classmethod
    def parse(cls, row: Row) -> Self:
        instruction = string(row, "instruction")
        input_key = one_of(row, ("input", "context"))
        output_key = one_of(row, ("output", "response"))
        if output_key is None:
            raise Missing('missing "output" (Alpaca) or "response" (Dolly)')
        context = string(row, input_key, optional=True) if input_key else ""
        return cls(instruction, context, string(row, output_key))

    def conversation(self) -> list[Message]:
        return exchange(self.instruction + (f"\n\n{self.input}" if self.input else ""), self.output)

    def as_written(self) -> list[Segment]:
        prompt = self.instruction + (f"\n{self.input}" if self.input else "") + "\n"
        return [Segment(prompt, False), Segment(self.output, True)]
