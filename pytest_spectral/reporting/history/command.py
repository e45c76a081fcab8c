"""``spectral-history``: the history page from reports alone, without a checkpoint.

    spectral-history reports/ -o history.html [--rules rules.toml] [--metrics stable_rank,...]

Exit status: 0 when the page is written; 1 when it is written and the last report breaks a
trend rule of ``--rules`` with severity ``fail`` (a gate for a CI job that only has reports);
2 for bad input, with a message naming the file and key.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pytest_spectral.judging.rules import RulesError, RuleSet, load_rules
from pytest_spectral.printable import printable
from pytest_spectral.reporting.files import OutputPathError, check_output_path
from pytest_spectral.reporting.history.reports import HistoryError, report_sources
from pytest_spectral.reporting.history.table import build_table, trend_breaks


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="spectral-history",
        description="Draw a training run's spectral history from pytest-spectral JSON reports.",
    )
    parser.add_argument(
        "reports", nargs="+", type=Path, metavar="REPORT_OR_DIR",
        help="JSON reports (--spectral-report), or directories of them (*.json)",
    )  # fmt: skip
    parser.add_argument("-o", "--output", type=Path, required=True, help="HTML page to write")
    parser.add_argument("--rules", type=Path, help="rules file whose trend rules are judged")
    parser.add_argument(
        "--metrics",
        help="comma-separated metric keys to draw (default: the HTML report's heatmap metrics)",
    )
    arguments = parser.parse_args(argv)
    try:
        return _write(arguments)
    except (HistoryError, RulesError, OutputPathError, ImportError) as exc:
        print(f"spectral-history: {printable(exc)}", file=sys.stderr)
        return 2


def _write(arguments: argparse.Namespace) -> int:
    from pytest_spectral.judging.metrics import METRICS
    from pytest_spectral.reporting.files import write_text_atomically
    from pytest_spectral.reporting.history.page import history_metrics, history_sections
    from pytest_spectral.reporting.html_report import _PAGE, _text, require_matplotlib

    require_matplotlib()
    output = arguments.output.absolute()
    check_output_path(output, "--output")
    sources = report_sources(arguments.reports, what="reports")
    if not sources:
        raise HistoryError("no reports found: give report files or directories holding *.json")
    if any(s.path is not None and s.path.resolve() == output.resolve() for s in sources):
        raise OutputPathError(f"--output {output}: is one of the reports read; choose another path")
    rules = load_rules(arguments.rules.absolute()) if arguments.rules else RuleSet.empty()
    chosen = [m.strip() for m in (arguments.metrics or "").split(",") if m.strip()]
    unknown = [m for m in chosen if m.split("(")[0] not in METRICS]
    if unknown:
        raise HistoryError(
            f"--metrics: unknown metric {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(METRICS))}"
        )
    metrics = history_metrics(chosen, rules.rules)
    table = build_table(sources, metrics)
    body = "\n".join(history_sections(table, metrics, rules.rules))
    title = f"pytest-spectral history: {len(table.headers)} reports"
    write_text_atomically(output, _PAGE.format(title=_text(title), body=body))
    last = len(table.headers) - 1
    breaking = {
        name for (index, _), name in trend_breaks(table, rules.rules).items() if index == last
    }
    failing = [r.name for r in rules.rules if r.name in breaking and r.severity == "fail"]
    print(f"spectral-history: wrote {printable(output)} ({len(table.headers)} reports)")
    if failing:
        print(
            f"spectral-history: the last report breaks trend rule(s) {', '.join(failing)}",
            file=sys.stderr,
        )
        return 1
    return 0
