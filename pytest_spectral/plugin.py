"""pytest entry point: options, the ``spectral`` marker, and starting a spectral run.

pytest loads this module in every run of an environment where the package is installed, so
it imports nothing heavy: the run's modules (and torch) load only with ``--spectral-model``.
"""

from __future__ import annotations

import pytest

from pytest_spectral.invocation import (
    protected_directories,
    refuse_collection_and_outputs_inside,
    refuse_configuration_inside,
    refuse_space_form,
)
from pytest_spectral.options import PATH_OPTIONS, VALUE_OPTIONS, add_options
from pytest_spectral.outputs import check_outputs, remove_stale_outputs


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_spectral import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser.getgroup("spectral", "spectral health checks of transformer checkpoints"))
    parser.addini(
        "spectral_thresholds",
        "rules file for pytest-spectral, relative to the ini file",
        default="",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """The earliest point an installed plugin gets the parsed command line and pytest's
    choice of rootdir and ini file, before pytest imports any conftest.py or opens any output
    file. In this order: refuse a command line or configuration that may come from the
    checkpoint (it could name any output path); check the output paths; remove what earlier
    runs left there; refuse a run that would collect from, import from or write into the
    checkpoint (see invocation.py and outputs.py). Option values and the checkpoint itself
    are checked next, in ``pytest_configure``."""
    namespace = early_config.known_args_namespace
    argument = getattr(namespace, "spectral_model", None)
    if argument is None or namespace.help or namespace.version:
        return
    refuse_space_form(early_config, VALUE_OPTIONS, PATH_OPTIONS)
    protected = protected_directories(argument, getattr(namespace, "spectral_base_model", None))
    refuse_configuration_inside(early_config, protected)
    remove_stale_outputs(check_outputs(early_config, protected), early_config)
    refuse_collection_and_outputs_inside(early_config, protected)


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
