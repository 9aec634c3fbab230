"""--equalize: cross-layer equalization keeps the float function and equalizes each pair's channel ranges (DFQ's
condition), ReLU6 caps scale with their channels (one clamp per call of a shared module), high-bias absorption keeps
the function where the absorbed amount stays below the pre-activation, a per-tensor collapse is undone, and the CLI
refuses the combinations it cannot serve."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_cli import ARCH, data_dir  # noqa: F401  (the synthetic wnid folder fixture)
from torch import nn

import inference_sim
from pytorch_quantizer.equalize import _input_view, equalize
from pytorch_quantizer.graph import relu_fed_layers
from pytorch_quantizer.layers import ChannelClamp
from pytorch_quantizer.weights import quantize_parameter


class Chain(nn.Module):
    """conv -> ReLU -> conv -> ReLU6 -> depthwise -> (shared ReLU6) -> 1x1 conv -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(8, 16, 1)
        self.act = nn.ReLU6()
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.project = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(self.relu(self.conv0(x))))
        x = self.project(self.act(self.dw(x)))  # self.act called twice: each call gets its own clamp
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def skewed_chain(seed: int = 0) -> Chain:
    """A chain whose producers' output channels differ by up to 1000x, each compensated in the consumer, so the
    float function is an ordinary one but per-tensor weight grids waste most levels."""
    torch.manual_seed(seed)
    model = Chain().eval()
    with torch.no_grad():
        for first, second in ((model.conv0, model.conv1), (model.conv1, model.dw), (model.dw, model.project)):
            factor = torch.logspace(-1.5, 1.5, first.out_channels)[torch.randperm(first.out_channels)]
            first.weight.mul_(factor.view(-1, 1, 1, 1))
            first.bias.mul_(factor)
            if first is model.conv1:  # the ReLU6 cap must scale too for the function to stay: keep the caps unreached
                first.weight.mul_(0.01)
                first.bias.mul_(0.01)
                factor = factor * 0.01
            _input_view(second).div_(factor.view(-1, 1))
    return model


def test_equalization_keeps_the_function_and_equalizes_each_pair():
    model = skewed_chain()
    x = torch.randn(4, 3, 16, 16)
    result = equalize(model, x)
    assert set(result.pairs) == {("conv0", "conv1"), ("conv1", "dw"), ("dw", "project")}
    assert result.clamps == 2  # conv1 -> act -> dw and dw -> act -> project: one clamp a call
    with torch.no_grad():
        before, after = model(x), result.model(x)
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    modules = dict(result.model.named_modules())
    for first, second in result.pairs:
        r1 = modules[first].weight.flatten(1).abs().amax(1)
        r2 = _input_view(modules[second]).abs().amax(1)
        assert torch.allclose(r1, r2, rtol=1e-2), (first, second)  # DFQ's condition, within the sweeps' tolerance
    clamps = [m for m in modules.values() if isinstance(m, ChannelClamp)]
    assert len(clamps) == 2 and all(not torch.allclose(c.upper, c.upper[0]) for c in clamps)  # per-channel caps
    assert isinstance(model.act, nn.ReLU6)  # the input model is not modified


def test_equalization_undoes_a_per_tensor_collapse():
    """8-bit per-tensor weights of the skewed chain lose most of the output; equalized, they keep it."""
    model = skewed_chain()
    x = torch.randn(8, 3, 16, 16)
    equalized = equalize(model, x).model

    def error(net: nn.Module) -> float:
        layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            reference = net(x)
            saved = [m.weight.clone() for m in layers]
            for m in layers:
                m.weight.copy_(quantize_parameter(m.weight, 8, False, True, False))
            out = net(x)
            for m, w in zip(layers, saved, strict=True):
                m.weight.copy_(w)
        return ((out - reference).norm() / reference.norm()).item()

    skewed, fixed = error(model), error(equalized)
    assert fixed < 0.02 and fixed < skewed / 10, (skewed, fixed)


def test_relu6_clamps_stay_relu_like_for_the_half_range():
    result = equalize(skewed_chain(), torch.randn(2, 3, 16, 16))
    caps = relu_fed_layers(result.model)
    assert {"conv0", "conv1", "dw"} <= set(caps) and caps["conv0"] is None and caps["conv1"] is not None


def test_high_bias_absorption_keeps_the_function_above_the_absorbed_amount():
    """With the pre-activations of conv0 above c = mean - 3 std, moving c into conv1's bias changes nothing; the
    activation conv1 reads is narrower."""
    torch.manual_seed(1)
    model = Chain().eval()
    with torch.no_grad():
        model.conv0.bias.copy_(torch.linspace(2.0, 6.0, 8))  # every pre-activation far above 0
        model.conv0.weight.mul_(0.05)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        pre = model.conv0(x)
    mean = pre.mean((0, 2, 3))
    std = (pre.amin((0, 2, 3)) - mean).abs() / 3  # so mean - 3 std is each channel's minimum: no value below it
    result = equalize(model, x, {"conv0": (mean, std)})
    assert result.absorbed == 1
    with torch.no_grad():
        before, after = model(x), result.model(x)
        reads = result.model.conv0(x).clamp_min(0)
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-5)
    assert reads.amin((0, 2, 3)).max() < 1e-4  # the absorbed channels now start at 0


def test_a_network_without_pairs_is_unchanged_and_says_so():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 3)).eval()
    result = equalize(model, torch.randn(1, 3, 16, 16))
    assert result.pairs == () and "model is unchanged" in result.summary()


def run_cli(data: Path, out: Path, *flags: str) -> int:
    argv = ["--data", str(data), *ARCH, "-b", "4", "-j", "0", "--results", str(out / "results.csv"), *flags]
    try:
        return inference_sim.main(argv)
    except SystemExit as exit_:
        return int(exit_.code)


def test_cli_equalize_collects_and_uses_its_own_statistics(data_dir, tmp_path, capsys):  # noqa: F811
    assert run_cli(data_dir, tmp_path, "-sm", "collect", "-cs", "4", "-sf", str(tmp_path / "eq"), "--equalize") == 0
    assert run_cli(data_dir, tmp_path, "-sm", "collect", "-cs", "4", "-sf", str(tmp_path / "plain")) == 0
    capsys.readouterr()
    assert run_cli(data_dir, tmp_path, "-sm", "use", "-sf", str(tmp_path / "eq"), "--equalize", "--qtype", "int4",
                   "--float_bias") == 0
    for folder, flags in (("plain", ["--equalize"]), ("eq", [])):  # statistics of the other model: refused
        assert run_cli(data_dir, tmp_path, "-sm", "use", "-sf", str(tmp_path / folder), "--qtype", "int4",
                       *flags) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "equalized=" in err, err
    import pandas as pd
    rows = pd.read_csv(tmp_path / "results.csv")
    assert rows["equalize"].tolist() == [True, False, True]


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--equalize", "--no_fold_bn"], "--equalize"),
])
def test_cli_refuses_equalize_unfolded(data_dir, tmp_path, capsys, flags, fragment):  # noqa: F811
    assert run_cli(data_dir, tmp_path, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err and "--no_fold_bn" in err, err
    assert not (tmp_path / "results.csv").exists()


def test_a_model_without_shared_caps_keeps_its_class_and_module_paths():
    """Clamps go into the model's own hierarchy when each capped module is called once (what the ONNX export maps
    nodes by); only a shared ReLU6 needs the traced graph."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 12, 12)
    result = equalize(model, x)
    assert type(result.model) is nn.Sequential and isinstance(result.model[1], ChannelClamp)
    assert isinstance(equalize(skewed_chain(), x).model, torch.fx.GraphModule)  # Chain calls self.act twice
    with torch.no_grad():
        assert torch.allclose(model(x), result.model(x), atol=1e-5)


def test_cli_equalize_exports_to_onnx_or_refuses_before_the_pass(data_dir, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("onnxruntime")
    base = ["-cs", "4", "--equalize", "--weights", "none"]
    for arch in ("mobilenet_v2", "efficientnet_lite0"):
        assert run_cli(data_dir, tmp_path, "-a", arch, *base, "-sm", "collect", "-sf", str(tmp_path / arch)) == 0
    capsys.readouterr()
    assert run_cli(data_dir, tmp_path, "-a", "mobilenet_v2", *base, "-sm", "use", "-sf", str(tmp_path / "mobilenet_v2"),
                   "--qtype", "int8", "-pz", "--export_onnx", str(tmp_path / "m.onnx"), "--eval_onnx") == 0
    assert "ONNX Runtime against the simulator: top-1 agreement 100.00 %" in capsys.readouterr().out
    rows = len(open(tmp_path / "results.csv").readlines())
    assert run_cli(data_dir, tmp_path, "-a", "efficientnet_lite0", *base, "-sm", "use", "-sf",
                   str(tmp_path / "efficientnet_lite0"), "--qtype", "int8", "-pz", "--export_onnx",
                   str(tmp_path / "e.onnx")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "export it without --equalize" in err, err
    assert not (tmp_path / "e.onnx").exists() and len(open(tmp_path / "results.csv").readlines()) == rows
