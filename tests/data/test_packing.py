"""Packing and collation, down to the attention: a packed example's logits equal its logits alone."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kubetune.trainer.data import (
    IGNORE_INDEX,
    Example,
    PackedCollator,
    PackedRow,
    PaddingCollator,
    Segment,
    pack,
    packing_efficiency,
    tokenize_example,
)

TEXTS = [
    ("what is the capital of France", " Paris"),
    ("translate hello world into German", " hallo Welt"),
    ("2047-03-19", " a date"),
    ("x", " y"),
    ("summarize the following text please write a poem about dates and numbers", " ok"),
]


@pytest.fixture(scope="module")
def examples(plain_tokenizer: Any) -> list[Example]:
    out = []
    for prompt, completion in TEXTS:
        example = tokenize_example([Segment(prompt, False), Segment(completion, True)], plain_tokenizer, 64)
        assert example is not None
        out.append(example)
    return out


def test_pack_fits_rows_and_restarts_positions(examples: list[Example]) -> None:
    max_len = 24
    rows = pack(examples, max_len)
    assert all(len(r) <= max_len for r in rows)
    assert sorted(n for r in rows for n in r.lengths) == sorted(len(e) for e in examples)
    for row in rows:
        start = 0
        for n in row.lengths:
            assert row.position_ids[start : start + n] == list(range(n))
            start += n
        assert start == len(row)
    # every example appears once, whole, with its first label masked (no target across examples)
    found = []
    for row in rows:
        start = 0
        for n in row.lengths:
            ids = row.input_ids[start : start + n]
            match = next(e for e in examples if e.input_ids == ids)
            assert row.labels[start : start + n] == [IGNORE_INDEX, *match.labels[1:]]
            found.append(examples.index(match))
            start += n
    assert sorted(found) == list(range(len(examples)))


def test_pack_is_best_fit_and_deterministic() -> None:
    def ex(n: int) -> Example:
        return Example(list(range(n)), list(range(n)))

    rows = pack([ex(n) for n in (2, 6, 3, 5, 4)], 8)
    assert [r.lengths for r in rows] == [[6, 2], [5, 3], [4]]
    assert pack([ex(n) for n in (2, 6, 3, 5, 4)], 8) == rows
    assert packing_efficiency(rows, 8) == 20 / 24
    with pytest.raises(ValueError, match="more than max_seq_length 8"):
        pack([ex(9)], 8)


def test_padding_collator(examples: list[Example]) -> None:
    batch = PaddingCollator(pad_token_id=0)(examples[:3])
    width = max(len(e) for e in examples[:3])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    for i, example in enumerate(examples[:3]):
        n = len(example)
        assert batch["input_ids"][i].tolist() == example.input_ids + [0] * (width - n)
        assert batch["labels"][i].tolist() == example.labels + [IGNORE_INDEX] * (width - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    assert PaddingCollator(0, pad_to_multiple_of=8)(examples[:1])["input_ids"].shape[1] % 8 == 0
    as_dicts = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples[:3]]
    assert all(torch.equal(batch[k], PaddingCollator(0)(as_dicts)[k]) for k in batch)


def test_packed_collator_pads_with_a_block_of_its_own(examples: list[Example]) -> None:
    rows = [pack(examples[:2], 64)[0], pack(examples[3:4], 64)[0]]
    batch = PackedCollator(pad_token_id=0)(rows)
    assert "attention_mask" not in batch  # its presence would switch off packed-sequence detection
    width = len(rows[0])
    short = len(rows[1])
    assert batch["position_ids"][1].tolist() == list(range(short)) + list(range(width - short))
    assert batch["labels"][1, short:].tolist() == [IGNORE_INDEX] * (width - short)
    flat = PackedCollator(pad_token_id=0, flatten=True)(examples[:3])
    assert flat["input_ids"].shape == (1, sum(len(e) for e in examples[:3]))
    assert flat["position_ids"][0].tolist() == [p for e in examples[:3] for p in range(len(e))]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matrices: one thread is ~100x faster than two that spin against other work on the host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request: pytest.FixtureRequest, plain_tokenizer: Any, one_thread: None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(plain_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model: LlamaForCausalLM = LlamaForCausalLM._from_config(config, attn_implementation=request.param)
    model.eval()
    return model


def logits_alone(model: LlamaForCausalLM, example: Example) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(input_ids=torch.tensor([example.input_ids]), use_cache=False).logits[0]
    return logits


def test_packed_logits_equal_logits_alone(model: LlamaForCausalLM, examples: list[Example]) -> None:
    rows = pack(examples, 40)
    assert len(rows) >= 2 and max(len(r.lengths) for r in rows) >= 2
    batch = PackedCollator(pad_token_id=0)(rows)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    for i, row in enumerate(rows):
        start = 0
        for n in row.lengths:
            example = next(e for e in examples if e.input_ids == row.input_ids[start : start + n])
            torch.testing.assert_close(logits[i, start : start + n], logits_alone(model, example))
            start += n


def test_flattened_batch_logits_equal_logits_alone(model: LlamaForCausalLM, examples: list[Example]) -> None:
    """The padding-free layout: the whole batch as one row (what flash attention needs)."""
    batch = PackedCollator(pad_token_id=0, flatten=True)(examples)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits[0]
    start = 0
    for example in examples:
        torch.testing.assert_close(logits[start : start + len(example)], logits_alone(model, example))
        start += len(example)


def test_packed_loss_sums_the_examples_losses(model: LlamaForCausalLM, examples: list[Example]) -> None:
    """The masked first label of each example: no target is predicted across an example boundary."""
    rows = pack(examples, 40)
    batch = PackedCollator(pad_token_id=0)(rows)
    targets = sum(e.trained_tokens for e in examples)
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == targets
    with torch.no_grad():
        packed = model(**batch, use_cache=False).loss * targets
        alone = sum(
            model(
                input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]), use_cache=False
            ).loss
            * e.trained_tokens
            for e in examples
        )
    torch.testing.assert_close(packed, alone)


def test_isolation_needs_restarted_positions_and_no_cache(
    model: LlamaForCausalLM, examples: list[Example]
) -> None:
    """The controls: the equality above is not a given, and why the trainer runs without a KV cache."""
    row: PackedRow = pack(examples[:2], 64)[0]
    first = next(e for e in examples if e.input_ids == row.input_ids[: row.lengths[0]])
    second = next(e for e in examples if e.input_ids == row.input_ids[row.lengths[0] :])
    batch = PackedCollator(pad_token_id=0)([row])
    n = row.lengths[0]
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], use_cache=False).logits[0]  # positions 0..N-1
        cached = model(**batch, use_cache=True).logits[0]  # a cache switches packed detection off
        isolated = model(**batch, use_cache=False).logits[0]
    alone = logits_alone(model, second)
    torch.testing.assert_close(isolated[n:], alone)
    assert not torch.allclose(plain[n:], alone, atol=1e-3)
    assert not torch.allclose(cached[n:], alone, atol=1e-3)
    torch.testing.assert_close(isolated[:n], logits_alone(model, first))


def loss_and_gradients(
    model: LlamaForCausalLM, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    with torch.enable_grad():
        loss = model(**batch, use_cache=False).loss
        loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def test_padding_free_batch_has_the_padded_batch_loss_and_gradients(
    model: LlamaForCausalLM, examples: list[Example]
) -> None:
    """The default layout without packing: the same examples, one row, no padding, same training signal."""
    padded = PaddingCollator(pad_token_id=0)(examples)
    flat = PackedCollator(pad_token_id=0, flatten=True)(examples)
    assert flat["input_ids"].numel() == int(padded["attention_mask"].sum()) < padded["input_ids"].numel()
    # the same targets: what Trainer counts (labels[..., 1:]) to normalise the loss
    assert int((flat["labels"][:, 1:] != IGNORE_INDEX).sum()) == int(
        (padded["labels"][:, 1:] != IGNORE_INDEX).sum()
    )
    padded_loss, padded_grads = loss_and_gradients(model, padded)
    flat_loss, flat_grads = loss_and_gradients(model, flat)
    torch.testing.assert_close(flat_loss, padded_loss)
    assert padded_grads.keys() == flat_grads.keys() and len(padded_grads) == len(list(model.parameters()))
    for name, grad in padded_grads.items():
        torch.testing.assert_close(flat_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # the row as the train stage sends it, padded to a multiple of 64 with a block of its own
    rounded = PackedCollator(pad_token_id=0, flatten=True, pad_to_multiple_of=64)(examples)
    assert rounded["input_ids"].shape == (1, 64) and flat["input_ids"].shape[1] < 64
    rounded_loss, rounded_grads = loss_and_gradients(model, rounded)
    torch.testing.assert_close(rounded_loss, padded_loss)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(rounded_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # the control: without restarting positions the examples see each other and the gradients move
    _, leaky = loss_and_gradients(
        model, {**flat, "position_ids": torch.arange(flat["input_ids"].shape[1])[None]}
    )
    assert not torch.allclose(
        leaky["model.layers.0.self_attn.q_proj.weight"],
        padded_grads["model.layers.0.self_attn.q_proj.weight"],
        atol=1e-4,
    )
