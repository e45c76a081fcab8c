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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

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

    def legend(self) -> str:
        """What the shading means, in words, for a line under a heatmap."""
        sides = {
            "high": f"{_fmt(self.high.value)} ({self.high.why})",
            "low": f"{_fmt(self.low.value)} ({self.low.why})",
        }
        shown = [self.bad] if self.bad in ("high", "low") else ["low", "high"]
        reach = " and ".join(sides[side] for side in shown)  # type: ignore[index]
        return (
            f"{direction_words(self.bad)}; one scale for every panel, from the median "
            f"{_fmt(self.centre)} to {reach}" + (" (log scale)" if self.log else "")
        )


def direction_words(bad: Direction | None) -> str:
    """'high is bad', 'low is bad', 'both extremes are suspect' or the neutral wording."""
    return {
        "high": "high is bad",
        "low": "low is bad",
        "both": "both extremes are suspect",
    }.get(bad or "", "neither direction is bad by itself")


def rule_bounds(rules: Iterable[Rule], key: str) -> list[Bound]:
    """The absolute bounds that head rules set on the metric ``key`` (e.g. ``top_k_ratio``,
    or ``top_k_ratio(k=5)`` with a parameter), for :func:`metric_scale`."""
    return [
        Bound(rule.name, rule.min, rule.max)
        for rule in rules
        if rule.request.key == key and rule.scope == "head" and (rule.min, rule.max) != (None, None)
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
    data = np.array([v for v in values if math.isfinite(v) and (v > 0 or not log)], dtype=float)
    if log:
        data = np.log10(data)
    if data.size == 0:
        data = np.zeros(1)
    centre = float(np.median(data))
    spread = _MAD_TO_SD * float(np.median(np.abs(data - centre)))
    if spread == 0:  # most values equal: fall back to the full range, or to 1
        spread = float(np.max(np.abs(data - centre))) / ROBUST_REACH or 1.0 / ROBUST_REACH

    def unlog(x: float) -> float:
        return 10**x if log else x

    def side(limits: list[Reach], sign: int) -> Reach:
        """The tightest limit strictly beyond the centre on this side, else the robust one."""
        beyond = [
            r
            for r in limits
            if (r.value > 0 or not log)
            and sign * ((math.log10(r.value) if log else r.value) - centre) > 0
        ]
        if beyond:
            return min(beyond, key=lambda r: sign * r.value)
        reach = unlog(centre + sign * ROBUST_REACH * spread)
        if reach < 0 <= float(data.min()) and centre > 0:  # nothing negative was seen
            return Reach(0.0, f"{ROBUST_REACH:g} robust SD would reach below 0")
        return Reach(reach, f"{ROBUST_REACH:g} robust SD")

    highs = [Reach(b.max, f"rule {b.rule!r} max") for b in bounds if b.max is not None]
    lows = [Reach(b.min, f"rule {b.rule!r} min") for b in bounds if b.min is not None]
    return Scale(metric, bad, log, unlog(centre), side(lows, -1), side(highs, +1))


def _fmt(value: float) -> str:
    return f"{value:.4g}"
