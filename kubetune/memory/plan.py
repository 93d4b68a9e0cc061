"""The estimate: each part of one GPU's memory during the training step and the later stages,
and the changes to the spec that would make a plan fit."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from kubetune import api
from kubetune.memory.architecture import Architecture, architecture
from kubetune.memory.quantities import GIB, gib, parse_quantity

DEFAULT_GPU_MEMORY = "80Gi"
CUDA_OVERHEAD = 1 * GIB  # CUDA context, cuBLAS workspaces, allocator slack
# 4-bit codes; an 8-bit absmax per 64 weights and an fp32 constant per 256 blocks (double quantization).
NF4_DOUBLE_QUANT_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8
NF4_BYTES = (4 + 32 / 64) / 8  # fp32 absmax per 64
INT8_BYTES = 1 + 4 / 4096  # int8 codes and a row statistic (LLM.int8)

Strategy = Literal["ddp", "fsdp"]


def processes(spec: api.FineTuneJobSpec) -> int:
    return max(spec.resources.gpus, 1) * spec.resources.nodes


def resolve_strategy(spec: api.FineTuneJobSpec) -> Strategy:
    return spec.resolved_strategy(processes(spec))


def adapter_parameters(arch: Architecture, lora: api.Lora) -> int:
    """LoRA parameters: r * (in + out) for every adapted linear layer of every block."""
    linears = arch.block_linears()
    targets = lora.target_modules
    chosen = [
        shape for name, shape in linears.items()
        if targets == ["all-linear"] or name.split(".")[-1] in targets or name in targets
    ]  # fmt: skip
    return arch.num_layers * sum(lora.r * (a + b) for a, b in chosen)


def sharded(shapes: Iterator[tuple[str, tuple[int, ...]]], ranks: int) -> int:
    """Elements the first rank holds when each tensor's dimension 0 is cut in ``ranks`` (FSDP2)."""
    total = 0
    for _, shape in shapes:
        rest = math.prod(shape[1:])
        total += math.ceil(shape[0] / ranks) * rest
    return total


@dataclass(frozen=True)
class Part:
    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class Plan:
    """Per-GPU memory of a FineTuneJob: the training step's parts and the later stages' peaks."""

    model: str
    architecture: Architecture
    method: str
    strategy: Strategy
    processes: int
    on_gpu: bool
    budget: int  # bytes of one GPU (spec.resources.gpuMemory), or of the pod on the CPU
    parts: tuple[Part, ...]
    stages: tuple[Part, ...]
    suggestions: tuple[str, ...] = ()

    @property
    def training(self) -> int:
        return sum(p.bytes for p in self.parts)

    @property
    def peak(self) -> int:
        return max([self.training, *(s.bytes for s in self.stages)])

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def part(self, name: str) -> int:
        return next(p.bytes for p in self.parts if p.name == name)

    def verdict(self) -> str:
        where = f"{self.processes} process(es), {self.strategy}"
        unit = "GPU" if self.on_gpu else "process (CPU)"
        head = (
            f"{self.model} {self.method}: {gib(self.peak)} per {unit} of {gib(self.budget)} "
            f"({where}): {'fits' if self.fits else 'does not fit'}"
        )
        if self.fits or not self.suggestions:
            return head
        return f"{head}; would fit with: {'; '.join(self.suggestions)}"

    def table(self) -> str:
        arch = self.architecture
        lines = [
            f"model      {self.model}: {arch.parameters / 1e9:.2f}B parameters "
            f"({arch.num_layers} layers, hidden {arch.hidden_size}, vocabulary {arch.vocab_size}; "
            f"from {arch.source})",
            f"method     {self.method}, strategy {self.strategy}, {self.processes} process(es)",
            "training step, per " + ("GPU" if self.on_gpu else "process"),
        ]
        lines += [f"  {p.name:<26}{gib(p.bytes):>12}  {p.note}".rstrip() for p in self.parts]
        lines.append(f"  {'total':<26}{gib(self.training):>12}")
        for stage in self.stages:
            lines.append(f"{stage.name:<28}{gib(stage.bytes):>12}  {stage.note}".rstrip())
        lines.append(self.verdict())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "parameters": self.architecture.parameters,
            "method": self.method,
            "strategy": self.strategy,
            "processes": self.processes,
            "budget_bytes": self.budget,
            "parts": {p.name: p.bytes for p in self.parts},
            "training_bytes": self.training,
            "stages": {s.name: s.bytes for s in self.stages},
            "peak_bytes": self.peak,
            "fits": self.fits,
            "suggestions": list(self.suggestions),
        }


def estimate(
    spec: api.FineTuneJobSpec, arch: Architecture, *, model: str | None = None, suggest: bool = True
) -> Plan:
    """The memory plan of ``spec`` on ``arch`` (pure)."""
    t = spec.training
    on_gpu = spec.resources.gpus > 0
    # The trainer computes in bf16/fp16 on GPUs unless fp32 is asked for, always fp32 on the CPU.
    c = 2 if on_gpu and t.precision != "fp32" else 4
    n = processes(spec)
    strategy = resolve_strategy(spec)
    ranks = n if strategy == "fsdp" else 1
    method = api.Method(spec.method)
    total = arch.parameters
    shards = sharded(arch.shapes(), ranks)  # elements of every parameter on one rank
    block = arch.block_parameters
    parts: list[Part] = []
    lora_params = 0
    if method == api.Method.FULL:
        parts += [
            Part("weights", 4 * shards, "fp32 master copy" + (f", 1/{ranks} each" if ranks > 1 else "")),
            Part("gradients", 4 * shards, "fp32"),
            Part("optimizer states", 8 * shards, "AdamW: two fp32 moments"),
        ]
        if ranks > 1:
            # The block being computed and the next one (prefetch), and one block's full gradient.
            parts.append(Part("gathered blocks", 2 * c * block + 4 * block, "unsharded for compute"))
        elif c == 2:
            parts.append(Part("16-bit weight copies", 2 * total, "autocast's casts, kept for backward"))
    else:
        lora_params = adapter_parameters(arch, spec.lora)
        if method == api.Method.QLORA:
            quant = spec.resolved_quantization() or api.Quantization()
            per = (
                INT8_BYTES if quant.bits == 8 else NF4_DOUBLE_QUANT_BYTES if quant.double_quant else NF4_BYTES
            )
            linear = arch.linear_parameters
            base = int(per * linear / ranks) + 4 * (shards - linear // ranks)
            note = f"{quant.bits}-bit linear layers, the rest fp32 (k-bit preparation)"
        else:
            base = c * shards
            note = "frozen, " + ("bf16/fp16" if c == 2 else "fp32")
        if ranks > 1:
            note += f", 1/{ranks} each; one block gathered"
            base += 2 * c * block
        parts += [
            Part("weights", base, note),
            Part(
                "adapter",
                16 * lora_params // ranks,
                f"{lora_params / 1e6:,.1f}M fp32 params, gradients, AdamW",
            ),
        ]
        extra = [m for m in spec.lora.modules_to_save if m in ("embed_tokens", "lm_head")]
        if extra:
            full = len(extra) * arch.vocab_size * arch.hidden_size
            parts.append(Part("modules to save", 16 * full // ranks, ", ".join(extra) + " trained in full"))
    parts += _activations(
        spec, arch, c=c, residual=4 if method == api.Method.FULL else c, lora=lora_params > 0
    )
    if on_gpu:
        parts.append(Part("runtime", CUDA_OVERHEAD, "CUDA context, workspaces"))
    stages = _stages(spec, arch, c=c, ranks=ranks)
    budget = parse_quantity(spec.resources.gpu_memory) if on_gpu else _cpu_budget(spec)
    plan = Plan(
        model=model or spec.model.name or spec.model.uri or "model",
        architecture=arch,
        method=method.value,
        strategy=strategy,
        processes=n,
        on_gpu=on_gpu,
        budget=budget,
        parts=tuple(parts),
        stages=tuple(stages),
    )
    if suggest and not plan.fits:
        plan = replace(plan, suggestions=tuple(_suggestions(spec, arch, plan)))
    return plan


def _activations(
    spec: api.FineTuneJobSpec, arch: Architecture, *, c: int, residual: int, lora: bool
) -> list[Part]:
    t = spec.training
    tokens = t.batch_size * t.max_seq_length
    checkpointing = t.resolved_gradient_checkpointing(arch.parameters)
    h, i, kv = arch.hidden_size, arch.intermediate_size, arch.kv_dim
    q = arch.num_heads * arch.head_dim
    # Saved for backward in one decoder layer, per token: both norms' inputs and fp32 internals,
    # the norm outputs, q/k/v and their rotated copies, the attention output, and the MLP's
    # gate, up, activation and product.
    layer = 2 * h * residual + 2 * h * 4 + 2 * h * c + (2 * q + 3 * kv) * c + q * c + 4 * i * c
    if lora and spec.lora.dropout > 0:
        # peft applies dropout to each adapted layer's input: one copy and a mask per layer.
        linears = arch.block_linears()
        adapted = [a for name, (a, _) in linears.items() if spec.lora.target_modules == ["all-linear"]
                   or name.split(".")[-1] in spec.lora.target_modules]  # fmt: skip
        layer += sum(a * (c + 1) for a in adapted)
    if checkpointing:
        # Each layer's input; one layer recomputed at a time, and its gradients.
        kept = arch.num_layers * h * residual + 2 * layer
        note = f"gradient checkpointing, {t.batch_size} x {t.max_seq_length} tokens"
    else:
        kept = arch.num_layers * layer + layer
        note = f"{t.batch_size} x {t.max_seq_length} tokens, no checkpointing"
    # Liger's fused linear cross-entropy never materializes the logits: it works through chunks
    # of tokens, sized so that a chunk's logits are about the hidden states'.
    if t.liger:
        chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(arch.vocab_size / h)))))
        loss = Part(
            "logits and loss", tokens * h * 4 + chunk * arch.vocab_size * 8, "liger fused cross-entropy"
        )
    else:
        # Logits in the compute dtype, upcast to fp32 for the loss, log-softmax and its gradient.
        loss = Part("logits and loss", tokens * arch.vocab_size * max(c + 8, 12), "fp32 logits for the loss")
    return [Part("activations", tokens * kept, note), loss]


def _stages(spec: api.FineTuneJobSpec, arch: Architecture, *, c: int, ranks: int) -> list[Part]:
    out: list[Part] = []
    largest_tensor = arch.vocab_size * arch.hidden_size
    if spec.method == api.Method.QLORA and ranks > 1:
        # transformers quantizes as it loads, on every rank: FSDP shards the 4-bit base after.
        linear = arch.linear_parameters
        whole = int(NF4_DOUBLE_QUANT_BYTES * linear) + c * (arch.parameters - linear)
        out.append(Part("load", whole, "the whole 4-bit base on every GPU, before FSDP shards it"))
    if spec.method != api.Method.FULL and spec.export.merge:
        # Shard by shard on the host, no GPU; the largest tensor in fp32 (read, delta, result).
        widest = max(a * b for a, b in arch.block_linears().values())
        host = 3 * 4 * widest + 4 * adapter_parameters(arch, spec.lora)
        out.append(
            Part("merge", 0, f"on the CPU, shard by shard: one shard plus about {gib(host)} of host memory")
        )
    for name in spec.export.formats:
        traits = api.EXPORTS[name]
        if traits.family is not api.ExportFamily.BNB:
            # GGUF: written and quantized on the CPU; its check loads the merged model on the GPU
            # as the evaluation does (placed, offloaded where it does not fit).
            continue
        per = INT8_BYTES if traits.bits == 8 else NF4_DOUBLE_QUANT_BYTES
        weights = int(per * arch.linear_parameters) + c * (arch.parameters - arch.linear_parameters)
        out.append(
            Part(f"quantize {name}", weights + c * largest_tensor, "quantized as loaded, tensor by tensor")
        )
    return out


def _cpu_budget(spec: api.FineTuneJobSpec) -> int:
    if spec.resources.memory is not None:
        return parse_quantity(spec.resources.memory) // max(spec.resources.nodes, 1)
    return 2**62  # no limit set: nothing to compare with


def _suggestions(spec: api.FineTuneJobSpec, arch: Architecture, plan: Plan) -> list[str]:
    """Changes to the spec that make it fit, each checked by the same estimate."""

    def fits(**changes: Any) -> bool:
        data = spec.model_dump()
        for path, value in changes.items():
            node = data
            *parents, last = path.split("__")
            for key in parents:
                node = node[key]
            node[last] = value
        candidate = api.FineTuneJobSpec.model_validate(data)
        return estimate(candidate, arch, suggest=False).fits

    out = []
    t, r = spec.training, spec.resources
    if plan.strategy == "ddp" and processes(spec) > 1 and fits(training__strategy="fsdp"):
        out.append("training.strategy: fsdp")
    if spec.resources.gpus > 0 and not out:
        for gpus in (2, 4, 8):
            if gpus > r.gpus and fits(resources__gpus=gpus, training__strategy="fsdp"):
                out.append(f"resources.gpus: {gpus} with training.strategy: fsdp")
                break
        else:
            for nodes in (2, 4, 8, 16):
                if nodes > r.nodes and fits(
                    resources__gpus=8, resources__nodes=nodes, training__strategy="fsdp"
                ):
                    out.append(f"resources.nodes: {nodes} of 8 GPUs with training.strategy: fsdp")
                    break
    if spec.method != api.Method.QLORA and fits(method="qlora", quantization=None):
        out.append("method: qlora")
    checkpointing = t.resolved_gradient_checkpointing(arch.parameters)
    if not checkpointing and fits(training__gradient_checkpointing=True):
        out.append("training.gradientCheckpointing: true")
    if not t.liger and spec.resources.gpus > 0 and fits(training__liger=True):
        out.append("training.liger: true")
    keep = "raise gradientAccumulation to keep the effective batch"
    batch = _largest_batch(t.batch_size, lambda b: fits(training__batch_size=b))
    if batch:
        out.append(f"training.batchSize: {batch} ({keep})")
    elif not checkpointing:
        batch = _largest_batch(
            t.batch_size, lambda b: fits(training__batch_size=b, training__gradient_checkpointing=True)
        )
        if batch:
            out.append(f"training.gradientCheckpointing: true with training.batchSize: {batch} ({keep})")
    if not out:
        out.append("nothing tried fits: a shorter training.maxSeqLength, or GPUs with more memory")
    return out


def _largest_batch(batch: int, fits: Callable[[int], bool]) -> int | None:
    """The largest power-of-two fraction of ``batch`` below it that fits, if any."""
    batch //= 2
    while batch >= 1 and not fits(batch):
        batch //= 2
    return batch or None


def plan_job(
    spec: api.FineTuneJobSpec, *, config_path: Path | None = None, store: Any = None, model: str | None = None
) -> Plan:
    return estimate(spec, architecture(spec, config_path=config_path, store=store), model=model)
