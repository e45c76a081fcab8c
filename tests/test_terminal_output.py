"""What a spectral run prints: failure blocks, titles, warnings, counts and progress lines.

The model: 2 layers, 4 query heads sharing 2 K/V heads (head_dim 8, hidden 32), with K/V head
1 of layer 1 collapsed in K (query heads 2 and 3 read it), O head 1 of layer 0 of rank 4 (its
condition number is then floor-limited), and an advisory rule that V head 0 of layer 0
(query heads 0 and 1) always breaks.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch

from pytest_spectral.testing.synthetic import (
    LlamaShape,
    attention_name,
    random_llama_weights,
    write_checkpoint,
)

SHAPE = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, mlp=False)
RULES = """\
[[rules]]
name = "collapsed"
metric = "stable_rank"
min = 1.5
matrices = ["k"]

[[rules]]
name = "ill-conditioned"
metric = "first_last_ratio"
max = 300
matrices = ["o"]

[[rules]]
name = "advisory"
metric = "spectral_norm"
min = 1e9
matrices = ["v"]
layers = "0"
heads = "0-1"
severity = "warn"
"""


def planted_model(directory: Path) -> Path:
    tensors = random_llama_weights(SHAPE, seed=5)
    k = tensors[attention_name(1, "k")]
    k[8:16] = torch.outer(torch.linspace(1, 2, 8), torch.linspace(-1, 1, 32))
    o = tensors[attention_name(0, "o")]
    o[:, 8:16] = torch.randn(32, 4, generator=torch.Generator().manual_seed(1)) @ torch.randn(
        4, 8, generator=torch.Generator().manual_seed(2)
    )
    return write_checkpoint(directory, tensors, SHAPE.config())


@pytest.fixture
def run(pytester: pytest.Pytester):
    model = planted_model(pytester.path / "model")
    rules = pytester.path / "rules.toml"
    rules.write_text(RULES)

    def run(*extra: str) -> pytest.RunResult:
        return pytester.runpytest(
            f"--spectral-model={model}", f"--spectral-thresholds={rules}", *extra
        )

    return run


class TestFailures:
    def test_a_shared_kv_slice_prints_one_report_the_others_name_it(self, run) -> None:
        result = run()
        text = result.stdout.str()
        assert text.count("  FAIL collapsed:") == 1
        result.stdout.fnmatch_lines(
            [
                "_* spectral::layer01::head02-k _*",
                "collapsed: stable_rank = * < min 1.5",
                "layer 1, K/V head 1 (shared by query heads 2-3), k: rows 8:16 of "
                "model.layers.1.self_attn.k_proj.weight (8x32)",
                "  FAIL collapsed: stable_rank = * < min 1.5",
                "  top singular values (8 of 8): *",
                "_* spectral::layer01::head03-k _*",
                "collapsed: stable_rank = * < min 1.5",
                "layer 1, K/V head 1 (shared by query heads 2-3), k: *",
                "  the same slice and verdict as spectral::layer01::head02-k, reported above",
            ]
        )
        # every item keeps its FAILED line, for --lf and pasting
        result.stdout.fnmatch_lines(
            [
                "FAILED spectral::layer01::head02-k - collapsed*",
                "FAILED spectral::layer01::head03-k - collapsed*",
            ]
        )

    @pytest.mark.parametrize("untrimmed", [["-vv"], ["CI"], ["BUILD_NUMBER"]])
    def test_the_short_summary_gives_each_failure_its_headline_only(
        self, run, monkeypatch: pytest.MonkeyPatch, untrimmed: list[str]
    ) -> None:
        """On CI (pytest reads CI or BUILD_NUMBER) and with -vv pytest prints the summary
        message untrimmed: it is the headline, not the whole block a second time."""
        monkeypatch.delenv("CI", raising=False)
        monkeypatch.delenv("BUILD_NUMBER", raising=False)
        if untrimmed[0].startswith("-"):
            result = run(*untrimmed)
        else:
            monkeypatch.setenv(untrimmed[0], "1")
            result = run()
        summary = result.stdout.str().split("short test summary info")[1]
        assert "FAILED spectral::layer01::head02-k - collapsed: stable_rank = " in summary
        assert "top singular values" not in summary
        assert "K/V head 1 (shared by" not in summary

    def test_titles_read_like_node_ids(self, run) -> None:
        titles = re.findall(r"^_+ (\S+) _+$", run().stdout.str(), flags=re.MULTILINE)
        assert titles == [
            "spectral::layer00::head01-o",
            "spectral::layer01::head02-k",
            "spectral::layer01::head03-k",
        ]

    def test_floor_limited_values_read_as_lower_bounds(self, run) -> None:
        result = run()
        result.stdout.fnmatch_lines(
            [
                "ill-conditioned: first_last_ratio >= * > max 300 (a lower bound: sigma_min "
                "is below the storage/rounding floor)",
                "*ill-conditioned: >= * > 300*",  # the candidates table
            ]
        )
        assert "first_last_ratio = >=" not in result.stdout.str()
        assert re.search(r"=\d", result.stdout.str()) is None


class TestShortSummary:
    """pytest's short test summary gives each failed item one line. On CI (``CI`` or
    ``BUILD_NUMBER`` set) and with ``-vv`` pytest appends the failure's message untrimmed:
    it is the failure's first line there, never the whole block a second time."""

    FAILED = (
        "FAILED spectral::layer00::head01-o",
        "FAILED spectral::layer01::head02-k",
        "FAILED spectral::layer01::head03-k",
    )

    @pytest.mark.parametrize(
        ("variable", "extra"),
        [
            ("CI", ()),
            ("BUILD_NUMBER", ()),
            (None, ("-vv",)),
            ("CI", ("-n", "2", "--dist", "loadscope")),
        ],
        ids=["CI", "BUILD_NUMBER", "-vv", "CI-xdist"],
    )
    def test_one_line_per_failed_item_where_pytest_shows_messages_whole(
        self, run, monkeypatch, variable, extra
    ) -> None:
        for name in ("CI", "BUILD_NUMBER"):
            monkeypatch.delenv(name, raising=False)
        if variable is not None:
            monkeypatch.setenv(variable, "true")
        result = run(*extra)
        lines = result.stdout.lines
        start = next(i for i, line in enumerate(lines) if "short test summary info" in line) + 1
        end = next(i for i in range(start, len(lines)) if lines[i].startswith("="))
        summary = sorted(lines[start:end])
        assert tuple(line.split(" - ")[0] for line in summary) == self.FAILED
        assert re.fullmatch(
            r"FAILED spectral::layer01::head02-k - collapsed: stable_rank = \S+ < min 1\.5",
            summary[1],
        )
        assert summary[0].startswith(
            "FAILED spectral::layer00::head01-o - ill-conditioned: first_last_ratio >= "
        )
        # the block itself is printed once, under the item's title
        assert result.stdout.str().count("  FAIL collapsed:") == 1
        assert result.stdout.str().count("  FAIL ill-conditioned:") == 1

    def test_line_tracebacks_point_at_the_broken_bound(self, run) -> None:
        """``--tb=line`` prints the failure's location and first line, as for a warning."""
        result = run("--tb=line")
        result.stdout.fnmatch_lines(
            [
                "=* FAILURES =*",
                "<rules.toml>:10: ill-conditioned: first_last_ratio >= * > max 300 *",
                "<rules.toml>:4: collapsed: stable_rank = * < min 1.5",
                "<rules.toml>:4: collapsed: stable_rank = * < min 1.5",
                "=* warnings summary =*",
            ],
            consecutive=True,
        )

    def test_junit_failure_message_is_the_first_line_its_text_the_block(
        self, run, pytester
    ) -> None:
        import xml.etree.ElementTree as ElementTree

        run("--junitxml=out.xml")
        failures = {
            case.get("name"): case.find("failure")
            for case in ElementTree.parse(pytester.path / "out.xml").iter("testcase")
            if case.find("failure") is not None
        }
        assert sorted(failures) == ["head01-o", "head02-k", "head03-k"]
        collapsed = failures["head02-k"]
        assert re.fullmatch(r"collapsed: stable_rank = \S+ < min 1\.5", collapsed.get("message"))
        assert collapsed.text.splitlines()[0] == collapsed.get("message")
        assert "  FAIL collapsed: stable_rank = " in collapsed.text
        assert "  top singular values (8 of 8): " in collapsed.text


class TestWarnings:
    def test_one_entry_for_the_slice_located_at_the_broken_bound(self, run, pytester) -> None:
        result = run()
        line = RULES.splitlines().index("min = 1e9") + 1
        result.stdout.fnmatch_lines(
            [
                "*warnings summary*",
                "spectral::layer00::head00-v",
                "spectral::layer00::head01-v",
                f"  <rules.toml>:{line}: SpectralRuleWarning: advisory: spectral_norm = * < min "
                "1e+09 (warn)",
                "  layer 0, K/V head 0 (shared by query heads 0-1), v: *",
            ]
        )
        text = result.stdout.str()
        assert text.count("SpectralRuleWarning") == 1
        assert ":0:" not in text
        assert "min = 1e9" not in text  # Python never printed the rules file's line

    def test_pytest_and_the_spectral_summary_count_the_same_outcomes(self, run) -> None:
        result = run()
        outcomes = result.parseoutcomes()
        assert (outcomes["passed"], outcomes["failed"], outcomes["warned"]) == (27, 3, 2)
        result.stdout.fnmatch_lines(["32 items: 27 passed; 3 failed (k 2, o 1); 2 warned (v 2)"])

    def test_verbose_lines_say_warned(self, run) -> None:
        result = run("-v")
        result.stdout.fnmatch_lines(
            ["spectral::layer00::head00-v WARNED *", "spectral::layer00::head01-v WARNED *"]
        )
        result.stdout.no_fnmatch_line("spectral::layer00::head00-v PASSED*")

    def test_built_in_checks_warn_from_where_they_are_made(self, pytester) -> None:
        tensors = random_llama_weights(SHAPE, seed=5)
        tensors[attention_name(0, "q")][0, 0] = float("nan")
        model = write_checkpoint(pytester.path / "nan", tensors, SHAPE.config())
        result = pytester.runpytest(f"--spectral-model={model}", "--spectral-warn-only")
        result.stdout.fnmatch_lines(
            [
                "spectral::layer00::head00-q",
                "  */pytest_spectral/judging/evaluation.py:*: SpectralRuleWarning: 1 non-finite "
                "weight",
                "*",
                "    WARN non-finite weights: 1 NaN/Inf value in this slice *",
                "    def builtin_checks(spectrum: HeadSpectrum) -> Status:  # non-finite *",
            ]
        )
        assert ":0:" not in result.stdout.str()


def test_junit_xml_tells_warned_items_from_passed_ones(run, pytester) -> None:
    """JUnit has no warned outcome: a warned item is a passing testcase, with a property."""
    import xml.etree.ElementTree as ElementTree

    run("--junitxml=out.xml", "-o", "junit_family=xunit1")
    cases = {
        (case.get("classname"), case.get("name")): {
            p.get("name"): p.get("value") for p in case.iter("property")
        }
        for case in ElementTree.parse(pytester.path / "out.xml").iter("testcase")
    }
    assert len(cases) == 32
    warned = cases[("spectral.layer00", "head00-v")]
    assert warned["spectral_outcome"] == "warned"
    assert warned["spectral_problem"].startswith("advisory: spectral_norm = ")
    assert warned["spectral_problem"].endswith(" < min 1e+09 (warn)")
    assert cases[("spectral.layer00", "head00-q")]["spectral_outcome"] == "passed"
    assert "spectral_problem" not in cases[("spectral.layer00", "head00-q")]
    assert cases[("spectral.layer01", "head02-k")]["spectral_outcome"] == "failed"
    assert sum(c["spectral_outcome"] == "warned" for c in cases.values()) == 2


class TestWarningsAsErrors:
    """A project whose warning filters make warnings errors (``filterwarnings = ["error"]``,
    ``-W error``): a warned item stays warned, with no traceback, and the summary says so."""

    KEPT = (
        "spectral: 2 warned items stayed warned although the warning filters make warnings "
        "errors (-W error, filterwarnings): a warned verdict is the rules file's (severity = "
        '"warn", or --spectral-warn-only); give a rule severity = "fail" to fail its items'
    )

    @pytest.mark.parametrize("how", ["ini", "-W"])
    def test_warned_items_stay_warned(self, run, pytester, how) -> None:
        if how == "ini":
            pytester.makeini("[pytest]\nfilterwarnings =\n    error\n")
        result = run(*(["-W", "error"] if how == "-W" else []), "--spectral-report=r.json")
        assert result.parseoutcomes() == {"passed": 27, "failed": 3, "warned": 2, "warnings": 2}
        text = result.stdout.str()
        for noise in ("Traceback", "pluggy/", "_pytest/"):
            assert noise not in text
        assert len(text.splitlines()) < 150
        result.stdout.fnmatch_lines(
            ["*SpectralRuleWarning: advisory: spectral_norm = * < min 1e+09 (warn)", self.KEPT]
        )
        summary = json.loads((pytester.path / "r.json").read_text())["summary"]
        assert (summary["warned"], summary["error"]) == (2, 0)

    def test_warn_only_still_exits_0(self, run, pytester) -> None:
        pytester.makeini("[pytest]\nfilterwarnings =\n    error\n")
        result = run("--spectral-warn-only", "--spectral-report=r.json")
        assert result.ret == pytest.ExitCode.OK
        assert result.parseoutcomes()["warned"] == 5
        summary = json.loads((pytester.path / "r.json").read_text())["summary"]
        assert (summary["warned"], summary["failed"], summary["error"]) == (5, 0, 0)

    def test_without_such_filters_nothing_is_said(self, run) -> None:
        result = run()
        assert "stayed warned" not in result.stdout.str()

    def test_an_ignore_filter_still_hides_the_warning(self, run, pytester) -> None:
        pytester.makeini("[pytest]\nfilterwarnings =\n    ignore\n")
        result = run()
        assert result.parseoutcomes()["warned"] == 2
        assert "SpectralRuleWarning" not in result.stdout.str()


def test_an_unexpected_exception_shows_the_plugins_frames_only(run, pytester, monkeypatch) -> None:
    """pytest cuts a test function's traceback at its file; a spectral item has none, and an
    unexpected exception (a bug, a conftest's mistake) showed some 600 lines of pytest's
    runner and pluggy."""
    import pytest_spectral.nodes

    # the conftest below replaces judge in this process (pytester runs in it): put it back
    # afterwards, or every later test of this process fails
    monkeypatch.setattr(pytest_spectral.nodes, "judge", pytest_spectral.nodes.judge)
    pytester.makeconftest(
        "import pytest_spectral.nodes\n"
        "def broken(*args, **kwargs):\n"
        "    raise ZeroDivisionError('planted')\n"
        "pytest_spectral.nodes.judge = broken\n"
    )
    result = run("--spectral-layers=0", "--spectral-matrices=q", "-p", "no:randomly")
    result.assert_outcomes(failed=4)
    text = result.stdout.str()
    start, stop = (text.index(f" spectral::layer00::head0{h}-q _") for h in (0, 1))
    first = text[start:stop]
    assert "def runtest(self)" in first
    assert "raise ZeroDivisionError('planted')" in first
    assert "pluggy/" not in text
    assert "_pytest/runner.py" not in text
    assert len(first.splitlines()) < 80
    full = run("--spectral-layers=0", "--spectral-matrices=q", "--fulltrace")
    assert "_pytest/runner.py" in full.stdout.str()


class TestProgress:
    def test_layer_lines_count_items_and_the_slices_they_share(self, run) -> None:
        result = run("-v", "--spectral-scope", "both", "-p", "no:randomly")
        shared = "(K/V slices are shared by query heads)"
        result.stdout.fnmatch_lines(
            [
                f"spectral: layer 0: 20 items from 16 distinct slices {shared} in * s; "
                "0 of 8 matrices from the cache, * refined beyond the Gram route",
            ]
        )

    def test_each_line_follows_the_last_item_of_its_layer(self, run) -> None:
        result = run("-v", "-p", "no:randomly")
        lines = result.stdout.lines
        for layer in (0, 1):
            at = next(
                i for i, line in enumerate(lines) if line.startswith(f"spectral: layer {layer}:")
            )
            assert lines[at - 1].startswith(f"spectral::layer0{layer}::head03-o ")
            items = [line for line in lines[:at] if line.startswith(f"spectral::layer0{layer}::")]
            assert len(items) == 16  # every item of the layer came before its line

    def test_under_xdist_the_controller_prints_them(self, run) -> None:
        result = run("-v", "-n", "2", "--dist", "loadscope")
        for layer in (0, 1):
            result.stdout.fnmatch_lines(
                [f"spectral: layer {layer}: 16 items from 12 distinct slices (K/V slices *"]
            )

    def test_whole_matrices_alone_are_one_slice_each(self, run) -> None:
        result = run("-v", "--spectral-scope", "matrix", "--spectral-layers", "0")
        result.stdout.fnmatch_lines(
            ["spectral: layer 0: 4 items from 4 distinct slices in * s; 0 of 4 matrices *"]
        )


def test_ids_print_as_they_are_from_below_the_rootdir(run, pytester, monkeypatch) -> None:
    """Run from a sub-directory of the rootdir, pytest would print ``../spectral::...``."""
    below = pytester.path / "below"
    below.mkdir()
    monkeypatch.chdir(below)
    result = run("-v")
    result.stdout.fnmatch_lines(
        ["spectral::layer01::head02-k FAILED *", "FAILED spectral::layer01::head02-k - *"]
    )
    assert "../spectral::" not in result.stdout.str()


def test_rules_files_are_named_as_given_relative_to_the_invocation_directory(
    pytester,
) -> None:
    model = planted_model(pytester.path / "model")
    rules = pytester.path / "conf" / "rules.toml"
    rules.parent.mkdir()
    rules.write_text(textwrap.dedent(RULES))
    result = pytester.runpytest(f"--spectral-model={model}", f"--spectral-thresholds={rules}")
    result.stdout.fnmatch_lines(["  <conf/rules.toml>:*: SpectralRuleWarning: advisory: *"])
