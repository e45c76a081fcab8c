"""Spectral metrics: pure functions of singular values.

Every metric takes an array (numpy, or anything ``numpy.asarray`` accepts, torch CPU tensors
included) whose last dimension holds the singular values of one matrix (any order,
non-negative), computes in float64 and reduces that dimension, so the same function serves a
single head (shape ``[r]``) and a whole layer of heads at once (shape ``[heads, r]``). The
engine uses the batched form; tests and users call the 1-D form. numpy rather than torch, so
that a re-run served from the cache never pays for importing torch.

Edge cases are defined rather than left to floating point:

* a zero matrix (all singular values 0) gives ``nan`` for every ratio, because a share of
  nothing is undefined; the norms are 0;
* ``first_last_ratio`` is ``inf`` when the smallest singular value is 0;
* ``k`` larger than the number of singular values is clamped, so ``top_k_ratio`` is then 1;
* any non-finite singular value makes every metric ``nan``.

Definitions follow ``shared/notes/metrics.md``: effective rank is Roy & Vetterli's
``exp(H(p))`` with the l1 normalisation ``p = sigma / sum(sigma)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from numpy.typing import ArrayLike, NDArray

Values = NDArray[np.float64]


def _as_float64(sv: ArrayLike) -> Values:
    return np.asarray(sv, dtype=np.float64)


def _descending(sv: ArrayLike) -> Values:
    return -np.sort(-_as_float64(sv), axis=-1)


def _poison_nonfinite(sv: ArrayLike, value: Values) -> Values:
    """Return ``nan`` wherever the input spectrum had a non-finite entry."""
    bad = ~np.isfinite(_as_float64(sv)).all(axis=-1)
    return np.where(bad, np.nan, value)


def _share(part: Values, total: Values) -> Values:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, part / np.where(total > 0, total, 1.0), np.nan)


def _clamp_k(k: int, s: Values) -> int:
    return max(1, min(int(k), s.shape[-1]))


def top_k_ratio(sv: ArrayLike, k: int = 10) -> Values:
    """Sum of the ``k`` largest singular values over the sum of all (nuclear-norm share)."""
    s = _descending(sv)
    return _poison_nonfinite(sv, _share(s[..., : _clamp_k(k, s)].sum(-1), s.sum(-1)))


def least_k_ratio(sv: ArrayLike, k: int = 10) -> Values:
    """Sum of the ``k`` smallest singular values over the sum of all."""
    s = _descending(sv)
    return _poison_nonfinite(sv, _share(s[..., -_clamp_k(k, s) :].sum(-1), s.sum(-1)))


def first_last_ratio(sv: ArrayLike) -> Values:
    """Condition number sigma_max / sigma_min: ``inf`` when sigma_min is 0, ``nan`` if all are 0."""
    s = _descending(sv)
    first, last = s[..., 0], s[..., -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(first > 0, first / last, np.nan)
    return _poison_nonfinite(sv, value)


def spectral_norm(sv: ArrayLike) -> Values:
    """Largest singular value (the operator 2-norm)."""
    return _poison_nonfinite(sv, _descending(sv)[..., 0])


def frobenius_norm(sv: ArrayLike) -> Values:
    """sqrt(sum sigma^2), the Frobenius norm of the matrix."""
    s = _as_float64(sv)
    return _poison_nonfinite(sv, np.sqrt((s * s).sum(-1)))


def stable_rank(sv: ArrayLike) -> Values:
    """||W||_F^2 / ||W||_2^2, in [1, r]; a soft count of the directions that carry energy."""
    s = _descending(sv)
    return _poison_nonfinite(sv, _share((s * s).sum(-1), s[..., 0] ** 2))


def effective_rank(sv: ArrayLike) -> Values:
    """Roy & Vetterli (2007): exp of the Shannon entropy of p = sigma / sum(sigma), in [1, r]."""
    s = _as_float64(sv)
    total = s.sum(-1, keepdims=True)
    p = _share(s, total)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    value = np.where(total[..., 0] > 0, np.exp(-plogp.sum(-1)), np.nan)
    return _poison_nonfinite(sv, value)


def energy_rank(sv: ArrayLike, p: float = 0.9) -> Values:
    """Smallest r with sum(sigma[:r]^2) >= p * sum(sigma^2).

    By Eckart-Young the best rank-r approximation then has relative Frobenius error
    ``sqrt(1 - p)`` at most, which is what makes this the operational rank for compression.
    """
    s = _descending(sv)
    cumulative = np.cumsum(s * s, axis=-1)
    total = cumulative[..., -1:]
    rank = (cumulative < p * total).sum(-1).astype(np.float64) + 1.0
    return _poison_nonfinite(sv, np.where(total[..., 0] > 0, rank, np.nan))


@dataclass(frozen=True)
class ParamSpec:
    """A metric parameter: its default and a check that returns an error text or ``None``."""

    default: float | int
    check: Callable[[object], str | None]
    help: str


@dataclass(frozen=True, eq=False)
class MetricSpec:
    """A named metric: ``function(singular_values, **params)`` reducing the last axis."""

    name: str
    function: Callable[..., Values]
    summary: str
    params: Mapping[str, ParamSpec] = field(default_factory=dict)


def _positive_int(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"must be a positive integer, got {value!r}"
    return None


def _fraction(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        return f"must be a number in (0, 1], got {value!r}"
    return None


_K = ParamSpec(10, _positive_int, "number of singular values (clamped to the rank)")
_P = ParamSpec(0.9, _fraction, "energy fraction in (0, 1]")

METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            "top_k_ratio", top_k_ratio, "sum of the k largest sigma / sum of all", {"k": _K}
        ),
        MetricSpec(
            "least_k_ratio", least_k_ratio, "sum of the k smallest sigma / sum of all", {"k": _K}
        ),
        MetricSpec(
            "first_last_ratio", first_last_ratio, "sigma_max / sigma_min (condition number)"
        ),
        MetricSpec("spectral_norm", spectral_norm, "sigma_max"),
        MetricSpec("frobenius_norm", frobenius_norm, "sqrt(sum sigma^2)"),
        MetricSpec("stable_rank", stable_rank, "sum sigma^2 / sigma_max^2"),
        MetricSpec("effective_rank", effective_rank, "exp(entropy of sigma / sum sigma)"),
        MetricSpec(
            "energy_rank",
            energy_rank,
            "smallest r with sum sigma[:r]^2 >= p sum sigma^2",
            {"p": _P},
        ),
    )
}


@dataclass(frozen=True)
class MetricRequest:
    """One metric with concrete parameters; ``key`` is how it is named in reports."""

    spec: MetricSpec
    params: tuple[tuple[str, float | int], ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    @cached_property
    def key(self) -> str:
        differing = [(k, v) for k, v in self.params if self.spec.params[k].default != v]
        if not differing:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in differing)})"

    def compute(self, sv: ArrayLike) -> Values:
        return self.spec.function(sv, **dict(self.params))


def request(spec: MetricSpec, **overrides: float | int) -> MetricRequest:
    """The request for ``spec`` with its default parameters, overridden where given."""
    params = {key: p.default for key, p in spec.params.items()}
    params.update(overrides)
    return MetricRequest(spec, tuple(sorted(params.items())))


def default_request(name: str, **overrides: float | int) -> MetricRequest:
    """The request for the built-in metric ``name``."""
    return request(METRICS[name], **overrides)


DEFAULT_REQUESTS: tuple[MetricRequest, ...] = tuple(request(spec) for spec in METRICS.values())


def _number(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number, got {value!r}"
    return None


class MetricRegistry:
    """The metrics a run knows: the built-in ones, plus those conftests and plugins add.

    Passed to the ``pytest_spectral_register_metrics`` hook, whose implementations call
    :meth:`add`.
    """

    def __init__(self) -> None:
        self.specs: dict[str, MetricSpec] = dict(METRICS)

    def add(
        self,
        name: str,
        function: Callable[..., Values],
        summary: str = "",
        **defaults: float | int,
    ) -> None:
        """Register ``function(singular_values, **params)`` as metric ``name``.

        It receives a float64 array whose last axis holds one slice's singular values in
        descending order (a whole layer's heads at once: shape ``[heads, r]``) and must return
        one value per slice (shape ``[heads]``). Keyword ``defaults`` declare its parameters,
        which rules may set like ``k`` of ``top_k_ratio``.
        """
        if not name.isidentifier():
            raise ValueError(f"metric name {name!r} must be an identifier")
        if name in self.specs:
            raise ValueError(f"metric {name!r} is already registered")
        params = {key: ParamSpec(value, _number, "") for key, value in defaults.items()}
        self.specs[name] = MetricSpec(name, function, summary or name, params)

    def user_requests(self) -> tuple[MetricRequest, ...]:
        """Default requests of the metrics added on top of the built-in ones."""
        return tuple(request(spec) for name, spec in self.specs.items() if name not in METRICS)
