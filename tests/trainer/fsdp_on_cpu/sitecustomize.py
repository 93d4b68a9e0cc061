"""Lets accelerate's own FSDP2 path run on the CPU, for tests on a machine without a GPU.

accelerate turns FSDP on only for GPU-like process groups; on the CPU (gloo) it falls back to
DDP whatever the plugin says. FSDP2 itself runs on the CPU with gloo, so this shim, on the
PYTHONPATH of the test's processes only, keeps the FSDP plugin it was given. Nothing else of
accelerate, transformers or kubetune is changed.
"""

from __future__ import annotations

from typing import Any

import accelerate.state
from accelerate.utils import DistributedType

_init = accelerate.state.AcceleratorState.__init__


def _keep_fsdp(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # Later AcceleratorState() calls copy PartialState's type over this one: set both.
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.distributed_type = DistributedType.FSDP
        # As accelerate does on GPUs, where FSDP's policy carries the mixed precision.
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin


accelerate.state.AcceleratorState.__init__ = _keep_fsdp


def _count_layer_calls(folder: str) -> None:
    """Counts the forward calls of the first decoder layer in training mode (a recomputation
    by activation checkpointing is one more), written to ``folder/rank-N`` at exit."""
    import atexit
    import os
    from pathlib import Path

    from transformers.models.llama import modeling_llama

    forward = modeling_llama.LlamaDecoderLayer.forward
    calls = [0]

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.training and self.self_attn.layer_idx == 0:
            calls[0] += 1
        return forward(self, *args, **kwargs)

    modeling_llama.LlamaDecoderLayer.forward = counting  # type: ignore[method-assign]
    if "RANK" in os.environ:  # a training process, not the launcher
        atexit.register(lambda: Path(folder, f"rank-{os.environ['RANK']}").write_text(f"{calls[0]}\n"))


if _folder := __import__("os").environ.get("KUBETUNE_TEST_LAYER_CALLS"):
    _count_layer_calls(_folder)


def _record_trained_examples(folder: str, stop_after: int | None) -> None:
    """Appends the examples of every micro-batch this process trains to ``folder/rank-R.PID``
    (one line each: a hash of its tokens), and with ``stop_after`` sends this process SIGTERM
    as that optimizer step begins (rank 0 only), as a node drain would."""
    import itertools
    import os
    import signal
    from pathlib import Path

    import torch
    import transformers

    training_step = transformers.Trainer.training_step
    log = Path(folder, f"rank-{os.environ.get('RANK', '0')}.{os.getpid()}")
    signalled = [False]

    def recording(self: Any, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if stop_after is not None and not signalled[0] and self.state.global_step == stop_after - 1:
            if os.environ.get("RANK", "0") == "0":
                os.kill(os.getpid(), signal.SIGTERM)
            signalled[0] = True
        lines = []
        for ids, positions, labels in zip(
            inputs["input_ids"], inputs["position_ids"], inputs["labels"], strict=True
        ):
            starts = [*(torch.nonzero(positions == 0).flatten().tolist()), len(ids)]
            for start, end in itertools.pairwise(starts):
                if bool((labels[start:end] != -100).any()):  # an example, not the padding block
                    lines.append(f"{hash(tuple(ids[start:end].tolist()))}\n")
        with log.open("a") as out:
            out.write("".join(lines))
        return training_step(self, model, inputs, *args, **kwargs)

    transformers.Trainer.training_step = recording  # type: ignore[method-assign]


if _examples := __import__("os").environ.get("KUBETUNE_TEST_TRAINED_EXAMPLES"):
    _stop = __import__("os").environ.get("KUBETUNE_TEST_SIGTERM_AT_STEP")
    _record_trained_examples(_examples, int(_stop) if _stop else None)


def _slow_baseline(seconds: float) -> None:
    """Rank 0's baseline takes ``seconds`` longer, as loading and scoring a 70B model does."""
    import time

    from kubetune.trainer.stages import baseline

    run = baseline.run

    def slow(ctx: Any) -> None:
        time.sleep(seconds)
        run(ctx)

    baseline.run = slow
    from kubetune.trainer import pipeline

    pipeline.STAGES[:] = [
        type(step)(**{**step.__dict__, "run": slow}) if step.run is run else step for step in pipeline.STAGES
    ]


if _delay := __import__("os").environ.get("KUBETUNE_TEST_SLOW_BASELINE"):
    _slow_baseline(float(_delay))


def _record_fsdp_precision(folder: str) -> None:
    """Writes the dtypes FSDP2 computes and reduces gradients in, as a decoder block's unit has
    them at the first training step, to ``folder/rank-R``."""
    import os
    from pathlib import Path

    import transformers

    training_step = transformers.Trainer.training_step

    def recording(self: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        log = Path(folder, f"rank-{os.environ.get('RANK', '0')}")
        if not log.exists():
            block = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
            policy = block._get_fsdp_state()._mp_policy
            log.write_text(f"{policy.param_dtype} {policy.reduce_dtype}\n")
        return training_step(self, model, *args, **kwargs)

    transformers.Trainer.training_step = recording  # type: ignore[method-assign]


if _precision := __import__("os").environ.get("KUBETUNE_TEST_FSDP_PRECISION"):
    _record_fsdp_precision(_precision)


def _record_saved_state(folder: str) -> None:
    """Writes the names of the tensors handed to a PeftModel's save_pretrained (what the process
    gathered to save the adapter) to ``folder/rank-R``."""
    import os
    from pathlib import Path

    import peft

    save_pretrained = peft.PeftModel.save_pretrained

    def recording(self: Any, *args: Any, state_dict: Any = None, **kwargs: Any) -> Any:
        if state_dict is not None:
            Path(folder, f"rank-{os.environ.get('RANK', '0')}").write_text("\n".join(state_dict) + "\n")
        return save_pretrained(self, *args, state_dict=state_dict, **kwargs)

    peft.PeftModel.save_pretrained = recording  # type: ignore[method-assign]


if _saved := __import__("os").environ.get("KUBETUNE_TEST_SAVED_STATE"):
    _record_saved_state(_saved)


def _slow_checkpoint_upload(folder: str, seconds: float) -> None:
    """The upload of the first checkpoint takes ``seconds`` longer (a slow link); ``folder/rank-R``
    gets a line per training micro-batch (``step N T``) and per upload (``uploaded NAME T``)."""
    import os
    import time
    from pathlib import Path

    import transformers

    from kubetune.storage import ObjectStore

    log = Path(folder, f"rank-{os.environ.get('RANK', '0')}")
    upload_prefix = ObjectStore.upload_prefix
    held: list[str] = []
    training_step = transformers.Trainer.training_step

    def slow(self: Any, source: Any, uri: Any, **kwargs: Any) -> Any:
        name = str(uri).rstrip("/").rsplit("/", 1)[-1]
        if "/checkpoints/" in str(uri) and not held:
            held.append(name)
            time.sleep(seconds)
        result = upload_prefix(self, source, uri, **kwargs)
        with log.open("a") as out:
            out.write(f"uploaded {name} {time.time()}\n")
        return result

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        with log.open("a") as out:
            out.write(f"step {self.state.global_step + 1} {time.time()}\n")
        return training_step(self, *args, **kwargs)

    ObjectStore.upload_prefix = slow  # type: ignore[method-assign,assignment]
    transformers.Trainer.training_step = recording  # type: ignore[method-assign]


if _uploads := __import__("os").environ.get("KUBETUNE_TEST_SLOW_UPLOADS"):
    _slow_checkpoint_upload(_uploads, 8.0)
