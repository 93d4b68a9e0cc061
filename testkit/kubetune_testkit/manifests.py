"""FineTuneJob manifests for tests: the smallest valid one, and a tiny run on the test S3 server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kubetune import api

if TYPE_CHECKING:
    from kubetune_testkit.s3 import S3Server


def finetunejob(name: str, namespace: str | None = None, **spec: Any) -> dict[str, Any]:
    """A FineTuneJob with only the required fields (model, dataset, output), then ``spec``."""
    metadata = {"name": name} if namespace is None else {"name": name, "namespace": namespace}
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": metadata,
        "spec": {
            "model": {"name": "Qwen/Qwen2.5-0.5B"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://models/out/"},
            **spec,
        },
    }


def tiny_run(name: str, namespace: str, server: S3Server, bucket: str, **spec: Any) -> dict[str, Any]:
    """A FineTuneJob that trains the tiny preset for 10 steps on the CPU, with its output and
    credentials in the test S3 server (the Secret ``s3-credentials``), then ``spec``."""
    tiny: dict[str, Any] = {
        "model": {"name": "kubetune/tiny-llama"},
        "dataset": {"train": "builtin:dates", "validationSplit": 0.05, "format": "prompt-completion"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"maxSteps": 10, "learningRate": 0.003, "batchSize": 16, "maxSeqLength": 32},
        "evaluation": {"metrics": ["loss", "exact_match"], "maxSamples": 8, "maxNewTokens": 12},
        "export": {"merge": False},
        "output": {"uri": f"s3://{bucket}/runs/"},
        "storage": {"endpoint": server.endpoint, "region": server.region},
        "credentials": {"storageSecret": "s3-credentials"},
        "resources": {"gpus": 0},
    }
    return finetunejob(name, namespace, **(tiny | spec))
