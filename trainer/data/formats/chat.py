"""``chat``: OpenAI ``{"messages": [{"role", "content"}]}`` or ShareGPT ``{"conversations": [{"from":
human|gpt|system, "value"}]}`` rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

from kubetune.trainer.data.errors import DataError
from kubetune.trainer.data.formats.fields import Missing, one_of, string
from kubetune.trainer.data.formats.registry import register
from kubetune.trainer.data.formats.sample import ROLES, Message, Role, Sample
from kubetune.trainer.data.sources import Row, json_type

OPENAI_ROLES: dict[str, Role] = {role: role for role in ROLES}
SHAREGPT_ROLES: dict[str, Role] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


@register
@dataclass(frozen=True)
class Chat(Sample):
    """A conversation; OpenAI and ShareGPT rows with the same turns are the same sample.

    Without a model chat template ``auto`` renders it with ChatML.

    Example:

    >>> openai = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    >>> sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    >>> Chat.parse(openai) == Chat.parse(sharegpt)
    True
    >>> Chat.variant(sharegpt)
    'ShareGPT conversations'
    >>> Chat.parse(openai).reference()
    'yo'
    """

    name = "chat"
    keys = ("messages", "conversations")
    shapes = ("messages (OpenAI)", "conversations (ShareGPT)")
    priority = 30

    messages: tuple[Message, ...]

    @classmethod
    def variant(cls, row: Row) -> str:
        return "ShareGPT conversations" if "conversations" in row else "OpenAI messages"

    @classmethod
    def parse(cls, row: Row) -> Self:
        key = one_of(row, ("messages", "conversations"))
        if key is None:
            raise Missing('missing "messages" (OpenAI) or "conversations" (ShareGPT)')
        turns = row[key]
        if not isinstance(turns, list):
            raise DataError(f'"{key}" must be an array, got {json_type(turns)}')
        if not turns:
            raise DataError(f'"{key}" is empty')
        sharegpt = key == "conversations"
        messages = tuple(_message(turn, f"{key}[{i}]: ", sharegpt) for i, turn in enumerate(turns))
        if not any(m.role == "assistant" for m in messages):
            raise DataError(f'"{key}" has no assistant message to train on')
        return cls(messages)

    def conversation(self) -> list[Message]:
        last = max(i for i, m in enumerate(self.messages) if m.role == "assistant")
        return list(self.messages[: last + 1])


def _message(turn: object, where: str, sharegpt: bool) -> Message:
    """One turn of ``messages`` (``{"role", "content"}``) or ``conversations`` (``{"from", "value"}``).

    Example:

    >>> _message({"from": "gpt", "value": "yo"}, "conversations[1]: ", sharegpt=True)
    Message(role='assistant', content='yo')
    """
    if not isinstance(turn, dict):
        raise DataError(f"{where}expected an object, got {json_type(turn)}")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    name = string(turn, role_key, where=where)
    role = (SHAREGPT_ROLES if sharegpt else OPENAI_ROLES).get(name)
    if role is None:
        expected = "human, gpt or system" if sharegpt else "system, user or assistant"
        raise DataError(f'{where}unknown {role_key} "{name}" (expected {expected})')
    return Message(role, string(turn, content_key, where=where))
