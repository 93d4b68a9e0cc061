"""The whole trainer Job of four representative FineTuneJobs, byte for byte (pure).

The other planning tests check one property each; these catch any other change to the Job,
key order included. After an intended change, rewrite the files and review their diff:
``KUBETUNE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/operator/test_job_golden.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kubetune.operator import planning
from kubetune.operator.planning import OperatorConfig

GOLDEN = Path(__file__).parent / "golden"
CONFIG = OperatorConfig(trainer_image="registry.test/kubetune-trainer:golden", termination_grace_seconds=90)
BASE: dict[str, Any] = {
    "model": {"name": "Qwen/Qwen2.5-0.5B"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "output": {"uri": "s3://models/out/"},
}
SPECS: dict[str, dict[str, Any]] = {
    # One node with everything a pod can be given: resources, storage, secrets, scheduling, limits.
    "single-node": {
        "method": "lora",
        "resources": {"gpus": 1, "cpu": "8", "memory": "64Gi", "scratch": "200Gi"},
        "storage": {"endpoint": "http://minio:9000", "region": "eu-1"},
        "credentials": {"storageSecret": "s3-creds", "huggingFaceSecret": "hf-token"},
        "scheduling": {
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "training",
        },
        "backoffLimit": 2,
        "activeDeadlineSeconds": 7200,
        "ttlSecondsAfterFinished": 600,
    },
    # Several nodes: an Indexed Job behind a headless Service, rank from the completion index.
    "multi-node": {
        "method": "full",
        "resources": {"nodes": 4, "gpus": 8, "memory": "512Gi"},
        "terminationGracePeriodSeconds": 300,
    },
    # Several nodes on InfiniBand: RDMA device, IPC_LOCK, Multus networks, the user's NCCL settings.
    "multi-node-rdma": {
        "method": "lora",
        "resources": {
            "nodes": 2,
            "gpus": 8,
            "memory": "1500Gi",
            "network": {
                "extendedResources": {"rdma/rdma_shared_device_a": 1},
                "capabilities": ["IPC_LOCK"],
                "networks": ["ib-a", "ml/ib-b@net2"],
                "ncclEnv": {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_HCA": "mlx5_0,mlx5_1"},
            },
        },
    },
    # QLoRA in a Kueue queue: the queue label, created suspended for Kueue to admit.
    "qlora-kueue": {
        "method": "qlora",
        "image": "registry.test/kubetune-trainer:dev",
        "resources": {"gpus": 1},
        "scheduling": {"queueName": "team-a"},
    },
}


def trainer_job(name: str) -> str:
    body = {
        "metadata": {"name": f"golden-{name}", "namespace": "ml", "uid": "0b6d2a1e-golden", "generation": 3},
        "spec": {**BASE, **SPECS[name]},
    }
    return json.dumps(planning.plan(planning.parse(body), CONFIG).job, indent=2) + "\n"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_trainer_job_is_unchanged(name: str) -> None:
    path = GOLDEN / f"trainer-job-{name}.json"
    got = trainer_job(name)
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN"):
        path.write_text(got)
    assert got == path.read_text(), f"the trainer Job differs from {path}"
