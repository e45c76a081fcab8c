"""The checkpoint never configures the run, and nothing is written inside it.

pytest decides a lot before any plugin is loaded (``_pytest/config/__init__.py``,
``Config.parse``): it parses the command line without the plugins' options, so in
``--spectral-model /data/ckpt`` it takes ``/data/ckpt`` for a test path; from the test paths
it picks its rootdir and ini file (``findpaths.determine_setup``: the ini is searched in the
paths' common ancestor and upwards, so a ``pytest.ini`` inside the checkpoint wins); it then
applies that ini's ``addopts``, puts its ``pythonpath`` on ``sys.path`` and imports the modules
its ``-p`` options name. Only then does it load installed plugins such as this one.

This module runs at the first hook an installed plugin gets after that,
``pytest_load_initial_conftests`` (before any ``conftest.py`` is imported, before the logging
plugin opens ``log_file``, before the cache plugin is configured, before any test). It refuses
the space form with a local path outright, and any run whose invocation directory, rootdir,
ini file, cache directory, test paths or output files lie inside the checkpoint. What ran
before it (a checkpoint ini's ``-p`` modules) cannot be undone: the README's threat model says
so, and the ``=`` form, which pytest never reads as a path, avoids it.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from pytest_spectral.printable import printable

MODEL_OPTION = "--spectral-model"


def refuse_space_form(config: pytest.Config) -> None:
    """Stop ``--spectral-model VALUE`` (with a space) when VALUE exists as a local path.

    Raises ``pytest.UsageError`` printing the command to run instead. A hub id that is no
    local path is left alone: pytest ignores arguments that do not exist when it chooses its
    rootdir (``findpaths.get_dirs_from_args``), so that form is safe.
    """
    invocation = config.invocation_params
    sources = (
        ("the command line", list(invocation.args)),
        ("PYTEST_ADDOPTS", shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))),
    )
    for where, args in sources:
        local = [i for i in _space_forms(args) if _exists_locally(args[i + 1], invocation.dir)]
        if not local:
            continue
        value = args[local[0] + 1]
        fixed = list(args)
        for position in reversed(local):
            fixed[position : position + 2] = [f"{MODEL_OPTION}={args[position + 1]}"]
        instead = (
            f"run:\n  {_program()} {shlex.join(fixed)}"
            if where == "the command line"
            else f"set PYTEST_ADDOPTS={shlex.join(fixed)}"
        )
        raise pytest.UsageError(
            printable(
                f"{MODEL_OPTION} {value} (on {where}): with a space, pytest reads {value} as a "
                "test path before any plugin is loaded, and takes its rootdir and ini file from "
                "there, so a pytest.ini inside the checkpoint would configure this run. Give a "
                f"local path with '=' instead; {instead}",
                keep_newlines=True,
            )
        )


def checkpoint_directory(argument: str) -> Path | None:
    """The directory a local ``--spectral-model`` argument points into, resolved; ``None`` for
    a hub id (its snapshot is checked once resolved)."""
    path = Path(os.path.expanduser(argument))
    if not (path.is_dir() or path.is_file()):  # nothing there, a FIFO, a device...: opening
        return None  # it says what it is
    return (path if path.is_dir() else path.parent).resolve()


def refuse_configuration_inside(config: pytest.Config, protected: Iterable[Path]) -> None:
    """Refuse a run whose configuration or pytest's own output lives inside the checkpoint.

    ``protected`` are resolved directories holding the checkpoint's files. Checked: the
    invocation directory, the rootdir, the ini file, the cache directory (``.pytest_cache``),
    the test paths given, ``--junitxml`` and ``log_file``. Raises ``pytest.UsageError``.
    """
    directories = sorted(set(protected))
    namespace = config.known_args_namespace
    invocation_dir = config.invocation_params.dir
    checks: list[tuple[str, Path | None, str]] = [
        (
            "the directory pytest was started in",
            invocation_dir,
            "it would read an ini file and conftest.py from there; run pytest from your "
            "project directory",
        ),
        ("pytest's rootdir", config.rootpath, _ROOTDIR_ADVICE),
        ("pytest's ini file", config.inipath, _ROOTDIR_ADVICE),
        ("pytest's cache directory", _cache_dir(config), "set cache_dir elsewhere"),
        ("--junitxml", _option_path(getattr(namespace, "xmlpath", None), invocation_dir), ""),
        ("log_file", _option_path(_log_file(config), invocation_dir), ""),
    ]
    checks += [
        ("the test path", _option_path(arg.split("::")[0], invocation_dir), _TEST_PATH_ADVICE)
        for arg in getattr(namespace, "file_or_dir", None) or ()
    ]
    for what, path, advice in checks:
        holder = _inside(path, directories)
        if holder is not None:
            raise pytest.UsageError(
                printable(
                    f"{what} ({path}) lies inside the checkpoint directory {holder}; "
                    "pytest-spectral never lets a checkpoint configure the run or writes into it: "
                    + (advice or "choose a path outside the checkpoint")
                )
            )


def inside(path: Path, directories: Iterable[Path]) -> Path | None:
    """The first of ``directories`` (resolved) that holds ``path`` or is it, else ``None``."""
    return _inside(path, sorted(set(directories)))


_ROOTDIR_ADVICE = (
    "run pytest from your project directory, with the checkpoint given as --spectral-model=PATH "
    "(or pass --rootdir and -c for a directory and ini file outside it)"
)
_TEST_PATH_ADVICE = "name test paths of your project only; the checkpoint is --spectral-model's"


def _space_forms(args: Sequence[str]) -> list[int]:
    """Indices of ``--spectral-model`` followed by a separate value. Each counts, not only
    the last (which argparse keeps): pytest's first parse took every such value for a path."""
    forms = []
    for index, arg in enumerate(args[:-1]):
        if arg == "--":
            break
        if arg == MODEL_OPTION:
            forms.append(index)
    return forms


def _exists_locally(value: str, invocation_dir: Path) -> bool:
    """Whether pytest (which joins the path to the invocation directory and does not expand
    '~') or the plugin (which does) would find ``value`` on disk."""
    candidates = (invocation_dir / value, Path(os.path.expanduser(value)))
    return any(p.exists() or p.is_symlink() for p in candidates)


def _program() -> str:
    return "python -m pytest" if Path(sys.argv[0]).name == "__main__.py" else "pytest"


def _inside(path: Path | None, directories: Sequence[Path]) -> Path | None:
    if path is None:
        return None
    resolved = path.resolve()
    return next((d for d in directories if d == resolved or d in resolved.parents), None)


def _option_path(value: object, invocation_dir: Path) -> Path | None:
    if not isinstance(value, str) or not value:
        return None
    return invocation_dir / os.path.expanduser(value)


def _log_file(config: pytest.Config) -> str | None:
    value = getattr(config.known_args_namespace, "log_file", None)
    if value:
        return value
    try:
        return config.getini("log_file") or None
    except ValueError:  # the logging plugin is blocked (-p no:logging)
        return None


def _cache_dir(config: pytest.Config) -> Path | None:
    """Where the cache plugin will write, as it computes it (``Cache.cache_dir_from_config``)."""
    if config.pluginmanager.is_blocked("cacheprovider"):
        return None
    try:
        value = config.getini("cache_dir")
    except ValueError:
        return None
    path = Path(os.path.expanduser(os.path.expandvars(str(value))))
    return path if path.is_absolute() else config.rootpath / path
