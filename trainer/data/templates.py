"""Templates: a sample becomes text segments, each trained (carries loss) or not.

``auto`` uses the model's own chat template when its tokenizer has one, else the format's
``fallback``: ChatML for chat, Alpaca for instruction. ChatML needs its ``<|im_start|>``/``<|im_end|>``
markers to be special tokens of the tokenizer; where they are not (Llama-2 and Mistral base
tokenizers), written as text they would be learnt and generated as text, and generation would
not stop at them. There the fallback is ``chatml-eos``: a role line opens each turn and the
tokenizer's own EOS ends it, which the model already has an embedding for and generation stops
at. (Registering the markers as new tokens was the alternative; with LoRA and QLoRA the new
embedding and output rows would stay untrained, and the resized vocabulary would no longer fit
the published base model.) A fallback chat template also exists as Jinja, which the prepare
stage gives the tokenizer saved with every artifact, so the result renders chats as it learnt them.

Prompt-completion rows carry their own prompt format (``"Q: ...\nA:"`` + ``" 42"``), so ``auto``
keeps them as written (``none``), as TRL does for non-conversational data; ``template: model`` or
``chatml`` wraps them as one user/assistant exchange instead. Text rows are never templated.

A chat template renders a whole conversation, so the assistant spans are found by rendering
prefixes: ``render(turns[:i], add_generation_prompt=True)`` is the prompt before assistant turn
``i`` and ``render(turns[:i + 1])`` extends it by exactly that turn (its content and the
template's end-of-turn marker, both trained). A template for which a rendered prefix is not a
prefix of the longer rendering cannot be split exactly; such a row is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

from kubetune.trainer.data.errors import DataError
from kubetune.trainer.data.formats import Message, Sample, Segment, get_format
from kubetune.trainer.data.formats.instruction import Instruction

TemplateName = Literal["auto", "model", "chatml", "alpaca", "none"]

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)


class EvalPair(NamedTuple):
    """A held-out prompt, rendered as in training, and the reference completion it should produce."""

    prompt: str
    reference: str


ChatRenderer = Callable[[Sequence[Message], bool], str]


class Template:
    name: str = ""

    def render(self, sample: Sample) -> list[Segment]:
        if sample.raw:
            return sample.as_written()
        # An empty completion stays: its EOS is still trained.
        return [s for s in self._render(sample) if s.text or s.trained]

    def _render(self, sample: Sample) -> list[Segment]:
        raise NotImplementedError


class NoTemplate(Template):
    """The fields as written (``Sample.as_written``): prompt + completion; instruction, input and
    turns one per line."""

    name = "none"

    def _render(self, sample: Sample) -> list[Segment]:
        return sample.as_written()


class AlpacaTemplate(Template):
    """The Stanford Alpaca prompt; a chat row fits it with one user turn and one reply."""

    name = "alpaca"

    def _render(self, sample: Sample) -> list[Segment]:
        preamble: str | None = None
        if not isinstance(sample, Instruction):
            turns = sample.conversation()
            if turns[0].role == "system":
                preamble, turns = turns[0].content + "\n\n", turns[1:]
            if [m.role for m in turns] != ["user", "assistant"]:
                raise DataError(
                    "the alpaca template takes one user message and one assistant reply "
                    f"(this row has {len(turns)} turns); use template chatml or model"
                )
            sample = Instruction(turns[0].content, "", turns[1].content)
        if preamble is None:
            preamble = ALPACA_PREAMBLE_WITH_INPUT if sample.input else ALPACA_PREAMBLE
        prompt = f"{preamble}### Instruction:\n{sample.instruction}\n\n"
        if sample.input:
            prompt += f"### Input:\n{sample.input}\n\n"
        return [Segment(prompt + "### Response:\n", False), Segment(sample.output, True)]


class ChatTemplate(Template):
    """A conversation template; assistant turns are split off by rendering prefixes.

    ``chat_template`` is the same template in Jinja for the tokenizer's ``chat_template``, or
    None when the renderer is the tokenizer's own template.
    """

    def __init__(self, name: str, renderer: ChatRenderer, chat_template: str | None = None) -> None:
        self.name = name
        self.renderer = renderer
        self.chat_template = chat_template

    def _render(self, sample: Sample) -> list[Segment]:
        turns = sample.conversation()
        segments: list[Segment] = []
        done = ""
        for i, message in enumerate(turns):
            if message.role != "assistant":
                continue
            prompt = self.renderer(turns[:i], True)
            full = self.renderer(turns[: i + 1], False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise DataError(
                    f"the {self.name} chat template does not render this conversation's turns as prefixes "
                    "of each other, so the assistant turns cannot be found exactly; use template chatml"
                )
            segments += [Segment(prompt[len(done) :], False), Segment(full[len(prompt) :], True)]
            done = full
        return segments


CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_EOS_JINJA = (
    "{% for message in messages %}"
    "{{ message['role'] + '\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant\n' }}{% endif %}"
)


def render_chatml(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def eos_renderer(eos_token: str) -> ChatRenderer:
    def render(messages: Sequence[Message], add_generation_prompt: bool) -> str:
        text = "".join(f"{m.role}\n{m.content}{eos_token}" for m in messages)
        return text + ("assistant\n" if add_generation_prompt else "")

    return render


def has_chatml_tokens(tokenizer: Any) -> bool:
    """Whether ``<|im_start|>`` and ``<|im_end|>`` are special tokens: one id each, dropped when decoded."""
    for marker in CHATML_TOKENS:
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or tokenizer.decode(ids, skip_special_tokens=True) != "":
            return False
    return True


def chatml_for(tokenizer: Any) -> ChatTemplate:
    """ChatML where the tokenizer has its tokens (or is unknown), else turns ended by the tokenizer's EOS."""
    if tokenizer is None or has_chatml_tokens(tokenizer) or tokenizer.eos_token is None:
        return CHATML
    return ChatTemplate("chatml-eos", eos_renderer(tokenizer.eos_token), CHATML_EOS_JINJA)


def model_renderer(tokenizer: Any) -> ChatRenderer:
    def render(messages: Sequence[Message], add_generation_prompt: bool) -> str:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        try:
            text = tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja's TemplateError, raise_exception() in the template, ...
            raise DataError(f"the model's chat template refused this row: {e}") from None
        return str(text)

    return render


NONE = NoTemplate()
ALPACA = AlpacaTemplate()
CHATML = ChatTemplate("chatml", render_chatml, CHATML_JINJA)


def resolve_template(name: str, fmt: str, tokenizer: Any = None) -> Template:
    """The template for format ``fmt``: ``auto`` prefers the model's chat template, else the format's
    fallback. Raw text is never templated."""
    kind = get_format(fmt)
    if kind.raw:
        return NONE
    has_own = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if name == "auto":
        if kind.model_template and has_own:
            return ChatTemplate("model", model_renderer(tokenizer))
        name = kind.fallback
    if name == "model":
        if not has_own:
            raise DataError(
                "template model: the model's tokenizer has no chat template (use chatml or alpaca)"
            )
        return ChatTemplate("model", model_renderer(tokenizer))
    if name == "chatml":
        return chatml_for(tokenizer)
    named: dict[str, Template] = {"alpaca": ALPACA, "none": NONE}
    if name not in named:
        raise DataError(f"unknown template {name!r} (expected auto, model, chatml, alpaca or none)")
    return named[name]


def to_segments(sample: Sample, template: Template) -> list[Segment]:
    """The rendered sample, as segments; joined, they are the exact text the model sees."""
    return template.render(sample)


def eval_pair(sample: Sample, template: Template) -> EvalPair | None:
    """The prompt before the last trained span, and the reference completion; None for text."""
    ref = sample.reference()
    if ref is None:
        return None
    segments = template.render(sample)
    last = max((i for i, s in enumerate(segments) if s.trained), default=len(segments))
    return EvalPair("".join(s.text for s in segments[:last]), ref)
