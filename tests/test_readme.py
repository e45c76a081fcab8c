"""The README is the front door: its snippets run, its rules load, its demo output is what the
demo prints, and its quick start installs the CPU build of torch as `.ci/run` does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pytest_spectral.judging.metrics import MetricRegistry
from pytest_spectral.judging.rules import RULE_KEYS, SUGGESTIONS, load_rules

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DEMO = ["--spectral-model=examples/tiny-llama", "--spectral-thresholds=example_thresholds.toml"]


def blocks(language: str, text: str = README) -> list[str]:
    """The fenced code blocks of one language ("" for none), in order."""
    found: list[str] = []
    fence: str | None = None  # the language of the open block
    lines: list[str] = []
    for line in text.splitlines():
        if fence is None and line.startswith("```"):
            fence, lines = line[3:].strip(), []
        elif fence is not None and line == "```":
            if fence == language:
                found.append("\n".join(lines) + "\n")
            fence = None
        elif fence is not None:
            lines.append(line)
    return found


PYTHON = blocks("python")


def test_the_readme_has_python_snippets() -> None:
    assert len(PYTHON) >= 2


@pytest.mark.parametrize("snippet", PYTHON, ids=[f"python-{i}" for i in range(len(PYTHON))])
def test_every_python_snippet_runs(snippet: str) -> None:
    """Each snippet runs on its own, as copied; the test functions it defines pass, and the
    metrics a conftest snippet registers give one value per slice."""
    namespace: dict[str, object] = {"__name__": "readme_snippet"}
    exec(compile(snippet, "README.md", "exec"), namespace)
    for name, value in list(namespace.items()):
        if name.startswith("test_") and callable(value):
            value()
    register = namespace.get("pytest_spectral_register_metrics")
    if callable(register):
        metrics = MetricRegistry()
        register(metrics)
        added = [spec for name, spec in metrics.specs.items() if name not in MetricRegistry().specs]
        assert added
        spectra = -np.sort(-np.random.default_rng(0).random((3, 16)), axis=-1)
        for spec in added:
            assert np.shape(spec.function(spectra)) == (3,)


@pytest.mark.parametrize(
    "text",
    [b for b in blocks("toml") if "[[rules]]" in b],
    ids=lambda text: text.split("name = ")[1].split("\n")[0] if "name = " in text else "rule",
)
def test_every_rules_snippet_loads(text: str, tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    assert load_rules(path).rules


def test_the_example_rules_file_names_every_key_and_suggestion() -> None:
    """Its comment is where a new user learns the keys."""
    comment = "\n".join(
        line
        for line in (ROOT / "example_thresholds.toml").read_text().splitlines()
        if line.startswith("#")
    )
    for key in (*RULE_KEYS, "k", "p"):
        assert re.search(rf"\b{key}\b", comment), key
    for value in (*SUGGESTIONS, "fail", "warn", "head", "matrix"):
        assert f'"{value}"' in comment, value


def run_demo(*extra: str, cache: Path, probe: Path | None = None) -> subprocess.CompletedProcess:
    """The demo command from the repository root, as the quick start runs it (80 columns);
    the cache goes to ``cache`` so that the test leaves the clone as it was."""
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(probe or "")}
    # the README shows a terminal's output: on CI pytest prints the short summary's lines whole
    for name in ("PYTEST_ADDOPTS", "CI", "BUILD_NUMBER"):
        env.pop(name, None)
    command = [sys.executable, "-m", "pytest", *DEMO, "-o", f"cache_dir={cache}", *extra]
    if probe is not None:
        command += ["-p", "torch_probe"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _same(readme_line: str, printed: str) -> bool:
    """Equal up to trailing spaces, and up to the duration in pytest's footer."""
    footer = re.compile(r"^=+ (.*) in [\d.]+s(?: \([\d:]+\))? =+$")
    a, b = footer.match(readme_line), footer.match(printed)
    if a and b:
        return a.group(1) == b.group(1)
    return readme_line.rstrip() == printed.rstrip()


def appears_in(block: str, output: str) -> bool:
    """Whether the block's lines appear in the output, consecutively."""
    wanted, lines = block.rstrip("\n").splitlines(), output.splitlines()
    return any(
        all(_same(w, lines[start + i]) for i, w in enumerate(wanted))
        for start in range(len(lines) - len(wanted) + 1)
    )


class TestDemo:
    def test_output_block_is_what_the_demo_prints(self, tmp_path: Path) -> None:
        (block,) = [b for b in blocks("") if "spectral summary" in b and "FAILED" in b]
        done = run_demo(cache=tmp_path / "cache")
        assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout + done.stderr
        assert appears_in(block, done.stdout), done.stdout

    def test_heatmap_block_is_what_the_demo_prints(self, tmp_path: Path) -> None:
        (block,) = [b for b in blocks("") if b.startswith("top_k_ratio per head")]
        done = run_demo("--spectral-heatmap", "top_k_ratio", cache=tmp_path / "cache")
        assert appears_in(block, done.stdout), done.stdout

    def test_whole_matrix_heatmap_block_is_what_the_demo_prints(self, tmp_path: Path) -> None:
        (block,) = [b for b in blocks("") if b.startswith("alpha per whole matrix")]
        done = run_demo(
            "--spectral-scope=matrix", "--spectral-heatmap=alpha", cache=tmp_path / "cache"
        )
        assert appears_in(block, done.stdout), done.stdout

    def test_cached_demo_from_the_repository_root_never_imports_torch(self, tmp_path: Path) -> None:
        """From the root, pytest imports tests/conftest.py (the testpaths): it must stay
        import-light for the cache's promise to hold there too."""
        probe = tmp_path / "probe"
        probe.mkdir()
        (probe / "torch_probe.py").write_text(
            textwrap.dedent(
                """
                import sys

                def pytest_unconfigure(config):
                    print(f"torch imported: {'torch' in sys.modules}")
                """
            )
        )
        cache = tmp_path / "cache"
        first = run_demo(cache=cache, probe=probe)
        assert "torch imported: True" in first.stdout, first.stdout + first.stderr
        second = run_demo(cache=cache, probe=probe)
        assert "torch imported: False" in second.stdout, second.stdout + second.stderr
        assert "6 failed, 118 passed" in second.stdout


class TestQuickStart:
    def test_two_commands_install_cpu_torch_first_then_run_the_demo_and_the_tests(self) -> None:
        quick_start = README[README.index("## Quick start") : README.index("## Using it")]
        install, tests, gpu = (b.strip() for b in blocks("bash", quick_start))
        assert gpu == install.replace(" --index-url https://download.pytorch.org/whl/cpu", "")
        steps = install.split(" && ")
        assert steps[0] == "python3 -m venv .venv"
        torch_step = steps.index(
            "pip install torch --index-url https://download.pytorch.org/whl/cpu"
        )
        assert torch_step < steps.index('pip install -e ".[test]"')
        assert steps[-1] == "pytest " + " ".join(DEMO)
        assert tests == "pytest -n 2 tests"

    def test_ci_installs_the_cpu_build_and_handles_no_tests(self) -> None:
        script = (ROOT / ".ci" / "run").read_text()
        torch_line = script.index("--index-url https://download.pytorch.org/whl/cpu")
        assert torch_line < script.index('-e ".[test]"')
        assert "--timeout" in script
        assert "--retries" in script
        assert "torch.version.cuda" in script  # the installed build is checked
        assert '"$status" -eq 5' in script


def test_the_architecture_snippet_is_a_valid_description() -> None:
    """The [architecture] example loads, MLP keys included."""
    import tomllib

    from pytest_spectral.checkpoints.families import custom_family

    (snippet,) = [text for text in blocks("toml") if "[architecture]" in text]
    family = custom_family(tomllib.loads(snippet)["architecture"], "README.md")
    assert family.tensor_name(3, "down") == "blocks.3.ffn.w2.weight"
    assert family.tensor_name(3, "o") == "blocks.3.attn.wo.weight"
