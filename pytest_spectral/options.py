"""The command-line options of pytest-spectral: declared once, their values checked late.

Every option is a plain string for argparse; its value is converted and checked in
``pytest_configure`` (:func:`option_value`) rather than by an argparse ``type`` or ``choices``.
argparse checks run while pytest parses the command line, before any plugin hook, so a bad
``--spectral-energy`` would stop the run before an earlier run's report at
``--spectral-report`` could be removed; checked here, it stops the run after (see
``outputs.py``). The table also tells ``invocation.py`` which options take a value, each of
which pytest's early parse misreads as a test path when given with a space.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_spectral.checkpoints.checkpoint import HEAD_MATRICES
from pytest_spectral.checkpoints.families import WHOLE_ONLY_MATRICES
from pytest_spectral.judging.ranges import parse_index_set
from pytest_spectral.printable import printable


def _matrices(text: str) -> tuple[str, ...]:
    known = HEAD_MATRICES + WHOLE_ONLY_MATRICES
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(
            f"unknown matrix {', '.join(map(repr, unknown)) or repr(text)}; "
            f"use a comma-separated subset of {','.join(known)}"
        )
    return tuple(m for m in known if m in names)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise ValueError(f"expected a number in (0, 1], got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:
        raise ValueError(f"expected a non-negative number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return int(text)


def _one_of(*choices: str) -> Callable[[str], str]:
    def choice(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text

    return choice


@dataclass(frozen=True)
class Option:
    """One ``--spectral-*`` option. ``convert`` turns the string given into its value and
    raises ``ValueError`` with the reason when it cannot; ``flag`` options take no value;
    ``path`` options take nothing but a local file's path (``--spectral-model`` is not one:
    it takes hub ids too); ``repeatable`` ones collect every value given into a list."""

    name: str
    help: str
    metavar: str | None = None
    default: str | None = None
    convert: Callable[[str], object] | None = None
    flag: bool = False
    path: bool = False
    repeatable: bool = False

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")


OPTIONS = (
    Option(
        "--spectral-model",
        "checkpoint to analyse: a directory (Hugging Face, Mistral native, PEFT LoRA "
        "adapter, torch.distributed.checkpoint), a single weight file (safetensors, GGUF, "
        "torch.save) or a Hugging Face hub id (hf://ORG/NAME). Enables the spectral items. "
        "Give a local path with '=' (--spectral-model=PATH).",
        "PATH",
    ),
    Option(
        "--spectral-revision",
        "branch, tag or commit of a hub id given to --spectral-model (default main).",
        "REV",
    ),
    Option(
        "--spectral-config",
        "config.json to use instead of the one the checkpoint carries (or has none).",
        "JSON",
        path=True,
    ),
    Option(
        "--spectral-base-model",
        "base model of a LoRA adapter (directory, file or hub id); default: the adapter's "
        "base_model_name_or_path when it is a hub id in the local hub cache. Give a local path "
        "with '=' (--spectral-base-model=PATH).",
        "PATH",
    ),
    Option(
        "--spectral-adapter",
        "for a LoRA adapter: analyse the merged weights W + dW (default, needs the base "
        "model) or the update dW alone.",
        "merged|delta",
        "merged",
        _one_of("merged", "delta"),
    ),
    Option(
        "--spectral-architecture",
        "describe an architecture the plugin does not know ([architecture] table).",
        "TOML",
        path=True,
    ),
    Option(
        "--spectral-vision",
        "also analyse the vision tower of a multimodal model (LLaVA, LLaVA-NeXT, Gemma 3, "
        "Qwen2-VL, Qwen2.5-VL) as the vision stack: items spectral::vision::layerNN::...",
        flag=True,
    ),
    Option(
        "--spectral-thresholds",
        "rules file: TOML with one [[rules]] table per bound (see the README's Rules section); "
        "overrides the spectral_thresholds ini.",
        "TOML",
        path=True,
    ),
    Option(
        "--spectral-layers",
        "only these layers, e.g. '0-3,8' (default: all).",
        "RANGES",
        convert=parse_index_set,
    ),
    Option(
        "--spectral-matrices",
        "only these matrices, e.g. q,k (heads and whole), gate,down (whole only) or "
        "q,k,v,o,qk,ov (the per-head QK and OV circuits, collected only when named).",
        "LIST",
        convert=_matrices,
    ),
    Option(
        "--spectral-scope",
        "items per head (default), per whole matrix (q, k, v, o and the MLP's), or both.",
        "head|matrix|both",
        "head",
        _one_of("head", "matrix", "both"),
    ),
    Option(
        "--spectral-report",
        "write the JSON report (schema in the README) to PATH.",
        "PATH",
        path=True,
    ),
    Option(
        "--spectral-energy",
        "energy fraction that sets the suggested rank of pruning candidates (default 0.95).",
        "P",
        "0.95",
        _fraction,
    ),
    Option(
        "--spectral-device",
        "where to compute: auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps. "
        "Under pytest-xdist, 'cuda' gives worker gwN the GPU N mod count.",
        "DEVICE",
        "auto",
    ),
    Option(
        "--spectral-dtype",
        "precision of the decomposition (default float64: within 1e-9 of LAPACK float64; "
        "float32 is faster on GPUs, about 1e-6).",
        "float64|float32",
        "float64",
        _one_of("float64", "float32"),
    ),
    Option(
        "--spectral-threads",
        "torch threads per process (default: usable cores / pytest-xdist workers).",
        "N",
        convert=_positive_int,
    ),
    Option(
        "--spectral-subprocess",
        "decompose in a child process, so that pytest's item loop and the decomposition do "
        "not take turns on one interpreter lock: auto (default) does so in a single process "
        "when the selected tensors hold at least 2**28 weights, on always, off never.",
        "auto|on|off",
        "auto",
        _one_of("auto", "on", "off"),
    ),
    Option(
        "--spectral-no-cache",
        "do not read or write cached singular values (cold run).",
        flag=True,
    ),
    Option(
        "--spectral-baseline",
        "JSON report of an earlier run (--spectral-report) for rules with min_change / "
        "max_change; items are matched by node id.",
        "REPORT",
        path=True,
    ),
    Option(
        "--spectral-step",
        "the checkpoint's training step (a number) or label, recorded in the report; "
        "default: global_step of its trainer_state.json, or its directory name "
        "(checkpoint-1500).",
        "STEP",
    ),
    Option(
        "--spectral-history",
        "JSON reports of earlier checkpoints (a directory of *.json, or a file; repeatable) "
        "for trend rules (window) and the history in --spectral-html.",
        "PATH",
        path=True,
        repeatable=True,
    ),
    Option(
        "--spectral-calibrate",
        "write a rules file bounding each metric by this (known-good) checkpoint's range.",
        "TOML",
        path=True,
    ),
    Option(
        "--spectral-calibrate-margin",
        "calibration widens each observed range by M x its 5th-95th percentile spread "
        "(default 0.25).",
        "M",
        "0.25",
        _non_negative,
    ),
    Option(
        "--spectral-heatmap",
        "print a layers x heads heatmap of METRIC per matrix type in the summary.",
        "METRIC",
    ),
    Option(
        "--spectral-html",
        "write a self-contained HTML report with plots (needs pytest-spectral[plot]).",
        "PATH",
        path=True,
    ),
    Option(
        "--spectral-warn-only",
        "report every broken rule (and non-finite or zero slice) as a warning; never fail.",
        flag=True,
    ),
)

#: the options that take a value, which pytest's first parse reads as a test path when given
#: with a space (``invocation.py``); of those, the options whose value is always a path
VALUE_OPTIONS = tuple(option.name for option in OPTIONS if not option.flag)
PATH_OPTIONS = tuple(option.name for option in OPTIONS if option.path)
_BY_DEST = {option.dest: option for option in OPTIONS}


def add_options(group: pytest.OptionGroup) -> None:
    for option in OPTIONS:
        if option.flag:
            group.addoption(option.name, action="store_true", help=option.help)
        elif option.repeatable:
            group.addoption(option.name, action="append", metavar=option.metavar, help=option.help)
        else:
            group.addoption(
                option.name, metavar=option.metavar, default=option.default, help=option.help
            )


def option_value(config: pytest.Config, dest: str) -> object:
    """The value of option ``dest`` (e.g. ``"spectral_energy"``), converted; ``None`` when
    it has no default and was not given. Raises ``pytest.UsageError`` naming the option."""
    option = _BY_DEST[dest]
    text = config.getoption(dest)
    if text is None or option.convert is None:
        return text
    try:
        return option.convert(text)
    except ValueError as exc:
        raise pytest.UsageError(printable(f"{option.name} {text}: {exc}")) from None


def given_path(config: pytest.Config, dest: str) -> Path | None:
    """The path option ``dest`` names, absolute (relative to the working directory), or
    ``None``. Read from the command line as pytest parsed it before loading conftests
    (``known_args_namespace``, which holds every option of installed plugins), so that it is
    known at ``pytest_load_initial_conftests`` too."""
    value = getattr(config.known_args_namespace, dest, None)
    return Path(os.path.expanduser(value)).absolute() if value else None


def rules_path(config: pytest.Config) -> Path | None:
    """The rules file: ``--spectral-thresholds``, else the ``spectral_thresholds`` ini
    (relative to the ini file), as an absolute path; ``None`` when neither is set."""
    option = given_path(config, "spectral_thresholds")
    if option is not None:
        return option
    ini = config.getini("spectral_thresholds")
    if not ini:
        return None
    base = config.inipath.parent if config.inipath else config.rootpath
    return (base / ini).absolute()
