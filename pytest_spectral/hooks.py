"""Hooks active only during a spectral run (registered when ``--spectral-model`` is given).

Keeping them in their own plugin object means a plain ``pytest`` run in the same environment
pays for none of them and never imports torch.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_spectral.checkpoints.checkpoint import Checkpoint
from pytest_spectral.invocation import inside
from pytest_spectral.judging.candidates import (
    Candidate,
    Regression,
    candidate_record,
    pruning_candidates,
    regression_record,
    regressions,
    total_saving,
)
from pytest_spectral.nodes import (
    ROOT_NAME,
    SpectralItem,
    SpectralRoot,
    item_position,
    place,
)
from pytest_spectral.notices import notices
from pytest_spectral.outcomes import ItemLedger
from pytest_spectral.printable import printable
from pytest_spectral.reporting.files import OutputPathError, write_text_atomically
from pytest_spectral.reporting.report import build_report, unrecorded_record, write_report
from pytest_spectral.reporting.summary import render_summary
from pytest_spectral.results import LayerStats, Record
from pytest_spectral.run import MODEL_PATH_KEY, SpectralRun
from pytest_spectral.wording import counted


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def print_spectral_ids_as_they_are(config: pytest.Config) -> None:
    """Keep pytest from printing ``../spectral::layer01::head02-q`` for a spectral id.

    pytest prints node ids relative to the invocation directory: it takes the part before the
    first ``::`` for a path under the rootdir (``Config.cwd_relative_nodeid``), so run from a
    sub-directory of the rootdir (or with a rootdir above it) an id would gain a ``../``
    and stop being one. The spectral ids name no file; they are printed as they are, so that
    a FAILED line can be pasted back as an argument.
    """
    relative = config.cwd_relative_nodeid

    def cwd_relative_nodeid(nodeid):  # type: ignore[no-untyped-def]
        path = getattr(nodeid, "path", None)  # a NodeId in recent pytest, a str before
        if path is None:
            path = str(nodeid).partition("::")[0]
        return nodeid if path == ROOT_NAME else relative(nodeid)

    config.cwd_relative_nodeid = cwd_relative_nodeid  # type: ignore[method-assign]


class SpectralPlugin:
    def __init__(self, run: SpectralRun, ledger: ItemLedger) -> None:
        self.run = run
        self.ledger = ledger
        self._written: list[tuple[str, str]] = []
        self._verdicts: Verdicts | None = None
        self._header_shown = False
        self._items: list[Record] | None = None
        #: warned items whose warning the warning filters would have made an error
        self._warnings_kept = 0
        #: why the session was interrupted, if it was
        self._stopped: str | None = None

    @pytest.hookimpl(tryfirst=True)
    def pytest_ignore_collect(self, collection_path: Path, config: pytest.Config) -> bool | None:
        """Without explicit paths, a spectral run collects only the spectral items (the
        header says so: see :func:`notices`). With paths, it never collects from the
        checkpoint's directories, wherever they sit under them: pytest would import their
        ``conftest.py`` and test files. (A test path inside the checkpoint, for which pytest
        does not ask, is refused at startup: ``invocation.py``.)"""
        if config.args_source != pytest.Config.ArgsSource.ARGS:
            return True
        if inside(collection_path, self.run.protected) is not None:
            return True
        return None

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        self._header_shown = True
        return notices(self.run, config)

    def pytest_report_teststatus(
        self, report: pytest.TestReport, config: pytest.Config
    ) -> tuple[str, str, tuple[str, dict[str, bool]]] | None:
        """A warned item counts as ``warned`` (``W``, ``WARNED`` with ``-v``), so that pytest's
        footer and the spectral summary count the same outcomes."""
        record = getattr(report, "spectral", None)
        if report.when == "call" and report.passed and record and record["outcome"] == "warned":
            return "warned", "W", ("WARNED", {"yellow": True})
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
            if item.warning_kept:
                report.spectral_warning_kept = True  # type: ignore[attr-defined]
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        record = getattr(report, "spectral", None)
        if record is not None:
            self.run.records[report.nodeid] = record
        if getattr(report, "spectral_warning_kept", False):
            self._warnings_kept += 1
        self.ledger.observe(report)

    def pytest_terminal_summary(
        self, terminalreporter: pytest.TerminalReporter, config: pytest.Config
    ) -> None:
        if _is_xdist_worker(config):
            return
        if not self._header_shown:  # -q or --no-header: the notices go here instead
            for line in notices(self.run, config):
                terminalreporter.write_line(line)
        items = self._all_items()
        if items and not config.option.collectonly:
            writer = config.get_terminal_writer()
            verdicts = self._slice_verdicts()
            text = render_summary(
                items,
                verdicts.candidates,
                verdicts.regressions,
                total_saved=verdicts.total_saved,
                energy=self.run.energy,
                width=writer.fullwidth,
                color=writer.hasmarkup,
            )
            terminalreporter.section("spectral summary")
            terminalreporter.write(text)
            if self.run.heatmap is not None:
                from pytest_spectral.reporting.heatmap import render_heatmap

                spec, checkpoint = self.run.heatmap, self.run.checkpoint
                geometries = checkpoint.stack_geometries()
                terminalreporter.write(
                    render_heatmap(
                        items,
                        spec.name,
                        layers=checkpoint.blocks,  # at least any stack's layers
                        heads={stack: g.heads for stack, g in geometries.items()},
                        width=writer.fullwidth,
                        color=writer.hasmarkup,
                        bad=spec.bad,
                        rules=self.run.rules.rules,
                        log=spec.log_scale,
                    )
                )
        if self._warnings_kept:
            terminalreporter.write_line(
                f"spectral: {counted(self._warnings_kept, 'warned item')} stayed warned although "
                "the warning filters make warnings errors (-W error, filterwarnings): a warned "
                'verdict is the rules file\'s (severity = "warn", or --spectral-warn-only); '
                'give a rule severity = "fail" to fail its items'
            )
        for label, where in self._written:
            terminalreporter.write_line(printable(f"spectral {label}: {where}"))

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        """Ctrl-C, or pytest-xdist's controller stopping after ``--maxfail`` failures."""
        self._stopped = str(excinfo.value) or "interrupted"

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Write every requested report, whatever happened: an earlier run's file at the same
        path was removed at startup, and this run's replaces it even when no item ran."""
        self.run.close()
        if _is_xdist_worker(session.config):
            return
        reasons = (self._stopped, session.shouldfail, session.shouldstop)
        reason = next((r for r in reasons if isinstance(r, str) and r), None)
        if reason is not None:
            self.ledger.stop_reason = f"not run: {reason}"
        run = self.run
        if not (run.report_path or run.html_path or run.calibrate_path):
            return  # nothing to write: the terminal summary needs no report
        items = self._all_items()
        verdicts = self._slice_verdicts()
        report = build_report(
            checkpoint=run.checkpoint,
            model_argument=run.model_argument,
            from_hub=run.from_hub,
            rules=run.rules,
            baseline=run.baseline,
            settings=run.settings(),
            records=items,
            candidates=[candidate_record(c) for c in verdicts.candidates],
            regressions=[regression_record(r) for r in verdicts.regressions],
            params_saved=verdicts.total_saved,
            step=run.step,
        )
        if run.report_path:
            self._write(session, "report", run.report_path, lambda p: write_report(p, report))
        if run.html_path:
            from pytest_spectral.reporting.html_report import render_html

            page = render_html(
                report,
                verdicts.candidates,
                verdicts.regressions,
                energy=run.energy,
                rules=run.rules.rules,
                history=self._history_sections(report),
            )
            self._write(
                session, "HTML report", run.html_path, lambda p: write_text_atomically(p, page)
            )
        if run.calibrate_path:
            self._calibrate(session, run.calibrate_path, report)

    def _write(
        self,
        session: pytest.Session,
        label: str,
        path: Path,
        write: Callable[[Path], None],
        note: str = "",
    ) -> None:
        """Write one output; a failure (its directory removed or full, a device put in its
        place during the run) is one line in the summary and exit code 4, not a traceback."""
        try:
            write(path)
        except (OSError, OutputPathError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._written.append((label, f"NOT written to {path}: {reason}"))
            session.exitstatus = pytest.ExitCode.USAGE_ERROR
        else:
            self._written.append((label, f"{path}{note}"))

    def _history_sections(self, report: dict[str, object]) -> list[str]:
        """The history page's sections, this run's report last; none without a history."""
        history = self.run.history
        if history is None:
            return []
        from pytest_spectral.reporting.history.page import history_metrics, history_sections

        rules = self.run.rules.rules
        metrics = history_metrics([], rules)
        return history_sections(history.with_run(report, metrics), metrics, rules)

    def _calibrate(self, session: pytest.Session, path: Path, report: dict[str, object]) -> None:
        """Calibrated rules come only from a run where every collected item has its values:
        bounds from part of a checkpoint would pass whatever the missing items hold. Items
        that broke a rule (or have non-finite or zero weights) are left out of the bounds,
        and the line saying where the rules went says how many."""
        items: list[Record] = report["items"]  # type: ignore[assignment]
        missing = sum(r["status"] == "no_result" for r in items)
        if missing or not self.run.records:
            self._written.append(
                (
                    "calibrated rules",
                    f"not written to {path}: {missing} of {counted(len(items), 'item')} "
                    f"{'has' if missing == 1 else 'have'} no result (see above)",
                )
            )
            return
        from pytest_spectral.judging.calibrate import calibrated_rules

        geometries = self.run.checkpoint.stack_geometries()
        calibration = calibrated_rules(
            items,
            margin=self.run.calibrate_margin,
            source=self.run.model_argument,
            layers=self.run.checkpoint.stack_layers(),
            heads={stack: g.heads for stack, g in geometries.items()},
        )
        note = ""
        if calibration.part is not None:
            note += f" (measured only {calibration.part}; its rules apply there only)"
        if calibration.left_out:
            note += (
                f" (bounds from {calibration.used} of {counted(len(items), 'item')}; "
                f"{calibration.left_out} that failed or warned "
                f"{'was' if calibration.left_out == 1 else 'were'} left out)"
            )
        self._write(
            session,
            "calibrated rules",
            path,
            lambda p: write_text_atomically(p, calibration.text),
            note=note,
        )

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
        stack, layer, head, matrix = position
        block: int = self.run.checkpoint.block(stack, layer)  # type: ignore[assignment]
        kv_head, shape = self.run.item_place(block, head, matrix)
        return unrecorded_record(
            nodeid=nodeid,
            stack=stack,
            layer=layer,
            head=head,
            matrix=matrix,
            kv_head=kv_head,
            shape=shape,
            outcome=outcome,
            error=error,
        )

    def _slice_verdicts(self) -> Verdicts:
        """Regressions, candidates and the candidates' total saving, computed once all records
        are in: both the reports (session finish) and the terminal summary (after it) need
        them."""
        if self._verdicts is None:
            records = list(self.run.records.values())
            candidates: list[Candidate] = []
            saved = 0
            # per stack: a vision tower's heads are sized by its own geometry
            for stack, geometry in self.run.checkpoint.stack_geometries().items():
                mine = [r for r in records if r.get("stack") == stack]
                found = pruning_candidates(mine, self.run.rank_request.key, geometry)
                candidates += found
                saved += total_saving(found, geometry)
            candidates.sort(key=lambda c: (-c.saved, c.nodeids))
            self._verdicts = Verdicts(regressions(records), candidates, saved)
        return self._verdicts


@dataclass(frozen=True)
class Verdicts:
    """What the failed and warned slices of a run call for (see judging/candidates.py)."""

    regressions: list[Regression]
    candidates: list[Candidate]
    total_saved: int


class LayerProgressPlugin:
    """In verbose mode, a line per computed layer, printed once all of the layer's items have
    reported (so it follows them rather than splitting them).

    The engine computes a layer when its first item asks for it; the layer's figures travel on
    that item's report, so that under pytest-xdist the controller prints them too. A plugin of
    its own, registered only with ``-v``, so that other runs pay nothing per item.
    """

    def __init__(self, run: SpectralRun, config: pytest.Config, ledger: ItemLedger) -> None:
        self._config = config
        self._ledger = ledger
        self._checkpoint = run.checkpoint
        self._computed: list[LayerStats] = []  # in this process, not yet on a report
        run.on_layer = self._computed.append
        self._stats: dict[int, LayerStats] = {}
        self._finished: Counter[int] = Counter()
        self._units: dict[int, list[tuple[str, str]]] | None = None

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if call.when == "call" and self._computed:
            report.spectral_layers = [dataclasses.asdict(s) for s in self._computed]  # type: ignore[attr-defined]
            self._computed.clear()
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for stats in getattr(report, "spectral_layers", ()):
            self._stats[stats["layer"]] = LayerStats(**stats)

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        position = item_position(nodeid)
        if position is None or _is_xdist_worker(self._config):
            return
        layer = self._checkpoint.block(position.stack, position.layer)
        self._finished[layer] += 1  # type: ignore[index]
        if self._units is None:  # the collected items are known by now, and do not change
            self._units = _units(self._ledger.collected, self._checkpoint)
        units = self._units
        if layer in self._stats and self._finished[layer] == len(units[layer]):
            reporter = self._config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                stats = self._stats.pop(layer)
                where = place(*self._checkpoint.position(stats.layer))
                reporter.write_line(progress_line(stats, units[layer], where))


def _units(nodeids: tuple[str, ...], checkpoint: Checkpoint) -> dict[int, list[tuple[str, str]]]:
    """Each block's items as (matrix, scope)."""
    units: dict[int, list[tuple[str, str]]] = {}
    for nodeid in nodeids:
        stack, layer, head, matrix = item_position(nodeid)  # type: ignore[misc]
        block: int = checkpoint.block(stack, layer)  # type: ignore[assignment]
        units.setdefault(block, []).append((matrix, "matrix" if head is None else "head"))
    return units


def progress_line(stats: LayerStats, items: list[tuple[str, str]], where: str = "") -> str:
    """``spectral: layer 1: 32 items from 20 slices ...``: the layer's items, as (matrix,
    scope), and the distinct slices decomposed for them (a K/V slice serves every query head
    of its group), the time, how many of the layer's matrices came from the cache, and how
    many slices were refined beyond the Gram route (CholeskyQR2 or Householder QR:
    ill-conditioned ones)."""
    units = set(items)
    shared = " (K/V slices are shared by query heads)" if stats.slices < len(items) else ""
    return (
        f"spectral: {where or f'layer {stats.layer}'}: {counted(len(items), 'item')} from "
        f"{counted(stats.slices, 'distinct slice')}{shared} in {stats.seconds:.2f} s; "
        f"{stats.from_cache} of {counted(len(units), 'matrix', 'matrices')} from the cache, "
        f"{counted(stats.refined, 'slice')} refined beyond the Gram route"
    )


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
