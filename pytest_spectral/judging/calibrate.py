"""Writing a rules file from a known-good checkpoint's observed metrics.

Guessed thresholds either pass everything or fail healthy models (WeightWatcher's 2 < alpha < 6
flags a quarter of Llama-2-70B's matrices). Calibration takes the checkpoint you trust and
bounds each metric, per matrix type, by the range it actually spans there, widened by a
margin proportional to a robust spread (the 5th-95th percentile range). Every value of the
calibration checkpoint is inside its bounds by construction, so a calibrate-then-test round
trip passes, and a head that leaves the healthy range fails. Items that failed or warned in
the calibration run (the user's rules, or non-finite or zero weights) are left out.

Scale quantities (norms, condition number) are bounded on a log scale, where their spread is
symmetric; ratios and ranks on a linear one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from pytest_spectral.checkpoints.checkpoint import HEAD_MATRICES
from pytest_spectral.checkpoints.families import TEXT, matrix_kind
from pytest_spectral.judging.ranges import IndexSet
from pytest_spectral.printable import printable
from pytest_spectral.results import Record
from pytest_spectral.wording import counted, indices

#: The first words of every calibrated rules file: a file starting otherwise at the
#: --spectral-calibrate path is the user's own, and is never replaced.
CALIBRATION_MARK = "# Calibrated by pytest-spectral"
#: (metric, scale) pairs that calibration bounds.
CALIBRATED: tuple[tuple[str, str], ...] = (
    ("top_k_ratio", "linear"),
    ("least_k_ratio", "linear"),
    ("stable_rank", "linear"),
    ("effective_rank", "linear"),
    ("energy_rank", "linear"),
    ("spectral_norm", "log"),
    ("frobenius_norm", "log"),
    ("first_last_ratio", "log"),
)


@dataclass(frozen=True)
class Calibration:
    """A calibrated rules file's text, and how many items its bounds come from."""

    text: str
    used: int
    #: items left out of the bounds: they failed or warned (a rule, or non-finite or zero
    #: weights), so the user's own rules say they are not known-good
    left_out: int
    #: the part of the model the run measured, when not all of it (``layers 0 of 0-3``);
    #: each rule is restricted to the layers and heads its items came from
    part: str | None = None


def calibrated_rules(
    records: Iterable[Record],
    *,
    margin: float,
    source: str,
    layers: int | Mapping[str | None, int],
    heads: int | Mapping[str | None, int],
) -> Calibration:
    """A rules file bounding every calibrated metric per matrix type, by the items that
    passed: an item that broke a rule of this run would otherwise widen the bounds to pass
    the very problem that rule found.

    ``layers`` and ``heads`` are the model's counts; ``layers`` of an encoder-decoder model
    map each stack to its count, and each stack gets rules of its own (``stacks = [...]``):
    cross-attention's spectra need not look like self-attention's; ``heads`` may map each
    stack to its own count too. The layers in no stack (``None``) beside a named stack (a
    wrapper's text model beside its vision tower) get rules of ``stacks = ["text"]``. A run
    that measured part of the model (``--spectral-layers``, ``-k``) says nothing about the
    rest, so each rule gets the ``layers`` (and, for heads, the ``heads``) its items came
    from, whenever they are not all of the model's.
    """
    records = list(records)
    counts = dict(layers) if isinstance(layers, Mapping) else {None: layers}
    # a stack's own head count (a vision tower's), else the model's
    per_stack = dict(heads) if isinstance(heads, Mapping) else dict.fromkeys(counts, heads)
    healthy = [r for r in records if r["status"] == "ok" and r["outcome"] == "passed"]
    left_out = len(records) - len(healthy)
    parts = [
        (f"the {stack} stack's " if stack else "") + part
        for stack, count in counts.items()
        if (
            part := _part(
                [r for r in records if r.get("stack") == stack], count, per_stack[stack]
            )
        )
    ]
    part = "; ".join(parts) or None
    lines = [
        f"{CALIBRATION_MARK} on {printable(source)}",  # one line, whatever the path
        f"# at {datetime.now(timezone.utc).isoformat(timespec='seconds')}, from the "
        f"{counted(len(healthy), 'item')} that passed"
        + (
            f" ({left_out} that failed or warned {'was' if left_out == 1 else 'were'} left out)."
            if left_out
            else "."
        ),
        "# Each bound is the observed range widened on both sides by",
        f"# margin x (95th - 5th percentile), margin = {margin:g}; log-scale metrics are",
        "# widened by that factor of their log10 spread. Values of those items all lie",
        "# inside, so testing the checkpoint with this file passes them.",
    ]
    if part is not None:
        lines += [
            f"# The run measured only {part}: each rule is restricted to the layers and",
            "# heads its items came from (layers = ..., heads = ...).",
        ]
    for stack, count in counts.items():
        mine = [r for r in records if r.get("stack") == stack]
        name = stack or (TEXT if len(counts) > 1 else None)  # what a rule's stacks calls it
        lines += _stack_rules(mine, name, count, per_stack[stack], margin)
    return Calibration("\n".join(lines) + "\n", len(healthy), left_out, part)


def _stack_rules(
    records: Sequence[Record], stack: str | None, layers: int, heads: int, margin: float
) -> list[str]:
    """The rules of one stack's items (of the whole model, for a model of one stack)."""
    healthy = [r for r in records if r["status"] == "ok" and r["outcome"] == "passed"]
    selects = [] if stack is None else [f'stacks = ["{stack}"]']
    lines: list[str] = []
    # one rule per kind: every expert's gate matrix is bounded by the range of all of them
    matrices = list(dict.fromkeys(_kind(r) for r in healthy))
    for scope in ("head", "matrix"):
        for matrix in sorted(
            matrices,
            key=lambda m: (
                m not in HEAD_MATRICES,
                HEAD_MATRICES.index(m) if m in HEAD_MATRICES else 0,
                m,
            ),
        ):
            rows = [r for r in healthy if _kind(r) == matrix and r.get("scope", "head") == scope]
            measured = [
                r for r in records if _kind(r) == matrix and r.get("scope", "head") == scope
            ]
            where = [*selects, *_restriction(measured, layers, heads)]
            for metric, scale in CALIBRATED:
                values = _finite([r["metrics"].get(metric) for r in rows])  # type: ignore[attr-defined]
                if values.size:
                    rule = _rule(scope, matrix, metric, scale, values, margin, stack)
                    lines += ["", *rule, *where]
    return lines


def _kind(record: Record) -> str:
    return matrix_kind(str(record["matrix"]))


def _indices(records: Iterable[Record], key: str) -> list[int]:
    return sorted({int(r[key]) for r in records if r[key] is not None})  # type: ignore[call-overload]


def _covered(records: Sequence[Record], layers: int, heads: int) -> tuple[list[int], list[int]]:
    """The layers and the query heads the records cover, each empty where they cover all of
    the model's (whole-matrix records cover no head, which counts as all)."""
    found_layers = _indices(records, "layer")
    found_heads = _indices(records, "head")
    return (
        [] if found_layers == list(range(layers)) else found_layers,
        [] if found_heads == list(range(heads)) else found_heads,
    )


def _restriction(measured: Sequence[Record], layers: int, heads: int) -> list[str]:
    """The ``layers`` and ``heads`` lines of a rule whose items covered part of the model."""
    some_layers, some_heads = _covered(measured, layers, heads)
    return [
        *([f'layers = "{_spec(some_layers)}"'] if some_layers else []),
        *([f'heads = "{_spec(some_heads)}"'] if some_heads else []),
    ]


def _part(records: Sequence[Record], layers: int, heads: int) -> str | None:
    """``layers 0 of 0-3``, ``query heads 0-1 of 0-7``, both, or ``None`` for the whole model."""
    some_layers, some_heads = _covered(records, layers, heads)
    parts = [
        *([f"layers {_spec(some_layers)} of {indices(layers)}"] if some_layers else []),
        *([f"query heads {_spec(some_heads)} of {indices(heads)}"] if some_heads else []),
    ]
    return " and ".join(parts) or None


def _spec(numbers: list[int]) -> str:
    return IndexSet.of([(n, n) for n in numbers]).spec


def _finite(values: Sequence[object]) -> np.ndarray:
    numbers = np.array([float(v) for v in values if isinstance(v, int | float)], dtype=float)
    return numbers[np.isfinite(numbers)]


def _rule(
    scope: str,
    matrix: str,
    metric: str,
    scale: str,
    values: np.ndarray,
    margin: float,
    stack: str | None = None,
) -> list[str]:
    log = scale == "log" and bool((values > 0).all())
    data = np.log10(values) if log else values
    low, high = float(data.min()), float(data.max())
    p5, p95 = (float(x) for x in np.percentile(data, [5, 95]))
    widen = margin * (p95 - p5)
    lower, upper = low - widen, high + widen
    if log:  # numpy's power: inf or 0 (not OverflowError) past float64's range
        with np.errstate(over="ignore", under="ignore"):
            lower, upper = float(np.power(10.0, lower)), float(np.power(10.0, upper))
    lower = min(lower, float(values.min()))  # never inside the observed range after rounding
    upper = max(upper, float(values.max()))
    how = "log10 " if log else ""
    what = "heads" if scope == "head" else "whole matrices"
    where = matrix if stack is None else f"{stack}-{matrix}"
    name = f"calibrated-{where}-{metric}" + ("" if scope == "head" else "-whole")
    return [
        f"# {where} {what} (n={values.size}): observed {values.min():.6g} .. "
        f"{values.max():.6g}, {how}p5-p95 spread {p95 - p5:.4g}",
        "[[rules]]",
        f'name = "{name}"',
        f'metric = "{metric}"',
        f"min = {_toml_float(lower)}",
        f"max = {_toml_float(upper)}",
        f'matrices = ["{matrix}"]',
        f'scope = "{scope}"',
    ]


def _toml_float(value: float) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(float(value))
