"""Hostile inputs against the run itself: a checkpoint that tries to configure pytest, reports
that could lie by omission, values that slip through validation, and text that tries to
drive the terminal.

Every case ends in a usage error (exit 4) naming the file and key, or in failing items;
never a traceback or INTERNALERROR; the checkpoint's bytes unchanged and nothing written
outside the cache and report paths. Inputs are built by the tests in temporary directories;
runs that matter for pytest's own start-up go through real subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import time
from collections.abc import Callable
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
ITEMS = SHAPE.layers * SHAPE.heads * 4
#: a hang guard for subprocess runs; each case is also timed against the 10 s budget
TIMEOUT = 120
BUDGET_S = 10


def nan_checkpoint(directory: Path) -> Path:
    """The SHAPE model with one NaN in layer 0's V (K/V head 0: query heads 0 and 1)."""
    tensors = random_llama_weights(SHAPE, seed=11)
    tensors[attention_name(0, "v")][0, 3] = float("nan")
    return write_checkpoint(directory, tensors, SHAPE.config())


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``directory`` (names, bytes, mtimes): what must never change."""
    return {
        str(p.relative_to(directory)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def output(result: pytest.RunResult) -> str:
    return result.stdout.str() + "\n" + result.stderr.str()


def assert_clean_usage_error(result: pytest.RunResult, *fragments: str) -> None:
    text = output(result)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    assert "Traceback" not in text
    assert "INTERNALERROR" not in text
    assert getattr(result, "seconds", 0) < BUDGET_S


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """pytest in a subprocess (pytest's start-up is what is tested), timed."""
    start = time.monotonic()
    result = pytester.runpytest_subprocess(*args, timeout=TIMEOUT)
    result.seconds = time.monotonic() - start  # type: ignore[attr-defined]
    return result


class TestTheCheckpointNeverConfiguresTheRun:
    """Kind 1: pytest reads its configuration before any plugin loads (see invocation.py)."""

    @pytest.fixture
    def hostile(self, pytester: pytest.Pytester) -> Path:
        """A checkpoint with a NaN head whose pytest.ini asks pytest to pass everything."""
        directory = nan_checkpoint(pytester.path / "ckpt")
        (directory / "pytest.ini").write_text(
            "[pytest]\naddopts = --rootdir=. --spectral-warn-only\n"
        )
        return directory

    def test_space_form_with_a_local_path_never_runs(self, pytester, hostile) -> None:
        before = snapshot(hostile)
        report = pytester.path / "r.json"
        result = run(pytester, "--spectral-model", str(hostile), "--spectral-report", str(report))
        assert_clean_usage_error(
            result,
            f"--spectral-model {hostile} (on the command line): with a space, pytest reads",
            "python -m pytest --basetemp=",
            f" --spectral-model={hostile} --spectral-report={report}\n",
        )
        assert not report.exists()
        assert snapshot(hostile) == before  # no .pytest_cache, nothing else

    def test_equals_form_fails_the_nan_head(self, pytester, hostile) -> None:
        before = snapshot(hostile)
        result = run(pytester, f"--spectral-model={hostile}", "--spectral-report=r.json")
        result.assert_outcomes(passed=ITEMS - 2, failed=2)  # the ini in the checkpoint is unread
        summary = json.loads((pytester.path / "r.json").read_text())["summary"]
        assert (summary["failed"], summary["warned"]) == (2, 0)
        assert snapshot(hostile) == before

    def test_space_form_in_pytest_addopts(self, pytester, hostile, monkeypatch) -> None:
        monkeypatch.setenv("PYTEST_ADDOPTS", f"--spectral-model {hostile}")
        assert_clean_usage_error(run(pytester), f"set PYTEST_ADDOPTS=--spectral-model={hostile}")

    def test_running_inside_the_checkpoint_is_refused(self, pytester, hostile, monkeypatch) -> None:
        """``cd CKPT && pytest --spectral-model=.``: pytest would take its ini and conftest.py
        from the checkpoint and write .pytest_cache there; refused before conftest.py loads."""
        (hostile / "pytest.ini").unlink()
        marker = pytester.path / "conftest-ran"
        (hostile / "conftest.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
        before = snapshot(hostile)
        monkeypatch.chdir(hostile)
        result = run(pytester, "--spectral-model=.")
        assert_clean_usage_error(
            result, f"the directory pytest was started in ({hostile}) lies inside the checkpoint"
        )
        assert not marker.exists()
        assert snapshot(hostile) == before

    def test_a_rootdir_elsewhere_does_not_bypass_the_ini_check(
        self, pytester, hostile, monkeypatch
    ):
        """Started in a subdirectory of the checkpoint with its own --rootdir elsewhere: the ini
        file is still the checkpoint's."""
        inner = hostile / "sub"
        inner.mkdir()
        monkeypatch.chdir(inner)
        result = run(pytester, f"--spectral-model={hostile}", f"--rootdir={pytester.path}")
        assert_clean_usage_error(result, "lies inside the checkpoint directory")

    @pytest.mark.parametrize(
        ("ini", "victim_option"),
        [
            ("log_file = {victim}\n", None),
            ("addopts = --junitxml={victim}\n", None),
            ("", "--junitxml"),
        ],
        ids=["log_file", "junitxml-in-addopts", "junitxml-on-command-line"],
    )
    def test_files_outside_are_untouched(self, pytester, ini, victim_option) -> None:
        victim = pytester.path / "precious.txt"
        victim.write_text("keep me\n")
        mtime = victim.stat().st_mtime_ns
        ckpt = nan_checkpoint(pytester.path / "ckpt")
        (ckpt / "pytest.ini").write_text("[pytest]\n" + ini.format(victim=victim))
        extra = [f"{victim_option}={ckpt / 'junit.xml'}"] if victim_option else []
        result = run(pytester, "--spectral-model", str(ckpt), *extra)
        assert_clean_usage_error(result)
        assert victim.read_text() == "keep me\n"
        assert victim.stat().st_mtime_ns == mtime
        assert not (ckpt / "junit.xml").exists()

    def test_junitxml_and_log_file_inside_the_checkpoint_are_refused(self, pytester) -> None:
        ckpt = nan_checkpoint(pytester.path / "ckpt")
        before = snapshot(ckpt)
        for option in (f"--junitxml={ckpt / 'j.xml'}", f"--log-file={ckpt / 'log.txt'}"):
            result = run(pytester, f"--spectral-model={ckpt}", option)
            assert_clean_usage_error(result, "lies inside the checkpoint directory")
        assert snapshot(ckpt) == before

    def test_cache_dir_and_test_paths_inside_the_checkpoint_are_refused(self, pytester) -> None:
        ckpt = nan_checkpoint(pytester.path / "ckpt")
        before = snapshot(ckpt)
        cache = run(pytester, f"--spectral-model={ckpt}", "-o", f"cache_dir={ckpt / 'c'}")
        assert_clean_usage_error(cache, f"pytest's cache directory ({ckpt / 'c'}) lies inside")
        path = run(pytester, f"--spectral-model={ckpt}", str(ckpt))
        assert_clean_usage_error(path, f"the test path ({ckpt}) lies inside")
        assert snapshot(ckpt) == before

    def test_plugin_module_in_the_checkpoint_is_never_imported_with_equals(self, pytester) -> None:
        """``pythonpath = .`` and ``-p evil`` in the checkpoint's ini: with '=', pytest never
        reads that ini, so the module (which would leave a marker file) never runs."""
        ckpt = nan_checkpoint(pytester.path / "ckpt")
        marker = pytester.path / "evil-ran"
        (ckpt / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
        (ckpt / "pytest.ini").write_text("[pytest]\npythonpath = .\naddopts = -p evil\n")
        result = run(pytester, f"--spectral-model={ckpt}")
        result.assert_outcomes(passed=ITEMS - 2, failed=2)
        assert not marker.exists()

    def test_residual_pytest_imports_the_ini_plugins_before_any_plugin_loads(
        self, pytester
    ) -> None:
        """What no plugin can stop, documented in the README's threat model: in the space
        form pytest itself applies the checkpoint's ``pythonpath`` and imports its ``-p``
        modules (``Config.parse``: ``_configure_python_path()`` and ``consider_preparse()``
        run before ``load_setuptools_entrypoints("pytest11")``). The run is still refused
        before any conftest.py, output file or item; only the '=' form keeps the module out."""
        ckpt = nan_checkpoint(pytester.path / "ckpt")
        marker = pytester.path / "evil-ran"
        (ckpt / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
        (ckpt / "pytest.ini").write_text("[pytest]\npythonpath = .\naddopts = -p evil\n")
        result = run(pytester, "--spectral-model", str(ckpt))
        assert_clean_usage_error(result, f"--spectral-model={ckpt}")
        assert marker.exists()  # pytest imported it before loading any plugin

    def test_project_ini_is_read_with_a_checkpoint_elsewhere(self, pytester, monkeypatch) -> None:
        """Without malice: checkpoint outside the project. The space form would root pytest at a
        common ancestor and miss the project's spectral_thresholds (every head passing); it is
        refused, and the '=' form reads the project's ini."""
        (pytester.path / "tox.ini").unlink()  # no ini above both directories
        project = pytester.path / "project"
        project.mkdir()
        (project / "rules.toml").write_text(
            '[[rules]]\nname = "tight"\nmetric = "stable_rank"\nmin = 100\n'
        )
        (project / "pytest.ini").write_text("[pytest]\nspectral_thresholds = rules.toml\n")
        ckpt = nan_checkpoint(pytester.path / "models" / "ckpt")
        monkeypatch.chdir(project)
        assert_clean_usage_error(run(pytester, "--spectral-model", str(ckpt)))
        result = run(pytester, f"--spectral-model={ckpt}")
        result.assert_outcomes(failed=ITEMS)
        result.stdout.fnmatch_lines([f"rootdir: {project}", "configfile: pytest.ini"])


def hub_cache(root: Path, repo: str, source: Path) -> None:
    """A Hugging Face cache in its real layout: files are symlinks into blobs."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    commit = "1" * 40
    snapshot_dir = repo_dir / "snapshots" / commit
    snapshot_dir.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for file in source.iterdir():
        blob = repo_dir / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        (snapshot_dir / file.name).symlink_to(os.path.relpath(blob, snapshot_dir))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


class TestHubIdsInTheSpaceForm:
    @pytest.fixture
    def offline_hub(self, pytester, monkeypatch) -> Path:
        pytest.importorskip("huggingface_hub")
        source = write_checkpoint(
            pytester.path / "source", random_llama_weights(SHAPE, seed=2), SHAPE.config()
        )
        hub_cache(pytester.path / "hf", "org/tiny", source)
        monkeypatch.setenv("HF_HUB_CACHE", str(pytester.path / "hf"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        return pytester.path / "hf"

    def test_space_form_keeps_working_and_leaves_the_rootdir_alone(
        self, pytester, offline_hub, monkeypatch
    ) -> None:
        """pytest ignores arguments that are no local path when it picks its rootdir
        (findpaths.get_dirs_from_args), so the hub id changes nothing about it."""
        (pytester.path / "tox.ini").unlink()
        work = pytester.path / "work"
        work.mkdir()
        monkeypatch.chdir(work)
        before = snapshot(offline_hub)
        space = run(pytester, "--spectral-model", "org/tiny")
        space.assert_outcomes(passed=ITEMS)
        space.stdout.fnmatch_lines([f"rootdir: {work}"])
        equals = run(pytester, "--spectral-model=org/tiny")
        equals.assert_outcomes(passed=ITEMS)
        equals.stdout.fnmatch_lines([f"rootdir: {work}"])
        # with a local directory named like the organisation, org/tiny is a local path that
        # does not exist; the explicit form still names the hub id
        (work / "org").mkdir()
        local = run(pytester, "--spectral-model", "org/tiny")
        assert_clean_usage_error(local, "org/tiny: no such file or directory")
        explicit = run(pytester, "--spectral-model", "hf://org/tiny")
        explicit.assert_outcomes(passed=ITEMS)
        explicit.stdout.fnmatch_lines([f"rootdir: {work}"])
        assert (work / ".pytest_cache").is_dir()
        assert snapshot(offline_hub) == before

    def test_outputs_inside_the_hub_cache_are_refused(self, pytester, offline_hub) -> None:
        """Known before the id is resolved (when earlier outputs are removed): the whole
        cache, whose snapshots all come from elsewhere."""
        before = snapshot(offline_hub)
        target = offline_hub / "models--org--tiny" / "r.json"
        result = run(pytester, "--spectral-model=org/tiny", f"--spectral-report={target}")
        assert_clean_usage_error(
            result, f"--spectral-report {target}: lies inside the Hugging Face cache {offline_hub}"
        )
        assert snapshot(offline_hub) == before

    def test_running_inside_the_snapshot_is_refused(self, pytester, offline_hub, monkeypatch):
        snapshot_dir = next((offline_hub / "models--org--tiny" / "snapshots").iterdir())
        monkeypatch.chdir(snapshot_dir)
        result = run(pytester, "--spectral-model=org/tiny", "-p", "no:cacheprovider")
        assert_clean_usage_error(
            result,
            f"the directory pytest was started in ({snapshot_dir}) lies inside the Hugging Face "
            f"cache {offline_hub}",
        )


def plant_code(directory: Path, markers: Path) -> None:
    """What a hostile checkpoint ships to run as the user's tests: a conftest.py that would
    drop the spectral items, a test module, a package marker and a nested conftest; each
    would leave a file in ``markers`` if pytest imported it."""
    directory.mkdir(parents=True, exist_ok=True)
    for folder in (directory, directory / "sub"):
        folder.mkdir(exist_ok=True)
        name = folder.name
        (folder / "conftest.py").write_text(
            f"open({str(markers / ('conftest-' + name))!r}, 'w').close()\n"
            "def pytest_collection_modifyitems(items):\n"
            "    items[:] = [i for i in items if not i.nodeid.startswith('spectral')]\n"
        )
        (folder / f"test_{name}.py").write_text(
            f"open({str(markers / ('module-' + name))!r}, 'w').close()\n"
            "def test_planted():\n    pass\n"
        )
    (directory / "__init__.py").write_text("")


def user_project(root: Path) -> None:
    """A project of the user's: an ini file (its rootdir) and one test of its own."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "tests").mkdir()
    (root / "tests" / "test_mine.py").write_text("def test_mine():\n    pass\n")


class TestTheCheckpointIsNeverCollectedFrom:
    """Kind 1, collection: a checkpoint kept in the project is never collected from and its
    conftest.py never imported, whatever the test paths; where pytest would import one at
    startup, before any hook of a plugin could skip it, the run is refused."""

    @pytest.fixture
    def project(self, pytester) -> Path:
        """``checkpoints/step-100`` (a NaN head, planted code) in the user's project."""
        (pytester.path / "tox.ini").unlink()
        user_project(pytester.path)
        ckpt = nan_checkpoint(pytester.path / "checkpoints" / "step-100")
        plant_code(ckpt, pytester.path)
        return ckpt

    @pytest.mark.parametrize(
        ("paths", "own_tests"),
        [([], 0), (["."], 1), (["checkpoints"], 0), (["tests", "checkpoints/.."], 1)],
        ids=["no-path", "dot", "its-parent", "two-paths"],
    )
    def test_your_tests_and_the_spectral_items_only(
        self, pytester, hostile, project, paths, own_tests
    ) -> None:
        before = snapshot(project)
        outcome = hostile(
            *paths,
            "--spectral-model=checkpoints/step-100",
            "--spectral-report=r.json",
            writes=["r.json"],
        )
        assert outcome.exit_code == pytest.ExitCode.TESTS_FAILED, outcome.output
        assert f"2 failed, {ITEMS - 2 + own_tests} passed" in outcome.output
        assert len(json.loads((pytester.path / "r.json").read_text())["items"]) == ITEMS
        assert snapshot(project) == before  # and no marker: hostile() checks the whole tree

    def test_through_a_symlink_in_the_project(self, pytester, hostile, project, monkeypatch):
        """The checkpoint stored elsewhere, reached through a link in the project."""
        stored = pytester.path / "store" / "ckpt"
        stored.parent.mkdir()
        project.rename(stored)
        work = pytester.path / "work"
        user_project(work)
        (work / "models").symlink_to(stored)
        monkeypatch.chdir(work)
        outcome = hostile(".", f"--spectral-model={stored}")
        assert f"2 failed, {ITEMS - 1} passed" in outcome.output, outcome.output

    def test_a_hub_cache_inside_the_project(self, pytester, hostile, monkeypatch) -> None:
        """Every snapshot of a hub cache kept in the project comes from elsewhere: none is
        collected from, not only the one under test."""
        pytest.importorskip("huggingface_hub")
        (pytester.path / "tox.ini").unlink()
        user_project(pytester.path)
        for repo, seed in (("org/tiny", 2), ("org/other", 3)):
            source = pytester.path / "sources" / repo
            write_checkpoint(source, random_llama_weights(SHAPE, seed=seed), SHAPE.config())
            plant_code(source, pytester.path)
            shutil.rmtree(source / "sub")  # a snapshot holds files only
            hub_cache(pytester.path / "hf", repo, source)
            for planted in source.rglob("*.py"):  # only the cached copies remain
                planted.unlink()
        monkeypatch.setenv("HF_HUB_CACHE", str(pytester.path / "hf"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        outcome = hostile(".", "--spectral-model=org/tiny")
        assert outcome.exit_code == pytest.ExitCode.OK, outcome.output
        assert f"{ITEMS + 1} passed" in outcome.output

    @pytest.mark.parametrize(
        ("paths", "why"),
        [
            (["."], "a test* subdirectory of the test path ."),
            ([], "a test* subdirectory of the directory pytest was started in"),
            (["spectral::layer00"], "a test* subdirectory of the directory pytest was started"),
        ],
        ids=["dot", "no-path", "only-spectral-ids"],
    )
    def test_a_conftest_pytest_imports_at_startup_is_refused(
        self, pytester, hostile, paths, why
    ) -> None:
        """pytest imports the conftest.py of each test path's ``test*`` subdirectories (and,
        without paths, of the invocation directory's) before any plugin hook: a checkpoint
        named ``test-model`` next to the user's tests is refused, naming its conftest.py."""
        ckpt = nan_checkpoint(pytester.path / "test-model")
        plant_code(ckpt, pytester.path)
        hostile.refused(
            *paths,
            "--spectral-model=test-model",
            naming=[
                f"ERROR: {ckpt / 'conftest.py'}: pytest would import this conftest.py from the "
                "checkpoint before any plugin can stop it",
                f"{ckpt} is {why}",
                "pass --noconftest",
            ],
        )

    def test_a_testpaths_entry_inside_the_checkpoint(self, pytester, hostile) -> None:
        ckpt = nan_checkpoint(pytester.path / "ckpt")
        plant_code(ckpt, pytester.path)
        (pytester.path / "tox.ini").write_text("[pytest]\ntestpaths = ckpt/sub\n")
        hostile.refused(
            "--spectral-model=ckpt",
            naming=[f"{ckpt / 'conftest.py'}: pytest would import", "the testpaths entry ckpt/sub"],
        )

    def test_without_a_conftest_a_test_named_checkpoint_runs(self, pytester, hostile) -> None:
        """Nothing to import at startup: the run goes ahead and collects nothing from it."""
        ckpt = nan_checkpoint(pytester.path / "test-model")
        plant_code(ckpt, pytester.path)
        for conftest in ckpt.rglob("conftest.py"):
            conftest.unlink()
        outcome = hostile(".", "--spectral-model=test-model")
        assert f"2 failed, {ITEMS - 2} passed" in outcome.output, outcome.output
        with_noconftest = hostile(".", "--spectral-model=test-model", "--noconftest")
        assert f"2 failed, {ITEMS - 2} passed" in with_noconftest.output


#: a file of each kind the path options take, written by :func:`third_party_directory`
PATH_OPTION_FILES = {
    "--spectral-config": "config.json",
    "--spectral-architecture": "arch.toml",
    "--spectral-thresholds": "rules.toml",
    "--spectral-baseline": "baseline.json",
    "--spectral-report": "r.json",
    "--spectral-calibrate": "cal.toml",
    "--spectral-html": "r.html",
}


def third_party_directory(directory: Path, marker: Path) -> Path:
    """A directory whose pytest.ini imports a module from it and turns failures into
    warnings, with a file for each path option (those of outputs from an earlier run)."""
    directory.mkdir()
    (directory / "pytest.ini").write_text(
        "[pytest]\npythonpath = .\naddopts = -p evilmod --spectral-warn-only\n"
    )
    (directory / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    for name in PATH_OPTION_FILES.values():
        (directory / name).write_text("{}\n" if name.endswith(".json") else "")
    return directory


class TestEveryOptionWithAValueTakesEquals:
    """Kind 1, moved: the space form of any other option lets another directory's ini
    configure the run, as it did for --spectral-model. Path options are refused in the space
    form whatever their value; other options when their value exists as a local path."""

    @pytest.mark.parametrize("option", list(PATH_OPTION_FILES))
    def test_space_form_of_a_path_option_is_refused(self, pytester, hostile, option) -> None:
        ckpt = nan_checkpoint(pytester.path / "ckpt")
        marker = pytester.path / "evil-ran"
        third = third_party_directory(pytester.path / "third", marker)
        value = third / PATH_OPTION_FILES[option]
        outcome = hostile(f"--spectral-model={ckpt}", option, str(value), writes=["evil-ran"])
        assert outcome.exit_code == pytest.ExitCode.USAGE_ERROR, outcome.output
        assert f"{option} {value} (on the command line): with a space" in outcome.output
        assert f"pytest --spectral-model={ckpt} {option}={value}\n" in outcome.output
        assert "warned" not in outcome.output
        # the residual the threat model names: pytest imported evilmod before any plugin
        assert marker.exists()

    def test_an_output_path_is_refused_before_it_exists(self, pytester, hostile) -> None:
        """Else the first run passes and the next one, finding the file, reads it as a test
        path: one command, two behaviours. Refused at once; nothing of ``third`` ran."""
        ckpt = nan_checkpoint(pytester.path / "ckpt")
        marker = pytester.path / "evil-ran"
        third = third_party_directory(pytester.path / "third", marker)
        for output in ("--spectral-report", "--spectral-calibrate", "--spectral-html"):
            value = third / f"new-{PATH_OPTION_FILES[output]}"
            hostile.refused(f"--spectral-model={ckpt}", output, str(value), naming=[f"{output}="])
        assert not marker.exists()

    def test_other_options_whose_value_is_a_local_path(self, pytester, hostile) -> None:
        ckpt = nan_checkpoint(pytester.path / "ckpt")
        marker = pytester.path / "evil-ran"
        third_party_directory(pytester.path / "0", marker)
        outcome = hostile(f"--spectral-model={ckpt}", "--spectral-layers", "0", writes=["evil-ran"])
        assert outcome.exit_code == pytest.ExitCode.USAGE_ERROR, outcome.output
        assert "--spectral-layers 0 (on the command line)" in outcome.output
        assert f"--spectral-model={ckpt} --spectral-layers=0\n" in outcome.output

    def test_pytest_addopts(self, pytester, hostile, monkeypatch) -> None:
        ckpt = nan_checkpoint(pytester.path / "ckpt")
        third = third_party_directory(pytester.path / "third", pytester.path / "evil-ran")
        rules = third / "rules.toml"
        monkeypatch.setenv("PYTEST_ADDOPTS", f"--spectral-thresholds {rules}")
        outcome = hostile(f"--spectral-model={ckpt}", writes=["evil-ran"])
        assert outcome.exit_code == pytest.ExitCode.USAGE_ERROR, outcome.output
        assert f"set PYTEST_ADDOPTS=--spectral-thresholds={rules}" in outcome.output

    def test_the_same_ci_command_twice(self, pytester, hostile, monkeypatch) -> None:
        """Unlucky CI: the project's ini names the rules; a report given with a space would
        pass the first run and, existing, move the rootdir (and skip the rules) in the next.
        It is refused in the first run; with '=' both runs fail the collapsed heads."""
        (pytester.path / "tox.ini").unlink()
        project = pytester.path / "project"
        user_project(project)
        (project / "pytest.ini").write_text("[pytest]\nspectral_thresholds = rules.toml\n")
        (project / "rules.toml").write_text(
            '[[rules]]\nname = "tight"\nmetric = "stable_rank"\nmin = 100\n'
        )
        ckpt = healthy_checkpoint(pytester.path / "models" / "tiny")
        artifacts = pytester.path / "artifacts"
        artifacts.mkdir()
        monkeypatch.chdir(project)
        report = artifacts / "r.json"
        space = hostile(f"--spectral-model={ckpt}", "--spectral-report", str(report))
        assert space.exit_code == pytest.ExitCode.USAGE_ERROR, space.output
        for _ in range(2):
            equals = hostile(
                f"--spectral-model={ckpt}",
                f"--spectral-report={report}",
                writes=["artifacts/r.json"],
            )
            assert f"{ITEMS} failed" in equals.output, equals.output
            assert f"rootdir: {project}" in equals.output


def healthy_checkpoint(directory: Path) -> Path:
    return write_checkpoint(directory, random_llama_weights(SHAPE, seed=12), SHAPE.config())


def assert_counts_agree(result: pytest.RunResult, summary: dict[str, int]) -> None:
    """The report's counts are pytest's: warned items passed for pytest, errors failed."""
    seen = result.parseoutcomes()
    assert summary["passed"] + summary["warned"] == seen.get("passed", 0)
    assert summary["failed"] + summary["error"] == seen.get("failed", 0) + seen.get("errors", 0)
    assert summary["items"] == sum(
        summary[o] for o in ("passed", "failed", "warned", "error", "skipped", "not_run")
    )


#: a user metric that raises on the spectra of layer 0's V (the NaN slice's batch)
FAILING_METRIC = """
    import numpy as np

    def pytest_spectral_register_metrics(metrics):
        def fragile(sv):
            if np.isnan(sv).any():
                raise ValueError("cannot handle nan")
            return sv[..., 0]
        metrics.add("fragile", fragile)
"""


class TestReportsLeaveNothingOut:
    """Kind 5: every collected item in the report, with the outcome pytest saw."""

    def test_worker_dying_mid_item_is_an_error(self, pytester) -> None:
        ckpt = healthy_checkpoint(pytester.path / "ckpt")
        dying = "spectral::layer01::head02-q"
        pytester.makeconftest(
            f"""
            import os

            def pytest_runtest_call(item):
                if item.nodeid == {dying!r} and os.environ.get("PYTEST_XDIST_WORKER"):
                    os._exit(1)
            """
        )
        result = run(pytester, f"--spectral-model={ckpt}", "-n", "2", "--spectral-report=r.json")
        result.assert_outcomes(passed=ITEMS - 1, failed=1)
        report = json.loads((pytester.path / "r.json").read_text())
        assert_counts_agree(result, report["summary"])
        assert report["summary"]["error"] == 1
        items = {i["nodeid"]: i for i in report["items"]}
        assert len(items) == ITEMS
        assert items[dying]["outcome"] == "error"
        assert items[dying]["status"] == "no_result"
        assert "crashed while running" in items[dying]["error"]
        assert (items[dying]["layer"], items[dying]["head"], items[dying]["matrix"]) == (1, 2, "q")
        result.stdout.fnmatch_lines([f"{ITEMS} items: {ITEMS - 1} passed; 1 error (q 1)"])

    def test_items_that_raise_before_their_record_are_errors(self, pytester) -> None:
        ckpt = nan_checkpoint(pytester.path / "ckpt")
        pytester.makeconftest(FAILING_METRIC)
        result = run(
            pytester,
            f"--spectral-model={ckpt}",
            "--spectral-report=r.json",
            "--spectral-html=r.html",
        )
        # The metric fails only on layer 0's V unit (the NaN's): its items, one per query head.
        unit = SHAPE.heads
        result.assert_outcomes(passed=ITEMS - unit, failed=unit)
        report = json.loads((pytester.path / "r.json").read_text())
        assert_counts_agree(result, report["summary"])
        errors = [i for i in report["items"] if i["outcome"] == "error"]
        assert {i["nodeid"] for i in errors} == {
            f"spectral::layer00::head{head:02d}-v" for head in range(SHAPE.heads)
        }
        assert all(
            i["error"] == "metric 'fragile' failed: ValueError: cannot handle nan" for i in errors
        )
        shared = next(i for i in errors if i["nodeid"] == "spectral::layer00::head02-v")
        assert (shared["kv_head"], shared["shape"], shared["metrics"]) == (1, [8, 32], {})
        page = (pytester.path / "r.html").read_text()
        assert "<h2>Items without a result</h2>" in page
        assert "<td>spectral::layer00::head02-v</td><td>error</td>" in page

    @pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])
    def test_stopping_early_leaves_the_rest_not_run_and_says_why(self, pytester, workers) -> None:
        ckpt = nan_checkpoint(pytester.path / "ckpt")
        result = run(
            pytester,
            f"--spectral-model={ckpt}",
            "-x",
            "--spectral-report=r.json",
            "--spectral-html=r.html",
            *workers,
        )
        report = json.loads((pytester.path / "r.json").read_text())
        assert_counts_agree(result, report["summary"])
        summary = report["summary"]
        assert summary["failed"] >= 1
        assert summary["items"] == ITEMS
        assert summary["not_run"] == ITEMS - summary["failed"] - summary["passed"] > 0
        not_run = [i for i in report["items"] if i["outcome"] == "not_run"]
        assert {i["error"] for i in not_run} == {"not run: stopping after 1 failures"}
        page = (pytester.path / "r.html").read_text()
        assert "<td>not_run</td><td>not run: stopping after 1 failures</td>" in page

    def test_a_stale_report_never_survives_a_run_without_records(self, pytester) -> None:
        ckpt = nan_checkpoint(pytester.path / "ckpt")
        stale = {"schema": "pytest-spectral-report", "summary": {"failed": 0}, "items": []}
        (pytester.path / "r.json").write_text(json.dumps(stale))
        pytester.makeconftest(
            "def pytest_spectral_register_metrics(metrics):\n"
            "    metrics.add('broken', lambda sv: 1 / 0)\n"
        )
        result = run(pytester, f"--spectral-model={ckpt}", "--spectral-report=r.json")
        result.assert_outcomes(failed=ITEMS)
        report = json.loads((pytester.path / "r.json").read_text())
        assert report["summary"]["error"] == ITEMS
        assert len(report["items"]) == ITEMS

    def test_a_stale_report_is_gone_even_when_the_run_is_killed(self, pytester) -> None:
        ckpt = healthy_checkpoint(pytester.path / "ckpt")
        earlier = {  # the start of each file as an earlier, passing run wrote it
            "r.json": '{\n "schema": "pytest-spectral-report",\n "summary": {"failed": 0}\n}\n',
            "r.html": '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>'
            "pytest-spectral: ckpt</title>\n",
            "rules.toml": "# Calibrated by pytest-spectral on ckpt\n",
        }
        for name, text in earlier.items():
            (pytester.path / name).write_text(text)
        pytester.makeconftest(
            "import os\ndef pytest_collection_finish(session):\n    os._exit(3)\n"
        )
        result = run(
            pytester,
            f"--spectral-model={ckpt}",
            "--spectral-report=r.json",
            "--spectral-html=r.html",
            "--spectral-calibrate=rules.toml",
        )
        assert result.ret == 3
        assert not any((pytester.path / n).exists() for n in ("r.json", "r.html", "rules.toml"))

    def test_calibration_is_not_written_from_an_incomplete_run(self, pytester) -> None:
        ckpt = nan_checkpoint(pytester.path / "ckpt")
        pytester.makeconftest(FAILING_METRIC)
        result = run(pytester, f"--spectral-model={ckpt}", "--spectral-calibrate=rules.toml")
        result.stdout.fnmatch_lines(
            ["spectral calibrated rules: not written to *rules.toml: 4 of 32 items have no *"]
        )
        assert not (pytester.path / "rules.toml").exists()

    def test_planted_symlinks_are_never_written_through(self, pytester) -> None:
        ckpt = healthy_checkpoint(pytester.path / "ckpt")
        victims = [pytester.path / "victim-1", pytester.path / "victim-2"]
        for victim in victims:
            victim.write_text("keep me\n")
        (pytester.path / "r.json.tmp").symlink_to(victims[0])  # the old fixed temporary name
        (pytester.path / "r.json").symlink_to(victims[1])
        run(pytester, f"--spectral-model={ckpt}", "--spectral-report=r.json").assert_outcomes(
            passed=ITEMS
        )
        assert [v.read_text() for v in victims] == ["keep me\n"] * 2
        report = pytester.path / "r.json"
        assert not report.is_symlink()
        assert json.loads(report.read_text())["summary"]["passed"] == ITEMS
        assert sorted(p.name for p in pytester.path.glob("*.tmp")) == ["r.json.tmp"]

    @pytest.mark.parametrize(
        "option", ["--spectral-report", "--spectral-html", "--spectral-calibrate"]
    )
    @pytest.mark.parametrize(
        ("where", "message"),
        [
            ("a-directory", "is a directory; give a file name"),
            ("missing/r.out", "/missing does not exist; create it first"),
            ("ckpt/r.out", "lies inside the checkpoint directory"),
        ],
    )
    def test_bad_output_paths_are_usage_errors_at_startup(
        self, pytester, option, where, message
    ) -> None:
        ckpt = healthy_checkpoint(pytester.path / "ckpt")
        (pytester.path / "a-directory").mkdir()
        before = snapshot(ckpt)
        result = run(pytester, f"--spectral-model={ckpt}", f"{option}={where}")
        assert_clean_usage_error(result, f"{option} {pytester.path / where}: ", message)
        assert "passed" not in result.stdout.str()  # before any item ran
        assert snapshot(ckpt) == before

    def test_unwritable_report_directory(self, pytester, monkeypatch) -> None:
        ckpt = healthy_checkpoint(pytester.path / "ckpt")
        locked = pytester.path / "locked"
        locked.mkdir()
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and access(p, mode))
        result = pytester.runpytest(f"--spectral-model={ckpt}", "--spectral-report=locked/r.json")
        assert_clean_usage_error(result, f"cannot create files in {locked} (permission)")

    @pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any directory")
    def test_unwritable_report_directory_for_real(self, pytester) -> None:
        ckpt = healthy_checkpoint(pytester.path / "ckpt")
        locked = pytester.path / "locked"
        locked.mkdir(mode=0o500)
        result = run(pytester, f"--spectral-model={ckpt}", "--spectral-report=locked/r.json")
        assert_clean_usage_error(result, "(permission)")

    def test_two_options_naming_one_file(self, pytester) -> None:
        ckpt = healthy_checkpoint(pytester.path / "ckpt")
        result = run(
            pytester, f"--spectral-model={ckpt}", "--spectral-report=x", "--spectral-html=x"
        )
        assert_clean_usage_error(result, "--spectral-report writes the same file")

    def test_atomic_write_leaves_no_temporary_file_and_normal_permissions(self, tmp_path) -> None:
        from pytest_spectral.reporting.files import write_text_atomically

        target = tmp_path / "r.json"
        umask = os.umask(0o022)
        try:
            write_text_atomically(target, "first\n")
            write_text_atomically(target, "second\n")
        finally:
            os.umask(umask)
        assert target.read_text() == "second\n"
        assert target.stat().st_mode & 0o777 == 0o644
        assert [p.name for p in tmp_path.iterdir()] == ["r.json"]

    def test_atomic_write_that_fails_removes_its_temporary_file(self, tmp_path) -> None:
        from pytest_spectral.reporting.files import OutputPathError, write_text_atomically

        (tmp_path / "r.json").mkdir()  # appeared during the run: left alone
        with pytest.raises(OutputPathError, match=r"r\.json: is a directory now, not a regular"):
            write_text_atomically(tmp_path / "r.json", "text")
        assert [p.name for p in tmp_path.iterdir()] == ["r.json"]

    def test_the_baseline_is_neither_removed_nor_written_over(self, pytester) -> None:
        ckpt = healthy_checkpoint(pytester.path / "ckpt")
        run(pytester, f"--spectral-model={ckpt}", "--spectral-report=good.json")
        before = (pytester.path / "good.json").read_bytes()
        rules = pytester.path / "drift.toml"
        rules.write_text('[[rules]]\nmetric = "spectral_norm"\nmax_change = 0.5\n')
        again = (
            f"--spectral-model={ckpt}",
            "--spectral-baseline=good.json",
            f"--spectral-thresholds={rules}",
            "--spectral-report=good.json",
        )
        result = run(pytester, *again, "-n", "2")
        assert_clean_usage_error(result, "--spectral-report", "is also the baseline")
        assert (pytester.path / "good.json").read_bytes() == before


def run_in_process(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """pytest in this process (its start-up is not what is tested), timed."""
    start = time.monotonic()
    result = pytester.runpytest(*args)
    result.seconds = time.monotonic() - start  # type: ignore[attr-defined]
    return result


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


def make_socket(path: Path) -> None:
    """A unix socket at ``path`` (bound through a short relative name: socket paths are
    limited to about 100 bytes)."""
    here = Path.cwd()
    os.chdir(path.parent)
    try:
        server = socket.socket(socket.AF_UNIX)
        server.bind(path.name)
        server.close()
    finally:
        os.chdir(here)


def make_character_device(path: Path) -> None:
    """A node like /dev/null (major 1, minor 3), made in the test's own directory."""
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))


def make_block_device(path: Path) -> None:
    """A node like /dev/loop0 (major 7, minor 0); never opened."""
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(7, 0))


def make_fifo_link(path: Path) -> None:
    os.mkfifo(path.with_name("elsewhere"))
    path.symlink_to("elsewhere")


OUTPUT_OPTIONS = ["--spectral-report", "--spectral-html", "--spectral-calibrate"]


class TestOutputsThatAreNotFiles:
    """Kind 3: an output path holding anything but a regular file is a usage error naming
    it, left as it was; any error while checking, removing or writing an output is a usage
    error or one line, never a traceback."""

    @pytest.mark.parametrize("option", OUTPUT_OPTIONS)
    @pytest.mark.parametrize(
        ("make", "what"),
        [
            (make_fifo, "a named pipe (FIFO)"),
            (make_socket, "a socket"),
            (make_character_device, "a character device"),
            (make_block_device, "a block device"),
            (make_fifo_link, "a named pipe (FIFO)"),
        ],
        ids=["fifo", "socket", "character-device", "block-device", "link-to-fifo"],
    )
    def test_special_files_are_refused_and_left_alone(
        self, pytester, hostile, option, make, what
    ) -> None:
        ckpt = healthy_checkpoint(pytester.path / "ckpt")
        target = pytester.path / "out" / "null"
        target.parent.mkdir()
        make(target)
        hostile.refused(
            f"--spectral-model={ckpt}",
            f"{option}=out/null",
            naming=[f"ERROR: {option} {target}: is {what}, not a regular file"],
        )  # hostile() compares the node's kind before and after

    @pytest.mark.parametrize(
        ("target", "message"),
        [
            ("/proc/self/fd/1", "cannot create files in /proc/self/fd: "),
            ("/proc/self/status", "cannot create files in /proc/self"),
            ("/proc/self/fd/1/r.json", "/proc/self/fd/1 is not a directory"),
        ],
    )
    def test_proc_entries(self, pytester, hostile, target, message) -> None:
        ckpt = healthy_checkpoint(pytester.path / "ckpt")
        hostile.refused(f"--spectral-model={ckpt}", f"--spectral-report={target}", naming=[message])

    def test_directory_removed_during_the_run(self, pytester, hostile) -> None:
        ckpt = healthy_checkpoint(pytester.path / "ckpt")
        (pytester.path / "out").mkdir()
        pytester.makeconftest(
            "import shutil\ndef pytest_collection_finish(session):\n    shutil.rmtree('out')\n"
        )
        report = "--spectral-report=out/r.json"
        outcome = hostile(f"--spectral-model={ckpt}", report, writes=["out"])
        assert outcome.exit_code == pytest.ExitCode.USAGE_ERROR, outcome.output
        assert (
            f"spectral report: NOT written to {pytester.path / 'out/r.json'}: "
            "No such file or directory" in outcome.output
        )
        assert f"{ITEMS} passed" in outcome.output

    def test_special_file_put_at_the_target_during_the_run(self, pytester, hostile) -> None:
        ckpt = healthy_checkpoint(pytester.path / "ckpt")
        pytester.makeconftest(
            "import os\ndef pytest_collection_finish(session):\n    os.mkfifo('r.json')\n"
        )
        outcome = hostile(f"--spectral-model={ckpt}", "--spectral-report=r.json", writes=["r.json"])
        assert outcome.exit_code == pytest.ExitCode.USAGE_ERROR, outcome.output
        assert "is a named pipe (FIFO) now, not a regular file; left alone" in outcome.output
        assert stat.S_ISFIFO((pytester.path / "r.json").lstat().st_mode)
        assert not list(pytester.path.glob(".r.json.*.tmp"))

    def test_stale_file_that_cannot_be_removed(self, pytester, monkeypatch) -> None:
        ckpt = healthy_checkpoint(pytester.path / "ckpt")
        stale = pytester.path / "r.json"
        stale.write_text(STALE["r.json"])
        unlink = os.unlink

        def refusing(path, *args, **kwargs):  # type: ignore[no-untyped-def]
            if Path(path) == stale:
                raise PermissionError(1, "Operation not permitted")
            return unlink(path, *args, **kwargs)

        monkeypatch.setattr(os, "unlink", refusing)
        result = run_in_process(pytester, f"--spectral-model={ckpt}", "--spectral-report=r.json")
        assert_clean_usage_error(
            result,
            f"--spectral-report {stale}: cannot remove the file an earlier run left there: "
            "Operation not permitted",
        )


#: what an earlier run that passed left at each output path, each beginning as its writer
#: begins it (pytest-spectral removes only files it wrote)
STALE = {
    "r.json": '{\n "schema": "pytest-spectral-report",\n "summary": {"failed": 0}\n}\n',
    "r.html": '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>'
    "pytest-spectral: ckpt</title>\n",
    "c.toml": "# Calibrated by pytest-spectral on ckpt\n",
}
HAND_WRITTEN = '[[rules]]\nmetric = "stable_rank"\nmin = 2\n'
MATPLOTLIB_CACHE = (".config", ".config/matplotlib", ".cache", ".cache/matplotlib")
ALL_OUTPUTS = ("--spectral-report=r.json", "--spectral-html=r.html", "--spectral-calibrate=c.toml")


def fifo_config(ckpt: Path) -> list[str]:
    (ckpt / "config.json").unlink()
    os.mkfifo(ckpt / "config.json")
    return []


def no_setup(ckpt: Path) -> list[str]:
    return []


def inside_the_checkpoint(option: str) -> Callable[[Path], list[str]]:
    return lambda ckpt: [option.format(ckpt=ckpt)]


class TestStaleOutputsNeverSurviveAnEarlyStop:
    """Kind 4: once the output paths themselves are checked, the files an earlier run left
    there are removed before any other check can stop the run."""

    @pytest.fixture
    def planted(self, pytester) -> Path:
        for name, text in STALE.items():
            (pytester.path / name).write_text(text)
        return healthy_checkpoint(pytester.path / "ckpt")

    @pytest.mark.parametrize(
        ("setup", "args", "message"),
        [
            (no_setup, ["--spectral-thresholds=missing.toml"], "missing.toml"),
            (fifo_config, [], "config.json: is a named pipe"),
            (no_setup, ["--spectral-layers=7"], "layer(s) 7 do not exist"),
            (no_setup, ["--spectral-layers=x"], "--spectral-layers x: "),
            (no_setup, ["--spectral-energy=2"], "--spectral-energy 2: expected a number"),
            (no_setup, ["--spectral-scope=rows"], "--spectral-scope rows: expected one of"),
            (no_setup, ["--spectral-dtype=float16"], "--spectral-dtype float16: expected one"),
            (no_setup, ["--spectral-threads=0"], "--spectral-threads 0: expected a positive"),
            (no_setup, ["--spectral-calibrate-margin=-1"], "expected a non-negative number"),
            (no_setup, ["--spectral-matrices=gate"], "this checkpoint has no gate"),
            (no_setup, ["--spectral-baseline=missing.json"], "missing.json"),
            (no_setup, ["--spectral-architecture=missing.toml"], "missing.toml"),
            (no_setup, ["--spectral-heatmap=erank"], "unknown metric 'erank'"),
            (no_setup, ["spectral::layer09"], "spectral::layer09: no such spectral item"),
            (inside_the_checkpoint("{ckpt}"), [], "the test path"),
            (inside_the_checkpoint("--junitxml={ckpt}/j.xml"), [], "--junitxml"),
            (inside_the_checkpoint("--basetemp={ckpt}/t"), [], "--basetemp"),
        ],
        ids=[
            "missing-rules",
            "fifo-config",
            "layers-beyond",
            "layers-syntax",
            "energy",
            "scope",
            "dtype",
            "threads",
            "margin",
            "matrices",
            "missing-baseline",
            "missing-architecture",
            "heatmap",
            "unknown-id",
            "test-path-inside",
            "junitxml-inside",
            "basetemp-inside",
        ],
    )
    def test_every_early_stop_removes_them(
        self, pytester, hostile, planted, setup, args, message
    ) -> None:
        extra = setup(planted)
        outcome = hostile(
            f"--spectral-model={planted}",
            *ALL_OUTPUTS,
            *extra,
            *args,
            # and matplotlib's cache, in $HOME, which pytester points at the test directory
            writes=["r.json", "r.html", "c.toml", "ckpt/config.json", *MATPLOTLIB_CACHE],
        )
        assert outcome.exit_code == pytest.ExitCode.USAGE_ERROR, outcome.output
        assert message in outcome.output
        assert not any((pytester.path / n).exists() for n in ("r.json", "r.html", "c.toml"))

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--spectral-html=missing/r.html"], "does not exist; create it first"),
            (["--junitxml=r.json"], "--junitxml writes the same file"),
            (["--spectral-thresholds", "rules.toml"], "with a space"),
        ],
        ids=["output-path", "output-collision", "space-form"],
    )
    def test_errors_about_the_outputs_or_the_command_line_remove_nothing(
        self, pytester, hostile, planted, args, message
    ) -> None:
        """The outputs named may not be the ones meant (a typo, a foreign ini's addopts):
        nothing is removed."""
        (pytester.path / "rules.toml").write_text("")
        report = "--spectral-report=r.json"
        hostile.refused(f"--spectral-model={planted}", report, *args, naming=[message])
        assert (pytester.path / "r.json").read_text() == STALE["r.json"]

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--spectral-layers=7"], "replaces only its own files"),
            (["--spectral-thresholds=c.toml"], "is also the rules file, which this run reads"),
            (["--spectral-history=c.toml"], "is also an earlier report (--spectral-history)"),
        ],
        ids=["foreign-file", "rules-file", "history-report"],
    )
    def test_a_file_pytest_spectral_did_not_write_or_an_input_is_never_removed(
        self, pytester, hostile, planted, args, message
    ) -> None:
        """Only earlier runs' outputs are removed: a hand-written file at an output path, or
        one the run reads, stops the run before anything is removed."""
        (pytester.path / "c.toml").write_text(HAND_WRITTEN)
        hostile.refused(f"--spectral-model={planted}", *ALL_OUTPUTS, *args, naming=[message])
        assert (pytester.path / "c.toml").read_text() == HAND_WRITTEN
        assert (pytester.path / "r.json").read_text() == STALE["r.json"]

    def test_a_configuration_inside_the_checkpoint_removes_nothing(
        self, pytester, hostile, planted, monkeypatch
    ) -> None:
        """Its ini could name any file as a report; the run stops before looking at one."""
        (planted / "pytest.ini").write_text("[pytest]\naddopts = --spectral-report=../r.json\n")
        monkeypatch.chdir(planted)
        hostile.refused(f"--spectral-model={planted}", naming=["lies inside the checkpoint"])
        assert (pytester.path / "r.json").read_text() == STALE["r.json"]


#: pytest options (of pytest itself, ``pytest --help``) whose value names a file or directory
PYTEST_PATH_OPTIONS = {
    # read, or used to select: the checkpoint's are refused or never collected (above)
    "--ignore",
    "--ignore-glob",
    "--confcutdir",
    "--config-file",
    "--rootdir",
    # written: each may not lie inside the checkpoint (and a file not be a spectral output)
    "--junit-xml",
    "--log-file",
    "--debug",
    "--basetemp",
}


class TestPytestsOwnOutputs:
    """Kind 5: spectral outputs never coincide with pytest's own, and no file pytest writes
    lies inside the checkpoint."""

    def test_the_list_of_pytests_path_options_is_complete(self, pytester, monkeypatch) -> None:
        """From the installed pytest's --help (its own options only): a new option naming a
        file to write must be added to the checks in invocation.py."""
        monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
        result = pytester.runpytest_subprocess("--help", timeout=TIMEOUT)
        metavar = re.compile(
            r"^  (?:-\w \S+, )?(--[\w-]+)=\[?(?:\w+_)?(?:path|file|dir|rootdir|file_name)\]?(\s|$)",
            re.IGNORECASE,
        )
        found = {
            match.group(1)
            for line in result.stdout.lines
            if (match := metavar.match(line)) is not None
        }
        assert found == PYTEST_PATH_OPTIONS

    @pytest.mark.parametrize(
        "pytest_option",
        [
            "--junitxml=same.out",
            "--junit-xml=same.out",
            "--log-file=same.out",
            "-olog_file=same.out",
            "--debug=same.out",
        ],
    )
    @pytest.mark.parametrize("option", OUTPUT_OPTIONS)
    def test_spectral_outputs_never_coincide_with_pytests(
        self, pytester, hostile, pytest_option, option
    ) -> None:
        ckpt = healthy_checkpoint(pytester.path / "ckpt")
        writer = {"--junit-xml": "--junitxml", "-olog_file": "log_file", "--log-file": "log_file"}
        label = pytest_option.split("=")[0]
        hostile.refused(
            f"--spectral-model={ckpt}",
            pytest_option,
            f"{option}=./same.out",
            naming=[f"{option} {pytester.path / 'same.out'}: {writer.get(label, label)} writes"],
        )

    @pytest.mark.parametrize(
        ("option", "what"),
        [
            ("--junit-xml={ckpt}/j.xml", "--junitxml"),
            ("--log-file={ckpt}/log.txt", "log_file"),
            ("-olog_file={ckpt}/log.txt", "log_file"),
            ("--debug={ckpt}/debug.log", "--debug"),
            ("--basetemp={ckpt}/tmp", "--basetemp"),
            ("--basetemp={ckpt}/..", "--basetemp"),
        ],
    )
    def test_nothing_pytest_writes_lies_inside_the_checkpoint(
        self, pytester, hostile, option, what
    ) -> None:
        ckpt = healthy_checkpoint(pytester.path / "models" / "ckpt")
        hostile.refused(
            f"--spectral-model={ckpt}",
            option.format(ckpt=ckpt),
            "-p",
            "no:cacheprovider",
            naming=[f"ERROR: {what} (", ckpt.name],
        )


class TestValuesThatSlipThrough:
    """Kind 6: every value read from a file is checked for type and range before use."""

    @pytest.fixture
    def baseline(self, pytester) -> tuple[Path, Path]:
        ckpt = healthy_checkpoint(pytester.path / "ckpt")
        pytester.runpytest(f"--spectral-model={ckpt}", "--spectral-report=good.json")
        return ckpt, pytester.path / "good.json"

    @pytest.mark.parametrize("planted", ["inf", "-inf", "nan"])
    def test_non_finite_baseline_breaks_drift_rules(self, pytester, baseline, planted) -> None:
        ckpt, path = baseline
        report = json.loads(path.read_text())
        for item in report["items"]:
            item["metrics"]["spectral_norm"] = planted
        path.write_text(json.dumps(report))
        rules = pytester.path / "drift.toml"
        rules.write_text('[[rules]]\nmetric = "spectral_norm"\nmax_change = 0.5\n')
        result = run_in_process(
            pytester,
            f"--spectral-model={ckpt}",
            f"--spectral-baseline={path}",
            f"--spectral-thresholds={rules}",
        )
        result.assert_outcomes(failed=ITEMS)
        result.stdout.fnmatch_lines(
            [f"*spectral_norm = * vs baseline {planted}: relative change undefined"]
        )

    @pytest.mark.parametrize(
        ("edit", "message"),
        [
            (lambda r: r.update(model="llama"), "key 'model' must be an object, got str 'llama'"),
            (lambda r: r.update(items={}), "key 'items' must be a list, got dict {}"),
            (lambda r: r["items"].__setitem__(0, 7), "items[0] must be an object, got int 7"),
            (lambda r: r["items"][1].update(metrics=[1, 2]), "items[1].metrics must be an object"),
            (lambda r: r["items"][2].update(nodeid=3), "items[2].nodeid must be a string"),
            (
                lambda r: r["items"][3]["metrics"].update(top_k_ratio="0.5"),
                "items[3].metrics.top_k_ratio must be a number",
            ),
            (
                lambda r: r["items"][4]["metrics"].update(top_k_ratio=True),
                "items[4].metrics.top_k_ratio must be a number",
            ),
            (
                lambda r: r["items"][5]["metrics"].update(top_k_ratio=10**400),
                "items[5].metrics.top_k_ratio is out of range",
            ),
            (lambda r: r["items"].append(r["items"][0]), "appears twice"),
        ],
        ids=[
            "model-str",
            "items-dict",
            "item-int",
            "metrics-list",
            "nodeid-int",
            "value-str",
            "value-bool",
            "value-huge",
            "duplicate",
        ],
    )
    def test_malformed_baseline_names_the_key(self, pytester, baseline, edit, message) -> None:
        ckpt, path = baseline
        report = json.loads(path.read_text())
        edit(report)
        path.write_text(json.dumps(report))
        result = run_in_process(pytester, f"--spectral-model={ckpt}", f"--spectral-baseline={path}")
        assert_clean_usage_error(result, f"{path}: ", message)

    @pytest.mark.parametrize(
        ("lines", "message"),
        [
            ('conv1d = "false"', "key 'conv1d': must be true or false (not quoted), got 'false'"),
            ("conv1d = 0", "key 'conv1d': must be true or false"),
            (
                'layer = "blocks.{x}.attn."',
                "key 'layer': must be a string with the one placeholder",
            ),
            ('layer = "blocks.{layer}.{layer}."', "key 'layer': must be a string with the one"),
            ('layer = "blocks.{layer:>999999999}."', "key 'layer': must be a string with the one"),
            ('layer = "blocks.{layer.__class__}."', "key 'layer': must be a string with the one"),
            ('layer = "blocks.{layer."', "key 'layer': must be a string with the one"),
            ("layer = 3", "key 'layer': must be a string with the one"),
            ("fused = true", "key 'fused': must be one of concat, interleaved, grouped, got True"),
            ("qkv = 3", "key 'qkv': needs a tensor name (a non-empty string), got 3"),
            ('q = "wq"', "key 'q': does not apply to a fused layout"),
            ("heads_key = 7", "key 'heads_key': must name a config.json key"),
            ('mlp_layer = "mlp."', "key 'mlp_layer': must be a string with the one placeholder"),
            ('mlp_layer = "model.layers.{layer}.mlp."', "key 'mlp_layer': names no MLP tensor"),
            ("gate = 3", "key 'gate': needs a tensor name (a non-empty string), got 3"),
            ('gate = "gate_proj.weight"', "key 'mlp_layer': must be a string with the one"),
        ],
    )
    def test_architecture_file_values_are_checked(self, pytester, lines, message) -> None:
        ckpt = healthy_checkpoint(pytester.path / "ckpt")
        valid = {
            "layer": '"model.layers.{layer}.self_attn."',
            "qkv": '"qkv_proj.weight"',
            "o": '"o_proj.weight"',
            "fused": '"concat"',
        }
        key = lines.split(" = ")[0]
        valid[key] = lines.split(" = ", 1)[1]
        text = "[architecture]\n" + "".join(f"{k} = {v}\n" for k, v in valid.items())
        (pytester.path / "arch.toml").write_text(text)
        result = run_in_process(
            pytester, f"--spectral-model={ckpt}", "--spectral-architecture=arch.toml"
        )
        assert_clean_usage_error(result, f"{pytester.path / 'arch.toml'}: [architecture] {message}")

    @pytest.mark.parametrize(
        ("values", "message"),
        [
            ({"num_kv_heads": "two"}, "'num_kv_heads' must be a positive integer, got 'two'"),
            ({"num_kv_heads": [2]}, "'num_kv_heads' must be a positive integer, got [2]"),
            ({"num_kv_heads": -1}, "'num_kv_heads' must be a positive integer, got -1"),
            ({"num_kv_heads": 0}, "'num_kv_heads' must be a positive integer, got 0"),
            ({"num_kv_heads": True}, "'num_kv_heads' must be a positive integer, got True"),
            (
                {"new_decoder_architecture": "false"},
                "'new_decoder_architecture' must be true or false, got 'false'",
            ),
            (
                {"new_decoder_architecture": False, "multi_query": 1},
                "'multi_query' must be true or false, got 1",
            ),
        ],
    )
    def test_falcon_config_values_are_checked(self, pytester, values, message) -> None:
        """Checked before any weight is read; the config names the key that is wrong."""
        ckpt = healthy_checkpoint(pytester.path / "ckpt")
        config = {
            "model_type": "falcon",
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "new_decoder_architecture": True,
            **values,
        }
        (ckpt / "config.json").write_text(json.dumps(config))
        result = run_in_process(pytester, f"--spectral-model={ckpt}")
        assert_clean_usage_error(result, f"{ckpt / 'config.json'}: {message}")

    def test_falcon_without_num_kv_heads_has_one_per_query_head(self, tmp_path) -> None:
        """As transformers' FalconConfig: num_kv_heads defaults to num_attention_heads."""
        from safetensors.torch import save_file

        from pytest_spectral.checkpoints.checkpoint import open_checkpoint

        heads, d, hidden = 4, 8, 32
        tensors = {}
        for layer in range(2):
            prefix = f"transformer.h.{layer}.self_attention."
            tensors[prefix + "query_key_value.weight"] = torch.zeros(3 * heads * d, hidden)
            tensors[prefix + "dense.weight"] = torch.zeros(hidden, heads * d)
        save_file(tensors, tmp_path / "model.safetensors")
        config = {
            "model_type": "falcon",
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_hidden_layers": 2,
            "new_decoder_architecture": True,
        }
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert open_checkpoint(tmp_path).geometry.kv_heads == heads

    def test_rule_bounds_beyond_float_range(self, pytester) -> None:
        ckpt = healthy_checkpoint(pytester.path / "ckpt")
        rules = pytester.path / "rules.toml"
        rules.write_text('[[rules]]\nmetric = "stable_rank"\nmin = 1' + "0" * 400 + "\n")
        result = run_in_process(
            pytester, f"--spectral-model={ckpt}", f"--spectral-thresholds={rules}"
        )
        assert_clean_usage_error(result, f"{rules}:3: rule 1, key 'min': 1000", "beyond the range")


ESC = "\x1b"
#: rule names a terminal or rich would otherwise act on: markup, an emoji code, escape
#: sequences (colour, clear screen, window title), CR, and a bidi override
HOSTILE_NAMES = [
    "attn[/k] collapse",
    "[/]",
    "[bold]x",
    ":x: gone",
    f"{ESC}[31mred{ESC}[0m",
    f"{ESC}[2J{ESC}]0;title\x07",
    "over\rwritten",
    "\u202eevil",
]


def toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string with \\uXXXX escapes is a TOML basic string


def assert_no_raw_control_characters(text: str) -> None:
    raw = [c for c in set(text) if c != "\n" and not c.isprintable()]
    assert not raw, f"raw control characters reached the terminal: {raw!r}"


class TestTextFromFilesReachingTheTerminal:
    """Kind 7: control characters escaped wherever file content is shown; no markup parsed."""

    @pytest.mark.parametrize(
        ("raw", "shown"),
        [
            ("plain name [x] :y: ü 中", "plain name [x] :y: ü 中"),
            (f"{ESC}[31m", "\\x1b[31m"),
            ("a\rb\tc\x00\x7f\x9b", "a\\x0db\\x09c\\x00\\x7f\\x9b"),
            ("\u202eabc\u2066\u200b", "\\u202eabc\\u2066\\u200b"),
            ("line\u2028sep\xa0", "line\\u2028sep\\xa0"),
            ("\U000e0001\ud800", "\\U000e0001\\ud800"),
        ],
    )
    def test_printable_escapes_what_is_not_printable(self, raw: str, shown: str) -> None:
        from pytest_spectral.printable import printable

        assert printable(raw) == shown
        assert printable("a\nb") == "a\\x0ab"
        assert printable("a\nb", keep_newlines=True) == "a\nb"

    def test_hostile_rule_names_show_literally(self, pytester) -> None:
        ckpt = healthy_checkpoint(pytester.path / "ckpt")
        rules = "".join(
            f'[[rules]]\nname = {toml_string(name)}\nmetric = "stable_rank"\nmin = 100\n'
            f'matrices = ["q"]\nlayers = "{index % 2}"\nheads = "{index // 2}"\n'
            + ('severity = "warn"\n' if index == 0 else "")
            for index, name in enumerate(HOSTILE_NAMES)
        )
        (pytester.path / "rules.toml").write_text(rules)
        result = pytester.runpytest_subprocess(
            f"--spectral-model={ckpt}",
            "--spectral-thresholds=rules.toml",
            "--spectral-html=r.html",
            "--spectral-heatmap=stable_rank",
            "--color=yes",
            timeout=TIMEOUT,
        )
        result.assert_outcomes(passed=ITEMS - 8, failed=7, warnings=1)
        assert result.parseoutcomes()["warned"] == 1
        text = output(result)
        assert "Traceback" not in text
        assert "MarkupError" not in text
        # colour is on, so pytest and rich emit their own escapes: look at what is left
        plain = text.replace(ESC + "[", "<CSI>")
        for shown in (
            "attn[/k] collapse",
            "[/]",
            "[bold]x",
            ":x: gone",
            "\\x1b[31mred\\x1b[0m",
            "\\x1b[2J\\x1b]0;title\\x07",
            "over\\x0dwritten",
            "\\u202eevil",
        ):
            assert shown in plain, shown
        assert "\r" not in text.replace("\r\n", "\n")
        assert "\u202e" not in text
        assert ESC + "]" not in text
        assert ESC + "[2J" not in text
        page = (pytester.path / "r.html").read_text()
        assert ESC not in page
        assert "\\x1b[31mred" in page
        assert "attn[/k] collapse" in page

    def test_hostile_tensor_and_shard_names(self, pytester) -> None:
        """Names from the weight files (via a custom layout) in a failure report."""
        from safetensors.torch import save_file

        prefix = f"blk{ESC}]0;pwned\x07{ESC}[2J.{{layer}}."
        tensors = random_llama_weights(SHAPE, seed=3, attention_only=True)
        renamed = {}
        for name, tensor in tensors.items():
            layer, matrix = name.split(".")[2], name.split(".")[4][0]
            renamed[prefix.format(layer=layer) + matrix] = tensor
        renamed[prefix.format(layer=0) + "q"][0, 0] = float("nan")
        ckpt = pytester.path / "ckpt"
        ckpt.mkdir()
        save_file(renamed, ckpt / "model.safetensors")
        (ckpt / "config.json").write_text(json.dumps(SHAPE.config()))
        arch = "\n".join(
            [
                "[architecture]",
                f"layer = {toml_string(prefix)}",
                *(f'{m} = "{m}"' for m in "qkvo"),
            ]
        )
        (pytester.path / "arch.toml").write_text(arch + "\n")
        result = pytester.runpytest(f"--spectral-model={ckpt}", "--spectral-architecture=arch.toml")
        result.assert_outcomes(passed=ITEMS - 1, failed=1)
        text = output(result)
        assert_no_raw_control_characters(text)
        assert "blk\\x1b]0;pwned\\x07\\x1b[2J.0.q" in text

        shard = f"model{ESC}[2J-00001.safetensors"
        index = {"weight_map": {name: shard for name in renamed}}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
        missing = pytester.runpytest(
            f"--spectral-model={ckpt}", "--spectral-architecture=arch.toml"
        )
        assert missing.ret == pytest.ExitCode.USAGE_ERROR
        assert_no_raw_control_characters(output(missing))
        assert "model\\x1b[2J-00001.safetensors" in output(missing)

    def test_calibrated_rules_keep_a_hostile_path_in_its_comment(self, pytester) -> None:
        ckpt = healthy_checkpoint(pytester.path / "ckpt\n[[rules]]")
        result = pytester.runpytest(f"--spectral-model={ckpt}", "--spectral-calibrate=cal.toml")
        result.assert_outcomes(passed=ITEMS)
        text = (pytester.path / "cal.toml").read_text()
        assert text.splitlines()[0].endswith("ckpt\\x0a[[rules]]")
        check = pytester.runpytest(f"--spectral-model={ckpt}", "--spectral-thresholds=cal.toml")
        check.assert_outcomes(passed=ITEMS)
