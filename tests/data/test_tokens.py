"""Token ids and labels: the loss mask is exact at token level, EOS is trained, truncation is counted."""

from __future__ import annotations

from itertools import groupby
from typing import Any

import pytest

from kubetune import api
from kubetune.trainer.data import (
    IGNORE_INDEX,
    Example,
    Segment,
    encode_prompt,
    eval_pair,
    parse_row,
    resolve_template,
    to_segments,
    tokenize_example,
)

ROWS: dict[str, tuple[api.DatasetFormat, dict[str, Any]]] = {
    # "hel" + "lo world": tokenizing the joined text puts "hello" in one token across the boundary.
    "prompt-completion split mid-word": (
        api.DatasetFormat.PROMPT_COMPLETION,
        {"prompt": "the answer is hel", "completion": "lo world"},
    ),
    "prompt-completion dates": (
        api.DatasetFormat.PROMPT_COMPLETION,
        {"prompt": "Date: 19 March 2047\nISO:", "completion": " 2047-03-19 🙂"},
    ),
    "alpaca": (
        api.DatasetFormat.INSTRUCTION,
        {"instruction": "Translate", "input": "東京 שלום", "output": "Tokyo e\u0301"},
    ),
    "dolly": (api.DatasetFormat.INSTRUCTION, {"instruction": "Code?", "context": "", "response": "007"}),
    "chat": (
        api.DatasetFormat.CHAT,
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "what is 1e5?"},
                {"role": "assistant", "content": "100000"},
                {"role": "user", "content": "and the capital of France?"},
                {"role": "assistant", "content": "Paris 🚀"},
            ]
        },
    ),
    "sharegpt": (
        api.DatasetFormat.CHAT,
        {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hello world"}]},
    ),
    "text": (api.DatasetFormat.TEXT, {"text": "just text, 2047-03-19, 東京"}),
}
TEMPLATES = ["auto", "chatml", "alpaca", "none"]


def rendered(name: str, template: str, tokenizer: Any) -> list[Segment]:
    fmt, row = ROWS[name]
    return to_segments(parse_row(row, fmt), resolve_template(template, fmt, tokenizer))


def decode(tokenizer: Any, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))


def joined_tokens(segments: list[Segment], tokenizer: Any, *, train_on_inputs: bool = False) -> Example:
    """The expected example, from one tokenization of the joined text and its character offsets.

    A token carries loss when any of its characters belongs to a trained segment; BOS never does,
    the appended EOS does when the last segment is trained.
    """
    text = "".join(s.text for s in segments)
    char_trained = [s.trained or train_on_inputs for s in segments for _ in s.text]
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [tokenizer.bos_token_id]
    labels = [tokenizer.bos_token_id if train_on_inputs else IGNORE_INDEX]
    for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True):
        ids.append(token)
        labels.append(token if any(char_trained[start:end]) else IGNORE_INDEX)
    if ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
        last = train_on_inputs or segments[-1].trained
        labels.append(tokenizer.eos_token_id if last else IGNORE_INDEX)
    return Example(ids, labels, False, len(ids))


def assert_mask_exact(example: Example, segments: list[Segment], tokenizer: Any) -> None:
    """The ids are the joined text's tokens; exactly the tokens holding trained characters carry loss.

    Checked two ways: against the offsets of one tokenization of the joined text, and by decoding
    runs of untrained tokens, each of which must be a piece of the text with no trained character.
    """
    ids, labels = example.input_ids, example.labels
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))
    assert ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
    expected = joined_tokens(segments, tokenizer)
    assert (ids, labels) == (expected.input_ids, expected.labels)
    text = "".join(s.text for s in segments)
    stop = len(ids) if text.endswith(tokenizer.eos_token) else -1  # else EOS was appended
    assert decode(tokenizer, ids[1:stop]) == text  # every character accounted for: nothing lost or added
    char_trained = [s.trained for s in segments for _ in s.text]
    offset = 0
    body = list(zip(ids[1:stop], labels[1:stop], strict=True))
    for trained, run in groupby(body, key=lambda pair: pair[1] != IGNORE_INDEX):
        piece = decode(tokenizer, [token for token, _ in run])
        if offset == 0:  # a Metaspace decoder drops the space it prepended
            piece = piece.lstrip(" ") if not text.startswith(" ") else piece
        at = text.index(piece, offset)
        if not trained:
            assert not any(char_trained[at : at + len(piece)]), piece
        offset = at + len(piece)


# Alpaca takes one exchange: its refusal of a multi-turn chat is tested in test_errors.
CASES = [
    (name, template) for name in ROWS for template in TEMPLATES if (name, template) != ("chat", "alpaca")
]


@pytest.mark.parametrize(("name", "template"), CASES)
def test_only_completion_tokens_and_eos_carry_loss(
    name: str, template: str, plain_tokenizer: Any, chat_tokenizer: Any, metaspace_tokenizer: Any
) -> None:
    for tokenizer in (plain_tokenizer, chat_tokenizer, metaspace_tokenizer):
        segments = rendered(name, template, tokenizer)
        example = tokenize_example(segments, tokenizer, 1024)
        assert example is not None and not example.truncated
        assert_mask_exact(example, segments, tokenizer)


@pytest.mark.parametrize("name", ["prompt-completion dates", "chat", "alpaca"])
def test_no_spurious_metaspace_token_at_segment_boundaries(name: str, metaspace_tokenizer: Any) -> None:
    """SentencePiece-style tokenizers put a ``▁`` in front of every text they tokenize: tokenized one
    segment at a time, each segment would start with one the joined text does not have."""
    tok = metaspace_tokenizer
    segments = [Segment("ISO:", False), Segment("2047-03-19", True)]
    if name != "prompt-completion dates":
        segments = rendered(name, "chatml", tok)
    one_by_one = [t for s in segments for t in tok(s.text, add_special_tokens=False)["input_ids"]]
    joined = tok("".join(s.text for s in segments), add_special_tokens=False)["input_ids"]
    assert one_by_one != joined  # the trap is real for this tokenizer
    example = tokenize_example(segments, tok, 1024)
    assert example is not None
    assert example.input_ids[: len(joined) + 1] == [tok.bos_token_id, *joined]
    assert example.input_ids[-1] == tok.eos_token_id and len(example) - len(joined) in (1, 2)
    assert example.labels == joined_tokens(segments, tok).labels


def test_a_token_across_the_boundary_carries_loss(plain_tokenizer: Any) -> None:
    """Tokenized as one string, "hello" straddles prompt and completion; it is predicted (trained)."""
    prompt, completion = "the answer is hel", "lo world"
    encoding = plain_tokenizer(prompt + completion, add_special_tokens=False, return_offsets_mapping=True)
    assert any(start < len(prompt) < end for start, end in encoding["offset_mapping"])
    segments = [Segment(prompt, False), Segment(completion, True)]
    example = tokenize_example(segments, plain_tokenizer, 1024)
    assert example is not None
    assert example.input_ids[1:-1] == encoding["input_ids"]
    trained = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    assert decode(plain_tokenizer, trained).endswith(completion + "</s>")
    assert decode(plain_tokenizer, trained) == prompt[prompt.rindex(" ") :] + completion + "</s>"


def test_prompt_and_completion_counts_match_separate_tokenization(plain_tokenizer: Any) -> None:
    prompt, completion = "Date: 19 March 2047\nISO:", " 2047-03-19"
    example = tokenize_example([Segment(prompt, False), Segment(completion, True)], plain_tokenizer, 1024)
    assert example is not None
    n_prompt = len(plain_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    n_completion = len(plain_tokenizer(completion, add_special_tokens=False)["input_ids"])
    assert example.labels == [IGNORE_INDEX] * (1 + n_prompt) + example.input_ids[1 + n_prompt :]
    assert len(example) == 1 + n_prompt + n_completion + 1
    assert example.trained_tokens == n_completion + 1


def test_train_on_inputs_trains_every_token(plain_tokenizer: Any) -> None:
    segments = rendered("chat", "chatml", plain_tokenizer)
    example = tokenize_example(segments, plain_tokenizer, 1024, train_on_inputs=True)
    assert example is not None
    assert example.labels == example.input_ids


def test_text_trains_everything_but_bos(plain_tokenizer: Any) -> None:
    example = tokenize_example(rendered("text", "auto", plain_tokenizer), plain_tokenizer, 1024)
    assert example is not None
    assert example.labels[0] == IGNORE_INDEX
    assert example.labels[1:] == example.input_ids[1:]


def test_bos_and_eos_are_not_doubled(make_tokenizer: Any) -> None:
    tok = make_tokenizer(
        chat_template=(
            "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}"
        )
    )
    segments = rendered("prompt-completion dates", "model", tok)
    example = tokenize_example(segments, tok, 1024)
    assert example is not None
    assert example.input_ids.count(tok.bos_token_id) == 1 and example.input_ids[0] == tok.bos_token_id
    assert example.input_ids[-1] == tok.eos_token_id and example.input_ids[-2] != tok.eos_token_id
    assert example.labels[-1] == tok.eos_token_id
    assert decode(tok, example.input_ids) == "".join(s.text for s in segments)


def test_truncation_is_flagged_and_keeps_the_trained_prefix(plain_tokenizer: Any) -> None:
    segments = [Segment("short prompt", False), Segment(" the model learns" * 20, True)]
    full = tokenize_example(segments, plain_tokenizer, 10_000)
    cut = tokenize_example(segments, plain_tokenizer, 16)
    assert full is not None and cut is not None
    assert not full.truncated and cut.truncated
    assert len(cut) == 16 and cut.full_length == len(full)
    assert cut.input_ids == full.input_ids[:16] and cut.labels == full.labels[:16]
    assert cut.input_ids[-1] != plain_tokenizer.eos_token_id  # the EOS went with the cut


def test_row_that_loses_every_trained_token_is_dropped(plain_tokenizer: Any) -> None:
    segments = [Segment("a long prompt " * 20, False), Segment("answer", True)]
    assert tokenize_example(segments, plain_tokenizer, 16) is None
    assert tokenize_example(segments, plain_tokenizer, 1024) is not None


def test_empty_completion_still_trains_eos(plain_tokenizer: Any) -> None:
    example = tokenize_example([Segment("p", False), Segment("", True)], plain_tokenizer, 1024)
    assert example is not None
    assert [label for label in example.labels if label != IGNORE_INDEX] == [plain_tokenizer.eos_token_id]


@pytest.mark.parametrize("name", ["chat", "prompt-completion dates"])
def test_eval_prompt_ids_are_the_training_prefix(
    name: str, chat_tokenizer: Any, metaspace_tokenizer: Any
) -> None:
    fmt, row = ROWS[name]
    for tokenizer in (chat_tokenizer, metaspace_tokenizer):
        template = resolve_template("auto", fmt, tokenizer)
        sample = parse_row(row, fmt)
        example = tokenize_example(to_segments(sample, template), tokenizer, 1024)
        pair = eval_pair(sample, template)
        assert example is not None and pair is not None
        ids = encode_prompt(pair.prompt, tokenizer)
        assert example.input_ids[: len(ids)] == ids
        assert example.labels[len(ids) - 1] == IGNORE_INDEX  # the prompt ends untrained ...
        reply = [t for t in example.labels[len(ids) :] if t != IGNORE_INDEX]
        assert decode(tokenizer, reply).strip().startswith(pair.reference.strip())  # ... the reply is trained
