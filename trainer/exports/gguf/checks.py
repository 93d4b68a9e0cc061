"""llama.cpp's check of an exported file against the merged model on held-out prompts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kubetune.trainer.context import RunContext


@dataclass(frozen=True)
class Tolerance:
    """How close llama.cpp must stay to the merged model on the validation prompts."""

    kl: float  # mean KL(merged || gguf) of the next-token distributions, nats
    top1: float  # least fraction of positions with the same most likely next token
    greedy: float  # least fraction of prompts with the same greedy continuation


PROMPTS = 8  # validation prompts the check runs
CHECK_CONTEXT = 1024  # most tokens of llama.cpp's context in the check; longer prompts are skipped
CONTINUATION = 8  # tokens of each greedy continuation


def prompts(ctx: RunContext) -> list[str]:
    """Held-out prompts as the model saw them in training (raw text for text datasets)."""
    assert ctx.data is not None
    texts = [p.prompt for p in ctx.data.eval_pairs[:PROMPTS]]
    if not texts:
        source = ctx.data.validation or ctx.data.train
        texts = [ctx.tokenizer.decode(e.input_ids[:64], skip_special_tokens=True) for e in source[:PROMPTS]]
    return [t for t in texts if t.strip()] or ["The"]


@dataclass(frozen=True)
class Reference:
    """The merged model's answers on the check's prompts, computed once for all the formats."""

    texts: list[str]
    ids: list[list[int]]
    bos: list[bool]  # whether transformers put BOS first
    logits: list[torch.Tensor]  # [positions, vocabulary], fp32
    greedy: list[list[int]]  # CONTINUATION tokens, or fewer up to EOS


@torch.no_grad()
def reference(model: Any, tokenizer: Any, texts: list[str]) -> Reference:
    model.eval()
    device = next(model.parameters()).device
    longest = (
        min(CHECK_CONTEXT, int(getattr(model.config, "max_position_embeddings", CHECK_CONTEXT)))
        - CONTINUATION
    )
    kept, ids, bos, logits, greedy = [], [], [], [], []
    for text in texts:
        row = list(tokenizer(text)["input_ids"])
        if len(row) > longest:
            continue  # a long document: the check's context is for short prompts
        kept.append(text)
        batch = torch.tensor([row], device=device)
        ids.append(row)
        bos.append(bool(row and row[0] == tokenizer.bos_token_id))
        logits.append(model(batch).logits[0].float().cpu())
        out = model.generate(
            batch, max_new_tokens=CONTINUATION, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        greedy.append(out[0, len(row) :].tolist())
    if not kept:
        raise RuntimeError(
            f"no prompt of the GGUF check is shorter than {CHECK_CONTEXT - CONTINUATION} tokens"
        )
    return Reference(kept, ids, bos, logits, greedy)


def check(path: Path, expected: Reference, tolerance: Tolerance, name: str) -> dict[str, float]:
    """llama.cpp loads ``path``, tokenizes like transformers, agrees with the merged model within
    ``tolerance`` and generates; the figures, or an error naming what failed."""
    import llama_cpp

    from kubetune.trainer.stages.merge import agreement

    context = min(CHECK_CONTEXT, max(len(i) for i in expected.ids) + CONTINUATION + 1)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, logits_all=True, verbose=False, seed=0)
    try:
        kls, top1s, max_abs, same, generated = [], [], 0.0, 0, 0
        for text, ids, bos, logits, greedy in zip(
            expected.texts, expected.ids, expected.bos, expected.logits, expected.greedy, strict=True
        ):
            theirs = list(llm.tokenize(text.encode("utf-8"), add_bos=bos, special=True))
            if theirs != ids:
                raise RuntimeError(f"{name}: llama.cpp tokenizes {text!r} as {theirs}, transformers as {ids}")
            llm.reset()
            llm.eval(ids)
            found = agreement(logits, torch.tensor(np.asarray(llm.scores[: len(ids)]), dtype=torch.float32))
            kls.append(found.kl)
            top1s.append(found.top1)
            max_abs = max(max_abs, found.max_abs)
            continuation = _greedy(llm, ids, len(greedy))
            same += continuation == greedy
            generated += bool(continuation)
    finally:
        llm.close()
    count = len(expected.texts)
    result = {
        "kl": float(np.mean(kls)),
        "top1": float(np.mean(top1s)),
        "max_abs_logit_diff": max_abs,
        "greedy_same": same / count,
        "prompts": float(count),
    }
    if not generated:
        raise RuntimeError(f"{name}: llama.cpp loaded the file but generated nothing")
    if (
        result["kl"] > tolerance.kl
        or result["top1"] < tolerance.top1
        or result["greedy_same"] < tolerance.greedy
    ):
        raise RuntimeError(
            f"{name}: llama.cpp disagrees with the merged model on {count} validation prompts: "
            f"mean KL {result['kl']:.3g} (at most {tolerance.kl:g}), top-1 {result['top1']:.1%} "
            f"(at least {tolerance.top1:.0%}), same greedy continuation on {result['greedy_same']:.0%} "
            f"(at least {tolerance.greedy:.0%})"
        )
    return result


def _greedy(llm: Any, ids: list[int], count: int) -> list[int]:
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if len(out) == count:
            break
        out.append(int(token))
        if token == llm.token_eos():
            break
    return out
