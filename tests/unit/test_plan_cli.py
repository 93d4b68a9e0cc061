"""`kubetune plan` and the memory warning of `kubetune validate`, run as a user runs them."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from kubetune.cli import app

ROOT = Path(__file__).resolve().parents[2]


def manifest(tmp_path: Path, name: str, **spec: object) -> Path:
    body = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/"},
            **spec,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_plan_of_the_8_gpu_example_fits_with_fsdp() -> None:
    result = CliRunner().invoke(app, ["plan", str(ROOT / "examples/full-8gpu.yaml")])
    assert result.exit_code == 0, result.output
    assert "strategy fsdp, 8 process(es)" in result.output
    assert "optimizer states" in result.output and ": fits" in result.output


def test_plan_exits_1_when_a_job_does_not_fit_and_says_what_would(tmp_path: Path) -> None:
    one_gpu = manifest(tmp_path, "full-one-gpu", method="full", resources={"gpus": 1})
    result = CliRunner().invoke(app, ["plan", str(one_gpu)])
    assert result.exit_code == 1
    assert "does not fit; would fit with:" in result.output
    # 8B in full: 2 GPUs would hold the sharded states but not the fp32 logits of 8 x 1024 tokens.
    assert "resources.gpus: 4 with training.strategy: fsdp" in result.output


def test_plan_reads_a_config_json_and_names_an_unknown_model(tmp_path: Path) -> None:
    unknown = manifest(tmp_path, "unknown", model={"name": "someone/model"})
    result = CliRunner().invoke(app, ["plan", str(unknown)])
    assert result.exit_code == 1 and "no architecture for someone/model" in result.output
    config = tmp_path / "config.json"
    config.write_text(
        '{"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,'
        ' "num_attention_heads": 32, "num_key_value_heads": 4}'
    )
    result = CliRunner().invoke(app, ["plan", str(unknown), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "1.10B parameters" in result.output  # TinyLlama-1.1B's shape


def test_validate_warns_about_memory_but_passes(tmp_path: Path) -> None:
    one_gpu = manifest(tmp_path, "full-one-gpu", method="full", resources={"gpus": 1})
    result = CliRunner().invoke(app, ["validate", str(one_gpu)])
    assert result.exit_code == 0
    assert "warning:" in result.output and "memory plan" in result.output and "does not fit" in result.output
    fine = CliRunner().invoke(app, ["validate", str(ROOT / "examples/full-8gpu.yaml")])
    assert fine.exit_code == 0 and "warning" not in fine.output


def test_plan_names_the_line_of_a_yaml_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec:\n  model: [unclosed\n")
    result = CliRunner().invoke(app, ["plan", str(broken)])
    assert result.exit_code == 1, result.output
    assert f"{broken}: line 3, column 1:" in result.output
