"""The seams new methods plug into: observers, the clipping-method registry, layer policies, the weight quantizer,
and the statistics folders of the previous release."""

import json
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from pytorch_quantizer import ClippingMethod, choose_clipping, method_names, register
from pytorch_quantizer.clipping import ClipDecision, TensorStats
from pytorch_quantizer.layers import activation_layers
from pytorch_quantizer.methods import get_method, unregister
from pytorch_quantizer.model_quantizer import ActivationQuantizer
from pytorch_quantizer.observers import PER_CHANNEL, Granularity, Observation, ObserverError
from pytorch_quantizer.policy import ActSpec, LayerPolicy, Role, Rule, WeightSpec, layer_policy, plan_layers, plan_table
from pytorch_quantizer.quant_config import ActivationConfig, CorrectionConfig, QuantConfig, WeightConfig
from pytorch_quantizer.stats import StatisticsCollector, StatisticsError, load_statistics
from pytorch_quantizer.weights import WeightQuantizer, weight_corrections

DATA = Path(__file__).resolve().parent / "data"
LEGACY = DATA / "legacy_stats_v1"  # written by release 0.1.0 (format 1) from TinyNet, see legacy_input()


def legacy_input() -> torch.Tensor:
    """The heavy-tailed batch the legacy folder was collected on (two forwards: 4 and 2 images)."""
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)) ** 3


# The plan is a function of the fixture's files alone, computed in scalar Python floats, libm and scipy's brentq: no
# vectorised reduction, so nothing in it depends on the CPU's vector width.  It is not compared bit for bit all the
# same: glibc runs FMA or non-FMA code for exp/log/erf depending on the CPU, and the two differ by an ulp for some
# arguments (GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX2,-FMA shows it); the Gaussian clipping noise subtracts two nearly
# equal terms, one built on 1 - erf, so 1-ulp changes of exp/erf/erfc move predicted_mse by up to 2e-11 relative
# (measured by perturbing them at random; alpha, delta and offset move by under 1e-13).  1e-9 allows that 50 times
# over, and any change of a formula or a constant moves these values by far more.
PLAN_RTOL = 1e-9


@pytest.mark.parametrize("threshold", ["no", "laplace", "gaus", "mix"])
@pytest.mark.parametrize("bits", [4, 8])
def test_previous_release_folder_gives_the_same_plan(tiny_model, threshold, bits):
    stats = load_statistics(LEGACY)
    assert stats.meta["format"] == 1 and list(stats.observers) == ["moments"]
    # Not checked against weights_fingerprint(tiny_model): that hashes the weights' bytes, and torch's uniform_ init
    # rounds them differently in its scalar build (an x86 CPU without AVX2, so without FMA) than in its AVX2 and
    # AVX-512 builds.  That the folder holds this model's statistics the collector test below shows, value by value.
    assert stats.meta["arch"] == "tinynet"
    stats.check_layers(activation_layers(tiny_model))
    layers = activation_layers(tiny_model)
    quant = QuantConfig(act=ActivationConfig(bits=bits, method=threshold))
    plan = plan_table(plan_layers(layers, stats, layer_policy(quant, layers).specs(layers)))
    expected = pd.read_csv(DATA / "legacy_plans_v1" / f"{threshold}_int{bits}.csv", index_col="name",
                           keep_default_na=False)
    expected["bits"] = expected["bits"].astype(int)
    expected["role"] = expected["role"].astype(str)
    pd.testing.assert_frame_equal(plan[expected.columns], expected, check_exact=False, rtol=PLAN_RTOL, atol=0.0,
                                  check_dtype=False)


# The legacy folder holds float32 moments of conv and linear outputs, whose last bits depend on the CPU: torch picks
# its AVX-512, AVX2 or scalar kernels at run time (the convolutions' oneDNN kernels and the linear layer's GEMM sum in
# orders of their own), and the AVX2 build's torch.randn takes its Box-Muller log/sin/cos from approximate SIMD code.
# So a collection on another CPU agrees with the fixture to a few float32 ulps, not byte for byte (conv0's first
# minimum: -15.9895067 on an AVX-512 EPYC, -15.9895058 in the fixture, one ulp).  The moments kernel itself
# (kernels/stats_math.h, built without FMA contraction) sums in one fixed order on every CPU: the drift is its input's.
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)  # 2**-23: one ulp of a float32 in [1, 2)
# 32 float32 ulps.  Between this machine's AVX2 build and torch's scalar one (ATEN_CPU_CAPABILITY=default,
# ONEDNN_MAX_CPU_ISA=SSE41, MKL_ENABLE_INSTRUCTIONS=SSE4_2: the weights' init, the input, the convolutions and the GEMM
# all computed there) the largest difference is 7 ulps (a kurtosis, 8e-7 relative); a real change of the statistics
# moves them by far more: conv0's std with n - 1 instead of n by 6e-5, b taken as mean |x| by 5e-6 or more.
LEGACY_RTOL = 32 * FLOAT32_EPS
# Columns in the activation's units also get LEGACY_RTOL times the row's mean |x| as absolute tolerance: the mean
# cancels (conv0's is -0.0014 from values of magnitude 1.7), and its rounding error scales with what was summed.
DIMENSIONLESS = {"kurtosis"}
NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?(e[-+][0-9]+)?")  # what "%.9g" writes of a finite float
RELEASE_FLOAT_FORMAT = ".9g"  # the previous release's float_format ("%.9g")


def _csv_rows(path: Path) -> list[list[str]]:
    text = path.read_bytes().decode("ascii")
    assert text.endswith("\n") and "\r" not in text, f"{path.name}: not newline-terminated lines"
    return [line.split(",") for line in text[:-1].split("\n")]


def _significant_digits(cell: str) -> int:
    return len(cell.lstrip("-").split("e")[0].replace(".", "").lstrip("0"))


def _check_release_format(path: Path, rows: list[list[str]]) -> None:
    """Every number is the release's "%.9g" rendering of its value, and some need all 9 digits (so no shorter
    format either: "%.6g" output is also the %.9g rendering of its rounded values)."""
    numbers = [cell for row in rows[1:] for cell in row if NUMBER.fullmatch(cell)]
    assert numbers, path.name
    for cell in numbers:
        assert cell == format(float(cell), RELEASE_FLOAT_FORMAT), f"{path.name}: {cell!r} is not %.9g"
    assert max(map(_significant_digits, numbers)) == 9, f"{path.name}: no number has 9 significant digits"


def assert_same_statistics_csv(got: Path, want: Path) -> None:
    """``got`` has ``want``'s layout exactly: header bytes, row count, cells per row, row labels and the "%.9g" form
    of every number; and ``want``'s values within LEGACY_RTOL (see above)."""
    rows, expected = _csv_rows(got), _csv_rows(want)
    assert rows[0] == expected[0], f"{got.name}: header {rows[0]} is not the release's {expected[0]}"
    assert len(rows) == len(expected), f"{got.name}: {len(rows) - 1} rows, the release wrote {len(expected) - 1}"
    _check_release_format(got, rows)
    _check_release_format(want, expected)
    header = expected[0]
    for i, (row, want_row) in enumerate(zip(rows[1:], expected[1:], strict=True), start=1):
        assert len(row) == len(want_row), f"{got.name} row {i}: {len(row)} cells, the release wrote {len(want_row)}"
        scale = abs(float(want_row[header.index("mean_abs")]))
        for column, cell, want_cell in zip(header, row, want_row, strict=True):
            if not NUMBER.fullmatch(want_cell):  # a row label ("min", "mean", "max" of a summary)
                assert cell == want_cell, f"{got.name} row {i}: {column} {cell!r} vs {want_cell!r}"
                continue
            assert NUMBER.fullmatch(cell), f"{got.name} row {i}: {column} {cell!r} is not a number"
            atol = 0.0 if column in DIMENSIONLESS else LEGACY_RTOL * scale
            assert math.isclose(float(cell), float(want_cell), rel_tol=LEGACY_RTOL, abs_tol=atol), (
                f"{got.name} row {i}: {column} {cell} vs the release's {want_cell}")


def _collect_legacy(model, folder: Path) -> Path:
    x = legacy_input()
    with torch.no_grad(), StatisticsCollector(model) as collector:
        model(x[:4])
        model(x[4:])
    return collector.save(folder, {"arch": "tinynet"})


def test_collector_writes_the_previous_release_files(tiny_model, tmp_path):
    """Today's collector, on the release's model and input, writes the release's files: the same names, columns,
    rows and number format, the values within LEGACY_RTOL of the release's (bit for bit only on a CPU that rounds
    like the one that wrote them)."""
    folder = _collect_legacy(tiny_model, tmp_path / "s")
    legacy_files = sorted(p.name for p in LEGACY.glob("*.csv"))
    assert legacy_files == sorted(p.name for p in folder.glob("*.csv"))
    for name in legacy_files:
        assert_same_statistics_csv(folder / name, LEGACY / name)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["format"] == 2 and meta["observers"] == [{"name": "moments", "granularity": "tensor"}]
    # On one machine nothing varies: the same kernels sum in the same order, so a second collection (this process,
    # these threads) writes the same bytes.
    again = _collect_legacy(tiny_model, tmp_path / "again")
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in folder.iterdir())
    for path in folder.iterdir():
        assert path.read_bytes() == (again / path.name).read_bytes(), path.name


def test_unknown_layout_version_is_refused(tmp_path):
    folder = tmp_path / "s"
    shutil.copytree(LEGACY, folder)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(StatisticsError, match="layout format 99"):
        load_statistics(folder)


def test_per_channel_moments_are_the_per_tensor_moments_of_each_channel(tiny_model, tmp_path):
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), StatisticsCollector(tiny_model, granularity=PER_CHANNEL) as collector:
        tiny_model(x)
    stats = load_statistics(collector.save(tmp_path / "s", {"arch": "tiny"}))
    assert stats.observers == {"moments": PER_CHANNEL}
    obs = stats.observation("conv1_activation")
    with torch.no_grad():
        out = tiny_model.features[:4](x)  # conv1's output
    assert len(obs.channel_moments) == out.shape[1] == 16
    for c in (0, 7, 15):  # each channel pooled over the samples (observers.pooled_channel_stats)
        values = out[:, c].reshape(-1).double()
        expected = torch.stack([values.min(), values.max(), values.mean(), values.std(unbiased=False)])
        got = obs.channel_moments[c]
        torch.testing.assert_close(torch.tensor([got.min, got.max, got.mean, got.std], dtype=torch.float64),
                                   expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(StatisticsError, match="per-channel moments only"):
        stats.tensor_stats("conv1_activation")


def test_granularity_labels():
    assert Granularity.parse("tensor") == Granularity() and Granularity.parse("channel:1") == PER_CHANNEL
    for bad in ("channel:0", "channels", "chan:x"):
        with pytest.raises(ObserverError):
            Granularity.parse(bad)


class HalfRange(ClippingMethod):
    """A toy method: clip at a quarter of the observed range (half of the no-clipping alpha)."""

    name = "toy_quarter"
    summary = "a quarter of the observed range (a test method)"

    def clip(self, obs, bits):
        alpha = obs.moments.range / 4.0
        return ClipDecision(self.name, alpha, alpha**2 / (3.0 * 4.0**bits))


class NeedsHistogram(ClippingMethod):
    """A toy method needing an observer no folder holds (collection gathers moments and histograms)."""

    name = "toy_hist"
    requires = ("moments", "toy_sketch")

    def clip(self, obs, bits):
        raise AssertionError("never reached: the folder has no toy_sketch")


@pytest.fixture
def toy_methods():
    register(HalfRange)
    register(NeedsHistogram)
    yield
    unregister(HalfRange.name)
    unregister(NeedsHistogram.name)


def test_registry_lists_methods_and_refuses_a_taken_name(toy_methods):
    assert method_names()[:5] == ("no", "laplace", "gaus", "mix", "minmax")
    assert "toy_quarter" in method_names()

    class Impostor(HalfRange):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register(Impostor)
    with pytest.raises(ValueError, match="expected one of no, laplace"):
        get_method("median")


def test_registered_method_plans_and_quantizes(tiny_model, toy_methods, tmp_path):
    with torch.no_grad(), StatisticsCollector(tiny_model) as collector:
        tiny_model(legacy_input())
    stats = load_statistics(collector.save(tmp_path / "s", {"arch": "tiny"}))

    def quant(method):
        return QuantConfig(act=ActivationConfig(bits=4, method=method))

    quantizer = ActivationQuantizer(tiny_model, quant("toy_quarter"), stats)
    row = plan_table(quantizer.plan).loc["conv1_activation"]
    ts = stats.tensor_stats("conv1_activation")
    assert row["method"] == "toy_quarter" and row["alpha"] == pytest.approx(ts.range / 4)
    assert row["delta"] == pytest.approx(ts.range / 2)
    # a caller's own policy reaches the plan and the weights: conv1 at 6 bits, its weight at 4 per channel
    layers = activation_layers(tiny_model)
    base = layer_policy(quant("toy_quarter"), layers)
    policy = replace(base, rules=(*base.rules, Rule("conv1_*", act={"bits": 6}, weight={"bits": 4,
                                                                                      "per_channel": True})))
    custom = ActivationQuantizer(tiny_model, quant("toy_quarter"), stats, policy=policy)
    assert plan_table(custom.plan).loc["conv1_activation", "bits"] == 6
    assert [s.weight.bits for s in custom.specs] == [8, 4, 8]
    with custom:
        weight = layers[1].module.weight.detach()
        assert max(len(torch.unique(row)) for row in weight.reshape(weight.shape[0], -1)) <= 16
    with pytest.raises(StatisticsError, match="toy_sketch observer"):
        ActivationQuantizer(tiny_model, quant("toy_hist"), stats)
    with pytest.raises(StatisticsError, match="needs the histogram observer.*collect them again"):
        ActivationQuantizer(tiny_model, quant("kld"), stats)  # a moments-only folder


def test_layer_policy_widths_are_data(tiny_model):
    """The seed's rules as one policy's data (was SeedPolicy): kept layers, per-layer widths by the layer's name."""
    layers = activation_layers(tiny_model)
    quant = QuantConfig(act=ActivationConfig(bits=4, method="laplace", kept_bits=6),
                        keep_8bit=frozenset({"conv1_activation"}))
    specs = layer_policy(quant, layers).specs(layers)
    assert [(s.role, s.act.bits, s.act.method) for s in specs] == [
        ("first", 8, "laplace"), ("kept", 6, "laplace"), ("classifier", 8, "minmax")]
    assert [s.role for s in specs] == [Role.FIRST, Role.KEPT, Role.CLASSIFIER]
    # the same policy written by hand, as data
    kept = LayerPolicy(ActSpec(4, "laplace"), WeightSpec(8), rules=(
        Rule(Role.FIRST, act={"bits": 8}, role=Role.FIRST),
        Rule("conv1_activation", act={"bits": 6}, role=Role.KEPT),
        Rule(Role.CLASSIFIER, act={"bits": 8, "method": "minmax"}, role=Role.CLASSIFIER)))
    assert kept.specs(layers) == specs
    policy = LayerPolicy(ActSpec(4, "no"), WeightSpec(8),
                         rules=(Rule("conv0_activation", act={"bits": 3}),
                                Rule("linear0_activation", act={"bits": None})))
    assert [s.act.bits for s in policy.specs(layers)] == [3, 4, None]
    with pytest.raises(ValueError, match="bits"):
        Rule("linear0_activation", act={"bits": 17})


def test_weight_quantizer_corrections_and_exact_restore(tiny_model):
    layers = activation_layers(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    seen = []

    def recentre(layer, original, quantized):
        seen.append(layer.name)
        return quantized - quantized.mean() + original.mean()

    specs = [WeightSpec(4), WeightSpec(4), WeightSpec(None)]  # the classifier's weight in float
    wq = WeightQuantizer(layers, specs, WeightConfig(bits=4), corrections=[recentre])
    with wq:
        conv = tiny_model.features[0].weight
        assert conv.mean().item() == pytest.approx(before["features.0.weight"].mean().item(), abs=1e-7)
        assert len(torch.unique(conv - conv.mean())) <= 16
        assert torch.equal(tiny_model.fc.weight, before["fc.weight"])  # float by its spec
        assert not torch.equal(tiny_model.fc.bias, before["fc.bias"])  # biases at bias_bits
    assert seen == ["conv0_activation", "conv1_activation"]
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_choose_clipping_is_the_registered_method(toy_methods):
    stats = TensorStats(-4.0, 4.0, 0.0, 1.0, 1.5, 1000)
    assert choose_clipping(stats, "toy_quarter", 4).alpha == 2.0
    assert choose_clipping(stats, "laplace", 4) == get_method("laplace").clip(Observation.of_moments(stats), 4)


def weight_quantizer(quant: QuantConfig, layers) -> WeightQuantizer:
    """What ``quant`` does to the weights (was ``QuantConfig.weight_quantizer``)."""
    specs = layer_policy(quant, layers).specs(layers)
    return WeightQuantizer(layers, [spec.weight for spec in specs], quant.weight, weight_corrections(quant.correct))


def test_narrow_weights_keep_the_edge_layers_at_8_bits(tiny_model):
    """-qw int4: the first conv and the classifier keep 8-bit weights (the follow-up's rule); 'same' drops it."""
    layers = activation_layers(tiny_model)

    def levels(weight):
        with weight_quantizer(QuantConfig(act=ActivationConfig(bits=8), weight=weight), layers):
            return [len(torch.unique(layer.module.weight)) for layer in layers]

    first, middle, last = levels(WeightConfig(bits=4))
    assert middle <= 16 < first and 16 < last
    assert max(levels(WeightConfig(bits=4, edge_bits=None))) <= 16
    same = WeightConfig(bits=8, edge_bits=None)
    assert levels(WeightConfig(bits=8)) == levels(same)


def test_bias_and_variance_correction_restore_each_channels_mean_and_norm(tiny_model):
    layers = activation_layers(tiny_model)
    originals = {layer.name: layer.module.weight.detach().clone() for layer in layers}
    specs = [WeightSpec(3)] * len(layers)

    def per_channel(t):
        flat = t.reshape(t.shape[0], -1).double()
        centred = flat - flat.mean(1, keepdim=True)
        return flat.mean(1), centred.norm(dim=1)

    for mean, variance in ((True, False), (False, True), (True, True)):
        corrections = weight_corrections(CorrectionConfig(weight_mean=mean, weight_variance=variance))
        with WeightQuantizer(layers, specs, WeightConfig(bits=3), corrections=corrections):
            for layer in layers:
                (m0, n0), (m1, n1) = per_channel(originals[layer.name]), per_channel(layer.module.weight)
                if mean:
                    torch.testing.assert_close(m1, m0, rtol=0, atol=1e-6)
                if variance:
                    torch.testing.assert_close(n1, n0, rtol=1e-5, atol=1e-7)
    with WeightQuantizer(layers, specs, WeightConfig(bits=3)):  # without corrections 3-bit rounding moves both
        m0, n0 = per_channel(originals["conv1_activation"])
        m1, n1 = per_channel(tiny_model.features[3].weight)
        assert (m1 - m0).abs().max() > 1e-4 and (n1 - n0).abs().max() > 1e-3


def test_hw_scale_is_for_activations_only(tiny_model):
    """-hs (power-of-two scales) is documented for activations; on weights it made mobilenet_v2 W8 collapse to 2 %."""
    layers = activation_layers(tiny_model)

    def weights(config):
        with weight_quantizer(config, layers):
            return [layer.module.weight.detach().clone() for layer in layers]

    plain = weights(QuantConfig(act=ActivationConfig(bits=8)))
    hs = weights(QuantConfig(act=ActivationConfig(bits=8, pow2_scale=True)))
    assert all(torch.equal(a, b) for a, b in zip(plain, hs, strict=True))
    pow2_weights = weights(QuantConfig(act=ActivationConfig(bits=8), weight=WeightConfig(pow2_scale=True)))
    assert not all(torch.equal(a, b) for a, b in zip(plain, pow2_weights, strict=True))
