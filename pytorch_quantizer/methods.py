"""Clipping methods: a registry of small classes, each turning what the observers saw of a layer into a grid.

A method is one class with a ``name``, the observers it ``requires`` and ``clip`` (the clipping value alpha and
the MSE its model predicts); ``grid`` turns that into the quantization range with the seed's rule
(``clipping.aciq_range``) unless the method defines its own.  ``@register`` makes it a choice of ``-th``, a row of
the plan table, a column of the report and a value of the results CSV; nothing else needs to change::

    @register
    class Percentile99(ClippingMethod):
        name = "p99"
        def clip(self, obs, bits):
            ...
            return ClipDecision(self.name, alpha, predicted_mse)

The built-in entries are the seed's: ``no`` (the observed range), ``laplace`` and ``gaus`` (the analytical
optimum of the paper's MSE model for that prior), ``mix`` (the prior whose predicted MSE is smaller), and
``minmax`` (min of minima to max of maxima: the seed's rule for the classifier, never clipped); then
``laplace-grid`` and ``gaus-grid``, the same priors with the MSE model of the real GEMMLOWP grid.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import ClassVar

from .clipping import (
    MAX_BITS,
    PRIORS,
    SIGMA_ESTIMATORS,
    ClipDecision,
    TensorStats,
    aciq_range,
    check_bits,
    grid_clipping,
    no_clip_mse,
    prior_clipping,
    quantization_noise,
)
from .observers import Observation


@dataclass(frozen=True)
class Grid:
    """A layer's quantization grid: ``delta`` wide from ``offset``, the clipping value that produced it and the
    MSE the method's model predicts.  ``method`` is the rule actually applied: ``no`` when the clip would not cut
    into the observed range."""

    method: str
    alpha: float
    delta: float
    offset: float
    predicted_mse: float
    one_sided: bool = False


class ClippingMethod(ABC):
    """One way of choosing the clipping range of a layer from its observations and a bit width."""

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ("moments",)  # observer names (``observers.OBSERVERS``)
    summary: ClassVar[str] = ""  # one line for --help and the report

    def __init__(self, sigma_estimator: str = "range") -> None:
        if sigma_estimator not in SIGMA_ESTIMATORS:
            raise ValueError(
                f"unknown sigma estimator {sigma_estimator!r}: expected one of {', '.join(SIGMA_ESTIMATORS)}"
            )
        self.sigma_estimator = sigma_estimator

    @abstractmethod
    def clip(self, obs: Observation, bits: int) -> ClipDecision:
        """Alpha (0: no clipping) and the predicted MSE at ``bits``."""

    def clip_one_sided(self, obs: Observation, bits: int) -> ClipDecision:
        """alpha+ of a one-sided grid [0, alpha+] and its predicted MSE: by default the clip at ``bits + 1`` and
        half its MSE (the paper's model: ``clipping.optimal_alpha_half``); a method with its own half-grid model
        overrides it."""
        decision = self.clip(obs, min(bits + 1, MAX_BITS))
        return replace(decision, predicted_mse=decision.predicted_mse / 2.0)

    def grid(self, obs: Observation, bits: int, one_sided: bool = False, cap: float | None = None) -> Grid:
        """The seed's range rule around the layer's moments (``aciq_range``); ``one_sided`` for a layer whose
        output only feeds a ReLU (``cap``: ReLU6's 6), the follow-up's half range (``one_sided_grid``)."""
        bits = check_bits(bits)
        if one_sided:
            return one_sided_grid(self, obs, bits, cap)
        decision = self.clip(obs, bits)
        stats = obs.moments
        delta, offset = aciq_range(stats.min, stats.max, stats.mean, decision.alpha)
        method = decision.method if delta < stats.range else "no"
        return Grid(method, decision.alpha, delta, offset, decision.predicted_mse)


def one_sided_grid(method: ClippingMethod, obs: Observation, bits: int, cap: float | None) -> Grid:
    """The grid [0, min(max(mean, 0) + alpha+, max, cap)] of a ReLU-fed layer (the follow-up's "half range").

    Values below 0 are what the ReLU sets to 0, so the grid spends no level on them; the ReLU's cap (6 for ReLU6)
    and the observed maximum bound it from above.  alpha+ is ``method.clip_one_sided``: by default the method's
    clip at ``bits + 1``: for the paper's model the half-distribution MSE at M bits is half the two-sided MSE at
    M + 1 bits, so both have the same minimiser (``clipping.optimal_alpha_half`` derives it) and the predicted MSE
    is half of it; a method that is not model-based gets the same rule, a grid as fine as its two-sided one at one
    bit more.  (At 16 bits the clip is asked at 16: the grid is then finer than any float32 activation needs.)
    The exact-grid methods solve the one-sided grid's own model instead (``clipping.optimal_alpha_grid_half``)."""
    decision = method.clip_one_sided(obs, bits)
    stats = obs.moments
    ceiling = stats.max if cap is None else min(stats.max, cap)
    upper = ceiling if decision.alpha <= 0.0 else min(max(stats.mean, 0.0) + decision.alpha, ceiling)
    upper = max(upper, 0.0)
    name = decision.method if decision.alpha > 0.0 and upper < ceiling else "no"
    return Grid(name, decision.alpha, upper, 0.0, decision.predicted_mse, one_sided=True)


_REGISTRY: dict[str, type[ClippingMethod]] = {}


def register(cls: type[ClippingMethod]) -> type[ClippingMethod]:
    """Add a method to the registry under ``cls.name`` (a class decorator); a name is taken once."""
    name = getattr(cls, "name", "")
    if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ValueError(f"a clipping method needs a name of letters, digits, '_', '-', '.', got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"a clipping method named {name!r} is already registered ({_REGISTRY[name].__name__})")
    _REGISTRY[name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a registered method (for tests and plugins that add a method for one run)."""
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order (the seed's first)."""
    return tuple(_REGISTRY)


def get_method(name: str, sigma_estimator: str = "range") -> ClippingMethod:
    """The registered method ``name``, configured; an unknown name lists the known ones."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown clipping method {name!r}: expected one of {', '.join(_REGISTRY)}") from None
    return cls(sigma_estimator=sigma_estimator)


def required_observers(names: Iterable[str]) -> tuple[str, ...]:
    """The observers the given methods need, each once."""
    return tuple(dict.fromkeys(obs for name in names for obs in _REGISTRY[name].requires))


# -- the seed's methods --------------------------------------------------------------------------------------
@register
class NoClipping(ClippingMethod):
    name = "no"
    summary = "the observed range (mean of the per-sample min and max), no clipping"

    def clip(self, obs: Observation, bits: int) -> ClipDecision:
        return ClipDecision("no", 0.0, no_clip_mse(obs.moments, bits))


class _Prior(ClippingMethod):
    prior: ClassVar[str]

    def clip(self, obs: Observation, bits: int) -> ClipDecision:
        return prior_clipping(obs.moments, self.prior, bits, self.sigma_estimator)


@register
class Laplace(_Prior):
    name = prior = "laplace"
    summary = "ACIQ: alpha minimising the paper's MSE for a Laplace(b) prior"


@register
class Gauss(_Prior):
    name = prior = "gaus"
    summary = "ACIQ: alpha minimising the paper's MSE for a Gaussian(sigma) prior"


@register
class Mix(ClippingMethod):
    name = "mix"
    summary = "the prior (laplace or gaus) whose predicted MSE is smaller, per layer"

    def clip(self, obs: Observation, bits: int) -> ClipDecision:
        candidates = [prior_clipping(obs.moments, prior, bits, self.sigma_estimator) for prior in PRIORS]
        return min(candidates, key=lambda d: d.predicted_mse)


@register
class MinMax(ClippingMethod):
    name = "minmax"
    summary = "min of the per-sample minima to max of the maxima (the seed's classifier rule), no clipping"

    def clip(self, obs: Observation, bits: int) -> ClipDecision:
        lo, hi = obs.extreme
        return ClipDecision("minmax", 0.0, no_clip_mse(TensorStats(lo, hi, 0.0, 0.0, 0.0, obs.numel), bits))

    def grid(self, obs: Observation, bits: int, one_sided: bool = False, cap: float | None = None) -> Grid:
        lo, hi = obs.extreme
        if one_sided:
            hi = max(hi if cap is None else min(hi, cap), 0.0)
            # half the mass rounded with bins hi / 2**bits wide; the zeros are exact
            return Grid("minmax", 0.0, hi, 0.0, 0.5 * quantization_noise(hi / 2.0, check_bits(bits)), one_sided=True)
        return Grid("minmax", 0.0, hi - lo, lo, self.clip(obs, check_bits(bits)).predicted_mse)


class _GridPrior(ClippingMethod):
    """ACIQ with the MSE model of the grid GEMMLOWP uses (2**M levels, 2**M - 1 steps; ``clipping.mse_grid``).

    Named ``<prior>-grid`` rather than "exact": the grid is modelled exactly, the tensor still only by its prior."""

    prior: ClassVar[str]

    def clip(self, obs: Observation, bits: int) -> ClipDecision:
        return grid_clipping(obs.moments, self.prior, bits, self.sigma_estimator)

    def clip_one_sided(self, obs: Observation, bits: int) -> ClipDecision:
        return grid_clipping(obs.moments, self.prior, bits, self.sigma_estimator, one_sided=True)


@register
class LaplaceGrid(_GridPrior):
    prior = "laplace"
    name = "laplace-grid"
    summary = "ACIQ for the real grid: alpha minimising the exact MSE of 2^M levels (2^M - 1 steps), Laplace(b) prior"


@register
class GaussGrid(_GridPrior):
    prior = "gaus"
    name = "gaus-grid"
    summary = "ACIQ for the real grid: alpha minimising the exact MSE of 2^M levels (2^M - 1 steps), Gaussian prior"


def choose_clipping(stats: TensorStats, method: str, bits: int, sigma_estimator: str = "range") -> ClipDecision:
    """Alpha and predicted MSE of a registered method for the moments ``stats`` (the library's one-call form)."""
    return get_method(method, sigma_estimator).clip(Observation.of_moments(stats), check_bits(bits))
