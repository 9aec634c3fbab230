"""Clipping ranges searched on a layer's measured histogram (``observers.Histogram``): measured MSE, KL divergence
(TensorRT's entropy calibration) and percentiles, all on the asymmetric GEMMLOWP grid of ``2**bits`` levels.

Pure numpy functions of a histogram and a bit width; ``methods`` turns their ranges into grids.  The grid a range
[lo, hi] means is the one ``gemmlowp.py`` applies: ``2**bits`` levels ``lo + k * step``, ``step = (hi - lo) /
(2**bits - 1)``, values clamped to [lo, hi] and rounded to the nearest level (float64 here, without the float32
rounding and the ``-pz`` / ``-hs`` adjustments of the real grid).

A histogram stands for its values by its bin centres weighted by the counts (NVIDIA's MSE calibrator does the same;
with 2048 bins a bin is a small fraction of a 4-bit step).  Both searches are vectorised over candidate ranges:
a coarse grid of ranges, geometric in the distance clipped off each end (heavy tails put the optimum far inside
the observed range), then two finer linear grids around the best one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .observers import Histogram

COARSE = 40  # candidate distances per side, geometric from the observed extreme to 1/1000 of it
SHRINK = 1e-3
REFINE = 12  # candidates per side in each refinement round
ROUNDS = 2
CHUNK = 1 << 20  # candidates x bins evaluated at once (memory: a few float64 arrays of this size)


@dataclass(frozen=True)
class Range:
    """A searched clipping range and the score that chose it (MSE, or KL divergence for ``kld``)."""

    lo: float
    hi: float
    score: float


def check_searchable(hist: Histogram) -> None:
    """A histogram every search accepts (it is non-empty by construction)."""
    if hist.numel < 1:
        raise ValueError("the histogram is empty: no values to calibrate on")


def measured_mse(hist: Histogram, lo: np.ndarray | float, hi: np.ndarray | float, bits: int) -> np.ndarray:
    """Mean squared error of quantizing the histogram's values on each grid [lo_c, hi_c] (2**bits levels)."""
    lo, hi = np.broadcast_arrays(np.atleast_1d(np.asarray(lo, np.float64)), np.atleast_1d(np.asarray(hi, np.float64)))
    live = hist.counts > 0
    values, weights = hist.centres[live], hist.counts[live]
    total = weights.sum()
    levels = float(2**bits - 1)
    out = np.empty(len(lo))
    step_rows = max(1, CHUNK // max(len(values), 1))
    for s in range(0, len(lo), step_rows):
        a, b = lo[s:s + step_rows, None], hi[s:s + step_rows, None]
        step = (b - a) / levels
        clipped = np.clip(values, a, b)
        safe = np.where(step > 0, step, 1.0)
        q = np.where(step > 0, a + np.rint((clipped - a) / safe) * step, a)
        out[s:s + step_rows] = ((q - values) ** 2) @ weights / total
    return out


def _fractions(count: int) -> np.ndarray:
    """Shares of the distance from the centre to an extreme that a candidate keeps: 1 (no clipping) down to
    ``SHRINK``, geometric."""
    return np.geomspace(1.0, SHRINK, count)


def _refine(values: np.ndarray, best: int) -> np.ndarray:
    """``REFINE`` points spanning the neighbours of ``values[best]``."""
    lo, hi = values[max(best - 1, 0)], values[min(best + 1, len(values) - 1)]
    return np.linspace(lo, hi, REFINE)


def search_two_sided(hist: Histogram, score: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Range:
    """The [lo, hi] minimising ``score(lo, hi)`` (vectorised), lo in [min, centre], hi in [centre, max], centre
    the histogram's mean.  Ties go to the widest range (the first candidate: no clipping)."""
    centre = min(max(hist.mean(), hist.min), hist.max)
    below, above = centre - hist.min, hist.max - centre
    f_lo = f_hi = _fractions(COARSE)
    best = Range(hist.min, hist.max, float(score(np.array([hist.min]), np.array([hist.max]))[0]))
    for _ in range(ROUNDS + 1):
        grid_lo, grid_hi = np.meshgrid(f_lo, f_hi, indexing="ij")
        scores = score(centre - below * grid_lo.ravel(), centre + above * grid_hi.ravel())
        k = int(np.argmin(scores))
        i, j = np.unravel_index(k, grid_lo.shape)
        if scores[k] < best.score:
            best = Range(centre - below * f_lo[i], centre + above * f_hi[j], float(scores[k]))
        f_lo, f_hi = _refine(f_lo, i), _refine(f_hi, j)
    return best


def search_upper(hist: Histogram, ceiling: float, score: Callable[[np.ndarray], np.ndarray]) -> Range:
    """The hi in (0, ceiling] minimising ``score(hi)`` for a grid [0, hi] (one-sided); ties to the widest."""
    fractions = _fractions(COARSE * 4)
    best = Range(0.0, ceiling, float(score(np.array([ceiling]))[0]))
    for _ in range(ROUNDS + 1):
        scores = score(ceiling * fractions)
        k = int(np.argmin(scores))
        if scores[k] < best.score:
            best = Range(0.0, float(ceiling * fractions[k]), float(scores[k]))
        fractions = _refine(fractions, k)
    return best


def mse_range(hist: Histogram, bits: int) -> Range:
    """The range whose measured MSE on ``hist`` is smallest (two-sided grid)."""
    check_searchable(hist)
    if hist.constant:
        return Range(hist.min, hist.max, 0.0)
    return search_two_sided(hist, lambda lo, hi: measured_mse(hist, lo, hi, bits))


def mse_upper(hist: Histogram, bits: int) -> Range:
    """The one-sided grid [0, hi] with the smallest measured MSE; ``hist`` is already clamped to [0, cap]."""
    check_searchable(hist)
    if hist.max <= 0.0:
        return Range(0.0, 0.0, 0.0)
    return search_upper(hist, hist.max, lambda hi: measured_mse(hist, 0.0, hi, bits))


# -- KL divergence (TensorRT's entropy calibration) ---------------------------------------------------------
def kl_divergence(hist: Histogram, first: np.ndarray, stop: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                  bits: int) -> np.ndarray:
    """KL(P || Q) for each candidate: bins ``first[c]:stop[c]`` of ``hist`` on the grid [lo_c, hi_c].

    TensorRT's entropy calibration, adapted to the asymmetric GEMMLOWP grid: the reference P is the histogram
    restricted to the candidate's bins with the mass outside folded into its first and last bin (clipping puts
    those values there); Q is the same bins quantized: each bin goes to the grid level nearest its centre (2**bits
    levels, the end levels' cells half as wide, as rounding makes them), the bins' counts *without* the folded
    outliers are summed per level and spread evenly over that level's bins where P is non-zero.  Both are
    normalised; a P bin whose Q is zero (folded outliers with no mass of their own in that level) scores infinity.
    A point mass (zero-width bin) sitting on the grid's end, such as the zeros of a ReLU on a one-sided grid, is
    its own cell (it is quantized exactly), so it does not flatten the Q of the values next to it.
    """
    counts, centres = hist.counts, hist.centres
    n, levels = len(counts), 2**bits
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    out = np.empty(len(first))
    rows = max(1, CHUNK // n)
    index = np.arange(n)
    point = hist.edges[1:] == hist.edges[:-1]  # zero-width bins: point masses (``Histogram.clamped``)
    for s in range(0, len(first), rows):
        a, b = first[s:s + rows, None], stop[s:s + rows, None]
        g_lo, g_hi = lo[s:s + rows, None], hi[s:s + rows, None]
        count = len(a)
        inside = (index >= a) & (index < b)
        sliced = np.where(inside, counts, 0.0)
        p = sliced.copy()
        r = np.arange(count)
        p[r, a[:, 0]] += cum[a[:, 0]]
        p[r, b[:, 0] - 1] += cum[-1] - cum[b[:, 0]]
        step = np.maximum((g_hi - g_lo) / (levels - 1), 1e-300)
        level = np.clip(np.rint((centres - g_lo) / step), 0, levels - 1).astype(np.int64)
        flat = r[:, None] * levels + level
        # a point mass on a grid level (a ReLU's zeros at lo = 0) is quantized exactly: its own cell, Q = P there
        exact = point & ((centres == g_lo) | (centres == g_hi))
        flat = np.where(exact, count * levels + r[:, None] * n + index, flat)
        size = count * levels + count * n
        mass = np.bincount(flat[inside], weights=sliced[inside], minlength=size)
        nonzero = np.bincount(flat[inside], weights=(p[inside] > 0).astype(float), minlength=size)
        q = np.where(p > 0, mass[flat] / np.maximum(nonzero[flat], 1.0), 0.0)
        p_norm = p / p.sum(axis=1, keepdims=True)
        q_sum = q.sum(axis=1, keepdims=True)
        q_norm = q / np.where(q_sum > 0, q_sum, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p_norm > 0, p_norm * np.log(p_norm / q_norm), 0.0)
        out[s:s + rows] = np.where(np.isnan(terms), np.inf, terms).sum(axis=1)
    return out


def _bin_candidates(total: int, centre: int, fractions: np.ndarray, side: int) -> np.ndarray:
    """Bin positions ``fractions`` of the way from ``centre`` to the end of that ``side`` (-1: first bin, +1:
    one past the last), as integers."""
    if side < 0:
        return np.unique(np.rint(centre - centre * fractions).astype(np.int64))
    return np.unique(np.rint(centre + (total - centre) * fractions).astype(np.int64))


def kld_range(hist: Histogram, bits: int) -> Range:
    """The range of bins (edges of ``hist``) minimising the KL divergence on a two-sided grid.

    Candidates: first and stop bins chosen independently (the coarse-then-fine scheme of the MSE search, on bin
    indices around the bin of the mean), spanning at least ``2**bits`` bins (TensorRT starts at as many bins as
    levels: narrower ranges would leave levels without a bin); ties go to the widest range."""
    check_searchable(hist)
    n = len(hist.counts)
    if hist.constant or n <= 2**bits:
        return Range(hist.min, hist.max, 0.0)
    edges = hist.edges
    centre = int(np.clip(np.searchsorted(edges, hist.mean(), side="right") - 1, 0, n - 1))
    f_lo = f_hi = _fractions(COARSE)
    best = Range(hist.min, hist.max, float(_kl_pairs(hist, np.array([0]), np.array([n]), bits)[0]))
    for _ in range(ROUNDS + 1):
        firsts = _bin_candidates(n, centre, f_lo, -1)
        stops = _bin_candidates(n, centre + 1, f_hi, +1)
        a, b = (m.ravel() for m in np.meshgrid(firsts, stops, indexing="ij"))
        keep = b - a >= 2**bits
        if not keep.any():
            break
        a, b = a[keep], b[keep]
        scores = _kl_pairs(hist, a, b, bits)
        k = int(np.argmin(scores))
        if scores[k] < best.score:
            best = Range(float(edges[a[k]]), float(edges[b[k]]), float(scores[k]))
        # refine around the best pair, in fractions of the way to each end
        span_lo = (centre - a[k]) / max(centre, 1)
        span_hi = (b[k] - centre - 1) / max(n - centre - 1, 1)
        f_lo = np.linspace(max(span_lo * 0.7, 0.0), min(span_lo * 1.3, 1.0), REFINE)
        f_hi = np.linspace(max(span_hi * 0.7, 0.0), min(span_hi * 1.3, 1.0), REFINE)
    return best


def _kl_pairs(hist: Histogram, a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    return kl_divergence(hist, a, b, hist.edges[a], hist.edges[b], bits)


def kld_upper(hist: Histogram, bits: int) -> Range:
    """One-sided KL search: the grid [0, edges[stop]] over bins ``0:stop`` of ``hist`` (clamped to [0, cap]),
    stop from ``2**bits`` bins to all of them (every stop when there are few, else the coarse-then-fine grid)."""
    check_searchable(hist)
    n = len(hist.counts)
    if hist.max <= 0.0 or n <= 2**bits:
        return Range(0.0, max(hist.max, 0.0), 0.0)
    edges = hist.edges

    def score(stop: np.ndarray) -> np.ndarray:
        return kl_divergence(hist, np.zeros_like(stop), stop, np.zeros(len(stop)), edges[stop], bits)

    stops = np.unique(np.rint(np.linspace(2**bits, n, min(n - 2**bits + 1, COARSE * 4))).astype(np.int64))
    best = Range(0.0, hist.max, float(score(np.array([n]))[0]))
    for _ in range(ROUNDS + 1):
        scores = score(stops)
        k = int(np.argmin(scores))
        if scores[k] < best.score:
            best = Range(0.0, float(edges[stops[k]]), float(scores[k]))
        lo, hi = stops[max(k - 1, 0)], stops[min(k + 1, len(stops) - 1)]
        stops = np.unique(np.rint(np.linspace(lo, hi, REFINE)).astype(np.int64))
    return best


# -- percentiles ---------------------------------------------------------------------------------------------
def percentile_range(hist: Histogram, percent: float) -> tuple[float, float]:
    """The central ``percent`` % of the values: a share ``1 - percent / 100`` is left outside, half below and
    half above (values uniform within a bin)."""
    outside = 1.0 - percent / 100.0
    lo, hi = hist.quantile(np.array([outside / 2.0, 1.0 - outside / 2.0]))
    return float(lo), float(hi)


def percentile_upper(hist: Histogram, percent: float) -> float:
    """The ``percent`` % quantile of ``hist`` (clamped to [0, cap]: a ReLU's zeros count): the top of a one-sided
    grid, everything clipped off the top."""
    return float(hist.quantile(percent / 100.0))
