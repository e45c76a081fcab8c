"""Judging one head's spectrum against the rules: which rules it breaks, and its outcome.

Two checks need no rule because no healthy checkpoint fails them: non-finite weights and an
all-zero slice. They fail the item even without a rules file, since a CI gate that passes
NaN weights is worse than none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pytest_spectral.results import HeadSpectrum
from pytest_spectral.rules import Rule, Severity

Status = Literal["ok", "nonfinite", "zero_matrix"]
Outcome = Literal["passed", "failed", "warned"]


@dataclass(frozen=True)
class BrokenRule:
    rule: str
    metric: str
    value: float
    min: float | None
    max: float | None
    severity: Severity
    reason: str

    def describe(self) -> str:
        return f"{self.rule}: {self.metric} = {_fmt(self.value)} {self.reason}"


@dataclass(frozen=True)
class Verdict:
    status: Status
    broken: tuple[BrokenRule, ...]

    @property
    def outcome(self) -> Outcome:
        if self.status != "ok" or any(b.severity == "fail" for b in self.broken):
            return "failed"
        return "warned" if self.broken else "passed"


def judge(
    rules: Sequence[Rule], layer: int, head: int, matrix: str, spectrum: HeadSpectrum
) -> Verdict:
    """Apply every rule that selects (layer, head, matrix) to the spectrum's metrics."""
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
        value = spectrum.metrics[rule.request.key]
        reason = rule.violation(value)
        if reason is not None:
            broken.append(
                BrokenRule(
                    rule.name, rule.request.key, value, rule.min, rule.max, rule.severity, reason
                )
            )
    return Verdict(status, tuple(broken))


def _fmt(value: float) -> str:
    return f"{value:.6g}"
