"""The chart under test and the real helm binary (built once by hack/build-helm)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
VALUES_ALL = Path(__file__).with_name("values-all.yaml")
BUILD_HELM = ROOT / "hack" / "build-helm"

Manifest = dict[str, Any]


class HelmError(RuntimeError):
    pass


@dataclass(frozen=True)
class Helm:
    binary: Path
    env: Mapping[str, str] | None = None

    def using(self, **env: str) -> Helm:
        """The same binary with more environment, e.g. KUBECONFIG."""
        return Helm(self.binary, {**(self.env or os.environ), **env})

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, timeout=120, check=False, env=self.env
        )
        if check and result.returncode != 0:
            raise HelmError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def template_args(
        self,
        *,
        release: str = "kubetune",
        namespace: str = "kubetune",
        values: Iterable[Path] = (),
        set_json: Mapping[str, Any] | None = None,
    ) -> list[str]:
        args = [release, str(CHART), "--namespace", namespace]
        for path in values:
            args += ["--values", str(path)]
        for key, value in (set_json or {}).items():
            args += ["--set-json", f"{key}={json.dumps(value)}"]
        return args

    def template(
        self,
        *,
        release: str = "kubetune",
        namespace: str = "kubetune",
        values: Iterable[Path] = (),
        set_json: Mapping[str, Any] | None = None,
    ) -> list[Manifest]:
        """The rendered manifests (CRD first), as dicts."""
        args = self.template_args(release=release, namespace=namespace, values=values, set_json=set_json)
        out = self.run("template", "--include-crds", *args).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="session")
def helm() -> Helm:
    """hack/build-helm builds helm from its Go module the first time (a few minutes), then
    just prints the cached binary's path."""
    result = subprocess.run([str(BUILD_HELM)], capture_output=True, text=True, timeout=1800, check=False)
    if result.returncode != 0:
        pytest.fail(f"hack/build-helm failed:\n{result.stderr[-4000:]}")
    return Helm(Path(result.stdout.strip().splitlines()[-1]))


def find(manifests: Sequence[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]


def one(manifests: Sequence[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = find(manifests, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kinds(manifests: Sequence[Manifest]) -> list[str]:
    return sorted(m["kind"] for m in manifests)


def planned_trainer_pod(name: str = "llama", namespace: str = "team-a") -> dict[str, Any]:
    """The pod template of the trainer Job the operator plans for a minimal FineTuneJob."""
    from kubetune.operator import planning

    job = planning.parse(
        {
            "metadata": {"name": name, "namespace": namespace, "uid": "0000-1111", "generation": 1},
            "spec": {
                "model": {"name": "Qwen/Qwen2.5-0.5B"},
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": {"uri": "s3://models/out/"},
            },
        }
    )
    template: dict[str, Any] = planning.plan(job, planning.OperatorConfig()).job["spec"]["template"]
    return template
