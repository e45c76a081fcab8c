"""What a history accepts and refuses: the step a report records, trend rules, and reports
read as untrusted input (every field checked, every text escaped, outputs never over inputs).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: F401  (imported before pytester's in-process runs, which would unload it)

from pytest_spectral.judging.rules import RulesError, load_rules
from pytest_spectral.reporting.history.reports import HistoryError, report_sources
from pytest_spectral.reporting.history.table import build_table, trend_breaks
from pytest_spectral.results import SCHEMA

LAYOUT = {
    "model_type": "llama",
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 4,
    "hidden_size": 8,
}


def report(number: int | None, ranks: tuple = (3.0, 3.0), **changes) -> dict:
    """A minimal valid report of step ``number``: two q head items of layer 0 with these
    stable ranks; ``changes`` replace top-level keys."""
    document = {
        "schema": SCHEMA,
        "schema_version": 3,
        "created": f"2026-01-01T00:00:{(number or 0) % 60:02d}+00:00",
        "step": None if number is None else {"label": str(number), "number": number, "source": "x"},
        "model": dict(LAYOUT),
        "items": [
            {
                "nodeid": f"spectral::layer0::head{h}-q",
                "layer": 0,
                "head": h,
                "matrix": "q",
                "outcome": "passed",
                "metrics": {"stable_rank": rank},
                "singular_values": [2.0, 1.0, 0.5, 0.25],
            }
            for h, rank in enumerate(ranks)
        ],
    }
    document.update(changes)
    return document


def write(directory: Path, name: str, document: object) -> Path:
    path = directory / name
    path.write_text(json.dumps(document))
    return path


def history(directory: Path):
    return build_table(report_sources([directory], what="test"), ["stable_rank"])


class TestStep:
    def test_option_label_and_number(self, pytester, tiny_checkpoint) -> None:
        for given, expected in (("1500", 1500), ("v2-rc1", None)):
            pytester.runpytest(
                f"--spectral-model={tiny_checkpoint}", f"--spectral-step={given}",
                "--spectral-report=r.json", "-p", "no:cacheprovider",
            )  # fmt: skip
            step = json.loads((pytester.path / "r.json").read_text())["step"]
            assert step == {"label": given, "number": expected, "source": "--spectral-step"}

    def test_trainer_state_before_the_directory_name(self, pytester, tiny_checkpoint) -> None:
        (tiny_checkpoint / "trainer_state.json").write_text('{"global_step": 1234}')
        pytester.runpytest(
            f"--spectral-model={tiny_checkpoint}", "--spectral-report=r.json",
            "-p", "no:cacheprovider",
        )  # fmt: skip
        step = json.loads((pytester.path / "r.json").read_text())["step"]
        assert step == {"label": "1234", "number": 1234, "source": "trainer_state.json"}

    @pytest.mark.parametrize(
        "state", ['{"global_step": "12"}', '{"global_step": -1}', '{"global_step": true}',
                  '{"global_step": 1e3}', '[1]', '{"global_step": 10000000000000000}', "{"],
    )  # fmt: skip
    def test_bad_trainer_state_is_a_usage_error(self, pytester, tiny_checkpoint, state) -> None:
        (tiny_checkpoint / "trainer_state.json").write_text(state)
        result = pytester.runpytest(f"--spectral-model={tiny_checkpoint}")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*trainer_state.json*--spectral-step*"])

    def test_a_fifo_as_trainer_state_is_refused_without_blocking(
        self, pytester, tiny_checkpoint
    ) -> None:
        os.mkfifo(tiny_checkpoint / "trainer_state.json")
        result = pytester.runpytest(f"--spectral-model={tiny_checkpoint}")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*trainer_state.json: is a named pipe*"])

    @pytest.mark.parametrize("given", ["", "x" * 101, "a\x1bb"])
    def test_bad_option_is_a_usage_error(self, pytester, tiny_checkpoint, given) -> None:
        result = pytester.runpytest(
            f"--spectral-model={tiny_checkpoint}", f"--spectral-step={given}"
        )
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*--spectral-step*"])


class TestTrendRules:
    @pytest.mark.parametrize(
        ("line", "message"),
        [
            ("window = 1", "must be between 2 (this report and the one before) and 1000"),
            ("window = 1.5", "must be a whole number of reports"),
            ("window = true", "must be a whole number of reports"),
        ],
    )
    def test_bad_window(self, tmp_path, line, message) -> None:
        path = tmp_path / "rules.toml"
        path.write_text(f'[[rules]]\nmetric = "stable_rank"\nmin_change = -0.5\n{line}\n')
        with pytest.raises(
            RulesError, match=re.escape(f"rules.toml:4: rule 1, key 'window': {message}")
        ):
            load_rules(path)

    def test_window_needs_a_change_bound(self, tmp_path) -> None:
        path = tmp_path / "rules.toml"
        path.write_text('[[rules]]\nmetric = "stable_rank"\nmin = 1\nwindow = 3\n')
        with pytest.raises(RulesError, match="give min_change or max_change"):
            load_rules(path)

    def test_trend_rule_without_history_is_a_usage_error(self, pytester, tiny_checkpoint) -> None:
        rules = pytester.path / "rules.toml"
        rules.write_text('[[rules]]\nmetric = "stable_rank"\nmin_change = -0.5\nwindow = 3\n')
        result = pytester.runpytest(
            f"--spectral-model={tiny_checkpoint}", f"--spectral-thresholds={rules}"
        )
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*over the last 3 reports*--spectral-history=DIR*"])

    def test_the_window_reaches_back_at_most_window_minus_one_reports(self, tmp_path) -> None:
        """Head 0 loses 20% per report: a 30% bound breaks over 3 reports, never over 2."""
        ranks = [10.0 * 0.8**i for i in range(5)]
        for i, rank in enumerate(ranks):
            write(tmp_path, f"r{i}.json", report(100 * (i + 1), (rank, 3.0)))
        table = history(tmp_path)
        for window, expected in ((2, set()), (3, {2, 3, 4})):
            path = tmp_path / f"rules{window}.toml"
            path.write_text(
                f'[[rules]]\nname = "w"\nmetric = "stable_rank"\nmin_change = -0.3\n'
                f"window = {window}\n"
            )
            rules = load_rules(path).rules
            assert {i for i, column in trend_breaks(table, rules) if column == 0} == expected
            assert table.trend_reference(rules[0], "spectral::layer0::head0-q", 4) == (
                ranks[4 - window + 1],
                str(100 * (4 - window + 2)),
            )


class TestReports:
    def test_ordered_by_step_not_by_name(self, tmp_path) -> None:
        for step in (300, 100, 200):
            write(tmp_path, f"z{400 - step}.json", report(step))
        assert history(tmp_path).labels == ["100", "200", "300"]

    def test_reports_without_a_step_follow_by_creation_time(self, tmp_path) -> None:
        write(tmp_path, "a.json", report(None, created="2026-01-02T00:00:00+00:00"))
        write(tmp_path, "b.json", report(None, created="2026-01-01T00:00:00+00:00"))
        write(tmp_path, "c.json", report(5))
        assert history(tmp_path).labels == [
            "5",
            "2026-01-01T00:00:00+00:00",
            "2026-01-02T00:00:00+00:00",
        ]

    @pytest.mark.parametrize(
        ("document", "message"),
        [
            ([1], "not a pytest-spectral report"),
            (report(1, schema_version=9), "report schema version 9"),
            (report(1, model={**LAYOUT, "head_dim": 8}), "another model layout: model.head_dim"),
            (report(1, step={"label": "1", "number": -3, "source": "x"}), "step.number"),
            (report(1, step="1"), "key 'step' must be an object"),
            (report(1, created=5), "key 'created'"),
            (report(1, items={}), "key 'items' must be a list"),
        ],
    )
    def test_bad_report(self, tmp_path, document, message) -> None:
        write(tmp_path, "a.json", report(0))
        write(tmp_path, "b.json", document)
        with pytest.raises(HistoryError, match=message):
            history(tmp_path)

    @pytest.mark.parametrize(
        ("field", "value", "message"),
        [
            ("metrics", {"stable_rank": "3"}, r"items\[1\]\.metrics\.stable_rank must be a number"),
            (
                "metrics",
                {"stable_rank": 10**400},
                r"items\[1\]\.metrics\.stable_rank is out of range",
            ),
            ("layer", -1, r"items\[1\]\.layer must be a non-negative integer"),
            ("head", True, r"items\[1\]\.head must be an integer or null"),
            ("outcome", "great", r"items\[1\]\.outcome must be one of"),
            ("nodeid", None, r"items\[1\]\.nodeid must be a string"),
        ],
    )
    def test_bad_item_names_file_and_key(self, tmp_path, field, value, message) -> None:
        document = report(1)
        document["items"][1][field] = value
        path = tmp_path / "a.json"
        path.write_text(json.dumps(document).replace('"1' + "0" * 400, "1" + "0" * 400))
        with pytest.raises(HistoryError, match=f"{path}: {message}"):
            history(tmp_path)

    def test_two_reports_of_one_step(self, tmp_path) -> None:
        write(tmp_path, "a.json", report(7))
        write(tmp_path, "b.json", report(7))
        with pytest.raises(HistoryError, match=r"two reports of step 7: .*a\.json and .*b\.json"):
            history(tmp_path)

    def test_a_report_named_twice_is_read_once(self, tmp_path) -> None:
        first = write(tmp_path, "a.json", report(1))
        write(tmp_path, "b.json", report(2))
        table = build_table(report_sources([tmp_path, first], what="--spectral-history"), [])
        assert [h.source.name for h in table.headers] == [str(first), str(tmp_path / "b.json")]

    def test_nan_and_missing_values_are_kept_apart(self, tmp_path) -> None:
        write(tmp_path, "a.json", report(1, ("nan", 3.0)))
        document = report(2)
        del document["items"][1]["metrics"]["stable_rank"]
        write(tmp_path, "b.json", document)
        table = history(tmp_path)
        assert table.present["stable_rank"].tolist() == [[True, True], [True, False]]
        assert np.isnan(table.values["stable_rank"][0, 0])


def run_command(*arguments: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest_spectral.reporting.history", *map(str, arguments)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


class TestCommand:
    def test_text_from_reports_is_escaped(self, tmp_path) -> None:
        reports = tmp_path / "reports"
        reports.mkdir()
        hostile = "<script>alert(1)</script>\x1b[2J"
        for step in (1, 2):
            document = report(step)
            document["step"]["label"] = f"{hostile}{step}"
            document["items"][0]["nodeid"] = f"spectral::{hostile}"
            document["items"][0]["outcome"] = "failed"
            write(reports, f"{step}.json", document)
        result = run_command(reports, "-o", tmp_path / "page.html")
        assert result.returncode == 0, result.stderr
        page = (tmp_path / "page.html").read_text()
        assert "<script>alert" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;\\x1b[2J1" in page

    def test_never_writes_over_a_report(self, tmp_path) -> None:
        path = write(tmp_path, "a.json", report(1))
        result = run_command(path, "-o", path)
        assert result.returncode == 2
        assert "is one of the reports read" in result.stderr
        assert json.loads(path.read_text()) == report(1)

    @pytest.mark.parametrize(
        ("arguments", "message"),
        [
            (["missing", "-o", "page.html"], "reports missing: no such file or directory"),
            (["empty", "-o", "page.html"], "no reports found"),
            (["empty", "-o", "nowhere/page.html"], "directory .*nowhere does not exist"),
            (["r", "-o", "page.html", "--metrics", "nosuch"], "unknown metric 'nosuch'; known: "),
        ],
    )
    def test_bad_arguments(self, tmp_path, arguments, message) -> None:
        (tmp_path / "empty").mkdir()
        (tmp_path / "r").mkdir()
        write(tmp_path / "r", "1.json", report(1))
        result = subprocess.run(
            [sys.executable, "-m", "pytest_spectral.reporting.history", *arguments],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 2
        assert re.search(message, result.stderr), result.stderr


class TestRunHistory:
    def test_only_earlier_steps_and_never_the_own_report(self, pytester, tiny_checkpoint) -> None:
        reports = pytester.mkdir("reports")
        layout = {
            **LAYOUT,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "hidden_size": 64,
        }
        for step in (100, 200, 400):
            write(reports, f"{step}.json", report(step, model=layout))
        # an earlier attempt's report of this step at --spectral-report: this run's own
        # report is never part of its history
        write(reports, "own.json", report(300, model=layout))
        result = pytester.runpytest(
            f"--spectral-model={tiny_checkpoint}", "--spectral-step=300",
            f"--spectral-history={reports}", f"--spectral-report={reports / 'own.json'}",
            "-p", "no:cacheprovider",
        )  # fmt: skip
        assert result.ret == pytest.ExitCode.OK
        result.stdout.fnmatch_lines(["spectral: history of 2 earlier report(s) (steps 100 to 200)"])

    def test_an_earlier_checkpoints_report_is_never_replaced(
        self, pytester, tiny_checkpoint
    ) -> None:
        """Neither by this run's report (another step's history would be lost), nor removed
        as a stale output by a run that stops at a usage error."""
        reports = pytester.mkdir("reports")
        layout = {**LAYOUT, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "hidden_size": 64}  # fmt: skip
        earlier = write(reports, "step-100.json", report(100, model=layout))
        kept = earlier.read_bytes()
        history = (f"--spectral-model={tiny_checkpoint}", f"--spectral-history={reports}",
                   f"--spectral-report={earlier}", "-p", "no:cacheprovider")  # fmt: skip
        result = pytester.runpytest(*history, "--spectral-step=300")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            [f"*--spectral-report {earlier}: holds the report of step 100, an earlier checkpoint "
             "of --spectral-history; write this run's report (step 300) to another path*"]
        )  # fmt: skip
        assert earlier.read_bytes() == kept
        bad_rules = pytester.path / "bad.toml"
        bad_rules.write_text("bad = [\n")
        stopped = pytester.runpytest(*history, f"--spectral-thresholds={bad_rules}")
        assert stopped.ret == pytest.ExitCode.USAGE_ERROR
        assert earlier.read_bytes() == kept

    def test_a_report_of_another_model_is_a_usage_error(self, pytester, tiny_checkpoint) -> None:
        reports = pytester.mkdir("reports")
        write(reports, "1.json", report(1))
        result = pytester.runpytest(
            f"--spectral-model={tiny_checkpoint}", f"--spectral-history={reports}"
        )
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*1.json: a report of another model layout*"])
