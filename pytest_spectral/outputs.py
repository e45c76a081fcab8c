"""The files a spectral run writes: checked, and an earlier run's removed, before anything
else can stop the run.

A CI job reads the report after pytest exits. If a run stopped with a usage error (a missing
rules file, a checkpoint that cannot be read, ``--spectral-layers`` beyond the model) left an
earlier run's report in place, that report would pass for this run's. So, at the first hook an
installed plugin gets (``pytest_load_initial_conftests``), once the command line is known not
to come from the checkpoint (``invocation.py``):

1. the output paths themselves are checked (:func:`check_outputs`); a usage error about them
   removes nothing. Among the checks: an output is never one of the run's inputs (rules,
   baseline, config, architecture file, an earlier report named by ``--spectral-history``),
   and an existing file there is replaced only when pytest-spectral wrote it;
2. the files at those paths, earlier runs' outputs by then, are removed
   (:func:`remove_stale_outputs`);
3. only then does any other check run: the rest of the command line in ``invocation.py``,
   option values, the checkpoint, the rules, ... in ``pytest_configure``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest

from pytest_spectral.invocation import Protected, inside, pytest_output_files
from pytest_spectral.options import given_path, rules_path
from pytest_spectral.printable import printable
from pytest_spectral.reporting.files import (
    OutputPathError,
    check_output_path,
    check_replaceable,
    remove_stale,
)

#: options naming files the run writes, each created through a temporary file at the end,
#: with the words for what it is
OUTPUT_OPTIONS = {
    "spectral_report": "a JSON report",
    "spectral_html": "an HTML report",
    "spectral_calibrate": "a calibrated rules file",
}
#: options naming files the run reads, which it never writes, with the words for them
_INPUT_OPTIONS = {
    "spectral_baseline": "the baseline (--spectral-baseline)",
    "spectral_config": "the config (--spectral-config)",
    "spectral_architecture": "the architecture file (--spectral-architecture)",
}


def output_paths(config: pytest.Config) -> dict[str, Path]:
    """The output options given, as absolute paths (see :func:`options.given_path`)."""
    return {name: path for name in OUTPUT_OPTIONS if (path := given_path(config, name))}


def check_outputs(config: pytest.Config, protected: Protected) -> dict[str, Path]:
    """The output paths, each checked; raises ``pytest.UsageError`` naming the option.

    Refused: a path that cannot take a new regular file (``reporting/files.py``); one inside
    ``protected`` (resolved directory -> what it is: the checkpoint's directories, or the hub
    cache a hub id will be read from); one given to two options; one pytest itself writes
    (``--junitxml``, ``log_file``, ``--debug``), which one of the two would overwrite; one
    that is also an input of the run (:func:`_inputs`), even through a link; and an existing
    file that pytest-spectral did not write (``reporting.files.check_replaceable``).
    """
    outputs = output_paths(config)
    writers = {path.resolve(): option for option, path in pytest_output_files(config)}
    inputs = _inputs(config)
    for name, path in outputs.items():
        option = _flag(name)
        try:
            check_output_path(path, option)
        except OutputPathError as exc:
            raise pytest.UsageError(printable(str(exc))) from None
        holder = inside(path, protected)
        if holder is not None:
            raise pytest.UsageError(
                printable(
                    f"{option} {path}: lies inside {protected[holder]} {holder}; "
                    "pytest-spectral never writes into a checkpoint: choose a path outside it"
                )
            )
        resolved = path.resolve()
        if resolved in writers:
            raise pytest.UsageError(
                printable(f"{option} {path}: {writers[resolved]} writes the same file")
            )
        writers[resolved] = option
        read_by = next((what for source, what in inputs if _same_file(path, source)), None)
        if read_by is not None:
            roll = (
                " (to roll a baseline forward, write the new report elsewhere and move it "
                "after a passing run)"
                if "baseline" in read_by
                else ""
            )
            raise pytest.UsageError(
                printable(
                    f"{option} {path}: is also {read_by}, which this run reads; pytest-spectral "
                    f"never writes over its inputs: choose another path{roll}"
                )
            )
    for name, path in outputs.items():
        try:
            check_replaceable(path, _flag(name), _mark(name), OUTPUT_OPTIONS[name])
        except OutputPathError as exc:
            raise pytest.UsageError(printable(str(exc))) from None
    return outputs


def remove_stale_outputs(outputs: Mapping[str, Path], config: pytest.Config) -> None:
    """Remove what earlier runs left at the output paths, so that none can pass for this
    run's. Only after :func:`check_outputs`: what is there was written by pytest-spectral,
    and is none of the run's inputs.

    A file in a --spectral-history directory is kept: it may be an earlier checkpoint's
    report, which a run that stops at a usage error must not destroy (the history refuses a
    report path holding another step's report; see ``history/earlier.py``), and is replaced
    only when the run writes its own.

    Raises ``pytest.UsageError`` for a file that cannot be removed.
    """
    directories = _history_directories(config)
    for name, path in outputs.items():
        if any(path.resolve().is_relative_to(d) for d in directories):
            continue
        try:
            remove_stale(path, _flag(name))
        except OutputPathError as exc:
            raise pytest.UsageError(printable(str(exc))) from None


def _history_directories(config: pytest.Config) -> list[Path]:
    history = getattr(config.known_args_namespace, "spectral_history", None) or []
    paths = [Path(os.path.expanduser(given)).absolute() for given in history]
    return [path.resolve() for path in paths if path.is_dir()]


def _inputs(config: pytest.Config) -> list[tuple[Path, str]]:
    """The files this run reads besides the checkpoint, each with words naming it: the rules
    file, baseline, config, architecture file and the earlier reports of --spectral-history
    (a directory's reports are never outputs: the report this run writes may go there)."""
    found = []
    rules = rules_path(config)
    if rules is not None:
        found.append((rules, "the rules file"))
    for name, words in _INPUT_OPTIONS.items():
        path = given_path(config, name)
        if path is not None:
            found.append((path, words))
    history = getattr(config.known_args_namespace, "spectral_history", None) or []
    for given in history:
        path = Path(os.path.expanduser(given)).absolute()
        if not path.is_dir():
            found.append((path, "an earlier report (--spectral-history)"))
    return found


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same resolved path, or one file under two names
    (a hard link)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist
        return False


def _mark(name: str) -> bytes:
    """The mark the writer of output ``name`` puts at its start, by which an earlier one is
    known. Imported here, for the outputs given only: this module loads in every pytest run
    (``plugin.py``), and a run without ``--spectral-calibrate`` never loads calibration."""
    if name == "spectral_report":
        from pytest_spectral.reporting.report import REPORT_MARK

        return REPORT_MARK
    if name == "spectral_html":
        from pytest_spectral.reporting.html_report import HTML_MARK

        return HTML_MARK
    from pytest_spectral.judging.calibrate import CALIBRATION_MARK

    return CALIBRATION_MARK.encode()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
