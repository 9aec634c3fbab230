"""Per-channel activation grids (-pcq_a) and bit allocation (-baa / -baw): the law, the plans, the hooks, the CLI."""
# ruff: noqa: F811  (the synthetic-ImageFolder fixtures are imported from test_cli and named as test arguments)

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from test_cli import ARCH, data_dir, last_result, run_cli, stats_dir  # noqa: F401 (fixtures)

import inference_sim
from pytorch_quantizer.clipping import (
    allocate_levels,
    allocated_alpha,
    allocation_quota,
    optimal_alpha_for_bins,
)
from pytorch_quantizer.fake_quant import gemmlowp_quantize_per_channel
from pytorch_quantizer.layers import activation_layers
from pytorch_quantizer.methods import get_method
from pytorch_quantizer.model_quantizer import ModelQuantizer, model_policy
from pytorch_quantizer.models import fold_batchnorm
from pytorch_quantizer.observers import PER_CHANNEL
from pytorch_quantizer.policy import (
    BitAllocation,
    WeightSpec,
    channel_plan_table,
    layer_policy,
    plan_layers,
    plan_table,
)
from pytorch_quantizer.quant_config import (
    ActivationConfig,
    AllocationConfig,
    QuantConfig,
    WeightConfig,
)
from pytorch_quantizer.stats import StatisticsCollector, StatisticsError, load_statistics
from pytorch_quantizer.weights import WeightQuantizer, weight_channel_stats


# -- the allocation law ------------------------------------------------------------------------------------------
def test_allocation_hand_example_follows_the_two_thirds_law():
    # scales 1, 8, 27 -> weights 1, 4, 9 of 14; quota 3 * 2**4 * ... = 112 levels: 8, 32, 72 exactly
    assert allocate_levels([1.0, 8.0, 27.0], 112) == [8, 32, 72]
    assert allocate_levels([1.0, 8.0, 27.0], 112, "ceil") == [8, 32, 72]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_keeps_the_quota_and_two_levels(seed, bits):
    g = torch.Generator().manual_seed(seed)
    scales = (torch.rand(37, generator=g) ** 4 * 10).tolist()
    scales[3] = 0.0  # a constant channel
    quota = allocation_quota(len(scales), bits)
    levels = allocate_levels(scales, quota)
    assert sum(levels) == quota and min(levels) >= 2
    ceil = allocate_levels(scales, quota, "ceil")
    assert quota <= sum(ceil) < quota + len(scales) and min(ceil) >= 2
    # wider channels never get fewer levels
    order = sorted(range(len(scales)), key=lambda i: scales[i])
    assert all(levels[a] <= levels[b] for a, b in zip(order, order[1:], strict=False))


def test_unconstrained_levels_are_proportional_to_scale_to_two_thirds():
    scales = [0.5, 1.0, 2.0, 4.0, 7.0]
    quota = 10**6
    levels = allocate_levels(scales, quota)
    weights = [s ** (2 / 3) for s in scales]
    for n, w in zip(levels, weights, strict=True):
        assert n == pytest.approx(quota * w / sum(weights), abs=1.0)


def test_allocation_lowers_the_measured_mse_against_uniform():
    """Synthetic Laplace channels of unequal scale, 4 bits on average: allocated levels and their optimal alpha
    quantize with a smaller total MSE than 16 levels each at the 4-bit alpha."""
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.05, 0.1, 0.3, 1.0, 3.0, 8.0], dtype=torch.float64)
    u = torch.rand(6, 20000, generator=g, dtype=torch.float64) - 0.5
    x = (-scales[:, None] * u.sign() * torch.log1p(-2 * u.abs())).float()  # Laplace(0, scale)
    b = (x - x.mean(1, keepdim=True)).abs().mean(1).double()

    def measured(levels: list[int]) -> float:
        alpha = torch.tensor([allocated_alpha("laplace", float(bc), n) for bc, n in zip(b, levels, strict=True)])
        q = gemmlowp_quantize_per_channel(x, 2 * alpha, -alpha, 4, dim=0, levels=torch.tensor(levels).double(),
                                          preserve_zero=False, backend="torch")
        return float((q - x).double().square().mean(1).sum())

    allocated = allocate_levels(b.tolist(), allocation_quota(6, 4))
    assert sum(allocated) == 6 * 16
    assert measured(allocated) < 0.8 * measured([16] * 6)


def test_targets_that_cannot_be_met():
    for bad in (0.5, 16.5, -1):
        with pytest.raises(ValueError, match="1..16 bits"):
            allocation_quota(4, bad)
    with pytest.raises(ValueError, match="cannot give"):
        allocate_levels([1.0, 2.0], 3)


# -- per-channel statistics and plans -----------------------------------------------------------------------------
def _seed_specs(layers, quant=None):
    """The seed's layer specs for ``quant`` (default: 4-bit Laplace activations, first conv and classifier at 8)."""
    quant = quant or QuantConfig(act=ActivationConfig(bits=4, method="laplace"))
    return layer_policy(quant, layers).specs(layers)


def _collect(model, folder, per_channel=True, point="output"):
    observers = ("moments", ("moments", PER_CHANNEL)) if per_channel else ("moments",)
    g = torch.Generator().manual_seed(1)
    with StatisticsCollector(model, observers=observers, point=point) as collector, torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 16, 16, generator=g))
    collector.save(folder, {"arch": "tiny"})
    return load_statistics(folder)


def test_per_tensor_files_are_byte_identical_beside_per_channel_ones(tiny_model, tmp_path):
    _collect(tiny_model, tmp_path / "plain", per_channel=False)
    stats = _collect(tiny_model, tmp_path / "both")
    assert stats.has_channel_moments
    for path in (tmp_path / "plain").glob("*.csv"):
        assert path.read_bytes() == (tmp_path / "both" / path.name).read_bytes()
    assert (tmp_path / "both" / "conv0_activation_channels_summary.csv").is_file()
    obs = stats.observation("conv0_activation")
    assert len(obs.channel_moments) == 8 and obs.moments == load_statistics(tmp_path / "plain").observation(
        "conv0_activation").moments


@pytest.mark.parametrize("method", ["laplace", "gaus", "no"])
@pytest.mark.parametrize(("point", "half_range"), [("output", False), ("output", True), ("input", False)])
def test_each_channel_gets_the_per_tensor_rule_on_its_moments(tiny_model, tmp_path, method, point, half_range):
    tiny_model, _ = fold_batchnorm(tiny_model, torch.randn(2, 3, 16, 16))  # conv -> ReLU: the -hr layers
    stats = _collect(tiny_model, tmp_path / "s", point=point)
    layers = activation_layers(tiny_model)
    quant = QuantConfig(act=ActivationConfig(bits=4, method=method, half_range=half_range, placement=point))
    specs = model_policy(quant, tiny_model, layers).specs(layers)
    plans = plan_layers(layers, stats, specs, per_channel=True)
    for plan, spec in zip(plans, specs, strict=True):
        if plan.bits is None:
            continue
        if plan.role == "classifier":  # class scores: the per-tensor extreme range (policy.plan_layers says why)
            assert plan.channels == 0 and plan.method == "minmax"
            continue
        obs = stats.observation(plan.name)
        act = spec.act
        rule = get_method(act.method)
        assert plan.channels == len(obs.channel_moments)
        for c in range(plan.channels):
            grid = rule.grid(obs.channel(c), act.bits, act.one_sided_for(obs), act.cap)
            assert (plan.channel_delta[c], plan.channel_offset[c], plan.channel_alpha[c]) == (
                grid.delta, grid.offset, grid.alpha)
            assert plan.channel_levels[c] == 2**act.bits
    if half_range:
        assert any(p.one_sided for p in plans)
    table = plan_table(plans)
    assert {"channels", "alpha_min", "alpha_max", "levels_total"} <= set(table.columns)
    assert len(channel_plan_table(plans)) == sum(p.channels for p in plans)


def test_allocated_plan_keeps_quota_and_uses_the_optimum_for_its_levels(tiny_model, tmp_path):
    stats = _collect(tiny_model, tmp_path / "s")
    layers = activation_layers(tiny_model)
    quant = QuantConfig(act=ActivationConfig(bits=4, method="laplace", per_channel=True),
                        alloc=AllocationConfig(activations=True, act_bits=3.0, prior="laplace"))
    allocation = BitAllocation("laplace")
    assert BitAllocation.of(quant) == allocation
    plans = plan_layers(layers, stats, _seed_specs(layers, quant), per_channel=True, allocation=allocation)
    regular = [p for p in plans if p.role == ""]
    assert regular
    for plan in regular:
        assert sum(plan.channel_levels) == allocation_quota(plan.channels, 3.0) and min(plan.channel_levels) >= 2
        obs = stats.observation(plan.name)
        for c in range(plan.channels):
            b = obs.channel_moments[c].b
            assert plan.channel_alpha[c] == pytest.approx(optimal_alpha_for_bins("laplace", plan.channel_levels[c]) * b)
    first = next(p for p in plans if p.role == "first")
    assert sum(first.channel_levels) == allocation_quota(first.channels, 8)  # edge layers at their own width


def test_per_channel_on_a_per_tensor_folder_and_channel_mismatch(tiny_model, tmp_path):
    stats = _collect(tiny_model, tmp_path / "plain", per_channel=False)
    layers = activation_layers(tiny_model)
    with pytest.raises(StatisticsError, match="-sm collect -pcq_a"):
        plan_layers(layers, stats, _seed_specs(layers), per_channel=True)
    stats = _collect(tiny_model, tmp_path / "pc")
    wider = type(tiny_model)()
    wider.features[3] = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
    wider.features[0] = torch.nn.Conv2d(3, 12, 3, padding=1)
    with pytest.raises(StatisticsError, match="channels"):
        wider_layers = activation_layers(wider)
        plan_layers(wider_layers, stats, _seed_specs(wider_layers), per_channel=True)


def test_hooks_quantize_each_channel_on_its_grid_and_detach_exactly(tiny_model, tmp_path):
    stats = _collect(tiny_model, tmp_path / "s")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = tiny_model(x)
    seen = {}
    conv = tiny_model.features[3]
    config = QuantConfig(act=ActivationConfig(bits=4, method="laplace", per_channel=True),
                         weight=WeightConfig(bits=None, bias_bits=None),
                         alloc=AllocationConfig(activations=True, prior="laplace"))
    quantizer = ModelQuantizer(tiny_model, config, stats)
    with quantizer, torch.no_grad():  # a hook registered after the quantizer's sees the quantized output
        handle = conv.register_forward_hook(lambda m, i, o: seen.__setitem__("y", o.clone()))
        tiny_model(x)
        handle.remove()
    plan = next(p for p in quantizer.plan if p.module_name == "features.3")
    for c in range(plan.channels):  # at most the channel's allocated number of distinct values
        assert seen["y"][:, c].unique().numel() <= plan.channel_levels[c]
    with torch.no_grad():
        assert torch.equal(tiny_model(x), reference)


def test_weight_allocation_keeps_the_quota(tiny_model):
    layers = activation_layers(tiny_model)
    conv = tiny_model.features[3]
    original = conv.weight.detach().clone()
    specs = [WeightSpec(4, levels_bits=3.0)] * len(layers)  # every layer allocated, 3 bits a channel on average
    quantizer = WeightQuantizer(layers, specs, WeightConfig(bits=4, bias_bits=None),
                                allocation=BitAllocation("laplace"))
    with quantizer:
        quantized = conv.weight.detach().clone()
    assert torch.equal(conv.weight, original)
    stats = weight_channel_stats(original)
    levels = BitAllocation("laplace").levels(stats, 3.0)
    assert sum(levels) == 16 * 8
    for c in range(16):
        assert quantized[c].unique().numel() <= levels[c]


# -- the driver ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pc_stats(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pc")
    assert run_cli(data_dir, out, "-sm", "collect", "-cs", "4", "-pcq_a") == 0
    return out


def test_cli_per_channel_and_allocation_end_to_end(data_dir, pc_stats):
    assert run_cli(data_dir, pc_stats, "-sm", "use", "--qtype", "int4", "-th", "laplace", "-pcq_a") == 0
    row = last_result(pc_stats)
    assert str(row["act.per_channel"]) == "True" and row["images"] == 4
    plan = pd.read_csv(row["file"])
    assert plan["channels"].max() > 0
    channels = pd.read_csv(row["file"].replace(".csv", "_channels.csv"))
    assert len(channels) == plan["channels"].sum()
    assert run_cli(data_dir, pc_stats, "-sm", "use", "--qtype", "int4", "-th", "laplace", "-pcq_a", "-baa",
                   "-bata", "3", "-baw", "-qw", "int4", "-bam", "ceil") == 0
    row = last_result(pc_stats)
    assert (str(row["alloc.activations"]), float(row["alloc.act_bits"]), row["alloc.mode"]) == ("True", 3.0, "ceil")
    channels = pd.read_csv(row["file"].replace(".csv", "_channels.csv"))
    assert channels["levels"].nunique() > 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-sm", "use", "--qtype", "int4", "-th", "laplace", "-baa"], "needs per-channel activations"),
        (["-sm", "use", "--qtype", "int4", "-th", "laplace", "-pcq_a", "-baa", "-bata", "0.5"], "1..16 bits"),
        (["-sm", "use", "--qtype", "int4", "-th", "laplace", "-baw", "-batw", "17"], "1..16 bits"),
        (["--qtype", "int4", "-pcq_a"], "collect them with per-channel activations"),
        (["-sm", "use", "--qtype", "int4", "-th", "no", "-baw"], "-bap"),
    ],
)
def test_cli_bad_allocation_input_exits_2(data_dir, pc_stats, flags, message, capsys):
    before = sorted(p.name for p in (pc_stats / "stats").iterdir())
    assert run_cli(data_dir, pc_stats, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert sorted(p.name for p in (pc_stats / "stats").iterdir()) == before


def test_cli_per_channel_on_a_per_tensor_folder(data_dir, stats_dir, capsys):
    assert run_cli(data_dir, stats_dir, "-sm", "use", "--qtype", "int4", "-th", "laplace", "-pcq_a") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "-sm collect -pcq_a" in line and not math.isnan(len(line))


def test_flags_in_help():
    text = inference_sim.build_parser().format_help()
    for flag in ("-pcq_a", "-baa", "-baw", "-bata", "-batw", "-bam", "-bap"):
        assert flag in text
    assert ARCH


def test_pooled_channel_statistics_describe_the_channel_over_all_samples(tmp_path):
    """A channel that fires on one image only: pooled max is its real maximum, the pooled std is the std of all its
    values (law of total variance), and the pooled b bounds the true mean absolute deviation from above."""
    from pytorch_quantizer.observers import PER_CHANNEL, POOLED, MomentsObserver

    g = torch.Generator().manual_seed(0)
    quiet = torch.randn(3, 2, 4, 4, generator=g) * 0.1
    loud = quiet[:1].clone()
    loud[:, 1] += 5.0 + torch.randn(1, 4, 4, generator=g)
    batch = torch.cat([quiet, loud])
    observer = MomentsObserver(PER_CHANNEL, fused=False)
    observer.update(batch, (0, 0))
    observer.export(tmp_path, "layer")
    summary = MomentsObserver.load(tmp_path, "layer", PER_CHANNEL).channel_summary
    pooled, averaged = summary.loc[POOLED], summary.loc["mean"]
    values = batch[:, 1].reshape(-1).double()
    assert pooled.loc[1, "max"] == pytest.approx(values.max().item(), rel=1e-6)
    assert pooled.loc[1, "std"] == pytest.approx(values.std(unbiased=False).item(), rel=1e-5)
    true_b = (values - values.mean()).abs().mean().item()
    assert true_b <= pooled.loc[1, "b"] + 1e-6 and averaged.loc[1, "b"] < 0.5 * true_b
