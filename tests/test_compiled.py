"""Quantized inference under torch.compile: the fused, traced quantization gives the eager bits."""

import pytest
import torch
from torch import nn

from pytorch_quantizer.compiled import INDUCTOR_OPTIONS, compile_model, inductor_options
from pytorch_quantizer.fake_quant import gemmlowp_qparams, quantize_with_qparams
from pytorch_quantizer.model_quantizer import ModelQuantizer
from pytorch_quantizer.quant_config import ActivationConfig, QuantConfig, WeightConfig
from pytorch_quantizer.stats import StatisticsCollector, load_statistics

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]

# (delta, offset, bits, preserve_zero, pow2_scale): one grid per slice of the input, all in one compiled graph
GRIDS = [
    (6.0, -3.0, 8, False, False),
    (3.7, -1.3, 4, True, False),
    (2.9, 0.0, 2, False, False),
    (11.3, -5.1, 16, False, False),
    (1e-3, 2.5, 3, True, True),
    (7.0, -0.4, 1, False, False),
]
QPARAMS = [gemmlowp_qparams(*grid) for grid in GRIDS]


def layer_like(x: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    """What a hooked network does around each quantization: an op makes a tensor, the hook quantizes it in place
    (here also a transposed view: non-contiguous), an element-wise op reads it."""
    outs = []
    for i, qp in enumerate(QPARAMS):
        y = x[i] * w
        target = y.t() if i % 2 else y
        quantize_with_qparams(target, qp, inplace=True)
        outs.append(torch.relu(y) + 0.5 * y)
    return outs


def inputs(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(GRIDS), 512, 384, generator=g) * 4
    x[:, 0, :8] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-42, -1e-42, 3e38])
    w = torch.rand(384, generator=g) + 0.5
    w[:8] = 1.0
    return x.to(device), w.to(device)


def test_this_torch_knows_every_inductor_option():
    assert inductor_options() == INDUCTOR_OPTIONS


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_quantization_gives_eager_bits(device):
    torch.compiler.reset()
    x, w = inputs(device)
    with torch.inference_mode():
        eager = layer_like(x, w)  # the compiled kernel for this device where it is built
        compiled = torch.compile(layer_like, dynamic=False, options=inductor_options())(x, w)
    for grid, e, c in zip(GRIDS, eager, compiled, strict=True):
        assert torch.equal(e.isnan(), c.isnan()), grid
        same = (e == c) | (e.isnan() & c.isnan())
        assert same.all(), f"{grid}: {(~same).sum().item()} elements differ"
        assert torch.equal(e.signbit() & ~e.isnan(), c.signbit() & ~c.isnan()), grid  # -0.0 vs 0.0 too


class DyadicNet(nn.Module):
    """Small conv net whose arithmetic is exact in float32: weights, inputs and activation grids are dyadic
    (multiples of powers of two, few bits): any summation order gives the same sums, so the compiled convolutions match
    the eager ones exactly and the comparison below isolates the quantization."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randint(-8, 9, param.shape) / 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y) + self.conv3(y))
        return self.fc(y.mean(dim=(2, 3)))


def dyadic_images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(-4, 5, (n, 3, 12, 12), generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_network_matches_eager_and_follows_the_hooks(device, tmp_path):
    torch.manual_seed(0)
    model = DyadicNet().eval().to(device)
    images = dyadic_images(8, 1).to(device)
    with torch.inference_mode():
        with StatisticsCollector(model) as collector:
            model(dyadic_images(4, 0).to(device))
        stats = load_statistics(collector.save(tmp_path / "s", {"arch": "dyadic"}))
        config = QuantConfig(act=ActivationConfig(bits=3, method="laplace", pow2_scale=True, preserve_zero=True),
                             weight=WeightConfig(bits=4, bias_bits=4, pow2_scale=True))
        torch.compiler.reset()
        compiled = compile_model(model)
        fp32 = model(images)
        assert torch.equal(compiled(images), fp32)
        # the same compiled model, hooks attached after its first call: it must recompile, not rerun FP32's graph
        with ModelQuantizer(model, config, stats):
            eager = model(images)
            quantized = compiled(images)
        assert torch.equal(compiled(images), fp32)  # and after detaching, FP32 again
        torch.compiler.reset()
    assert not torch.equal(eager, fp32)
    assert torch.equal(quantized, eager)
