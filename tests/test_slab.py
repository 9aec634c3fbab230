"""The spike-and-slab clip (``-th slab``), its ``positive`` observer, and the classifier's per-tensor grid under
``-pcq_a``: each checked against what its derivation says."""
# ruff: noqa: F811  (the synthetic-ImageFolder fixtures are imported from test_cli and named as test arguments)

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import optimize
from test_cli import ARCH, data_dir, last_result, run_cli  # noqa: F401 (fixtures)

from pytorch_quantizer.clipping import (
    Slab,
    allocate_levels,
    allocation_quota,
    optimal_alpha_half,
    slab_fit,
    slab_mse,
    slab_upper,
)
from pytorch_quantizer.layers import activation_layers
from pytorch_quantizer.methods import get_method
from pytorch_quantizer.model_quantizer import model_policy
from pytorch_quantizer.models import fold_batchnorm
from pytorch_quantizer.observers import (
    PER_CHANNEL,
    Observation,
    PositivePart,
    PositivePartObserver,
    channel_observers,
)
from pytorch_quantizer.policy import BitAllocation, plan_layers
from pytorch_quantizer.quant_config import ActivationConfig, AllocationConfig, ConfigError, QuantConfig
from pytorch_quantizer.stats import StatisticsCollector, StatisticsError, load_statistics


def _spike_and_slab(p: float, s: float, n: int = 2_000_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < p, rng.exponential(s, n), 0.0)


# -- the model and its optimum ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("p", "s"), [(0.5, 1.0), (0.05, 3.0), (0.9, 0.2)])
def test_the_fit_recovers_the_spike_and_slab_from_two_moments(p, s):
    y = _spike_and_slab(p, s)
    slab = slab_fit(float(y.mean()), float((y * y).mean()))
    assert slab.s == pytest.approx(s, rel=0.02) and slab.p == pytest.approx(p, rel=0.02)


def test_the_fit_of_a_lighter_slab_and_of_nothing():
    assert slab_fit(1.0, 1.0) == Slab(0.5, 1.0)  # constant 1: lighter than any exponential, p capped at 1
    assert slab_fit(0.0, 0.0) == Slab(0.0, 0.0)


@pytest.mark.parametrize("levels", [4, 16, 256, 37.5])
def test_the_upper_minimises_the_models_mse_and_solves_its_stationarity(levels):
    slab = Slab(2.0, 0.3)
    upper = slab.s * slab_upper(levels)
    found = optimize.minimize_scalar(lambda u: slab_mse(u, slab, levels), bounds=(1e-3, 100.0), method="bounded",
                                     options={"xatol": 1e-9})
    assert upper == pytest.approx(found.x, rel=1e-4)
    a = upper / slab.s
    assert a * math.exp(a) == pytest.approx(12.0 * levels**2, rel=1e-9)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_it_is_the_half_range_laplace_rule_measured_from_zero(bits):
    """A Laplace(0, b) through a ReLU is a spike and slab with p = 1/2 and s = b: the same unit clip."""
    assert slab_upper(2.0**bits) == pytest.approx(optimal_alpha_half("laplace", bits), rel=1e-6)


@pytest.mark.parametrize(("p", "s", "bits"), [(0.1, 1.0, 4), (0.6, 0.5, 3)])
def test_the_upper_is_where_the_measured_mse_is_smallest(p, s, bits):
    """On samples, rounded on the one-sided grid of 2^bits bins: the derived U beats 0.7 U and 1.4 U."""
    y = _spike_and_slab(p, s, n=400_000, seed=3)
    levels = 2**bits
    slab = slab_fit(float(y.mean()), float((y * y).mean()))
    upper = slab.s * slab_upper(levels)

    def measured(u: float) -> float:
        step = u / levels
        q = (np.floor(np.clip(y, 0.0, u) / step).clip(max=levels - 1) + 0.5) * step
        q[y == 0.0] = 0.0  # the spike is on the grid's 0
        return float(((q - y) ** 2).mean())

    assert measured(upper) < measured(0.7 * upper) and measured(upper) < measured(1.4 * upper)


# -- the method ---------------------------------------------------------------------------------------------------
def _obs(x: torch.Tensor) -> Observation:
    return Observation.of_tensor("t", x, positive=True)


def test_the_method_puts_a_one_sided_grid_at_the_derived_upper():
    y = torch.from_numpy(_spike_and_slab(0.2, 1.5, n=200_000, seed=1)).float()
    x = torch.where(y > 0, y, -torch.rand(y.shape))  # a pre-activation: negative where the ReLU sends it to 0
    method, obs = get_method("slab"), _obs(x)
    slab = slab_fit(obs.extra["positive"].mean, obs.extra["positive"].mean_sq)
    grid = method.grid(obs, 4, one_sided=True)
    assert (grid.method, grid.offset, grid.one_sided) == ("slab", 0.0, True)
    assert grid.delta == pytest.approx(slab.s * slab_upper(16.0)) and grid.delta < float(x.max())
    assert method.grid(obs, 4, one_sided=True, cap=1.0).delta == 1.0  # ReLU6-style cap bounds it
    assert method.grid(obs, 4).method == get_method("laplace").grid(obs, 4).method == "laplace"  # signed, two-sided
    assert method.grid(_obs(y), 4).delta == grid.delta  # never negative: one-sided even without -hr


def test_the_method_refuses_without_the_positive_part():
    with pytest.raises(ValueError, match="positive-part"):
        get_method("slab").grid(Observation.of_tensor("t", torch.rand(100)), 4, one_sided=True)


# -- the observer -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", [None, PER_CHANNEL])
def test_the_observer_pools_exactly_and_merges_as_one_process(tmp_path, granularity):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 5, 4, 4, generator=g) for _ in range(3)]
    make = (lambda: PositivePartObserver(granularity)) if granularity else PositivePartObserver
    whole = make()
    for i, x in enumerate(batches):
        whole.update(x, (i, 0))
    whole.export(tmp_path, "L")
    part = PositivePartObserver.load(tmp_path, "L", granularity or PositivePartObserver().granularity)
    every = torch.cat(batches).double().clamp(min=0)
    assert part.mean == pytest.approx(every.mean().item()) and part.mean_sq == pytest.approx(every.square().mean()
                                                                                            .item())
    if granularity:
        per_channel = every.transpose(0, 1).reshape(5, -1)
        assert part.channel(2) == PositivePart(pytest.approx(per_channel[2].mean().item()),
                                               pytest.approx(per_channel[2].square().mean().item()))
    ranks = [make(), make()]
    ranks[0].update(batches[0], (0, 0))
    for i, x in enumerate(batches[1:]):
        ranks[1].update(x, (i, 0))
    merged = make()
    merged.merge([r.state() for r in ranks])
    (tmp_path / "m").mkdir()
    merged.export(tmp_path / "m", "L")
    assert (tmp_path / "m" / "L_positive.csv").read_bytes() == (tmp_path / "L_positive.csv").read_bytes()


def test_a_per_channel_collect_gathers_the_positive_part_per_channel():
    assert channel_observers(("moments", "histogram", "positive")) == (
        "moments", "histogram", ("positive", PER_CHANNEL), ("moments", PER_CHANNEL))


# -- plans: the classifier keeps its per-tensor range under -pcq_a ------------------------------------------------
def _collect(model, folder, observers):
    g = torch.Generator().manual_seed(1)
    with StatisticsCollector(model, observers=observers) as collector, torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 16, 16, generator=g))
    collector.save(folder, {"arch": "tiny"})
    return load_statistics(folder)


def test_per_channel_plans_leave_the_classifier_on_its_extreme_range(tiny_model, tmp_path):
    tiny_model, _ = fold_batchnorm(tiny_model, torch.randn(2, 3, 16, 16))
    stats = _collect(tiny_model, tmp_path / "s", channel_observers(("moments", "positive")))
    layers = activation_layers(tiny_model)
    quant = QuantConfig(act=ActivationConfig(bits=4, method="slab", half_range=True, per_channel=True))
    specs = model_policy(quant, tiny_model, layers).specs(layers)
    plans = plan_layers(layers, stats, specs, per_channel=True)
    classifier = next(p for p in plans if p.role == "classifier")
    lo, hi = stats.observation(classifier.name).extreme
    assert classifier.channels == 0 and (classifier.offset, classifier.delta) == (lo, hi - lo)
    others = [(p, s) for p, s in zip(plans, specs, strict=True) if p.bits is not None and p.role != "classifier"]
    assert others and all(p.channels > 0 for p, _ in others)
    for plan, spec in others:  # each channel on the slab of its own positive part
        obs = stats.observation(plan.name)
        for c in range(plan.channels):
            grid = get_method("slab").grid(obs.channel(c), spec.act.bits, spec.act.one_sided_for(obs), spec.act.cap)
            assert (plan.channel_delta[c], plan.channel_offset[c]) == (grid.delta, grid.offset)
    assert any(m == "slab" for p, _ in others for m in p.channel_method)


def test_slab_on_a_folder_without_the_positive_part_is_refused(tiny_model, tmp_path):
    stats = _collect(tiny_model, tmp_path / "s", ("moments",))
    layers = activation_layers(tiny_model)
    quant = QuantConfig(act=ActivationConfig(bits=4, method="slab"))
    with pytest.raises(StatisticsError, match="positive"):
        plan_layers(layers, stats, model_policy(quant, tiny_model, layers).specs(layers))


# -- end to end ---------------------------------------------------------------------------------------------------
def test_cli_slab_per_tensor_and_per_channel(data_dir, tmp_path):
    assert run_cli(data_dir, tmp_path, "-sm", "collect", "-cs", "4", "-pcq_a") == 0
    for extra in ([], ["-pcq_a"]):
        assert run_cli(data_dir, tmp_path, "-sm", "use", "--qtype", "int4", "-th", "slab", "-hr", *extra) == 0
        row = last_result(tmp_path)
        assert row["act.method"] == "slab"
        plan = pd.read_csv(row["file"])
        assert "slab" in set(plan["method"]) and plan.loc[plan["role"] == "classifier", "method"].item() == "minmax"


def test_slab_bit_allocation_gives_levels_by_the_two_thirds_law_of_s_sqrt_p(tiny_model, tmp_path):
    tiny_model, _ = fold_batchnorm(tiny_model, torch.randn(2, 3, 16, 16))
    stats = _collect(tiny_model, tmp_path / "s", channel_observers(("moments", "positive")))
    layers = activation_layers(tiny_model)
    quant = QuantConfig(act=ActivationConfig(bits=4, method="slab", half_range=True, per_channel=True),
                        alloc=AllocationConfig(activations=True, act_bits=3.0))
    allocation = BitAllocation.of(quant)
    assert allocation.prior == "slab"
    specs = model_policy(quant, tiny_model, layers).specs(layers)
    plans = plan_layers(layers, stats, specs, per_channel=True, allocation=allocation)
    regular = [(p, s) for p, s in zip(plans, specs, strict=True) if p.role == "" and p.bits is not None]
    assert regular
    for plan, spec in regular:
        obs = stats.observation(plan.name)
        slabs = [slab_fit(obs.channel(c).extra["positive"].mean, obs.channel(c).extra["positive"].mean_sq)
                 for c in range(plan.channels)]
        quota = allocation_quota(plan.channels, 3.0)
        assert list(plan.channel_levels) == allocate_levels([b.s * b.p**0.5 for b in slabs], quota)
        for c in range(plan.channels):
            grid = get_method("slab").levels_grid(obs.channel(c), plan.channel_levels[c], spec.act.one_sided_for(obs),
                                                  spec.act.cap)
            assert plan.channel_delta[c] == grid.delta
    with pytest.raises(ConfigError, match="weight bit allocation"):
        QuantConfig(act=ActivationConfig(bits=4, method="slab", per_channel=True),
                    alloc=AllocationConfig(activations=True, weights=True))


def test_cli_slab_with_bit_allocation(data_dir, tmp_path):
    assert run_cli(data_dir, tmp_path, "-sm", "collect", "-cs", "4", "-pcq_a") == 0
    assert run_cli(data_dir, tmp_path, "-sm", "use", "--qtype", "int4", "-th", "slab", "-hr", "-pcq_a", "-baa") == 0
    row = last_result(tmp_path)
    assert (row["act.method"], str(row["alloc.activations"])) == ("slab", "True")
    assert pd.read_csv(row["file"].replace(".csv", "_channels.csv"))["levels"].nunique() > 1
