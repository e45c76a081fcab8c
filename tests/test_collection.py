"""What a spectral run collects: the header says when the user's tests are left out, and
spectral node ids work as arguments, like a test file's."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_spectral.testing.synthetic import LlamaShape, write_random_llama

SHAPE = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, mlp=False)
FAILING_USER_TEST = "def test_user():\n    assert False\n"


@pytest.fixture
def model(pytester: pytest.Pytester) -> Path:
    return write_random_llama(pytester.path / "model", SHAPE, seed=2)


class TestUserTests:
    def test_testpaths_left_out_are_named_in_the_header_with_the_command(
        self, pytester, model
    ) -> None:
        pytester.makeini("[pytest]\ntestpaths = tests\n")
        pytester.mkdir("tests")
        (pytester.path / "tests" / "test_user.py").write_text(FAILING_USER_TEST)
        result = pytester.runpytest(f"--spectral-model={model}")
        assert result.ret == pytest.ExitCode.OK  # the failing user test was not collected
        result.assert_outcomes(passed=32)
        result.stdout.fnmatch_lines(
            [
                "spectral: collecting only the spectral items; your tests (testpaths: tests) are "
                f"not collected: name them, e.g. `pytest tests --spectral-model={model} *`",
            ]
        )
        named = pytester.runpytest("tests", f"--spectral-model={model}")  # as the line says
        named.assert_outcomes(passed=32, failed=1)

    def test_without_testpaths_the_header_names_the_current_directory(
        self, pytester, model
    ) -> None:
        pytester.makepyfile(test_user=FAILING_USER_TEST)
        result = pytester.runpytest(f"--spectral-model={model}")
        result.assert_outcomes(passed=32)
        result.stdout.fnmatch_lines(
            [
                "spectral: collecting only the spectral items; your tests (in the current "
                "directory) are not collected: name them, e.g. "
                f"`pytest . --spectral-model={model} *`",
            ]
        )

    def test_quiet_runs_say_it_above_the_spectral_summary(self, pytester, model) -> None:
        result = pytester.runpytest(f"--spectral-model={model}", "-q")
        result.stdout.fnmatch_lines(
            [
                "spectral: collecting only the spectral items; *",
                "*spectral summary*",
            ]
        )

    def test_named_paths_are_collected_silently(self, pytester, model) -> None:
        pytester.makepyfile(test_user=FAILING_USER_TEST)
        result = pytester.runpytest("test_user.py", f"--spectral-model={model}")
        result.assert_outcomes(passed=32, failed=1)
        result.stdout.no_fnmatch_line("spectral: collecting only*")


class TestNodeIdArguments:
    @pytest.mark.parametrize(
        ("argument", "items"),
        [
            ("spectral::layer01::head02-k", 1),
            ("spectral::layer01", 16),
            ("spectral", 32),
        ],
    )
    def test_an_id_selects_its_items(self, pytester, model, argument, items) -> None:
        result = pytester.runpytest(f"--spectral-model={model}", argument)
        result.assert_outcomes(passed=items)
        result.stdout.fnmatch_lines([f"collected {items} item*"])
        result.stdout.no_fnmatch_line("*not collected*")  # named: nothing to announce

    def test_ids_and_paths_together(self, pytester, model) -> None:
        pytester.makepyfile(test_user=FAILING_USER_TEST)
        result = pytester.runpytest(
            f"--spectral-model={model}",
            "spectral::layer00::head00-q",
            "test_user.py",
            "spectral::layer01::head03-o",
        )
        result.assert_outcomes(passed=2, failed=1)

    def test_a_failed_line_can_be_pasted_back(self, pytester, model) -> None:
        rules = pytester.path / "rules.toml"
        rules.write_text('[[rules]]\nmetric = "stable_rank"\nmin = 1e9\nlayers = "1"\n')
        first = pytester.runpytest(f"--spectral-model={model}", f"--spectral-thresholds={rules}")
        failed = [line.split()[1] for line in first.outlines if line.startswith("FAILED ")]
        assert len(failed) == 16
        again = pytester.runpytest(
            f"--spectral-model={model}", f"--spectral-thresholds={rules}", failed[3]
        )
        again.assert_outcomes(failed=1)

    @pytest.mark.parametrize(
        ("argument", "options", "why"),
        [
            ("spectral::layer07", [], ": the model has 2 layers (0-1)"),
            ("spectral::layer1", [], ": layer numbers are zero-padded: spectral::layer01"),
            ("spectral::layer00::head09-q", [], ": the model has 4 query heads (0-3)"),
            (
                "spectral::layer01",
                ["--spectral-layers=0"],
                ": --spectral-layers leaves out layer 1",
            ),
            (
                "spectral::layer01::q",
                [],
                ": q names a whole-matrix item, collected with --spectral-scope matrix (or both)",
            ),
            (
                "spectral::layer01::head00-down",
                [],
                ": down exists only as a whole matrix: spectral::layer01::down with "
                "--spectral-scope matrix (or both)",
            ),
            (
                "spectral::layer01::head00-down",
                ["--spectral-scope=matrix"],
                ": down exists only as a whole matrix: spectral::layer01::down",
            ),
            (
                "spectral::layer00::head00-q",
                ["--spectral-scope=matrix"],
                ": head items need --spectral-scope head (the default) or both",
            ),
            (
                "spectral::layer00::head00-k",
                ["--spectral-matrices=q"],
                ": --spectral-matrices leaves out k",
            ),
            ("spectral::x", [], ""),
        ],
    )
    def test_an_id_of_nothing_says_why(self, pytester, model, argument, options, why) -> None:
        result = pytester.runpytest(f"--spectral-model={model}", *options, argument)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        first = (
            "spectral::layer00::q"
            if options == ["--spectral-scope=matrix"]
            else ("spectral::layer00::head00-q")
        )
        result.stderr.fnmatch_lines(
            [
                f"ERROR: {argument}: no such spectral item in this run{why}; ids look like "
                f"{first} (layer, then head and matrix, zero-padded; see --collect-only -q)"
            ]
        )

    def test_a_directory_named_spectral_stays_a_path(self, pytester, model) -> None:
        (pytester.path / "spectral").mkdir()
        (pytester.path / "spectral" / "test_here.py").write_text("def test_here():\n    pass\n")
        result = pytester.runpytest(f"--spectral-model={model}", "spectral")
        result.assert_outcomes(passed=33)

    def test_ids_select_under_xdist_too(self, pytester, model) -> None:
        result = pytester.runpytest_subprocess(
            f"--spectral-model={model}", "spectral::layer01", "-n", "2"
        )
        result.assert_outcomes(passed=16)
