"""Judging one head's spectrum against the rules: which rules it breaks, and its outcome.

Two checks need no rule because no healthy checkpoint fails them: non-finite weights and an
all-zero slice. They fail the item even without a rules file, since a CI gate that passes
NaN weights is worse than none. In warn-only mode (``--spectral-warn-only``) every problem,
these included, is reported as a warning and nothing fails.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pytest_spectral.judging.rules import Rule, Severity
from pytest_spectral.results import HeadSpectrum

Status = Literal["ok", "nonfinite", "zero_matrix"]
Outcome = Literal["passed", "failed", "warned"]


@dataclass(frozen=True)
class BrokenRule:
    rule: Rule
    value: float
    severity: Severity  # the rule's, or "warn" in warn-only mode
    reason: str
    baseline: float | None = None

    floor_limited: bool = False

    def describe(self) -> str:
        value = _fmt(self.value)
        if self.floor_limited:
            value = f">= {value} (floor-limited: sigma_min is below the storage/rounding floor)"
        return f"{self.rule.name}: {self.rule.request.key} = {value} {self.reason}"


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


def judge(
    rules: Sequence[Rule],
    layer: int,
    head: int,
    matrix: str,
    spectrum: HeadSpectrum,
    *,
    baseline: Mapping[str, float] | None = None,
    warn_only: bool = False,
) -> Verdict:
    """Apply every rule that selects (layer, head, matrix) to the spectrum's metrics.

    ``baseline`` holds the same item's metrics from ``--spectral-baseline`` (``None`` when the
    item is missing there, which breaks every relative rule rather than passing silently).
    """
    if spectrum.nonfinite:
        status: Status = "nonfinite"
    elif spectrum.singular_values[0] == 0.0:
        status = "zero_matrix"
    else:
        status = "ok"
    broken = []
    for rule in rules:
        if not rule.applies_to(layer, head, matrix):
            continue
        key = rule.request.key
        value = spectrum.metrics[key]
        base = baseline.get(key) if baseline is not None else None
        reason = rule.violation(value) or rule.change_violation(value, base)
        if reason is not None:
            severity: Severity = "warn" if warn_only else rule.severity
            limited = spectrum.floor_limited and rule.request.name == "first_last_ratio"
            broken.append(BrokenRule(rule, value, severity, reason, base, limited))
    return Verdict(status, tuple(broken), warn_only)


def _fmt(value: float) -> str:
    return f"{value:.6g}"
