"""Exceptions with messages meant for the person running pytest.

The plugin turns :class:`CheckpointError` and
:class:`~pytest_spectral.judging.rules.RulesError` into ``pytest.UsageError`` (exit code 4);
nothing else in the package raises at the user.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be analysed; the message names the file or tensor and a fix."""


class SpectralRuleWarning(UserWarning):
    """A rule with ``severity = "warn"`` was broken: reported, but the item passes."""


class DeviceError(ValueError):
    """A requested device or precision that this machine cannot provide."""
