"""Segments to token ids and labels, masked by character offsets.

The segments of a sample are joined and the text is tokenized once, so the ids are exactly the
tokens the model sees for that text at inference. Tokenizing segment by segment would not be:
SentencePiece-style (Metaspace) tokenizers put a ``▁`` in front of every text they are given, so
each segment would start with a token the joined text does not have. The fast tokenizer's offset
mapping then says which characters each token covers; a token carries loss when any of its
characters belongs to a trained segment (a token across a prompt/completion boundary, as in
``"hel" + "lo"``, is predicted with the completion). The tokenizer's BOS is prepended when it adds
one by default (unless the rendered text already starts with it); EOS is appended (unless the
text already ends with it) and trained when the last segment is. Long ``text`` documents are
split into pieces (:func:`chunk`) instead of truncated.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from kubetune.trainer.data.errors import DataError
from kubetune.trainer.data.formats import Segment

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
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"the tokenizer ({type(tokenizer).__name__}) is not a fast (tokenizers) one: exact loss "
            "masks need its character offsets"
        )
    texts = ["".join(s.text for s in segments) for segments in batch]
    encoded = (
        tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        if texts
        else {"input_ids": [], "offset_mapping": []}
    )
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    eos = tokenizer.eos_token_id
    examples = []
    for segments, text, ids, offsets in zip(
        batch, texts, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        trained_before = _trained_characters(segments, train_on_inputs)
        input_ids: list[int] = []
        labels: list[int] = []
        if bos is not None and not text.startswith(tokenizer.bos_token):
            input_ids.append(bos)
            labels.append(bos if train_on_inputs else IGNORE_INDEX)
        for token, (start, end) in zip(ids, offsets, strict=True):
            if end <= start:  # a token that covers no character: judge it by the next one
                start, end = min(start, len(text) - 1), min(start, len(text) - 1) + 1  # noqa: PLW2901
            input_ids.append(token)
            labels.append(token if trained_before(end) > trained_before(start) else IGNORE_INDEX)
        if eos is not None and (not input_ids or input_ids[-1] != eos):
            input_ids.append(eos)
            trained = train_on_inputs or (bool(segments) and segments[-1].trained)
            labels.append(eos if trained else IGNORE_INDEX)
        examples.append(Example(input_ids, labels, False, len(input_ids)))
    return examples


def _trained_characters(segments: Sequence[Segment], train_on_inputs: bool) -> Callable[[int], int]:
    """A function of ``p``: how many of the joined text's first ``p`` characters are trained."""
    trained = [segment.trained or train_on_inputs for segment in segments]
    ends = list(accumulate(len(segment.text) for segment in segments))
    totals = list(accumulate(len(s.text) if t else 0 for s, t in zip(segments, trained, strict=True)))

    def before(p: int) -> int:
        k = bisect.bisect_right(ends, p)  # segments 0..k-1 end at or before p
        count = totals[k - 1] if k else 0
        if k < len(segments) and trained[k]:
            count += p - (ends[k - 1] if k else 0)
        return count

    return before


def truncate(example: Example, max_seq_length: int) -> Example | None:
    """Cut to ``max_seq_length`` tokens; None when no prediction target is left."""
    if len(example) > max_seq_length:
        example = Example(
            example.input_ids[:max_seq_length], example.labels[:max_seq_length], True, example.full_length
        )
    return example if example.trained_tokens else None


def chunk(example: Example, max_seq_length: int) -> list[Example]:
    """A long document as pieces of at most ``max_seq_length`` tokens, for continued pretraining.

    Consecutive pieces share one token: position 0 of a piece is never a prediction target, so
    with that overlap every token of the document but its first is a target exactly once.
    """
    if len(example) <= max_seq_length:
        return [example]
    stride = max(max_seq_length - 1, 1)
    return [
        Example(
            example.input_ids[start : start + max_seq_length],
            [IGNORE_INDEX, *example.labels[start + 1 : start + max_seq_length]],
            False,
            example.full_length,
        )
        for start in range(0, len(example) - 1, stride)
    ]


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
