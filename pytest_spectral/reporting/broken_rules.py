"""How a broken rule reads, wherever it is shown: failure reports, warnings, the summary
tables and the HTML report all word an entry of a record's ``broken_rules`` (and a failed
built-in check, :func:`status_problem`) the same way.

A value always comes with the bound it broke (``top_k_ratio = 0.973722 > max 0.8``). A
floor-limited condition number is a lower bound, so it reads ``first_last_ratio >= 850.605``
rather than ``=``: the true value is at least that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pytest_spectral.judging.rules import MISSING_BASELINE
from pytest_spectral.wording import counted

#: the metric whose value is a lower bound when the record is floor-limited
_FLOOR_LIMITED_METRIC = "first_last_ratio"
FLOOR_NOTE = "a lower bound: sigma_min is below the storage/rounding floor"


def describe_broken(
    entry: Mapping[str, object],
    *,
    floor_limited: bool = False,
    digits: int = 6,
    short: bool = False,
) -> str:
    """``rule: metric = value > max bound`` for one ``broken_rules`` entry of a record.

    ``short`` gives ``rule: value > bound`` (the summary tables, where space is scarce),
    without the metric's name, the bound's name and the floor note; ``digits`` is the number
    of significant digits of values.
    """
    rule, metric = str(entry["rule"]), str(entry["metric"])
    value = _number(entry["value"])
    limited = floor_limited and metric == _FLOOR_LIMITED_METRIC and math.isfinite(value)
    shown = f"{'>=' if limited else '='} {_fmt(value, digits)}"
    subject = shown.removeprefix("= ") if short else f"{metric} {shown}"
    bound = entry.get("bound")
    baseline = entry.get("baseline")
    if bound in ("min", "max"):
        op = "<" if bound == "min" else ">"
        limit = f"{op} {'' if short else bound + ' '}{_fmt(_number(entry[bound]), digits)}"
        text = f"{subject} {limit}"
        if limited and not short:
            text += f" ({FLOOR_NOTE})"
    elif bound in ("min_change", "max_change"):
        base = _number(baseline)
        change = (value - base) / abs(base)
        op = "<" if bound == "min_change" else ">"
        text = (
            f"{subject} vs {_reference(entry)} {_fmt(base, digits)} ({change:+.1%}) "
            f"{op} {'' if short else bound + ' '}{_number(entry[bound]):+g}"
        )
        if entry.get("window") is not None and not short:
            text += f" over {entry['window']} reports"
    elif math.isnan(value):
        text = f"{subject} (undefined)"
    elif entry.get("min_change") is not None or entry.get("max_change") is not None:
        if baseline is None:
            text = f"{subject} has no baseline value: {MISSING_BASELINE.format(metric=metric)}"
        else:
            base = _fmt(_number(baseline), digits)
            text = f"{subject} vs {_reference(entry)} {base}: relative change undefined"
    else:
        text = subject
    return f"{rule}: {text}"


def _reference(entry: Mapping[str, object]) -> str:
    """What a change is measured against: the baseline, or a trend rule's history report."""
    step = entry.get("reference_step")
    return "baseline" if step is None else f"step {step}"


def _number(value: object) -> float:
    """A report value: a number, or "nan", "inf", "-inf" as the JSON report writes them."""
    return float(value)  # type: ignore[arg-type]


def _fmt(value: float, digits: int) -> str:
    return f"{value:.{digits}g}"


def status_problem(record: Mapping[str, object]) -> str | None:
    """How a slice's failed built-in check reads: ``3 non-finite weights``, ``all weights
    zero``; ``None`` when its status is ``ok`` (or it has no result)."""
    if record["status"] == "nonfinite":
        return counted(int(record["nonfinite_count"]), "non-finite weight")  # type: ignore[call-overload]
    if record["status"] == "zero_matrix":
        return "all weights zero"
    return None
