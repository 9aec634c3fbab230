"""GEMMLOWP grid parameters and the reference quantizer: the definition every backend reproduces bit for bit.

A float tensor is mapped onto ``2**bits`` uniform levels covering ``[offset, offset + delta]``:

    scale = delta / (2**bits - 1)                      (rounded up to a power of two with pow2_scale)
    offset = round(offset / scale) * scale             (preserve_zero, when 0 lies inside the range)
    v = (x - offset) * inv_scale  [+ noise]            (noise ~ U(-0.5, 0.5): stochastic rounding)
    q = round_half_even(clamp(v, 0, 2**bits - 1))
    y = q * scale + offset

All arithmetic is float32, one IEEE operation per step and no fused multiply-add, so every backend (the pure
PyTorch ``reference_quantize_`` here, the C++ and CUDA kernels in ``backends``) produces the same bits.
``scale``, ``inv_scale`` and ``offset`` are computed once in float64 and rounded to float32
(``gemmlowp_qparams``).  NaN inputs propagate to NaN outputs; +-inf saturate to the ends of the grid.

This module sits below ``backends`` and ``fake_quant``: it imports neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .clipping import MAX_CHANNEL_LEVELS, check_bits


@dataclass(frozen=True)
class QParams:
    """Float32 grid parameters for one tensor (floats) or one per channel (1-D float32 tensors, ``qmax`` too: bit
    allocation gives each channel its own number of levels, ``qmax + 1``)."""

    scale: float | torch.Tensor
    inv_scale: float | torch.Tensor
    offset: float | torch.Tensor
    qmax: float | torch.Tensor


def _as_float(value: float | torch.Tensor, what: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a scalar for per-tensor quantization, got shape {tuple(value.shape)}")
        value = value.item()
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return value


def _grid(
    delta: torch.Tensor, offset: torch.Tensor, qmax: float | torch.Tensor, preserve_zero: bool, pow2_scale: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, inv_scale, offset) as float32 tensors from float64 delta/offset over ``qmax`` steps; delta > 0."""
    scale = delta / qmax
    if pow2_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    scale32 = scale.float()
    offset32 = offset.float()
    if preserve_zero:
        inside = (offset < 0) & (offset + delta > 0)
        zero_point = torch.round(offset / scale32.double()).float()
        offset32 = torch.where(inside, zero_point * scale32, offset32)
    inv_scale32 = (1.0 / scale32.double()).float()
    # -0.0 -> +0.0, so that y = q * scale + offset never depends on the sign of a zero q: ATen's clamp and
    # rounding keep -0.0 on some devices and versions and not on others, and the backends must agree.
    offset32 = offset32 + 0.0
    return scale32, inv_scale32, offset32


def gemmlowp_qparams(
    delta: float, offset: float, bits: int, preserve_zero: bool = True, pow2_scale: bool = False
) -> QParams | None:
    """Grid parameters for per-tensor quantization, or None when ``delta <= 0`` (identity)."""
    bits = check_bits(bits)
    delta = _as_float(delta, "delta")
    offset = _as_float(offset, "offset")
    if delta <= 0.0:
        return None
    delta64, offset64 = torch.tensor(delta, dtype=torch.float64), torch.tensor(offset, dtype=torch.float64)
    scale, inv_scale, off = _grid(delta64, offset64, float(2**bits - 1), preserve_zero, pow2_scale)
    return QParams(scale.item(), inv_scale.item(), off.item(), float(2**bits - 1))


def check_channel_levels(levels: torch.Tensor, channels: int) -> torch.Tensor:
    """Per-channel level counts as float64: whole numbers in 2..2**22, one per channel."""
    levels = torch.as_tensor(levels, dtype=torch.float64).flatten().cpu()
    if levels.numel() != channels:
        raise ValueError(f"{levels.numel()} level counts for {channels} channels")
    if not bool(((levels == levels.round()) & (levels >= 2) & (levels <= MAX_CHANNEL_LEVELS)).all()):
        raise ValueError(f"per-channel level counts must be whole numbers in 2..{MAX_CHANNEL_LEVELS}")
    return levels


def gemmlowp_qparams_per_channel(
    delta: torch.Tensor, offset: torch.Tensor, bits: int, preserve_zero: bool = True, pow2_scale: bool = False,
    levels: torch.Tensor | None = None,
) -> QParams:
    """Per-channel grid parameters.  Channels with ``delta <= 0`` get scale 0: they pass through unchanged.

    ``levels`` (bit allocation) gives each channel its own number of levels instead of ``2**bits``: channel c then
    has ``qmax_c = levels_c - 1`` steps of ``delta_c / qmax_c``; ``qmax`` is a float32 tensor either way."""
    bits = check_bits(bits)
    delta = torch.as_tensor(delta, dtype=torch.float64).flatten().cpu()
    offset = torch.as_tensor(offset, dtype=torch.float64).flatten().cpu()
    if delta.shape != offset.shape:
        raise ValueError(f"delta and offset must have one value per channel, got {delta.numel()} and {offset.numel()}")
    if not (torch.isfinite(delta).all() and torch.isfinite(offset).all()):
        raise ValueError("per-channel delta and offset must be finite")
    qmax = (torch.full_like(delta, float(2**bits - 1)) if levels is None
            else check_channel_levels(levels, delta.numel()) - 1)
    live = delta > 0
    scale, inv_scale, off = _grid(torch.where(live, delta, 1.0), offset, qmax, preserve_zero, pow2_scale)
    zero = torch.zeros_like(scale)
    return QParams(torch.where(live, scale, zero), torch.where(live, inv_scale, zero), off, qmax.float())


def uniform_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """U(-0.5, 0.5) noise for stochastic rounding, float32, on ``like``'s device (reproducible via ``generator``)."""
    return torch.rand(like.shape, generator=generator, dtype=torch.float32, device=like.device).sub_(0.5)


def reference_quantize_(x: torch.Tensor, qp: QParams, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The definition in plain PyTorch, in place on a float32 tensor (per tensor, or per channel when the
    qparams, ``qmax`` included, are tensors already shaped to broadcast against ``x``)."""
    x.sub_(qp.offset).mul_(qp.inv_scale)
    if noise is not None:
        x.add_(noise)
    if isinstance(qp.qmax, torch.Tensor):
        x.clamp_(min=0.0).clamp_(max=qp.qmax).round_()  # clamp takes a tensor bound only with a tensor bound
    else:
        x.clamp_(0.0, qp.qmax).round_()
    return x.mul_(qp.scale).add_(qp.offset)
