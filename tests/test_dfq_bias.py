"""-bcdf: DFQ's data-free bias correction (pytorch_quantizer/dfq_bias.py)."""

import logging
import math

import pandas as pd
import pytest
import torch
from scipy import integrate, stats
from test_cli import data_dir, run_cli  # noqa: F401  (module fixture of the CLI tests)
from torch import nn

from pytorch_quantizer.dfq_bias import (
    DataFreeBiasError,
    clipped_normal_mean,
    data_free_shifts,
    expected_inputs,
    gaussian_mean,
    mean_error,
)
from pytorch_quantizer.equalize import batchnorm_moments, equalize
from pytorch_quantizer.layers import activation_layers
from pytorch_quantizer.model_quantizer import ModelQuantizer
from pytorch_quantizer.models import fold_batchnorm
from pytorch_quantizer.quant_config import ActivationConfig, QuantConfig, WeightConfig

WEIGHTS_ONLY = QuantConfig(act=ActivationConfig(bits=None), weight=WeightConfig(bits=3, bias_bits=None))


@pytest.mark.parametrize("mean, std, cap", [(0.5, 1.0, None), (-1.0, 2.0, 6.0), (4.0, 3.0, 6.0), (1.0, 0.0, 6.0),
                                            (7.0, 0.0, 6.0), (-30.0, 1.0, None)])
def test_clipped_normal_mean_is_the_integral(mean, std, cap):
    if std == 0:
        expected = min(max(mean, 0.0), math.inf if cap is None else cap)
    else:
        density = stats.norm(mean, std).pdf
        upper = math.inf if cap is None else cap
        inside = integrate.quad(lambda x: x * density(x), 0.0, upper)[0]
        expected = inside + (0.0 if cap is None else cap * stats.norm(mean, std).sf(cap))
    got = clipped_normal_mean(torch.tensor([mean]), torch.tensor([std]), cap).item()
    assert got == pytest.approx(expected, rel=1e-7, abs=1e-12)


class Block(nn.Module):
    """conv -> BN -> ReLU6 -> 1x1 conv -> BN, added to a second 1x1 branch, pooled into a classifier: each rule of
    the graph walk (activation, identity, residual add, pooling, flatten) on Gaussian pre-activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0, self.act = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU6()
        self.conv1, self.bn1 = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 1, groups=6)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn0(self.conv0(x)))
        s = self.bn1(self.conv1(h)) + self.bn2(self.conv2(h))
        return self.fc(torch.flatten(self.pool(self.dw(s)), 1))


def _calibrated(model: nn.Module, images: torch.Tensor, bias: tuple[float, float] = (-1.0, 5.0)) -> nn.Module:
    """``model`` with BatchNorms that hold the statistics of ``images`` (as a trained network's do of its data), and
    affine parameters that put channels on both sides of 0 and 6."""
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in batchnorms:
            bn.weight.copy_(torch.linspace(0.5, 3.0, bn.num_features))
            bn.bias.copy_(torch.linspace(*bias, bn.num_features))
            bn.momentum = None  # cumulative average: the running statistics are those of the whole batch
        model.train()(images)
    return model.eval()


def _calibrated_block(images: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    return _calibrated(Block(), images)


def _inputs(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each layer's measured input channel means."""
    means, handles = {}, []
    for layer in activation_layers(model):
        def hook(module, inputs, name=layer.module_name):
            x = inputs[0]
            means[name] = x.mean([d for d in range(x.dim()) if d != 1]).double()
        handles.append(layer.module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return means


def test_expected_inputs_match_the_measured_means():
    """conv0's output is a linear function of Gaussian pixels, so Gaussian: conv1/conv2 read its ReLU6, whose mean
    the clipped-normal formula gives; dw reads the sum of two BatchNorm outputs; fc the pooled dw output (dw's own
    BatchNorm-free output has no prediction). The image-fed conv0 has none either."""
    images = torch.randn(400, 3, 10, 10)
    original = _calibrated_block(images)
    folded, pairs = fold_batchnorm(original, images[:2])
    expected = expected_inputs(folded, batchnorm_moments(original, pairs))
    assert set(expected) == {"conv1", "conv2", "dw"}
    measured = _inputs(folded, images)
    for name, mean in expected.items():
        assert torch.allclose(mean, measured[name], rtol=0.02, atol=0.02), (name, mean, measured[name])


def test_pooling_carries_the_means_to_the_classifier():
    images = torch.randn(400, 3, 10, 10)
    original = _calibrated_block(images)
    folded, pairs = fold_batchnorm(original, images[:2])
    moments = batchnorm_moments(original, pairs)
    moments["dw"] = (torch.linspace(-1, 1, 6), torch.ones(6))  # as if dw had a BatchNorm: fc gets its mean
    expected = expected_inputs(folded, moments)
    assert torch.equal(expected["fc"], moments["dw"][0].double())


def test_placeholder_batchnorms_predict_nothing(tiny_model):
    """Running mean 0 and variance 1 (untrained, or folded before export) say nothing of the data."""
    folded, pairs = fold_batchnorm(tiny_model, torch.randn(2, 3, 8, 8))
    assert pairs and expected_inputs(folded, batchnorm_moments(tiny_model, pairs)) == {}


def test_the_correction_removes_the_mean_shift_of_quantized_weights():
    """With 3-bit weights, each layer's output mean on the Gaussian images moves; the predicted shift brings the
    quantized layer's mean (on the float layer's input) back to the float one's, to the sampling error."""
    images = torch.randn(400, 3, 10, 10)
    original = _calibrated_block(images)
    folded, pairs = fold_batchnorm(original, images[:2])
    expected = expected_inputs(folded, batchnorm_moments(original, pairs))
    layers = activation_layers(folded)
    originals = {layer.module_name: (layer.module.weight.detach().clone(), layer.module.bias.detach().clone())
                 for layer in layers}
    float_inputs = {}
    handles = [layer.module.register_forward_pre_hook(
        lambda module, inputs, name=layer.module_name: float_inputs.__setitem__(name, inputs[0])) for layer in layers]
    with torch.no_grad():
        folded(images)
    for handle in handles:
        handle.remove()
    with ModelQuantizer(folded, WEIGHTS_ONLY, None):
        shifts = data_free_shifts(layers, originals, expected)
    assert set(shifts) == set(expected)

    def output_means(shift: dict) -> dict[str, torch.Tensor]:
        means = {}
        with ModelQuantizer(folded, WEIGHTS_ONLY, None, shift), torch.no_grad():
            for layer in layers:
                if layer.module_name in expected:
                    y = layer.module(float_inputs[layer.module_name])
                    means[layer.module_name] = y.mean([d for d in range(y.dim()) if d != 1]).double()
        return means

    with torch.no_grad():
        reference = {name: layers_out.mean([d for d in range(layers_out.dim()) if d != 1]).double()
                     for name, layers_out in ((layer.module_name, layer.module(float_inputs[layer.module_name]))
                                              for layer in layers if layer.module_name in expected)}
    before, after = output_means({}), output_means(shifts)
    for name in expected:
        error_before = (before[name] - reference[name]).abs().max().item()
        error_after = (after[name] - reference[name]).abs().max().item()
        assert error_before > 1e-2 and error_after < 0.1 * error_before, (name, error_before, error_after)


def test_mean_error_of_grouped_convs_and_linears():
    """The formula against a direct evaluation on a constant input (a conv without padding sees each channel's
    mean at every position)."""
    torch.manual_seed(2)
    for layer in (nn.Conv2d(4, 6, 3, groups=2), nn.Conv2d(4, 4, 1, groups=4), nn.Linear(4, 3)):
        weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
        with torch.no_grad():
            layer.weight.add_(0.1 * torch.randn_like(layer.weight))
            layer.bias.add_(0.05)
        mean = torch.randn(4)
        x = mean.view(1, 4, 1, 1).expand(1, 4, 5, 5) if isinstance(layer, nn.Conv2d) else mean.view(1, 4)
        with torch.no_grad():
            direct = layer(x) - nn.functional.conv2d(x, weight, bias, groups=layer.groups) \
                if isinstance(layer, nn.Conv2d) else layer(x) - nn.functional.linear(x, weight, bias)
        direct = direct.mean([d for d in range(direct.dim()) if d != 1])
        assert torch.allclose(mean_error(layer, weight, bias, mean).float(), direct, atol=1e-5)


def test_equalization_carries_the_moments_it_scaled():
    """After --equalize a producer's output channel i is divided by its scale s_i, and less the high bias absorbed
    from it: so are its moments, and the predicted means still match the measured ones."""
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU6(), nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6),
                          nn.ReLU(), nn.Conv2d(6, 4, 1))
    images = torch.randn(400, 3, 10, 10)
    original = _calibrated(chain, images, bias=(-1.0, 12.0))
    folded, pairs = fold_batchnorm(original, images[:2])
    result = equalize(folded, images[:2], batchnorm_moments(original, pairs))
    assert len(result.pairs) == 2 and result.absorbed == 2
    expected = expected_inputs(result.model, result.moments)
    assert set(expected) == {"3", "6"}
    measured = _inputs(result.model, images)
    for name, mean in expected.items():
        assert torch.allclose(mean, measured[name], rtol=0.02, atol=0.02), (name, mean, measured[name])


def _trained_like_weights(path) -> None:
    """mobilenet_v2 weights whose BatchNorms hold statistics (not the placeholders of an untrained network)."""
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    model = mobilenet_v2()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.bias.uniform_(-0.5, 1.0)
    torch.save(model.state_dict(), path)


def test_cli_bcdf_corrects_and_says_where(data_dir, tmp_path, caplog):  # noqa: F811
    weights = tmp_path / "mnv2.pth"
    _trained_like_weights(weights)
    arch = ["-a", "mobilenet_v2", "--weights", str(weights)]
    assert run_cli(data_dir, tmp_path, *arch, "-sm", "collect", "-cs", "4") == 0
    with caplog.at_level(logging.INFO, logger="pytorch_quantizer"):
        assert run_cli(data_dir, tmp_path, *arch, "-sm", "use", "-qw", "int4", "--qtype", "int8", "-bcdf") == 0
    said = [r.getMessage() for r in caplog.records if "-bcdf" in r.getMessage()]
    assert said and "the input means of 52 of 53 layers are predicted" in said[0], said
    row = pd.read_csv(tmp_path / "results.csv", keep_default_na=False).iloc[-1]
    assert str(row["correct.data_free_bias"]) == "True" and float(row["cal_seconds"]) >= 0


def test_cli_bcdf_without_batchnorm_statistics_warns(data_dir, tmp_path, caplog):  # noqa: F811
    """The default small model, untrained: its BatchNorms are placeholders."""
    with caplog.at_level(logging.WARNING, logger="pytorch_quantizer"):
        assert run_cli(data_dir, tmp_path, "-sm", "no", "-qw", "int4", "-bcdf") == 0
    assert "nothing is corrected" in caplog.text


@pytest.mark.parametrize("flags, message", [
    (("-sm", "collect", "-bcdf"), "not in a collect pass"),
    (("-sm", "no", "-qw", "int4", "-bcdf", "-bca", "-cs", "4"), "give one of them"),
    (("-sm", "no", "-qw", "int4", "-bcdf", "--no_fold_bn"), "--no_fold_bn"),
    (("-sm", "no", "-qw", "f32", "--qtype", "int8", "-bcdf"), "weights are float"),
])
def test_bad_bcdf_input_is_one_line_exit_2(data_dir, tmp_path, capsys, flags, message):  # noqa: F811
    assert run_cli(data_dir, tmp_path, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "stats").exists() and not (tmp_path / "results.csv").exists()


def test_a_network_fx_cannot_trace_is_refused_in_one_line():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > 0 else self.conv(-x)  # data-dependent control flow

    with pytest.raises(DataFreeBiasError, match="torch.fx cannot trace") as raised:
        expected_inputs(Branchy(), {})
    assert "\n" not in str(raised.value)


def test_quadrature_means_match_the_closed_form_and_sampling():
    """Gauss-Hermite against the clipped-normal formula (ReLU6, kinked: the hard case) and against a million
    samples of SiLU and Hardswish."""
    mean, std = torch.tensor([-1.0, 0.5, 3.0, 7.0]), torch.tensor([2.0, 1.0, 3.0, 0.5])
    relu6 = gaussian_mean(nn.ReLU6(), mean, std)
    assert torch.allclose(relu6, clipped_normal_mean(mean, std, 6.0), rtol=2e-3, atol=2e-3)
    g = torch.Generator().manual_seed(0)
    samples = mean.double().unsqueeze(-1) + std.double().unsqueeze(-1) * torch.randn(4, 1_000_000, generator=g,
                                                                                     dtype=torch.float64)
    for f in (nn.SiLU(), nn.Hardswish()):
        assert torch.allclose(gaussian_mean(f, mean, std), f(samples).mean(-1), rtol=0, atol=1e-2), f


class SiluBlock(nn.Module):
    """conv -> BN -> SiLU -> conv, as EfficientNet's and MobileNetV3's blocks (there with Hardswish) are."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
        self.act, self.conv1 = nn.SiLU(), nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(self.act(self.bn0(self.conv0(x))))


def test_a_smooth_activation_is_predicted_through():
    torch.manual_seed(0)
    images = torch.randn(400, 3, 10, 10)
    original = _calibrated(SiluBlock(), images)
    folded, pairs = fold_batchnorm(original, images[:2])
    expected = expected_inputs(folded, batchnorm_moments(original, pairs))
    assert set(expected) == {"conv1"}
    measured = _inputs(folded, images)["conv1"]
    assert torch.allclose(expected["conv1"], measured, rtol=0.02, atol=0.02), (expected["conv1"], measured)
