"""The checkpoint never configures the run, is never collected from, and is never written.

pytest decides a lot before any plugin is loaded (``_pytest/config/__init__.py``,
``Config.parse``): it parses the command line without the plugins' options, so in
``--spectral-model /data/ckpt`` (or ``--spectral-report /out/r.json``) it takes the value for
a test path; from the test paths it picks its rootdir and ini file (``findpaths.determine_setup``:
the ini is searched in the paths' common ancestor and upwards, so a ``pytest.ini`` there wins);
it then applies that ini's ``addopts``, puts its ``pythonpath`` on ``sys.path`` and imports the
modules its ``-p`` options name. Only then does it load installed plugins such as this one.
Next, in ``pytest_load_initial_conftests``, pytest imports the ``conftest.py`` files of each
test path and of its ``test*`` subdirectories (``PytestPluginManager._set_initial_conftests``),
and later, while collecting, those of every directory it enters.

This module runs at the first hook an installed plugin gets after the command line is parsed,
``pytest_load_initial_conftests`` (tryfirst: before pytest's own implementation imports any
``conftest.py``, before the debug file, ``log_file`` or JUnit XML are opened, before the cache
plugin is configured, before any test). It refuses the space form of any option that takes a
value when the value exists as a local path, and any run whose invocation directory, rootdir,
ini file, cache directory, test paths, initial conftests or output files lie inside the
checkpoint. Collection later skips the checkpoint's directories (``hooks.py``). What ran before
this hook (a foreign ini's ``-p`` modules) cannot be undone: the README's threat model says
so, and the ``=`` form, which pytest never reads as a path, avoids it.
"""

from __future__ import annotations

import glob
import os
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pytest

from pytest_spectral.checkpoints.formats import is_adapter
from pytest_spectral.checkpoints.formats.shards import hub_blobs
from pytest_spectral.checkpoints.hub import hub_cache_directory, hub_id_of
from pytest_spectral.errors import CheckpointError
from pytest_spectral.printable import printable

MODEL_OPTION = "--spectral-model"


def refuse_space_form(
    config: pytest.Config, options: Sequence[str], path_options: Sequence[str]
) -> None:
    """Stop ``OPTION VALUE`` (with a space) for any of ``path_options``, and for any other of
    ``options`` when VALUE exists as a local path.

    Raises ``pytest.UsageError`` printing the command to run instead, every such option
    rewritten with '='. A path option is refused even before its file exists: a report
    given with a space would otherwise pass its first run and be read as a test path in the
    next. Another value that is no local path (a hub id, ``0-3``) is left alone: pytest
    ignores arguments that do not exist when it chooses its rootdir
    (``findpaths.get_dirs_from_args``), so that form is safe.
    """
    invocation = config.invocation_params
    sources = (
        ("the command line", list(invocation.args)),
        ("PYTEST_ADDOPTS", shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))),
    )
    for where, args in sources:
        refused = [
            i
            for i in _space_forms(args, options)
            if args[i] in path_options or _exists_locally(args[i + 1], invocation.dir)
        ]
        if not refused:
            continue
        option, value = args[refused[0]], args[refused[0] + 1]
        fixed = list(args)
        for position in reversed(refused):
            fixed[position : position + 2] = [f"{args[position]}={args[position + 1]}"]
        instead = (
            f"run:\n  {_program()} {shlex.join(fixed)}"
            if where == "the command line"
            else f"set PYTEST_ADDOPTS={shlex.join(fixed)}"
        )
        raise pytest.UsageError(
            printable(
                f"{option} {value} (on {where}): with a space, pytest reads {value} as a "
                "test path before any plugin is loaded, and takes its rootdir and ini file from "
                "there, so an ini file in its directory or above (a pytest.ini inside a "
                "checkpoint, say) would configure this run. Give the value with '=' instead; "
                f"{instead}",
                keep_newlines=True,
            )
        )


#: resolved directories the run must leave alone, each with what it is (for messages)
Protected = Mapping[Path, str]
CHECKPOINT_DIRECTORY = "the checkpoint directory"
BASE_MODEL_DIRECTORY = "the base model's directory"


def protected_directories(argument: str, base_model: str | None = None) -> dict[Path, str]:
    """The directories a ``--spectral-model`` argument's files may lie in, known before the
    checkpoint is opened: for a local path, the checkpoint's directory (a weight file's
    parent) and, for a Hugging Face cache snapshot, its repository's ``blobs/``, the only
    places its weights may be read from (``checkpoints/formats/shards.py``); for a hub id, the
    whole hub cache it will be read from, whose snapshots all come from elsewhere.

    A LoRA adapter's base model is a checkpoint too: ``base_model``
    (``--spectral-base-model``) is protected the same way; without it, an adapter's base comes
    from the hub cache (``checkpoints/formats/lora.py``), so the cache is protected.
    """
    protected = _directories_of(argument, CHECKPOINT_DIRECTORY)
    if base_model is not None:
        protected.update(_directories_of(base_model, BASE_MODEL_DIRECTORY))
    elif any(is_adapter(directory) for directory in protected):
        protected.update(_hub_cache())
    return protected


def _directories_of(argument: str, what: str) -> dict[Path, str]:
    try:
        repo_id = hub_id_of(argument)
    except CheckpointError:  # no valid hub id: opening the checkpoint says so
        return {}
    if repo_id is not None:
        return _hub_cache()
    path = Path(os.path.expanduser(argument))
    if not (path.is_dir() or path.is_file()):  # nothing there, a FIFO, a device...: opening
        return {}  # it says what it is
    root = (path if path.is_dir() else path.parent).resolve()
    return dict.fromkeys([root, *map(Path, hub_blobs(root))], what)


def _hub_cache() -> dict[Path, str]:
    cache = hub_cache_directory()
    return {cache: "the Hugging Face cache"} if cache is not None else {}


def refuse_configuration_inside(config: pytest.Config, protected: Protected) -> None:
    """Refuse a run whose configuration comes from inside the checkpoint.

    ``protected`` are the directories holding the checkpoint's files. Checked: the
    invocation directory, the rootdir and the ini file. Such a configuration may name any
    option (a report path included), so nothing else is looked at, or removed, before this
    check. Raises ``pytest.UsageError``.
    """
    _refuse(
        [
            (
                "the directory pytest was started in",
                config.invocation_params.dir,
                "it would read an ini file and conftest.py from there; run pytest from your "
                "project directory",
            ),
            ("pytest's rootdir", config.rootpath, _ROOTDIR_ADVICE),
            ("pytest's ini file", config.inipath, _ROOTDIR_ADVICE),
        ],
        protected,
    )


def refuse_collection_and_outputs_inside(config: pytest.Config, protected: Protected) -> None:
    """Refuse a run that would collect from, import from or write into the checkpoint.

    Checked: the test paths given, the ``conftest.py`` files pytest imports before any plugin
    could stop it (:func:`_initial_conftests_inside`), pytest's cache directory, every file
    pytest writes (:func:`pytest_output_files`) and ``--basetemp``, which pytest deletes and
    re-creates (so it may neither lie inside the checkpoint nor hold it). Raises
    ``pytest.UsageError``.
    """
    namespace = config.known_args_namespace
    invocation_dir = config.invocation_params.dir
    checks: list[tuple[str, Path | None, str]] = [
        ("the test path", _option_path(arg.split("::")[0], invocation_dir), _TEST_PATH_ADVICE)
        for arg in getattr(namespace, "file_or_dir", None) or ()
    ]
    checks.append(("pytest's cache directory", _cache_dir(config), "set cache_dir elsewhere"))
    checks += [(option, path, "") for option, path in pytest_output_files(config)]
    basetemp = _option_path(getattr(namespace, "basetemp", None), invocation_dir)
    checks.append(
        ("--basetemp", basetemp, "pytest deletes and re-creates that directory; choose another")
    )
    _refuse(checks, protected)
    if basetemp is not None:
        resolved = basetemp.resolve()
        held = next((d for d in protected if resolved in d.parents), None)
        if held is not None:
            raise pytest.UsageError(
                printable(
                    f"--basetemp ({basetemp}) holds {protected[held]} {held}, and "
                    "pytest deletes and re-creates that directory: choose another --basetemp"
                )
            )
    conftest = _initial_conftests_inside(config, sorted(protected))
    if conftest is not None:
        path, anchor, source = conftest
        raise pytest.UsageError(
            printable(
                f"{path}: pytest would import this conftest.py from the checkpoint before any "
                "plugin can stop it: at startup it imports the conftest.py files of each test "
                f"path and of its test* subdirectories, and {anchor} is {source}. Move or "
                "rename the checkpoint directory (so that its name does not start with "
                "'test'), name other test paths, or pass --noconftest"
            )
        )


def pytest_output_files(config: pytest.Config) -> list[tuple[str, Path]]:
    """The files pytest itself will write in this run, as ``(option, absolute path)``.

    From pytest's own options (``pytest --help``): ``--junitxml`` (``--junit-xml``), ``--log-file``
    or the ``log_file`` ini, and ``--debug``. (``--basetemp`` and the cache directory are
    directories; ``--pastebin`` writes nothing locally.)
    """
    namespace = config.known_args_namespace
    invocation_dir = config.invocation_params.dir
    xmlpath = getattr(namespace, "xmlpath", None)
    candidates = (
        ("--junitxml", os.path.expandvars(xmlpath) if isinstance(xmlpath, str) else None),
        ("log_file", _log_file(config)),
        ("--debug", getattr(namespace, "debug", None)),
    )
    files = [(option, _option_path(value, invocation_dir)) for option, value in candidates]
    return [(option, path) for option, path in files if path is not None]


def inside(path: Path, directories: Iterable[Path]) -> Path | None:
    """The first of ``directories`` (resolved) that holds ``path`` or is it, else ``None``."""
    return _inside(path, sorted(set(directories)))


_ROOTDIR_ADVICE = (
    "run pytest from your project directory, with the checkpoint given as --spectral-model=PATH "
    "(or pass --rootdir and -c for a directory and ini file outside it)"
)
_TEST_PATH_ADVICE = "name test paths of your project only; the checkpoint is --spectral-model's"


def _refuse(checks: Iterable[tuple[str, Path | None, str]], protected: Protected) -> None:
    ordered = sorted(protected)
    for what, path, advice in checks:
        holder = _inside(path, ordered)
        if holder is not None:
            raise pytest.UsageError(
                printable(
                    f"{what} ({path}) lies inside {protected[holder]} {holder}; "
                    "pytest-spectral never lets a checkpoint configure the run or writes into it: "
                    + (advice or "choose a path outside the checkpoint")
                )
            )


def _initial_conftests_inside(
    config: pytest.Config, directories: Sequence[Path]
) -> tuple[Path, Path, str] | None:
    """A ``conftest.py`` inside the checkpoint that pytest's ``pytest_load_initial_conftests``
    would import, as ``(conftest, anchor, why pytest anchors there)``, else ``None``.

    For each anchor (:func:`_initial_anchors`) pytest imports the ``conftest.py`` of its
    directory and of every parent not above ``--confcutdir``; only those inside the
    checkpoint's ``directories`` matter here.
    """
    namespace = config.known_args_namespace
    if getattr(namespace, "noconftest", False) or not directories:
        return None
    confcutdir = getattr(namespace, "confcutdir", None)
    cut = (config.invocation_params.dir / confcutdir).absolute() if confcutdir else None
    for anchor, why in _initial_anchors(config):
        directory = anchor if anchor.is_dir() else anchor.parent
        for folder in reversed((directory, *directory.parents)):  # in pytest's order
            if cut is not None and folder in cut.parents:
                continue
            conftest = folder / "conftest.py"
            if conftest.is_file() and _inside(conftest, directories) is not None:
                return conftest, anchor, why
    return None


def _initial_anchors(config: pytest.Config) -> list[tuple[Path, str]]:
    """Where pytest anchors its initial conftests (``PytestPluginManager._set_initial_conftests``
    on the paths of ``Config._decide_args``), each with the reason, for the message.

    The initial paths are the arguments, else the ``testpaths`` (globbed) when started in the
    rootdir, else the invocation directory; each that exists is an anchor, and so is every
    ``test*`` subdirectory of one that is a directory. When none exists (only node ids such as
    ``spectral::layer01``), the invocation directory and its ``test*`` subdirectories are.
    """
    namespace = config.known_args_namespace
    invocation_dir = config.invocation_params.dir
    initial: list[tuple[str, str]] = [
        (argument, f"the test path {argument}")
        for argument in getattr(namespace, "file_or_dir", None) or ()
    ]
    if not initial and invocation_dir == config.rootpath:
        testpaths = list(config.getini("testpaths"))
        if not getattr(namespace, "pyargs", False):
            testpaths = [p for t in testpaths for p in sorted(_glob(invocation_dir, t))]
        initial = [(p, f"the testpaths entry {p}") for p in testpaths]
    if not initial:
        initial = [(str(invocation_dir), "the directory pytest was started in")]
    anchors = []
    for argument, why in initial:
        anchor = invocation_dir / argument.split("::")[0]
        if _exists(anchor):
            anchors.append((anchor, why))
            anchors += _test_subdirectories(anchor, why)
    if not anchors:
        why = "the directory pytest was started in (no test path exists)"
        anchors = [(invocation_dir, why), *_test_subdirectories(invocation_dir, why)]
    return anchors


def _test_subdirectories(path: Path, why: str) -> list[tuple[Path, str]]:
    if not path.is_dir():
        return []
    subdirectories = sorted(sub for sub in path.glob("test*") if sub.is_dir())
    return [(sub, f"a test* subdirectory of {why}") for sub in subdirectories]


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # as pytest's safe_exists: a very long option, say
        return False


def _glob(directory: Path, pattern: str) -> list[str]:
    return glob.glob(pattern, root_dir=directory, recursive=True) if pattern else []


def _space_forms(args: Sequence[str], options: Sequence[str]) -> list[int]:
    """Indices of any of ``options`` followed by a separate value. Each counts, not only the
    last (which argparse keeps): pytest's first parse took every such value for a path."""
    forms = []
    for index, arg in enumerate(args[:-1]):
        if arg == "--":
            break
        if arg in options:
            forms.append(index)
    return forms


def _exists_locally(value: str, invocation_dir: Path) -> bool:
    """Whether pytest (which joins the path to the invocation directory and does not expand
    '~') or the plugin (which does) would find ``value`` on disk."""
    candidates = (invocation_dir / value, Path(os.path.expanduser(value)))
    try:
        return any(p.exists() or p.is_symlink() for p in candidates)
    except (OSError, ValueError):  # a name too long, a NUL: nothing pytest could find either
        return False


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
