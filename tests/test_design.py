"""The seams new methods plug into: observers, the clipping-method registry, layer policies, the weight quantizer,
and the statistics folders of the previous release."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from pytorch_quantizer import ClippingMethod, choose_clipping, method_names, register
from pytorch_quantizer.clipping import ClipDecision, TensorStats
from pytorch_quantizer.layers import activation_layers
from pytorch_quantizer.methods import get_method, unregister
from pytorch_quantizer.models import weights_fingerprint
from pytorch_quantizer.observers import PER_CHANNEL, Granularity, Observation, ObserverError
from pytorch_quantizer.policy import SeedPolicy, plan_layers, plan_table
from pytorch_quantizer.quantizer import ActivationQuantizer, QuantConfig
from pytorch_quantizer.stats import StatisticsCollector, StatisticsError, load_statistics
from pytorch_quantizer.weights import WeightQuantizer

DATA = Path(__file__).resolve().parent / "data"
LEGACY = DATA / "legacy_stats_v1"  # written by release 0.1.0 (format 1) from TinyNet, see legacy_input()


def legacy_input() -> torch.Tensor:
    """The heavy-tailed batch the legacy folder was collected on (two forwards: 4 and 2 images)."""
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)) ** 3


@pytest.mark.parametrize("threshold", ["no", "laplace", "gaus", "mix"])
@pytest.mark.parametrize("bits", [4, 8])
def test_previous_release_folder_gives_the_same_plan(tiny_model, threshold, bits):
    stats = load_statistics(LEGACY)
    assert stats.meta["format"] == 1 and list(stats.observers) == ["moments"]
    assert stats.meta["fingerprint"] == weights_fingerprint(tiny_model)
    plan = plan_table(plan_layers(activation_layers(tiny_model), stats, QuantConfig(bits, threshold).policy()))
    expected = pd.read_csv(DATA / "legacy_plans_v1" / f"{threshold}_int{bits}.csv", index_col="name",
                           keep_default_na=False)
    expected["bits"] = expected["bits"].astype(int)
    expected["role"] = expected["role"].astype(str)
    pd.testing.assert_frame_equal(plan[expected.columns], expected, check_exact=True, check_dtype=False)


def test_collector_writes_the_previous_release_files_byte_for_byte(tiny_model, tmp_path):
    x = legacy_input()
    with torch.no_grad(), StatisticsCollector(tiny_model) as collector:
        tiny_model(x[:4])
        tiny_model(x[4:])
    folder = collector.save(tmp_path / "s", {"arch": "tinynet"})
    legacy_files = sorted(p.name for p in LEGACY.glob("*.csv"))
    assert legacy_files == sorted(p.name for p in folder.glob("*.csv"))
    for name in legacy_files:
        assert (folder / name).read_bytes() == (LEGACY / name).read_bytes(), name
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["format"] == 2 and meta["observers"] == [{"name": "moments", "granularity": "tensor"}]


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
    quantizer = ActivationQuantizer(tiny_model, QuantConfig(bits=4, threshold="toy_quarter"), stats)
    row = plan_table(quantizer.plan).loc["conv1_activation"]
    ts = stats.tensor_stats("conv1_activation")
    assert row["method"] == "toy_quarter" and row["alpha"] == pytest.approx(ts.range / 4)
    assert row["delta"] == pytest.approx(ts.range / 2)
    with pytest.raises(StatisticsError, match="toy_sketch observer"):
        ActivationQuantizer(tiny_model, QuantConfig(bits=4, threshold="toy_hist"), stats)
    with pytest.raises(StatisticsError, match="needs the histogram observer.*collect them again"):
        ActivationQuantizer(tiny_model, QuantConfig(bits=4, threshold="kld"), stats)  # a moments-only folder


def test_seed_policy_widths_are_data(tiny_model):
    layers = activation_layers(tiny_model)
    specs = SeedPolicy(bits=4, method="laplace", kept={"conv1_activation"}, kept_bits=6).specs(layers)
    assert [(s.role, s.bits, s.method) for s in specs] == [
        ("first", 8, "laplace"), ("kept", 6, "laplace"), ("classifier", 8, "minmax")]
    specs = SeedPolicy(bits=4, layer_bits={"features.0": 3, "fc": None}).specs(layers)
    assert [s.bits for s in specs] == [3, 4, None]
    with pytest.raises(ValueError, match="bits"):
        SeedPolicy(bits=4, layer_bits={"fc": 17})


def test_weight_quantizer_corrections_and_exact_restore(tiny_model):
    layers = activation_layers(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    seen = []

    def recentre(layer, original, quantized):
        seen.append(layer.name)
        return quantized - quantized.mean() + original.mean()

    wq = WeightQuantizer(layers, bits=4, corrections=[recentre], layer_bits={"fc": None})
    with wq:
        conv = tiny_model.features[0].weight
        assert conv.mean().item() == pytest.approx(before["features.0.weight"].mean().item(), abs=1e-7)
        assert len(torch.unique(conv - conv.mean())) <= 16
        assert torch.equal(tiny_model.fc.weight, before["fc.weight"])  # float by layer_bits
        assert not torch.equal(tiny_model.fc.bias, before["fc.bias"])  # biases at bias_bits
    assert seen == ["conv0_activation", "conv1_activation"]
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_choose_clipping_is_the_registered_method(toy_methods):
    stats = TensorStats(-4.0, 4.0, 0.0, 1.0, 1.5, 1000)
    assert choose_clipping(stats, "toy_quarter", 4).alpha == 2.0
    assert choose_clipping(stats, "laplace", 4) == get_method("laplace").clip(Observation.of_moments(stats), 4)


def test_narrow_weights_keep_the_edge_layers_at_8_bits(tiny_model):
    """-qw int4: the first conv and the classifier keep 8-bit weights (the follow-up's rule); 'same' drops it."""
    layers = activation_layers(tiny_model)

    def levels(config):
        with config.weight_quantizer(layers):
            return [len(torch.unique(layer.module.weight)) for layer in layers]

    first, middle, last = levels(QuantConfig(bits=8, weight_bits=4))
    assert middle <= 16 < first and 16 < last
    assert max(levels(QuantConfig(bits=8, weight_bits=4, edge_weight_bits=None))) <= 16
    same = QuantConfig(bits=8, weight_bits=8, edge_weight_bits=None)
    assert levels(QuantConfig(bits=8, weight_bits=8)) == levels(same)


def test_bias_and_variance_correction_restore_each_channels_mean_and_norm(tiny_model):
    from pytorch_quantizer.weights import weight_corrections

    layers = activation_layers(tiny_model)
    originals = {layer.name: layer.module.weight.detach().clone() for layer in layers}

    def per_channel(t):
        flat = t.reshape(t.shape[0], -1).double()
        centred = flat - flat.mean(1, keepdim=True)
        return flat.mean(1), centred.norm(dim=1)

    for mean, variance in ((True, False), (False, True), (True, True)):
        with WeightQuantizer(layers, bits=3, layer_bits={}, corrections=weight_corrections(mean, variance)):
            for layer in layers:
                (m0, n0), (m1, n1) = per_channel(originals[layer.name]), per_channel(layer.module.weight)
                if mean:
                    torch.testing.assert_close(m1, m0, rtol=0, atol=1e-6)
                if variance:
                    torch.testing.assert_close(n1, n0, rtol=1e-5, atol=1e-7)
    with WeightQuantizer(layers, bits=3):  # without corrections 3-bit rounding moves both
        m0, n0 = per_channel(originals["conv1_activation"])
        m1, n1 = per_channel(tiny_model.features[3].weight)
        assert (m1 - m0).abs().max() > 1e-4 and (n1 - n0).abs().max() > 1e-3


def test_hw_scale_is_for_activations_only(tiny_model):
    """-hs (power-of-two scales) is documented for activations; on weights it made mobilenet_v2 W8 collapse to 2 %."""
    layers = activation_layers(tiny_model)

    def weights(config):
        with config.weight_quantizer(layers):
            return [layer.module.weight.detach().clone() for layer in layers]

    plain, hs = weights(QuantConfig(8)), weights(QuantConfig(8, pow2_scale=True))
    assert all(torch.equal(a, b) for a, b in zip(plain, hs, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(plain, weights(QuantConfig(8, weight_pow2_scale=True)),
                                                    strict=True))
