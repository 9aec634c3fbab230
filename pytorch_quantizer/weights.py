"""Weight quantization, apart from the activation hooks: quantize every hooked layer's weight and bias in place,
apply a list of corrections, and put the exact original tensors back on ``detach``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from .clipping import TensorStats, aciq_range, allocated_alpha
from .fake_quant import quantize_per_channel_with_qparams, quantize_with_qparams
from .gemmlowp import QParams, gemmlowp_qparams, gemmlowp_qparams_per_channel
from .layers import ActivationLayer
from .methods import ClippingMethod, get_method
from .observers import Observation
from .policy import BitAllocation, WeightSpec
from .quant_config import CorrectionConfig, WeightConfig


def weight_channel_stats(w: torch.Tensor) -> list[TensorStats]:
    """The moments of each output channel's weights (dim 0), as the clipping rules read them."""
    flat = w.detach().reshape(w.shape[0], -1).double()
    mean = flat.mean(1, keepdim=True)
    centred = flat - mean
    lo, hi = flat.amin(1), flat.amax(1)
    b, std = centred.abs().mean(1), centred.square().mean(1).sqrt()
    numel = max(flat.shape[1], 2)
    return [TensorStats(float(lo[c]), float(hi[c]), float(mean[c, 0]), float(b[c]), float(std[c]), numel)
            for c in range(flat.shape[0])]


def allocated_weight_grid(w: torch.Tensor, levels_bits: float, allocation: BitAllocation
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(delta, offset, levels) per output channel under bit allocation (``-baw``): the channels share the quota of
    ``levels_bits`` a channel by the 2/3 law of their prior scale (``policy.BitAllocation``) and each is clipped at
    the optimum for its level count, ``aciq_range`` around its mean (never beyond its own min/max)."""
    stats = weight_channel_stats(w)
    levels = allocation.levels(stats, levels_bits)
    grids = [aciq_range(s.min, s.max, s.mean, allocated_alpha(allocation.prior, allocation.scale(s), n))
             for s, n in zip(stats, levels, strict=True)]
    delta = torch.tensor([g[0] for g in grids], dtype=torch.float64)
    offset = torch.tensor([g[1] for g in grids], dtype=torch.float64)
    return delta, offset, torch.tensor(levels, dtype=torch.float64)


def clipped_ranges(w: torch.Tensor, bits: int, method: ClippingMethod, per_channel: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta, offset) per output channel of a weight (or one pair for the whole tensor) from a moment-based
    clipping method (``-thw``), as the activations get them: the channel's min, max, mean, mean |x - mean| and std
    are its "statistics" (a weight is one sample, so nothing is averaged).  float64 on the CPU."""
    if any(name != "moments" for name in method.requires):
        raise ValueError(f"weight clipping takes a method that needs only moments; {method.name!r} needs "
                         f"{', '.join(method.requires)} of the activations")
    stats = weight_channel_stats(w if per_channel else w.reshape(1, -1))
    grids = [method.grid(Observation.of_moments(s), bits) for s in stats]
    return (torch.tensor([g.delta for g in grids], dtype=torch.float64),
            torch.tensor([g.offset for g in grids], dtype=torch.float64))


def parameter_grid(
    w: torch.Tensor, bits: int, per_channel: bool, preserve_zero: bool, pow2_scale: bool,
    method: ClippingMethod | None = None, allocation: BitAllocation | None = None, levels_bits: float | None = None,
) -> QParams | None:
    """The GEMMLOWP grid of a weight or bias, per tensor or per output channel (dim 0: then the ``QParams`` hold
    one value per channel), over its min/max range; with a clipping ``method`` (``-thw``) over the range that method
    chooses (``clipped_ranges``); with ``allocation`` and ``levels_bits`` (``-baw``) with per-channel level counts
    and clipping instead.  None: identity (a constant tensor).  Kept apart from ``quantize_parameter`` so that an
    export (``onnx_export``) writes the very grid the simulator used."""
    channels = per_channel and w.dim() > 1
    if allocation is not None and levels_bits is not None and w.dim() > 1:
        delta, offset, levels = allocated_weight_grid(w, levels_bits, allocation)
        return gemmlowp_qparams_per_channel(delta, offset, bits, preserve_zero, pow2_scale, levels)
    if method is not None and method.name not in ("no", "minmax"):
        delta, offset = clipped_ranges(w, bits, method, channels)
        if channels:
            return gemmlowp_qparams_per_channel(delta, offset, bits, preserve_zero, pow2_scale)
        return gemmlowp_qparams(delta.item(), offset.item(), bits, preserve_zero, pow2_scale)
    if channels:
        flat = w.reshape(w.shape[0], -1)
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        return gemmlowp_qparams_per_channel((hi - lo).double(), lo.double(), bits, preserve_zero, pow2_scale)
    lo, hi = torch.aminmax(w)
    return gemmlowp_qparams((hi - lo).item(), lo.item(), bits, preserve_zero, pow2_scale)


def quantize_parameter(
    w: torch.Tensor, bits: int, per_channel: bool, preserve_zero: bool, pow2_scale: bool,
    method: ClippingMethod | None = None, allocation: BitAllocation | None = None, levels_bits: float | None = None,
) -> torch.Tensor:
    """GEMMLOWP quantization of a weight or bias on its ``parameter_grid`` (a new tensor)."""
    return quantize_on_grid(w, parameter_grid(w, bits, per_channel, preserve_zero, pow2_scale, method, allocation,
                                              levels_bits))


def quantize_on_grid(w: torch.Tensor, grid: QParams | None) -> torch.Tensor:
    """``w`` fake-quantized on ``grid`` (per output channel when its parameters are tensors), as a new tensor."""
    if grid is not None and isinstance(grid.scale, torch.Tensor):
        return quantize_per_channel_with_qparams(w, grid, 0)
    return quantize_with_qparams(w, grid)


def grid_view(grid: QParams, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(scale, inv_scale, offset, qmax) of ``grid`` as float32 tensors on ``like``'s device, shaped to broadcast
    over its output channels (dim 0) when the grid has one set per channel."""
    shape = (-1, *([1] * (like.dim() - 1))) if isinstance(grid.scale, torch.Tensor) else ()
    return tuple(torch.as_tensor(v, dtype=torch.float32, device=like.device).reshape(shape)
                 for v in (grid.scale, grid.inv_scale, grid.offset, grid.qmax))


def grid_floor(w: torch.Tensor, grid: QParams) -> torch.Tensor:
    """``floor((w - offset) * inv_scale)``: the level at or below each weight, in the float32 steps the quantizer
    takes (``gemmlowp``), so that floor + 1 is the level above whenever nearest rounding would not give it."""
    _, inv_scale, offset, _ = grid_view(grid, w)
    return torch.floor((w.float() - offset) * inv_scale)


def round_on_grid(w: torch.Tensor, grid: QParams | None, up: torch.Tensor) -> torch.Tensor:
    """``w`` on ``grid`` with each weight at the level below it, or above it where ``up`` (learned rounding,
    ``adaround``), clamped to the grid's ends like nearest rounding; channels of scale 0 (constant) and a None grid
    keep their values.  A new tensor of ``w``'s dtype."""
    if grid is None:
        return w.clone()
    scale, _, offset, qmax = grid_view(grid, w)
    q = (grid_floor(w, grid) + up.to(w.device, torch.float32)).clamp_(min=0.0)
    q = torch.minimum(q, qmax) if isinstance(grid.scale, torch.Tensor) else q.clamp_(max=float(grid.qmax))
    return torch.where(scale > 0, q * scale + offset, w.float()).to(w.dtype)


class WeightCorrection(Protocol):
    """Adjusts a quantized weight given the float one (bias correction of the mean or variance, ...); returns the
    tensor to use.  ``layer`` says whose weight it is."""

    def __call__(self, layer: ActivationLayer, original: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor: ...


def _per_channel(w: torch.Tensor) -> torch.Tensor:
    """A weight as [output channels, fan-in] (a view when contiguous)."""
    return w.reshape(w.shape[0], -1)


class MeanCorrection:
    """The follow-up's bias correction of weights (``-bcw``; Banner et al. 2019, eq. 12): quantization shifts the
    mean of each output channel's weights, which shifts every output of that channel by the same amount times the
    mean input; adding back mu_c = E[W_c] - E[Q(W_c)] restores each channel's mean exactly."""

    def __call__(self, layer: ActivationLayer, original: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        if original.dim() < 2:
            return quantized
        shift = _per_channel(original).double().mean(1) - _per_channel(quantized).double().mean(1)
        return (_per_channel(quantized).double() + shift[:, None]).to(quantized.dtype).reshape(quantized.shape)


class VarianceCorrection:
    """The follow-up's variance correction (``-vcw``, eq. 13): rounding changes the spread of each output channel's
    weights; scaling the channel's centred quantized weights by xi_c = ||W_c - E W_c|| / ||Q(W_c) - E Q(W_c)||
    restores the norm (so the variance) of the centred weights, keeping their mean.  After ``MeanCorrection`` the
    pair restores both.  The corrected weights leave the grid; a deployment folds xi_c into the channel's scale."""

    def __call__(self, layer: ActivationLayer, original: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        if original.dim() < 2:
            return quantized
        w, q = _per_channel(original).double(), _per_channel(quantized).double()
        w_centred = w - w.mean(1, keepdim=True)
        q_mean = q.mean(1, keepdim=True)
        q_norm = (q - q_mean).norm(dim=1, keepdim=True)
        xi = torch.where(q_norm > 0, w_centred.norm(dim=1, keepdim=True) / q_norm.clamp_min(1e-300), 1.0)
        return ((q - q_mean) * xi + q_mean).to(quantized.dtype).reshape(quantized.shape)


def weight_corrections(correct: CorrectionConfig) -> tuple[WeightCorrection, ...]:
    """The corrections of ``-bcw`` / ``-vcw``, in the order that restores both the mean and the norm."""
    return (*([MeanCorrection()] if correct.weight_mean else []),
            *([VarianceCorrection()] if correct.weight_variance else []))


class WeightQuantizer:
    """Quantizes the weights (and biases) of ``layers`` in place while attached, and restores them exactly.

    Each layer's weight follows its ``WeightSpec`` (``LayerPolicy.specs``: width, granularity, clipping method,
    allocated width); the biases are at ``config.bias_bits`` (None: float).  Each correction is applied in order to
    every quantized weight (not to biases).  ``bias_shifts`` (module path -> one value per output channel, the
    activations' bias correction ``-bca``) are added to the biases after they are quantized: a deployment keeps
    biases in int32 at the accumulator's scale, fine enough for the correction.  ``rounding`` (layer name -> bool
    tensor of the weight's shape, ``adaround``) rounds those weights up where true and down elsewhere, on the same
    grid, instead of to the nearest level."""

    def __init__(
        self,
        layers: Sequence[ActivationLayer],
        specs: Sequence[WeightSpec],
        config: WeightConfig,
        corrections: Sequence[WeightCorrection] = (),
        bias_shifts: Mapping[str, torch.Tensor] | None = None,
        allocation: BitAllocation | None = None,
        sigma_estimator: str = "range",
        rounding: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.layers, self.specs = list(layers), list(specs)
        if len(self.specs) != len(self.layers):
            raise ValueError(f"{len(self.specs)} weight specs for {len(self.layers)} layers")
        self.config = config
        self.corrections = list(corrections)
        self.bias_shifts = dict(bias_shifts or {})
        self.allocation = allocation  # policy.BitAllocation over each weight's output channels (-baw), or None
        self.rounding = dict(rounding or {})
        self._methods = {name: get_method(name, sigma_estimator) for name in {s.method for s in self.specs}}
        self._originals: list[tuple[torch.Tensor, torch.Tensor]] = []
        # layer name -> the grid its weight was quantized on while attached (None: float or identity); an export
        # writes the weights as integer codes on these grids
        self.grids: dict[str, QParams | None] = {}

    @property
    def attached(self) -> bool:
        return bool(self._originals)

    def attach(self) -> WeightQuantizer:
        if self.attached:
            return self
        cfg = self.config
        with torch.no_grad():
            for layer, spec in zip(self.layers, self.specs, strict=True):
                weight, bias = layer.module.weight, getattr(layer.module, "bias", None)
                shift = self.bias_shifts.get(layer.module_name)
                for param, bits, quantize, corrections, add in (
                    (weight, spec.bits, lambda p, b, s=spec, lay=layer: self._quantize_weight(p, lay, s),
                     self.corrections, None),
                    (bias, cfg.bias_bits, lambda p, b: quantize_parameter(
                        p, b, False, cfg.preserve_zero, cfg.pow2_scale), (), shift),
                ):
                    if param is None or (bits is None and add is None):
                        continue
                    original = param.detach().clone()
                    self._originals.append((param, original))
                    quantized = original if bits is None else quantize(param.detach(), bits)
                    for correct in corrections:
                        quantized = correct(layer, original, quantized)
                    if add is not None:
                        quantized = (quantized.double() + add.to(quantized.device)).to(quantized.dtype)
                    param.copy_(quantized)
        return self

    def grid_of(self, layer: ActivationLayer, spec: WeightSpec) -> QParams | None:
        """The grid ``layer``'s current weight goes on under ``spec`` (None: float weights, or a constant tensor)."""
        if spec.bits is None:
            return None
        cfg = self.config
        return parameter_grid(layer.module.weight.detach(), spec.bits, spec.per_channel, cfg.preserve_zero,
                              cfg.pow2_scale, self._methods[spec.method], self.allocation, spec.levels_bits)

    def _quantize_weight(self, w: torch.Tensor, layer: ActivationLayer, spec: WeightSpec) -> torch.Tensor:
        grid = self.grid_of(layer, spec)
        self.grids[layer.name] = grid
        up = self.rounding.get(layer.name)
        return quantize_on_grid(w, grid) if up is None else round_on_grid(w, grid, up)

    def detach(self) -> None:
        self.grids.clear()
        with torch.no_grad():
            for param, original in self._originals:
                param.copy_(original)
        self._originals.clear()

    def __enter__(self) -> WeightQuantizer:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()
