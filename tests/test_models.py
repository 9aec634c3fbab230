"""Model construction, weights handling, preprocessing and BatchNorm folding, offline with random weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T
from torchvision.models import get_model_weights

from pytorch_quantizer.models import (
    LITE_ARCHS,
    ModelError,
    Preprocess,
    available_archs,
    build_model,
    default_weights,
    fold_batchnorm,
    weights_fingerprint,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TFLITE_MOBILENET = SHARED / "weights" / "mobilenet_v2_tflite_quant.pth"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny forwards are fastest single-threaded, and on a busy machine intra-op threads can stall for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters, so folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)


def test_available_archs_lists_torchvision_models() -> None:
    archs = available_archs()
    assert {"resnet18", "mobilenet_v2", "inception_v3"} <= set(archs)
    assert len(archs) == len(set(archs))


def test_build_none_is_eval_and_deterministic() -> None:
    torch.manual_seed(0)
    a, pre = build_model("resnet18", "none")
    torch.manual_seed(0)
    b, _ = build_model("resnet18", "NONE")
    assert not a.training
    assert weights_fingerprint(a) == weights_fingerprint(b)
    assert pre == Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")


def test_preprocess_from_metadata_without_download() -> None:
    pre = Preprocess.from_weights(get_model_weights("inception_v3").DEFAULT)
    assert (pre.resize, pre.crop, pre.input_size) == (342, 299, (3, 299, 299))
    # a local file or "none" gets the standard (V1) recipe, not the V2 weights' resize 232
    _, pre = build_model("mobilenet_v2", "none")
    assert (pre.resize, pre.crop) == (256, 224)


def test_preprocess_split_transform_matches_totensor_normalize() -> None:
    pre = Preprocess(40, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    image = Image.fromarray(torch.randint(0, 256, (50, 60, 3), dtype=torch.uint8).numpy())
    classic = T.Compose([T.Resize(40), T.CenterCrop(32), T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    out = pre.transform()(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, classic(image))
    assert torch.equal(pre.normalize_transform()(pre.decode_transform()(image)), out)
    with pytest.raises(ValueError):
        Preprocess(256, 224, (0.5, 0.5), (0.5, 0.5, 0.5))


def test_unknown_arch() -> None:
    with pytest.raises(ModelError, match=r"resnet18.*available_archs"):
        build_model("resnet19", "none")


def test_default_weights_are_the_seeds() -> None:
    """The seed's pretrained=True loaded IMAGENET1K_V1; DEFAULT is V2 for resnet50 (another model)."""
    assert get_model_weights("resnet50").DEFAULT.name == "IMAGENET1K_V2"
    assert default_weights("resnet50") == default_weights("resnet18") == "IMAGENET1K_V1"
    without_v1 = [a for a in available_archs() if a not in LITE_ARCHS
                  and "IMAGENET1K_V1" not in get_model_weights(a).__members__]
    assert without_v1 and all(default_weights(a) == "DEFAULT" for a in without_v1)
    with pytest.raises(ModelError, match="unknown architecture"):
        default_weights("resnet19")


def test_bad_weights_arguments(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        build_model("resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(ModelError, match=r"neither a weights name of resnet18 \(IMAGENET1K_V1"):
        build_model("resnet18", "IMAGENET_V7")
    with pytest.raises(ModelError, match="not a file"):
        build_model("resnet18", str(tmp_path))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read weights file") as info:
        build_model("resnet18", str(garbage))
    assert "\n" not in str(info.value)


def test_local_state_dict_roundtrip_and_mismatch(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model, _ = build_model("resnet18", "none")
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    loaded, _ = build_model("resnet18", str(path))
    assert weights_fingerprint(loaded) == weights_fingerprint(model)
    wrapped = tmp_path / "ckpt.pth"  # training-checkpoint wrapper, DataParallel prefix
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, wrapped)
    assert weights_fingerprint(build_model("resnet18", str(wrapped))[0]) == weights_fingerprint(model)

    with pytest.raises(ModelError, match="does not fit resnet34: .*missing keys") as info:
        build_model("resnet34", str(path))
    assert "\n" not in str(info.value)
    state = model.state_dict()
    state["fc.weight"] = torch.zeros(10, 512)
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"shape mismatches .*fc.weight \(10, 512\) vs \(1000, 512\)"):
        build_model("resnet18", str(path))
    state = model.state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ModelError, match="1 unexpected keys"):
        build_model("resnet18", str(path))


def test_failed_download_names_weights_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    import torchvision.models.resnet as resnet

    def offline(*_args: object, **_kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(resnet.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(ModelError, match=r"could not get the resnet18 weights .*--weights PATH") as info:
        build_model("resnet18", "DEFAULT")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_fold_batchnorm_preserves_outputs(arch: str) -> None:
    torch.manual_seed(0)
    model, pre = build_model(arch, "none")
    _randomize_bn(model)
    before = weights_fingerprint(model)
    x = torch.randn(2, 3, 64, 64)
    folded, pairs = fold_batchnorm(model, x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(pairs) == n_bn > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert [n for n, _ in folded.named_modules()] == [n for n, _ in model.named_modules()]
    assert weights_fingerprint(model) == before  # original untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    other = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref, out = model(other), folded(other)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


class _SharedConvOutput(nn.Module):
    """A conv output used by its BatchNorm and by a residual: folding would change the residual."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class _BnAfterRelu(nn.Module):
    """A BatchNorm that does not follow a conv must be left alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(self.conv(x)))


def test_fold_batchnorm_refuses_shared_conv_output() -> None:
    model = _SharedConvOutput().eval()
    _randomize_bn(model)
    with pytest.raises(ModelError, match="changed the output"):
        fold_batchnorm(model, torch.randn(1, 3, 8, 8))


def test_fold_batchnorm_skips_bn_not_after_conv() -> None:
    model = _BnAfterRelu().eval()
    _randomize_bn(model)
    folded, pairs = fold_batchnorm(model, torch.randn(1, 3, 8, 8))
    assert pairs == [] and isinstance(folded.bn, nn.BatchNorm2d)


def test_weights_fingerprint_changes_with_weights() -> None:
    model = nn.Linear(3, 2)
    first = weights_fingerprint(model)
    assert first == weights_fingerprint(model) and len(first) == 16
    with torch.no_grad():
        model.bias[0] += 1
    assert weights_fingerprint(model) != first


def test_efficientnet_lite_missing_or_present() -> None:
    try:
        import efficientnet_lite_pytorch  # noqa: F401
    except ImportError:
        with pytest.raises(ModelError, match=r"pip install -e \"\.\[efficientnet\]\""):
            build_model("efficientnet_lite0", "none")
        return
    assert set(LITE_ARCHS) <= set(available_archs())
    torch.manual_seed(0)
    model, pre = build_model("efficientnet_lite0", "none")
    assert (pre.resize, pre.crop) == (256, 224)
    assert pre.mean == (127 / 255,) * 3 and pre.std == (128 / 255,) * 3
    assert build_model("efficientnet_lite4", "none")[1].crop == 300
    _randomize_bn(model)
    folded, pairs = fold_batchnorm(model, torch.randn(1, *pre.input_size))
    assert len(pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.skipif(not TFLITE_MOBILENET.is_file(), reason="shared data (../shared/data) not present")
def test_shared_mobilenet_weights_load() -> None:
    model, pre = build_model("mobilenet_v2", str(TFLITE_MOBILENET))
    assert (pre.resize, pre.crop) == (256, 224)
    folded, pairs = fold_batchnorm(model, torch.randn(1, *pre.input_size))
    assert len(pairs) == 52
