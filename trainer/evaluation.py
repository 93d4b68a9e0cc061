"""Evaluation before and after training: validation loss and perplexity on the completion
tokens, and task metrics from greedy generation on held-out rows."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from kubetune import api
from kubetune.trainer.data import IGNORE_INDEX, EvalPair, Example, PaddingCollator, encode_prompt

# The most bytes of fp32 logits the loss evaluation holds at once. Unbounded, a batch of 16 rows of
# 4,096 tokens with a 128k vocabulary takes 17 GB of bf16 logits plus 34 GB for their fp32 copy.
LOGITS_BYTES = 1 << 30


def vocabulary_size(model: Any) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


@torch.no_grad()
def validation_loss(
    model: Any,
    examples: Sequence[Example],
    pad_token_id: int,
    batch_size: int,
    *,
    logits_bytes: int = LOGITS_BYTES,
) -> float:
    """Mean cross-entropy per trained token (the same tokens the training loss counts).

    Rows go through the model at most ``batch_size`` at a time and fewer where their logits would
    exceed ``logits_bytes``; the loss is taken over slices of positions, so the fp32 logits held at
    once stay within the same bound.
    """
    collate = PaddingCollator(pad_token_id)
    vocab = vocabulary_size(model)
    total, count = 0.0, 0
    dev = next(model.parameters()).device
    for rows in _micro_batches(examples, batch_size, vocab * 4, logits_bytes):
        batch = {k: v.to(dev) for k, v in collate(rows).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        step = max(1, logits_bytes // (logits.size(0) * vocab * 4))
        for first in range(0, targets.size(1), step):
            piece = targets[:, first : first + step]
            total += torch.nn.functional.cross_entropy(
                logits[:, first : first + piece.size(1)].float().reshape(-1, logits.size(-1)),
                piece.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            ).item()
            count += int((piece != IGNORE_INDEX).sum())
    return total / max(count, 1)


def _micro_batches(
    examples: Sequence[Example], batch_size: int, bytes_per_position: int, budget: int
) -> Iterator[list[Example]]:
    """Examples shortest first, at most batch_size a batch and no more rows than fit the budget."""
    batch: list[Example] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids)):
        wider = (len(batch) + 1) * len(example.input_ids) * bytes_per_position
        if batch and (len(batch) == batch_size or wider > budget):
            yield batch
            batch = []
        batch.append(example)
    if batch:
        yield batch


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy completions of prompts tokenized exactly as in training (left-padded)."""
    dev = next(model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = [encode_prompt(p, tokenizer) for p in prompts[start : start + batch_size]]
        width = max(map(len, ids))
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids], device=dev)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=dev)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return outputs


def task_metrics(predictions: Sequence[str], references: Sequence[str], wanted: set[str]) -> dict[str, float]:
    """Exact match, ROUGE-L F1 and corpus BLEU (sacrebleu), each in [0, 1]."""
    preds = [p.strip() for p in predictions]
    refs = [r.strip() for r in references]
    out: dict[str, float] = {}
    if "exact_match" in wanted:
        out["exact_match"] = sum(p == r for p, r in zip(preds, refs, strict=True)) / len(refs)
    if "rouge_l" in wanted:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        out["rouge_l"] = sum(
            scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True)
        ) / len(refs)
    if "bleu" in wanted:
        import sacrebleu

        out["bleu"] = sacrebleu.corpus_bleu(preds, [refs]).score / 100
    return out


def evaluate(
    model: Any,
    tokenizer: Any,
    validation: Sequence[Example],
    pairs: Sequence[EvalPair],
    spec: api.Evaluation,
    batch_size: int,
) -> tuple[dict[str, float], list[tuple[str, str, str]]]:
    """Metrics (the same keys before and after training) and (prompt, reference, prediction) rows."""
    wanted = {str(m) for m in spec.metrics}
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    samples: list[tuple[str, str, str]] = []
    try:
        if validation and wanted & {"loss", "perplexity"}:
            examples = validation[: spec.max_loss_samples]
            loss = validation_loss(model, examples, tokenizer.pad_token_id, batch_size)
            if "loss" in wanted:
                metrics["loss"] = loss
            if "perplexity" in wanted:
                metrics["perplexity"] = math.exp(min(loss, 50.0))
        generated = wanted & {"exact_match", "rouge_l", "bleu"}
        held_out = list(pairs[: spec.max_samples])
        if held_out and generated:
            predictions = generate(
                model, tokenizer, [p.prompt for p in held_out], spec.max_new_tokens, batch_size
            )
            metrics |= task_metrics(predictions, [p.reference for p in held_out], generated)
            samples = [(p.prompt, p.reference, pred) for p, pred in zip(held_out, predictions, strict=True)]
    finally:
        model.train(was_training)
    return metrics, samples
