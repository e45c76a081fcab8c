"""pytest-spectral: test a transformer checkpoint's health from the singular values of its heads.

The pytest plugin lives in :mod:`pytest_spectral.plugin`; importing this package is cheap and
does not import torch.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
