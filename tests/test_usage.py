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
                "items; 1 that failed or warned was left out)"
            ]
        )
        text = (pytester.path / "cal.toml").read_text()
        assert "from the 31 items that passed (1 that failed or warned was left out)." in text
        # the collapsed head is outside the calibrated bounds, the others inside
        again = pytester.runpytest(f"--spectral-model={model}", "--spectral-thresholds=cal.toml")
        again.assert_outcomes(passed=31, failed=1)
        again.stdout.fnmatch_lines(["FAILED spectral::layer01::head02-q - *"])

    @pytest.mark.parametrize(
        ("selection", "part", "layers", "heads"),
        [
            (["--spectral-layers=0"], "layers 0 of 0-1", 'layers = "0"', None),
            (["-k", "layer01 and head00"], "layers 1 of 0-1 and query heads 0 of 0-3",
             'layers = "1"', 'heads = "0"'),
        ],
    )  # fmt: skip
    def test_calibrating_part_of_the_model_bounds_that_part_only(
        self, pytester, model, selection, part, layers, heads
    ) -> None:
        result = pytester.runpytest(
            f"--spectral-model={model}", "--spectral-calibrate=cal.toml", *selection
        )
        result.stdout.fnmatch_lines(
            [
                f"spectral calibrated rules: {pytester.path / 'cal.toml'} (measured only "
                f"{part}; its rules apply there only)"
            ]
        )
        text = (pytester.path / "cal.toml").read_text()
        assert f"# The run measured only {part}: each rule is restricted to the layers and" in text
        tables = text.split("[[rules]]")[1:]
        assert tables
        for table in tables:
            assert layers in table
            assert (heads in table) if heads else ("heads =" not in table)
        # the other part of the model is not judged by these bounds: the collapsed head of
        # layer 1 (query head 2) fails only rules that cover it
        again = pytester.runpytest(f"--spectral-model={model}", "--spectral-thresholds=cal.toml")
        assert "applies to no item" not in again.stdout.str()
        if selection == ["--spectral-layers=0"]:
            again.assert_outcomes(passed=32)  # layer 1's collapse: no layer-0 rule judges it

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


class TestModelFiles:
    def test_a_single_shard_names_its_directory(self, pytester) -> None:
        model = write_checkpoint(
            pytester.path / "model", random_llama_weights(SHAPE), SHAPE.config(), shards=2
        )
        shard = model / "model-00001-of-00002.safetensors"
        result = pytester.runpytest(f"--spectral-model={shard}")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            [
                "ERROR: tensor * is missing from the checkpoint (the config says 2 layers); "
                f"model-00001-of-00002.safetensors is one of the 2 shards that "
                f"{model / 'model.safetensors.index.json'} lists: pass the checkpoint's "
                f"directory: --spectral-model={model}"
            ]
        )

    def test_spectral_config_over_a_checkpoints_own_config_is_said(self, pytester, model) -> None:
        other = write(pytester, "other.json", (model / "config.json").read_text())
        result = pytester.runpytest(
            f"--spectral-model={model}", f"--spectral-config={other}", "--co"
        )
        result.stdout.fnmatch_lines(
            [
                f"spectral: --spectral-config {other} is used; the checkpoint's own "
                f"{model / 'config.json'} is not read"
            ]
        )
        alone = pytester.path / "alone"
        alone.mkdir()
        (model / "model.safetensors").rename(alone / "model.safetensors")
        single = pytester.runpytest(
            f"--spectral-model={alone / 'model.safetensors'}", f"--spectral-config={other}", "--co"
        )
        single.stdout.fnmatch_lines(["collected 32 items"])
        assert "is not read" not in single.stdout.str()  # nothing beside it to override


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

    def run_script(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(self.SCRIPT), *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            check=False,
        )

    def test_a_directory_holding_other_files_is_refused_untouched(self, tmp_path: Path) -> None:
        project = tmp_path / "project"
        (project / "sub").mkdir(parents=True)
        (project / "notes.txt").write_text("mine\n")
        done = self.run_script("--output", ".", cwd=project)
        assert done.returncode == 2
        assert "Traceback" not in done.stderr
        assert done.stderr.splitlines()[-1] == (
            "make_tiny_llama.py: error: --output .: holds notes.txt, sub/, which this script did "
            "not write; it writes only into a new or empty directory, or over its own earlier "
            "output: choose another"
        )
        assert sorted(p.name for p in project.iterdir()) == ["notes.txt", "sub"]
        assert (project / "notes.txt").read_text() == "mine\n"

    def test_a_file_is_refused_untouched(self, tmp_path: Path) -> None:
        rules = tmp_path / "rules.toml"
        rules.write_text("[[rules]]\n")
        done = self.run_script("--output", str(rules))
        assert done.returncode == 2
        assert "Traceback" not in done.stderr
        assert done.stderr.splitlines()[-1].endswith(
            f"--output {rules}: exists and is not a directory; give a directory"
        )
        assert rules.read_text() == "[[rules]]\n"

    def test_a_symlink_among_its_own_file_names_is_refused(self, tmp_path: Path) -> None:
        """A planted ``config.json`` link would otherwise be written through."""
        target = tmp_path / "out"
        target.mkdir()
        victim = tmp_path / "victim"
        victim.write_text("keep me\n")
        (target / "config.json").symlink_to(victim)
        done = self.run_script("--output", str(target))
        assert done.returncode == 2
        assert "holds config.json, which this script did not write" in done.stderr
        assert victim.read_text() == "keep me\n"

    def test_its_own_earlier_output_is_replaced(self, tmp_path: Path) -> None:
        target = tmp_path / "demo"
        assert self.run_script("--output", str(target)).returncode == 0
        (target / "config.json").write_text("{}")  # damaged since
        done = self.run_script("--output", str(target))
        assert done.returncode == 0, done.stderr
        committed = ROOT / "examples" / "tiny-llama"
        assert (target / "config.json").read_bytes() == (committed / "config.json").read_bytes()
        assert sorted(p.name for p in target.iterdir()) == sorted(
            p.name for p in committed.iterdir()
        )


class TestOutputsReplaceOnlyTheirOwnFiles:
    """A report or calibration path never names an input, and an existing file there is
    replaced only when pytest-spectral wrote it."""

    HAND_WRITTEN = COLLAPSED

    @pytest.mark.parametrize("option", ["--spectral-calibrate", "--spectral-report"])
    def test_the_rules_file_being_read(self, pytester, model, option) -> None:
        rules = write(pytester, "rules.toml", self.HAND_WRITTEN)
        result = pytester.runpytest(
            f"--spectral-model={model}", f"--spectral-thresholds={rules}", f"{option}={rules}"
        )
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            [
                f"ERROR: {option} {rules}: is also the rules file, which this run reads; "
                "pytest-spectral never writes over its inputs: choose another path"
            ]
        )
        assert rules.read_text() == self.HAND_WRITTEN

    def test_the_rules_file_through_a_link_or_from_the_ini(self, pytester, model) -> None:
        rules = write(pytester, "rules.toml", self.HAND_WRITTEN)
        pytester.makeini("[pytest]\nspectral_thresholds = rules.toml\n")
        (pytester.path / "link.toml").symlink_to(rules)
        result = pytester.runpytest(f"--spectral-model={model}", "--spectral-calibrate=link.toml")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["ERROR: --spectral-calibrate *link.toml: is also the rules*"])
        assert rules.read_text() == self.HAND_WRITTEN

    @pytest.mark.parametrize(
        ("input_option", "words"),
        [
            ("--spectral-baseline", "the baseline (--spectral-baseline)"),
            ("--spectral-config", "the config (--spectral-config)"),
        ],
    )
    def test_other_inputs(self, pytester, model, input_option, words) -> None:
        pytester.runpytest(f"--spectral-model={model}", "--spectral-report=good.json")
        if input_option == "--spectral-config":
            (pytester.path / "good.json").write_text((model / "config.json").read_text())
        before = (pytester.path / "good.json").read_bytes()
        drift = input_option == "--spectral-baseline"
        rules = write(pytester, "rules.toml", DRIFT if drift else "")
        result = pytester.runpytest(
            f"--spectral-model={model}",
            f"{input_option}=good.json",
            f"--spectral-thresholds={rules}",
            "--spectral-report=good.json",
        )
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([f"ERROR: --spectral-report *good.json: is also {words}*"])
        assert (pytester.path / "good.json").read_bytes() == before

    @pytest.mark.parametrize(
        ("option", "what", "mark"),
        [
            ("--spectral-calibrate", "a calibrated rules file", "# Calibrated by pytest-spectral"),
            ("--spectral-report", "a JSON report", '"schema": "pytest-spectral-report"'),
            ("--spectral-html", "an HTML report", "<title>pytest-spectral: "),
        ],
    )
    def test_a_file_it_did_not_write(self, pytester, model, option, what, mark) -> None:
        mine = write(pytester, "mine.txt", self.HAND_WRITTEN)
        result = pytester.runpytest(f"--spectral-model={model}", f"{option}=mine.txt")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            [
                f"ERROR: {option} {mine}: exists and is not {what} written by pytest-spectral "
                f"(no {mark!r} at its start); pytest-spectral replaces only its own files: "
                "choose another path, or move that file away first"
            ]
        )
        assert mine.read_text() == self.HAND_WRITTEN

    def test_its_own_earlier_outputs_are_replaced(self, pytester, model) -> None:
        outputs = ("--spectral-calibrate=cal.toml", "--spectral-report=r.json")
        first = pytester.runpytest(f"--spectral-model={model}", *outputs, "-p", "no:cacheprovider")
        first.assert_outcomes(passed=32)
        report = pytester.path / "r.json"
        report.write_text(report.read_text().replace('"passed": 32', '"passed": 0'))
        (pytester.path / "empty.html").touch()  # nothing to lose in an empty file
        again = pytester.runpytest(
            f"--spectral-model={model}", *outputs, "--spectral-html=empty.html"
        )
        again.assert_outcomes(passed=32)
        assert json.loads(report.read_text())["summary"]["passed"] == 32
        assert (
            (pytester.path / "cal.toml")
            .read_text()
            .startswith("# Calibrated by pytest-spectral on ")
        )
        assert (pytester.path / "empty.html").read_text().startswith("<!DOCTYPE html>")


MLP_SHAPE = LlamaShape(layers=4, heads=8, kv_heads=2, head_dim=8, hidden=64, intermediate=96)


@pytest.fixture
def mlp_model(pytester: pytest.Pytester) -> Path:
    """4 layers, 8 query heads sharing 2 K/V heads, with gate, up and down matrices."""
    return write_checkpoint(
        pytester.path / "mlp-model", random_llama_weights(MLP_SHAPE, seed=2), MLP_SHAPE.config()
    )


class TestRulesThatApplyToNothing:
    """A rule that no item of the run can break is said in the header, with why and what to
    change; the run goes on (other rules may apply)."""

    def run(self, pytester, model, rule: str, *options: str) -> pytest.RunResult:
        rules = write(
            pytester, "rules.toml", '[[rules]]\nname = "r"\nmetric = "alpha"\nmax = 1e9\n' + rule
        )
        return pytester.runpytest(
            f"--spectral-model={model}", f"--spectral-thresholds={rules}", "--co", "-q", *options
        )

    @pytest.mark.parametrize(
        ("rule", "options", "why"),
        [
            (
                "",
                ["--spectral-scope=matrix"],
                'it judges head items (scope = "head", the default) and this run collects whole '
                "matrices only (--spectral-scope matrix): run with --spectral-scope both, or give "
                'the rule scope = "matrix"',
            ),
            (
                'scope = "matrix"\n',
                [],
                'it judges whole matrices (scope = "matrix") and this run collects head items '
                "only: run with --spectral-scope matrix or both",
            ),
            (
                'layers = "10-12"\n',
                [],
                "its layers 10-12 do not exist: the model has 4 layers (0-3)",
            ),
            (
                'layers = "2-3"\n',
                ["--spectral-layers=0"],
                "--spectral-layers 0 leaves out its layers 2-3",
            ),
            (
                'heads = "20-30"\n',
                [],
                "its heads 20-30 do not exist: the model has 8 query heads (0-7)",
            ),
            (
                'matrices = ["gate"]\n',
                [],
                'its matrices (gate) exist only as whole matrices: give it scope = "matrix" and '
                "run with --spectral-scope matrix or both",
            ),
            (
                'matrices = ["v", "o"]\n',
                ["--spectral-matrices=q,k"],
                "--spectral-matrices q,k leaves out its v, o",
            ),
            (
                'matrices = ["fc1"]\nscope = "matrix"\n',
                ["--spectral-scope=matrix"],
                "the checkpoint has no fc1 (it has q, k, v, o, gate, up, down)",
            ),
        ],
        ids=[
            "head-rule-matrix-run",
            "matrix-rule-head-run",
            "layers-beyond",
            "layers-left-out",
            "heads-beyond",
            "mlp-in-head-scope",
            "matrices-left-out",
            "matrix-absent",
        ],
    )
    def test_says_why_and_what_to_change(self, pytester, mlp_model, rule, options, why) -> None:
        result = self.run(pytester, mlp_model, rule, *options)
        assert result.ret == pytest.ExitCode.OK
        where = pytester.path / "rules.toml"
        result.stdout.fnmatch_lines(
            [f"spectral: rule 'r' ({where}:1) applies to no item of this run: {why}"]
        )

    @pytest.mark.parametrize(
        ("rule", "options"),
        [
            ("", []),
            ('layers = "2-12"\nheads = "6-30"\n', []),  # partly beyond the model: it applies
            ("", ["--spectral-scope=both"]),
            ('scope = "matrix"\nmatrices = ["down"]\n', ["--spectral-scope=both"]),
        ],
    )
    def test_a_rule_that_applies_somewhere_is_not_mentioned(
        self, pytester, mlp_model, rule, options
    ) -> None:
        result = self.run(pytester, mlp_model, rule, *options)
        assert "applies to no item" not in result.stdout.str()

    def test_an_mlp_matrix_in_a_head_scope_run_is_said(self, pytester, mlp_model) -> None:
        result = pytester.runpytest(
            f"--spectral-model={mlp_model}", "--spectral-matrices=q,down", "--co", "-q"
        )
        result.stdout.fnmatch_lines(
            [
                "spectral: --spectral-matrices: down has no item in this run: it exists only "
                "as a whole matrix; add --spectral-scope both (or matrix) to check it",
                "32 tests collected*",
            ]
        )

    def test_only_mlp_matrices_in_a_head_scope_run_is_a_usage_error(
        self, pytester, mlp_model
    ) -> None:
        result = pytester.runpytest(f"--spectral-model={mlp_model}", "--spectral-matrices=down")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            [
                "ERROR: --spectral-matrices down: no head item to collect: it exists only as a "
                "whole matrix; add --spectral-scope matrix (or both)"
            ]
        )
        both = pytester.runpytest(f"--spectral-model={mlp_model}", "--spectral-matrices=up,down")
        both.stderr.fnmatch_lines(
            [
                "ERROR: --spectral-matrices up,down: no head item to collect: they exist only as "
                "whole matrices; add --spectral-scope matrix (or both)"
            ]
        )
        whole = pytester.runpytest(
            f"--spectral-model={mlp_model}",
            "--spectral-matrices=down",
            "--spectral-scope=matrix",
            "--co",
            "-q",
        )
        whole.stdout.fnmatch_lines(["4 tests collected*"])
