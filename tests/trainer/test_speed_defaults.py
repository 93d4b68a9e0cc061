"""Fast by default: precision, attention, Liger kernels and checkpointing are chosen per hardware and
model, refused clearly where they cannot run; batches are padding-free unless packing is asked for."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

from kubetune import api
from kubetune.trainer import modeling
from kubetune.trainer.data import PackedCollator, PackedRow, PaddingCollator
from kubetune.trainer.pipeline import execute
from kubetune.trainer.stages import train as train_stage
from kubetune.validation import InvalidJob

from .conftest import tiny_job

ZEN4 = frozenset({"fpu", "sse2", "avx2", "avx512f", "avx512_bf16", "avx512_vnni"})
SAPPHIRE_RAPIDS = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"})
ICE_LAKE = frozenset({"avx2", "avx512f", "avx512_vnni"})  # AVX512 without bf16
ZEN3 = frozenset({"avx2", "fma"})


# ----------------------------------------------------------------------------- precision (pure)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (ZEN4, torch.bfloat16),
        (SAPPHIRE_RAPIDS, torch.bfloat16),
        (ICE_LAKE, torch.float32),
        (ZEN3, torch.float32),
    ],
)
def test_auto_on_the_cpu_is_bf16_only_with_native_bf16(flags: frozenset[str], expected: torch.dtype) -> None:
    chosen = modeling.choose_precision("auto", cuda=False, cuda_bf16=False, flags=flags)
    assert chosen.dtype == expected
    assert ("bf16 autocast" in chosen.why) == (expected == torch.bfloat16)


def test_bf16_is_honoured_on_every_cpu_and_says_when_it_is_emulated() -> None:
    native = modeling.choose_precision("bf16", cuda=False, cuda_bf16=False, flags=ZEN4)
    emulated = modeling.choose_precision("bf16", cuda=False, cuda_bf16=False, flags=ZEN3)
    assert native.dtype == emulated.dtype == torch.bfloat16
    assert "native: avx512_bf16" in native.why
    assert "emulated" in emulated.why and "slower" in emulated.why


def test_fp16_on_the_cpu_and_bf16_on_an_old_gpu_are_refused_naming_the_field() -> None:
    with pytest.raises(InvalidJob, match=r"spec.training.precision: fp16 needs a GPU"):
        modeling.choose_precision("fp16", cuda=False, cuda_bf16=False, flags=SAPPHIRE_RAPIDS)
    with pytest.raises(InvalidJob, match=r"spec.training.precision: bf16, but this GPU has no bf16"):
        modeling.choose_precision("bf16", cuda=True, cuda_bf16=False, flags=frozenset())


def test_gpu_precision() -> None:
    def on_gpu(precision: str, bf16: bool) -> torch.dtype:
        return modeling.choose_precision(precision, cuda=True, cuda_bf16=bf16, flags=frozenset()).dtype

    assert on_gpu("auto", True) == torch.bfloat16
    assert on_gpu("auto", False) == torch.float32
    assert on_gpu("fp16", False) == torch.float16
    assert on_gpu("fp32", True) == torch.float32


def test_cpu_flags_reads_the_flags_line() -> None:
    cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16\nbugs\t\t: none\n"
    assert modeling.cpu_flags(cpuinfo) == {"fpu", "avx512f", "avx512_bf16"}
    assert modeling.cpu_flags("processor\t: 0\n") == frozenset()


@pytest.mark.parametrize(
    ("override", "flags", "native"),
    [
        ("", SAPPHIRE_RAPIDS, True),
        ("auto", ZEN3, False),
        ("native", ZEN3, True),
        ("none", SAPPHIRE_RAPIDS, False),
        ("none", ZEN4, False),
    ],
)
def test_the_cpu_bf16_switch_overrides_the_detection(
    override: str, flags: frozenset[str], native: bool
) -> None:
    chosen = modeling.with_cpu_bf16_override(flags, override)
    assert bool(chosen & modeling.NATIVE_BF16_CPU_FLAGS) == native
    assert chosen - modeling.NATIVE_BF16_CPU_FLAGS == flags - modeling.NATIVE_BF16_CPU_FLAGS


def test_a_bad_cpu_bf16_switch_is_refused_naming_the_variable() -> None:
    with pytest.raises(ValueError, match=r"KUBETUNE_CPU_BF16 must be auto, native or none, not 'yes'"):
        modeling.with_cpu_bf16_override(ZEN4, "yes")


# ------------------------------------------------------------------------ attention, Liger, checkpointing


def test_attention_auto_takes_flash_attention_where_it_is_installed_on_a_gpu() -> None:
    installed = {"flash_attention_2": True, "flash_attention_3": False}
    assert modeling.choose_attention("auto", cuda=True, flash_installed=installed) == "flash_attention_2"
    assert modeling.choose_attention("auto", cuda=True, flash_installed={}) is None  # the model's default
    assert modeling.choose_attention("auto", cuda=False, flash_installed=installed) is None
    assert modeling.choose_attention("eager", cuda=False, flash_installed={}) == "eager"
    with pytest.raises(InvalidJob, match=r"spec.training.attention: flash_attention_2 needs a CUDA GPU"):
        modeling.choose_attention("flash_attention_2", cuda=False, flash_installed=installed)
    with pytest.raises(InvalidJob, match=r"spec.training.attention: flash_attention_3: flash-attn-3 is not"):
        modeling.choose_attention("flash_attention_3", cuda=True, flash_installed=installed)


def test_liger_is_off_unless_asked_and_refused_where_its_kernels_cannot_run() -> None:
    def liger(requested: bool, **where: Any) -> bool:
        settings: dict[str, Any] = {"cuda": True, "installed": True, "model_type": "llama"}
        settings.update(where)
        return modeling.choose_liger(requested, supported=frozenset({"llama", "qwen2"}), **settings)

    assert api.Training().liger is False
    assert liger(False) is False
    assert liger(False, cuda=False) is False
    assert liger(True) is True
    with pytest.raises(InvalidJob, match=r"spec.training.liger: needs a CUDA GPU"):
        liger(True, cuda=False)
    with pytest.raises(InvalidJob, match=r"spec.training.liger: liger-kernel is not installed"):
        liger(True, installed=False)
    with pytest.raises(
        InvalidJob, match=r"spec.training.liger: liger-kernel has no kernels for model type 'mamba'"
    ):
        liger(True, model_type="mamba")


def test_gradient_checkpointing_by_model_size_unless_set() -> None:
    unset = api.Training()
    assert unset.gradient_checkpointing is None
    assert not unset.resolved_gradient_checkpointing(999_999_999)
    assert unset.resolved_gradient_checkpointing(1_000_000_000)
    assert not api.Training(gradient_checkpointing=False).resolved_gradient_checkpointing(70_000_000_000)
    assert api.Training(gradient_checkpointing=True).resolved_gradient_checkpointing(3_000_000)


def llama(attention: str = "sdpa", **config: Any) -> LlamaForCausalLM:
    settings: dict[str, Any] = {
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    settings.update(config)
    model: LlamaForCausalLM = LlamaForCausalLM._from_config(
        LlamaConfig(**settings), attn_implementation=attention
    )
    return model


def test_training_arguments_follow_the_model() -> None:
    """Checkpointing by the model's base parameters (adapters left out), Liger refused on the CPU."""
    spec = tiny_job().spec
    small = llama()
    args = train_stage.training_arguments(spec, Path("unused"), has_validation=False, model=small)
    assert not args.activation_checkpointing and not args.use_liger_kernel
    assert modeling.base_parameters(small) == sum(p.numel() for p in small.parameters())
    with torch.device("meta"):  # 1.07B parameters, no memory
        big = llama(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16)
    assert modeling.base_parameters(big) >= api.CHECKPOINTING_FROM_PARAMETERS
    args = train_stage.training_arguments(spec, Path("unused"), has_validation=False, model=big)
    assert args.activation_checkpointing and args.activation_checkpointing_kwargs == {"use_reentrant": False}
    liger = spec.model_copy(update={"training": spec.training.model_copy(update={"liger": True})})
    if not torch.cuda.is_available():
        with pytest.raises(InvalidJob, match=r"spec.training.liger: needs a CUDA GPU"):
            train_stage.training_arguments(liger, Path("unused"), has_validation=False, model=small)


def test_liger_kernels_patch_the_tiny_llama() -> None:
    """The wiring Trainer(use_liger_kernel=True) uses: liger-kernel imports without a GPU and
    patches a Llama in place (running the Triton kernels needs a GPU). In a process of its own:
    liger also patches transformers' Llama module, which would send later tests to Triton."""
    code = textwrap.dedent(
        """
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        model = LlamaForCausalLM(config)
        assert model.forward.__name__ == "forward"
        assert model.model.norm.forward.__qualname__ == "LlamaRMSNorm.forward"
        _apply_liger_kernel_to_instance(model=model)
        assert model.forward.__name__ == "lce_forward", model.forward.__name__
        assert model.model.norm.forward.__qualname__ == "LigerRMSNorm.forward"
        assert model.model.layers[0].mlp.forward.__qualname__ == "LigerSwiGLUMLP.forward"
        """
    )
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------- which attention isolates


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_masking_attention_keeps_flattened_examples_apart(attention: str) -> None:
    assert modeling.padding_free_blocker(llama(attention)) is None


def test_recurrent_models_are_padded() -> None:
    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1))
    blocker = modeling.padding_free_blocker(mamba)
    assert blocker is not None and "MambaForCausalLM" in blocker


def test_attention_outside_the_known_list_is_padded() -> None:
    model = llama()
    model.config._attn_implementation = "paged|sdpa"
    assert "not known to keep flattened examples apart" in (modeling.padding_free_blocker(model) or "")


# ----------------------------------------------------------------------------- the train stage


class Recorder:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def stage_started(self, stage: Any) -> None:
        pass

    def stage_finished(self, stage: Any, seconds: float) -> None:
        pass

    def progress(self, progress: Any) -> None:
        pass

    def results(self, results: Any) -> None:
        pass

    def artifacts(self, artifacts: Any) -> None:
        pass

    def log(self, message: str) -> None:
        self.lines.append(message)


def no_evaluation(**training: Any) -> dict[str, Any]:
    t: dict[str, Any] = {"maxSteps": 12, "learningRate": 0.003, "batchSize": 8, "maxSeqLength": 32}
    t.update(training)
    return {"training": t, "evaluation": {"metrics": ["loss"], "baseline": False}}


def batches_of(ctx: Any) -> tuple[list[Any], Any, str]:
    train_set, counter, layout = train_stage.batches(ctx)
    return list(train_set), counter.inner, layout


@pytest.mark.training
def test_unpacked_batches_are_padding_free_and_packing_changes_composition(tmp_path: Path) -> None:
    recorder = Recorder()
    ctx = execute(
        tiny_job(**no_evaluation()), recorder, workdir=tmp_path / "a", output=str(tmp_path / "a-out")
    )
    assert ctx.data is not None
    train_set, collator, layout = batches_of(ctx)
    assert train_set == ctx.data.train  # the same examples, one per item
    assert isinstance(collator, PackedCollator) and collator.flatten
    assert layout.startswith("padding-free")
    assert any(line.startswith("train: ") and "batches padding-free" in line for line in recorder.lines)
    batch = collator(train_set[:8])
    tokens = sum(len(e) for e in train_set[:8])
    width = -(-tokens // train_stage.ROW_MULTIPLE) * train_stage.ROW_MULTIPLE
    assert batch["input_ids"].shape == (1, width)  # one row, only rounded up to the multiple
    assert (batch["labels"][0, tokens:] == -100).all()  # the rounding trains on nothing
    assert batch["position_ids"][0, tokens:].tolist() == list(range(width - tokens))  # a block of its own
    assert "attention_mask" not in batch

    packed = execute(
        tiny_job(**no_evaluation(packing=True, maxSeqLength=64)),
        Recorder(),
        workdir=tmp_path / "b",
        output=str(tmp_path / "b-out"),
    )
    rows, packed_collator, layout = batches_of(packed)
    assert all(isinstance(r, PackedRow) for r in rows) and len(rows) < len(train_set)
    assert max(len(r.lengths) for r in rows) > 1  # a batch of 8 rows holds more than 8 examples
    assert isinstance(packed_collator, PackedCollator) and not packed_collator.flatten
    assert layout.startswith("packed rows")


@pytest.mark.training
def test_a_model_that_cannot_isolate_is_trained_padded_and_the_log_says_why(tmp_path: Path) -> None:
    recorder = Recorder()
    ctx = execute(tiny_job(**no_evaluation()), recorder, workdir=tmp_path / "w", output=str(tmp_path / "out"))
    ctx.model.config._attn_implementation = "paged|sdpa"
    _, collator, layout = batches_of(ctx)
    assert isinstance(collator, PaddingCollator)
    assert (
        layout
        == "padded: attention implementation 'paged|sdpa' is not known to keep flattened examples apart"
    )


@pytest.mark.training
@pytest.mark.parametrize(("switch", "dtype"), [("none", torch.float32), ("native", torch.bfloat16)])
def test_auto_trains_on_either_cpu_path_as_the_switch_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, switch: str, dtype: torch.dtype
) -> None:
    """Both CPU paths of ``precision: auto`` on every CPU: the frozen base in the chosen dtype, the
    log naming it, and the loss finite (bf16 is emulated where the CPU lacks it, hence 3 steps)."""
    monkeypatch.setenv(modeling.CPU_BF16_VARIABLE, switch)
    recorder = Recorder()
    ctx = execute(
        tiny_job(**no_evaluation(precision="auto", maxSteps=3)),
        recorder,
        workdir=tmp_path / "work",
        output=str(tmp_path / "out"),
    )
    assert {p.dtype for n, p in ctx.model.named_parameters() if "lora_" not in n} == {dtype}
    said = "bf16 autocast on the CPU" if dtype == torch.bfloat16 else "train: fp32"
    assert any(said in line for line in recorder.lines), recorder.lines
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in ctx.history if "loss" in h)


@pytest.mark.training
@pytest.mark.skipif(
    not modeling.cpu_flags() & modeling.NATIVE_BF16_CPU_FLAGS,
    reason="this CPU emulates bf16 matmuls (no AMX-BF16/AVX512-BF16): the two 30-step runs took 13.6 "
    "minutes on a 2-core AMD EPYC, too long for the suite; the precision choice is tested above",
)
def test_bf16_on_the_cpu_trains_to_the_fp32_loss(tmp_path: Path) -> None:
    """bf16 autocast with a bf16 frozen base (LoRA) against fp32: the same run, the same losses
    within 2%, the base really in bf16 and the log saying so."""
    runs: dict[str, Any] = {}
    logs: dict[str, list[str]] = {}
    for precision in ("fp32", "bf16"):
        recorder = Recorder()
        spec = no_evaluation(precision=precision, maxSteps=30)
        spec["evaluation"] = {"metrics": ["loss"], "baseline": True}
        runs[precision] = execute(
            tiny_job(**spec),
            recorder,
            workdir=tmp_path / precision,
            output=str(tmp_path / f"{precision}-out"),
        )
        logs[precision] = recorder.lines
    fp32, bf16 = runs["fp32"], runs["bf16"]
    base = {p.dtype for n, p in bf16.model.named_parameters() if "lora_" not in n}
    assert base == {torch.bfloat16}
    assert {p.dtype for n, p in bf16.model.named_parameters() if "lora_" in n} == {torch.float32}
    assert any("bf16 autocast on the CPU" in line for line in logs["bf16"])
    assert any(line.startswith("train: fp32") for line in logs["fp32"])
    assert fp32.after["loss"] < fp32.before["loss"] - 0.5  # it learnt: the comparison means something
    assert bf16.after["loss"] == pytest.approx(fp32.after["loss"], rel=0.02)
    train_loss = {k: [h["loss"] for h in v.history if "loss" in h] for k, v in runs.items()}
    assert train_loss["bf16"] == pytest.approx(train_loss["fp32"], rel=0.02)
