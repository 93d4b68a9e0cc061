"""One rank, started by torchrun from test_baseline.py: the job's first stage records the
default process group's timeout, as the pipeline set it up."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kubetune import api
from kubetune.trainer import distributed, pipeline
from kubetune.trainer.context import RunContext
from kubetune.trainer.reporter import SilentReporter


def main() -> None:
    job_file, out = Path(sys.argv[1]), Path(sys.argv[2])
    job = api.FineTuneJob.model_validate_json(job_file.read_text())

    def record(ctx: RunContext) -> None:
        group = torch.distributed.distributed_c10d._get_default_group()
        timeout = group._get_backend(torch.device("cpu")).options._timeout
        (out / f"timeout{distributed.rank()}.json").write_text(json.dumps(timeout.total_seconds()))

    pipeline.STAGES = [pipeline.Step(api.Stage.FETCH, record, once_per_node=True)]
    pipeline.execute(
        job, SilentReporter(), workdir=out / f"work{distributed.rank()}", output=str(out / "artifacts")
    )


if __name__ == "__main__":
    main()
