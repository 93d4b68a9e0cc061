"""train: transformers' Trainer on the prepared examples, reporting progress as it goes."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    EarlyStoppingCallback,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
)

from kubetune import api, contract
from kubetune.trainer import checkpoints, distributed, merging, modeling, resume
from kubetune.trainer.context import RunContext
from kubetune.trainer.data import PackedCollator, PaddingCollator


def training_arguments(
    spec: api.FineTuneJobSpec,
    output_dir: Path,
    *,
    has_validation: bool,
    model: Any = None,
    processes: int | None = None,
) -> TrainingArguments:
    """The spec's training section in transformers' terms (pure: no I/O happens here).

    ``model``, where given, settles what depends on it: gradient checkpointing by its size, Liger
    kernels by its type. ``processes``: how many train together (default: this launch's world size).
    """
    t = spec.training
    dtype = modeling.compute_dtype(t.precision)
    checkpointing = t.resolved_gradient_checkpointing(modeling.base_parameters(model) if model else 0)
    sharded = modeling.sharded(spec, processes)
    liger = modeling.liger_of(t.liger, model) if model is not None else bool(t.liger)
    evaluating = has_validation and t.eval_every is not None
    saving = t.checkpoint_every is not None or (evaluating and t.early_stopping is not None)
    save_steps = t.checkpoint_every or t.eval_every or 500
    if evaluating and t.early_stopping is not None:
        assert t.eval_every is not None
        save_steps = t.eval_every * max(1, round(save_steps / t.eval_every))  # must be a multiple
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a value below 1 is a fraction of all steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs if t.epochs is not None else 1.0,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Under FSDP its own checkpointing, which spares the backward pass a second all-gather.
        activation_checkpointing=checkpointing and not sharded,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing and not sharded else None,
        fsdp=sharded or None,  # type: ignore[arg-type]  # documented as a bool, annotated as str
        fsdp_config=fsdp_config(checkpointing) if sharded else None,
        use_liger_kernel=liger,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=max(1, min(10, (t.max_steps or 100) // 20)),
        eval_strategy="steps" if evaluating else "no",
        eval_steps=t.eval_every if evaluating else None,
        save_strategy="steps" if saving else "no",
        save_steps=save_steps,
        save_total_limit=2 if saving else None,
        load_best_model_at_end=evaluating and t.early_stopping is not None,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        ddp_timeout=int(distributed.collective_timeout(t.collective_timeout_seconds).total_seconds()),
        dataloader_num_workers=0,
    )


def fsdp_config(checkpointing: bool) -> dict[str, Any]:
    """FSDP2 through accelerate: each transformer block (the model's ``_no_split_modules``) one
    unit; the weights read by rank 0 alone and sent to the others as shards (see
    ``modeling.trainable_model``); checkpoints saved as one shard per rank
    (torch.distributed.checkpoint, which reshards on load; see ``resume`` for another number of
    processes)."""
    return {
        "version": 2,
        "reshard_after_forward": True,
        "activation_checkpointing": checkpointing,
        "cpu_ram_efficient_loading": True,
        "state_dict_type": "SHARDED_STATE_DICT",
    }


class CountingCollator:
    """Counts the real (non-padding) tokens that go into training, for tokens per second."""

    def __init__(self, inner: Callable[[Sequence[Any]], dict[str, torch.Tensor]]) -> None:
        self.inner = inner
        self.tokens = 0

    def __call__(self, batch: Sequence[Any]) -> dict[str, torch.Tensor]:
        self.tokens += sum(len(item.input_ids) for item in batch)
        return self.inner(batch)


class ReportProgress(TrainerCallback):
    def __init__(self, ctx: RunContext, counter: CountingCollator) -> None:
        self.ctx = ctx
        self.counter = counter
        self.started = time.monotonic()
        # Every report carries the latest loss, eval loss and learning rate: an eval or final
        # summary log has no training loss of its own, and the status must not go back to none
        # (a NaN loss is kept: alerts look for it).
        self.latest: dict[str, float] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.monotonic()
        self.first_step = state.global_step
        self.counter.tokens = 0

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
    ) -> None:
        logs = logs or {}
        self.latest.update({k: logs[k] for k in ("loss", "eval_loss", "learning_rate") if k in logs})
        elapsed = max(time.monotonic() - self.started, 1e-9)
        done = state.global_step - self.first_step
        remaining = state.max_steps - state.global_step
        self.ctx.reporter.progress(
            api.Progress(
                stage=api.Stage.TRAIN,
                step=state.global_step,
                total_steps=state.max_steps,
                percent=int(100 * state.global_step / max(state.max_steps, 1)),
                epoch=round(state.epoch or 0.0, 3),
                loss=self.latest.get("loss"),
                eval_loss=self.latest.get("eval_loss"),
                learning_rate=self.latest.get("learning_rate"),
                tokens_per_second=round(self.counter.tokens / elapsed, 1),
                eta_seconds=int(elapsed / done * remaining) if done else None,
            )
        )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def planned_steps(trainer: Trainer) -> int:
    args = trainer.args
    if args.max_steps > 0:
        return int(args.max_steps)
    per_epoch = max(len(trainer.get_train_dataloader()) // args.gradient_accumulation_steps, 1)
    return math.ceil(args.num_train_epochs * per_epoch)


# Rows rounded up to a multiple of 64 tokens: a few shapes instead of one per batch, so the CPU's
# bf16 kernels (oneDNN caches one per shape) and the GPU's tensor cores see aligned, repeated sizes.
ROW_MULTIPLE = 64


def batches(ctx: RunContext) -> tuple[Sequence[Any], CountingCollator, str]:
    """The training set, its collator, and the batch layout in words for the log.

    Without packing, each batch keeps its examples and is flattened into one row with
    position_ids restarting per example (no padding) where the model's attention keeps the
    examples apart; padded batches only where it would not.
    """
    assert ctx.data is not None
    pad = ctx.tokenizer.pad_token_id
    if ctx.spec.training.packing:
        # Flash attention isolates the examples of a row only when the batch is a single row.
        flatten = modeling.attention_of(ctx.model) in modeling.FLASH_ATTENTION
        layout = f"packed rows of up to {ctx.spec.training.max_seq_length} tokens"
        collator = PackedCollator(pad, flatten=flatten, pad_to_multiple_of=ROW_MULTIPLE)
        return ctx.data.train_packed or [], CountingCollator(collator), layout
    blocker = modeling.padding_free_blocker(ctx.model)
    if blocker is None:
        layout = (
            "padding-free (each batch flattened into one row, position_ids restarting per example, "
            f"the row rounded up to a multiple of {ROW_MULTIPLE} tokens by a block of its own)"
        )
        collator = PackedCollator(pad, flatten=True, pad_to_multiple_of=ROW_MULTIPLE)
        return ctx.data.train, CountingCollator(collator), layout
    return ctx.data.train, CountingCollator(PaddingCollator(pad)), f"padded: {blocker}"


def run(ctx: RunContext) -> None:
    assert ctx.data is not None
    data, spec = ctx.data, ctx.spec
    processes = distributed.world_size()
    sync = checkpoints.CheckpointSync(ctx) if spec.training.checkpoint_every else None
    checkpoint = sync.restore() if sync is not None else None
    if checkpoint is not None:
        spec, change = resume.spec_for(spec, Path(checkpoint), processes)
        if change:
            ctx.reporter.log(change)
    train_set, counter, layout_words = batches(ctx)
    args = training_arguments(
        spec, ctx.workdir / "trainer", has_validation=bool(data.validation), model=ctx.model
    )
    fsdp: dict[str, Any] = args.fsdp_config if args.fsdp and isinstance(args.fsdp_config, dict) else {}
    checkpointing = bool(args.activation_checkpointing or fsdp.get("activation_checkpointing"))
    sharding = "FSDP2 (weights, gradients and optimizer states sharded)" if fsdp else "DDP"
    ctx.reporter.log(
        f"train: {modeling.precision_of(spec.training.precision).why}; "
        f"attention {modeling.attention_of(ctx.model)}; batches {layout_words}; "
        f"gradient checkpointing {'on' if checkpointing else 'off'}; "
        f"Liger kernels {'on' if args.use_liger_kernel else 'off'}"
        + (f"; {sharding} over {processes} processes" if processes > 1 else "")
    )
    callbacks: list[TrainerCallback] = [ReportProgress(ctx, counter)]
    if args.load_best_model_at_end and spec.training.early_stopping is not None:
        stop = spec.training.early_stopping
        callbacks.append(EarlyStoppingCallback(stop.patience, stop.threshold))
    if sync is not None:
        callbacks.append(sync)
    trainer = resume.ResumingTrainer(
        model=ctx.model,
        args=args,
        train_dataset=train_set,
        eval_dataset=data.validation or None,
        data_collator=counter,
        processing_class=ctx.tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # progress goes through the reporter
    if trainer.is_fsdp_enabled:
        reduce_gradients_in_fp32(trainer)
    runtime = train(trainer, checkpoint, sync)
    # The whole run's log, also the steps before a resume (restored with the checkpoint).
    ctx.history = [
        {"step": float(entry["step"]), **{k: float(v) for k, v in entry.items() if _number(v)}}
        for entry in trainer.state.log_history
    ]
    ctx.trained_tokens = counter.tokens
    ctx.checks["train_runtime_seconds"] = runtime
    ctx.checks["global_step"] = float(trainer.state.global_step)
    target = ctx.staging / (contract.MERGED if spec.method == api.Method.FULL else contract.ADAPTER)
    if trainer.is_fsdp_enabled:
        ctx.model = save_sharded(trainer, ctx, target)
    else:
        ctx.model = trainer.model
        if trainer.is_world_process_zero():
            ctx.model.save_pretrained(target, safe_serialization=True)
    if trainer.is_world_process_zero():
        ctx.tokenizer.save_pretrained(target)
        if spec.method == api.Method.FULL:
            published_in_base_dtype(ctx, target)


def published_in_base_dtype(ctx: RunContext, weights: Path) -> None:
    """Full fine-tuning trains fp32 master weights; the result is published as its base was
    (bf16 for most: half the bytes), unless the base gives no dtype."""
    assert ctx.model_source is not None
    dtype = modeling.load_config(ctx.spec, ctx.model_source).dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype) and dtype != torch.float32:
        merging.cast_shards(weights, dtype)


def train(trainer: Trainer, checkpoint: str | None, sync: checkpoints.CheckpointSync | None) -> float:
    """Train from ``checkpoint`` (or the start), every checkpoint in storage at the end; the
    training seconds of this attempt."""
    if checkpoint is not None and checkpoints.finished(checkpoint, planned_steps(trainer)):
        # Trainer would take one more step from a checkpoint at the very end: load it instead.
        trainer._load_from_checkpoint(checkpoint)
        trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
        return 0.0
    try:
        with checkpoints.save_on_sigterm(trainer):
            runtime = float(
                trainer.train(resume_from_checkpoint=checkpoint).metrics.get("train_runtime", 0.0)
            )
    except checkpoints.Interrupted:
        if sync is not None:
            sync.wait()  # the checkpoint of the stop step, within the grace period
        raise
    if sync is not None:
        sync.wait()  # every checkpoint is in storage before the stages that publish
    return runtime


def reduce_gradients_in_fp32(trainer: Trainer) -> None:
    """accelerate has FSDP2 reduce gradients in the compute dtype; DDP sums them in fp32. Summed
    in bf16 over many ranks, they round at every step of the reduction: fp32 it is, as DDP does
    (twice the bytes of a bf16 reduce-scatter)."""
    plugin = trainer.accelerator.state.fsdp_plugin
    policy = plugin.mixed_precision_policy
    if policy is not None and policy.param_dtype not in (None, torch.float32):
        plugin.mixed_precision_policy = dataclasses.replace(policy, reduce_dtype=torch.float32)


def save_sharded(trainer: Trainer, ctx: RunContext, target: Path) -> Any:
    """Every rank gives its shards; rank 0 writes the full weights (or the adapter alone) in HF
    layout and loads them back for the stages it runs alone: the sharded model needs every rank
    to compute."""
    if ctx.spec.method == api.Method.FULL:
        state = trainer.accelerator.get_state_dict(trainer.model)  # collective; full on rank 0, host memory
    else:
        state = trained_state(trainer.model)
    if not trainer.is_world_process_zero():
        return None
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    unwrapped.save_pretrained(target, state_dict=state, safe_serialization=True)
    del state
    if ctx.spec.method != api.Method.FULL:
        unwrapped_names(target / "adapter_model.safetensors")
    assert ctx.model_source is not None
    return modeling.load_trained(ctx.spec, ctx.model_source, target, ctx.workdir)


def trained_state(model: Any) -> dict[str, torch.Tensor]:
    """The trained parameters (an adapter) gathered whole on rank 0, in host memory; the frozen
    base stays sharded. A collective: every rank calls it."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            whole = param.full_tensor() if isinstance(param, DTensor) else param.detach()
            if distributed.is_main():
                state[name] = whole.cpu()  # as peft finds its layers: inside the checkpoint wrappers
    return state


def unwrapped_names(adapter: Path) -> None:
    """The adapter file with the names of the model, not of FSDP's checkpoint wrappers in it."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter)
    if any(resume.CHECKPOINT_WRAPPER in name for name in tensors):
        renamed = {name.replace(resume.CHECKPOINT_WRAPPER, ""): tensor for name, tensor in tensors.items()}
        save_file(renamed, adapter, metadata={"format": "pt"})
