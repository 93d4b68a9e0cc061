"""The prepare stage: files to tokenized train/validation examples and a report of every count.

Two steps, which ``kubetune data inspect`` runs too: :func:`load` (read a file, detect and check its
format, drop duplicates) and :func:`tokenize` (render with a template, tokenize, truncate, count).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubetune import api
from kubetune.trainer.data.errors import DataError
from kubetune.trainer.data.formats import (
    AUTO,
    Record,
    Segment,
    detect_format,
    get_format,
    parse_format,
    parse_rows,
)
from kubetune.trainer.data.packing import PackedRow, pack, packing_efficiency
from kubetune.trainer.data.sources import Rows, load_rows
from kubetune.trainer.data.templates import (
    ChatTemplate,
    EvalPair,
    Template,
    eval_pair,
    resolve_template,
)
from kubetune.trainer.data.tokens import Example, chunk, encode_segments, truncate


@dataclass(frozen=True)
class LengthStats:
    count: int = 0
    min: int = 0
    median: int = 0
    p95: int = 0
    max: int = 0
    total: int = 0

    @classmethod
    def of(cls, lengths: Sequence[int]) -> LengthStats:
        if not lengths:
            return cls()
        s = sorted(lengths)

        def rank(percent: int) -> int:  # nearest rank: the smallest value with percent% at or below it
            return s[max(0, -(-percent * len(s) // 100) - 1)]

        return cls(len(s), s[0], rank(50), rank(95), s[-1], sum(s))


@dataclass(frozen=True)
class SplitReport:
    examples: int = 0
    truncated: int = 0  # kept, cut to max_seq_length
    dropped: int = 0  # nothing left to train on after truncation
    lengths: LengthStats = field(default_factory=LengthStats)  # tokens before truncation
    trained_tokens: int = 0
    chunked: int = 0  # text documents split into pieces instead of truncated


@dataclass(frozen=True)
class DataReport:
    format: str
    detected: bool
    variant: str
    template: str
    train_rows: int
    validation_rows: int
    duplicates_removed: int
    validation_duplicates_removed: int
    validation_overlap_removed: int
    split: str
    max_seq_length: int
    train: SplitReport
    validation: SplitReport
    packed_rows: int | None = None
    packing_efficiency: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        how = "detected" if self.detected else "declared"
        out = [
            f"format: {self.format} ({how}; {self.variant}), template: {self.template}",
            f"rows read: {self.train_rows} train"
            + (f", {self.validation_rows} validation" if self.split.startswith("validation file") else "")
            + f"; validation: {self.split}",
            f"duplicates removed: {self.duplicates_removed} train, {self.validation_duplicates_removed} "
            f"validation, {self.validation_overlap_removed} validation rows also in train",
        ]
        for name, split in (("train", self.train), ("validation", self.validation)):
            if not split.examples and not split.dropped:
                continue
            s = split.lengths
            out.append(
                f"{name}: {split.examples} examples, {split.trained_tokens} trained tokens; tokens "
                f"min {s.min} median {s.median} p95 {s.p95} max {s.max}; {split.truncated} truncated "
                f"to {self.max_seq_length}, {split.dropped} dropped (nothing left to train on)"
            )
            if split.chunked:
                out.append(
                    f"{name}: {split.chunked} document(s) longer than {self.max_seq_length} tokens "
                    "split into pieces (every token kept)"
                )
        if self.packed_rows is not None:
            out.append(f"packed into {self.packed_rows} rows ({self.packing_efficiency:.0%} full)")
        return out


@dataclass(frozen=True)
class PreparedData:
    train: list[Example]
    validation: list[Example]
    eval_pairs: list[EvalPair]  # from the validation rows; empty for text
    format: str  # a registered format's name (the built-ins: api.DatasetFormat)
    template: str
    report: DataReport
    train_packed: list[PackedRow] | None = None  # when training.packing
    chat_template: str | None = None  # Jinja of the fallback chat template used, for the saved tokenizer


def dedupe(records: Sequence[Record]) -> tuple[list[Record], int]:
    """Keep the first of rows whose content is identical; returns the rest and how many went."""
    seen: set[object] = set()
    kept = []
    for record in records:
        if record.sample not in seen:
            seen.add(record.sample)
            kept.append(record)
    return kept, len(records) - len(kept)


def split_records(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """A seeded random share of the rows for validation; both parts keep the file's order."""
    n = len(records)
    n_val = max(1, round(n * fraction))
    if n - n_val < 1:
        raise DataError(
            f"{n} distinct row(s) are too few to hold out validation_split {fraction}",
            source=records[0].source if records else None,
        )
    held = set(random.Random(seed).sample(range(n), n_val))
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


@dataclass(frozen=True)
class Loaded:
    """One file's rows, their format, and the rows checked and without duplicates."""

    rows: Rows
    format: str
    detected: bool  # the format was auto, not declared
    records: list[Record]
    duplicates: int  # rows dropped as exact duplicates of an earlier row

    @property
    def variant(self) -> str:
        """The dialect of the format the file is written in (of its first row), for reports."""
        return get_format(self.format).variant(self.rows.rows[0])


def load(path: str | Path, declared: str = AUTO, *, like: str | None = None) -> Loaded:
    """Read a file, detect (or check) its format, check every row and drop duplicates.

    ``like`` is the training data's format, which a validation file's rows must have too.
    """
    declared = parse_format(declared)
    rows = load_rows(path)
    fmt = detect_format(rows, declared)
    if like is not None and fmt != like:
        raise rows.error(rows.lines[0], f"format {fmt} differs from the training data's format {like}")
    records, duplicates = dedupe(parse_rows(rows, fmt))
    return Loaded(rows, fmt, declared == AUTO, records, duplicates)


def render(records: Sequence[Record], template: Template) -> list[list[Segment]]:
    """Each record through the template; a row the template refuses raises with its line."""
    out = []
    for record in records:
        try:
            out.append(template.render(record.sample))
        except DataError as e:
            raise record.error(e.message) from None
    return out


@dataclass(frozen=True)
class Tokenized:
    """Records rendered and tokenized: ``full`` one untruncated example per record, ``examples``
    those trained on (truncated, or split into pieces for raw text; without a trained token, dropped)."""

    segments: list[list[Segment]]
    full: list[Example]
    examples: list[Example]
    report: SplitReport


def tokenize(
    records: Sequence[Record],
    template: Template,
    tokenizer: Any,
    max_seq_length: int,
    *,
    train_on_inputs: bool = False,
) -> Tokenized:
    """Render, tokenize and truncate, counting every example; raw text (continued pretraining) keeps
    every token: a long document is split into pieces instead."""
    segments = render(records, template)
    full = encode_segments(segments, tokenizer, train_on_inputs=train_on_inputs)
    chunked = any(record.sample.raw for record in records)
    examples, report = truncate_split(full, max_seq_length, chunked=chunked)
    return Tokenized(segments, full, examples, report)


def truncate_split(
    full: Sequence[Example], max_seq_length: int, *, chunked: bool = False
) -> tuple[list[Example], SplitReport]:
    """Truncate every example (``chunked``: split long ones into pieces, for text); those with
    nothing left to train on are dropped. All are counted."""
    kept = []
    truncated = dropped = split = 0
    for example in full:
        if chunked and len(example) > max_seq_length:
            pieces = chunk(example, max_seq_length)
            kept += pieces
            split += 1
            continue
        cut = truncate(example, max_seq_length)
        if cut is None:
            dropped += 1
            continue
        truncated += cut.truncated
        kept.append(cut)
    report = SplitReport(
        examples=len(kept),
        truncated=truncated,
        dropped=dropped,
        lengths=LengthStats.of([e.full_length for e in full]),
        trained_tokens=sum(e.trained_tokens for e in kept),
        chunked=split,
    )
    return kept, report


def prepare(
    dataset: api.Dataset,
    training: api.Training,
    tokenizer: Any,
    *,
    seed: int,
    train_path: str | Path,
    validation_path: str | Path | None = None,
) -> PreparedData:
    """Load, check, dedupe, split, render and tokenize; raises DataError naming file and line."""
    train_data = load(train_path, dataset.format)
    fmt, train_records = train_data.format, train_data.records

    val_data: Loaded | None = None
    val_records: list[Record] = []
    overlap = 0
    if validation_path is not None:
        val_data = load(validation_path, dataset.format, like=fmt)
        in_train = {r.sample for r in train_records}
        val_records = [r for r in val_data.records if r.sample not in in_train]
        overlap = len(val_data.records) - len(val_records)
        split = f"validation file {val_data.rows.source}"
    elif dataset.validation_split is not None:
        train_records, val_records = split_records(train_records, dataset.validation_split, seed)
        split = f"validation_split {dataset.validation_split}, seed {seed}"
    else:
        split = "none"

    template = resolve_template(dataset.template, fmt, tokenizer)
    max_len = training.max_seq_length
    on_inputs = dataset.train_on_inputs
    train = tokenize(train_records, template, tokenizer, max_len, train_on_inputs=on_inputs)
    validation = tokenize(val_records, template, tokenizer, max_len, train_on_inputs=on_inputs)
    if not train.examples:
        raise DataError(
            f"no training example left: all {train.report.dropped} lost every trained token to "
            f"truncation at max_seq_length {max_len}",
            source=train_data.rows.source,
        )
    pairs = [p for r in val_records if (p := eval_pair(r.sample, template)) is not None]
    packed = pack(train.examples, max_len) if training.packing else None
    report = DataReport(
        format=fmt,
        detected=train_data.detected,
        variant=train_data.variant,
        template=template.name,
        train_rows=len(train_data.rows),
        validation_rows=len(val_data.rows) if val_data is not None else 0,
        duplicates_removed=train_data.duplicates,
        validation_duplicates_removed=val_data.duplicates if val_data is not None else 0,
        validation_overlap_removed=overlap,
        split=split,
        max_seq_length=max_len,
        train=train.report,
        validation=validation.report,
        packed_rows=len(packed) if packed is not None else None,
        packing_efficiency=packing_efficiency(packed, max_len) if packed is not None else None,
    )
    chat_template = template.chat_template if isinstance(template, ChatTemplate) else None
    return PreparedData(
        train.examples, validation.examples, pairs, fmt, template.name, report, packed, chat_template
    )
