"""What the engine computes and serves: units, their errors, and their metric columns.

A unit is one (matrix, scope) of a layer: every distinct head of a matrix ("head" scope) or
the whole matrix ("matrix" scope). It is read, decomposed, cached and failed as one.
"""

from __future__ import annotations

import numpy as np

from pytest_spectral.checkpoints.checkpoint import Checkpoint
from pytest_spectral.judging.metrics import MetricContext, MetricRequest

#: (matrix, scope): one spectrum per distinct head ("head") or a single one ("matrix")
Unit = tuple[str, str]


class UnitError(Exception):
    """One (layer, matrix, scope) could not be served; its items fail with this message."""


class MetricError(UnitError, ValueError):
    """A metric function (typically a user's) that failed or returned the wrong shape."""


def metric_context(
    checkpoint: Checkpoint, layer: int, unit: Unit, floor: np.ndarray | None = None
) -> MetricContext:
    """What shape-aware metrics need about the unit's items: the item's shape, the storage
    dtype and, for a circuit, the per-slice measurement floor."""
    matrix, scope = unit
    return MetricContext(
        checkpoint.item_shape(matrix, whole=scope == "matrix", block=layer),
        checkpoint.sources(layer, matrix)[0].dtype,
        None if floor is None else tuple(floor.tolist()),
    )


def metric_column(
    request: MetricRequest, values: np.ndarray, context: MetricContext
) -> list[float]:
    """One value per slice of ``values`` (``[slices, r]``), or a :class:`MetricError` naming
    the metric that misbehaved."""
    try:
        column = np.asarray(request.compute(values, context), dtype=np.float64)
    except Exception as exc:
        raise MetricError(f"metric {request.key!r} failed: {type(exc).__name__}: {exc}") from None
    if column.shape != values.shape[:1]:
        raise MetricError(
            f"metric {request.key!r} returned shape {list(column.shape)} for {values.shape[0]} "
            "slices; it must reduce the last axis (one value per slice)"
        )
    return column.tolist()


def read_failure(checkpoint: Checkpoint, layer: int, unit: Unit, exc: BaseException) -> UnitError:
    """The error of a unit whose tensors could not be read: each tensor (a circuit reads two)
    with its file, and the cause."""
    sources = checkpoint.sources(layer, unit[0])
    names = " and ".join(f"{source.name} from {source.file}" for source in sources)
    return UnitError(f"cannot read {names}: {describe(exc)}")


def describe(exc: BaseException) -> str:
    """An exception as a reader can act on it: its text, and its kind where the text is terse."""
    text = str(exc).strip()
    if isinstance(exc, (OSError, UnitError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
