"""``python -m pytest_spectral.reporting.history``: the ``spectral-history`` command."""

import sys

from pytest_spectral.reporting.history.command import main

sys.exit(main())
