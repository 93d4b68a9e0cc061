"""The enumerations of the FineTuneJob API; each is a string enum in the CRD."""

from __future__ import annotations

from enum import StrEnum


class Method(StrEnum):
    """How the weights are trained: all of them, a LoRA adapter, or an adapter on a 4-bit base."""

    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"


class DatasetFormat(StrEnum):
    """The shape of a data row; auto detects it from the first rows."""

    AUTO = "auto"
    TEXT = "text"
    PROMPT_COMPLETION = "prompt-completion"
    INSTRUCTION = "instruction"
    CHAT = "chat"


class Phase(StrEnum):
    """Where the job is in its life."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class Stage(StrEnum):
    """The trainer's stages, in the order they run."""

    FETCH = "fetch"
    PREPARE = "prepare"
    BASELINE = "baseline"
    TRAIN = "train"
    EVALUATE = "evaluate"
    MERGE = "merge"
    QUANTIZE = "quantize"
    PUSH = "push"


class EvalMetric(StrEnum):
    """A metric computed on the held-out data before and after training."""

    LOSS = "loss"
    PERPLEXITY = "perplexity"
    EXACT_MATCH = "exact_match"
    ROUGE_L = "rouge_l"
    BLEU = "bleu"


class ExportFormat(StrEnum):
    """The exports of the merged model: bitsandbytes for transformers, GGUF for llama.cpp and Ollama."""

    BNB_4BIT = "bnb-4bit"
    BNB_8BIT = "bnb-8bit"
    GGUF_F16 = "gguf-f16"
    GGUF_Q8_0 = "gguf-q8_0"
    GGUF_Q4_K_M = "gguf-q4_k_m"
