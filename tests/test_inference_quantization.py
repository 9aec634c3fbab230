"""Quantized inference through hooks: exact detach, the seed's layer policy, use and no-stats modes."""

import copy

import pytest
import torch
import torchvision

from pytorch_quantizer import aciq_range, choose_clipping, gemmlowp_quantize
from pytorch_quantizer.layers import activation_layers
from pytorch_quantizer.model_quantizer import ModelQuantizer
from pytorch_quantizer.policy import layer_policy, mse_order, plan_table
from pytorch_quantizer.quant_config import ActivationConfig, ConfigError, QuantConfig, WeightConfig
from pytorch_quantizer.stats import StatisticsCollector, load_statistics


def heavy_tailed(n, seed):
    """Gaussian scale mixture: activations with the heavy tails that make clipping worthwhile."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g) * torch.randn(n, 3, 16, 16, generator=g).exp()


@pytest.fixture
def stats(tiny_model, tmp_path):
    with torch.no_grad(), StatisticsCollector(tiny_model) as collector:
        for seed in range(2):
            tiny_model(heavy_tailed(4, seed))
    return load_statistics(collector.save(tmp_path / "s", {"arch": "tiny"}))


def test_attach_detach_is_bit_identical(tiny_model, stats):
    x = torch.randn(4, 3, 16, 16)
    state = copy.deepcopy(tiny_model.state_dict())
    with torch.no_grad():
        before = tiny_model(x)
        for threshold in ("no", "laplace", "gaus", "mix"):
            for statistics in (stats, None):
                config = QuantConfig(act=ActivationConfig(bits=4, method=threshold))
                with ModelQuantizer(tiny_model, config, statistics):
                    quantized = tiny_model(x)
                assert not torch.equal(quantized, before)
                assert torch.equal(tiny_model(x), before)
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not any(m._forward_hooks for m in tiny_model.modules())


def test_resnet18_detach_bit_identical():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        with ModelQuantizer(model, QuantConfig(act=ActivationConfig(bits=4, method="laplace", stochastic=True))):
            model(x)
        assert torch.equal(model(x), before)


def test_seed_policy(tiny_model, stats):
    q = ModelQuantizer(tiny_model, QuantConfig(act=ActivationConfig(bits=4, method="laplace")), stats)
    table = plan_table(q.plan)
    assert table.loc["conv0_activation", "bits"] == 8 and table.loc["conv0_activation", "role"] == "first"
    assert table.loc["conv1_activation", "bits"] == 4
    assert table.loc["linear0_activation", "role"] == "classifier"
    assert table.loc["linear0_activation", "method"] == "minmax"
    lo, hi = stats.extreme_range("linear0_activation")
    assert table.loc["linear0_activation", "offset"] == lo
    assert table.loc["linear0_activation", "delta"] == pytest.approx(hi - lo)
    kept = ModelQuantizer(tiny_model, QuantConfig(act=ActivationConfig(bits=4), keep_8bit={"conv1_activation"}), stats)
    assert plan_table(kept.plan).loc["conv1_activation", "bits"] == 8


def test_use_mode_quantizes_each_output_as_planned(tiny_model, stats):
    """Recompute the expected conv1 output independently from the summary and the documented rules."""
    x = heavy_tailed(4, 5)
    config = QuantConfig(act=ActivationConfig(bits=4, method="laplace", first_bits=None),
                         weight=WeightConfig(bits=None, bias_bits=None))
    seen = {}
    conv = tiny_model.features[3]
    with torch.no_grad():
        with ModelQuantizer(tiny_model, config, stats):
            # registered after the quantizer's hook, so it sees the quantized output
            handle = conv.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o.clone()))
            tiny_model(x)
        handle.remove()
        raw = conv(tiny_model.features[:3](x))
    s = stats.tensor_stats("conv1_activation")
    alpha = choose_clipping(s, "laplace", 4).alpha
    assert alpha < (s.max - s.min) / 2  # this layer really is clipped
    delta, offset = aciq_range(s.min, s.max, s.mean, alpha)
    assert torch.equal(seen["q"], gemmlowp_quantize(raw, delta, offset, 4, preserve_zero=False))


def test_weights_quantized_to_8_bits(tiny_model, stats):
    conv = tiny_model.features[0]
    original = conv.weight.detach().clone()
    with ModelQuantizer(tiny_model, QuantConfig(act=ActivationConfig(bits=4)), stats):
        assert conv.weight.unique().numel() <= 256
        assert not torch.equal(conv.weight, original)
        lo, hi = original.min().item(), original.max().item()
        assert torch.equal(conv.weight, gemmlowp_quantize(original, hi - lo, lo, 8, preserve_zero=True))
    assert torch.equal(conv.weight, original)
    per_channel = QuantConfig(act=ActivationConfig(bits=4), weight=WeightConfig(per_channel=True))
    with ModelQuantizer(tiny_model, per_channel, stats):
        for c in range(conv.weight.shape[0]):
            assert conv.weight[c].unique().numel() <= 256


def test_clipping_lowers_error_on_heavy_tails(tiny_model, stats):
    """At 4 bits, analytical clipping should beat no clipping on the logits' MSE on average."""
    x = heavy_tailed(16, 7)
    with torch.no_grad():
        ref = tiny_model(x)
        errors = {}
        for threshold in ("no", "laplace"):
            config = QuantConfig(act=ActivationConfig(bits=3, method=threshold, first_bits=3))
            with ModelQuantizer(tiny_model, config, stats):
                errors[threshold] = (tiny_model(x) - ref).square().mean().item()
    assert errors["laplace"] < errors["no"]


def test_stochastic_is_reproducible(tiny_model, stats):
    x = torch.randn(4, 3, 16, 16)
    config = QuantConfig(act=ActivationConfig(bits=2, stochastic=True), seed=3)
    outs = []
    with torch.no_grad():
        for _ in range(2):
            with ModelQuantizer(tiny_model, config, stats):
                outs.append(tiny_model(x))
    assert torch.equal(outs[0], outs[1])


def test_stats_of_another_model_are_refused(stats):
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    with pytest.raises(ValueError, match="collect them again"):
        ModelQuantizer(other, QuantConfig(act=ActivationConfig(bits=4)), stats)


def test_no_stats_mode_names_layer_with_nan(tiny_model):
    with torch.no_grad():
        tiny_model.features[3].bias[0] = float("inf")
    with pytest.raises(FloatingPointError, match="conv1_activation"), torch.no_grad():
        config = QuantConfig(act=ActivationConfig(bits=4), weight=WeightConfig(bits=None, bias_bits=None))
        with ModelQuantizer(tiny_model, config):
            tiny_model(torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("bad, field", [({"bits": 0}, "act.bits"), ({"bits": 33}, "act.bits"),
                                        ({"method": "median"}, "act.method"), ({"sigma": "x"}, "act.sigma")])
def test_bad_config(bad, field):
    with pytest.raises(ValueError) as err:
        QuantConfig(act=ActivationConfig(**bad))
    assert isinstance(err.value, ConfigError) and err.value.fields == (field,)


class WithAttention(torch.nn.Module):
    """nn.MultiheadAttention uses out_proj's weights without calling it: that Linear's hook never fires."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        return self.fc(self.attn(tokens, tokens, tokens)[0].mean(1))


def test_layers_never_called_are_left_out(tmp_path):
    torch.manual_seed(0)
    model = WithAttention().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), StatisticsCollector(model) as collector:
        model(x)
    stats = load_statistics(collector.save(tmp_path / "s", {"arch": "attn"}))
    assert stats.layer_names == ["conv0_activation", "linear1_activation"]
    q = ModelQuantizer(model, QuantConfig(act=ActivationConfig(bits=4, method="laplace")), stats)
    assert plan_table(q.plan).loc["linear0_activation", "role"] == "unobserved"
    with torch.no_grad():
        before = model(x)
        with q:
            assert not torch.equal(model(x), before)
        assert torch.equal(model(x), before)


def test_custom_test_order_skips_layers_never_called(tmp_path):
    """-ct on a model with a Linear used through its weights only (ViT's out_proj): no StatisticsError."""
    torch.manual_seed(0)
    model = WithAttention().eval()
    with torch.no_grad(), StatisticsCollector(model) as collector:
        model(torch.randn(2, 3, 8, 8))
    stats = load_statistics(collector.save(tmp_path / "s", {"arch": "attn"}))
    layers = activation_layers(model)
    specs = layer_policy(QuantConfig(act=ActivationConfig(bits=4, method="laplace")), layers).specs(layers)
    assert mse_order(layers, stats, specs) == []
