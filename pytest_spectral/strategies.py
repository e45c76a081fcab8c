"""Public home of the hypothesis strategies (``from pytest_spectral import strategies``).

The implementation lives in :mod:`pytest_spectral.testing.strategies`, beside the synthetic
checkpoints it shares code with; this module keeps the documented import path stable.
"""

from pytest_spectral.testing.strategies import *  # noqa: F403
from pytest_spectral.testing.strategies import __all__  # noqa: F401
