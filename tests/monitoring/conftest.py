"""Prometheus and promtool built from their Go module (hack/build-prometheus), and the chart."""

from __future__ import annotations

import pytest

from kubetune_testkit.prometheus import Binaries, PrometheusError, find_binaries

from ..chart.conftest import helm

__all__ = ["helm", "prometheus_binaries"]


@pytest.fixture(scope="session")
def prometheus_binaries() -> Binaries:
    """Built the first time (several minutes), then found in the cache."""
    try:
        return find_binaries()
    except PrometheusError as error:
        pytest.fail(str(error))
