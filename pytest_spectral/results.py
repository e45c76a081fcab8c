"""Plain result types shared by the engine, the cache and the items (no torch needed)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

#: A JSON-ready record of one item, as it appears in the report's ``items``.
Record = dict[str, object]
#: Identifies a JSON report (``--spectral-report``) and the version of its layout. Version 2
#: split failed and warned slices into ``regressions`` and ``candidates`` (in version 1 every
#: one was a candidate) and gave each broken rule its ``bound`` and effective ``suggest``.
SCHEMA = "pytest-spectral-report"
SCHEMA_VERSION = 2
#: Versions a baseline may have: what a baseline needs (model layout, items' metrics) is the
#: same in all of them.
READABLE_SCHEMA_VERSIONS = (1, 2)
#: An item's outcome in the report: its verdict (passed, failed, warned), or what pytest says
#: happened to an item without one: ``error`` (it crashed or raised), ``skipped``, ``not_run``.
OUTCOMES = ("passed", "failed", "warned", "error", "skipped", "not_run")


@dataclass(frozen=True)
class SliceSpectra:
    """Singular values of a batch of head slices, with how each was obtained."""

    singular_values: np.ndarray  # [slices, r], float64, descending; nan where non-finite
    nonfinite: list[int]  # non-finite weights per slice
    #: per slice: "gram" (float64 Gram + eigvalsh), "svd" (float64 SVD, where the Gram
    #: route could not be certified) or "svd32" (float32 SVD, ``--spectral-dtype float32``)
    methods: list[str]
    #: built-in metric columns (metric key -> one value per slice), kept in the cache
    metrics: Mapping[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class HeadSpectrum:
    """Everything an item needs about its slice: values, metrics and how they were obtained."""

    singular_values: list[float]
    metrics: dict[str, float]
    nonfinite: int
    method: str
    #: sigma_min is below what storage and float64 rounding let one measure, so the
    #: condition number is a lower bound (see metrics.measurement_floor)
    floor_limited: bool = False


@dataclass(frozen=True)
class LayerStats:
    """What computing one layer took, for progress lines."""

    layer: int
    slices: int
    direct_svd: int
    from_cache: int
    seconds: float
