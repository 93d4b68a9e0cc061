"""What a finished run leaves behind, besides the weights: metrics, report, model card, manifest."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from kubetune import api, contract
from kubetune.artifacts import Manifest, ManifestFile
from kubetune.storage import file_digests
from kubetune.trainer.context import RunContext


def metrics_document(ctx: RunContext) -> dict[str, Any]:
    assert ctx.data is not None
    return {
        "job": f"{ctx.job.metadata.namespace or 'default'}/{ctx.job.metadata.name}",
        "runId": ctx.run_id,
        "before": ctx.before,
        "after": ctx.after,
        "checks": ctx.checks,
        **_harness_document(ctx),
        "trainedTokens": ctx.trained_tokens,
        "data": ctx.data.report.to_dict(),
        "stageSeconds": ctx.timings,
        "history": ctx.history,
    }


def _harness_document(ctx: RunContext) -> dict[str, Any]:
    spec = ctx.spec.evaluation.harness
    if spec is None:
        return {}
    gate = ctx.spec.evaluation.regression
    return {
        "harness": {
            "tasks": spec.tasks,
            "before": ctx.harness_before.values if ctx.harness_before else {},
            "after": ctx.harness_after.values if ctx.harness_after else {},
            "higherIsBetter": ctx.harness_after.higher_is_better if ctx.harness_after else {},
            "maxDrop": gate.max_drop if gate else None,
            "regressions": [d.to_wire() for d in ctx.regressions or []],
        }
    }


def report(
    history: list[dict[str, float]],
    path: Path,
    title: str,
    scores: tuple[dict[str, float], dict[str, float]] | None = None,
) -> None:
    """The loss curves, and the harness scores before and after beside them when there are any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if scores:
        fig, (ax, bars) = plt.subplots(1, 2, figsize=(13, 4), dpi=100, width_ratios=(7, 6))
        _score_bars(bars, *scores)
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _score_bars(ax: Any, before: dict[str, float], after: dict[str, float]) -> None:
    names = sorted(set(before) | set(after))
    positions = range(len(names))
    ax.barh([p - 0.2 for p in positions], [before.get(n, 0.0) for n in names], height=0.4, label="before")
    ax.barh([p + 0.2 for p in positions], [after.get(n, 0.0) for n in names], height=0.4, label="after")
    ax.set_yticks(list(positions), names)
    ax.invert_yaxis()
    ax.set_title("lm-evaluation-harness")
    ax.grid(alpha=0.3, axis="x")
    ax.legend()


def model_card(ctx: RunContext) -> str:
    spec = ctx.spec
    base = spec.model.name or spec.model.uri
    keys = sorted(set(ctx.before) | set(ctx.after))
    rows = "\n".join(f"| {k} | {_cell(ctx.before.get(k))} | {_cell(ctx.after.get(k))} |" for k in keys)
    training = json.dumps(spec.training.to_wire(), indent=2)
    method = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}[spec.method]
    lora = "" if spec.method == api.Method.FULL else f"\nLoRA: `{json.dumps(spec.lora.to_wire())}`\n"
    quant = spec.resolved_quantization()
    qline = f"\nQuantized base while training: `{json.dumps(quant.to_wire())}`\n" if quant else ""
    assert ctx.data is not None
    return f"""---
base_model: {base}
library_name: {"peft" if spec.method != api.Method.FULL else "transformers"}
tags: [kubetune, {spec.method}]
---

# {ctx.job.metadata.name}

{method.capitalize()} of `{base}` by kubetune.

## Data

Training data `{spec.dataset.train}` ({ctx.data.format}, template {ctx.data.template});
validation: {ctx.data.report.split}.

```
{chr(10).join(ctx.data.report.lines())}
```

## Training
{lora}{qline}
```json
{training}
```

Trained tokens: {ctx.trained_tokens:,}.

## Evaluation

| metric | before | after |
|---|---|---|
{rows}
{_gate_line(ctx)}
![loss curves]({contract.REPORT})

## Files

`{contract.ADAPTER}/` (PEFT adapter), `{contract.MERGED}/` (full weights), `{contract.QUANTIZED}/<format>/`,
`{contract.METRICS}`, `{contract.PREDICTIONS}`, `{contract.REPORT}`, and `{contract.MANIFEST}` listing every
file with its SHA-256.
"""


def _gate_line(ctx: RunContext) -> str:
    harness, gate = ctx.spec.evaluation.harness, ctx.spec.evaluation.regression
    lines = []
    if harness is not None:
        lines.append(f"Scores `<task>/<metric>` are lm-evaluation-harness's on {', '.join(harness.tasks)}.")
    if gate is not None and ctx.regressions is not None:
        verdict = "; ".join(d.summary() for d in ctx.regressions) if ctx.regressions else "none"
        lines.append(f"Regression gate (maxDrop {gate.max_drop:g}): scores dropped beyond it: {verdict}.")
    for name in ctx.spec.export.formats:
        if api.EXPORTS[name].family is api.ExportFamily.GGUF and f"{name}_kl" in ctx.checks:
            c = {k: ctx.checks[f"{name}_{k}"] for k in ("kl", "top1", "greedy_same", "prompts")}
            lines.append(
                f"`{contract.QUANTIZED}/{name}/{contract.GGUF_MODEL}`, checked with llama.cpp "
                f"on {c['prompts']:.0f} validation prompts: "
                f"mean KL {c['kl']:.2g} from the merged model, top-1 agreement {c['top1']:.1%}, "
                f"same greedy continuation on {c['greedy_same']:.0%}."
            )
    return "\n" + "\n\n".join(lines) + "\n" if lines else ""


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def manifest(ctx: RunContext, files: list[Path]) -> Manifest:
    """Every published file with size, SHA-256 and CRC64NVME. Written last: no manifest, no result."""
    digests = {f: file_digests(f) for f in files}
    return Manifest(
        kind="FineTuneJobManifest",
        job=f"{ctx.job.metadata.namespace or 'default'}/{ctx.job.metadata.name}",
        run_id=ctx.run_id,
        created_at=dt.datetime.now(dt.UTC).replace(microsecond=0),
        files=[
            ManifestFile(
                path=f.relative_to(ctx.staging).as_posix(),
                size=f.stat().st_size,
                sha256=digests[f][0],
                crc64nvme=digests[f][1],
            )
            for f in sorted(files)
        ],
    )
