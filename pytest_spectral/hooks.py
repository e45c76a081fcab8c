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
from pytest_spectral.nodes import ROOT_NAME, SpectralItem, SpectralRoot
from pytest_spectral.reporting.heatmap import render_heatmap
from pytest_spectral.reporting.report import build_report, write_report, write_text_atomically
from pytest_spectral.reporting.summary import render_summary
from pytest_spectral.results import LayerStats
from pytest_spectral.run import MODEL_PATH_KEY, SpectralRun


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


class SpectralPlugin:
    def __init__(self, run: SpectralRun) -> None:
        self.run = run
        self._written: list[tuple[str, Path]] = []
        self._pruning_result: tuple[list[Candidate], int] | None = None

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

    def pytest_terminal_summary(
        self, terminalreporter: pytest.TerminalReporter, config: pytest.Config
    ) -> None:
        if _is_xdist_worker(config) or not self.run.records:
            return
        writer = config.get_terminal_writer()
        records = list(self.run.records.values())
        candidates, total_saved = self._pruning()
        text = render_summary(
            records,
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
                    records,
                    self.run.heatmap_metric,
                    layers=geometry.layers,
                    heads=geometry.heads,
                    width=writer.fullwidth,
                    color=writer.hasmarkup,
                )
            )
        for label, path in self._written:
            terminalreporter.write_line(f"spectral {label}: {path}")

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.run.close()
        if _is_xdist_worker(session.config) or not self.run.records:
            return
        run = self.run
        candidates, total_saved = self._pruning()
        report = build_report(
            checkpoint=run.checkpoint,
            model_argument=run.model_argument,
            rules=run.rules,
            settings=run.settings(),
            records=run.records.values(),
            candidates=[candidate_record(c) for c in candidates],
            params_saved=total_saved,
        )
        if run.report_path:
            write_report(run.report_path, report)
            self._written.append(("report", run.report_path))
        if run.html_path:
            from pytest_spectral.reporting.html_report import render_html

            page = render_html(report, candidates, energy=run.energy)
            write_text_atomically(run.html_path, page)
            self._written.append(("HTML report", run.html_path))
        if run.calibrate_path:
            rules = calibrated_rules(
                report["items"],  # type: ignore[arg-type]
                margin=run.calibrate_margin,
                source=run.model_argument,
            )
            write_text_atomically(run.calibrate_path, rules)
            self._written.append(("calibrated rules", run.calibrate_path))

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
                    f"{stats.refined} slices refined)"
                )
        self._finished_layers.clear()


class XdistControllerPlugin:
    """Hands workers the checkpoint's local path, so a hub id is resolved only once."""

    def __init__(self, run: SpectralRun) -> None:
        self.run = run

    def pytest_configure_node(self, node: object) -> None:
        node.workerinput[MODEL_PATH_KEY] = str(self.run.model_path)  # type: ignore[attr-defined]
