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
#: Version 3 added ``step`` (the checkpoint's place in a training run, or null) and a broken
#: rule's ``window`` (trend rules). Version 4 added each item's ``stack`` (``encoder``,
#: ``decoder`` or ``cross`` in an encoder-decoder model, else null) and the model's
#: ``stacks`` (layers per stack, or null); nothing earlier changed meaning.
SCHEMA = "pytest-spectral-report"
SCHEMA_VERSION = 4
#: Versions a baseline or a history may read: what they need (model layout, items' metrics,
#: outcomes and singular values) is the same in all of them; before version 3 a report has
#: no step, and a history orders it by when it was created; before version 4 no stack (its
#: items are of a model of one stack, as no earlier version analysed another).
READABLE_SCHEMA_VERSIONS = (1, 2, 3, 4)


def schema_problem(document: object) -> str | None:
    """Why a parsed JSON document is not a report this plugin reads (no ``schema``, or a
    ``schema_version`` outside :data:`READABLE_SCHEMA_VERSIONS`), or ``None``. Shared by
    every reader of reports (baselines, histories), so that all refuse alike."""
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        return f"not a pytest-spectral report (no schema {SCHEMA!r})"
    version = document.get("schema_version")
    if isinstance(version, bool) or version not in READABLE_SCHEMA_VERSIONS:
        readable = ", ".join(map(str, READABLE_SCHEMA_VERSIONS))
        return f"report schema version {str(version)[:20]}; this plugin reads versions {readable}"
    return None


#: how a report writes a metric or singular value that is not finite
NON_FINITE_NUMBERS = ("nan", "inf", "-inf")


def value_kind(value: object) -> str:
    """A bounded description of an unexpected value for an error message: its type and repr,
    cut to 80 characters (a hostile report may hold a megabyte-long string)."""
    return f"{type(value).__name__} {value!r}"[:80]


def report_number(where: str, value: object) -> float:
    """A number as reports write it: a JSON number, or ``"nan"``, ``"inf"``, ``"-inf"``.

    Shared by every reader of reports so that all accept and refuse the same values. Raises
    :class:`ValueError` saying what ``where`` (the key's path in the report) holds instead, or
    that an integer is beyond float range; readers prefix the file's name.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float range
            raise ValueError(f"{where} is out of range: {str(value)[:40]}") from None
    if value in NON_FINITE_NUMBERS:
        return float(value)  # type: ignore[arg-type]
    raise ValueError(f'{where} must be a number (or "nan", "inf", "-inf"), got {value_kind(value)}')


#: An item's outcome in the report: its verdict (passed, failed, warned), or what pytest says
#: happened to an item without one: ``error`` (it crashed or raised), ``skipped``, ``not_run``.
OUTCOMES = ("passed", "failed", "warned", "error", "skipped", "not_run")


@dataclass(frozen=True)
class SliceSpectra:
    """Singular values of a batch of head slices, with how each was obtained."""

    singular_values: np.ndarray  # [slices, r], float64, descending; nan where non-finite
    nonfinite: list[int]  # non-finite weights per slice
    #: per slice: "gram" (float64 Gram + eigvalsh), "cholqr2" or "qr" (where the Gram route
    #: could not be certified; see :mod:`pytest_spectral.compute.spectra`) or "svd32"
    #: (float32 SVD, ``--spectral-dtype float32``)
    methods: list[str]
    #: built-in metric columns (metric key -> one value per slice), kept in the cache
    metrics: Mapping[str, np.ndarray] = field(default_factory=dict)
    #: per slice, the measurement floor where it is not a function of the values alone (a
    #: circuit's, from its factors' norms); ``None`` for a slice of one weight
    floor: np.ndarray | None = None


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
    refined: int  # slices beyond the Gram route (cholqr2 or qr)
    from_cache: int
    seconds: float
