"""Judging one head's spectrum against the rules: which rules it breaks, and its outcome.

Two checks need no rule because no healthy checkpoint fails them: non-finite weights and an
all-zero slice. They fail the item even without a rules file, since a CI gate that passes
NaN weights is worse than none. In warn-only mode (``--spectral-warn-only``) every problem,
these included, is reported as a warning and nothing fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pytest_spectral.judging.rules import Rule, Severity
from pytest_spectral.results import HeadSpectrum

Status = Literal["ok", "nonfinite", "zero_matrix"]
Outcome = Literal["passed", "failed", "warned"]
Bound = Literal["min", "max", "min_change", "max_change"]
Suggestion = Literal["low_rank", "remove_head", "none"]


@dataclass(frozen=True)
class BrokenRule:
    rule: Rule
    value: float
    severity: Severity  # the rule's, or "warn" in warn-only mode
    reason: str
    #: the reference of a change rule: the baseline's value, or the history's (trend rule)
    baseline: float | None = None
    #: for a trend rule, the step (label) of the history report holding ``baseline``
    reference_step: str | None = None

    @property
    def bound(self) -> Bound | None:
        """The bound the value is beyond: ``"min"``, ``"max"``, ``"min_change"`` or
        ``"max_change"``; ``None`` when the value or its change is undefined."""
        rule, value = self.rule, self.value
        if rule.min is not None and value < rule.min:
            return "min"
        if rule.max is not None and value > rule.max:
            return "max"
        base = self.baseline
        defined = base is not None and math.isfinite(value) and math.isfinite(base) and base != 0
        if rule.is_relative and defined:
            change = (value - base) / abs(base)  # type: ignore[operator, arg-type]
            if rule.min_change is not None and change < rule.min_change:
                return "min_change"
            if rule.max_change is not None and change > rule.max_change:
                return "max_change"
        return None

    @property
    def suggestion(self) -> Suggestion:
        """What the break suggests: the rule's ``suggest`` when it has one; otherwise a
        low-rank factorisation when the value is beyond a bound on the metric's compressible
        side (``MetricSpec.compressible``), and ``"none"`` (a regression) for anything else:
        the other side, an undefined value, or a change against the baseline."""
        if self.rule.suggest is not None:
            return self.rule.suggest  # type: ignore[return-value]
        side = {"max": "high", "min": "low"}.get(self.bound or "")
        compressible = side is not None and side == self.rule.request.spec.compressible
        return "low_rank" if compressible else "none"


@dataclass(frozen=True)
class Verdict:
    status: Status
    broken: tuple[BrokenRule, ...]
    warn_only: bool = False

    @property
    def outcome(self) -> Outcome:
        problem = self.status != "ok" or bool(self.broken)
        if self.warn_only:
            return "warned" if problem else "passed"
        if self.status != "ok" or any(b.severity == "fail" for b in self.broken):
            return "failed"
        return "warned" if self.broken else "passed"


def builtin_checks(spectrum: HeadSpectrum) -> Status:  # non-finite weights, all-zero slice
    """The checks that need no rule: ``nonfinite`` weights, a ``zero_matrix``, else ``ok``."""
    if spectrum.nonfinite:
        return "nonfinite"
    if spectrum.singular_values[0] == 0.0:
        return "zero_matrix"
    return "ok"


def judge(
    rules: Sequence[Rule],
    layer: int,
    head: int,
    matrix: str,
    spectrum: HeadSpectrum,
    *,
    baseline: Mapping[str, float] | None = None,
    trend: Callable[[Rule], tuple[float, str] | None] | None = None,
    warn_only: bool = False,
    stack: str | None = None,
) -> Verdict:
    """Apply every rule that selects (stack, layer, head, matrix) to the spectrum's metrics
    (``stack`` ``None`` in a model of one stack).

    ``baseline`` holds the same item's metrics from ``--spectral-baseline`` (``None`` when the
    item is missing there, which breaks every relative rule rather than passing silently).
    ``trend`` gives a trend rule's reference for this item: the value and the step of the
    history report it comes from, or ``None`` when no earlier report in the rule's window
    holds the item (its first report: a trend needs two points), which leaves the rule
    unjudged; without ``trend`` trend rules are not judged.
    """
    status = builtin_checks(spectrum)
    broken = []
    for rule in rules:
        if not rule.applies_to(layer, head, matrix, stack):
            continue
        key = rule.request.key
        value = spectrum.metrics[key]
        step = None
        if rule.is_trend:
            reference = trend(rule) if trend is not None else None
            base, step = reference if reference is not None else (None, None)
            change = (
                None if reference is None else rule.change_violation(value, base, f"step {step}")
            )
        else:
            base = baseline.get(key) if baseline is not None else None
            change = rule.change_violation(value, base)
        reason = rule.violation(value) or change
        if reason is not None:
            severity: Severity = "warn" if warn_only else rule.severity
            broken.append(BrokenRule(rule, value, severity, reason, base, step))
    return Verdict(status, tuple(broken), warn_only)
