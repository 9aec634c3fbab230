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
optimum of the paper's MSE model for that prior), ``mix`` (the prior whose *predicted* MSE is smaller), and
``minmax`` (min of minima to max of maxima: the seed's rule for the classifier, never clipped); then
``laplace-grid`` and ``gaus-grid``, the same priors with the MSE model of the real GEMMLOWP grid; and the
calibrators of other tools, searched on the layer's histogram (``searches``): ``kld`` (TensorRT's entropy
calibration), ``mse`` (the range of smallest measured MSE), ``mix-measured`` (the follow-up's mix: of no / laplace /
gaus, the grid whose *measured* MSE is smallest), and two families, ``pP`` (percentile) and ``Nstd`` (mean +- N
std).  A family is a pattern plus a factory (``register_family``): ``get_method("p99.9")`` builds its member.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import ClassVar

from .clipping import (
    MAX_BITS,
    PRIORS,
    SIGMA_ESTIMATORS,
    ClipDecision,
    Slab,
    TensorStats,
    aciq_range,
    allocated_clip,
    check_bits,
    grid_clipping,
    no_clip_mse,
    prior_clipping,
    quantization_noise,
    slab_fit,
    slab_mse,
    slab_upper,
)
from .observers import Histogram, Observation, PositivePart
from .searches import (
    Range,
    kld_range,
    kld_upper,
    measured_mse,
    mse_range,
    mse_upper,
    percentile_range,
    percentile_upper,
)


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


@dataclass(frozen=True)
class Family:
    """Methods named by a pattern (``p99.9``, ``3std``): ``factory(match)`` builds the member's class (or raises
    ValueError for a parameter out of range); ``examples`` are listed with the plain names."""

    pattern: re.Pattern[str]
    factory: Callable[[re.Match[str]], type[ClippingMethod]]
    examples: tuple[str, ...]
    syntax: str  # how the names are written, for error messages and --help: "pP (0 < P <= 100)"


DOUBLE_DIGITS = 17  # significant decimal digits that identify a double (IEEE 754 binary64)
_FAMILIES: list[Family] = []
_MEMBERS: dict[str, type[ClippingMethod]] = {}


def register(cls: type[ClippingMethod]) -> type[ClippingMethod]:
    """Add a method to the registry under ``cls.name`` (a class decorator); a name is taken once."""
    name = getattr(cls, "name", "")
    if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ValueError(f"a clipping method needs a name of letters, digits, '_', '-', '.', got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"a clipping method named {name!r} is already registered ({_REGISTRY[name].__name__})")
    _REGISTRY[name] = cls
    return cls


def register_family(pattern: str, factory: Callable[[re.Match[str]], type[ClippingMethod]],
                    examples: Iterable[str], syntax: str) -> None:
    """Add a parametric family: any name that ``pattern`` matches in full is a method, built by ``factory``."""
    family = Family(re.compile(pattern), factory, tuple(examples), syntax)
    for example in family.examples:
        if not family.pattern.fullmatch(example):
            raise ValueError(f"example {example!r} does not match the family's pattern {pattern!r}")
    _FAMILIES.append(family)


def unregister(name: str) -> None:
    """Remove a registered method (for tests and plugins that add a method for one run)."""
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order (the seed's first), then an example of each family."""
    return (*_REGISTRY, *(e for family in _FAMILIES for e in family.examples if e not in _REGISTRY))


def _known() -> str:
    return ", ".join([*_REGISTRY, *(family.syntax for family in _FAMILIES)])


def method_class(name: str) -> type[ClippingMethod]:
    """The class of method ``name``: registered, or a family's member; an unknown name lists the known ones."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name not in _MEMBERS:
        for family in _FAMILIES:
            match = family.pattern.fullmatch(name)
            if match:
                _MEMBERS[name] = family.factory(match)
                break
        else:
            raise ValueError(f"unknown clipping method {name!r}: expected one of {_known()}")
    return _MEMBERS[name]


def get_method(name: str, sigma_estimator: str = "range") -> ClippingMethod:
    """The method ``name`` (registered, or a family's member), configured."""
    return method_class(name)(sigma_estimator=sigma_estimator)


def required_observers(names: Iterable[str]) -> tuple[str, ...]:
    """The observers the given methods need, each once."""
    return tuple(dict.fromkeys(obs for name in names for obs in method_class(name).requires))


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
    summary = "the prior (laplace or gaus) whose predicted MSE (the paper's model) is smaller, per layer"

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


# -- what a ReLU lets through ---------------------------------------------------------------------------------
@register
class SpikeAndSlab(ClippingMethod):
    """What a ReLU lets through, modelled as a spike at 0 and an exponential slab (``clipping.Slab``), fitted to
    E[max(x, 0)] and E[max(x, 0)^2] (the ``positive`` observer), clipped at ``clipping.slab_upper``.

    It applies where the grid starts at 0: a one-sided grid (``-hr`` on a ReLU-fed layer, or a non-negative
    input) and any tensor never observed below 0.  A tensor with negative values on a two-sided grid is not a
    spike and slab: it gets the seed's Laplace rule, and the plan names it ``laplace``."""

    name = "slab"
    requires = ("moments", "positive")
    summary = "spike-and-slab clip of what a ReLU lets through: U = s W(12 L^2), s from E[x+] and E[x+^2]"

    def fit(self, obs: Observation) -> Slab:
        """The spike and slab of ``obs``'s positive part (``clipping.slab_fit``)."""
        part = obs.extra.get("positive")
        if not isinstance(part, PositivePart):
            raise ValueError("the slab method needs the positive-part moments of each tensor it clips (of each "
                             "channel with -pcq_a); collect them again with -sm collect (-pcq_a)")
        return slab_fit(part.mean, part.mean_sq)

    def clip(self, obs: Observation, bits: int) -> ClipDecision:
        if obs.moments.min < 0.0:
            return prior_clipping(obs.moments, "laplace", bits, self.sigma_estimator)
        return self.clip_one_sided(obs, bits)

    def clip_one_sided(self, obs: Observation, bits: int) -> ClipDecision:
        return self._clip_levels(obs, float(2 ** check_bits(bits)))

    def _clip_levels(self, obs: Observation, levels: float) -> ClipDecision:
        slab = self.fit(obs)
        upper = slab.s * slab_upper(levels)
        return ClipDecision(self.name, upper, slab_mse(upper, slab, levels))

    def grid(self, obs: Observation, bits: int, one_sided: bool = False, cap: float | None = None) -> Grid:
        """[0, min(U, max, cap)]; the seed's Laplace grid for a signed tensor on a two-sided grid."""
        return self.levels_grid(obs, float(2 ** check_bits(bits)), one_sided, cap)

    def levels_grid(self, obs: Observation, levels: float, one_sided: bool = False, cap: float | None = None
                    ) -> Grid:
        """``grid`` for ``levels`` bins (bit allocation gives a channel any count); a signed tensor on a two-sided
        grid gets the Laplace clip for as many bins (``clipping.allocated_clip``)."""
        if not one_sided and obs.moments.min < 0.0:
            stats = obs.moments
            alpha, predicted = allocated_clip("laplace", stats.b, levels)
            delta, offset = aciq_range(stats.min, stats.max, stats.mean, alpha)
            return Grid("laplace" if delta < stats.range else "no", alpha, delta, offset, predicted)
        decision = self._clip_levels(obs, levels)
        ceiling = max(obs.moments.max if cap is None else min(obs.moments.max, cap), 0.0)
        upper = min(decision.alpha, ceiling)
        name = self.name if upper < ceiling else "no"
        return Grid(name, decision.alpha, upper, 0.0, decision.predicted_mse, one_sided=True)


# -- searched on the measured histogram ---------------------------------------------------------------------
def histogram_of(obs: Observation, why: str) -> Histogram:
    """The layer's histogram, or a one-line error naming what to collect."""
    hist = obs.extra.get("histogram")
    if hist is None:
        raise ValueError(f"{why} needs the histogram observer, which these statistics lack; collect them again "
                         "with -sm collect")
    return hist


def relu_target(hist: Histogram, cap: float | None) -> tuple[Histogram, float]:
    """What a one-sided grid [0, hi] is measured against: the histogram of ``clamp(x, 0, ceiling)`` (the ReLU
    sends the negatives to 0, ReLU6 caps at 6; so does a grid [0, hi <= cap]), and ``ceiling = min(max, cap)``."""
    ceiling = max(hist.max if cap is None else min(hist.max, cap), 0.0)
    return hist.clamped(0.0, ceiling), ceiling


def grid_mse(target: Histogram, grid: Grid, bits: int) -> float:
    """The measured MSE of ``grid`` on ``target``; a grid of width 0 passes values unchanged (no error)."""
    if grid.delta <= 0.0:
        return 0.0
    return float(measured_mse(target, grid.offset, grid.offset + grid.delta, bits)[0])


class GridFirst(ClippingMethod):
    """A method that computes its grid directly; ``clip`` reports the two-sided grid's alpha (half its width)."""

    def clip(self, obs: Observation, bits: int) -> ClipDecision:
        grid = self.grid(obs, bits)
        return ClipDecision(grid.method, grid.alpha, grid.predicted_mse)


class HistogramMethod(GridFirst):
    """A range searched on the layer's histogram (``searches``): ``search`` for a two-sided grid, ``search_upper``
    for a one-sided one (measured against the ReLU's output, ``relu_target``); by default the pair of functions
    ``searches``.  The grid's ``predicted_mse`` is its *measured* MSE on the histogram.  A constant histogram is
    not clipped (its grid has width 0: the layer passes unchanged, as with ``no``)."""

    requires: ClassVar[tuple[str, ...]] = ("moments", "histogram")
    searches: ClassVar[tuple[Callable[[Histogram, int], Range], Callable[[Histogram, int], Range]]]

    def search(self, hist: Histogram, bits: int) -> Range:
        return self.searches[0](hist, bits)

    def search_upper(self, hist: Histogram, bits: int) -> Range:
        return self.searches[1](hist, bits)

    def grid(self, obs: Observation, bits: int, one_sided: bool = False, cap: float | None = None) -> Grid:
        bits = check_bits(bits)
        hist = histogram_of(obs, f"clipping method {self.name!r}")
        if one_sided:
            target, ceiling = relu_target(hist, cap)
            found = self.search_upper(target, bits)
            hi = min(max(found.hi, 0.0), ceiling)
            grid = Grid(self.name if hi < ceiling else "no", hi, hi, 0.0, 0.0, one_sided=True)
            return replace(grid, predicted_mse=grid_mse(target, grid, bits))
        found = self.search(hist, bits)
        lo, hi = max(found.lo, hist.min), min(found.hi, hist.max)
        name = self.name if lo > hist.min or hi < hist.max else "no"
        grid = Grid(name, (hi - lo) / 2.0, hi - lo, lo, 0.0)
        return replace(grid, predicted_mse=grid_mse(hist, grid, bits))


@register
class MeasuredMse(HistogramMethod):
    name = "mse"
    summary = "the range whose measured quantization MSE on the calibration histogram is smallest (searched)"
    searches = (mse_range, mse_upper)


@register
class Entropy(HistogramMethod):
    name = "kld"
    summary = "TensorRT's entropy calibration on the asymmetric grid: the range minimising KL(P || Q)"
    searches = (kld_range, kld_upper)


@register
class MeasuredMix(GridFirst):
    """The follow-up's mix: per layer, of ``no``, ``laplace`` and ``gaus``, the grid (each method's own rule,
    one-sided where the layer is) whose *measured* MSE on the calibration histogram is smallest; ties go to the
    first of that order.  (``mix`` compares the paper model's *predicted* MSEs of laplace and gaus instead.)"""

    name = "mix-measured"
    requires = ("moments", "histogram")
    summary = "of no / laplace / gaus, the grid whose measured MSE on the calibration histogram is smallest"
    candidates: ClassVar[tuple[str, ...]] = ("no", "laplace", "gaus")

    def grid(self, obs: Observation, bits: int, one_sided: bool = False, cap: float | None = None) -> Grid:
        bits = check_bits(bits)
        hist = histogram_of(obs, f"clipping method {self.name!r}")
        target = relu_target(hist, cap)[0] if one_sided else hist
        grids = [get_method(name, self.sigma_estimator).grid(obs, bits, one_sided, cap) for name in self.candidates]
        measured = [replace(g, predicted_mse=grid_mse(target, g, bits)) for g in grids]
        return min(measured, key=lambda g: g.predicted_mse)


class Percentile(HistogramMethod):
    """``pP``: the range holding the central P % of the calibration values (a share 1 - P/100 is clipped, half off
    each tail); on a one-sided grid the P % quantile of the ReLU's output (the zeros count), all clipped off the
    top.  ``p100`` is the observed range."""

    percent: ClassVar[float] = 100.0
    summary = "percentile: the central P % of the calibration values (half of the rest clipped off each tail)"

    def search(self, hist: Histogram, bits: int) -> Range:
        return Range(*percentile_range(hist, self.percent), math.nan)

    def search_upper(self, hist: Histogram, bits: int) -> Range:
        return Range(0.0, percentile_upper(hist, self.percent), math.nan)


def _family_number(match: re.Match[str]) -> float:
    """A family's number (the P of ``pP``, the N of ``Nstd``), refused when written with more digits than a
    double's 17 significant ones: ``p99.99...9`` with 300 nines would silently read as ``p100``, and the name,
    which goes into file names, would be too long for the file system."""
    text = match.group(1)
    digits = len(text.replace(".", ""))
    if digits > DOUBLE_DIGITS:
        name = match.group(0)
        shown = name if len(name) <= 24 else f"{name[:20]}... ({len(name)} characters)"
        raise ValueError(f"clipping method {shown}: its number is written with {digits} digits, more than the "
                         f"{DOUBLE_DIGITS} significant digits a double holds; write it with fewer")
    return float(text)


def _percentile(match: re.Match[str]) -> type[ClippingMethod]:
    percent = _family_number(match)
    if not 0.0 < percent <= 100.0:
        raise ValueError(f"clipping method {match.group(0)!r}: the percentile must be in (0, 100], "
                         f"got {match.group(1)}")
    return type(f"Percentile_{match.group(0)}", (Percentile,), {"name": match.group(0), "percent": percent})


class StdRange(ClippingMethod):
    """``Nstd``: the follow-up's baseline, the range mean +- N std (the moments' mean over samples) cut to the
    observed range (min and max as ``no`` takes them); one-sided [0, min(max(mean, 0) + N std, max, cap)].
    Moments only; the predicted MSE is the grid's rounding noise alone (no clipping model)."""

    stds: ClassVar[float] = 3.0
    summary = "mean +- N std of the calibration moments, cut to the observed range (the follow-up's baseline)"

    def clip(self, obs: Observation, bits: int) -> ClipDecision:
        alpha = self.stds * obs.moments.std
        return ClipDecision(self.name, alpha, quantization_noise(alpha, check_bits(bits)))

    def grid(self, obs: Observation, bits: int, one_sided: bool = False, cap: float | None = None) -> Grid:
        bits = check_bits(bits)
        if one_sided:
            return one_sided_grid(self, obs, bits, cap)
        stats, alpha = obs.moments, self.stds * obs.moments.std
        lo, hi = max(stats.min, stats.mean - alpha), min(stats.max, stats.mean + alpha)
        name = self.name if alpha > 0.0 and (lo > stats.min or hi < stats.max) else "no"
        if alpha <= 0.0:
            lo, hi = stats.min, stats.max
        return Grid(name, alpha, hi - lo, lo, quantization_noise((hi - lo) / 2.0, bits))


def _std_range(match: re.Match[str]) -> type[ClippingMethod]:
    stds = _family_number(match)
    if not stds > 0.0:
        raise ValueError(f"clipping method {match.group(0)!r}: N in Nstd must be > 0, got {match.group(1)}")
    return type(f"StdRange_{match.group(0)}", (StdRange,), {"name": match.group(0), "stds": stds})


register_family(r"p(\d+(?:\.\d*)?|\.\d+)", _percentile, ("p99.99",), "pP (percentile, 0 < P <= 100, e.g. p99.99)")
register_family(r"(\d+(?:\.\d*)?|\.\d+)std", _std_range, ("2std",), "Nstd (mean +- N std, N > 0, e.g. 2std)")


def choose_clipping(stats: TensorStats, method: str, bits: int, sigma_estimator: str = "range") -> ClipDecision:
    """Alpha and predicted MSE of a registered method for the moments ``stats`` (the library's one-call form)."""
    return get_method(method, sigma_estimator).clip(Observation.of_moments(stats), check_bits(bits))
