"""GEMMLOWP fake quantization: the public entry points (the definition and its parameters are in ``gemmlowp``).

Each function validates its input, computes the grid once (``gemmlowp``) and hands the float32 work to the backend
of the tensor's device (``backends``); ``quantize_with_qparams`` and its per-channel twin take a precomputed grid.
"""

from __future__ import annotations

import torch

from .backends import select_backend
from .gemmlowp import QParams, gemmlowp_qparams, gemmlowp_qparams_per_channel, uniform_noise

__all__ = [
    "QParams",
    "gemmlowp_qparams",
    "gemmlowp_qparams_per_channel",
    "gemmlowp_quantize",
    "gemmlowp_quantize_per_channel",
    "quantize_per_channel_with_qparams",
    "quantize_with_qparams",
    "uniform_noise",
]


def _check_tensor(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"gemmlowp_quantize needs a floating-point tensor, got {x.dtype}")


def _run(x: torch.Tensor, inplace: bool, body) -> torch.Tensor:
    """Apply the float32 in-place ``body`` to ``x`` or to a copy; other float dtypes are computed in float32
    and converted back (so half/bfloat16/double inputs are accepted, at float32 precision)."""
    if x.dtype == torch.float32:
        work = x if inplace else x.clone()
        body(work)
        return work
    work = x.float()
    body(work)
    if inplace:
        return x.copy_(work)
    return work.to(x.dtype)


def _channel_dim(x: torch.Tensor, qp: QParams, dim: int) -> int:
    """``dim`` as a non-negative index, after checking that ``qp`` has one set of parameters per channel."""
    if x.dim() == 0:
        raise ValueError("per-channel quantization needs a tensor with at least one dimension")
    dim = dim % x.dim()
    if qp.scale.numel() != x.shape[dim]:
        raise ValueError(f"{qp.scale.numel()} channel parameters for {x.shape[dim]} channels along dim {dim}")
    return dim


def gemmlowp_quantize(
    x: torch.Tensor,
    delta: float,
    offset: float,
    bits: int,
    preserve_zero: bool = True,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    pow2_scale: bool = False,
    *,
    inplace: bool = False,
    noise: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` onto 2**bits levels over [offset, offset + delta] (see the module docstring).

    ``inplace=True`` overwrites ``x`` and returns it (what the inference hooks use: no new tensor per layer).
    ``noise`` gives the stochastic-rounding noise explicitly (implies ``stochastic``); otherwise it is drawn
    from ``generator``.  ``backend`` forces "torch", "cpu" or "cuda"; None picks by the tensor's device.
    ``delta <= 0`` leaves the values unchanged.
    """
    _check_tensor(x)
    qp = gemmlowp_qparams(delta, offset, bits, preserve_zero, pow2_scale)
    if noise is None and stochastic and qp is not None:
        noise = uniform_noise(x, generator)
    return quantize_with_qparams(x, qp, inplace=inplace, noise=noise, backend=backend)


def quantize_with_qparams(
    x: torch.Tensor,
    qp: QParams | None,
    *,
    inplace: bool = False,
    noise: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-tensor quantization with precomputed grid parameters (``None``: identity).

    The inference hooks compute each layer's ``QParams`` once and call this per batch.
    """
    _check_tensor(x)
    if qp is None or x.numel() == 0:
        return x if inplace else x.clone()
    impl = select_backend(x.device, backend)
    return _run(x, inplace, lambda t: impl.quantize_(t, qp, noise))


def gemmlowp_quantize_per_channel(
    x: torch.Tensor,
    delta: torch.Tensor,
    offset: torch.Tensor,
    bits: int,
    dim: int = 1,
    preserve_zero: bool = True,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    pow2_scale: bool = False,
    *,
    inplace: bool = False,
    noise: torch.Tensor | None = None,
    backend: str | None = None,
    levels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-channel variant: one (delta, offset) per index of ``x`` along ``dim``, and with ``levels`` one level
    count per channel (bit allocation) instead of ``2**bits``."""
    _check_tensor(x)
    qp = gemmlowp_qparams_per_channel(delta, offset, bits, preserve_zero, pow2_scale, levels)
    dim = _channel_dim(x, qp, dim)
    if noise is None and stochastic and x.numel() > 0:
        noise = uniform_noise(x, generator)
    return quantize_per_channel_with_qparams(x, qp, dim, inplace=inplace, noise=noise, backend=backend)


def quantize_per_channel_with_qparams(
    x: torch.Tensor,
    qp: QParams,
    dim: int = 1,
    *,
    inplace: bool = False,
    noise: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-channel quantization with precomputed grid parameters (``gemmlowp_qparams_per_channel``).

    Parameters already on ``x``'s device are used as they are: no host-to-device copy per call, which on a GPU
    would wait for the work queued before it.
    """
    _check_tensor(x)
    dim = _channel_dim(x, qp, dim)
    if x.numel() == 0:
        return x if inplace else x.clone()
    impl = select_backend(x.device, backend)
    qmax = qp.qmax.to(x.device) if isinstance(qp.qmax, torch.Tensor) else qp.qmax
    qp = QParams(*(t.to(x.device) for t in (qp.scale, qp.inv_scale, qp.offset)), qmax)
    return _run(x, inplace, lambda t: impl.quantize_per_channel_(t, qp, dim, noise))
