"""The trainer against the test S3 server: inputs and outputs in S3, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kubetune.storage import ObjectStore, StorageConfig, StorageCredentials
from kubetune.trainer import presets
from kubetune.trainer.stages import merge
from kubetune_testkit.s3 import S3Server

from .conftest import tiny_job

pytestmark = [pytest.mark.training, pytest.mark.s3]


def store_for(server: S3Server) -> ObjectStore:
    return ObjectStore(server.storage_config())


def job_file(tmp_path: Path, server: S3Server, bucket: str, **spec: Any) -> Path:
    job = tiny_job(
        "resumable",
        model={"name": "kubetune/tiny-llama", "uri": f"s3://{bucket}/models/tiny-llama/"},
        dataset={
            "train": f"s3://{bucket}/data/dates.jsonl",
            "validationSplit": 0.05,
            "format": "prompt-completion",
        },
        output={"uri": f"s3://{bucket}/runs/"},
        storage={"endpoint": server.endpoint, "region": server.region},
        **spec,
    )
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job.to_wire()))
    return path


def upload_inputs(server: S3Server, bucket: str) -> None:
    store = store_for(server)
    store.upload_prefix(presets.preset_path("kubetune/tiny-llama"), f"s3://{bucket}/models/tiny-llama/")
    store.upload_file(presets.BUILTIN_DATA / "dates.jsonl", f"s3://{bucket}/data/dates.jsonl")


def run_env(server: S3Server, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return env | {
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "KUBETUNE_CACHE": str(tmp_path / "cache"),
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
    }


def kubetune_run(job: Path, output: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kubetune", "run", str(job), "--output", output],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip


def adapter(store: ObjectStore, root: str, tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    local = tmp_path / name
    store.download_file(f"{root}/adapter/adapter_model.safetensors", local)
    return load_file(local)


TRAINING = {"maxSteps": 24, "learningRate": 0.003, "batchSize": 48, "maxSeqLength": 32, "checkpointEvery": 6}
FAST_EVAL = {"metrics": ["loss"], "baseline": False}


def test_s3_run_resumes_after_sigkill_to_the_same_adapter(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    upload_inputs(s3_server, s3_bucket)
    job = job_file(tmp_path, s3_server, s3_bucket, training=TRAINING, evaluation=FAST_EVAL)
    env = run_env(s3_server, tmp_path)
    store = store_for(s3_server)

    straight = kubetune_run(job, f"s3://{s3_bucket}/straight", env)
    log, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, log
    assert s3_server.secret_key not in log

    root = f"s3://{s3_bucket}/resumed"
    first = kubetune_run(job, root, env)
    deadline = time.monotonic() + 300
    while not store.exists(f"{root}/checkpoints/step-12/COMPLETE"):
        assert first.poll() is None, first.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not store.exists(f"{root}/manifest.json")

    # A checkpoint cut off mid-upload (no marker) at a later step must be ignored.
    store.write_text(f"{root}/checkpoints/step-30/trainer_state.json", "{ half")
    second = kubetune_run(job, root, env)
    log, _ = second.communicate(timeout=600)
    assert second.returncode == 0, log
    resumed_from = int(log.split("resuming from checkpoint step ")[1].split()[0])
    assert 12 <= resumed_from < 24, "resumed from the newest complete checkpoint, not the cut-off one"
    assert s3_server.secret_key not in log

    metrics = json.loads(store.read_text(f"{root}/metrics.json"))
    assert metrics["checks"]["global_step"] == 24
    steps = [h["step"] for h in metrics["history"] if "loss" in h]
    assert steps == sorted(set(steps)) and steps[-1] == 24, "an optimizer step was repeated or lost"

    want = adapter(store, f"s3://{s3_bucket}/straight", tmp_path, "a.safetensors")
    got = adapter(store, root, tmp_path, "b.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)

    manifest = json.loads(store.read_text(f"{root}/manifest.json"))
    listed = {f["path"] for f in manifest["files"]}
    assert "adapter/adapter_model.safetensors" in listed
    published = {info.name for info in store.list_prefix(root)} - {"manifest.json"}
    assert listed == {n for n in published if not n.startswith("checkpoints/")}


def test_artifacts_reload_from_s3(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    upload_inputs(s3_server, s3_bucket)
    job = job_file(tmp_path, s3_server, s3_bucket, export={"merge": True})
    proc = kubetune_run(job, f"s3://{s3_bucket}/out", run_env(s3_server, tmp_path))
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    store = store_for(s3_server)
    local = tmp_path / "fetched"
    store.download_prefix(f"s3://{s3_bucket}/out", local)
    merged = AutoModelForCausalLM.from_pretrained(local / "merged")
    base = AutoModelForCausalLM.from_pretrained(presets.preset_path("kubetune/tiny-llama"))
    adapted = PeftModel.from_pretrained(base, local / "adapter")
    ids = torch.tensor([[1, 300, 301, 302]])
    with torch.no_grad():
        # The merged weights are in the compute dtype (bf16 where the CPU has it): judged in fp32
        # by the merge stage's own criterion.
        found = merge.agreement(adapted(ids).logits[0], merged(ids).logits[0])
    assert found.problem(merged.dtype) is None, found


def test_storage_credentials_from_a_secret_mapping_never_print(s3_server: S3Server) -> None:
    credentials = StorageCredentials.from_mapping(
        {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    )
    config = StorageConfig(endpoint=s3_server.endpoint, region=s3_server.region, credentials=credentials)
    assert s3_server.secret_key not in repr(config) + str(config)
