"""``kubetune data inspect``: a dataset the way the trainer will see it.

It runs the prepare stage's own steps, :func:`~kubetune.trainer.data.prepare.load` and
:func:`~kubetune.trainer.data.prepare.tokenize` (or, without a tokenizer,
:func:`~kubetune.trainer.data.prepare.render`), with template ``auto``, and shows what they give.
"""

from __future__ import annotations

import importlib
import importlib.util
import tempfile
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from kubetune.storage import is_s3_uri
from kubetune.trainer.data.errors import DataError
from kubetune.trainer.data.formats import Segment
from kubetune.trainer.data.prepare import LengthStats, load, render, tokenize
from kubetune.trainer.data.templates import resolve_template
from kubetune.trainer.data.tokens import IGNORE_INDEX, Example, truncate

TRAINED_STYLE = "bold green"


def run_inspect(
    path: str, *, fmt: str, examples: int, model: str | None, max_seq_length: int, console: Console
) -> int:
    """Print format, counts, length statistics and rendered examples; 1 on bad data."""
    try:
        if is_s3_uri(path):
            with tempfile.TemporaryDirectory(prefix="kubetune-inspect-") as scratch:
                local = _download(path, Path(scratch))
                return _inspect(local, path, fmt, examples, model, max_seq_length, console)
        return _inspect(path, path, fmt, examples, model, max_seq_length, console)
    except DataError as e:
        console.print(Text(f"error: {e}", style="red"), soft_wrap=True)
        return 1


def _download(uri: str, scratch: Path) -> str:
    from kubetune.storage import ObjectStore, StorageError

    dest = scratch / uri.rstrip("/").rsplit("/", 1)[-1]
    try:
        with ObjectStore() as store:
            store.download_file(uri, dest)
    except StorageError as e:
        raise DataError(str(e), source=uri) from None
    return str(dest)


def _inspect(
    path: str, shown: str, fmt_name: str, n: int, model: str | None, max_seq_length: int, console: Console
) -> int:
    data = load(path, fmt_name)
    tokenizer = _load_tokenizer(model) if model else None
    template = resolve_template("auto", data.format, tokenizer)

    def say(text: Text | str) -> None:
        # soft_wrap: rich must not insert line breaks into data it shows
        console.print(text if isinstance(text, Text) else Text(text), soft_wrap=True)

    how = "detected" if data.detected else "declared"
    say(f"dataset: {shown}")
    say(f"format: {data.format} ({how}: {data.variant}), template: {template.name}")
    say(f"rows: {len(data.rows)}, duplicates removed: {data.duplicates}, distinct: {len(data.records)}")

    plain = console.color_system is None
    shown_records = data.records[: max(n, 0)]
    views: list[Text]
    if tokenizer is not None:
        tokens = tokenize(data.records, template, tokenizer, max_seq_length)
        report = tokens.report
        say(f"tokens ({model} tokenizer): {_stats(report.lengths)}")
        if report.chunked:
            say(f"longer than max_seq_length {max_seq_length}: {report.chunked} document(s), split in pieces")
        else:
            say(
                f"longer than max_seq_length {max_seq_length}: {report.truncated + report.dropped} row(s), "
                f"{report.truncated} truncated, {report.dropped} dropped (no trained token left)"
            )
        say(f"trained tokens: {report.trained_tokens} in {len(tokens.examples)} example(s)")
        views = [_token_view(e, tokenizer, max_seq_length, plain) for e in tokens.full[: len(shown_records)]]
    else:
        rendered = render(data.records, template)
        words = [len("".join(s.text for s in segments).split()) for segments in rendered]
        say(f"whitespace words (no --model, so not tokens): {_stats(LengthStats.of(words))}")
        views = [_segment_view(segments, plain) for segments in rendered[: len(shown_records)]]

    say(Text(f"examples: trained spans (carry loss) in {'[[...]]' if plain else 'green'}", style="dim"))
    for i, (record, view) in enumerate(zip(shown_records, views, strict=True)):
        console.rule(Text(f"example {i + 1} ({data.rows.source}:{record.line})"), align="left")
        say(view)
    return 0


def _stats(s: LengthStats) -> str:
    return f"min {s.min}, median {s.median}, p95 {s.p95}, max {s.max}"


def _span(text: str, trained: bool, plain: bool) -> Text:
    if not trained:
        return Text(text)
    return Text(f"[[{text}]]") if plain else Text(text, style=TRAINED_STYLE)


def _segment_view(segments: Sequence[Segment], plain: bool) -> Text:
    view = Text()
    for segment in segments:
        view.append_text(_span(segment.text, segment.trained, plain))
    view.append_text(Text(" (+ EOS, trained)", style="dim"))
    return view


def _token_view(example: Example, tokenizer: Any, max_seq_length: int, plain: bool) -> Text:
    """The tokens decoded run by run, so a span is shown exactly as far as its tokens carry loss."""
    view = Text()
    pairs = list(zip(example.input_ids, example.labels, strict=True))
    for trained, run in groupby(pairs[:max_seq_length], key=lambda p: p[1] != IGNORE_INDEX):
        ids = [token for token, _ in run]
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        view.append_text(_span(text, trained, plain))
    if len(pairs) > max_seq_length:
        cut = f" ... truncated: {len(pairs) - max_seq_length} of {len(pairs)} tokens cut"
        if truncate(example, max_seq_length) is None:
            cut += "; dropped (no trained token left)"
        view.append_text(Text(cut, style="yellow"))
    return view


def _load_tokenizer(model: str) -> Any:
    """A saved tokenizer or model directory, a kubetune preset, or a hub id (online only)."""
    from transformers import AutoTokenizer

    try:
        if Path(model).is_dir():
            return AutoTokenizer.from_pretrained(model, local_files_only=True)
        if importlib.util.find_spec("kubetune.trainer.presets") is not None:
            presets = importlib.import_module("kubetune.trainer.presets")
            is_preset = getattr(presets, "is_preset", None)
            if is_preset is not None and is_preset(model):
                return presets.load_tokenizer(model)
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load a tokenizer for {model!r}: {first}") from None
