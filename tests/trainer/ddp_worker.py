"""One rank of a tiny fine-tuning job, started by torchrun from test_distributed.py.

Writes what that rank ended with: its trainable weights and its loss history.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from kubetune import api
from kubetune.trainer import distributed
from kubetune.trainer.pipeline import execute
from kubetune.trainer.reporter import SilentReporter
from kubetune.trainer.run import quiet_libraries


def main() -> None:
    job_file, out = Path(sys.argv[1]), Path(sys.argv[2])
    quiet_libraries()
    job = api.FineTuneJob.model_validate_json(job_file.read_text())
    rank = distributed.rank()
    ctx = execute(job, SilentReporter(), workdir=out / "work", output=str(out / "artifacts"))
    weights = {n: p.detach().contiguous() for n, p in ctx.model.named_parameters() if p.requires_grad}
    save_file(weights, out / f"rank{rank}.safetensors")
    (out / f"history{rank}.json").write_text(json.dumps(ctx.history))


if __name__ == "__main__":
    main()
