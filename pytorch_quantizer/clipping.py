"""The ACIQ math: expected clipping + quantization MSE, the optimal clipping value, estimators and the range rule.

Everything here is a small pure function of floats so that the CLI, the notebook, the report and the
tests all call the same code.  Notation follows the paper (Banner et al.): a tensor is modelled as
Laplace(0, b) or N(0, sigma^2), clipped to [-alpha, alpha] and quantized uniformly with 2**bits levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy import optimize, special

PRIORS = ("laplace", "gaus")
SIGMA_ESTIMATORS = ("range", "std")
MIN_BITS, MAX_BITS = 1, 16


def check_bits(bits: int) -> int:
    """Return ``bits`` as an int, or raise ValueError when it is not a whole number in 1..16."""
    if isinstance(bits, bool) or not float(bits).is_integer() or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return int(bits)


def check_prior(prior: str) -> str:
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}: expected one of {', '.join(PRIORS)}")
    return prior


def quantization_noise(alpha: float, bits: int) -> float:
    """Rounding noise of 2**bits uniform bins over [-alpha, alpha]: alpha^2 / (3 * 4^bits)."""
    return alpha**2 / (3.0 * 4.0 ** check_bits(bits))


def clipping_noise_laplace(alpha: float, b: float) -> float:
    """E[(|x| - alpha)^2; |x| > alpha] for x ~ Laplace(0, b); 0 for b = 0 (a constant channel has no tail, the
    limit b -> 0)."""
    return 2.0 * b**2 * math.exp(-alpha / b) if b > 0 else 0.0


def clipping_noise_gaus(alpha: float, sigma: float) -> float:
    """E[(|x| - alpha)^2; |x| > alpha] for x ~ N(0, sigma^2); 0 for sigma = 0 (the limit)."""
    if sigma <= 0:
        return 0.0
    tail = 1.0 - math.erf(alpha / (sigma * math.sqrt(2.0)))
    return (sigma**2 + alpha**2) * tail - math.sqrt(2.0 / math.pi) * alpha * sigma * math.exp(
        -(alpha**2) / (2.0 * sigma**2)
    )


def mse_laplace(alpha: float, b: float, bits: int) -> float:
    """Expected MSE of clipping Laplace(0, b) at +-alpha and quantizing to 2**bits levels (paper eq. 5)."""
    return clipping_noise_laplace(alpha, b) + quantization_noise(alpha, bits)


def mse_gaus(alpha: float, sigma: float, bits: int) -> float:
    """Expected MSE of clipping N(0, sigma^2) at +-alpha and quantizing to 2**bits levels (paper eq. 8)."""
    return clipping_noise_gaus(alpha, sigma) + quantization_noise(alpha, bits)


def clipping_noise(prior: str, alpha: float, scale: float) -> float:
    """``clipping_noise_laplace`` or ``clipping_noise_gaus`` by name; ``scale`` is b or sigma."""
    return (clipping_noise_laplace if check_prior(prior) == "laplace" else clipping_noise_gaus)(alpha, scale)


def mse(prior: str, alpha: float, scale: float, bits: int) -> float:
    """``mse_laplace`` or ``mse_gaus`` by name; ``scale`` is b or sigma."""
    return clipping_noise(prior, alpha, scale) + quantization_noise(alpha, bits)


def optimal_alpha(prior: str, bits: int) -> float:
    """The alpha minimising the expected MSE for unit scale (b = 1 or sigma = 1) at ``bits`` (2**bits bins).

    The MSE is linear-in-scale-squared, so the optimum for scale s is ``s * optimal_alpha(prior, bits)``.
    The derivative has no closed-form root; it is bracketed and solved with Brent's method.
    """
    check_prior(prior)
    return optimal_alpha_for_bins(prior, float(2 ** check_bits(bits)))


def optimal_alpha_half(prior: str, bits: int) -> float:
    """alpha+ for unit scale: the clipping value of a one-sided grid [0, alpha] with 2**bits bins, for a tensor
    whose negative half a ReLU sends to 0 (the follow-up's "half range").

    Derivation (the paper's model, x ~ Laplace(0, b) or N(0, sigma^2) before the ReLU, y = max(x, 0)): the negative
    half becomes 0, which is on the grid, so it costs nothing.  The positive half is clipped at alpha, costing
    C(alpha) = E[(x - alpha)^2; x > alpha], half of the two-sided clipping term 2 C(alpha); and its mass, 1/2, is
    rounded with bins of width alpha / 2**M, costing (alpha / 2**M)^2 / 12 each.  So

        MSE+(alpha; M) = C(alpha) + 1/2 (alpha / 2**M)^2 / 12
                       = 1/2 [2 C(alpha) + (2 alpha / 2**(M+1))^2 / 12] = 1/2 MSE(alpha; M + 1),

    half the two-sided MSE at M + 1 bits: the same minimiser, alpha+(M) = alpha*(M + 1).  A one-sided grid of M
    bits resolves as finely as a two-sided one of M + 1 bits, which is why it recovers most of what the seed's
    two-sided grid spends on values the ReLU discards.
    """
    check_prior(prior)
    return optimal_alpha_for_bins(prior, float(2 ** (check_bits(bits) + 1)))


@cache
def optimal_alpha_for_bins(prior: str, bins: float) -> float:
    """The alpha minimising clipping noise + (2 alpha / bins)^2 / 12 for unit scale, ``bins`` >= 2 uniform bins over
    [-alpha, alpha] (any real number: bit allocation gives channels non-power-of-two level counts)."""
    check_prior(prior)
    if not bins >= 2.0 or not math.isfinite(bins):
        raise ValueError(f"the number of bins must be a finite number >= 2, got {bins!r}")
    bins_sq = bins * bins
    if prior == "laplace":
        # d/da [2 e^-a + a^2 / (3 L^2)] = -2 e^-a + 2a / (3 L^2), with L = 2**M bins the paper's 4^M
        def grad(a: float) -> float:
            return -2.0 * math.exp(-a) + 2.0 * a / (3.0 * bins_sq)

        upper = 64.0
    else:
        # d/da of the Gaussian MSE: 2a (1 - erf(a/sqrt2)) - 2 sqrt(2/pi) e^{-a^2/2} + 2a / (3 L^2)
        def grad(a: float) -> float:
            return (
                2.0 * a * special.erfc(a / math.sqrt(2.0))
                - 2.0 * math.sqrt(2.0 / math.pi) * math.exp(-(a**2) / 2.0)
                + 2.0 * a / (3.0 * bins_sq)
            )

        upper = 16.0
    return float(optimize.brentq(grad, 1e-9, upper, xtol=1e-12, rtol=1e-14))


# -- the MSE model of the grid GEMMLOWP actually uses ------------------------------------------------------------
# Gauss-Legendre nodes on [-1, 1]: within one cell the rounding error is (x - level)^2 times a density that is
# analytic there (each cell is split at 0, the Laplace kink), so 8 nodes (exact to degree 15) integrate it to
# ~1e-12 relative even for the widest cell used (2 alpha at 1 bit); above 256 levels the cells are narrower than
# 0.1 (unit scale) and 4 nodes do as well at half the cost.
_RULES = {n: np.polynomial.legendre.leggauss(n) for n in (4, 8)}


def _unit_density(prior: str, x: np.ndarray) -> np.ndarray:
    if prior == "laplace":
        return 0.5 * np.exp(-np.abs(x))
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _rounding_noise(prior: str, lo: float, step: float, levels: int) -> float:
    """E[(x - q(x))^2; lo <= x <= hi] for unit-scale x, q rounding to the nearest of ``levels`` levels lo + k step,
    hi = lo + (levels - 1) step: level k owns [c_k - step/2, c_k + step/2] cut to [lo, hi] (the end levels own half
    cells), each piece split at 0 and integrated by Gauss-Legendre in local coordinates (no cancellation when the
    cells are narrow: the sum of per-cell moments would lose it at 16 bits)."""
    nodes, weights = _RULES[8 if levels <= 256 else 4]
    centres = lo + step * np.arange(levels, dtype=np.float64)
    hi = lo + step * (levels - 1)
    a = np.maximum(centres - step / 2.0, lo)
    b = np.minimum(centres + step / 2.0, hi)
    total = 0.0
    for left, right in ((a, np.minimum(b, 0.0)), (np.maximum(a, 0.0), b)):
        half = np.maximum(right - left, 0.0) / 2.0
        mid_err = (left + right) / 2.0 - centres  # the piece's midpoint relative to its level
        x = ((left + right) / 2.0)[:, None] + half[:, None] * nodes
        err = mid_err[:, None] + half[:, None] * nodes
        total += float(np.sum(half * ((err * err * _unit_density(prior, x)) @ weights)))
    return total


def check_levels(levels: int) -> int:
    """``levels`` as an int >= 2 (a grid of 2**bits levels; bit allocation may ask for others)."""
    if isinstance(levels, bool) or not float(levels).is_integer() or levels < 2:
        raise ValueError(f"the number of grid levels must be an integer >= 2, got {levels!r}")
    return int(levels)


def _grid_mse_unit(prior: str, alpha: float, levels: int, one_sided: bool) -> float:
    if alpha <= 0.0:
        return math.inf
    if one_sided:  # ReLU(x) on [0, alpha]: one tail; the negative half sits exactly on level 0
        return 0.5 * clipping_noise(prior, alpha, 1.0) + _rounding_noise(prior, 0.0, alpha / (levels - 1), levels)
    return clipping_noise(prior, alpha, 1.0) + _rounding_noise(prior, -alpha, 2.0 * alpha / (levels - 1), levels)


def mse_grid(prior: str, alpha: float, scale: float, bits: int) -> float:
    """Expected MSE of x ~ Laplace(0, b) / N(0, sigma^2) (``scale`` b or sigma) on GEMMLOWP's symmetric grid of
    2**bits levels over [-alpha, alpha] (2**bits - 1 steps, round to nearest, clamp).  See ``optimal_alpha_grid``."""
    check_prior(prior)
    levels = 2 ** check_bits(bits)
    if scale <= 0.0:
        return 0.0
    return scale * scale * _grid_mse_unit(prior, alpha / scale, levels, one_sided=False)


def mse_grid_half(prior: str, alpha: float, scale: float, bits: int) -> float:
    """Expected MSE of ReLU(x), x ~ prior(0, scale), on the one-sided grid of 2**bits levels over [0, alpha]
    (2**bits - 1 steps of alpha / (2**bits - 1)), over all elements (the zeros count, at no cost)."""
    check_prior(prior)
    levels = 2 ** check_bits(bits)
    if scale <= 0.0:
        return 0.0
    return scale * scale * _grid_mse_unit(prior, alpha / scale, levels, one_sided=True)


@cache
def optimal_alpha_for_levels(prior: str, levels: int, one_sided: bool = False) -> float:
    """The unit-scale alpha minimising ``mse_grid`` (or ``mse_grid_half``) for a grid of ``levels`` levels.

    The exact MSE is a smooth function of alpha whose minimum lies below the paper-model alpha for as many bins
    (wider steps cost more rounding noise, so less range pays): it is scanned on 49 points over 0.25 to 1.05 times
    that alpha (17 points over 0.9 to 1.01 above 256 levels, where the two are within 0.1 %), then refined with
    bounded Brent around the best point.  The minimiser is interior (checked).  About 0.05 s at 8 bits, 2 s at 16."""
    check_prior(prior)
    levels = check_levels(levels)
    paper = optimal_alpha_for_bins(prior, float(2 * levels if one_sided else levels))
    grid = np.linspace(0.25 * paper, 1.05 * paper, 49) if levels <= 256 else np.linspace(0.9 * paper, 1.01 * paper, 17)
    values = [_grid_mse_unit(prior, float(a), levels, one_sided) for a in grid]
    best = int(np.argmin(values))
    if best in (0, len(grid) - 1):
        raise RuntimeError(f"the exact-grid optimum for {prior}, {levels} levels is outside the scanned range")
    result = optimize.minimize_scalar(
        lambda a: _grid_mse_unit(prior, a, levels, one_sided),
        bounds=(float(grid[best - 1]), float(grid[best + 1])),
        method="bounded",
        options={"xatol": 1e-10 * paper},
    )
    return float(result.x)


def optimal_alpha_grid(prior: str, bits: int) -> float:
    """alpha for unit scale minimising the MSE of the grid GEMMLOWP uses: 2**M levels over [-alpha, alpha].

    Derivation (x ~ Laplace(0, 1) or N(0, 1), density p; the scale s multiplies alpha and s^2 the MSE, as in the
    paper).  The levels are c_k = -alpha + k Delta, k = 0 .. L - 1, L = 2**M, with L - 1 steps
    Delta = 2 alpha / (L - 1) (the paper's model has L bins of 2 alpha / L).  Rounding to nearest after clamping
    into [-alpha, alpha] gives, exactly,

        MSE(alpha) = 2 C(alpha) + sum_k int_{cell k} (x - c_k)^2 p(x) dx,

    cell k = [c_k - Delta/2, c_k + Delta/2] cut to [-alpha, alpha] (the two end levels own half cells).  The first
    term is the paper's clipping term unchanged (the same tail integral, values beyond +-alpha land on +-alpha).
    If p were flat within each cell the sum would be Delta^2 / 12 times the in-range mass P(|x| <= alpha): the
    quantization term of the paper's model, alpha^2 / (3 4^M), uses L bins instead of L - 1 steps and the whole
    mass (no in-range weighting).  This model weights by the in-range probability *and* keeps the density's shape
    inside each cell: the sum is integrated numerically (``_rounding_noise``).  Both matter at 2 bits: the steps
    are 4/3 as wide (1.78x the noise); the end half cells hold mass that piles up at their inner edge, farthest
    from +-alpha; for Laplace the peak at 0 sits on a decision boundary, the largest rounding error.  From 5 bits
    on the flat-cell form is within about 1 % of the integral.

    The grid modelled is the inference range rule's centred case (``aciq_range``: [mean - alpha, mean + alpha] when
    that lies inside [min, max]) for a distribution symmetric about its mean, without ``-pz`` (which moves the grid
    by up to half a step so that 0 is a level) and without power-of-two scales.  When the observed minimum cuts in
    (mean - alpha < min) the rule shifts the grid to [min, min + 2 alpha]: the prior no longer describes the
    tensor there (typically a ReLU output), which is what the one-sided grid (``optimal_alpha_grid_half``) is for.
    """
    return optimal_alpha_for_levels(prior, 2 ** check_bits(bits))


def optimal_alpha_grid_half(prior: str, bits: int) -> float:
    """alpha+ for unit scale minimising the MSE of ReLU(x) on the one-sided grid [0, alpha+] of 2**M levels.

    The levels are k Delta, Delta = alpha / (L - 1), L = 2**M.  Of x ~ prior(0, 1) (centred at 0 before the ReLU,
    as ``optimal_alpha_half`` assumes) the negative half becomes 0, a level: no error.  The positive half costs
    C(alpha) (one tail) plus its rounding noise on [0, alpha], integrated exactly as in ``optimal_alpha_grid``
    (the cell [0, Delta/2] of level 0 is a half cell).  The paper-model shortcut (``optimal_alpha_half``: the
    two-sided optimum at M + 1 bits) stands for 2**(M+1) bins of 2 alpha / 2**(M+1) = alpha / 2**M; the real
    one-sided grid has steps alpha / (2**M - 1), and the two-sided exact grid at M + 1 bits has
    2 alpha / (2**(M+1) - 1) = alpha / (2**M - 1/2): neither equals it, so the half alpha is solved on its own.
    """
    return optimal_alpha_for_levels(prior, 2 ** check_bits(bits), one_sided=True)


@dataclass(frozen=True)
class Slab:
    """A spike-and-slab model of what a ReLU lets through: y = max(x, 0) is 0 with probability 1 - p (the spike,
    exactly on the grid's 0) and, with probability p, exponential with scale s (the slab).

    Fitted from the first two moments of y alone (``slab_fit``), so it needs no assumption about x below 0: a
    channel that fires on a few images has a small p and its own s, where a prior fitted to x (its mean and
    spread, dominated by the negative part) puts the clip in the wrong place."""

    s: float
    p: float


def slab_fit(mean_pos: float, mean_pos_sq: float) -> Slab:
    """The spike and slab with E[y] = p s and E[y^2] = 2 p s^2 (an exponential's second moment is 2 s^2):
    s = E[y^2] / (2 E[y]) and p = 2 E[y]^2 / E[y^2].  A slab lighter-tailed than the exponential (p > 1) keeps s
    and p = 1: the fitted s is then the scale whose exponential has the observed second moment per firing value."""
    if not (mean_pos > 0.0 and mean_pos_sq > 0.0):
        return Slab(0.0, 0.0)
    s = mean_pos_sq / (2.0 * mean_pos)
    return Slab(s, min(1.0, 2.0 * mean_pos * mean_pos / mean_pos_sq))


@cache
def slab_upper(levels: float) -> float:
    """U / s minimising the spike-and-slab's MSE on the one-sided grid [0, U] of ``levels`` bins.

    Derivation: the spike sits on the grid's 0 and costs nothing.  The slab's values below U are rounded with bins
    U / L wide, (U / L)^2 / 12 each; above U they are clipped, E[(y - U)^2; y > U] = 2 s^2 exp(-U / s) for an
    exponential.  So MSE(U) = p [U^2 / (12 L^2) + 2 s^2 exp(-U / s)] and dMSE/dU = 0 gives
    (U / s) exp(U / s) = 12 L^2, i.e. U = s W(12 L^2) with W Lambert's function (its principal branch: the
    argument is positive).  p multiplies the MSE and leaves the minimiser alone.  With L = 2^M this is the
    half-range Laplace rule's alpha at M + 1 bits (``optimal_alpha_half``: a e^a = 3 * 4^(M+1)), now measured
    from 0 with s the slab's own scale."""
    if not levels >= 1.0 or not math.isfinite(levels):
        raise ValueError(f"the number of bins must be a finite number >= 1, got {levels!r}")
    return float(special.lambertw(12.0 * levels * levels).real)


def slab_mse(upper: float, slab: Slab, levels: float) -> float:
    """The spike-and-slab's expected MSE on the one-sided grid [0, upper] of ``levels`` bins (``slab_upper``)."""
    if slab.s <= 0.0:
        return 0.0
    return slab.p * (upper**2 / (12.0 * levels * levels) + 2.0 * slab.s**2 * math.exp(-upper / slab.s))


def laplace_b(mean_abs_deviation: float) -> float:
    """The maximum-likelihood Laplace scale is the mean absolute deviation from the centre."""
    return float(mean_abs_deviation)


def gaus_sigma_from_range(value_range: float, numel: int) -> float:
    """The seed's sigma estimate from a sample's range: the expected range of N Gaussian draws grows as
    sqrt(2 ln N); ``0.175 * (1 + sqrt(pi ln 4))`` is the seed's constant."""
    if numel < 2:
        raise ValueError(f"the range estimator of sigma needs at least 2 elements per sample, got {numel}")
    return value_range * 0.175 * (1.0 + math.sqrt(math.pi * math.log(4.0))) / math.sqrt(2.0 * math.log(numel))


@dataclass(frozen=True)
class TensorStats:
    """What the clipping rule needs to know of one activation tensor (per sample, or averaged over samples)."""

    min: float
    max: float
    mean: float
    b: float  # mean |x - mean|
    std: float
    numel: int  # elements per sample

    def __post_init__(self) -> None:
        values = (self.min, self.max, self.mean, self.b, self.std)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"statistics must be finite, got {self}")
        if self.max < self.min:
            raise ValueError(f"max {self.max} is below min {self.min}")

    @property
    def range(self) -> float:
        return self.max - self.min

    def sigma(self, estimator: str = "range") -> float:
        """Gaussian sigma: ``range`` (the seed's estimate from max - min) or ``std`` (the sample std)."""
        if estimator == "range":
            return gaus_sigma_from_range(self.range, self.numel)
        if estimator == "std":
            return self.std
        raise ValueError(f"unknown sigma estimator {estimator!r}: expected one of {', '.join(SIGMA_ESTIMATORS)}")


@dataclass(frozen=True)
class ClipDecision:
    """The clipping chosen for one tensor: which prior, its alpha and the MSE the model predicts for it."""

    method: str  # "no", "laplace" or "gaus" (mix resolves to one of the latter two)
    alpha: float  # 0 when not clipping
    predicted_mse: float


def no_clip_mse(stats: TensorStats, bits: int) -> float:
    """Predicted MSE without clipping: uniform rounding noise over the full range (delta^2 / 12 per bin)."""
    return quantization_noise(stats.range / 2.0, bits)


def prior_scale(stats: TensorStats, prior: str, sigma_estimator: str = "range") -> float:
    """The prior's scale for ``stats``: b for Laplace, sigma (by ``sigma_estimator``) for Gauss."""
    return stats.b if check_prior(prior) == "laplace" else stats.sigma(sigma_estimator)


def prior_clipping(stats: TensorStats, prior: str, bits: int, sigma_estimator: str = "range") -> ClipDecision:
    """The analytical clipping for one prior: alpha = optimal_alpha(prior, bits) * scale (b for Laplace, sigma
    for Gauss) and the MSE the paper's model predicts for it.  A constant tensor (scale 0) is not clipped and has
    zero MSE.  The methods that use it (and ``mix``) are registered in ``methods``."""
    bits = check_bits(bits)
    scale = prior_scale(stats, prior, sigma_estimator)
    if scale <= 0.0:  # a constant tensor: nothing to clip, and the MSE is zero
        return ClipDecision(prior, 0.0, 0.0)
    alpha = optimal_alpha(prior, bits) * scale
    return ClipDecision(prior, alpha, mse(prior, alpha, scale, bits))


def grid_clipping(
    stats: TensorStats, prior: str, bits: int, sigma_estimator: str = "range", one_sided: bool = False
) -> ClipDecision:
    """The exact-grid clipping for one prior (method ``<prior>-grid``): alpha = optimal_alpha_grid (or, for a
    one-sided grid, optimal_alpha_grid_half) times the prior's scale, and the MSE that model predicts."""
    bits = check_bits(bits)
    name = f"{prior}-grid"
    scale = prior_scale(stats, prior, sigma_estimator)
    if scale <= 0.0:
        return ClipDecision(name, 0.0, 0.0)
    if one_sided:
        alpha = optimal_alpha_grid_half(prior, bits) * scale
        return ClipDecision(name, alpha, mse_grid_half(prior, alpha, scale, bits))
    alpha = optimal_alpha_grid(prior, bits) * scale
    return ClipDecision(name, alpha, mse_grid(prior, alpha, scale, bits))


def aciq_range(vmin: float, vmax: float, mean: float, alpha: float) -> tuple[float, float]:
    """The seed's range rule: (delta, offset) of the quantization grid for clipping value ``alpha``.

    No clipping when alpha <= 0 or when alpha already covers half the range; otherwise the grid spans
    2 alpha, centred on the mean but never starting below the observed minimum.
    """
    if alpha <= 0.0 or alpha >= (vmax - vmin) / 2.0:
        return vmax - vmin, vmin
    return 2.0 * alpha, max(vmin, mean - alpha)


# -- bit allocation (the follow-up's section 4) ----------------------------------------------------------------
ALLOCATION_MODES = ("round", "ceil")
MAX_CHANNEL_LEVELS = 2**22  # what the kernels round exactly: the CPU kernel's round-half-even trick, 0 <= v < 2**22


def allocation_quota(channels: int, target_bits: float) -> int:
    """The level quota of ``channels`` channels at ``target_bits`` on average: round(C * 2**target_bits).

    Targets below 1 bit (fewer than 2 levels a channel) or above 16 bits cannot be met: ValueError."""
    if not (isinstance(target_bits, int | float) and MIN_BITS <= target_bits <= MAX_BITS):
        raise ValueError(f"bit-allocation target must be {MIN_BITS}..{MAX_BITS} bits on average, got {target_bits!r}")
    return round(channels * 2.0**target_bits)


def allocate_levels(scales, quota: int, mode: str = "round", min_levels: int = 2,
                    max_levels: int = MAX_CHANNEL_LEVELS) -> list[int]:
    """Levels per channel minimising the total predicted rounding MSE under a level quota (the follow-up's 2/3 law).

    Derivation.  Channel i is clipped at alpha_i and rounded onto L_i levels; its rounding noise is
    (2 alpha_i / L_i)^2 / 12 = alpha_i^2 / (3 L_i^2) per element (the paper's alpha^2 / (3 * 4^M) with L = 2^M).
    With the ACIQ alpha proportional to the channel's scale s_i (alpha_i = a * s_i, a fixed by the prior), minimise

        sum_i alpha_i^2 / L_i^2    subject to    sum_i L_i = Q        (Q = C * 2^M: the nominal 2^M levels a channel).

    Lagrange: d/dL_i [alpha_i^2 / L_i^2 + lambda L_i] = -2 alpha_i^2 / L_i^3 + lambda = 0, so L_i^3 is proportional to
    alpha_i^2: L_i = Q s_i^(2/3) / sum_j s_j^(2/3).  (The objective is convex in L > 0, so this is the minimum.)
    Channels whose share falls below ``min_levels`` (2: a grid needs two ends) or above ``max_levels`` are fixed at
    that bound and the rest of the quota is shared again by the same law among the others (the KKT conditions of
    the bounded problem), until no share leaves the bounds.

    Rounding to whole level counts: ``round`` keeps the quota exactly — each channel gets floor(L_i) and the
    remaining levels go one each to the largest fractional parts (largest-remainder; ties to the lower index);
    ``ceil`` gives every channel ceil(L_i), as the follow-up's code does, so the total exceeds the quota by fewer
    than C levels (never by more than one level a channel).  Level counts need not be powers of two.
    """
    if mode not in ALLOCATION_MODES:
        raise ValueError(f"unknown allocation rounding {mode!r}: expected one of {', '.join(ALLOCATION_MODES)}")
    weights = [max(float(s), 0.0) ** (2.0 / 3.0) for s in scales]
    channels = len(weights)
    if channels == 0:
        return []
    if not all(math.isfinite(w) for w in weights):
        raise ValueError("channel scales must be finite")
    if not channels * min_levels <= quota <= channels * max_levels:
        raise ValueError(f"a quota of {quota} levels cannot give {channels} channels {min_levels}..{max_levels} each")
    fixed: dict[int, float] = {}
    while True:
        free = [i for i in range(channels) if i not in fixed]
        left = quota - sum(fixed.values())
        total = sum(weights[i] for i in free)
        share = {i: left * weights[i] / total if total > 0 else left / len(free) for i in free}
        low = {i: float(min_levels) for i, v in share.items() if v < min_levels}
        high = {i: float(max_levels) for i, v in share.items() if v > max_levels}
        if not low and not high:
            break
        fixed.update(low if low else high)  # fix the lower bounds first: that frees quota for the others
    levels = [fixed.get(i, share.get(i, 0.0)) for i in range(channels)]
    if mode == "ceil":
        return [min(max(math.ceil(v - 1e-9), min_levels), max_levels) for v in levels]
    whole = [min(max(math.floor(v + 1e-9), min_levels), max_levels) for v in levels]
    extra = quota - sum(whole)
    order = sorted(range(channels), key=lambda i: (-(levels[i] - whole[i]), i))
    for i in order[:max(extra, 0)]:
        whole[i] += 1
    return whole


def allocated_alpha(prior: str, scale: float, levels: float) -> float:
    """The clipping value of a channel of scale ``scale`` (b or sigma) given ``levels`` levels by bit allocation:
    the paper's optimum for that (real) number of bins, ``optimal_alpha_for_bins(prior, levels) * scale``."""
    return optimal_alpha_for_bins(prior, float(levels)) * scale if scale > 0 else 0.0


def allocated_clip(prior: str, scale: float, levels: float) -> tuple[float, float]:
    """``allocated_alpha`` and its expected MSE: the clipping noise beyond it plus the rounding noise of
    ``levels`` bins over [-alpha, alpha], alpha^2 / (3 levels^2) (``quantization_noise`` for a real count)."""
    alpha = allocated_alpha(prior, scale, levels)
    return alpha, clipping_noise(prior, alpha, scale) + alpha**2 / (3.0 * levels * levels)
