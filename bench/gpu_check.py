"""The GPU check for real-size and sharded training: an 8B Llama through `kubetune run`, LoRA and QLoRA
on one GPU, and a 2-process FSDP full fine-tune of a 1B Llama where two GPUs are visible.

    python3 -P bench/gpu_check.py                       # on a GPU machine: real shapes, ~9 minutes at most
    .venv/bin/python -P bench/gpu_check.py --shape tiny # the same flow on a tiny Llama, on the CPU

Nothing is downloaded (the GPU machine has no network): every model is a Llama built from its config
with random weights in bf16, created on the GPU where there is one and saved as safetensors in a local
folder with the built-in preset's byte-level BPE tokenizer (a few hundred ids, all inside every
config's vocabulary). The data is generated (``trainer_vs_recipe.make_rows``, the chain task:
log-normal row lengths, median 440 tokens, at most 1,024 on a GPU) or, with ``--data builtin:dates``,
the bundled dates.

Steps, each in its own subprocess with its own timeout, all under one deadline (``--budget``):

    build     Llama-3.1-8B's shape (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads,
              vocabulary 128,256, rope theta 500,000 with Llama 3.1's rope scaling), in 5 GB shards as
              the published checkpoint is
    lora      `kubetune run JOB --output DIR`: method lora, the defaults (padding-free batches, batch 8,
              maxSeqLength 1024, gradient checkpointing on from 1B, LoRA r16 on all linear layers),
              baseline and evaluation on (generation cut to 16 rows x 16 tokens), export.merge true
    qlora     the same with method qlora (NF4, double quantization); export.merge false unless
              --qlora-merge (a second 16 GB merge and publish would not fit the 9 minutes)
    fsdp      with 2+ GPUs: Llama-3.2-1B's shape (tied embeddings; --fsdp-untied unties them), method
              full, strategy fsdp, `kubetune run JOB --nproc-per-node 2`, every stage (baseline,
              train, evaluate, push). On the CPU (--shape tiny): two gloo processes, with the test
              suite's shim tests/trainer/fsdp_on_cpu on their PYTHONPATH (accelerate runs FSDP only
              on GPU process groups)

With several GPUs the single-GPU runs see only the first (CUDA_VISIBLE_DEVICES): `kubetune run`
without --nproc-per-node would otherwise get transformers' DataParallel over all of them. Each run
writes to a scratch folder (--workdir; the base, the staged and the published merged weights of the
8B LoRA run take ~48 GB at once; a step is skipped when the disk has too little free), and the
published merged weights are deleted once their size is recorded.

Recorded for each run, against `kubetune plan JOB` (its printed table, parsed, and the same plan's
bytes in-process) for the same manifest:

* tokens/s = the run's metrics.json ``trainedTokens`` / ``checks.train_runtime_seconds`` (transformers'
  train_runtime). Under FSDP trainedTokens counts rank 0's batches only: x processes, an estimate.
* MFU = tokens/s x FLOPs per token / (processes x the GPU's dense bf16 peak: 989 TFLOP/s for an
  H100 or H200 SXM; ``--peak-tflops`` for another), with FLOPs per token = 6 x N + 6 x layers x
  (heads x head_dim) x L. N = the matmul weights of the forward pass (the decoder blocks' linear
  layers and the output head; the input embedding is a lookup), counted for frozen weights too:
  "6 x (trainable + frozen)", the usual convention, although LoRA and QLoRA skip the frozen weights'
  gradients (their real work is nearer 4N) and checkpointing recomputes the forward (not counted:
  this is MFU, not hardware FLOPs). L = sum(len^2) / sum(len) over the training rows (prompt +
  completion + EOS, cut at maxSeqLength): the causal attention of padding-free rows, forward and
  backward.
* peak GPU memory: ``nvidia-smi --query-gpu=index,memory.used -lms 500`` sampled in a background thread
  (what the driver sees: the CUDA context and PyTorch's cached blocks included; the trainer records
  torch.cuda.max_memory_allocated only as a Prometheus gauge inside a pod), overall and per stage
  (the stages' start and end lines of the run's output), beside the plan's per-GPU total of the
  training step and its peak. Peak host RSS of the run's process tree is sampled from /proc the
  same way. On the CPU there is nothing for nvidia-smi to sample: the output says so.
* the stages' seconds (metrics.json stageSeconds), and for LoRA that the merge stage ran: its
  seconds, the merged folder's size, and the merge check's KL and top-1 agreement.

Results: a table on stdout and the raw figures in ``bench/gpu_check.<gpu-name>.json`` (``--output``
elsewhere; ``--log-dir`` keeps each step's full log).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # also under python -P

import _common as common  # noqa: E402

PRESET = "kubetune/tiny-llama"
# Llama 3.1's rope scaling, as its config.json has it.
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SHAPES: dict[str, dict[str, Any]] = {
    "llama-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA31_ROPE,
        "tie_word_embeddings": False,
    },
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {**LLAMA31_ROPE, "factor": 32.0},
        "tie_word_embeddings": True,
    },
    # The same flow on the CPU: grouped-query attention and a vocabulary larger than the tokenizer's,
    # as in the real shapes; every size a multiple of 32 (bitsandbytes' 4-bit paths on the CPU).
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 2048,
        "max_position_embeddings": 2048,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
    "tiny-tied": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 2048,
        "max_position_embeddings": 2048,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
    },
}
SHAPES |= {
    f"{name}-untied": {**SHAPES[name], "tie_word_embeddings": False} for name in ("llama-1b", "tiny-tied")
}
# Dense bf16 peaks (vendors' datasheets, without sparsity), matched on the GPU's name in this order.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12))
STEPS = ("build", "lora", "qlora", "fsdp")
STAGE_START = re.compile(r"^▶ (\S+)\s*$")
STAGE_END = re.compile(r"^✓ (\S+) ([\d.]+)s\s*$")
# Lines of `kubetune plan`'s table: parts are indented, later stages are not, the verdict is last.
PLAN_LINE = re.compile(r"^(\s*)(\S.*?)\s{2,}([\d,]+\.\d) GiB(?:\s+(.*))?$")
PLAN_VERDICT = re.compile(
    r": ([\d,]+\.\d) GiB per (GPU|process \(CPU\)) of ([\d,]+\.\d) GiB .*: (fits|does not fit)"
)
# The test suite's shim that lets accelerate's FSDP2 path run on gloo (the CPU).
FSDP_ON_CPU = REPO / "tests" / "trainer" / "fsdp_on_cpu"


@dataclass(frozen=True)
class Mode:
    """What a --shape runs: models, lengths, data and the time each step may take."""

    model: str
    fsdp_model: str
    max_steps: dict[str, int]
    max_seq_length: int
    batch_size: int
    median_tokens: int
    longest: int
    train_rows: int
    validation_rows: int
    evaluation: dict[str, Any]
    budget: float  # seconds for the whole script
    caps: dict[str, float]  # seconds a step may take at most
    floors: dict[str, float]  # seconds a step needs at least, else it is skipped
    shard_size: str


MODES = {
    "real": Mode(
        model="llama-8b",
        fsdp_model="llama-1b",
        max_steps={"lora": 30, "qlora": 30, "fsdp": 20},
        max_seq_length=1024,  # the default
        batch_size=8,  # the default
        median_tokens=440,
        longest=1024,
        train_rows=320,
        validation_rows=32,
        evaluation={"maxSamples": 16, "maxNewTokens": 16, "maxLossSamples": 32},
        budget=540,
        caps={"build": 150, "lora": 270, "qlora": 180, "fsdp-build": 90, "fsdp": 240},
        floors={"build": 60, "lora": 120, "qlora": 90, "fsdp-build": 30, "fsdp": 90},
        shard_size="5GB",
    ),
    "tiny": Mode(
        model="tiny",
        fsdp_model="tiny-tied",
        max_steps={"lora": 8, "qlora": 8, "fsdp": 6},
        max_seq_length=128,
        batch_size=8,
        median_tokens=48,
        longest=128,
        train_rows=160,
        validation_rows=16,
        evaluation={"maxSamples": 4, "maxNewTokens": 8, "maxLossSamples": 16},
        budget=900,
        caps={"build": 120, "lora": 300, "qlora": 300, "fsdp-build": 120, "fsdp": 300},
        floors={"build": 20, "lora": 30, "qlora": 30, "fsdp-build": 20, "fsdp": 30},
        shard_size="5GB",
    ),
}


# ----------------------------------------------------------------------------- the machine


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_mib: int
    driver: str


def visible_gpus() -> tuple[list[Gpu], str | None]:
    """The GPUs nvidia-smi lists (those of CUDA_VISIBLE_DEVICES where set), or why there are none."""
    if shutil.which("nvidia-smi") is None:
        return [], "no nvidia-smi on PATH"
    query = "--query-gpu=index,name,memory.total,driver_version"
    try:
        out = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError) as exc:
        return [], f"nvidia-smi failed: {exc}"
    gpus = []
    for line in out.splitlines():
        index, name, memory, driver = (part.strip() for part in line.split(","))
        gpus.append(Gpu(int(index), name, int(float(memory)), driver))
    wanted = os.environ.get("CUDA_VISIBLE_DEVICES")
    if wanted is not None:
        keep = {int(i) for i in wanted.split(",") if i.strip().isdigit()}
        gpus = [g for g in gpus if g.index in keep]
    return gpus, None if gpus else "nvidia-smi lists no GPU"


def peak_flops(name: str, override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ----------------------------------------------------------------------------- sampling


class Sampler:
    """GPU memory (nvidia-smi, every 500 ms) and the host RSS of a process tree (/proc, every
    500 ms) in background threads, each sample stamped with time.monotonic()."""

    def __init__(self, gpu_indices: Sequence[int]) -> None:
        self.gpu: list[tuple[float, int, int]] = []  # (time, GPU index, MiB used)
        self.rss: list[tuple[float, int, int]] = []  # (time, largest process, whole tree), bytes
        self.gpu_indices = list(gpu_indices)
        self.root: int | None = None
        self._smi: subprocess.Popen[str] | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if self.gpu_indices:
            self._smi = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=index,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "500",
                    "-i",
                    ",".join(map(str, self.gpu_indices)),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._threads.append(threading.Thread(target=self._read_smi, daemon=True))
        self._threads.append(threading.Thread(target=self._poll_rss, daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()
            try:
                self._smi.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._smi.kill()
        for thread in self._threads:
            thread.join(timeout=10)

    def _read_smi(self) -> None:
        assert self._smi is not None and self._smi.stdout is not None
        for line in self._smi.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                self.gpu.append((time.monotonic(), int(parts[0]), int(parts[1])))

    def _poll_rss(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.wait(0.5):
            if self.root is None:
                continue
            sizes = [rss * page for rss in tree_rss_pages(self.root)]
            if sizes:
                self.rss.append((time.monotonic(), max(sizes), sum(sizes)))

    def gpu_peak_mib(self, start: float = -math.inf, end: float = math.inf) -> dict[str, int]:
        """The largest memory.used of each GPU between ``start`` and ``end`` (monotonic seconds)."""
        out: dict[str, int] = {}
        for t, index, used in self.gpu:
            if start <= t <= end:
                out[str(index)] = max(out.get(str(index), 0), used)
        return out

    def gpu_first_mib(self) -> dict[str, int]:
        """Each GPU's first sample: its memory in use before the run had set up CUDA."""
        out: dict[str, int] = {}
        for _, index, used in self.gpu:
            out.setdefault(str(index), used)
        return out

    def rss_peak(self, start: float = -math.inf, end: float = math.inf) -> tuple[int, int] | None:
        samples = [(one, tree) for t, one, tree in self.rss if start <= t <= end]
        if not samples:
            return None
        return max(s[0] for s in samples), max(s[1] for s in samples)


def tree_rss_pages(root: int) -> list[int]:
    """Resident pages of ``root`` and every process below it (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    pages = []
    for pid in tree:
        try:
            pages.append(int(Path(f"/proc/{pid}/statm").read_text().split()[1]))
        except (OSError, IndexError, ValueError):
            continue
    return pages


# ----------------------------------------------------------------------------- subprocesses


@dataclass
class Outcome:
    """How a step's subprocess ended, its log, and when each trainer stage started and ended."""

    exit_code: int | None
    timed_out: bool
    seconds: float
    log: str
    spans: dict[str, tuple[float, float | None]] = field(default_factory=dict)  # stage: (start, end)
    started: float = 0.0
    ended: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def tail(self, chars: int = 3000) -> str:
        return self.log[-chars:]


def run_logged(
    command: Sequence[str],
    *,
    timeout: float,
    env: dict[str, str],
    cwd: Path,
    sampler: Sampler | None = None,
    echo: bool = True,
) -> Outcome:
    """``command`` in a session of its own, its output read line by line (stage lines stamped),
    killed with every process it started once ``timeout`` seconds have passed."""
    started = time.monotonic()
    proc = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
        start_new_session=True,
    )
    if sampler is not None:
        sampler.root = proc.pid
    lines: list[str] = []
    spans: dict[str, tuple[float, float | None]] = {}

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.monotonic()
            lines.append(line)
            text = line.rstrip("\n")
            if (m := STAGE_START.match(text)) is not None:
                spans[m.group(1)] = (now, None)
            elif (m := STAGE_END.match(text)) is not None and m.group(1) in spans:
                spans[m.group(1)] = (spans[m.group(1)][0], now)
            if echo:
                print(f"    | {text}", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_session(proc)
    reader.join(timeout=30)
    ended = time.monotonic()
    return Outcome(proc.returncode, timed_out, ended - started, "".join(lines), spans, started, ended)


def kill_session(proc: subprocess.Popen[str]) -> None:
    """SIGTERM to the step's own process group (it started a session of its own), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ----------------------------------------------------------------------------- the model and data


def build_model(shape: str, out: Path, shard_size: str, result_file: Path) -> None:
    """(In a child process.) A Llama of ``shape`` with random weights in bf16, created on the GPU
    where there is one, saved as safetensors with the preset's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from kubetune.trainer import presets

    started = time.monotonic()
    sizes = SHAPES[shape]
    tokenizer = AutoTokenizer.from_pretrained(presets.preset_path(PRESET))
    tokenizer.model_max_length = sizes["max_position_embeddings"]
    config = LlamaConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )
    if len(tokenizer) > config.vocab_size:
        raise SystemExit(
            f"the tokenizer's {len(tokenizer)} ids do not fit a vocabulary of {config.vocab_size}"
        )
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if cuda:
        torch.cuda.synchronize()
    created = time.monotonic()
    model.save_pretrained(out, safe_serialization=True, max_shard_size=shard_size)
    tokenizer.save_pretrained(out)
    saved = time.monotonic()
    files = sorted(out.glob("*.safetensors"))
    figures = {
        "shape": shape,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "bfloat16",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda_devices": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "tokenizer_ids": len(tokenizer),
        "create_seconds": round(created - started, 1),
        "save_seconds": round(saved - created, 1),
        "safetensors_files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "peak_gpu_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
    }
    result_file.write_text(json.dumps(figures))


def make_data(mode: Mode, data: str, workdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dataset section of every job, and the rows' token figures (for the attention FLOPs)."""
    from trainer_vs_recipe import completion_examples, make_rows, read_jsonl, write_jsonl
    from transformers import AutoTokenizer

    from kubetune.trainer import presets

    tokenizer = AutoTokenizer.from_pretrained(presets.preset_path(PRESET))
    if data == "generated":
        rows = make_rows(
            tokenizer,
            mode.train_rows + mode.validation_rows,
            seed=1234,
            task="chain",
            median=mode.median_tokens,
            longest=mode.longest,
        )
        write_jsonl(workdir / "train.jsonl", rows[: mode.train_rows])
        write_jsonl(workdir / "validation.jsonl", rows[mode.train_rows :])
        section: dict[str, Any] = {
            "train": str(workdir / "train.jsonl"),
            "validation": str(workdir / "validation.jsonl"),
            "format": "prompt-completion",
        }
        train_rows = rows[: mode.train_rows]
    else:
        section = {"train": data, "validationSplit": 0.05, "format": "prompt-completion"}
        train_rows = read_jsonl(str(presets.BUILTIN_DATA / f"{data.removeprefix('builtin:')}.jsonl"))[:2000]
    lengths = [min(len(e.input_ids), mode.max_seq_length) for e in completion_examples(train_rows, tokenizer)]
    figures: dict[str, Any] = {
        "source": data,
        "rows": len(train_rows),
        "tokens_min": min(lengths),
        "tokens_median": sorted(lengths)[len(lengths) // 2],
        "tokens_max": max(lengths),
        "tokens_mean": sum(lengths) / len(lengths),
        # sum(len^2) / sum(len): the example length seen by the average trained token.
        "attention_length": sum(n * n for n in lengths) / sum(lengths),
    }
    return section, figures


def flops_per_token(config: dict[str, Any], attention_length: float) -> dict[str, float]:
    """6 x N (forward and backward of every matmul weight, trainable or frozen) + causal attention."""
    from kubetune.memory.architecture import Architecture

    arch = Architecture.from_config(config, "config.json")
    matmul = arch.linear_parameters + arch.vocab_size * arch.hidden_size  # blocks' linears + output head
    attention = 6 * arch.num_layers * arch.num_heads * arch.head_dim * attention_length
    return {
        "parameters": arch.parameters,
        "matmul_parameters": matmul,
        "flops_per_token": 6 * matmul + attention,
        "attention_flops_per_token": attention,
    }


# ----------------------------------------------------------------------------- jobs and plans


def job_manifest(
    name: str,
    model_dir: Path,
    dataset: dict[str, Any],
    method: str,
    mode: Mode,
    *,
    steps: int,
    gpus: int,
    gpu_memory_mib: int | None,
    merge: bool,
    output: Path,
    strategy: str | None = None,
    nodes: int = 1,
) -> dict[str, Any]:
    from kubetune import api

    training: dict[str, Any] = {"maxSteps": steps}
    if mode.max_seq_length != 1024:
        training["maxSeqLength"] = mode.max_seq_length
    if mode.batch_size != 8:
        training["batchSize"] = mode.batch_size
    if strategy is not None:
        training["strategy"] = strategy
    resources: dict[str, Any] = {"gpus": gpus}
    if nodes > 1:
        resources["nodes"] = nodes
    if gpu_memory_mib is not None:
        resources["gpuMemory"] = f"{gpu_memory_mib}Mi"
    spec: dict[str, Any] = {
        "model": {"uri": str(model_dir)},  # a local folder: model.name takes hub ids and presets only
        "dataset": dataset,
        "method": method,
        "training": training,
        "evaluation": mode.evaluation,
        "export": {"merge": merge},
        "output": {"uri": str(output)},
        "resources": resources,
    }
    manifest = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": "bench"},
    }
    api.FineTuneJob.model_validate({**manifest, "spec": spec})  # fails here, not in the subprocess
    return {**manifest, "spec": spec}


def write_manifest(path: Path, manifest: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return path


def parse_plan(text: str) -> dict[str, Any]:
    """`kubetune plan`'s table: its parts, its later stages and the verdict, in GiB."""
    parts: dict[str, float] = {}
    stages: dict[str, float] = {}
    out: dict[str, Any] = {"parts_gib": parts, "stages_gib": stages}
    for line in text.splitlines():
        if (m := PLAN_VERDICT.search(line)) is not None:
            out.update(
                peak_gib=float(m.group(1).replace(",", "")),
                budget_gib=float(m.group(3).replace(",", "")),
                fits=m.group(4) == "fits",
                verdict=line.strip(),
            )
        elif (m := PLAN_LINE.match(line)) is not None:
            gib = float(m.group(3).replace(",", ""))
            if m.group(1):
                if m.group(2) == "total":
                    out["training_gib"] = gib
                else:
                    parts[m.group(2)] = gib
            else:
                stages[m.group(2)] = gib
    return out


def plan(manifest: Path, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """`kubetune plan` on the manifest (printed table, parsed), and the same plan's bytes in-process."""
    from kubetune.manifests import plan_files

    proc = subprocess.run(
        [*kubetune_command(), "plan", str(manifest)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
        check=False,
    )
    out: dict[str, Any] = {
        "exit_code": proc.returncode,
        "table": proc.stdout.strip(),
        **parse_plan(proc.stdout),
    }
    if proc.returncode not in (0, 1):
        out["error"] = proc.stderr[-2000:]
    found = plan_files([manifest])[0][1]
    out["bytes"] = found if isinstance(found, str) else found.to_dict()
    return out


def kubetune_command() -> list[str]:
    """The CLI in this interpreter; -P: the repository's operator/ must not shadow the stdlib's."""
    return [sys.executable, "-P", "-m", "kubetune"]


def importable_kubetune(scratch: Path) -> list[str]:
    """Path entries that make ``kubetune`` importable: none where it is installed, else a folder
    holding only a link to the repository's kubetune/ (the repository root itself would put its
    operator/ before the stdlib's operator module)."""
    if importlib.util.find_spec("kubetune") is not None:
        return []
    shim = scratch / "import-path"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "kubetune").symlink_to(REPO / "kubetune", target_is_directory=True)
    sys.path.insert(0, str(shim))
    return [str(shim)]


# ----------------------------------------------------------------------------- results


def read_metrics(output: Path) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = json.loads((output / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return found


def folder_bytes(path: Path) -> int | None:
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def log_lines(log: str, prefix: str) -> list[str]:
    return [line.strip() for line in log.splitlines() if line.strip().startswith(prefix)]


def run_figures(
    outcome: Outcome,
    sampler: Sampler,
    output: Path,
    *,
    processes: int,
    flops: dict[str, float] | None,
    peak: float | None,
    merges: bool,
) -> dict[str, Any]:
    """What a `kubetune run` left: throughput, memory by stage, stage seconds, the merge."""
    metrics = read_metrics(output)
    figures: dict[str, Any] = {"metrics_json": metrics is not None}
    stage_gpu = {
        stage: sampler.gpu_peak_mib(start, end if end is not None else outcome.ended)
        for stage, (start, end) in outcome.spans.items()
    }
    stage_rss = {
        stage: sampler.rss_peak(start, end if end is not None else outcome.ended)
        for stage, (start, end) in outcome.spans.items()
    }
    # Every stage's seconds from its start and end lines: metrics.json is written before push ends.
    figures["stage_seconds_seen"] = {
        stage: round(end - start, 1) for stage, (start, end) in outcome.spans.items() if end is not None
    }
    gpu_all = sampler.gpu_peak_mib()
    rss_all = sampler.rss_peak()
    figures["memory"] = {
        "gpu_sampled": bool(sampler.gpu),
        "gpu_first_mib": sampler.gpu_first_mib() or None,  # by GPU index, at the start
        "gpu_peak_mib": gpu_all or None,  # by GPU index, the whole run
        "gpu_peak_mib_by_stage": {k: v for k, v in stage_gpu.items() if v} or None,
        "host_peak_process_mib": round(rss_all[0] / 2**20) if rss_all else None,
        "host_peak_tree_mib": round(rss_all[1] / 2**20) if rss_all else None,
        "host_peak_process_mib_by_stage": {k: round(v[0] / 2**20) for k, v in stage_rss.items() if v},
    }
    # The train stage's own line (precision, attention, batch layout, checkpointing, sharding).
    figures["train_setup"] = next((x for x in log_lines(outcome.log, "train: ") if "batches" in x), None)
    figures["merge_log"] = log_lines(outcome.log, "merged ")
    if metrics is None:
        return figures
    checks = metrics.get("checks", {})
    runtime = float(checks.get("train_runtime_seconds") or 0.0)
    tokens = int(metrics.get("trainedTokens") or 0)
    tps = tokens * processes / runtime if runtime else None
    figures.update(
        steps=int(checks.get("global_step", 0)),
        trained_tokens_rank0=tokens,
        train_runtime_seconds=runtime,
        tokens_per_second=tps,
        tokens_per_second_note="rank 0's tokens x processes" if processes > 1 else None,
        mfu=tps * flops["flops_per_token"] / (peak * processes) if tps and flops and peak else None,
        stage_seconds=metrics.get("stageSeconds", {}),
        before=metrics.get("before", {}),
        after=metrics.get("after", {}),
        checks=checks,
        adapter_bytes=folder_bytes(output / "adapter"),
        merged_bytes=folder_bytes(output / "merged"),
        manifest=(output / "manifest.json").is_file(),
    )
    if not merges:  # full fine-tuning: merged/ is the trained model itself; no merge stage
        return figures
    seconds = figures["stage_seconds"].get("merge")
    figures["merge"] = {
        "ran": bool(seconds) and "merge_kl" in checks,
        "seconds": seconds,
        "kl": checks.get("merge_kl"),
        "top1_agreement": checks.get("merge_top1_agreement"),
    }
    return figures


@dataclass
class Step:
    name: str
    status: str  # ok, failed, timeout, skipped
    reason: str | None = None
    seconds: float | None = None
    timeout_s: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)


def row_of(step: Step) -> dict[str, Any]:
    """The printed table's figures of one step."""
    f = step.figures
    mem = f.get("memory") or {}
    by_stage = mem.get("gpu_peak_mib_by_stage") or {}
    train_gpu = max((by_stage.get("train") or {}).values(), default=None)
    run_gpu = max((mem.get("gpu_peak_mib") or {}).values(), default=None)
    plan_ = f.get("plan") or {}
    return {
        "step": step.name,
        "status": step.status,
        "steps": f.get("steps"),
        "tps": f.get("tokens_per_second"),
        "mfu": f.get("mfu"),
        "train_s": f.get("train_runtime_seconds"),
        "gpu_train": train_gpu / 1024 if train_gpu else None,
        "plan_train": plan_.get("training_gib"),
        "gpu_peak": run_gpu / 1024 if run_gpu else None,
        "plan_peak": plan_.get("peak_gib"),
        "rss": mem.get("host_peak_process_mib"),
        "merge_s": (f.get("merge") or {}).get("seconds") or None,
        "wall": step.seconds,
    }


COLUMNS: tuple[common.Column, ...] = (
    ("step", "step", "<11"),
    ("status", "status", "<8"),
    ("steps", "steps", ">5"),
    ("tokens/s", "tps", ">9,.0f"),
    ("MFU", "mfu", ">6.1%"),
    ("train s", "train_s", ">7.1f"),
    ("GPU GiB train", "gpu_train", ">13.1f"),
    ("plan train", "plan_train", ">10.1f"),
    ("GPU GiB peak", "gpu_peak", ">12.1f"),
    ("plan peak", "plan_peak", ">9.1f"),
    ("RSS MiB", "rss", ">7,.0f"),
    ("merge s", "merge_s", ">7.1f"),
    ("wall s", "wall", ">6.0f"),
)


# ----------------------------------------------------------------------------- orchestration


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def arguments() -> argparse.Namespace:
    parser = common.parser_for(__doc__)
    parser.add_argument(
        "--shape",
        choices=("real", "tiny"),
        default="real",
        help="real: 8B and 1B Llama shapes (a GPU); tiny: the same flow on a tiny Llama",
    )
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {', '.join(STEPS)}")
    parser.add_argument("--budget", type=float, help="seconds for everything (default: 540 real, 900 tiny)")
    parser.add_argument("--data", default="generated", help="generated (default) or builtin:dates")
    parser.add_argument("--qlora-merge", action="store_true", help="export.merge true for QLoRA too")
    parser.add_argument(
        "--fsdp-untied",
        action="store_true",
        help="the FSDP model without tied embeddings (Llama-3.2-1B ties them; see RESULTS.md)",
    )
    parser.add_argument("--median-tokens", type=int, help="median row length of the generated data")
    parser.add_argument("--longest", type=int, help="longest generated row in tokens")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--workdir", type=Path, help="scratch for models and outputs (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--log-dir", type=Path, help="keep each step's full log here")
    parser.add_argument("--output", type=Path, help="raw JSON (default: bench/gpu_check.<gpu>.json)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the runs' output")
    parser.add_argument(
        "--child-build", nargs=4, metavar=("SHAPE", "OUT", "SHARD", "RESULT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    args.steps = common.sides_of(parser, args.steps, STEPS)
    return args


def main() -> int:  # noqa: PLR0915
    args = arguments()
    if args.child_build:
        shape, out, shard, result = args.child_build
        build_model(shape, Path(out), shard, Path(result))
        return 0
    started_at = common.now()
    t0 = time.monotonic()
    mode = MODES[args.shape]
    if args.median_tokens or args.longest:
        mode = replace(
            mode, median_tokens=args.median_tokens or mode.median_tokens, longest=args.longest or mode.longest
        )
    fsdp_shape = mode.fsdp_model + ("-untied" if args.fsdp_untied else "")
    deadline = Deadline(args.budget or mode.budget)
    gpus, no_gpu = visible_gpus()
    if args.shape == "real" and not gpus:
        print(f"--shape real needs a GPU ({no_gpu}); --shape tiny runs the same flow on the CPU")
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="kubetune-gpu-check-", dir=args.workdir))
    extra_path = importable_kubetune(scratch)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONIOENCODING": "utf-8",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # CUDA's indices as nvidia-smi's
    }
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([*extra_path, *filter(None, [env.get("PYTHONPATH")])])
    one_gpu_env = {**env, "CUDA_VISIBLE_DEVICES": str(gpus[0].index)} if gpus else env
    gpu_name = gpus[0].name if gpus else "cpu"
    peak = peak_flops(gpu_name, args.peak_tflops) if gpus else None
    name = slug(f"{len(gpus)}x-{gpu_name}" if len(gpus) > 1 else gpu_name)
    name += "-tiny" if args.shape == "tiny" else ""
    output = args.output or HERE / f"gpu_check.{name}.json"
    notes: list[str] = []
    if not gpus:
        notes.append(f"GPU memory not sampled: {no_gpu} (a CPU run); host RSS is sampled instead")
        notes.append("MFU not computed: no bf16 peak for a CPU")
    elif peak is None:
        notes.append(f"MFU not computed: no dense bf16 peak known for {gpu_name!r}; give --peak-tflops")
    print(
        f"gpu_check: shape {args.shape}, GPUs {[g.name for g in gpus] or 'none'}, "
        f"budget {deadline.left():.0f}s, scratch {scratch}",
        flush=True,
    )
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)

    steps: list[Step] = []
    machine = common.machine()
    built: dict[str, dict[str, Any]] = {}
    figures: dict[str, Any] = {}

    def record() -> None:
        common.write_json(
            output,
            {
                "command": " ".join(["python3", "-P", "bench/gpu_check.py", *sys.argv[1:]]),
                "started": started_at,
                "seconds": round(time.monotonic() - t0, 1),
                "machine": machine,
                "gpus": [asdict(g) for g in gpus],
                "shape": args.shape,
                "mode": asdict(mode),
                "peak_flops": peak,
                "notes": notes,
                **figures,
                "steps": [asdict(s) for s in steps],
            },
        )

    def skip(step: str, reason: str) -> None:
        print(f"SKIPPED {step}: {reason}", flush=True)
        steps.append(Step(step, "skipped", reason))
        record()

    def allowed(step: str) -> float | None:
        """The step's timeout, or None (and the reason recorded) when too little time is left."""
        left = deadline.left()
        if left < mode.floors[step]:
            skip(step, f"{left:.0f}s of the budget left, the step needs at least {mode.floors[step]:.0f}s")
            return None
        return min(mode.caps[step], left)

    def disk_ok(step: str, need: float) -> bool:
        free = shutil.disk_usage(scratch).free
        if free < need:
            skip(
                step,
                f"{free / 2**30:.1f} GiB free under {scratch}, the step needs about "
                f"{need / 2**30:.1f} GiB (--workdir on a larger disk)",
            )
            return False
        return True

    def keep_log(step: str, outcome: Outcome) -> None:
        """One file a step (the manifests are in the JSON): few files, for folders that take few."""
        if args.log_dir:
            (args.log_dir / f"{step}.log").write_text(outcome.log, encoding="utf-8")

    def build(step: str, shape: str, folder: Path, gpu_env: dict[str, str]) -> bool:
        timeout = allowed(step)
        if timeout is None:
            return False
        result = scratch / f"{step}.json"
        print(f"{step}: {shape} (timeout {timeout:.0f}s)", flush=True)
        command = [
            sys.executable,
            "-P",
            __file__,
            "--child-build",
            shape,
            str(folder),
            mode.shard_size,
            str(result),
        ]
        outcome = run_logged(command, timeout=timeout, env=gpu_env, cwd=scratch, echo=not args.quiet)
        keep_log(step, outcome)
        status = "ok" if outcome.ok else "timeout" if outcome.timed_out else "failed"
        done = Step(step, status, seconds=round(outcome.seconds, 1), timeout_s=round(timeout))
        if outcome.ok:
            built[shape] = json.loads(result.read_text())
            done.figures = built[shape]
            print(f"{step}: {built[shape]}", flush=True)
        else:
            done.reason = f"exit {outcome.exit_code}" + (" (timed out)" if outcome.timed_out else "")
            done.figures = {"log_tail": outcome.tail()}
            print(f"{step} FAILED: {done.reason}\n{outcome.tail(1500)}", flush=True)
        steps.append(done)
        record()
        return outcome.ok

    def train(
        step: str,
        manifest_doc: dict[str, Any],
        model_dir: Path,
        launch: list[str],
        run_env: dict[str, str],
        processes: int,
        gpu_indices: list[int],
    ) -> None:
        timeout = allowed(step)
        if timeout is None:
            return
        out = scratch / f"out-{step}"
        manifest = write_manifest(scratch / f"{step}.yaml", manifest_doc)
        try:
            planned = plan(manifest, run_env, scratch)
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            planned = {"error": f"kubetune plan: {exc}", "table": ""}
        print(
            f"{step}: plan: {planned.get('verdict') or planned.get('error') or planned['table'][-300:]}",
            flush=True,
        )
        print(f"{step}: kubetune run {' '.join(launch)} (timeout {timeout:.0f}s)", flush=True)
        sampler = Sampler(gpu_indices)
        sampler.start()
        command = [*kubetune_command(), "run", str(manifest), "--output", str(out), *launch]
        worker_env = {**run_env, "KUBETUNE_WORKDIR": str(scratch / f"work-{step}")}
        try:
            outcome = run_logged(
                command, timeout=timeout, env=worker_env, cwd=scratch, sampler=sampler, echo=not args.quiet
            )
        finally:
            sampler.stop()
        keep_log(step, outcome)
        config = json.loads((model_dir / "config.json").read_text())
        flops = flops_per_token(config, figures["data"]["attention_length"])
        merges = manifest_doc["spec"]["method"] != "full" and manifest_doc["spec"]["export"]["merge"]
        found = run_figures(outcome, sampler, out, processes=processes, flops=flops, peak=peak, merges=merges)
        status = "ok" if outcome.ok else "timeout" if outcome.timed_out else "failed"
        done = Step(step, status, seconds=round(outcome.seconds, 1), timeout_s=round(timeout))
        done.figures = {
            "job": manifest_doc["spec"],
            "launch": launch,
            "exit_code": outcome.exit_code,
            "plan": planned,
            "flops": flops,
            **found,
        }
        if not outcome.ok:
            done.reason = f"exit {outcome.exit_code}" + (" (timed out)" if outcome.timed_out else "")
            done.figures["log_tail"] = outcome.tail()
            print(f"{step} FAILED: {done.reason}\n{outcome.tail(2500)}", flush=True)
        steps.append(done)
        record()
        # Disk: the published merged weights are another copy of the model; their size is recorded.
        shutil.rmtree(out / "merged", ignore_errors=True)
        shutil.rmtree(scratch / f"work-{step}", ignore_errors=True)

    try:
        dataset, figures["data"] = make_data(mode, args.data, scratch)
        print(f"data: {figures['data']}", flush=True)
        gpu_memory = gpus[0].memory_mib if gpus else None
        gpu_count = 1 if gpus else 0
        base = scratch / "model"
        single = [gpus[0].index] if gpus else []
        if any(s in args.steps for s in ("build", "lora", "qlora")):
            ok = build("build", mode.model, base, one_gpu_env)
            for method in ("lora", "qlora"):
                if method not in args.steps:
                    continue
                if not ok:
                    skip(method, "the model was not built")
                    continue
                merge = method == "lora" or args.qlora_merge
                model_bytes = float(built[mode.model]["bytes"])
                if not disk_ok(method, (2.2 * model_bytes if merge else 0.1 * model_bytes) + 2**30):
                    continue
                doc = job_manifest(
                    f"gpu-check-{method}",
                    base,
                    dataset,
                    method,
                    mode,
                    steps=mode.max_steps[method],
                    gpus=gpu_count,
                    gpu_memory_mib=gpu_memory,
                    merge=merge,
                    output=scratch / f"out-{method}",
                )
                train(method, doc, base, [], one_gpu_env, 1, single)
            shutil.rmtree(base, ignore_errors=True)
        if "fsdp" in args.steps:
            if gpus and len(gpus) < 2:
                skip("fsdp", f"{len(gpus)} GPU visible: the 2-process FSDP run needs two")
            else:
                fsdp_env, indices = dict(env), [g.index for g in gpus[:2]]
                if gpus:
                    fsdp_env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, indices))
                else:
                    # accelerate runs FSDP only on GPU process groups: the test suite's shim lets its
                    # own FSDP2 path run on gloo. One thread per process on a small CPU.
                    fsdp_env["PYTHONPATH"] = os.pathsep.join(
                        [str(FSDP_ON_CPU), *filter(None, [fsdp_env.get("PYTHONPATH")])]
                    )
                    fsdp_env["OMP_NUM_THREADS"] = "1"
                    notes.append(
                        "fsdp on the CPU: 2 gloo processes, with tests/trainer/fsdp_on_cpu on PYTHONPATH"
                    )
                folder = scratch / "model-fsdp"
                if build("fsdp-build", fsdp_shape, folder, fsdp_env):
                    model_bytes = float(built[fsdp_shape]["bytes"])
                    if disk_ok("fsdp", 5 * model_bytes + 2**30):  # fp32 merged: staged and published
                        doc = job_manifest(
                            "gpu-check-fsdp",
                            folder,
                            dataset,
                            "full",
                            mode,
                            steps=mode.max_steps["fsdp"],
                            gpus=2 if gpus else 0,
                            gpu_memory_mib=gpu_memory,
                            merge=False,
                            output=scratch / "out-fsdp",
                            strategy="fsdp",
                            # On the CPU the plan counts processes as GPUs x nodes: two nodes of one.
                            nodes=1 if gpus else 2,
                        )
                        train("fsdp", doc, folder, ["--nproc-per-node", "2"], fsdp_env, 2, indices)
                else:
                    skip("fsdp", "the model was not built")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        figures["total_seconds"] = round(time.monotonic() - t0, 1)
        record()

    print()
    common.print_columns([row_of(s) for s in steps], COLUMNS)
    for s in steps:
        if s.status != "ok":
            print(f"{s.name}: {s.status}" + (f": {s.reason}" if s.reason else ""))
    for note in notes:
        print(f"note: {note}")
    for s in steps:
        merge = s.figures.get("merge")
        if merge:
            print(
                f"{s.name}: merge stage ran: {merge['ran']} ({merge['seconds']}s, KL {merge['kl']}, "
                f"top-1 {merge['top1_agreement']}); stage seconds {s.figures.get('stage_seconds')}"
            )
    print(f"\ntotal {time.monotonic() - t0:.0f}s; raw figures: {output}")
    return 0 if all(s.status in ("ok", "skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
