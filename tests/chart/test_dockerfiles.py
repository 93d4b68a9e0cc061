"""The operator and trainer images, read statically (no container engine needed): what they
install, as whom they run, and hadolint's verdict."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kubetune import contract

from .conftest import ROOT, planned_trainer_pod

ML_PACKAGES = {"torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "triton"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    stage: int


def instructions(path: Path) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    stage = -1
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, arguments = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "RUN":  # the command, without RUN's own --mount options
            arguments = re.sub(r"^(\s*--mount=\S+)+", "", arguments)
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, arguments.strip(), stage))
        logical = ""
    return out


def final_stage(path: Path) -> list[Instruction]:
    found = instructions(path)
    last = max(i.stage for i in found)
    return [i for i in found if i.stage == last]


def base_image(path: Path) -> str:
    """The final stage's base image, build arguments replaced by their defaults."""
    defaults: dict[str, str] = {}
    for instruction in instructions(path):
        if instruction.keyword == "ARG" and instruction.stage == -1 and "=" in instruction.arguments:
            name, _, value = instruction.arguments.partition("=")
            defaults[name] = value
    image = final_stage(path)[0].arguments
    return re.sub(r"\$\{(\w+)\}", lambda match: defaults[match.group(1)], image)


def install_commands(path: Path) -> list[list[str]]:
    """Every `pip install`, `uv pip install` and `uv sync` command of the RUN instructions."""
    commands = []
    for instruction in instructions(path):
        if instruction.keyword != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", instruction.arguments):
            words = shlex.split(command)
            if re.search(r"\bpip install\b", " ".join(words)) or words[:2] == ["uv", "sync"]:
                commands.append(words)
    return commands


def project_extras(path: Path) -> set[str]:
    """The extras of this project that the image installs: `.[a,b]` and `uv sync --extra a`."""
    extras: set[str] = set()
    for words in install_commands(path):
        for word in words:
            match = re.fullmatch(r"\.\[([a-z0-9_,-]+)\]", word)
            if match:
                extras.update(match.group(1).split(","))
        extras.update(words[i + 1] for i, word in enumerate(words[:-1]) if word == "--extra")
    return extras


def exported_extras(path: Path) -> set[str]:
    """The extras the constraints exported from uv.lock are for."""
    extras: set[str] = set()
    for instruction in instructions(path):
        for command in re.split(r"&&", instruction.arguments):
            words = shlex.split(command)
            if words[:2] == ["uv", "export"]:
                assert "--frozen" in words, "constraints come from uv.lock as it is"
                extras.update(words[i + 1] for i, word in enumerate(words[:-1]) if word == "--extra")
    return extras


def test_instructions_are_read_correctly(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "FROM a AS build\n# comment\nRUN pip install uv \\\n    && uv pip install --python x '.[operator]'\n"
        "FROM b\nRUN uv sync --frozen --extra trainer --extra operator\nUSER 1000:1000\n"
    )
    assert project_extras(dockerfile) == {"operator", "trainer"}
    assert [(i.keyword, i.stage) for i in final_stage(dockerfile)] == [("FROM", 1), ("RUN", 1), ("USER", 1)]
    assert len(install_commands(dockerfile)) == 3
    dockerfile.write_text(
        "FROM a\nRUN --mount=type=cache,target=/c \\\n    uv export --frozen --extra x -o c\n"
    )
    assert exported_extras(dockerfile) == {"x"}
    dockerfile.write_text("ARG BASE=python:3.11-slim\nARG UV=uv:1\nFROM ${UV} AS uv\nFROM ${BASE}\n")
    assert base_image(dockerfile) == "python:3.11-slim"


def pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def extras_the_tests_use() -> set[str]:
    """hack/setup installs `--extra ...` for the tests (the dev extra brings the same ones)."""
    setup = (ROOT / "hack" / "setup").read_text()
    match = re.search(r"^extras=\(([^)]*)\)", setup, re.MULTILINE)
    assert match, "hack/setup names the extras it installs"
    words = match.group(1).split()
    return {words[i + 1] for i, word in enumerate(words[:-1]) if word == "--extra"}


@pytest.mark.parametrize(
    ("dockerfile", "extra"), [("Dockerfile.operator", "operator"), ("Dockerfile.trainer", "trainer")]
)
def test_each_image_installs_the_project_with_its_own_extra(dockerfile: str, extra: str) -> None:
    path = ROOT / dockerfile
    optional = pyproject()["project"]["optional-dependencies"]  # type: ignore[index]
    assert extra in optional
    assert extra in extras_the_tests_use()
    assert exported_extras(path) == {extra}, "the dependencies are the lock's for the image's extra"
    assert project_extras(path) <= {extra}
    project = [words for words in install_commands(path) if "." in words]
    assert project, "the image installs the project"
    assert all("--no-deps" in words for words in project), "the project adds nothing beyond the lock's list"


def lock_closure(extras: set[str]) -> set[str]:
    """The packages uv.lock installs for kubetune with ``extras`` (Linux, every marker taken)."""
    with (ROOT / "uv.lock").open("rb") as f:
        lock = tomllib.load(f)
    packages: dict[str, dict[str, Any]] = {canonicalize_name(p["name"]): p for p in lock["package"]}
    todo = [("kubetune", frozenset(extras))]
    seen: set[str] = set()
    while todo:
        name, wanted = todo.pop()
        package = packages[name]
        key = f"{name}[{','.join(sorted(wanted))}]"
        if key in seen:
            continue
        seen.add(key)
        deps = list(package.get("dependencies", []))
        for extra in wanted:
            deps += package.get("optional-dependencies", {}).get(extra, [])
        for dep in deps:
            todo.append((canonicalize_name(dep["name"]), frozenset(dep.get("extra", []))))
    return {key.split("[")[0] for key in seen}


def test_the_operator_image_has_no_ml_framework() -> None:
    path = ROOT / "Dockerfile.operator"
    words = {word for command in install_commands(path) for word in command}
    assert not any("trainer" in word for word in words)
    assert not {canonicalize_name(w) for w in words} & ML_PACKAGES
    operator_packages = lock_closure({"operator"})
    assert "kopf" in operator_packages and "kubernetes" in operator_packages
    assert not operator_packages & ML_PACKAGES, sorted(operator_packages & ML_PACKAGES)
    # The check above can see torch: the trainer extra does pull it in.
    assert {"torch", "bitsandbytes"} <= lock_closure({"trainer"})


def test_the_operator_extra_is_what_the_lock_resolves() -> None:
    optional = pyproject()["project"]["optional-dependencies"]  # type: ignore[index]
    declared = {canonicalize_name(Requirement(r).name) for r in optional["operator"]}
    assert declared <= lock_closure({"operator"})


def test_the_operator_image() -> None:
    path = ROOT / "Dockerfile.operator"
    stage = final_stage(path)
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base_image(path))
    assert ("USER", "1000:1000") in [(i.keyword, i.arguments) for i in stage]
    entrypoint = [i.arguments for i in stage if i.keyword == "ENTRYPOINT"]
    assert entrypoint == ['["kubetune"]'], "the chart passes `operator ...` as args"


def test_the_trainer_image_matches_the_pod_the_operator_plans() -> None:
    path = ROOT / "Dockerfile.trainer"
    stage = final_stage(path)
    keywords = [(i.keyword, i.arguments) for i in stage]
    assert ("USER", f"{contract.TRAINER_UID}:{contract.TRAINER_UID}") in keywords
    assert ("EXPOSE", "9400") in keywords
    assert ("ENTRYPOINT", '["kubetune", "trainer"]') in keywords
    env = " ".join(i.arguments for i in stage if i.keyword == "ENV")
    pod = planned_trainer_pod()
    [container] = pod["spec"]["containers"]
    assert container["command"][:2] == ["kubetune", "trainer"]
    assert pod["spec"]["securityContext"]["runAsUser"] == contract.TRAINER_UID
    pod_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for name in ("HF_HOME", "HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR"):
        assert f"{name}={pod_env[name]}" in env, f"{name} differs from the pod's"
    assert pod_env["HF_HOME"].startswith(contract.SCRATCH_DIR + "/")
    assert "KUBETUNE_METRICS_PORT=9400" in env
    base = base_image(path)
    assert "cuda" in base.lower() or "pytorch" in base.lower()


def dockerignore_allows(path: str) -> bool:
    allowed = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern + "/*"):
            allowed = negated
    return allowed


@pytest.mark.parametrize("dockerfile", ["Dockerfile.operator", "Dockerfile.trainer"])
def test_what_the_images_copy_is_in_the_build_context(dockerfile: str) -> None:
    for instruction in instructions(ROOT / dockerfile):
        if instruction.keyword != "COPY" or instruction.arguments.startswith("--from"):
            continue
        *sources, _ = instruction.arguments.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert dockerignore_allows(source.rstrip("/")), f"{source} is excluded by .dockerignore"
    for heavy in (".venv", ".git", "runs", "tests", "testkit"):
        assert not dockerignore_allows(heavy), f"{heavy} would be sent to the image build"


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is missing: it comes with the dev extra (hack/setup --test-tools)")
    return found


@pytest.mark.parametrize("dockerfile", ["Dockerfile.operator", "Dockerfile.trainer"])
def test_hadolint_passes(dockerfile: str) -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", dockerfile],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_problem(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install kopf\n")
    result = subprocess.run(
        [hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the :latest tag


@pytest.mark.parametrize("dockerfile", ["Dockerfile.operator", "Dockerfile.trainer"])
def test_the_images_use_the_uv_that_reads_the_lock(dockerfile: str) -> None:
    setup = re.search(r"^UV_VERSION=(\S+)", (ROOT / "hack" / "setup").read_text(), re.MULTILINE)
    assert setup, "hack/setup pins uv"
    pins = set(re.findall(r"\buv(?:==|:)(\d+\.\d+\.\d+)", (ROOT / dockerfile).read_text()))
    assert pins == {setup.group(1)}
