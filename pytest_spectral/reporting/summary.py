"""The terminal summary: outcome counts, then regressions and pruning candidates as rich
tables, rendered to text.

Rendering into a string (rather than printing) lets pytest's terminal reporter place it in
its own section and decide about colour, so ``--color=no`` and output capture behave. Rule
names come from a file: cells are plain ``Text`` with control characters escaped, and the
console parses no markup or emoji codes, so ``[bold]`` or ``:x:`` in a name shows as written.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pytest_spectral.checkpoints.checkpoint import CIRCUITS, HEAD_MATRICES
from pytest_spectral.judging.candidates import Candidate, Regression
from pytest_spectral.printable import printable
from pytest_spectral.reporting.broken_rules import describe_broken, status_problem
from pytest_spectral.reporting.report import Record
from pytest_spectral.results import OUTCOMES
from pytest_spectral.wording import counted

#: Rows shown in the terminal; the JSON report always has all of them.
MAX_ROWS = 25


def render_summary(
    records: Sequence[Record],
    candidates: Sequence[Candidate],
    regressions: Sequence[Regression],
    *,
    total_saved: int,
    energy: float,
    width: int,
    color: bool,
) -> str:
    """The counts line, then the regressions, then the pruning candidates with their total."""
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=width,
        force_terminal=color,
        no_color=not color,
        color_system="standard" if color else None,
        highlight=False,
        markup=False,
        emoji=False,
    )
    console.print(_counts_line(records))
    if not candidates and not regressions:
        console.print("Nothing broke a rule: no regressions, no pruning candidates.")
        return buffer.getvalue()
    if regressions:
        console.print(_regressions_table(regressions[:MAX_ROWS]))
        _more(console, len(regressions))
        console.print(_regressions_line(regressions))
    else:
        console.print(
            "No regressions: nothing non-finite, zero, drifted or beyond a harmful bound."
        )
    if not candidates:
        console.print("No pruning candidates: no broken rule suggests pruning.")
        return buffer.getvalue()
    console.print(_candidates_table(candidates[:MAX_ROWS], energy))
    _more(console, len(candidates))
    console.print(
        f"{len(candidates)} candidate slice{'s' if len(candidates) != 1 else ''}; "
        + (
            f"acting on every suggestion would save at most {total_saved:,} parameters "
            "(each weight counted once)."
            if total_saved
            else "none saves parameters at its suggested rank."
        )
    )
    console.print(
        f"Rank r keeps {energy:.0%} of the energy (sum of sigma^2); err is the relative Frobenius "
        "error sqrt(1 - E_r); a factorisation saves only below the break-even rank mn/(m+n). "
        "These are candidates for data-aware compression (ASVD, SVD-LLM, Palu), not safe "
        "truncations.",
        style="dim",
    )
    if any(c.record["matrix"] in CIRCUITS for c in candidates):
        console.print(
            "A qk (ov) circuit of rank r lets its heads' Q rows (O columns) and their shared "
            "K/V head's K (V) rows be cut to r, below the break-even head_dim; with grouped-query "
            "attention only when every query head of the group is a candidate (one row); "
            "with rotary embeddings this holds at relative position 0 only (see the README).",
            style="dim",
        )
    return buffer.getvalue()


def _more(console: Console, count: int) -> None:
    if count > MAX_ROWS:
        console.print(f"... and {count - MAX_ROWS} more in the JSON report (--spectral-report).")


def _regressions_line(regressions: Sequence[Regression]) -> str:
    failed = sum(r.record["outcome"] == "failed" for r in regressions)
    count = len(regressions)
    return (
        f"{count} regressed slice{'s' if count != 1 else ''} ({failed} failed, "
        f"{count - failed} warned): damage rather than compressibility, not pruning candidates."
    )


def _counts_line(records: Sequence[Record]) -> str:
    """Every item by outcome, as pytest counts them, with the matrices of the bad ones."""
    outcomes = Counter(str(r["outcome"]) for r in records)
    parts = [f"{outcomes.get('passed', 0)} passed"]
    for outcome in OUTCOMES[1:]:
        per_matrix = Counter(str(r["matrix"]) for r in records if r["outcome"] == outcome)
        if per_matrix:
            detail = ", ".join(f"{m} {n}" for m, n in sorted(per_matrix.items(), key=_order))
            parts.append(f"{outcomes[outcome]} {outcome.replace('_', ' ')} ({detail})")
    return f"{counted(len(records), 'item')}: " + "; ".join(parts)


def _order(item: tuple[str, int]) -> tuple[int, str]:
    """q, k, v, o, qk, ov first, then MLP matrices by name."""
    matrix = item[0]
    known = HEAD_MATRICES
    return (known.index(matrix) if matrix in known else len(known), matrix)


def _regressions_table(regressions: Sequence[Regression]) -> Table:
    table = Table(title="Regressions", title_justify="left")
    table.add_column("item", no_wrap=True)
    table.add_column("outcome", no_wrap=True)
    table.add_column("problem", overflow="fold")
    for g in regressions:
        r = g.record
        status = status_problem(r)
        problems = [status] if status else []
        problems += [_broken(b, r) for b in g.rules]
        table.add_row(
            *(Text(printable(cell)) for cell in (g.label, str(r["outcome"]))),
            Text("\n".join(map(printable, problems))),
        )
    return table


def _candidates_table(candidates: Sequence[Candidate], energy: float) -> Table:
    table = Table(title="Low-rank pruning candidates", title_justify="left")
    table.add_column("item", no_wrap=True)
    table.add_column("rules broken", overflow="fold")
    table.add_column(f"rank@{energy:.0%}\n(err)", justify="right", no_wrap=True)
    table.add_column("break-\neven", justify="right", no_wrap=True)
    table.add_column("params\nsaved", justify="right", no_wrap=True)
    for c in candidates:
        broken = [_broken(b, c.record) for b in c.rules]
        saved = f"{c.params_before - c.params_after:,} ({c.saving_fraction:.0%})"
        if c.params_after >= c.params_before:
            saved = "none" + (f"\n{c.needs}" if c.needs else "")
        if c.removal:
            saved += f"\nremove head: {c.removal:,}"
        rank = "-" if c.rank is None else str(c.rank)
        if c.error is not None:
            rank += f" ({c.error:.2f})"
        cells = (c.label, "\n".join(map(printable, broken)), rank, f"{c.break_even:.0f}", saved)
        table.add_row(*(Text(cell) for cell in cells))
    return table


def _broken(entry: Record, record: Record) -> str:
    """``qk-concentrated: 0.974 > max 0.8``, ``(warn)`` appended for a warn rule."""
    text = describe_broken(
        entry, floor_limited=bool(record.get("floor_limited")), digits=3, short=True
    )
    return text + (" (warn)" if entry["severity"] == "warn" else "")
