"""ReLU-fed layer detection (pytorch_quantizer.graph) on torchvision models, EfficientNet-Lite and hand-written ones.

Models are built with random weights (structure is all that matters) and folded on a small input: folding only
needs one forward pass to pair convs with their BatchNorms, and 64x64 runs every layer of these models."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.models import get_model

from pytorch_quantizer.graph import _combine, _recorded_uses, relu_fed_layers
from pytorch_quantizer.layers import activation_layers
from pytorch_quantizer.models import build_model, fold_batchnorm

FOLD_INPUT = (2, 3, 64, 64)


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Small forwards on a shared machine: intra-op threads mostly wait for each other (seconds, not tenths)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def _models(arch: str) -> tuple[nn.Module, nn.Module]:
    """(unfolded, folded) eval-mode ``arch`` with random weights, built once per test session; without BatchNorm
    (vgg11, squeezenet) the two are the same model."""
    if arch.startswith("efficientnet_lite"):
        pytest.importorskip("efficientnet_lite_pytorch", reason="EfficientNet-Lite needs efficientnet_lite_pytorch")
    torch.manual_seed(0)
    with _single_threaded():
        lite = arch.startswith("efficientnet_lite")
        model = build_model(arch, "none")[0] if lite else get_model(arch, weights=None).eval()
        if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            return model, model
        return model, fold_batchnorm(model, torch.randn(*FOLD_INPUT))[0]


def _recorded(model: nn.Module, example_input: torch.Tensor) -> dict[str, float | None]:
    """The ReLU-fed layers found from one forward pass (the fallback for models fx cannot trace)."""
    with _single_threaded():
        return _combine(model, _recorded_uses(model, example_input))


def _layer_names(model: nn.Module) -> list[str]:
    return [layer.module_name for layer in activation_layers(model)]


def test_resnet18() -> None:
    unfolded, folded = _models("resnet18")
    # the stem and each block's conv1 go (through the folded bn1) only into a ReLU; each block's conv2 and the
    # downsample conv feed `out += identity` before the ReLU, and fc is the output
    expected = {"conv1"} | {f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)}
    assert relu_fed_layers(folded) == dict.fromkeys(expected)
    assert len(_layer_names(folded)) == 21
    # BatchNorm is not an identity: conv -> BN -> ReLU does not qualify until BN is folded
    assert relu_fed_layers(unfolded) == {}


def test_mobilenet_v2() -> None:
    unfolded, folded = _models("mobilenet_v2")
    # stem and last 1x1 conv, block 1 (expand ratio 1: depthwise only), then each block's expand and depthwise
    # convs feed ReLU6; projection convs (linear bottleneck: BN, then the residual add or the next block) and the
    # classifier do not
    expected = {"features.0.0", "features.1.conv.0.0", "features.18.0"}
    expected |= {f"features.{i}.conv.{j}.0" for i in range(2, 18) for j in range(2)}
    assert relu_fed_layers(folded) == dict.fromkeys(expected, 6.0)
    assert len(expected) == 35 and len(_layer_names(folded)) == 53
    assert "features.1.conv.1" not in expected and "features.5.conv.2" not in expected
    assert relu_fed_layers(unfolded) == {}


# squeeze-excitation fc1 (no BN, ReLU) in the blocks that have SE, in both the folded and unfolded model
MOBILENET_V3_SMALL_SE = {"features.1.block.1.fc1"} | {f"features.{i}.block.2.fc1" for i in range(4, 12)}


def test_mobilenet_v3_small() -> None:
    unfolded, folded = _models("mobilenet_v3_small")
    # blocks 1-3 use ReLU ("RE"): block 1 has only a depthwise conv before SE, 2-3 expand + depthwise; blocks 4-11,
    # the stem, the last conv and classifier.0 use Hardswish, which is not ReLU-like (it is negative down to -3)
    expected = MOBILENET_V3_SMALL_SE | {"features.1.block.0.0", "features.2.block.0.0", "features.2.block.1.0",
                                        "features.3.block.0.0", "features.3.block.1.0"}
    assert relu_fed_layers(folded) == dict.fromkeys(expected)
    assert len(_layer_names(folded)) == 54
    hardswish = {"features.0.0", "features.4.block.0.0", "features.4.block.1.0", "features.12.0", "classifier.0"}
    se_fc2 = {"features.1.block.1.fc2", "features.4.block.2.fc2"}  # -> Hardsigmoid, then scales the input
    projection = {"features.1.block.2.0", "features.4.block.3.0"}  # linear bottleneck
    assert not expected & (hardswish | se_fc2 | projection | {"classifier.3"})
    assert relu_fed_layers(unfolded) == dict.fromkeys(MOBILENET_V3_SMALL_SE)


def test_mobilenet_v3_large() -> None:
    _, folded = _models("mobilenet_v3_large")
    # ReLU blocks 1-6 (block 1 depthwise only, 4-6 with SE); blocks 7-15 use Hardswish, but 11-15 have SE fc1 -> ReLU
    expected = {"features.1.block.0.0"} | {f"features.{i}.block.{j}.0" for i in range(2, 7) for j in range(2)}
    expected |= {f"features.{i}.block.2.fc1" for i in (4, 5, 6, 11, 12, 13, 14, 15)}
    assert relu_fed_layers(folded) == dict.fromkeys(expected)
    assert len(expected) == 19 and len(_layer_names(folded)) == 64


def test_squeezenet() -> None:
    model, _ = _models("squeezenet1_0")
    # every conv has its own ReLU: Fire's expand convs go into their ReLUs and only the ReLU outputs are
    # concatenated, and the classifier's final conv is followed by a ReLU before pooling; no BN in this model
    result = relu_fed_layers(model)
    assert result == dict.fromkeys(_layer_names(model)) and len(result) == 26
    assert {"features.3.expand1x1", "features.3.expand3x3", "classifier.1"} <= result.keys()


@pytest.mark.parametrize("arch", ["vgg11", "vgg11_bn"])
def test_vgg(arch: str) -> None:
    unfolded, folded = _models(arch)
    names = _layer_names(folded)
    # every conv (after its folded BN in vgg11_bn) and the two hidden linears feed ReLUs; the last linear is the output
    assert relu_fed_layers(folded) == dict.fromkeys(names[:-1]) and len(names) == 11
    assert names[-1] == "classifier.6"
    # unfolded vgg11_bn: only the linears, which have no BN
    unfolded_expected = names[:-1] if arch == "vgg11" else ["classifier.0", "classifier.3"]
    assert relu_fed_layers(unfolded) == dict.fromkeys(unfolded_expected)


def test_efficientnet_lite0() -> None:
    unfolded, folded = _models("efficientnet_lite0")
    stem = folded.get_submodule("_conv_stem")
    assert type(stem) is not nn.Conv2d and isinstance(stem, nn.Conv2d)  # TF-style padded conv subclass
    # traced through, such a conv is a pad and an F.conv2d, no module call whose output to follow
    assert not any(n.op == "call_module" and n.target == "_conv_stem" for n in fx.symbolic_trace(folded).graph.nodes)
    # ReLU6 after the stem, every expand and depthwise conv (block 0 has no expand) and the head; projection convs
    # feed the residual add or the next block, and _fc is the output
    blocks = range(16)
    expected = {"_conv_stem", "_conv_head"} | {f"_blocks.{i}._depthwise_conv" for i in blocks}
    expected |= {f"_blocks.{i}._expand_conv" for i in blocks if i > 0}
    assert relu_fed_layers(folded) == dict.fromkeys(expected, 6.0)
    assert len(expected) == 33 and len(_layer_names(folded)) == 50
    assert not expected & ({f"_blocks.{i}._project_conv" for i in blocks} | {"_fc"})
    assert relu_fed_layers(unfolded) == {}


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "squeezenet1_0", "efficientnet_lite0"])
def test_forward_recording_agrees_with_the_graph(arch: str) -> None:
    _, folded = _models(arch)
    assert _recorded(folded, torch.randn(1, 3, 64, 64)) == relu_fed_layers(folded)


def _conv() -> nn.Conv2d:
    return nn.Conv2d(4, 4, 1)


class Handwritten(nn.Module):
    """One conv per rule; the comment gives its expected cap, or why it does not qualify."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("relu", "clamp", "inplace", "hardtanh", "clamp_min", "two_relus", "residual", "neg_clamp",
                     "hardtanh_neg", "clamp_max_arg", "train_dropout", "returned", "shared", "shape_only"):
            self.add_module(name, _conv())
        self.bn, self.identity = nn.BatchNorm2d(4), nn.Identity()
        self.dropout, self.train_drop = nn.Dropout().eval(), nn.Dropout().train()
        self.after_bn, self.fc, self.hardtanh_neg_act = _conv(), nn.Linear(4, 4), nn.Hardtanh(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outs = [
            F.relu(self.relu(x)),  # None
            self.clamp(x).clamp(min=0, max=4),  # 4.0
            self.inplace(x).relu_(),  # None
            F.hardtanh(self.dropout(self.identity(self.hardtanh(x))), 0.0, 2.0),  # 2.0, through identities
            torch.clamp_min(self.clamp_min(x), 0),  # None
            self.bn(self.after_bn(x)).relu(),  # BN is not an identity
        ]
        two = self.two_relus(x)
        outs += [F.relu6(two), torch.relu(two)]  # None: the loosest cap
        residual = self.residual(x)
        outs.append(F.relu(residual) + residual)  # also feeds the add
        outs.append(torch.clamp(self.neg_clamp(x), min=-1))  # keeps negatives
        outs.append(self.hardtanh_neg_act(self.hardtanh_neg(x)))  # Hardtanh(-1, 1) keeps negatives
        outs.append(torch.clamp(x, min=torch.zeros_like(x), max=self.clamp_max_arg(x)))  # the bound, not the input
        outs.append(F.relu(self.train_drop(self.train_dropout(x))))  # dropout in training scales: not an identity
        shared = self.shared(x)
        outs += [F.relu6(shared), F.relu6(self.shared(2 * x))]  # 6.0: both calls feed ReLU6
        shape_only = self.shape_only(x)
        outs.append(F.relu(shape_only).reshape(shape_only.shape))  # None: reading the shape reads no value
        return torch.stack(outs).sum(0), self.returned(x), torch.relu(self.fc(x.mean((2, 3))))  # returned: as is


HANDWRITTEN = {"relu": None, "clamp": 4.0, "inplace": None, "hardtanh": 2.0, "clamp_min": None, "two_relus": None,
               "shared": 6.0, "shape_only": None, "fc": None}


def test_handwritten_rules() -> None:
    torch.manual_seed(0)
    model = Handwritten().eval()
    model.train_drop.train()
    assert relu_fed_layers(model) == HANDWRITTEN
    assert list(relu_fed_layers(model)) == [n for n in _layer_names(model) if n in HANDWRITTEN]  # module order
    assert _recorded(model, torch.randn(2, 4, 3, 3)) == HANDWRITTEN


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _conv(), _conv()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if x.sum() > 0:
            return F.relu6(y) + self.b(x)
        return F.relu6(y) + self.b(x)


def test_untraceable_model_needs_example_input() -> None:
    model = Untraceable().eval()
    with pytest.raises(ValueError, match=r"torch\.fx cannot trace Untraceable .*example_input"):
        relu_fed_layers(model)
    assert relu_fed_layers(model, torch.randn(1, 4, 2, 2)) == {"a": 6.0}
