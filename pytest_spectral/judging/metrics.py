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
from functools import cached_property, lru_cache
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pytest_spectral.judging.powerlaw import PowerLawFits, fit_power_laws

Values = NDArray[np.float64]
#: a side of a metric's range: its ``high`` values, its ``low`` ones, or ``both``
Direction = Literal["high", "low", "both"]


def _as_float64(sv: ArrayLike) -> Values:
    return np.asarray(sv, dtype=np.float64)


def _descending(sv: ArrayLike) -> Values:
    return -np.sort(-_as_float64(sv), axis=-1)


def _balanced(sv: ArrayLike) -> tuple[Values, Values]:
    """Singular values divided by the power of two of each slice's largest, and that power.

    Dividing by a power of two is exact, so ratios come out bit for bit the same, but squares
    and sums can no longer under- or overflow: the spectrum of weights of 1e-170 (whose
    squares are below float64's range) measures like any other. Scale-dependent metrics
    multiply the power back in.
    """
    s = _as_float64(sv)
    with np.errstate(invalid="ignore"):
        exponent = np.frexp(np.max(s, axis=-1, keepdims=True))[1]
    return np.ldexp(s, -exponent), exponent[..., 0]


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


@dataclass(frozen=True)
class MetricContext:
    """What some metrics need besides the singular values: the matrix and its storage."""

    shape: tuple[int, int]  # [m, n]
    storage: str | None = None  # safetensors dtype name, e.g. "BF16"
    #: per slice, the measurement floor where it is not a function of the slice's own
    #: singular values: a circuit's (a product's) comes from its factors' norms
    #: (:func:`pytest_spectral.compute.circuits.product_floor`)
    floor: tuple[float, ...] | None = None


#: relative precision of each storage dtype (unit roundoff)
_STORAGE_EPS = {"BF16": 2.0**-8, "F16": 2.0**-11, "F32": 2.0**-24, "F64": 2.0**-53}


def storage_roundoff(storage: str | None) -> float:
    """Unit roundoff of a storage dtype (``"BF16"``: 2^-8); float64's for any other."""
    return _STORAGE_EPS.get(storage or "F64", 2.0**-53)


def measurement_floor(sv: ArrayLike, context: MetricContext) -> Values:
    """The smallest singular value that can be told apart from rounding, per slice.

    The larger of the float64 numerical floor ``sigma_max * max(m, n) * eps64`` and the storage
    floor ``u * rms(W) * (sqrt(m) + sqrt(n))``: rounding every weight to a dtype of unit
    roundoff ``u`` adds noise whose spectral norm is about that (``shared notes``, section 5).
    A context that carries its own ``floor`` (a circuit's) gives it instead.
    """
    if context.floor is not None:
        return np.asarray(context.floor, dtype=np.float64)
    s = _descending(sv)
    m, n = context.shape
    numerical = s[..., 0] * max(m, n) * np.finfo(np.float64).eps
    balanced, exponent = _balanced(s)
    rms = np.ldexp(np.sqrt((balanced * balanced).sum(-1) / (m * n)), exponent)
    storage = storage_roundoff(context.storage) * rms * (np.sqrt(m) + np.sqrt(n))
    return np.maximum(numerical, storage)


def first_last_ratio(sv: ArrayLike, context: MetricContext | None = None) -> Values:
    """Condition number sigma_max / sigma_min: ``inf`` when sigma_min is 0, ``nan`` if all are 0.

    With a ``context``, floor-aware: a sigma_min below :func:`measurement_floor` is rounding
    noise, so the ratio is reported as sigma_max / floor, the largest value that can be
    measured (the true one is at least that); the engine flags such values as floor-limited.
    """
    s = _descending(sv)
    first, last = s[..., 0], s[..., -1]
    if context is not None:
        last = np.maximum(last, measurement_floor(s, context))
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(first > 0, first / last, np.nan)
    return _poison_nonfinite(sv, value)


def spectral_norm(sv: ArrayLike) -> Values:
    """Largest singular value (the operator 2-norm)."""
    return _poison_nonfinite(sv, _descending(sv)[..., 0])


def frobenius_norm(sv: ArrayLike) -> Values:
    """sqrt(sum sigma^2), the Frobenius norm of the matrix."""
    s, exponent = _balanced(sv)
    return _poison_nonfinite(sv, np.ldexp(np.sqrt((s * s).sum(-1)), exponent))


def stable_rank(sv: ArrayLike) -> Values:
    """||W||_F^2 / ||W||_2^2, in [1, r]; a soft count of the directions that carry energy."""
    s = _descending(_balanced(sv)[0])
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
    s = _descending(_balanced(sv)[0])
    cumulative = np.cumsum(s * s, axis=-1)
    total = cumulative[..., -1:]
    rank = (cumulative < p * total).sum(-1).astype(np.float64) + 1.0
    return _poison_nonfinite(sv, np.where(total[..., 0] > 0, rank, np.nan))


def nuclear_norm(sv: ArrayLike) -> Values:
    """sum(sigma), the trace norm."""
    return _poison_nonfinite(sv, _as_float64(sv).sum(-1))


def spectral_entropy(sv: ArrayLike) -> Values:
    """Entropy of p = sigma^2 / sum(sigma^2), divided by ln(r): 0 (rank 1) to 1 (flat)."""
    s = _balanced(sv)[0]
    energy = s * s
    p = _share(energy, energy.sum(-1, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        value = -plogp.sum(-1) / np.log(s.shape[-1]) if s.shape[-1] > 1 else np.zeros(s.shape[:-1])
    value = np.where(energy.sum(-1) > 0, value, np.nan)
    return _poison_nonfinite(sv, value)


def participation_ratio(sv: ArrayLike) -> Values:
    """(sum lambda)^2 / sum lambda^2 with lambda = sigma^2, in [1, r]."""
    s = _balanced(sv)[0]
    energy = s * s
    return _poison_nonfinite(sv, _share(energy.sum(-1) ** 2, (energy * energy).sum(-1)))


def numerical_rank(sv: ArrayLike, context: MetricContext) -> Values:
    """#sigma > sigma_max * max(m, n) * eps64, as numpy.linalg.matrix_rank counts."""
    s = _descending(sv)
    tolerance = s[..., :1] * max(context.shape) * np.finfo(np.float64).eps
    return _poison_nonfinite(sv, (s > tolerance).sum(-1).astype(np.float64))


def _gavish_donoho_omega(beta: float) -> float:
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def gd_spikes(sv: ArrayLike, context: MetricContext) -> Values:
    """Gavish & Donoho (2014): #sigma > omega(beta) * median(sigma), beta = min/max side.

    The optimal hard threshold for a low-rank signal in noise of unknown level: a count of
    singular values that stand out of the noise bulk.
    """
    s = _descending(sv)
    m, n = context.shape
    threshold = _gavish_donoho_omega(min(m, n) / max(m, n)) * np.median(s, axis=-1)
    return _poison_nonfinite(sv, (s > threshold[..., None]).sum(-1).astype(np.float64))


def mp_spikes(sv: ArrayLike, context: MetricContext) -> Values:
    """#sigma above the Marchenko-Pastur bulk edge fitted to the slice's own median.

    The noise level is set so that the median singular value sits at the median of the MP law
    for the slice's aspect ratio (robust to the spikes being counted); the edge is then
    ``noise * (sqrt(m) + sqrt(n))``, widened by ``min(m, n) ** (-2/3)``, the relative scale of
    the Tracy-Widom fluctuations of the largest noise value. A random matrix has none.
    """
    s = _descending(sv)
    m, n = context.shape
    small, large = sorted((m, n))
    noise = np.median(s, axis=-1) / np.sqrt(large * _mp_median(small / large))
    edge = noise * (np.sqrt(m) + np.sqrt(n)) * (1 + small ** (-2 / 3))
    return _poison_nonfinite(sv, (s > edge[..., None]).sum(-1).astype(np.float64))


@lru_cache(maxsize=64)
def _mp_median(beta: float) -> float:
    """Median eigenvalue of the Marchenko-Pastur law of ratio beta <= 1 (unit variance).

    Integrated in theta with x = low + (high - low)(1 - cos theta)/2, which removes the
    square-root singularities of the density at the edges of its support.
    """
    low, high = (1 - np.sqrt(beta)) ** 2, (1 + np.sqrt(beta)) ** 2
    theta = np.linspace(0, np.pi, 40001)
    x = low + (high - low) * (1 - np.cos(theta)) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        density = np.sqrt(np.clip((high - x) * (x - low), 0, None)) / (2 * np.pi * beta * x)
    integrand = np.nan_to_num(density * (high - low) / 2 * np.sin(theta))
    steps = (integrand[1:] + integrand[:-1]) / 2 * np.diff(theta)
    cumulative = np.concatenate([[0.0], np.cumsum(steps)])
    return float(np.interp(0.5 * cumulative[-1], cumulative, x))


@lru_cache(maxsize=16)
def _cached_fits(data: bytes, shape: tuple[int, ...]) -> PowerLawFits:
    return fit_power_laws(np.frombuffer(data, dtype=np.float64).reshape(shape))


def _fits(sv: ArrayLike) -> PowerLawFits:
    """The power-law fits of a batch, computed once for the four alpha metrics."""
    s = np.ascontiguousarray(_descending(sv))
    return _cached_fits(s.tobytes(), s.shape)


def _fit_column(sv: ArrayLike, field: str) -> Values:
    return getattr(_fits(sv), field)


def alpha(sv: ArrayLike) -> Values:
    """Power-law exponent of the eigenvalue tail (see :mod:`pytest_spectral.judging.powerlaw`)."""
    return _fit_column(sv, "alpha")


def alpha_ks_distance(sv: ArrayLike) -> Values:
    """Kolmogorov-Smirnov distance of the chosen power-law fit (smaller is a better fit)."""
    return _fit_column(sv, "ks_distance")


def alpha_xmin(sv: ArrayLike) -> Values:
    """Smallest eigenvalue of the fitted tail."""
    return _fit_column(sv, "xmin")


def alpha_weighted(sv: ArrayLike) -> Values:
    """alpha * log10(lambda_max), WeightWatcher's alpha-hat (lambda_max = sigma_1^2, whose
    logarithm is taken as 2 log10(sigma_1): sigma_1^2 itself overflows above 1.3e154)."""
    s = _descending(sv)
    # log10(0) is -inf, and equal eigenvalues' alpha of inf times log10(1) = 0 is nan
    with np.errstate(divide="ignore", invalid="ignore"):
        return alpha(s) * 2.0 * np.log10(s[..., 0])


def nonfinite_count(sv: ArrayLike) -> Values:
    """Non-finite weights in the slice; filled in by the engine, which sees the weights."""
    return np.zeros(np.shape(sv)[:-1])


@dataclass(frozen=True)
class ParamSpec:
    """A metric parameter: its default and a check that returns an error text or ``None``."""

    default: float | int
    check: Callable[[object], str | None]


@dataclass(frozen=True, eq=False)
class MetricSpec:
    """A named metric: ``function(singular_values, **params)`` reducing the last axis.

    ``bad`` and ``compressible`` say what its values mean, for judging and for legends:
    ``bad`` is the side of its range that signals a problem (``"high"``, ``"low"``, ``"both"``,
    or ``None`` when neither does by itself); ``compressible`` is the side whose values mean
    the slice has low-rank structure, so that a value beyond a bound on that side (a ``max``
    for ``"high"``, a ``min`` for ``"low"``) makes the slice a pruning candidate, and one
    beyond a bound on the other side, a regression. ``None``: no side means compressible.
    """

    name: str
    function: Callable[..., Values]
    summary: str
    params: Mapping[str, ParamSpec] = field(default_factory=dict)
    #: the function takes ``context=MetricContext(...)`` (shape, storage dtype)
    needs_context: bool = False
    bad: Direction | None = None
    compressible: Literal["high", "low"] | None = None
    #: its values span orders of magnitude: maps and calibration show them in log10
    log_scale: bool = False


def _positive_int(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"must be a positive integer, got {value!r}"
    return None


def _fraction(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        return f"must be a number in (0, 1], got {value!r}"
    return None


_K = ParamSpec(10, _positive_int)  # number of singular values (clamped to the rank)
_P = ParamSpec(0.9, _fraction)  # energy fraction in (0, 1]

#: The built-in metrics. Low-rank structure (compressible) shows as a concentrated spectrum,
#: few effective directions or a large condition number.
METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            "top_k_ratio",
            top_k_ratio,
            "sum of the k largest sigma / sum of all",
            {"k": _K},
            bad="high",
            compressible="high",
        ),
        MetricSpec(
            "least_k_ratio",
            least_k_ratio,
            "sum of the k smallest sigma / sum of all",
            {"k": _K},
            bad="low",
            compressible="low",
        ),
        MetricSpec(
            "first_last_ratio",
            first_last_ratio,
            "sigma_max / sigma_min (condition number), floor-aware",
            needs_context=True,
            log_scale=True,
            bad="high",
            compressible="high",
        ),
        # Scale: growth signals divergence, shrinking towards 0 a dying slice.
        MetricSpec("spectral_norm", spectral_norm, "sigma_max", bad="both", log_scale=True),
        MetricSpec(
            "frobenius_norm", frobenius_norm, "sqrt(sum sigma^2)", bad="both", log_scale=True
        ),
        MetricSpec(
            "stable_rank", stable_rank, "sum sigma^2 / sigma_max^2", bad="low", compressible="low"
        ),
        MetricSpec(
            "effective_rank",
            effective_rank,
            "exp(entropy of sigma / sum sigma)",
            bad="low",
            compressible="low",
        ),
        MetricSpec(
            "energy_rank",
            energy_rank,
            "smallest r with sum sigma[:r]^2 >= p sum sigma^2",
            {"p": _P},
            bad="low",
            compressible="low",
        ),
        MetricSpec("nuclear_norm", nuclear_norm, "sum sigma", bad="both", log_scale=True),
        MetricSpec(
            "spectral_entropy",
            spectral_entropy,
            "entropy of sigma^2 shares / ln r",
            bad="low",
            compressible="low",
        ),
        MetricSpec(
            "participation_ratio",
            participation_ratio,
            "(sum s^2)^2 / sum s^4",
            bad="low",
            compressible="low",
        ),
        MetricSpec(
            "numerical_rank",
            numerical_rank,
            "#sigma > sigma_1 max(m,n) eps",
            needs_context=True,
            bad="low",
            compressible="low",
        ),
        # Few spikes: noise-like, untrained; a question of training, not of compression.
        MetricSpec(
            "gd_spikes", gd_spikes, "Gavish-Donoho spike count", needs_context=True, bad="low"
        ),
        MetricSpec(
            "mp_spikes", mp_spikes, "#sigma above the MP bulk edge", needs_context=True, bad="low"
        ),
        # WeightWatcher: alpha < 2 over-trained, > 6 under-trained.
        MetricSpec("alpha", alpha, "power-law exponent of the lambda tail", bad="both"),
        MetricSpec(
            "alpha_ks_distance", alpha_ks_distance, "KS distance of the alpha fit", bad="high"
        ),
        MetricSpec("alpha_xmin", alpha_xmin, "start of the fitted lambda tail"),
        MetricSpec("alpha_weighted", alpha_weighted, "alpha * log10(lambda_max)"),
        MetricSpec("nonfinite_count", nonfinite_count, "NaN/Inf weights in the slice", bad="high"),
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

    def compute(self, sv: ArrayLike, context: MetricContext | None = None) -> Values:
        params = dict(self.params)
        if self.spec.needs_context and context is not None:
            params["context"] = context
        return self.spec.function(sv, **params)


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
        *,
        bad: Direction | None = None,
        compressible: Literal["high", "low"] | None = None,
        **defaults: float | int,
    ) -> None:
        """Register ``function(singular_values, **params)`` as metric ``name``.

        It receives a float64 array whose last axis holds one slice's singular values in
        descending order (a whole layer's heads at once: shape ``[heads, r]``) and must return
        one value per slice (shape ``[heads]``). Keyword ``defaults`` declare its parameters,
        which rules may set like ``k`` of ``top_k_ratio``. ``bad`` and ``compressible`` are
        as in :class:`MetricSpec`: without ``compressible``, a rule on the metric suggests
        pruning only when it says ``suggest = "low_rank"`` (or ``"remove_head"``).

        Raises ``ValueError`` for a name that is no identifier or is taken, or a direction
        that is not ``"high"``, ``"low"`` (or ``"both"``, for ``bad``).
        """
        if not name.isidentifier():
            raise ValueError(f"metric name {name!r} must be an identifier")
        if name in self.specs:
            raise ValueError(f"metric {name!r} is already registered")
        if bad not in (None, "high", "low", "both"):
            raise ValueError(f"metric {name!r}: bad must be 'high', 'low' or 'both', got {bad!r}")
        if compressible not in (None, "high", "low"):
            raise ValueError(
                f"metric {name!r}: compressible must be 'high' or 'low', got {compressible!r}"
            )
        params = {key: ParamSpec(value, _number) for key, value in defaults.items()}
        self.specs[name] = MetricSpec(
            name, function, summary or name, params, bad=bad, compressible=compressible
        )

    def user_requests(self) -> tuple[MetricRequest, ...]:
        """Default requests of the metrics added on top of the built-in ones."""
        return tuple(request(spec) for name, spec in self.specs.items() if name not in METRICS)
