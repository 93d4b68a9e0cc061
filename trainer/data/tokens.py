"""Segments to token ids and labels, with exact boundaries.

Each segment is tokenized on its own and the ids are concatenated, so no token straddles a
prompt/completion boundary and the loss mask is exact at token level; a prompt tokenized alone
is also what the model sees at generation time. The tokenizer's BOS is prepended when it adds
one by default (unless the rendered text already starts with it); EOS is appended (unless the
text already ends with it) and trained when the last segment is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubetune.trainer.data.templates import Segment

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One training example: ``labels[i]`` is ``input_ids[i]`` where it carries loss, else -100."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    full_length: int = 0  # tokens before truncation

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        """Positions that are prediction targets (position 0 never is: nothing precedes it)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS in front of plain text by default."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode_segments(
    batch: Sequence[Sequence[Segment]], tokenizer: Any, *, train_on_inputs: bool = False
) -> list[Example]:
    """Token ids and labels of each rendered sample, untruncated; one tokenizer call for the batch."""
    texts = [s.text for segments in batch for s in segments]
    ids_flat: list[list[int]] = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    eos = tokenizer.eos_token_id
    examples = []
    k = 0
    for segments in batch:
        input_ids: list[int] = []
        labels: list[int] = []
        if bos is not None and not (segments and segments[0].text.startswith(tokenizer.bos_token)):
            input_ids.append(bos)
            labels.append(bos if train_on_inputs else IGNORE_INDEX)
        for segment in segments:
            ids = ids_flat[k]
            k += 1
            input_ids += ids
            labels += ids if (segment.trained or train_on_inputs) else [IGNORE_INDEX] * len(ids)
        if eos is not None and (not input_ids or input_ids[-1] != eos):
            input_ids.append(eos)
            trained = train_on_inputs or (bool(segments) and segments[-1].trained)
            labels.append(eos if trained else IGNORE_INDEX)
        examples.append(Example(input_ids, labels, False, len(input_ids)))
    return examples


def truncate(example: Example, max_seq_length: int) -> Example | None:
    """Cut to ``max_seq_length`` tokens; None when no prediction target is left."""
    if len(example) > max_seq_length:
        example = Example(
            example.input_ids[:max_seq_length], example.labels[:max_seq_length], True, example.full_length
        )
    return example if example.trained_tokens else None


def tokenize_example(
    segments: Sequence[Segment], tokenizer: Any, max_seq_length: int, *, train_on_inputs: bool = False
) -> Example | None:
    """One rendered sample to ids and labels, truncated; None when truncation left nothing to train."""
    (example,) = encode_segments([segments], tokenizer, train_on_inputs=train_on_inputs)
    return truncate(example, max_seq_length)


def encode_prompt(prompt: str, tokenizer: Any) -> list[int]:
    """A rendered prompt (``EvalPair.prompt``) to the ids it had in training, for generation."""
    ids: list[int] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if adds_bos(tokenizer) and not prompt.startswith(tokenizer.bos_token):
        ids = [tokenizer.bos_token_id, *ids]
    return ids
