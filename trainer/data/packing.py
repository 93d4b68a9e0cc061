"""Packing and collation.

A packed row holds several examples back to back, with ``position_ids`` restarting at 0 for
each. transformers (``masking_utils.find_packed_sequence_indices``) reads the restarts and
builds a block-diagonal causal mask, so no example attends to another, under two conditions:
the batch has no ``attention_mask`` and the model runs without a KV cache (``use_cache=False``;
``Trainer`` sets it from ``TrainingArguments.use_cache``, off by default). Hence the packed
collator pads a row with a block of its own (positions restarting again, labels -100) instead of
returning an attention mask. This holds for the ``sdpa`` and ``eager`` backends (tested) and
``flex_attention`` (same mask path). ``flash_attention_2/3`` read the boundaries from
``position_ids`` only when the batch is a single row: with them, use
``PackedCollator(pad_token_id, flatten=True)``, or examples of a packed batch attend to each other.

The first label of every example in a packed row is -100: it would otherwise be predicted from
the previous example's last token (unpacked, position 0 is never a target anyway).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kubetune.trainer.data.tokens import IGNORE_INDEX, Example


@dataclass(frozen=True)
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    lengths: list[int]  # of the examples in the row, in order

    def __len__(self) -> int:
        return len(self.input_ids)


def pack_one(examples: Sequence[Example]) -> PackedRow:
    """The examples back to back, in the order given."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for example in examples:
        input_ids += example.input_ids
        labels += [IGNORE_INDEX, *example.labels[1:]]
        position_ids += range(len(example))
    return PackedRow(input_ids, labels, position_ids, [len(e) for e in examples])


def pack(examples: Sequence[Example], max_seq_length: int) -> list[PackedRow]:
    """Best-fit decreasing: examples in rows of at most ``max_seq_length`` tokens; deterministic."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, row), sorted
    for i in order:
        size = len(examples[i])
        if size > max_seq_length:
            raise ValueError(f"example {i} has {size} tokens, more than max_seq_length {max_seq_length}")
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = max_seq_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - size:
            bisect.insort(free, (room - size, row))
    return [pack_one([examples[i] for i in row]) for row in rows]


def packing_efficiency(rows: Sequence[PackedRow], max_seq_length: int) -> float:
    """The share of the packed rows' capacity that holds tokens."""
    return sum(len(r) for r in rows) / (len(rows) * max_seq_length) if rows else 0.0


def _ids(item: Example | PackedRow | Mapping[str, Any], key: str) -> list[int]:
    value = getattr(item, key) if isinstance(item, Example | PackedRow) else item[key]
    return [int(v) for v in value]


@dataclass(frozen=True)
class PaddingCollator:
    """Unpacked batches: right-padded to the longest, labels padded with -100, an attention mask."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, batch: Sequence[Example | Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [_ids(item, "input_ids") for item in batch]
        labels = [_ids(item, "labels") for item in batch]
        width = _width(max(map(len, ids)), self.pad_to_multiple_of)
        return {
            "input_ids": torch.tensor([x + [self.pad_token_id] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([y + [IGNORE_INDEX] * (width - len(y)) for y in labels]),
        }


@dataclass(frozen=True)
class PackedCollator:
    """Packed rows (or single examples) with position_ids and no attention mask.

    ``flatten=True`` concatenates the whole batch into one row: the padding-free layout, and the
    only one flash attention isolates examples in.
    """

    pad_token_id: int
    flatten: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, batch: Sequence[PackedRow | Example | Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [self._row(item) for item in batch]
        if self.flatten:
            rows = [
                PackedRow(
                    [t for r in rows for t in r.input_ids],
                    [t for r in rows for t in r.labels],
                    [t for r in rows for t in r.position_ids],
                    [n for r in rows for n in r.lengths],
                )
            ]
        width = _width(max(map(len, rows)), self.pad_to_multiple_of)
        padding = [width - len(r) for r in rows]
        return {
            "input_ids": torch.tensor(
                [r.input_ids + [self.pad_token_id] * n for r, n in zip(rows, padding, strict=True)]
            ),
            "position_ids": torch.tensor(
                [r.position_ids + list(range(n)) for r, n in zip(rows, padding, strict=True)]
            ),
            "labels": torch.tensor(
                [r.labels + [IGNORE_INDEX] * n for r, n in zip(rows, padding, strict=True)]
            ),
        }

    @staticmethod
    def _row(item: PackedRow | Example | Mapping[str, Any]) -> PackedRow:
        if isinstance(item, PackedRow):
            return item
        if isinstance(item, Example):
            return pack_one([item])
        if "position_ids" in item:
            ids = _ids(item, "input_ids")
            return PackedRow(ids, _ids(item, "labels"), _ids(item, "position_ids"), [len(ids)])
        ids = _ids(item, "input_ids")
        return pack_one([Example(ids, _ids(item, "labels"))])


def _width(longest: int, multiple: int | None) -> int:
    return -(-longest // multiple) * multiple if multiple else longest
