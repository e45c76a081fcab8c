"""A training run's history as a table: every report's metric values and outcomes, in step
order, read one report at a time.

The table keeps, per report, one float64 value and one presence flag per item for each
metric it was asked for, and one outcome code per item: ``reports x items x (9 x metrics +
1)`` bytes, some 150 MB for 500 reports of a 4,096-item model and 8 metrics. Singular values
are not kept: :func:`curves` reads them again, for the few items a page draws.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pytest_spectral.judging.rules import Rule
from pytest_spectral.reporting.history.reports import (
    LAYOUT_FIELDS,
    HistoryError,
    ReportHeader,
    ReportSource,
    read_header,
    read_items,
    singular_values,
)
from pytest_spectral.results import OUTCOMES

#: code of an item missing from a report, in :attr:`HistoryTable.outcomes`
MISSING = -1


@dataclass(frozen=True)
class Place:
    """Where an item is: the same for a node id in every report."""

    layer: int
    head: int | None
    matrix: str
    #: an encoder-decoder model's stack, else ``None``
    stack: str | None = None


@dataclass
class HistoryTable:
    """Reports in step order (``headers``) against items (``nodeids``)."""

    headers: list[ReportHeader]
    nodeids: list[str]
    places: list[Place]
    #: metric key -> [reports, items] values (nan where missing) and presence
    values: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    #: [reports, items] index into OUTCOMES, MISSING where the report lacks the item
    outcomes: np.ndarray
    column: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.column = {nodeid: i for i, nodeid in enumerate(self.nodeids)}

    @property
    def labels(self) -> list[str]:
        return [h.label for h in self.headers]

    def failed(self) -> np.ndarray:
        """[reports, items]: the item failed (or errored) in that report."""
        bad = [OUTCOMES.index("failed"), OUTCOMES.index("error")]
        return np.isin(self.outcomes, bad)

    def reports(self, keep: Sequence[int]) -> HistoryTable:
        """The table of the reports at indices ``keep`` only (in their order)."""
        rows = list(keep)
        return HistoryTable(
            headers=[self.headers[i] for i in rows],
            nodeids=self.nodeids,
            places=self.places,
            values={k: v[rows] for k, v in self.values.items()},
            present={k: p[rows] for k, p in self.present.items()},
            outcomes=self.outcomes[rows],
        )

    def trend_reference(self, rule: Rule, nodeid: str, before: int) -> tuple[float, str] | None:
        """A trend rule's reference for ``nodeid`` when judging the report at index
        ``before`` (``len(headers)`` for a run after the last one): its value in the earliest
        of the ``window - 1`` reports before it that holds the item's metric, and that
        report's label; None when none does."""
        key, column = rule.request.key, self.column.get(nodeid)
        if column is None or key not in self.values or rule.window is None:
            return None
        for index in range(max(0, before - rule.window + 1), before):
            if self.present[key][index, column]:
                return float(self.values[key][index, column]), self.headers[index].label
        return None


def build_table(
    sources: Iterable[ReportSource],
    keys: Sequence[str],
    *,
    layout: tuple[object, ...] | None = None,
    stack_geometry: Mapping[str, Mapping[str, object]] | None = None,
) -> HistoryTable:
    """Read each report once, keeping the metrics ``keys`` and every outcome.

    ``layout`` (the values of ``LAYOUT_FIELDS``) is what every report must have; None: the
    first report's. ``stack_geometry`` (a run's ``model.stack_geometry``): the head layout
    a stack with heads of its own (a vision tower) must have in every report that records
    it; a stack's first recorded layout holds for the reports after it. Raises
    :class:`HistoryError` for a report that cannot be read, one of another model layout, or
    two reports of the same step number.
    """
    headers: list[ReportHeader] = []
    stacks = dict(stack_geometry or {})
    columns: dict[str, int] = {}
    places: list[Place] = []
    rows: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]] = []
    for source in sources:
        document = source.load()
        header = read_header(source, document)
        layout = header.layout if layout is None else layout
        if header.layout != layout:
            different = [
                f"model.{name} is {str(mine)[:40]!r} (expected {str(theirs)[:40]!r})"
                for name, mine, theirs in zip(LAYOUT_FIELDS, header.layout, layout, strict=True)
                if mine != theirs
            ]
            raise HistoryError(
                f"{source.name}: a report of another model layout: {'; '.join(different)}; "
                "a history holds reports of one model"
            )
        _check_stacks(source.name, header.stacks, stacks)
        found: list[tuple[int, int, dict[str, float]]] = []
        for point in read_items(source, document, keys):
            column = columns.setdefault(point.nodeid, len(columns))
            if column == len(places):
                places.append(Place(point.layer, point.head, point.matrix, point.stack))
            elif places[column] != Place(point.layer, point.head, point.matrix, point.stack):
                raise HistoryError(
                    f"{source.name}: item {point.nodeid!r} is at another stack, layer, head "
                    "or matrix than in an earlier report"
                )
            found.append((column, OUTCOMES.index(point.outcome), dict(point.metrics)))
        del document  # the next report replaces it: one at a time
        rows.append(_row(found, len(columns), keys, source))
        headers.append(header)
    order = sorted(range(len(headers)), key=lambda i: headers[i].order())
    _refuse_repeated_steps([headers[i] for i in order])
    width = len(columns)
    return HistoryTable(
        headers=[headers[i] for i in order],
        nodeids=list(columns),
        places=places,
        values={k: _stack([rows[i][0][k] for i in order], width, math.nan) for k in keys},
        present={k: _stack([rows[i][1][k] for i in order], width, False) for k in keys},
        outcomes=_stack([rows[i][2] for i in order], width, MISSING),
    )


def _row(
    found: list[tuple[int, int, dict[str, float]]],
    width: int,
    keys: Sequence[str],
    source: ReportSource,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    values = {k: np.full(width, math.nan) for k in keys}
    present = {k: np.zeros(width, dtype=bool) for k in keys}
    outcomes = np.full(width, MISSING, dtype=np.int8)
    for column, outcome, metrics in found:
        if outcomes[column] != MISSING:
            raise HistoryError(f"{source.name}: an item appears twice in one report")
        outcomes[column] = outcome
        for key, value in metrics.items():
            values[key][column] = value
            present[key][column] = True
    return values, present, outcomes


def _stack(rows: list[np.ndarray], width: int, fill: object) -> np.ndarray:
    """Rows of growing width (items first seen in later reports) as one [reports, width]."""
    dtype = rows[0].dtype if rows else np.float64
    table = np.full((len(rows), width), fill, dtype=dtype)
    for index, row in enumerate(rows):
        table[index, : len(row)] = row
    return table


def _refuse_repeated_steps(headers: Sequence[ReportHeader]) -> None:
    seen: dict[int, str] = {}
    for header in headers:
        number = header.step.number if header.step is not None else None
        if number is None:
            continue
        if number in seen:
            raise HistoryError(
                f"two reports of step {number}: {seen[number]} and {header.source.name}; "
                "keep one of them"
            )
        seen[number] = header.source.name


def curves(table: HistoryTable, nodeids: Sequence[str]) -> dict[str, list[np.ndarray | None]]:
    """The singular values of ``nodeids`` in every report (None where a report lacks one),
    read again one report at a time."""
    wanted = frozenset(nodeids)
    found: dict[str, list[np.ndarray | None]] = {n: [] for n in nodeids}
    if not wanted:
        return found
    for header in table.headers:
        values = singular_values(header.source, header.source.load(), wanted)
        for nodeid in nodeids:
            held = values.get(nodeid)
            found[nodeid].append(None if not held else np.array(held, dtype=np.float64))
    return found


def trend_breaks(table: HistoryTable, rules: Sequence[Rule]) -> dict[tuple[int, int], str]:
    """Where the trend ``rules`` break across the history: (report index, item column) -> the
    first broken rule's name, judged for each report as a run with the reports before it as
    its history would judge it (only the change; absolute bounds are in each outcome)."""
    breaks: dict[tuple[int, int], str] = {}
    for rule in rules:
        key = rule.request.key
        if not rule.is_trend or key not in table.values:
            continue
        columns = [
            c
            for c, place in enumerate(table.places)
            if rule.applies_to(place.layer, place.head, place.matrix, place.stack)
        ]
        values, present = table.values[key][:, columns], table.present[key][:, columns]
        for index in range(1, len(table.headers)):
            reference, has = _earliest(values, present, index, rule.window)  # type: ignore[arg-type]
            judged = has & present[index]
            broken = judged & _change_breaks(rule, values[index], reference)
            for position in np.flatnonzero(broken):
                breaks.setdefault((index, columns[position]), rule.name)
    return breaks


def _earliest(
    values: np.ndarray, present: np.ndarray, index: int, window: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per item: the value in the earliest of the ``window - 1`` reports before ``index``
    that holds it, and whether any does."""
    reference = np.full(values.shape[1], math.nan)
    has = np.zeros(values.shape[1], dtype=bool)
    for earlier in range(index - 1, max(0, index - window + 1) - 1, -1):
        mask = present[earlier]
        reference[mask] = values[earlier][mask]
        has |= mask
    return reference, has


def _change_breaks(rule: Rule, value: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Rule.change_violation over arrays: an undefined change (non-finite, or from zero)
    breaks the rule."""
    with np.errstate(divide="ignore", invalid="ignore"):
        change = (value - reference) / np.abs(reference)
    undefined = ~(np.isfinite(value) & np.isfinite(reference)) | (reference == 0)
    broken = undefined.copy()
    if rule.min_change is not None:
        broken |= ~undefined & (change < rule.min_change)
    if rule.max_change is not None:
        broken |= ~undefined & (change > rule.max_change)
    return broken


def _check_stacks(
    name: str,
    recorded: Mapping[str, Mapping[str, object]],
    known: dict[str, Mapping[str, object]],
) -> None:
    """Refuse a report whose stack with heads of its own has another head layout than
    ``known`` (the run's, or an earlier report's); record the stacks first seen here."""
    for stack, fields in recorded.items():
        expected = known.setdefault(stack, fields)
        different = [
            f"model.stack_geometry.{stack[:40]}.{str(key)[:40]} is {str(fields.get(key))[:40]!r} "
            f"(expected {str(expected.get(key))[:40]!r})"
            for key in sorted({*fields, *expected}, key=str)
            if fields.get(key) != expected.get(key)
        ]
        if different:
            raise HistoryError(
                f"{name}: a report of another model layout: {'; '.join(different)}; "
                "a history holds reports of one model"
            )
