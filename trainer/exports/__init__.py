"""Exports of the merged model, one module a family of formats (``api.EXPORTS`` says which).

Each format of ``spec.export.formats`` belongs to a family, and each family has an
:class:`Exporter`. ``unsupported`` says before training whether the model can be exported (a
job fails early, not after hours; offline, `kubetune validate` and `kubetune plan` judge the
model type by ``validation.export_problems``); ``export`` writes the format into its own folder
and checks the result with a real client before it counts, returning the figures of that check
for ``metrics.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from kubetune import api
from kubetune.trainer.context import RunContext
from kubetune.validation import Problem


class Exporter(Protocol):
    def unsupported(self, config: dict[str, Any], tokenizer: Any) -> list[str]:
        """Why this model (its config.json, its loaded tokenizer) cannot be exported; the trainer
        asks before it trains."""
        ...

    def export(self, ctx: RunContext, name: api.ExportFormat, merged: Path, target: Path) -> dict[str, float]:
        """Write ``name`` of the merged model into ``target``; the figures of its check."""
        ...


def exporter(name: api.ExportFormat) -> Exporter:
    from kubetune.trainer.exports import bnb, gguf

    family = api.EXPORTS[name].family
    exporters: dict[api.ExportFamily, Exporter] = {
        api.ExportFamily.BNB: bnb.BITSANDBYTES,
        api.ExportFamily.GGUF: gguf.GGUF_EXPORTER,
    }
    return exporters[family]


def problems(spec: api.FineTuneJobSpec, config: dict[str, Any], tokenizer: Any) -> list[Problem]:
    """Every export of ``spec`` that this model cannot have, named by its field."""
    out = []
    for index, name in enumerate(spec.export.formats):
        out += [
            Problem(f"spec.export.formats[{index}]", f"{name}: {why}")
            for why in exporter(name).unsupported(config, tokenizer)
        ]
    return out
