"""The exact-grid ACIQ model (2**M levels, 2**M - 1 steps): its MSE against quadrature and against the error of the
project's GEMMLOWP quantizer, its alpha against closed forms and against the paper-model alpha, and the
``laplace-grid`` / ``gaus-grid`` methods (two-sided and one-sided)."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, stats

from pytorch_quantizer import choose_clipping, gemmlowp_quantize, method_names
from pytorch_quantizer.clipping import (
    TensorStats,
    clipping_noise,
    mse,
    mse_grid,
    mse_grid_half,
    optimal_alpha,
    optimal_alpha_for_levels,
    optimal_alpha_grid,
    optimal_alpha_grid_half,
    optimal_alpha_half,
)
from pytorch_quantizer.methods import get_method
from pytorch_quantizer.observers import Observation

DISTS = {"laplace": stats.laplace, "gaus": stats.norm}
BITS = range(2, 9)


def quad_mse(prior: str, alpha: float, bits: int, one_sided: bool) -> float:
    """The grid's MSE cell by cell with scipy's adaptive quadrature (independent of the model's Gauss-Legendre)."""
    pdf, levels = DISTS[prior].pdf, 2**bits
    lo = 0.0 if one_sided else -alpha
    step = (alpha - lo) / (levels - 1)
    total = clipping_noise(prior, alpha, 1.0) * (0.5 if one_sided else 1.0)
    for k in range(levels):
        c = lo + k * step
        a, b = max(c - step / 2, lo), min(c + step / 2, alpha)
        points = [0.0] if a < 0.0 < b else None
        total += integrate.quad(lambda x, c=c: (x - c) ** 2 * pdf(x), a, b, points=points, epsabs=1e-14)[0]
    return total


@pytest.mark.parametrize("prior", ["laplace", "gaus"])
@pytest.mark.parametrize("bits", [1, 2, 3, 5])
@pytest.mark.parametrize("one_sided", [False, True])
def test_model_matches_quadrature(prior, bits, one_sided):
    alpha = 1.3 * optimal_alpha(prior, bits)
    f = mse_grid_half if one_sided else mse_grid
    assert f(prior, alpha, 1.0, bits) == pytest.approx(quad_mse(prior, alpha, bits, one_sided), rel=1e-9)
    # scale: alpha and the MSE scale as s and s^2
    assert f(prior, 2.5 * alpha, 2.5, bits) == pytest.approx(6.25 * f(prior, alpha, 1.0, bits), rel=1e-12)


def test_one_bit_closed_forms():
    """1 bit, levels -alpha and alpha: MSE = E(|x| - alpha)^2, least at alpha = E|x| (b for Laplace, sqrt(2/pi) for
    Gauss).  One-sided, levels 0 and alpha: the optimum satisfies alpha = E[x | x > alpha/2]; for Laplace, which is
    memoryless, that is alpha/2 + 1, so alpha = 2."""
    assert optimal_alpha_grid("laplace", 1) == pytest.approx(1.0, rel=1e-7)
    assert optimal_alpha_grid("gaus", 1) == pytest.approx(math.sqrt(2 / math.pi), rel=1e-7)
    assert optimal_alpha_grid_half("laplace", 1) == pytest.approx(2.0, rel=1e-7)
    g = optimal_alpha_grid_half("gaus", 1)
    assert g == pytest.approx(stats.norm.pdf(g / 2) / stats.norm.sf(g / 2), rel=1e-7)


@pytest.mark.parametrize("prior", ["laplace", "gaus"])
@pytest.mark.parametrize("bits", [2, 3, 5])
@pytest.mark.parametrize("one_sided", [False, True])
def test_alpha_minimises_the_model(prior, bits, one_sided):
    f = mse_grid_half if one_sided else mse_grid
    alpha = (optimal_alpha_grid_half if one_sided else optimal_alpha_grid)(prior, bits)
    found = optimize.minimize_scalar(lambda a: quad_mse(prior, a, bits, one_sided), bounds=(0.9 * alpha, 1.1 * alpha),
                                     method="bounded", options={"xatol": 1e-8})
    assert alpha == pytest.approx(found.x, rel=1e-5)
    assert f(prior, alpha, 1.0, bits) < min(f(prior, alpha * k, 1.0, bits) for k in (0.99, 1.01))


@pytest.mark.parametrize("prior", ["laplace", "gaus"])
def test_alpha_is_monotone_in_bits_and_below_the_paper_alpha(prior):
    two = [optimal_alpha_grid(prior, m) for m in range(1, 13)]  # 9-12: the > 256-level path of the solver
    half = [optimal_alpha_grid_half(prior, m) for m in range(1, 13)]
    assert all(a < b for a, b in zip(two, two[1:], strict=False))
    assert all(a < b for a, b in zip(half, half[1:], strict=False))
    # wider steps than the paper's bins: a smaller alpha, converging on the paper's as the grid gets finer
    gaps = [1 - a / optimal_alpha(prior, m) for m, a in enumerate(two, start=1)]
    assert all(g > 0 for g in gaps) and all(a > b for a, b in zip(gaps, gaps[1:], strict=False))
    assert gaps[-1] < 1e-4
    assert all(optimal_alpha_grid_half(prior, m) < optimal_alpha_half(prior, m) for m in range(1, 13))


def test_flat_cell_limit():
    """At 8 bits the cells are narrow, so the rounding noise is the flat-density form: Delta^2 / 12 times the
    in-range mass, Delta = 2 alpha / 255."""
    for prior in ("laplace", "gaus"):
        alpha = optimal_alpha_grid(prior, 8)
        rounding = mse_grid(prior, alpha, 1.0, 8) - clipping_noise(prior, alpha, 1.0)
        inside = 1 - 2 * DISTS[prior].sf(alpha)
        assert rounding == pytest.approx((2 * alpha / 255) ** 2 / 12 * inside, rel=0.01)


def test_levels_are_checked():
    assert optimal_alpha_for_levels("gaus", 16) == optimal_alpha_grid("gaus", 4)
    for bad in (1, 2.5, True):
        with pytest.raises(ValueError, match="levels"):
            optimal_alpha_for_levels("gaus", bad)


# -- against the project's quantizer ------------------------------------------------------------------------------
N = 2**21


@pytest.fixture(scope="module")
def stratified() -> dict[str, torch.Tensor]:
    """One draw per quantile stratum, x_i = F^-1((i + 1/2) / N): Monte-Carlo with (almost) no sampling noise, so
    the model's error shows; iid draws of this size move the 8-bit MSE by 1-4 % through the ~200 tail samples."""
    u = (np.arange(N) + 0.5) / N
    return {prior: torch.from_numpy(d.ppf(u).astype(np.float32)) for prior, d in DISTS.items()}


@pytest.fixture(scope="module")
def iid() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    draws = {"laplace": rng.laplace(0.0, 1.0, N), "gaus": rng.normal(0.0, 1.0, N)}
    return {prior: torch.from_numpy(x.astype(np.float32)) for prior, x in draws.items()}


def squared_errors(x: torch.Tensor, alpha: float, bits: int, one_sided: bool) -> torch.Tensor:
    """Per-element squared error of the GEMMLOWP quantizer on [-alpha, alpha] (or ReLU(x) on [0, alpha])."""
    if one_sided:
        x = x.clamp(min=0.0)
        return (gemmlowp_quantize(x, alpha, 0.0, bits, preserve_zero=False).double() - x.double()).square()
    return (gemmlowp_quantize(x, 2 * alpha, -alpha, bits, preserve_zero=False).double() - x.double()).square()


@pytest.mark.parametrize("prior", ["laplace", "gaus"])
@pytest.mark.parametrize("one_sided", [False, True])
def test_model_matches_monte_carlo(stratified, prior, one_sided):
    """Within 2 % at 2-8 bits (seen: at most 0.7 % two-sided, 1.8 % one-sided, at Laplace 8 bits, where the
    strata cut off the tail beyond the last quantile); the paper's model is 20 % or more off at 2 bits."""
    for bits in BITS:
        alpha = (optimal_alpha_grid_half if one_sided else optimal_alpha_grid)(prior, bits)
        measured = squared_errors(stratified[prior], alpha, bits, one_sided).mean().item()
        model = (mse_grid_half if one_sided else mse_grid)(prior, alpha, 1.0, bits)
        assert model == pytest.approx(measured, rel=0.02), bits
    a2 = optimal_alpha(prior, 2)
    assert mse(prior, a2, 1.0, 2) < 0.8 * squared_errors(stratified[prior], a2, 2, False).mean().item()


@pytest.mark.parametrize("prior", ["laplace", "gaus"])
@pytest.mark.parametrize("one_sided", [False, True])
def test_grid_alpha_never_worse_than_paper_alpha(iid, prior, one_sided):
    """Measured on the same iid samples, so the comparison is paired: the margin is 3 standard errors of the mean
    per-element difference (from the samples themselves).  At 2-4 bits the exact-grid alpha must be better by
    more than 3 of them (seen: 6 to 120 two-sided, 2 to 44 one-sided, so one-sided is required at 2-3 bits); from
    5 bits on the two alphas are within 1 % and their MSEs within 0.05 %, i.e. within the noise, so there it
    must only not be significantly worse."""
    grid_alpha = optimal_alpha_grid_half if one_sided else optimal_alpha_grid
    paper_alpha = optimal_alpha_half if one_sided else optimal_alpha
    for bits in BITS:
        diff = squared_errors(iid[prior], grid_alpha(prior, bits), bits, one_sided) - squared_errors(
            iid[prior], paper_alpha(prior, bits), bits, one_sided
        )
        margin = 3 * diff.std().item() / math.sqrt(N)
        assert diff.mean().item() <= margin, bits
        if bits <= (3 if one_sided else 4):
            assert diff.mean().item() < -margin, bits


# -- the registered methods ---------------------------------------------------------------------------------------
STATS = TensorStats(min=-30.0, max=30.0, mean=0.2, b=1.5, std=2.0, numel=10_000)


def test_grid_methods_are_registered_after_the_seeds():
    names = method_names()
    assert names[:5] == ("no", "laplace", "gaus", "mix", "minmax")
    assert {"laplace-grid", "gaus-grid"} <= set(names)


@pytest.mark.parametrize("prior", ["laplace", "gaus"])
def test_grid_method_two_sided(prior):
    name = f"{prior}-grid"
    scale = STATS.b if prior == "laplace" else STATS.std
    d = choose_clipping(STATS, name, 3, sigma_estimator="std")
    assert d.method == name
    assert d.alpha == pytest.approx(optimal_alpha_grid(prior, 3) * scale)
    assert d.predicted_mse == pytest.approx(mse_grid(prior, d.alpha, scale, 3))
    g = get_method(name, "std").grid(Observation.of_moments(STATS), 3)
    assert (g.method, g.delta, g.offset) == (name, pytest.approx(2 * d.alpha), pytest.approx(STATS.mean - d.alpha))


@pytest.mark.parametrize("prior", ["laplace", "gaus"])
def test_grid_method_one_sided_solves_the_half_grid(prior):
    obs, scale = Observation.of_moments(STATS), STATS.b if prior == "laplace" else STATS.std
    g = get_method(f"{prior}-grid", "std").grid(obs, 4, one_sided=True, cap=6.0)
    alpha = optimal_alpha_grid_half(prior, 4) * scale
    assert g.one_sided and g.offset == 0.0 and g.alpha == pytest.approx(alpha)
    assert g.delta == pytest.approx(min(STATS.mean + alpha, 6.0))
    assert g.predicted_mse == pytest.approx(mse_grid_half(prior, alpha, scale, 4))
    # the seed's methods keep the paper's shortcut (the clip at one bit more, half its MSE)
    seed = get_method(prior, "std").grid(obs, 4, one_sided=True)
    assert seed.alpha == pytest.approx(optimal_alpha_half(prior, 4) * scale)
    assert seed.predicted_mse == pytest.approx(mse(prior, seed.alpha, scale, 5) / 2)


def test_grid_method_constant_tensor():
    s = TensorStats(min=2.0, max=2.0, mean=2.0, b=0.0, std=0.0, numel=100)
    for name in ("laplace-grid", "gaus-grid"):
        d = choose_clipping(s, name, 4)
        assert (d.alpha, d.predicted_mse) == (0.0, 0.0)
        assert get_method(name).grid(Observation.of_moments(s), 4).method == "no"


def test_half_range_plan_uses_the_half_grid_alpha(tiny_model, tmp_path):
    """End to end with -hr: TinyNet's ReLU-fed conv1 gets [0, mean + alpha+] with the exact half-grid alpha+."""
    from pytorch_quantizer.model_quantizer import ModelQuantizer
    from pytorch_quantizer.models import fold_batchnorm
    from pytorch_quantizer.policy import plan_table
    from pytorch_quantizer.quant_config import ActivationConfig, QuantConfig
    from pytorch_quantizer.stats import StatisticsCollector, load_statistics

    model = fold_batchnorm(tiny_model, torch.randn(2, 3, 16, 16))[0]
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) ** 3
    with torch.no_grad(), StatisticsCollector(model) as collector:
        model(x)
    stats = load_statistics(collector.save(tmp_path / "s", {"arch": "tiny"}))
    config = QuantConfig(act=ActivationConfig(bits=4, method="laplace-grid", half_range=True))
    plan = plan_table(ModelQuantizer(model, config, stats).plan)
    conv1, ts = plan.loc["conv1_activation"], stats.tensor_stats("conv1_activation")
    assert bool(conv1["one_sided"]) and conv1["offset"] == 0.0 and conv1["method"] == "laplace-grid"
    assert conv1["alpha"] == pytest.approx(optimal_alpha_grid_half("laplace", 4) * ts.b)
    assert conv1["delta"] == pytest.approx(min(max(ts.mean, 0.0) + conv1["alpha"], ts.max))
