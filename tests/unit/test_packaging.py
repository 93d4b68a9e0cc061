"""What the kubetune wheel ships: kubetune and nothing of the test kit.

The wheel is built here the way the images build the project (the setuptools backend on a
copy of the checkout), then read: its packages, the imports of its modules, and an import of
every module with the dev-only distributions (the test kit, pytest, trustme, ...) made
unimportable, as they are in the images.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Top-level modules that only the dev extra installs: nothing the wheel ships may import them.
DEV_ONLY = frozenset(
    {
        "kubetune_testkit",
        "pytest",
        "_pytest",
        "pytest_timeout",
        "trustme",
        "cryptography",
        "moto",
        "trl",
        "mypy",
        "ruff",
        "mypy_boto3_s3",
    }
)
# Left out of the copy the wheel is built from: caches, environments, build output.
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", ".*cache", "__pycache__", "*.egg-info", "build", "dist", "runs", ".*-cluster"
)
BUILD_WHEEL = "import sys; from setuptools import build_meta; build_meta.build_wheel(sys.argv[1])"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source") / "kubetune"
    # The whole checkout (testkit/ included), so that a packages.find that picked up the test
    # kit would show here; symlinks stay links, as kubetune/operator -> ../operator is one.
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_COPIED)
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-P", "-c", BUILD_WHEEL, str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (built,) = out.glob("kubetune-*.whl")
    return built


def wheel_files(wheel: Path) -> list[PurePosixPath]:
    with zipfile.ZipFile(wheel) as archive:
        return [PurePosixPath(name) for name in archive.namelist()]


def test_the_wheel_ships_kubetune_and_no_test_kit(wheel: Path) -> None:
    files = wheel_files(wheel)
    assert {file.parts[0] for file in files if not file.parts[0].endswith(".dist-info")} == {"kubetune"}
    names = {str(file) for file in files}
    # The symlinked packages are in, as files.
    assert {"kubetune/operator/main.py", "kubetune/trainer/pipeline.py"} <= names
    kit = sorted(name for name in names if re.search(r"testing|testkit|fixtures|trustme", name))
    assert kit == [], "the wheel carries the test kit"


def runtime_imports(tree: ast.AST) -> set[str]:
    """The modules ``tree`` imports, less those under ``if TYPE_CHECKING:`` (stubs, for mypy)."""
    modules: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in {"TYPE_CHECKING", "typing.TYPE_CHECKING"}:
            modules |= runtime_imports(ast.Module(body=node.orelse, type_ignores=[]))
            continue
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
        modules |= runtime_imports(node)
    return modules


def test_no_module_in_the_wheel_imports_a_dev_dependency(wheel: Path) -> None:
    offenders = {}
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.endswith(".py"):
                modules = runtime_imports(ast.parse(archive.read(name).decode()))
                dev = sorted(module for module in modules if module.split(".")[0] in DEV_ONLY)
                if dev:
                    offenders[name] = dev
    assert offenders == {}


# Run in a fresh interpreter on the unpacked wheel: the dev-only modules are unimportable, the
# checkout is not on sys.path (-P), and every module of the wheel is imported.
IMPORT_ALL = """
import importlib, importlib.abc, sys
from pathlib import Path

blocked = frozenset(sys.argv[2].split(","))

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"{name} is a dev-only module", name=name)
        return None

sys.meta_path.insert(0, Blocker())
root = Path(sys.argv[1])
sys.path.insert(0, str(root))
failed = []
for file in sorted((root / "kubetune").rglob("*.py")):
    parts = file.relative_to(root).with_suffix("").parts
    if parts[-1] == "__main__":
        continue
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    try:
        module = importlib.import_module(name)
    except Exception as error:
        failed.append(f"{name}: {type(error).__name__}: {error}")
        continue
    assert Path(module.__file__).is_relative_to(root), f"{name} came from {module.__file__}"
print("\\n".join(failed))
"""


def test_every_module_in_the_wheel_imports_without_the_dev_dependencies(wheel: Path, tmp_path: Path) -> None:
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    result = subprocess.run(
        [sys.executable, "-P", "-c", IMPORT_ALL, str(unpacked), ",".join(sorted(DEV_ONLY))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    assert result.stdout.strip() == "", "modules that do not import:\n" + result.stdout
