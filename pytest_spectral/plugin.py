"""pytest entry point: options, the ``spectral`` marker, and starting a spectral run.

pytest loads this module in every run of an environment where the package is installed, so
it imports nothing heavy: the run's modules (and torch) load only with ``--spectral-model``.
"""

from __future__ import annotations

import argparse

import pytest

from pytest_spectral.checkpoints.architectures import MLP_MATRICES
from pytest_spectral.checkpoints.checkpoint import MATRICES
from pytest_spectral.invocation import (
    checkpoint_directory,
    refuse_configuration_inside,
    refuse_space_form,
)
from pytest_spectral.judging.ranges import IndexSet, RangeSyntaxError, parse_index_set


def _layers(text: str) -> IndexSet:
    try:
        return parse_index_set(text)
    except RangeSyntaxError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _matrices(text: str) -> tuple[str, ...]:
    known = MATRICES + MLP_MATRICES
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
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
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_spectral import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("spectral", "spectral health checks of transformer checkpoints")
    group.addoption(
        "--spectral-model",
        metavar="PATH",
        help="checkpoint to analyse: a directory (Hugging Face, Mistral native, PEFT LoRA "
        "adapter, torch.distributed.checkpoint), a single weight file (safetensors, GGUF, "
        "torch.save) or a Hugging Face hub id (hf://ORG/NAME). Enables the spectral items.",
    )
    group.addoption(
        "--spectral-revision",
        metavar="REV",
        help="branch, tag or commit of a hub id given to --spectral-model (default main).",
    )
    group.addoption(
        "--spectral-config",
        metavar="JSON",
        help="config.json to use instead of the one the checkpoint carries (or has none).",
    )
    group.addoption(
        "--spectral-base-model",
        metavar="PATH",
        help="base model of a LoRA adapter (directory, file or hub id); default: the adapter's "
        "base_model_name_or_path when it is a hub id in the local hub cache.",
    )
    group.addoption(
        "--spectral-adapter",
        choices=("merged", "delta"),
        default="merged",
        help="for a LoRA adapter: analyse the merged weights W + dW (default, needs the base "
        "model) or the update dW alone.",
    )
    group.addoption(
        "--spectral-architecture",
        metavar="TOML",
        help="describe an architecture the plugin does not know ([architecture] table).",
    )
    group.addoption(
        "--spectral-thresholds",
        metavar="TOML",
        help="rules file: TOML with one [[rules]] table per bound (see the README's Rules "
        "section); overrides the spectral_thresholds ini.",
    )
    group.addoption(
        "--spectral-layers",
        metavar="RANGES",
        type=_layers,
        help="only these layers, e.g. '0-3,8' (default: all).",
    )
    group.addoption(
        "--spectral-matrices",
        metavar="LIST",
        type=_matrices,
        help="only these matrices, e.g. q,k (heads and whole) or gate,down (whole only).",
    )
    group.addoption(
        "--spectral-scope",
        choices=("head", "matrix", "both"),
        default="head",
        help="items per head (default), per whole matrix (q, k, v, o and the MLP's), or both.",
    )
    group.addoption(
        "--spectral-report",
        metavar="PATH",
        help="write the JSON report (schema in the README) to PATH.",
    )
    group.addoption(
        "--spectral-energy",
        metavar="P",
        type=_fraction,
        default=0.95,
        help="energy fraction that sets the suggested rank of pruning candidates (default 0.95).",
    )
    group.addoption(
        "--spectral-device",
        metavar="DEVICE",
        default="auto",
        help="where to compute: auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps. "
        "Under pytest-xdist, 'cuda' gives worker gwN the GPU N mod count.",
    )
    group.addoption(
        "--spectral-dtype",
        choices=("float64", "float32"),
        default="float64",
        help="precision of the decomposition (default float64: within 1e-9 of LAPACK float64; "
        "float32 is faster on GPUs, about 1e-6).",
    )
    group.addoption(
        "--spectral-threads",
        metavar="N",
        type=_positive_int,
        help="torch threads per process (default: usable cores / pytest-xdist workers).",
    )
    group.addoption(
        "--spectral-no-cache",
        action="store_true",
        help="do not read or write cached singular values (cold run).",
    )
    group.addoption(
        "--spectral-baseline",
        metavar="REPORT",
        help="JSON report of an earlier run (--spectral-report) for rules with min_change / "
        "max_change; items are matched by node id.",
    )
    group.addoption(
        "--spectral-calibrate",
        metavar="TOML",
        help="write a rules file bounding each metric by this (known-good) checkpoint's range.",
    )
    group.addoption(
        "--spectral-calibrate-margin",
        metavar="M",
        type=_non_negative,
        default=0.25,
        help="calibration widens each observed range by M x its 5th-95th percentile spread "
        "(default 0.25).",
    )
    group.addoption(
        "--spectral-heatmap",
        metavar="METRIC",
        help="print a layers x heads heatmap of METRIC per matrix type in the summary.",
    )
    group.addoption(
        "--spectral-html",
        metavar="PATH",
        help="write a self-contained HTML report with plots (needs pytest-spectral[plot]).",
    )
    group.addoption(
        "--spectral-warn-only",
        action="store_true",
        help="report every broken rule (and non-finite or zero slice) as a warning; never fail.",
    )
    parser.addini(
        "spectral_thresholds",
        "rules file for pytest-spectral, relative to the ini file",
        default="",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """The earliest point an installed plugin gets the parsed command line and pytest's
    choice of rootdir and ini file: refuse a run the checkpoint could configure or write into,
    before any conftest.py is imported or any output file is opened (see invocation.py)."""
    argument = getattr(early_config.known_args_namespace, "spectral_model", None)
    if argument is None:
        return
    refuse_space_form(early_config)
    directory = checkpoint_directory(argument)
    if directory is not None:
        refuse_configuration_inside(early_config, [directory])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "spectral: a spectral health check of one slice of a checkpoint (pytest-spectral)",
    )
    if config.getoption("spectral_model") is None:
        return
    from pytest_spectral.hooks import SpectralPlugin, print_spectral_ids_as_they_are
    from pytest_spectral.outcomes import ItemLedger
    from pytest_spectral.run import RUN_KEY, SpectralRun
    from pytest_spectral.selection import check_selection, take_spectral_arguments

    run = SpectralRun.from_config(config)
    run.selected = take_spectral_arguments(config)
    check_selection(run)
    config.stash[RUN_KEY] = run
    print_spectral_ids_as_they_are(config)
    ledger = ItemLedger()
    config.pluginmanager.register(SpectralPlugin(run, ledger), "spectral-run")
    if config.get_verbosity() >= 1:
        from pytest_spectral.hooks import LayerProgressPlugin

        config.pluginmanager.register(LayerProgressPlugin(run, config, ledger), "spectral-progress")
    if config.pluginmanager.hasplugin("xdist"):
        from pytest_spectral.hooks import XdistControllerPlugin

        config.pluginmanager.register(XdistControllerPlugin(run, ledger), "spectral-xdist")
