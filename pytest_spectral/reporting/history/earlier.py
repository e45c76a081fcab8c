"""The history a pytest run is given (``--spectral-history``): the reports of the
checkpoints before this one, for trend rules and for the HTML report's history sections."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pytest_spectral.judging.rules import Rule
from pytest_spectral.reporting.history.reports import HistoryError, ReportSource, report_sources
from pytest_spectral.reporting.history.table import HistoryTable, build_table
from pytest_spectral.reporting.step import Step


@dataclass(frozen=True)
class EarlierReports:
    """The reports before this run's checkpoint, in step order, with the metric values
    trend rules compare with."""

    table: HistoryTable
    layout: tuple[object, ...]
    #: this run's ``model.stack_geometry`` (a vision tower's head layout), if any
    stack_geometry: Mapping[str, Mapping[str, object]] = field(default_factory=dict)

    @property
    def sources(self) -> list[ReportSource]:
        return [h.source for h in self.table.headers]

    def reference(self, rule: Rule, nodeid: str) -> tuple[float, str] | None:
        """A trend rule's reference for this run's item ``nodeid``: see
        :meth:`HistoryTable.trend_reference`."""
        return self.table.trend_reference(rule, nodeid, len(self.table.headers))

    def with_run(self, report: Mapping[str, object], keys: Sequence[str]) -> HistoryTable:
        """The history with this run's report last, holding the metrics ``keys`` (the earlier
        reports are read again, one at a time)."""
        return build_table(
            [*self.sources, ReportSource("this run", document=report)],
            keys,
            layout=self.layout,
            stack_geometry=self.stack_geometry,
        )


def load_earlier(
    paths: Sequence[Path],
    *,
    step: Step | None,
    layout: tuple[object, ...],
    stack_geometry: Mapping[str, Mapping[str, object]] | None = None,
    keys: Sequence[str],
    own_report: Path | None,
) -> EarlierReports:
    """Read the reports of ``--spectral-history`` that come before this run's ``step``.

    With a step number, those reports with a smaller number (a directory may also hold later
    checkpoints' reports, or this one's from an earlier run); reports without a step cannot be
    placed against it and are left out. Without one, every report (this run is created last).
    The run's own ``--spectral-report`` is never read. Every report must have ``layout``,
    and the ``stack_geometry`` of each stack it records.
    Raises :class:`HistoryError`.
    """
    sources = report_sources(paths, what="--spectral-history")
    if own_report is not None:
        target = own_report.resolve()
        own = [s for s in sources if s.path is not None and s.path.resolve() == target]
        if own and step is not None and step.number is not None:
            table = build_table(own, [], layout=layout, stack_geometry=stack_geometry)
            held = table.headers[0].step
            if held is not None and held.number is not None and held.number != step.number:
                raise HistoryError(
                    f"--spectral-report {own_report}: holds the report of step {held.number}, "
                    f"an earlier checkpoint of --spectral-history; write this run's report "
                    f"(step {step.number}) to another path"
                )
        sources = [s for s in sources if s not in own]
    table = build_table(sources, keys, layout=layout, stack_geometry=stack_geometry)
    if step is not None and step.number is not None:
        numbers = [h.step.number if h.step is not None else None for h in table.headers]
        table = table.reports(
            [i for i, n in enumerate(numbers) if n is not None and n < step.number]
        )
    return EarlierReports(table, layout, dict(stack_geometry or {}))
