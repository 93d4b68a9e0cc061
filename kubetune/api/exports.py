"""What each export format is: its family, its bits, the models it supports. The one table.

Validation, the memory plan and the trainer's exporters all read ``EXPORTS``; none of them
judges a format by its name. Keys are :class:`ExportFormat` members, which are strings, so the
plain strings a parsed spec holds (``use_enum_values``) look rows up too. What all formats of a
family share (the model types they support) is said once, on the family.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from kubetune.api.enums import ExportFormat

# config.json model_type -> the GGUF architecture llama.cpp knows it as (the llama family, and qwen2).
GGUF_ARCHITECTURES: Mapping[str, str] = MappingProxyType(
    {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
)
GGUF_MODEL_TYPES: frozenset[str] = frozenset(GGUF_ARCHITECTURES)


class ExportFamily(StrEnum):
    """What makes an export and what reads it."""

    BNB = "bnb"  # bitsandbytes, for transformers: made as transformers loads the merged model
    GGUF = "gguf"  # model.gguf and an Ollama Modelfile, for llama.cpp, Ollama and LM Studio

    @property
    def model_types(self) -> frozenset[str] | None:
        """The config.json model types this family supports; None: any transformers loads."""
        return GGUF_MODEL_TYPES if self is ExportFamily.GGUF else None

    def refusal(self, model_type: str) -> str | None:
        """Why a model of ``model_type`` (config.json's) cannot have this family's exports, or None."""
        supported = self.model_types
        if supported is None or model_type in supported:
            return None
        known = ", ".join(sorted(supported))
        return f"{self.name} export supports models of type {known}; this one is {model_type!r}"


@dataclass(frozen=True)
class ExportTraits:
    """One export format: its family and the bits of its linear weights."""

    family: ExportFamily
    bits: int  # nominal bits per linear-layer weight (16: not quantized)

    @property
    def model_types(self) -> frozenset[str] | None:
        return self.family.model_types

    def refusal(self, model_type: str) -> str | None:
        return self.family.refusal(model_type)


EXPORTS: Mapping[ExportFormat, ExportTraits] = MappingProxyType(
    {
        ExportFormat.BNB_4BIT: ExportTraits(ExportFamily.BNB, 4),
        ExportFormat.BNB_8BIT: ExportTraits(ExportFamily.BNB, 8),
        ExportFormat.GGUF_F16: ExportTraits(ExportFamily.GGUF, 16),
        ExportFormat.GGUF_Q8_0: ExportTraits(ExportFamily.GGUF, 8),
        ExportFormat.GGUF_Q4_K_M: ExportTraits(ExportFamily.GGUF, 4),
    }
)


def formats_of(family: ExportFamily) -> list[ExportFormat]:
    """The formats of one family, in the enum's order."""
    return [name for name, traits in EXPORTS.items() if traits.family is family]
