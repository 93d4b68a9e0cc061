"""Shared by every tier: the harness's fixtures, and one CPU precision path for the whole run."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["kubetune_testkit.controlplane_fixtures", "kubetune_testkit.s3_fixtures"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cpu-bf16",
        choices=("none", "native", "auto"),
        default=os.environ.get("KUBETUNE_CPU_BF16") or "none",
        help="what `precision: auto` takes this CPU to have (KUBETUNE_CPU_BF16 in every trainer the "
        "tests start): none (fp32, the default, so that what a tiny model learns is the same on "
        "every CPU), native (bf16 autocast, emulated where the CPU lacks it) or auto (detect)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Set before any test or trainer process starts, so that subprocesses inherit it.
    os.environ["KUBETUNE_CPU_BF16"] = config.getoption("--cpu-bf16")
