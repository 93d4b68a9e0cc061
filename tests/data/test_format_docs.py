"""What people read about dataset formats names exactly the registered ones."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from kubetune.cli import app
from kubetune.trainer.data.formats import AUTO, names

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_formats() -> list[str]:
    """The first column of the table under the README's "Data formats" heading."""
    section = README.read_text(encoding="utf-8").split("### Data formats", 1)[1]
    table = re.search(r"(?m)^\|.*\|\n(?:^\|.*\|\n?)+", section)
    assert table is not None, "no table under ### Data formats"
    rows = table.group(0).splitlines()[2:]  # after the header and its rule
    return [row.split("|")[1].strip().strip("`") for row in rows]


def test_the_readme_table_lists_every_registered_format() -> None:
    assert readme_formats() == names()


def test_inspect_help_names_every_registered_format() -> None:
    result = CliRunner().invoke(app, ["data", "inspect", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    *first, last = [AUTO, *names()]
    assert f"{', '.join(first)} or {last}." in result.output
