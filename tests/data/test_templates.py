"""Rendering each format with each template, exactly, and the trained spans it marks."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from kubetune import api
from kubetune.trainer.data import (
    IGNORE_INDEX,
    DataError,
    EvalPair,
    Segment,
    eval_pair,
    parse_row,
    resolve_template,
    to_segments,
    tokenize_example,
)
from kubetune.trainer.data.templates import ALPACA_PREAMBLE, ALPACA_PREAMBLE_WITH_INPUT, ChatTemplate

F, T = False, True

TURNS = [
    ("system", "Be brief."),
    ("user", "Capital of France?"),
    ("assistant", "Paris"),
    ("user", "And Japan?"),
    ("assistant", "東京"),
    ("user", "a trailing question nobody answers"),
]
OPENAI = {"messages": [{"role": role, "content": text} for role, text in TURNS]}
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
SHAREGPT = {"conversations": [{"from": SHAREGPT_ROLES[role], "value": text} for role, text in TURNS]}
CHATML_SEGMENTS = [
    Segment(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\n",
        F,
    ),
    Segment("Paris<|im_end|>\n", T),
    Segment("<|im_start|>user\nAnd Japan?<|im_end|>\n<|im_start|>assistant\n", F),
    Segment("東京<|im_end|>\n", T),
]


def segments(row: dict[str, Any], template: str, fmt: str = "auto", tokenizer: Any = None) -> list[Segment]:
    sample = parse_row(row, api.DatasetFormat(fmt))
    detected = {"Text": "text", "PromptCompletion": "prompt-completion", "Instruction": "instruction"}
    resolved = api.DatasetFormat(detected.get(type(sample).__name__, "chat"))
    return to_segments(sample, resolve_template(template, resolved, tokenizer))


def test_openai_and_sharegpt_are_the_same_conversation() -> None:
    assert parse_row(OPENAI, api.DatasetFormat.CHAT) == parse_row(SHAREGPT, api.DatasetFormat.CHAT)
    assert segments(OPENAI, "chatml") == segments(SHAREGPT, "chatml") == CHATML_SEGMENTS


def test_model_chat_template_splits_turns_like_the_fallback(chat_tokenizer: Any) -> None:
    """The tokenizer's own ChatML template, through apply_chat_template, gives the same spans."""
    assert segments(OPENAI, "auto", tokenizer=chat_tokenizer) == CHATML_SEGMENTS
    assert segments(OPENAI, "model", tokenizer=chat_tokenizer) == CHATML_SEGMENTS


def test_auto_chooses_by_model_and_format(plain_tokenizer: Any, chat_tokenizer: Any) -> None:
    chosen = {
        (fmt, tok is chat_tokenizer): resolve_template("auto", fmt, tok).name
        for fmt in api.DatasetFormat
        if fmt != api.DatasetFormat.AUTO
        for tok in (plain_tokenizer, chat_tokenizer)
    }
    assert chosen == {
        (api.DatasetFormat.TEXT, False): "none",
        (api.DatasetFormat.TEXT, True): "none",
        (api.DatasetFormat.PROMPT_COMPLETION, False): "none",
        (api.DatasetFormat.PROMPT_COMPLETION, True): "none",
        (api.DatasetFormat.INSTRUCTION, False): "alpaca",
        (api.DatasetFormat.INSTRUCTION, True): "model",
        (api.DatasetFormat.CHAT, False): "chatml",
        (api.DatasetFormat.CHAT, True): "model",
    }
    assert resolve_template("auto", "chat", None).name == "chatml"


def test_template_model_needs_a_chat_template(plain_tokenizer: Any) -> None:
    with pytest.raises(DataError, match=r"^template model: the model's tokenizer has no chat template"):
        resolve_template("model", "chat", plain_tokenizer)


def test_text_is_never_templated(chat_tokenizer: Any) -> None:
    row = {"text": "  raw text, 2047-03-19\n"}
    for template in ("auto", "model", "chatml", "alpaca", "none"):
        assert segments(row, template, tokenizer=chat_tokenizer) == [Segment("  raw text, 2047-03-19\n", T)]


def test_prompt_completion_as_written_or_as_one_exchange(chat_tokenizer: Any) -> None:
    row = {"prompt": "Date: 19 March 2047\nISO:", "completion": " 2047-03-19"}
    assert segments(row, "none") == [Segment("Date: 19 March 2047\nISO:", F), Segment(" 2047-03-19", T)]
    assert segments(row, "auto", tokenizer=chat_tokenizer) == segments(row, "none")
    assert segments(row, "chatml") == [
        Segment("<|im_start|>user\nDate: 19 March 2047\nISO:<|im_end|>\n<|im_start|>assistant\n", F),
        Segment(" 2047-03-19<|im_end|>\n", T),
    ]
    assert segments(row, "model", tokenizer=chat_tokenizer) == segments(row, "chatml")
    assert segments(row, "alpaca") == [
        Segment(f"{ALPACA_PREAMBLE}### Instruction:\nDate: 19 March 2047\nISO:\n\n### Response:\n", F),
        Segment(" 2047-03-19", T),
    ]


def test_empty_completion_keeps_a_trained_segment() -> None:
    assert segments({"prompt": "p", "completion": ""}, "none") == [Segment("p", F), Segment("", T)]


ALPACA_ROW = {"instruction": "Translate to French.", "input": "cheese", "output": "fromage"}
DOLLY_ROW = {
    "instruction": "Translate to French.",
    "context": "cheese",
    "response": "fromage",
    "category": "x",
}


@pytest.mark.parametrize("row", [ALPACA_ROW, DOLLY_ROW], ids=["alpaca", "dolly"])
def test_instruction_rows(row: dict[str, str], chat_tokenizer: Any) -> None:
    assert segments(row, "alpaca") == [
        Segment(
            f"{ALPACA_PREAMBLE_WITH_INPUT}### Instruction:\nTranslate to French.\n\n### Input:\ncheese\n\n"
            "### Response:\n",
            F,
        ),
        Segment("fromage", T),
    ]
    assert segments(row, "auto", tokenizer=chat_tokenizer) == [
        Segment("<|im_start|>user\nTranslate to French.\n\ncheese<|im_end|>\n<|im_start|>assistant\n", F),
        Segment("fromage<|im_end|>\n", T),
    ]
    assert segments(row, "none") == [Segment("Translate to French.\ncheese\n", F), Segment("fromage", T)]


def test_instruction_without_input_uses_the_short_preamble() -> None:
    row = {"instruction": "Say hi.", "input": "", "output": "hi"}
    assert segments(row, "alpaca") == [
        Segment(f"{ALPACA_PREAMBLE}### Instruction:\nSay hi.\n\n### Response:\n", F),
        Segment("hi", T),
    ]
    assert segments({"instruction": "Say hi.", "output": "hi"}, "alpaca") == segments(row, "alpaca")


def test_alpaca_takes_a_system_message_as_preamble() -> None:
    row = {"messages": OPENAI["messages"][:3]}
    assert segments(row, "alpaca") == [
        Segment("Be brief.\n\n### Instruction:\nCapital of France?\n\n### Response:\n", F),
        Segment("Paris", T),
    ]


def test_chat_without_template_joins_turns_by_newline() -> None:
    assert segments(OPENAI, "none") == [
        Segment("Be brief.", F),
        Segment("\n", F),
        Segment("Capital of France?", F),
        Segment("\n", F),
        Segment("Paris", T),
        Segment("\n", F),
        Segment("And Japan?", F),
        Segment("\n", F),
        Segment("東京", T),
    ]


def test_model_template_with_bos_in_the_text(make_tokenizer: Callable[..., Any]) -> None:
    tok = make_tokenizer(
        chat_template=(
            "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}</s>{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}"
        )
    )
    row = {"prompt": "hi", "completion": "hello"}
    assert segments(row, "model", tokenizer=tok) == [
        Segment("<s>[user] hi</s>[assistant] ", F),
        Segment("hello</s>", T),
    ]


@pytest.mark.parametrize(
    ("chat_template", "message"),
    [
        # A template whose rendering of turn 1 depends on the number of turns cannot be split exactly.
        (
            "{% for m in messages %}{{ m.role }} {{ loop.index }}/{{ messages | length }}: {{ m.content }}\n"
            "{% endfor %}",
            "the model chat template does not render this conversation's turns as prefixes of each other, "
            "so the assistant turns cannot be found exactly; use template chatml",
        ),
        # Template errors become data errors.
        (
            "{{ raise_exception('roles must alternate') }}",
            "the model's chat template refused this row: roles must alternate",
        ),
    ],
    ids=["rewrites-earlier-turns", "raises"],
)
def test_a_model_template_that_cannot_render_the_row_is_refused(
    make_tokenizer: Callable[..., Any], chat_template: str, message: str
) -> None:
    tok = make_tokenizer(chat_template=chat_template)
    with pytest.raises(DataError) as e:
        segments({"prompt": "hi", "completion": "hello"}, "model", tokenizer=tok)
    assert str(e.value) == message


def test_eval_pairs_are_the_rendered_prompt_and_the_reference(chat_tokenizer: Any) -> None:
    model = resolve_template("auto", "chat", chat_tokenizer)
    sample = parse_row(OPENAI, api.DatasetFormat.CHAT)
    assert eval_pair(sample, model) == EvalPair("".join(s.text for s in CHATML_SEGMENTS[:3]), "東京")
    assert eval_pair(sample, model).prompt.endswith("<|im_start|>assistant\n")  # type: ignore[union-attr]
    pc = parse_row({"prompt": "Q: 2+2\nA:", "completion": " 4"}, api.DatasetFormat.AUTO)
    assert eval_pair(pc, resolve_template("auto", "prompt-completion")) == EvalPair("Q: 2+2\nA:", " 4")
    assert eval_pair(parse_row({"text": "t"}, api.DatasetFormat.TEXT), model) is None


def test_chatml_fallback_ends_turns_with_eos_when_the_tokenizer_lacks_chatml_tokens(
    metaspace_tokenizer: Any,
) -> None:
    """Without ``<|im_start|>``/``<|im_end|>`` tokens they would be plain text, kept in predictions."""
    tok = metaspace_tokenizer
    for name in ("auto", "chatml"):
        template = resolve_template(name, "chat", tok)
        assert template.name == "chatml-eos"
        assert segments(OPENAI, name, tokenizer=tok) == [
            Segment("system\nBe brief.</s>user\nCapital of France?</s>assistant\n", F),
            Segment("Paris</s>", T),
            Segment("user\nAnd Japan?</s>assistant\n", F),
            Segment("東京</s>", T),
        ]
    sample = parse_row(OPENAI, api.DatasetFormat.CHAT)
    example = tokenize_example(to_segments(sample, resolve_template("auto", "chat", tok)), tok, 1024)
    assert example is not None
    assert "<|im" not in tok.decode(example.input_ids)
    trained = [t for t in example.labels if t != IGNORE_INDEX]
    # Each reply ends with the EOS the model already stops generating at; decoded, nothing is left.
    assert trained.count(tok.eos_token_id) == 2 and trained[-1] == tok.eos_token_id
    assert tok.decode(trained, skip_special_tokens=True) == "Paris東京"


def test_a_tokenizer_with_chatml_tokens_keeps_chatml(plain_tokenizer: Any) -> None:
    assert resolve_template("auto", "chat", plain_tokenizer).name == "chatml"
    assert segments(OPENAI, "chatml", tokenizer=plain_tokenizer) == CHATML_SEGMENTS


@pytest.mark.parametrize("tokenizer_name", ["plain_tokenizer", "metaspace_tokenizer"])
def test_fallback_chat_template_as_jinja_renders_the_training_text(
    tokenizer_name: str, request: pytest.FixtureRequest
) -> None:
    """The artifacts' tokenizer carries the fallback as its chat template: it must render the same text."""
    tok = copy.deepcopy(request.getfixturevalue(tokenizer_name))
    template = resolve_template("auto", "chat", tok)
    assert isinstance(template, ChatTemplate) and template.chat_template is not None
    tok.chat_template = template.chat_template
    turns = [{"role": m["role"], "content": m["content"]} for m in OPENAI["messages"][:5]]
    model = resolve_template("model", "chat", tok)
    sample = parse_row({"messages": turns}, api.DatasetFormat.CHAT)
    assert to_segments(sample, model) == to_segments(sample, template)
    assert tok.apply_chat_template(turns[:4], tokenize=False, add_generation_prompt=True) == "".join(
        s.text for s in to_segments(sample, template)[:3]
    )
