"""The memory plan: pure arithmetic, checked against the cases the large jobs hinge on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune import api, memory

GIB = 1024**3
CHECKPOINTED = {"batchSize": 1, "maxSeqLength": 2048, "gradientCheckpointing": True}


def spec(name: str = "meta-llama/Llama-3.1-8B", **sections: Any) -> api.FineTuneJobSpec:
    base: dict[str, Any] = {
        "model": {"name": name},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/"},
    }
    return api.FineTuneJobSpec.model_validate(base | sections)


def test_8b_full_fits_on_8_gpus_with_fsdp_and_not_on_one() -> None:
    eight = memory.plan_job(spec(method="full", training=CHECKPOINTED, resources={"gpus": 8}))
    assert eight.strategy == "fsdp" and eight.fits
    one = memory.plan_job(spec(method="full", training=CHECKPOINTED, resources={"gpus": 1}))
    assert one.strategy == "ddp" and not one.fits
    assert one.part("optimizer states") == 8 * one.architecture.parameters  # AdamW, fp32
    assert "resources.gpus: 2 with training.strategy: fsdp" in one.suggestions
    assert "does not fit; would fit with:" in one.verdict()


def test_8b_full_ddp_over_8_gpus_does_not_fit_and_fsdp_is_suggested() -> None:
    ddp = memory.plan_job(
        spec(method="full", training={**CHECKPOINTED, "strategy": "ddp"}, resources={"gpus": 8})
    )
    assert not ddp.fits
    assert ddp.suggestions[0] == "training.strategy: fsdp"


def test_70b_qlora_fits_one_80gi_gpu_and_bf16_lora_does_not() -> None:
    qlora = memory.plan_job(spec("meta-llama/Llama-3.1-70B", method="qlora", training=CHECKPOINTED))
    assert qlora.fits
    # 4.127 bits for 68.5B linear weights, fp32 embeddings and head (k-bit preparation).
    assert 40 * GIB < qlora.part("weights") < 42 * GIB
    lora = memory.plan_job(spec("meta-llama/Llama-3.1-70B", method="lora", training=CHECKPOINTED))
    assert not lora.fits
    assert lora.part("weights") == 2 * lora.architecture.parameters
    assert "method: qlora" in lora.suggestions


def test_smaller_gpus_and_long_batches_get_the_changes_that_fit() -> None:
    job = spec(
        "meta-llama/Llama-3.1-8B",
        training={"batchSize": 16, "maxSeqLength": 4096, "gradientCheckpointing": False},
        resources={"gpus": 1, "gpuMemory": "40Gi"},
    )
    plan = memory.plan_job(job)
    assert not plan.fits and plan.budget == 40 * GIB
    # Neither alone is enough; together they are, and each suggestion is checked by the estimate.
    assert "training.gradientCheckpointing: true" not in plan.suggestions
    assert not any(s.startswith("training.batchSize: ") for s in plan.suggestions)
    (both,) = [s for s in plan.suggestions if s.startswith("training.gradientCheckpointing: true with")]
    batch = int(both.split("training.batchSize: ")[1].split()[0])
    fixed = job.model_copy(
        update={
            "training": job.training.model_copy(update={"batch_size": batch, "gradient_checkpointing": True})
        }
    )
    assert memory.plan_job(fixed).fits


def test_parameter_counts_match_the_published_sizes() -> None:
    expected = {
        "meta-llama/Llama-3.1-8B": 8.03e9, "meta-llama/Llama-3.1-70B": 70.55e9,
        "meta-llama/Llama-3.2-1B": 1.24e9, "meta-llama/Llama-3.2-3B": 3.21e9,
        "mistralai/Mistral-7B-v0.1": 7.24e9, "Qwen/Qwen2.5-7B": 7.62e9, "Qwen/Qwen2.5-14B": 14.77e9,
        "Qwen/Qwen2.5-32B": 32.76e9, "Qwen/Qwen2.5-72B": 72.71e9,
    }  # fmt: skip
    for name, count in expected.items():
        found = memory.family(name)
        assert found is not None, name
        assert found.parameters == pytest.approx(count, rel=5e-3), name
    assert memory.family("meta-llama/Llama-3.1-8B-Instruct") == memory.family("meta-llama/Llama-3.1-8B")


def test_a_local_config_json_is_read_and_a_missing_field_is_named(tmp_path: Path) -> None:
    config = {
        "model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    arch = memory.architecture(spec(model={"uri": str(tmp_path)}))
    assert arch.kv_dim == 32 and arch.source.endswith("config.json")
    del config["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json has no 'hidden_size'"):
        memory.architecture(spec(model={"uri": str(tmp_path)}))


def test_an_unknown_hub_model_asks_for_its_config() -> None:
    with pytest.raises(ValueError, match=r"spec\.model: no architecture for someone/model.*--config"):
        memory.plan_job(spec("someone/model"))


def test_strategy_auto_is_fsdp_only_for_full_fine_tuning_on_several_processes() -> None:
    assert memory.resolve_strategy(spec(method="full", resources={"gpus": 4})) == "fsdp"
    assert memory.resolve_strategy(spec(method="full", resources={"gpus": 1, "nodes": 2})) == "fsdp"
    assert memory.resolve_strategy(spec(method="full", resources={"gpus": 1})) == "ddp"
    assert memory.resolve_strategy(spec(method="lora", resources={"gpus": 8})) == "ddp"
    assert memory.resolve_strategy(spec(method="lora", training={"strategy": "fsdp"})) == "fsdp"


def test_gradient_checkpointing_and_smaller_batches_shrink_activations_only() -> None:
    off = {"batchSize": 4, "maxSeqLength": 2048, "gradientCheckpointing": False}
    plain = memory.plan_job(spec(training=off))
    checkpointed = memory.plan_job(
        spec(training={"batchSize": 4, "maxSeqLength": 2048, "gradientCheckpointing": True})
    )
    assert checkpointed.part("activations") < plain.part("activations") / 5
    assert checkpointed.part("weights") == plain.part("weights")
    half = memory.plan_job(spec(training=off | {"batchSize": 2}))
    assert half.part("activations") == plain.part("activations") // 2
    # Unset, gradient checkpointing is on from 1B parameters, as the trainer resolves it.
    assert memory.plan_job(spec(training=off | {"gradientCheckpointing": None})).part(
        "activations"
    ) == checkpointed.part("activations")


def test_quantities() -> None:
    assert memory.parse_quantity("80Gi") == 80 * GIB
    assert memory.parse_quantity("40G") == 40 * 10**9
    assert memory.parse_quantity("1.5Ti") == int(1.5 * 2**40)
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        memory.parse_quantity("80 GB")


def test_the_tiny_preset_plans_on_the_cpu_without_a_budget() -> None:
    plan = memory.plan_job(spec("kubetune/tiny-llama", resources={"gpus": 0}))
    assert not plan.on_gpu and plan.fits
    assert all(p.name != "runtime" for p in plan.parts)


def test_fused_cross_entropy_replaces_the_fp32_logits_where_liger_runs() -> None:
    tokens = {"batchSize": 2, "maxSeqLength": 2048}
    fused = memory.plan_job(spec(training=tokens | {"liger": True})).part("logits and loss")
    plain = memory.plan_job(spec(training=tokens)).part("logits and loss")  # liger is off by default
    assert plain == 2 * 2048 * 128256 * 12  # bf16 logits, the fp32 copy, log-softmax and its gradient
    assert fused < plain / 10
