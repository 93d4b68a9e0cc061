"""The import graph: which layer may import which, read from the source with ``ast``.

Layers: the shared core (``kubetune/`` but for the CLI glue ``kubetune/cli.py`` and
``kubetune/__main__.py``), the operator (``operator/`` = ``kubetune.operator``) and the trainer
(``trainer/`` = ``kubetune.trainer``). The rules:

- the core imports neither the operator, the trainer nor the CLI, not even inside a function;
- the operator never imports the trainer;
- the operator image installs no trainer extra (Dockerfile.operator), the trainer image no
  operator extra: nothing the core, the operator or the CLI runs at import time imports a
  trainer-only package (torch, transformers, ...), and nothing the core, the trainer or the CLI
  runs at import time imports an operator-only one (kopf);
- the CLI reaches the operator and the trainer only from inside its commands;
- the core's packages and modules (``kubetune.api``, ``kubetune.memory``, ...) form no cycle.

Every import counts: ``import``, ``from ... import`` (relative ones resolved), imports inside
functions and ``if TYPE_CHECKING:`` blocks, and ``importlib.import_module("literal")``. "At import
time" means outside any function and outside ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Source folder -> the import package it is (operator/ and trainer/ are symlinked into kubetune/).
SOURCES = {"kubetune": "kubetune", "operator": "kubetune.operator", "trainer": "kubetune.trainer"}
OPERATOR, TRAINER = "kubetune.operator", "kubetune.trainer"
GLUE = ("kubetune.cli", "kubetune.__main__")  # the CLI: may reach every layer, lazily

# Distribution names whose import name differs from the normalized distribution name.
IMPORT_NAMES = {"llama-cpp-python": "llama_cpp"}


@dataclass(frozen=True)
class Import:
    file: Path  # relative to ROOT
    line: int
    target: str  # the module imported, absolute
    statement: str  # the source text of the import
    at_import_time: bool  # runs when the module is imported (not inside a function or TYPE_CHECKING)

    def __str__(self) -> str:
        when = "at import time" if self.at_import_time else "lazily"
        return f"{self.file}:{self.line}: {self.statement}  ({self.target}, {when})"


@dataclass(frozen=True)
class Module:
    name: str
    file: Path
    is_package: bool


def modules() -> list[Module]:
    found = []
    for folder, package in SOURCES.items():
        for dirpath, dirnames, filenames in os.walk(ROOT / folder):  # symlinks are not followed
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not (here / d).is_symlink())
            for filename in sorted(f for f in filenames if f.endswith(".py")):
                path = here / filename
                parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
                is_package = parts[-1] == "__init__"
                if is_package:
                    parts.pop()
                found.append(Module(".".join([package, *parts]), path.relative_to(ROOT), is_package))
    return found


MODULES = modules()
KNOWN = {m.name for m in MODULES}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, at_import_time: bool) -> Iterator[tuple[ast.AST, bool]]:
    """Every node below ``node``, with whether it runs when the module is imported."""
    for child in ast.iter_child_nodes(node):
        now = at_import_time and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            yield child, now
            yield from _walk(child.test, now)
            for stmt in child.body:
                yield stmt, False
                yield from _walk(stmt, False)
            for stmt in child.orelse:
                yield stmt, now
                yield from _walk(stmt, now)
            continue
        yield child, now
        yield from _walk(child, now)


def _resolve(module: Module, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports(module: Module) -> list[Import]:
    source = (ROOT / module.file).read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(module.file))
    lines = source.splitlines()
    out = []
    for node, at_import_time in _walk(tree, True):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node.level, node.module)
            # `from kubetune import memory` imports the module kubetune.memory; `from kubetune.api
            # import FineTuneJob` imports kubetune.api.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in KNOWN else base for alias in node.names
            ]
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            targets = [node.args[0].value]
        if not targets:
            continue
        assert isinstance(node, ast.stmt | ast.expr)
        statement = " ".join(line.strip() for line in lines[node.lineno - 1 : node.end_lineno])
        for target in dict.fromkeys(targets):
            out.append(Import(module.file, node.lineno, target, statement, at_import_time))
    return out


GRAPH = {m.name: imports(m) for m in MODULES}


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def layer(name: str) -> str:
    if within(name, OPERATOR):
        return "operator"
    if within(name, TRAINER):
        return "trainer"
    if any(within(name, glue) for glue in GLUE):
        return "cli"
    return "core"


def _distributions(requirements: list[str]) -> set[str]:
    names = set()
    for requirement in requirements:
        dist = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()
        if dist != "kubetune":
            names.add(IMPORT_NAMES.get(dist, dist.replace("-", "_")))
    return names


def _extras() -> dict[str, list[str]]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extras: dict[str, list[str]] = pyproject["project"]["optional-dependencies"]
    return extras


# The trainer image's packages, plus TRL (a dev dependency, the peer of bench/; never in an image).
TRAINER_ONLY = _distributions(_extras()["trainer"]) | {"trl"}
OPERATOR_ONLY = _distributions(_extras()["operator"])


def violations(where: set[str], rule: str, *, forbidden: tuple[str, ...], at_import_time: bool) -> list[str]:
    return [
        f"{found}: {rule}"
        for name, found_imports in GRAPH.items()
        if layer(name) in where
        for found in found_imports
        if any(within(found.target, f) for f in forbidden) and (found.at_import_time or not at_import_time)
    ]


def test_the_graph_reads_every_layer() -> None:
    layers = {layer(name) for name in GRAPH}
    assert layers == {"core", "operator", "trainer", "cli"}
    assert {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"} <= TRAINER_ONLY
    assert "kopf" in OPERATOR_ONLY
    # Lazy imports are seen: the CLI reaches the trainer only from inside its commands.
    assert any(layer(i.target) == "trainer" and not i.at_import_time for i in GRAPH["kubetune.cli"])


def test_the_core_imports_neither_the_operator_nor_the_trainer_nor_the_cli() -> None:
    found = violations(
        {"core"}, "the shared core imports the operator, the trainer or the CLI",
        forbidden=(OPERATOR, TRAINER, *GLUE), at_import_time=False,
    )  # fmt: skip
    assert not found, "\n".join(found)


def test_the_operator_never_imports_the_trainer() -> None:
    found = violations(
        {"operator"}, "the operator imports the trainer", forbidden=(TRAINER,), at_import_time=False
    )
    assert not found, "\n".join(found)


def test_the_cli_reaches_the_operator_and_the_trainer_only_from_its_commands() -> None:
    found = violations(
        {"cli"}, "the CLI imports the operator or the trainer at import time",
        forbidden=(OPERATOR, TRAINER), at_import_time=True,
    )  # fmt: skip
    assert not found, "\n".join(found)


def test_nothing_the_operator_image_imports_needs_a_trainer_package() -> None:
    found = violations(
        {"core", "operator", "cli"}, "a trainer-only package at import time (not in the operator image)",
        forbidden=tuple(sorted(TRAINER_ONLY)), at_import_time=True,
    )  # fmt: skip
    assert not found, "\n".join(found)


def test_nothing_the_trainer_image_imports_needs_an_operator_package() -> None:
    found = violations(
        {"core", "trainer", "cli"}, "an operator-only package at import time (not in the trainer image)",
        forbidden=tuple(sorted(OPERATOR_ONLY)), at_import_time=True,
    )  # fmt: skip
    assert not found, "\n".join(found)


def core_unit(name: str) -> str | None:
    """The package or module of the core ``name`` belongs to (kubetune.memory.plan -> kubetune.memory)."""
    parts = name.split(".")
    if parts[0] != "kubetune" or len(parts) < 2 or layer(name) != "core":
        return None
    return ".".join(parts[:2])


def cycles(edges: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """The strongly connected components of more than one unit (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(unit: str) -> None:
        index[unit] = low[unit] = len(index)
        stack.append(unit)
        for other in sorted(edges.get(unit, {})):
            if other not in index:
                visit(other)
                low[unit] = min(low[unit], low[other])
            elif other in stack:
                low[unit] = min(low[unit], index[other])
        if low[unit] == index[unit]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == unit:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for unit in sorted(edges):
        if unit not in index:
            visit(unit)
    return found


def test_the_core_has_no_import_cycle() -> None:
    edges: dict[str, dict[str, list[Import]]] = {}
    for name, found_imports in GRAPH.items():
        source = core_unit(name)
        for found in found_imports:
            target = core_unit(found.target)
            if source is not None and target is not None and target != source:
                edges.setdefault(source, {}).setdefault(target, []).append(found)
    assert "kubetune.api" in edges.get("kubetune.memory", {}), "the graph of the core misses memory -> api"
    problems = []
    for component in cycles(edges):
        members = set(component)
        lines = [
            f"  {found}"
            for unit in component
            for target, found_imports in sorted(edges[unit].items())
            if target in members
            for found in found_imports
        ]
        problems.append(f"import cycle between {', '.join(component)}:\n" + "\n".join(lines))
    assert not problems, "\n".join(problems)


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {"a": []}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": []}, "b": {}}) == []


def test_the_operator_process_loads_no_trainer_code_nor_ml_framework(tmp_path: Path) -> None:
    """The operator's entry module and what it calls per FineTuneJob (the memory plan, which sizes
    built-in presets too), in a fresh interpreter started outside the repository."""
    code = textwrap.dedent(
        """
        import sys
        import kubetune.operator.main
        from kubetune import api
        from kubetune.operator import observe

        for model in ("kubetune/tiny-llama", "meta-llama/Llama-3.1-8B"):
            spec = api.FineTuneJobSpec.model_validate(
                {"model": {"name": model}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/"}}
            )
            assert observe.memory_verdict(spec) is not None, model
        heavy = {heavy!r}
        loaded = [m for m in sys.modules if m.split(".")[0] in heavy or m.startswith("kubetune.trainer")]
        print(sorted(loaded))
        """
    ).replace("{heavy!r}", repr(sorted(TRAINER_ONLY)))
    found = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]", f"the operator process loaded: {found.stdout}"
