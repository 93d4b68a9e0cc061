"""Peak host memory of merging a LoRA adapter: peft's whole-model merge against the shard merge.

Random Llamas of growing size are saved in 20 MB safetensors shards with a random r=16
all-linear adapter; each merge runs in a fresh process and its peak RSS (VmHWM) is read
back, minus the RSS of that process right after importing torch, transformers and peft.

    .venv/bin/python bench/merge_memory.py            # ~100M, ~200M and ~400M parameters
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under python -P

from _common import HERE, load1, status_kib, write_json

SIZES = {  # name: (hidden, intermediate, layers, vocabulary)
    "100M": (768, 2048, 12, 32000),
    "200M": (1024, 2816, 12, 32000),
    "400M": (1280, 3456, 16, 32000),
}


def build(root: Path, size: str) -> tuple[Path, Path, int]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, vocab = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root / "base", max_shard_size="20MB")
    adapter = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    )
    adapter.save_pretrained(str(root / "adapter"))
    return root / "base", root / "adapter", count


def child(kind: str, base: str, adapter: str, out: str) -> None:
    """One merge in this process; prints its figures as JSON."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubetune.trainer import merging

    before = status_kib("VmRSS") * 1024
    started = time.monotonic()
    if kind == "peft":
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
        model.merge_and_unload().save_pretrained(out, safe_serialization=True)
    else:
        merging.merge_shards(Path(base), Path(adapter), Path(out), dtype=torch.float32)
    peak = status_kib("VmHWM") * 1024
    print(json.dumps({"baseline_bytes": before, "peak_bytes": peak, "seconds": time.monotonic() - started}))


def measure(kind: str, base: Path, adapter: Path, out: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-P", __file__, "--child", kind, str(base), str(adapter), str(out)],
        check=True, capture_output=True, text=True, cwd=HERE.parent,
    )  # fmt: skip
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    figures["merge_bytes"] = figures["peak_bytes"] - figures["baseline_bytes"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=4, metavar=("KIND", "BASE", "ADAPTER", "OUT"))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--json", type=Path, default=HERE / "merge_memory.json")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch)
            base, adapter, count = build(root, size)
            shards = sorted(base.glob("*.safetensors"))
            row: dict[str, Any] = {
                "size": size,
                "parameters": count,
                "checkpoint_bytes": sum(f.stat().st_size for f in shards),
                "shard_files": len(shards),
                "largest_shard_bytes": max(f.stat().st_size for f in shards),
                "load_before": load1(),
            }
            for kind in ("peft", "shards"):
                row[kind] = measure(kind, base, adapter, root / f"out-{kind}")
            rows.append(row)
            print(
                f"{size}: {count / 1e6:,.0f}M params, {row['checkpoint_bytes'] / 2**20:,.0f} MiB in "
                f"{row['shard_files']} shards (largest {row['largest_shard_bytes'] / 2**20:,.0f} MiB); "
                f"peft merge {row['peft']['merge_bytes'] / 2**20:,.0f} MiB, "
                f"shard merge {row['shards']['merge_bytes'] / 2**20:,.0f} MiB above the imports",
                flush=True,
            )
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
