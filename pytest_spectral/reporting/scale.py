"""One colour scale per metric, on which outliers are loud and healthy variation is quiet.

A map shaded by the quantiles of its own values gives the healthy spread of a checkpoint and a
collapsed head the same darkest shade, and two panels with their own ranges cannot be
compared. Here every panel of a metric shares one scale, centred on the median of all its
values, and reaching on each side to where a value becomes a problem:

* the tightest rule bound on that side of the median (a ``min`` below it, a ``max`` above it),
  when a rule covers the metric: at its bound a value is as loud as it gets;
* otherwise 5 robust standard deviations (1.4826 x the median absolute deviation, the
  standard deviation of normal data; a modified z-score of 3.5 is the usual outlier mark),
  cut at 0 for a metric with no negative values.

Which side is bad comes from the metric's metadata (``MetricSpec.bad``): only that side is
shaded in the terminal, and legends say it in words. Metrics drawn on a log scale
(``first_last_ratio``) are centred and measured in log10.

A rule judges only some items (its ``matrices``, ``layers``, ``heads`` and ``scope``), so the
bound a cell is drawn against is that of the rules that judge that cell
(:func:`cell_scales`): a q head is never drawn "at or beyond" a bound written for v and o,
and "at or beyond" always means the item broke a rule. The centre and the robust spread stay
common to every cell of a view, so healthy variation reads the same everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pytest_spectral.checkpoints.checkpoint import HEAD_MATRICES
from pytest_spectral.checkpoints.families import (
    WHOLE_ONLY_MATRICES,
    split_expert_item,
)
from pytest_spectral.judging.metrics import Direction
from pytest_spectral.judging.rules import Rule

#: reach of the scale, in robust standard deviations, on a side no rule bounds
ROBUST_REACH = 5.0
#: the median absolute deviation of normally distributed data, in standard deviations
_MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class Bound:
    """A rule's bound on the metric: its name and ``min`` / ``max`` (either may be absent)."""

    rule: str
    min: float | None
    max: float | None


@dataclass(frozen=True)
class Reach:
    """Where one side of the scale ends (in the metric's units) and why."""

    value: float
    why: str  # "rule 'name' max" or "5 robust SD"


@dataclass(frozen=True)
class Scale:
    """A metric's scale: ``position`` is 0 at the median and +-1 at the reach of each side."""

    metric: str
    bad: Direction | None
    log: bool
    centre: float  # the median, in the metric's units
    low: Reach
    high: Reach

    def _transform(self, value: float) -> float:
        if not self.log:
            return value
        return math.log10(value) if value > 0 else -math.inf

    def position(self, value: float) -> float:
        """Signed distance from the median: -1 at the low reach, +1 at the high one."""
        x, centre = self._transform(value), self._transform(self.centre)
        if x >= centre:
            return (x - centre) / (self._transform(self.high.value) - centre)
        return -(centre - x) / (centre - self._transform(self.low.value))

    def badness(self, value: float) -> float:
        """How far the value has gone towards trouble, 0 (the median, or the harmless side)
        to 1 (at the reach) and beyond; both sides count when no side (or both) is bad."""
        position = self.position(value)
        if self.bad == "high":
            return max(0.0, position)
        if self.bad == "low":
            return max(0.0, -position)
        return abs(position)

    def reach_words(self) -> str:
        """Where the scale ends on the side(s) that count: ``0.8 (rule 'x' max)``."""
        sides = {
            "high": f"{_fmt(self.high.value)} ({self.high.why})",
            "low": f"{_fmt(self.low.value)} ({self.low.why})",
        }
        shown = [self.bad] if self.bad in ("high", "low") else ["low", "high"]
        return " and ".join(sides[side] for side in shown)  # type: ignore[index]

    def legend(self, across: str = "every panel") -> str:
        """What the shading means, in words, for a line under a heatmap; ``across`` says what
        shares the scale."""
        return (
            f"{direction_words(self.bad)}; one scale for {across}, from the median "
            f"{_fmt(self.centre)} to {self.reach_words()}" + (" (log scale)" if self.log else "")
        )


def direction_words(bad: Direction | None) -> str:
    """'high is bad', 'low is bad', 'both extremes are suspect' or the neutral wording."""
    return {
        "high": "high is bad",
        "low": "low is bad",
        "both": "both extremes are suspect",
    }.get(bad or "", "neither direction is bad by itself")


def rule_bounds(rules: Iterable[Rule], key: str) -> list[Bound]:
    """The absolute bounds that rules set on the metric ``key`` (e.g. ``top_k_ratio``, or
    ``top_k_ratio(k=5)`` with a parameter), for :func:`metric_scale`."""
    return [
        Bound(rule.name, rule.min, rule.max)
        for rule in rules
        if rule.request.key == key and (rule.min, rule.max) != (None, None)
    ]


def metric_scale(
    metric: str,
    values: Iterable[float],
    *,
    bad: Direction | None,
    bounds: Sequence[Bound] = (),
    log: bool = False,
) -> Scale:
    """The scale of ``metric`` over ``values`` (non-finite ones ignored), reaching to the
    tightest of ``bounds`` on each side of the median or to :data:`ROBUST_REACH` robust SDs."""
    return _Spread.of(values, log).scale(metric, bad, bounds)


#: one item in a heatmap: (layer, query head or ``None`` for a whole matrix, matrix)
Cell = tuple[int, "int | None", str]


def cell_scales(
    metric: str,
    values: Mapping[Cell, float],
    *,
    bad: Direction | None,
    rules: Sequence[Rule] = (),
    log: bool = False,
) -> dict[Cell, Scale]:
    """Each cell's scale: the median and robust spread of all ``values``, reaching on each
    side to the tightest bound beyond the median of the ``rules`` on ``metric`` that judge
    that cell (:meth:`Rule.applies_to`), else to the robust reach. Cells judged by the same
    rules share one :class:`Scale` object."""
    spread = _Spread.of(values.values(), log)
    bounded = [r for r in rules if r.request.key == metric and (r.min, r.max) != (None, None)]
    made: dict[tuple[Bound, ...], Scale] = {}
    scales = {}
    for cell in values:
        bounds = tuple(rule_bounds((r for r in bounded if r.applies_to(*cell)), metric))
        if bounds not in made:
            made[bounds] = spread.scale(metric, bad, bounds)
        scales[cell] = made[bounds]
    return scales


def scales_legend(scales: Mapping[Cell, Scale], across: str = "every panel") -> str:
    """The legend of a map drawn with ``scales``: one scale in :meth:`Scale.legend`'s words;
    several as the reach of each and the cells it covers (``0.8 (rule 'qk' max) for q, k;
    0.6 (rule 'vo' max) for v, o``)."""
    groups: dict[Scale, list[Cell]] = {}
    for cell, scale in scales.items():
        groups.setdefault(scale, []).append(cell)
    if len(groups) == 1:
        return next(iter(groups)).legend(across)
    first = next(iter(groups))
    every = list(scales)
    reaches = "; ".join(
        f"{scale.reach_words()} for {_where(cells, every)}" for scale, cells in groups.items()
    )
    return f"{direction_words(first.bad)}; from the median {_fmt(first.centre)} to {reaches}" + (
        " (log scale)" if first.log else ""
    )


def _where(cells: Sequence[Cell], every: Sequence[Cell]) -> str:
    """The cells of one scale, in words: whole panels by matrix (``q, k``), else the layers or
    heads of a panel they cover (``q layers 0-1``), else how many."""
    order = HEAD_MATRICES + WHOLE_ONLY_MATRICES
    parts = []
    present = {cell[2] for cell in every}
    for matrix in sorted(
        present, key=lambda m: (m not in order, order.index(m) if m in order else 0, m)
    ):
        mine = {(c[0], c[1]) for c in cells if c[2] == matrix}
        panel = {(c[0], c[1]) for c in every if c[2] == matrix}
        if not mine:
            continue
        if mine == panel:
            parts.append(matrix)
            continue
        layers = sorted({layer for layer, _ in mine})
        heads = sorted({head for _, head in mine if head is not None})
        if mine == {(layer, head) for layer, head in panel if layer in layers}:
            parts.append(f"{matrix} layers {_spec(layers)}")
        elif heads and mine == {(layer, head) for layer, head in panel if head in heads}:
            parts.append(f"{matrix} heads {_spec(heads)}")
        else:
            parts.append(f"{matrix} ({len(mine)} of {len(panel)})")
    return ", ".join(parts)


def _spec(indices: Sequence[int]) -> str:
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


@dataclass(frozen=True)
class _Spread:
    """The median and robust spread of a view's values (in log10 for a log metric)."""

    centre: float
    spread: float
    log: bool
    non_negative: bool

    @classmethod
    def of(cls, values: Iterable[float], log: bool) -> _Spread:
        data = np.array([v for v in values if math.isfinite(v) and (v > 0 or not log)], dtype=float)
        if log:
            data = np.log10(data)
        if data.size == 0:
            data = np.zeros(1)
        centre = float(np.median(data))
        spread = _MAD_TO_SD * float(np.median(np.abs(data - centre)))
        if spread == 0:  # most values equal: fall back to the full range, or to 1
            spread = float(np.max(np.abs(data - centre))) / ROBUST_REACH or 1.0 / ROBUST_REACH
        return cls(centre, spread, log, float(data.min()) >= 0)

    def _unlog(self, x: float) -> float:
        return 10**x if self.log else x

    def _side(self, limits: list[Reach], sign: int) -> Reach:
        """The tightest limit strictly beyond the centre on this side, else the robust one."""
        beyond = [
            r
            for r in limits
            if (r.value > 0 or not self.log)
            and sign * ((math.log10(r.value) if self.log else r.value) - self.centre) > 0
        ]
        if beyond:
            return min(beyond, key=lambda r: sign * r.value)
        reach = self._unlog(self.centre + sign * ROBUST_REACH * self.spread)
        if reach < 0 and self.non_negative and self.centre > 0:  # nothing negative was seen
            return Reach(0.0, f"{ROBUST_REACH:g} robust SD would reach below 0")
        return Reach(reach, f"{ROBUST_REACH:g} robust SD")

    def scale(self, metric: str, bad: Direction | None, bounds: Sequence[Bound]) -> Scale:
        highs = [Reach(b.max, f"rule {b.rule!r} max") for b in bounds if b.max is not None]
        lows = [Reach(b.min, f"rule {b.rule!r} min") for b in bounds if b.min is not None]
        return Scale(
            metric,
            bad,
            self.log,
            self._unlog(self.centre),
            self._side(lows, -1),
            self._side(highs, +1),
        )


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def is_expert_record(record: Mapping[str, object]) -> bool:
    """Whether a record is of one expert's matrix (``expert05-gate``): heatmaps of whole
    matrices leave those out (hundreds per layer)."""
    return split_expert_item(str(record["matrix"]))[1] is not None
