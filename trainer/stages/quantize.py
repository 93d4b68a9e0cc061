"""quantize: the exports of the merged model (trainer/exports), each checked before it counts."""

from __future__ import annotations

from kubetune import contract
from kubetune.trainer.context import RunContext
from kubetune.trainer.exports import exporter


def run(ctx: RunContext) -> None:
    merged = ctx.staging / contract.MERGED
    for name in ctx.spec.export.formats:
        target = ctx.staging / contract.QUANTIZED / name
        checks = exporter(name).export(ctx, name, merged, target)
        ctx.checks.update({f"{name}_{key}": value for key, value in checks.items()})
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        ctx.reporter.log(f"{contract.QUANTIZED}/{name}: {size / 1e6:,.1f} MB, checked")
