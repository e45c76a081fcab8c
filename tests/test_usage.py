"""First steps that used to go wrong quietly: every acceptance is said in one line, and a
mistaken argument gets a message that says what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pytest_spectral.testing.synthetic import (
    LlamaShape,
    attention_name,
    random_llama_weights,
    write_checkpoint,
)

ROOT = Path(__file__).resolve().parent.parent
SHAPE = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, mlp=False)
DRIFT = '[[rules]]\nname = "drift"\nmetric = "spectral_norm"\nmax_change = 0.5\n'
COLLAPSED = '[[rules]]\nname = "collapsed"\nmetric = "stable_rank"\nmin = 1.5\n'


@pytest.fixture
def model(pytester: pytest.Pytester) -> Path:
    """The SHAPE model with query head 2 of layer 1 collapsed to rank 1 in Q."""
    tensors = random_llama_weights(SHAPE, seed=3)
    tensors[attention_name(1, "q")][16:24] = torch.outer(
        torch.linspace(1, 2, 8), torch.linspace(-1, 1, 32)
    )
    return write_checkpoint(pytester.path / "model", tensors, SHAPE.config())


def write(pytester: pytest.Pytester, name: str, text: str) -> Path:
    path = pytester.path / name
    path.write_text(text)
    return path


class TestSaidInOneLine:
    def test_a_rules_file_without_rules(self, pytester, model) -> None:
        empty = write(pytester, "empty.toml", "# nothing yet\n")
        result = pytester.runpytest(f"--spectral-model={model}", f"--spectral-thresholds={empty}")
        result.assert_outcomes(passed=32)
        result.stdout.fnmatch_lines(
            [
                f"spectral: {empty} has no [[rules]]: items fail only for non-finite or "
                "all-zero weights; every metric is recorded"
            ]
        )

    def test_no_rules_file(self, pytester, model) -> None:
        result = pytester.runpytest(f"--spectral-model={model}")
        result.stdout.fnmatch_lines(["spectral: no rules file (--spectral-thresholds): *"])

    def test_a_baseline_no_rule_compares_with(self, pytester, model) -> None:
        pytester.runpytest(f"--spectral-model={model}", "--spectral-report=good.json")
        rules = write(pytester, "rules.toml", COLLAPSED)
        result = pytester.runpytest(
            f"--spectral-model={model}",
            "--spectral-baseline=good.json",
            f"--spectral-thresholds={rules}",
        )
        result.stdout.fnmatch_lines(
            [
                f"spectral: --spectral-baseline {pytester.path / 'good.json'} is not used: no "
                "rule has min_change or max_change"
            ]
        )
        drift = write(pytester, "drift.toml", DRIFT)
        used = pytester.runpytest(
            f"--spectral-model={model}",
            "--spectral-baseline=good.json",
            f"--spectral-thresholds={drift}",
        )
        used.stdout.no_fnmatch_line("*is not used*")

    def test_a_baseline_beside_trend_rules_only(self, pytester, model) -> None:
        pytester.runpytest(f"--spectral-model={model}", "--spectral-report=good.json")
        trend = write(
            pytester,
            "trend.toml",
            '[[rules]]\nname = "t"\nmetric = "stable_rank"\nmin_change = -0.5\nwindow = 3\n',
        )
        (pytester.path / "history").mkdir()
        result = pytester.runpytest(
            f"--spectral-model={model}",
            "--spectral-baseline=good.json",
            "--spectral-history=history",
            f"--spectral-thresholds={trend}",
        )
        result.stdout.fnmatch_lines(
            [
                f"spectral: --spectral-baseline {pytester.path / 'good.json'} is not used: no "
                "rule has min_change or max_change without a window (rules with one compare "
                "with --spectral-history)"
            ]
        )

    def test_calibration_leaves_out_the_items_that_broke_rules(self, pytester, model) -> None:
        rules = write(pytester, "rules.toml", COLLAPSED + 'matrices = ["q"]\n')
        result = pytester.runpytest(
            f"--spectral-model={model}",
            f"--spectral-thresholds={rules}",
            "--spectral-calibrate=cal.toml",
        )
        result.assert_outcomes(passed=31, failed=1)
        result.stdout.fnmatch_lines(
            [
                f"spectral calibrated rules: {pytester.path / 'cal.toml'} (bounds from 31 of 32 "
                "items; 1 that failed or warned were left out)"
            ]
        )
        text = (pytester.path / "cal.toml").read_text()
        assert "from the 31 items that passed (1 that failed or warned were left out)." in text
        # the collapsed head is outside the calibrated bounds, the others inside
        again = pytester.runpytest(f"--spectral-model={model}", "--spectral-thresholds=cal.toml")
        again.assert_outcomes(passed=31, failed=1)
        again.stdout.fnmatch_lines(["FAILED spectral::layer01::head02-q - *"])

    def test_a_clean_calibration_says_nothing_more(self, pytester, model) -> None:
        result = pytester.runpytest(f"--spectral-model={model}", "--spectral-calibrate=cal.toml")
        result.stdout.fnmatch_lines([f"spectral calibrated rules: {pytester.path / 'cal.toml'}"])


class TestMistakenArguments:
    @pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
    def test_a_json_file_for_the_model_names_the_directory(self, pytester, name) -> None:
        model = write_checkpoint(
            pytester.path / "model", random_llama_weights(SHAPE), SHAPE.config(), shards=2
        )
        result = pytester.runpytest(f"--spectral-model={model / name}")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            [
                f"ERROR: {model / name}: a JSON file (a config or index file), not a checkpoint; "
                f"pass the checkpoint's directory: --spectral-model={model}, or a single "
                "weight file (.safetensors, .gguf, a torch checkpoint)"
            ]
        )

    def test_help_names_no_file_a_pip_user_lacks(self, tmp_path: Path) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"],
            capture_output=True,
            text=True,
            cwd=tmp_path,  # anywhere but this repository
            check=True,
        )
        spectral = done.stdout[done.stdout.index("spectral health checks") :]
        spectral = spectral[: spectral.index("\n\n")]
        assert "--spectral-thresholds" in spectral
        assert "example_thresholds" not in spectral
        assert "examples/" not in spectral


class TestDemoScript:
    SCRIPT = ROOT / "examples" / "make_tiny_llama.py"

    def test_help_prints_usage_and_writes_nothing(self, tmp_path: Path) -> None:
        target = tmp_path / "out"
        done = subprocess.run(
            [sys.executable, str(self.SCRIPT), "--help", "--output", str(target)],
            capture_output=True,
            text=True,
            check=True,
        )
        assert done.stdout.startswith("usage: make_tiny_llama.py")
        assert "--output DIR" in done.stdout
        assert not target.exists()

    def test_writes_the_committed_bytes_with_ordinary_permissions(self, tmp_path: Path) -> None:
        target = tmp_path / "tiny-llama"
        subprocess.run(
            [sys.executable, str(self.SCRIPT), "--output", str(target)],
            capture_output=True,
            check=True,
        )
        umask = os.umask(0)
        os.umask(umask)
        committed = ROOT / "examples" / "tiny-llama"
        for path in target.iterdir():
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
            assert path.read_bytes() == (committed / path.name).read_bytes(), path.name
        index = json.loads((target / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == 2
