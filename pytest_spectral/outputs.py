"""The files a spectral run writes: checked, and an earlier run's removed, before anything
else can stop the run.

A CI job reads the report after pytest exits. If a run stopped with a usage error (a missing
rules file, a checkpoint that cannot be read, ``--spectral-layers`` beyond the model) left an
earlier run's report in place, that report would pass for this run's. So, at the first hook an
installed plugin gets (``pytest_load_initial_conftests``), once the command line is known not
to come from the checkpoint (``invocation.py``):

1. the output paths themselves are checked (:func:`check_outputs`); a usage error about them
   removes nothing;
2. the files at those paths are removed (:func:`remove_stale_outputs`), except those the run
   reads as inputs (a baseline may be overwritten by the new report, at the end);
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
from pytest_spectral.reporting.files import OutputPathError, check_output_path, remove_stale

#: options naming files the run writes, each created through a temporary file at the end
OUTPUT_OPTIONS = ("spectral_report", "spectral_html", "spectral_calibrate")
#: options naming files the run reads, never removed as an earlier run's output
_INPUT_OPTIONS = ("spectral_baseline", "spectral_config", "spectral_architecture")


def output_paths(config: pytest.Config) -> dict[str, Path]:
    """The output options given, as absolute paths (see :func:`options.given_path`)."""
    return {name: path for name in OUTPUT_OPTIONS if (path := given_path(config, name))}


def check_outputs(config: pytest.Config, protected: Protected) -> dict[str, Path]:
    """The output paths, each checked; raises ``pytest.UsageError`` naming the option.

    Refused: a path that cannot take a new regular file (``reporting/files.py``); one inside
    ``protected`` (resolved directory -> what it is: the checkpoint's directories, or the hub
    cache a hub id will be read from); one given to two options; one pytest itself writes
    (``--junitxml``, ``log_file``, ``--debug``), which one of the two would overwrite.
    """
    outputs = output_paths(config)
    writers = {path.resolve(): option for option, path in pytest_output_files(config)}
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
    return outputs


def remove_stale_outputs(config: pytest.Config, outputs: Mapping[str, Path]) -> None:
    """Remove what earlier runs left at the output paths, so that none can pass for this
    run's; files this run reads (baseline, rules, config, architecture) are kept.

    Raises ``pytest.UsageError`` for a file that cannot be removed.
    """
    inputs = {p.resolve() for p in _input_paths(config)}
    for name, path in outputs.items():
        if path.resolve() in inputs:
            continue
        try:
            remove_stale(path, _flag(name))
        except OutputPathError as exc:
            raise pytest.UsageError(printable(str(exc))) from None


def _input_paths(config: pytest.Config) -> list[Path]:
    paths = [path for name in _INPUT_OPTIONS if (path := given_path(config, name))]
    history = getattr(config.known_args_namespace, "spectral_history", None) or []
    paths += [Path(os.path.expanduser(p)).absolute() for p in history]  # earlier reports
    rules = rules_path(config)
    return [*paths, rules] if rules is not None else paths


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
