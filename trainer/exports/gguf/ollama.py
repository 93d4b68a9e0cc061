"""The Ollama Modelfile beside each GGUF file: the prompt template the job trained with."""

from __future__ import annotations

from typing import Any

from kubetune import contract
from kubetune.trainer.context import RunContext
from kubetune.trainer.data.templates import ALPACA_PREAMBLE


def modelfile(ctx: RunContext) -> str:
    """An Ollama Modelfile: the file, the template the model was trained with, its stop tokens."""
    assert ctx.data is not None
    template, stops = ollama_template(ctx.data.template, ctx.tokenizer)
    lines = [
        f"# ollama create <name> -f Modelfile (in this folder); or: llama-cli -m {contract.GGUF_MODEL}",
        f"FROM ./{contract.GGUF_MODEL}",
    ]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


CHATML = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
)
LLAMA3 = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
)
ALPACA = (
    "{{ if .System }}{{ .System }}\n\n{{ else }}" + ALPACA_PREAMBLE + "{{ end }}"
    "### Instruction:\n{{ .Prompt }}\n\n### Response:\n{{ .Response }}"
)


def ollama_template(trained: str, tokenizer: Any) -> tuple[str | None, list[str]]:
    """Ollama's Go template for the prompt format the job trained with, and its stop strings.

    Prompt-completion and text jobs trained on raw text: the prompt goes in as it is. A chat
    template llama.cpp and Ollama know from the file's metadata but not listed here is left to
    them (no TEMPLATE line).
    """
    eos = [tokenizer.eos_token] if tokenizer.eos_token else []
    chat = tokenizer.chat_template or ""
    if trained == "chatml" or (trained == "model" and "<|im_start|>" in chat):
        return CHATML, ["<|im_end|>", *eos]
    if trained == "model" and "<|start_header_id|>" in chat:
        return LLAMA3, ["<|eot_id|>", *eos]
    if trained == "alpaca":
        return ALPACA, eos
    if trained in ("none", "text"):
        return "{{ .Prompt }}", eos
    return None, eos
