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
        "argument",
        ["spectral::layer07", "spectral::layer1", "spectral::layer00::head09-q", "spectral::x"],
    )
    def test_an_id_of_nothing_is_a_usage_error(self, pytester, model, argument) -> None:
        result = pytester.runpytest(f"--spectral-model={model}", argument)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            [
                f"ERROR: {argument}: no such spectral item in this run; ids look like "
                "spectral::layer00::head00-q (*"
            ]
        )

    def test_a_matrix_left_out_is_nothing_to_select(self, pytester, model) -> None:
        result = pytester.runpytest(
            f"--spectral-model={model}", "--spectral-matrices", "q", "spectral::layer00::head00-k"
        )
        assert result.ret == pytest.ExitCode.USAGE_ERROR

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
