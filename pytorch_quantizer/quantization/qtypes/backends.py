"""Backends that carry out the GEMMLOWP definition in place on float32 tensors.

Only the pure-PyTorch backend lives here for now; the compiled kernels plug in behind ``select_backend``.
"""

from __future__ import annotations

import torch

BACKENDS = ("torch",)


def _broadcast(values: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[dim] = -1
    return values.view(shape)


class TorchBackend:
    """The reference: a few PyTorch element-wise ops (allocates nothing beyond the op temporaries)."""

    name = "torch"

    def quantize_(self, x: torch.Tensor, qp, noise: torch.Tensor | None) -> torch.Tensor:
        from .int_quantizer import reference_quantize_

        return reference_quantize_(x, qp, noise)

    def quantize_per_channel_(self, x: torch.Tensor, qp, dim: int, noise: torch.Tensor | None) -> torch.Tensor:
        from .int_quantizer import QParams, reference_quantize_

        scale = _broadcast(qp.scale, x, dim)
        shaped = QParams(scale, _broadcast(qp.inv_scale, x, dim), _broadcast(qp.offset, x, dim), qp.qmax)
        passthrough = scale == 0
        if not passthrough.any():
            return reference_quantize_(x, shaped, noise)
        original = x.clone()
        reference_quantize_(x, shaped, noise)
        return x.copy_(torch.where(passthrough, original, x))


def select_backend(device: torch.device, requested: str | None = None) -> TorchBackend:
    """The backend for tensors on ``device``; ``requested`` forces one by name."""
    if requested not in (None, *BACKENDS):
        raise ValueError(f"unknown backend {requested!r}: expected one of {', '.join(BACKENDS)}")
    return TorchBackend()
