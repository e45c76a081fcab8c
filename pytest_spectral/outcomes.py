"""pytest's side of every collected spectral item, so that reports leave none out.

An item's record (metrics, verdict) exists only when it ran to the end. An item can also
crash its pytest-xdist worker, raise before it has a record (an unreadable tensor, a failing
user metric), be failed by another plugin after its record was made, be skipped by a hook, or
never run (``-x``, Ctrl-C, a worker lost for good). The ledger remembers what pytest reported
for each, on the process that writes the reports (under xdist, the controller), and tells the
report each item's outcome.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from pytest_spectral.nodes import item_position
from pytest_spectral.results import Record

_MESSAGE_LIMIT = 500


class ItemLedger:
    def __init__(self) -> None:
        #: node ids of the spectral items collected (after -k, --deselect, --lf...)
        self.collected: tuple[str, ...] = ()
        self._collected_set: frozenset[str] = frozenset()
        self._problems: dict[str, str] = {}
        self._skips: dict[str, str] = {}
        self._reported: set[str] = set()
        #: why the session ended before every item ran (``stopping after 1 failures``, an
        #: interrupt), the message of the items that never ran
        self.stop_reason = "the session ended before it ran"

    def expect(self, nodeids: Iterable[str]) -> None:
        """The collected items; the first collection counts (every xdist worker sends one)."""
        if not self.collected:
            self.collected = tuple(n for n in nodeids if item_position(n) is not None)
            self._collected_set = frozenset(self.collected)

    def observe(self, report: pytest.TestReport) -> None:
        """Note a setup, call or teardown report (xdist's crash reports say ``when="???"``)."""
        nodeid = report.nodeid
        # A set lookup for the collected items, three reports each; the pattern for the rest.
        if nodeid not in self._collected_set and item_position(nodeid) is None:
            return
        self._reported.add(nodeid)
        if report.failed:
            self._problems.setdefault(nodeid, _first_line(report))
        elif report.skipped:
            self._skips.setdefault(nodeid, _first_line(report))

    def outcome(self, nodeid: str, record: Record | None) -> tuple[str, str | None]:
        """``(outcome, message)`` of one item.

        The record's verdict stands unless pytest reported a failure the verdict does not
        explain: then, as without a record, the outcome is ``error`` with pytest's message.
        """
        problem = self._problems.get(nodeid)
        if record is not None and (problem is None or record["outcome"] == "failed"):
            return str(record["outcome"]), None
        if problem is not None:
            return "error", problem
        if nodeid in self._skips:
            return "skipped", self._skips[nodeid]
        if nodeid in self._reported:
            return "error", "finished without a result"
        return "not_run", self.stop_reason


def _first_line(report: pytest.TestReport) -> str:
    """pytest's one-line account of a failure or skip (not ``longreprtext``, which starts
    with pytest-xdist's worker line)."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (path, line, reason)
        text = str(longrepr[2])
    elif isinstance(longrepr, str):
        text = longrepr
    else:
        crash = getattr(longrepr, "reprcrash", None)
        text = getattr(crash, "message", None) or str(longrepr or "")
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line[:_MESSAGE_LIMIT] or f"{report.when}: {report.outcome}"
