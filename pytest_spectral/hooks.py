"""Hooks active only during a spectral run (registered when ``--spectral-model`` is given).

Keeping them in their own plugin object means a plain ``pytest`` run in the same environment
pays for none of them and never imports torch.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import pytest

from pytest_spectral.judging.calibrate import calibrated_rules
from pytest_spectral.judging.candidates import (
    Candidate,
    candidate_record,
    pruning_candidates,
    total_saving,
)
from pytest_spectral.nodes import ROOT_NAME, SpectralItem, SpectralRoot, item_position
from pytest_spectral.outcomes import ItemLedger
from pytest_spectral.printable import printable
from pytest_spectral.reporting.files import write_text_atomically
from pytest_spectral.reporting.heatmap import render_heatmap
from pytest_spectral.reporting.report import build_report, unrecorded_record, write_report
from pytest_spectral.reporting.summary import render_summary
from pytest_spectral.results import LayerStats, Record
from pytest_spectral.run import MODEL_PATH_KEY, SpectralRun


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


class SpectralPlugin:
    def __init__(self, run: SpectralRun, ledger: ItemLedger) -> None:
        self.run = run
        self.ledger = ledger
        self._written: list[tuple[str, str]] = []
        self._pruning_result: tuple[list[Candidate], int] | None = None
        self._items: list[Record] | None = None

    def pytest_ignore_collect(self, collection_path: Path, config: pytest.Config) -> bool | None:
        """Without explicit paths, a spectral run collects only the spectral items."""
        if config.args_source != pytest.Config.ArgsSource.ARGS:
            return True
        return None

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(
        self, collector: pytest.Collector
    ) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
        report = yield
        if isinstance(collector, pytest.Session) and report.passed:
            report.result.append(
                SpectralRoot.from_parent(collector, name=ROOT_NAME, nodeid=ROOT_NAME)
            )
        return report

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.ledger.expect(item.nodeid for item in session.items)
        self.run.needed = [
            (item.layer, item.matrix, item.scope)
            for item in session.items
            if isinstance(item, SpectralItem)
        ]
        if self.run.needed and not session.config.option.collectonly:
            self.run.engine()  # a single process starts computing the first layer now

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if call.when == "call" and isinstance(item, SpectralItem) and item.record is not None:
            # A report attribute survives pytest-xdist's serialisation to the controller.
            report.spectral = item.record  # type: ignore[attr-defined]
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        record = getattr(report, "spectral", None)
        if record is not None:
            self.run.records[report.nodeid] = record
        self.ledger.observe(report)

    def pytest_terminal_summary(
        self, terminalreporter: pytest.TerminalReporter, config: pytest.Config
    ) -> None:
        if _is_xdist_worker(config):
            return
        items = self._all_items()
        if items and not config.option.collectonly:
            writer = config.get_terminal_writer()
            candidates, total_saved = self._pruning()
            text = render_summary(
                items,
                candidates,
                total_saved=total_saved,
                energy=self.run.energy,
                width=writer.fullwidth,
                color=writer.hasmarkup,
            )
            terminalreporter.section("spectral summary")
            terminalreporter.write(text)
            if self.run.heatmap_metric:
                geometry = self.run.checkpoint.geometry
                terminalreporter.write(
                    render_heatmap(
                        items,
                        self.run.heatmap_metric,
                        layers=geometry.layers,
                        heads=geometry.heads,
                        width=writer.fullwidth,
                        color=writer.hasmarkup,
                    )
                )
        for label, where in self._written:
            terminalreporter.write_line(printable(f"spectral {label}: {where}"))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Write every requested report, whatever happened: an earlier run's file at the same
        path was removed at startup, and this run's replaces it even when no item ran."""
        self.run.close()
        if _is_xdist_worker(session.config):
            return
        run = self.run
        items = self._all_items()
        candidates, total_saved = self._pruning()
        report = build_report(
            checkpoint=run.checkpoint,
            model_argument=run.model_argument,
            rules=run.rules,
            settings=run.settings(),
            records=items,
            candidates=[candidate_record(c) for c in candidates],
            params_saved=total_saved,
        )
        if run.report_path:
            write_report(run.report_path, report)
            self._written.append(("report", str(run.report_path)))
        if run.html_path:
            from pytest_spectral.reporting.html_report import render_html

            page = render_html(report, candidates, energy=run.energy)
            write_text_atomically(run.html_path, page)
            self._written.append(("HTML report", str(run.html_path)))
        if run.calibrate_path:
            self._calibrate(run.calibrate_path, report)

    def _calibrate(self, path: Path, report: dict[str, object]) -> None:
        """Calibrated rules come only from a run where every collected item has its values:
        bounds from part of a checkpoint would pass whatever the missing items hold."""
        missing = sum(r["status"] == "no_result" for r in report["items"])  # type: ignore[attr-defined, index]
        if missing or not self.run.records:
            self._written.append(
                (
                    "calibrated rules",
                    f"not written to {path}: {missing} of {len(self._all_items())} items have no "
                    "result (see above)",
                )
            )
            return
        rules = calibrated_rules(
            report["items"],  # type: ignore[arg-type]
            margin=self.run.calibrate_margin,
            source=self.run.model_argument,
        )
        write_text_atomically(path, rules)
        self._written.append(("calibrated rules", str(path)))

    def _all_items(self) -> list[Record]:
        """A record for every collected item (and any other with a record), each with the
        outcome pytest's reports support; built once, when all reports are in."""
        if self._items is None:
            records = self.run.records
            nodeids = dict.fromkeys((*self.ledger.collected, *records))
            self._items = [self._item(nodeid, records.get(nodeid)) for nodeid in nodeids]
        return self._items

    def _item(self, nodeid: str, record: Record | None) -> Record:
        outcome, error = self.ledger.outcome(nodeid, record)
        if record is not None:
            return (
                record
                if outcome == record["outcome"]
                else {**record, "outcome": outcome, "error": error}
            )
        position = item_position(nodeid)
        assert position is not None, nodeid  # the ledger keeps ids of this plugin's items only
        layer, head, matrix = position
        kv_head, shape = self.run.item_place(head, matrix)
        return unrecorded_record(
            nodeid=nodeid,
            layer=layer,
            head=head,
            matrix=matrix,
            kv_head=kv_head,
            shape=shape,
            outcome=outcome,
            error=error,
        )

    def _pruning(self) -> tuple[list[Candidate], int]:
        """Candidates and their total saving, computed once all records are in.

        Both the reports (session finish) and the terminal summary (after it) need them.
        """
        if self._pruning_result is None:
            geometry = self.run.checkpoint.geometry
            candidates = pruning_candidates(
                self.run.records.values(), self.run.rank_request.key, geometry
            )
            self._pruning_result = (candidates, total_saving(candidates, geometry))
        return self._pruning_result


class LayerProgressPlugin:
    """In verbose mode, a line per computed layer, after the item that waited for it.

    A plugin of its own, registered only with ``-v``, so that other runs pay nothing per item.
    """

    def __init__(self, run: SpectralRun, config: pytest.Config) -> None:
        self._config = config
        self._finished_layers: list[LayerStats] = []
        run.on_layer = self._finished_layers.append

    def pytest_runtest_logfinish(self) -> None:
        if not self._finished_layers:
            return
        reporter = self._config.pluginmanager.get_plugin("terminalreporter")
        for stats in self._finished_layers:
            if reporter is not None:
                reporter.write_line(
                    f"spectral: layer {stats.layer}: {stats.slices} head slices in "
                    f"{stats.seconds:.2f} s ({stats.from_cache} matrices from cache, "
                    f"{stats.direct_svd} direct SVD)"
                )
        self._finished_layers.clear()


class XdistControllerPlugin:
    """Hands workers the checkpoint's local path, so a hub id is resolved only once, and
    learns from them which items were collected (the controller collects none itself)."""

    def __init__(self, run: SpectralRun, ledger: ItemLedger) -> None:
        self.run = run
        self.ledger = ledger

    def pytest_configure_node(self, node: object) -> None:
        node.workerinput[MODEL_PATH_KEY] = str(self.run.model_path)  # type: ignore[attr-defined]

    def pytest_xdist_node_collection_finished(self, node: object, ids: list[str]) -> None:
        self.ledger.expect(ids)
