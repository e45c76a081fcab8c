"""Threshold rules: the TOML file a user writes, validated into :class:`Rule` objects.

Every mistake in the file is reported as a :class:`RulesError` whose message starts with
``file:line:`` and names the key, so that a CI log points straight at the line to fix.
``tomllib`` does not report where keys are, so lines are recovered from the text itself.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from pytest_spectral.checkpoints.checkpoint import HEAD_MATRICES
from pytest_spectral.checkpoints.families import (
    RULE_STACK_NAMES,
    TEXT,
    WHOLE_ONLY_MATRICES,
    matrix_kind,
)
from pytest_spectral.judging.metrics import METRICS, MetricRequest, MetricSpec, request
from pytest_spectral.judging.ranges import IndexSet, RangeSyntaxError, parse_index_set
from pytest_spectral.untrusted import (
    MAX_TOML_BYTES,
    MissingFileError,
    UntrustedFileError,
    load_toml,
)

Severity = Literal["fail", "warn"]
#: values of a rule's ``suggest``: what a broken rule suggests doing with the slice
SUGGESTIONS = ("low_rank", "remove_head", "none")
ALL_MATRICES: tuple[str, ...] = HEAD_MATRICES + WHOLE_ONLY_MATRICES
_Fail = Callable[[str, str], "RulesError"]
#: the keys a [[rules]] table may have, besides its metric's parameters
RULE_KEYS = (
    "name",
    "metric",
    "min",
    "max",
    "min_change",
    "max_change",
    "matrices",
    "layers",
    "heads",
    "stacks",
    "severity",
    "scope",
    "suggest",
    "window",
)
#: A trend rule's window counts reports (the current one included); beyond this it is no
#: longer a trend but a baseline.
MAX_WINDOW = 1000


#: why a relative rule finds no baseline value, and what to do (the metric's key filled in).
#: A metric the report lacks is computed from the item's singular values, so what is left is
#: an item the baseline has no values for.
MISSING_BASELINE = (
    "the baseline report has no {metric} for this item, nor singular values to compute it "
    "from (an item it did not collect, or one without a result there); record the baseline "
    "again (--spectral-report) from the known-good checkpoint with the same options"
)


class RulesError(ValueError):
    """A rules file that cannot be used; the message names file, line and key."""


@dataclass(frozen=True)
class Rule:
    """One bound on one metric, restricted to some matrices, layers and (query) heads."""

    name: str
    request: MetricRequest
    min: float | None
    max: float | None
    matrices: frozenset[str]
    layers: IndexSet
    heads: IndexSet
    severity: Severity
    #: bounds on the relative change (value - reference) / |reference|: the reference is the
    #: item's value in --spectral-baseline, or for a trend rule (``window``) in the earliest of
    #: the last ``window`` reports of --spectral-history, this run being the last
    min_change: float | None = None
    max_change: float | None = None
    #: a trend rule: the number of reports (this run's included) its change spans
    window: int | None = None
    #: "head" items (the default) or whole-"matrix" items (--spectral-scope)
    scope: str = "head"
    #: what a break suggests: "low_rank" factorisation, "remove_head", or "none" (a
    #: regression, not a pruning candidate); None: decided by the metric's compressible side
    suggest: str | None = None
    #: lines in the rules file: of the ``[[rules]]`` header (key ``""``) and of each bound
    #: given (``"min"``, ``"max"``, ...); warnings point there
    lines: tuple[tuple[str, int], ...] = ()
    #: the stacks of an encoder-decoder model it judges (encoder, decoder, cross), a
    #: wrapper's vision tower (vision) or the items in no stack (text: a wrapper's text
    #: model, every item of a model of one stack); ``None``: every item, whatever its stack
    stacks: frozenset[str] | None = None

    def line(self, key: str = "") -> int | None:
        """The line of ``key`` (a bound) in the rules file, else of the rule's header."""
        found = dict(self.lines)
        return found.get(key, found.get(""))

    @property
    def is_relative(self) -> bool:
        """Bounds a change against a reference: a baseline, or the history (a trend rule)."""
        return self.min_change is not None or self.max_change is not None

    @property
    def is_trend(self) -> bool:
        """Bounds the change over the last ``window`` reports of a history."""
        return self.window is not None

    def applies_to(
        self, layer: int, head: int | None, matrix: str, stack: str | None = None
    ) -> bool:
        """Whether the rule judges this item; ``head`` is None for a whole-matrix item,
        ``stack`` for an item in no stack (a wrapper's text model, a model of one stack),
        which a rule's ``stacks`` calls ``text``."""
        if self.scope != ("matrix" if head is None else "head"):
            return False
        return (
            matrix_kind(matrix) in self.matrices  # a rule names an expert matrix by its kind
            and layer in self.layers
            and (head is None or head in self.heads)
            and (self.stacks is None or (stack or TEXT) in self.stacks)
        )

    def violation(self, value: float) -> str | None:
        """Why ``value`` breaks this rule's absolute bounds, or ``None`` when it does not."""
        if self.min is None and self.max is None:
            return None
        if math.isnan(value):
            return "is undefined (nan)"
        if self.min is not None and value < self.min:
            return f"< min {self.min:g}"
        if self.max is not None and value > self.max:
            return f"> max {self.max:g}"
        return None

    def change_violation(
        self, value: float, baseline: float | None, against: str = "baseline"
    ) -> str | None:
        """Why the change from ``baseline`` breaks this rule, or ``None`` when it does not.

        ``against`` names the reference in the message: ``"baseline"``, or for a trend rule
        the step of the history report that holds it (``"step 1000"``).
        A relative change from or to a non-finite value, or from zero, is undefined and breaks
        the rule: an ``inf`` baseline would otherwise make every change look like -100%.
        """
        if not self.is_relative:
            return None
        if baseline is None:
            return f"has no baseline value: {MISSING_BASELINE.format(metric=self.request.key)}"
        shown = f"vs {against} {baseline:.6g}"
        if not (math.isfinite(value) and math.isfinite(baseline)) or baseline == 0:
            return f"{shown}: relative change undefined"
        change = (value - baseline) / abs(baseline)
        shown += f" ({change:+.1%})"
        if self.min_change is not None and change < self.min_change:
            return f"{shown} < min_change {self.min_change:+g}"
        if self.max_change is not None and change > self.max_change:
            return f"{shown} > max_change {self.max_change:+g}"
        return None


@dataclass(frozen=True)
class RuleSet:
    path: Path | None
    sha256: str | None
    rules: tuple[Rule, ...]

    @classmethod
    def empty(cls) -> RuleSet:
        return cls(None, None, ())

    def requests(self) -> tuple[MetricRequest, ...]:
        """The distinct metric requests the rules need, in first-use order."""
        return tuple(dict.fromkeys(rule.request for rule in self.rules))


def load_rules(path: Path, metrics: Mapping[str, MetricSpec] = METRICS) -> RuleSet:
    """Read and validate a rules file; raises :class:`RulesError` on any problem.

    ``metrics`` are the names rules may use (the built-in ones, plus any registered).
    """
    try:
        document, text, raw = load_toml(path, MAX_TOML_BYTES, "rules file")
    except MissingFileError:
        raise RulesError(f"{path}: cannot read rules file: it does not exist") from None
    except UntrustedFileError as exc:
        raise RulesError(str(exc)) from None
    locator = _LineLocator(path, text)
    rules = _parse_document(document, locator, metrics)
    return RuleSet(path, hashlib.sha256(raw).hexdigest(), rules)


def _parse_document(
    document: Mapping[str, object], where: _LineLocator, metrics: Mapping[str, MetricSpec]
) -> tuple[Rule, ...]:
    for key in document:
        if key != "rules":
            raise RulesError(
                f"{where.top(key)}: unknown top-level key {key!r}{hint(key, ['rules'])}"
            )
    entries = document.get("rules", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise RulesError(f"{where.top('rules')}: 'rules' must be an array of tables ([[rules]])")
    return tuple(_parse_rule(index, entry, where, metrics) for index, entry in enumerate(entries))


def _parse_rule(
    index: int, entry: Mapping[str, object], where: _LineLocator, metrics: Mapping[str, MetricSpec]
) -> Rule:
    def fail(key: str, message: str) -> RulesError:
        return RulesError(f"{where.key(index, key)}: rule {index + 1}, key {key!r}: {message}")

    metric = entry.get("metric")
    if metric is None:
        raise RulesError(f"{where.rule(index)}: rule {index + 1} has no 'metric' key")
    if not isinstance(metric, str) or metric not in metrics:
        raise fail("metric", f"unknown metric {metric!r}{hint(str(metric), metrics)}")
    spec = metrics[metric]

    for key in entry:
        if key not in RULE_KEYS and key not in spec.params:
            other = [m for m, s in metrics.items() if key in s.params]
            if other:
                raise fail(
                    key, f"metric {metric!r} takes no {key!r} (it is for {', '.join(other)})"
                )
            raise fail(key, f"unknown key{hint(key, (*RULE_KEYS, *spec.params))}")

    params: dict[str, float | int] = {}
    for key, param in spec.params.items():
        if key in entry:
            problem = param.check(entry[key])
            if problem:
                raise fail(key, problem)
            params[key] = entry[key]  # type: ignore[assignment]

    bounds = {key: _number(entry, key, fail) for key in ("min", "max", "min_change", "max_change")}
    if all(value is None for value in bounds.values()):
        raise RulesError(
            f"{where.rule(index)}: rule {index + 1} needs "
            "'min', 'max', 'min_change' or 'max_change'"
        )
    for low, high in (("min", "max"), ("min_change", "max_change")):
        if bounds[low] is not None and bounds[high] is not None and bounds[low] > bounds[high]:
            raise fail(low, f"{low} {bounds[low]} is larger than {high} {bounds[high]}")

    suggest = entry.get("suggest")
    if suggest not in (None, *SUGGESTIONS):
        raise fail("suggest", f"must be 'low_rank', 'remove_head' or 'none', got {suggest!r}")
    scope = entry.get("scope", "head")
    if scope not in ("head", "matrix"):
        raise fail("scope", f"must be 'head' or 'matrix', got {scope!r}")
    if scope == "matrix" and "heads" in entry:
        raise fail(
            "heads",
            'a scope = "matrix" rule judges whole matrices, which have no heads; remove heads, '
            'or give the rule scope = "head"',
        )
    severity = entry.get("severity", "fail")
    if severity not in ("fail", "warn"):
        raise fail("severity", f"must be 'fail' or 'warn', got {severity!r}")
    window = entry.get("window")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise fail("window", f"must be a whole number of reports, got {window!r}")
        if not 2 <= window <= MAX_WINDOW:
            raise fail(
                "window",
                f"must be between 2 (this report and the one before) and {MAX_WINDOW}, "
                f"got {window}",
            )
        if bounds["min_change"] is None and bounds["max_change"] is None:
            raise fail("window", "bounds a change over reports: give min_change or max_change")
    name = entry.get("name", f"rule-{index + 1}")
    if not isinstance(name, str) or not name:
        raise fail("name", f"must be a non-empty string, got {name!r}")

    return Rule(
        name=name,
        request=request(spec, **params),
        min=bounds["min"],
        max=bounds["max"],
        matrices=_matrices(entry.get("matrices", list(ALL_MATRICES)), fail),
        layers=_index_set(entry, "layers", fail),
        heads=_index_set(entry, "heads", fail),
        stacks=_stacks(entry, fail),
        severity=severity,  # type: ignore[arg-type]
        min_change=bounds["min_change"],
        max_change=bounds["max_change"],
        scope=scope,
        suggest=suggest,
        window=window,
        lines=where.key_lines(index, [key for key, value in bounds.items() if value is not None]),
    )


def _number(entry: Mapping[str, object], key: str, fail: _Fail) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(key, f"must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # TOML integers can be longer than any float
        raise fail(key, f"{value} is beyond the range of a float") from None
    if math.isnan(number):
        raise fail(key, "must be a number, got nan")
    return number


def _matrices(value: object, fail: _Fail) -> frozenset[str]:
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        raise fail("matrices", f"must be a non-empty list such as ['q', 'k'], got {value!r}")
    result = set()
    for name in names:
        clean = name.strip().lower() if isinstance(name, str) else name
        if clean not in ALL_MATRICES:
            raise fail(
                "matrices", f"unknown matrix {name!r}; choose from {', '.join(ALL_MATRICES)}"
            )
        result.add(clean)
    return frozenset(result)


def rules_of_stack(rules: Iterable[Rule], stack: str | None) -> list[Rule]:
    """The rules that judge the items of ``stack``, as rules of a model of one stack: views
    that draw one stack at a time (heatmaps) place its cells without naming the stack.
    ``None`` (a model of one stack): ``rules`` as they are."""
    if stack is None:
        return list(rules)
    return [replace(r, stacks=None) for r in rules if r.stacks is None or stack in r.stacks]


def _stacks(entry: Mapping[str, object], fail: _Fail) -> frozenset[str] | None:
    """``stacks = ["cross"]``: the stacks of an encoder-decoder model a rule judges
    (``["vision"]``: a multimodal wrapper's vision tower, ``["text"]``: its text model)."""
    if "stacks" not in entry:
        return None
    value = entry["stacks"]
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        raise fail("stacks", f"must be a non-empty list such as ['cross'], got {value!r}")
    for name in names:
        if name not in RULE_STACK_NAMES:
            raise fail(
                "stacks", f"unknown stack {name!r}; choose from {', '.join(RULE_STACK_NAMES)}"
            )
    return frozenset(names)


def _index_set(entry: Mapping[str, object], key: str, fail: _Fail) -> IndexSet:
    if key not in entry:
        return IndexSet.everything()
    try:
        return parse_index_set(entry[key])  # type: ignore[arg-type]
    except RangeSyntaxError as exc:
        raise fail(key, str(exc)) from None


def hint(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _LineLocator:
    """Finds the line of a key inside the n-th ``[[rules]]`` table of the source text."""

    _HEADER = re.compile(r"^\s*\[")
    _RULES_HEADER = re.compile(r"^\s*\[\[\s*rules\s*\]\]")

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.rule_starts = [
            i for i, line in enumerate(self.lines) if self._RULES_HEADER.match(line)
        ]

    def _find(self, key: str, start: int, stop: int) -> int | None:
        pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        for i in range(start, stop):
            if pattern.match(self.lines[i]):
                return i
        return None

    def top(self, key: str) -> str:
        first_table = next(
            (i for i, line in enumerate(self.lines) if self._HEADER.match(line)), len(self.lines)
        )
        found = self._find(key, 0, first_table)
        if found is None:
            found = next(
                (
                    i
                    for i, line in enumerate(self.lines)
                    if re.match(rf"^\s*\[+\s*{re.escape(key)}\b", line)
                ),
                None,
            )
        return f"{self.path}:{found + 1}" if found is not None else str(self.path)

    def key_lines(self, index: int, keys: Iterable[str]) -> tuple[tuple[str, int], ...]:
        """1-based lines of the n-th ``[[rules]]`` header (key ``""``) and of its ``keys``."""
        if index >= len(self.rule_starts):
            return ()
        start = self.rule_starts[index]
        stop = self._table_end(start)
        found = [("", start + 1)]
        for key in keys:
            line = self._find(key, start + 1, stop)
            if line is not None:
                found.append((key, line + 1))
        return tuple(found)

    def _table_end(self, start: int) -> int:
        return next(
            (i for i in range(start + 1, len(self.lines)) if self._HEADER.match(self.lines[i])),
            len(self.lines),
        )

    def rule(self, index: int) -> str:
        if index < len(self.rule_starts):
            return f"{self.path}:{self.rule_starts[index] + 1}"
        return str(self.path)

    def key(self, index: int, key: str) -> str:
        if index >= len(self.rule_starts):
            return str(self.path)
        start = self.rule_starts[index]
        stop = self._table_end(start)
        found = self._find(key, start + 1, stop)
        return f"{self.path}:{(found if found is not None else start) + 1}"
