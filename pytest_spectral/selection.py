"""What a spectral run collects: spectral node ids given as arguments, and the user's tests.

pytest reads every positional argument as a path, so ``pytest --spectral-model=X
spectral::layer01::head02-q`` would fail with "file or directory not found: spectral::...".
The spectral ids are taken out of ``config.args`` before collection and select the items
themselves, like a file's node id would.

Without any path argument, pytest would collect its ``testpaths`` (or the invocation
directory); a spectral run collects only the spectral items then, and says so in the header,
with the command that runs the user's tests too.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from pytest_spectral.nodes import ROOT_NAME, spectral_ids
from pytest_spectral.printable import printable
from pytest_spectral.run import SpectralRun


def take_spectral_arguments(config: pytest.Config) -> tuple[str, ...]:
    """Remove the arguments that are spectral node ids from ``config.args`` and return them.

    An argument is one when its path part is ``spectral`` and no such file or directory
    exists where pytest would look for it (the invocation directory).
    """
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        return ()
    start = config.invocation_params.dir
    taken = tuple(a for a in config.args if _is_spectral_id(a, start))
    if taken:
        config.args = [a for a in config.args if a not in taken]
    return taken


def _is_spectral_id(argument: str, start: Path) -> bool:
    path = argument.partition("::")[0]
    return path == ROOT_NAME and not (start / path).exists()


def check_selection(run: SpectralRun) -> None:
    """Raise ``pytest.UsageError`` for a spectral id given as an argument that names nothing
    this run would collect (a layer or head the model lacks, a matrix left out, a typo)."""
    if not run.selected:
        return
    ids = list(spectral_ids(run))
    known = set(ids)
    for argument in run.selected:
        if argument not in known:
            first = next((i for i in ids if i.count("::") == 2), ROOT_NAME)
            raise pytest.UsageError(
                printable(
                    f"{argument}: no such spectral item in this run; ids look like {first} "
                    "(layer, then head and matrix, zero-padded; see --collect-only -q)"
                )
            )


def collection_notice(config: pytest.Config) -> str | None:
    """The header line of a run that leaves the user's tests out, or ``None``.

    pytest collects its ``testpaths`` (or the invocation directory) when no path is given; a
    spectral run does not, and this line says what it collects instead and how to include
    them: name the paths on the command line.
    """
    source = config.args_source
    if source == pytest.Config.ArgsSource.ARGS:
        return None
    if source == pytest.Config.ArgsSource.TESTPATHS:
        paths = list(config.getini("testpaths"))
        where = f"(testpaths: {', '.join(paths)})"
    else:
        paths = ["."]
        where = "(in the current directory)"
    command = shlex.join(["pytest", *paths, *config.invocation_params.args])
    return printable(
        f"spectral: collecting only the spectral items; your tests {where} are not "
        f"collected: name them, e.g. `{command}`"
    )
