"""Hooks that conftests and other plugins can implement to extend pytest-spectral."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pytest_spectral.judging.metrics import MetricRegistry


@pytest.hookspec
def pytest_spectral_register_metrics(metrics: MetricRegistry) -> None:
    """Add metrics that rules can name, by calling ``metrics.add(name, function, ...)``.

    Called once per process when a spectral run starts (before the rules file is read).
    Example, in a ``conftest.py``::

        import numpy as np

        def pytest_spectral_register_metrics(metrics):
            metrics.add("tail_share", lambda sv, k=4: sv[..., -k:].sum(-1) / sv.sum(-1), k=4)
    """
