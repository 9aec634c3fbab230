"""Backends that carry out the GEMMLOWP definition in place on float32 tensors.

Three implementations give the same bits: the pure-PyTorch reference ("torch"), and two compiled, fused
kernels that read and write each element once ("cpu": kernels/cpu_quantization.cpp, "cuda":
kernels/gemmlowp.cu), built from the checkout on first use (``kernel_build``) unless ``cd kernels &&
./build_all.sh`` built them in place.  ``select_backend`` picks by the tensor's device unless a name is forced; a
kernel that cannot be built is never an error (unless ``ACIQ_BUILD_<CPU|CUDA>=1`` insists), the reference is used
instead, and the choice is logged once (logger "pytorch_quantizer").  Inside
``torch.compile`` the reference is always traced (an extension call would split the graph), so that Inductor
fuses the quantization into the neighbouring element-wise ops; see ``inference.compiled``.
"""

from __future__ import annotations

import importlib
import logging
import threading
from pathlib import Path
from types import ModuleType
from typing import Protocol

import torch

from . import kernel_build

BACKENDS = ("torch", "cpu", "cuda")
KERNEL_MODULES = {"cpu": f"{__package__}._gemmlowp_cpu", "cuda": f"{__package__}._gemmlowp_cuda"}
BUILD_HINT = "it is built from kernels/ on first use, or by `cd kernels && ./build_all.sh`"

_log = logging.getLogger("pytorch_quantizer")


class Backend(Protocol):
    """What the public quantizers call: in-place fake quantization of a float32 tensor."""

    name: str

    def quantize_(self, x: torch.Tensor, qp, noise: torch.Tensor | None) -> torch.Tensor: ...

    def quantize_per_channel_(self, x: torch.Tensor, qp, dim: int, noise: torch.Tensor | None) -> torch.Tensor: ...


def _broadcast(values: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[dim] = -1
    return values.view(shape)


class TorchBackend:
    """The reference: a few PyTorch element-wise ops (allocates nothing beyond the op temporaries)."""

    name = "torch"

    def quantize_(self, x: torch.Tensor, qp, noise: torch.Tensor | None) -> torch.Tensor:
        from .gemmlowp import reference_quantize_

        return reference_quantize_(x, qp, noise)

    def quantize_per_channel_(self, x: torch.Tensor, qp, dim: int, noise: torch.Tensor | None) -> torch.Tensor:
        from .gemmlowp import QParams, reference_quantize_

        scale = _broadcast(qp.scale, x, dim)
        shaped = QParams(scale, _broadcast(qp.inv_scale, x, dim), _broadcast(qp.offset, x, dim),
                         _broadcast(_channel_qmax(qp, x.shape[dim]), x, dim))
        passthrough = scale == 0
        if not passthrough.any():
            return reference_quantize_(x, shaped, noise)
        original = x.clone()
        reference_quantize_(x, shaped, noise)
        return x.copy_(torch.where(passthrough, original, x))


def _channel_qmax(qp, channels: int) -> torch.Tensor:
    """The per-channel qmax as a float32 tensor (a scalar qmax, one level count for all, is expanded)."""
    if isinstance(qp.qmax, torch.Tensor):
        return qp.qmax.float()
    return torch.full((channels,), float(qp.qmax), dtype=torch.float32, device=qp.scale.device)


def _expand_noise(noise: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """Broadcastable noise as a view shaped like ``x`` (the kernels take one noise value per element)."""
    if noise is None or noise.shape == x.shape:
        return noise
    return noise.expand(x.shape)


def _needs_reference(x: torch.Tensor, noise: torch.Tensor | None) -> bool:
    """Cases the kernels leave to the reference: autograd recording (the kernels record no graph) and
    non-float32 noise (the reference's ``add_`` then computes in the wider type)."""
    if x.requires_grad and torch.is_grad_enabled():
        return True
    return noise is not None and noise.dtype != torch.float32


class _KernelBackend:
    """A compiled extension with ``quantize_`` and ``quantize_per_channel_`` (one fused in-place pass).

    The extension checks dtype (float32 only) and device and handles any layout itself: dense tensors in
    place, others through a contiguous copy that is copied back; it bumps the version counter like an
    in-place ATen op.  ``_needs_reference`` says what is handed to the reference instead."""

    name = "kernel"

    def __init__(self, module: ModuleType) -> None:
        self.module = module

    def quantize_(self, x: torch.Tensor, qp, noise: torch.Tensor | None) -> torch.Tensor:
        if _needs_reference(x, noise):
            return TorchBackend().quantize_(x, qp, noise)
        noise = _expand_noise(noise, x)
        return self.module.quantize_(x, noise, qp.scale, qp.inv_scale, qp.offset, qp.qmax)

    def quantize_per_channel_(self, x: torch.Tensor, qp, dim: int, noise: torch.Tensor | None) -> torch.Tensor:
        if _needs_reference(x, noise):
            return TorchBackend().quantize_per_channel_(x, qp, dim, noise)
        noise = _expand_noise(noise, x)
        qmax = _channel_qmax(qp, x.shape[dim]).to(x.device)
        return self.module.quantize_per_channel_(x, noise, qp.scale, qp.inv_scale, qp.offset, dim, qmax)


class CpuKernelBackend(_KernelBackend):
    """C++ kernel for CPU tensors, vectorised (SSE2) and threaded with PyTorch's OpenMP pool."""

    name = "cpu"


class CudaKernelBackend(_KernelBackend):
    """CUDA kernel for CUDA tensors, on the current stream."""

    name = "cuda"


_TRACED = TorchBackend()
_KERNEL_CLASSES = {"cpu": CpuKernelBackend, "cuda": CudaKernelBackend}
_modules: dict[str, ModuleType | None] = {}
_load_errors: dict[str, str] = {}
_chosen: dict[tuple[str, str | None], Backend] = {}
_loading = threading.Lock()


def kernel_module(name: str) -> ModuleType | None:
    """The compiled module behind backend ``name`` ("cpu" or "cuda"), or None when it cannot be had here (e.g. no
    compiler, or the CUDA one under a CPU-only torch); the reason is kept in ``kernel_load_error``.

    A module built in place (``KERNEL_MODULES``, by build_all.sh or setup.py) comes first; otherwise the kernel is
    built from the checkout's sources on first use, once per process (``kernel_build.load``)."""
    if name not in _modules:
        with _loading:
            if name not in _modules:
                _modules[name] = _load(name)
    return _modules[name]


def _load(name: str) -> ModuleType | None:
    reasons = []
    try:
        module = importlib.import_module(KERNEL_MODULES[name])
        # an editable install's finder can hand out another checkout's build: only this package's own counts
        where = getattr(module, "__file__", None)  # None: a module built or injected without a file
        if where is None or Path(where).resolve().parent == Path(__file__).resolve().parent:
            return module
        reasons.append(f"the in-place build at {module.__file__} belongs to another checkout")
    except (ImportError, OSError) as exc:
        if not (isinstance(exc, ModuleNotFoundError) and exc.name == KERNEL_MODULES[name]):  # one that does not load
            reasons.append(f"the in-place build does not load: {type(exc).__name__}: {exc}")
    try:
        return kernel_build.load(kernel_build.KERNELS[name])
    except Exception as exc:
        if kernel_build.build_setting(name):
            env = kernel_build.KERNELS[name].env
            raise RuntimeError(f"{env}=1, but the GEMMLOWP {name} kernel cannot be built: {exc}") from exc
        reasons.append(str(exc) if isinstance(exc, kernel_build.NotBuilt) else f"{type(exc).__name__}: {exc}")
    _load_errors[name] = "; ".join(reasons)
    return None


def kernel_load_error(name: str) -> str | None:
    """Why ``kernel_module(name)`` is None (None when it loaded or was not tried)."""
    kernel_module(name)
    return _load_errors.get(name)


def available_backends() -> list[str]:
    """Names of the backends usable in this process ("torch" always; the kernels that load)."""
    return ["torch", *(name for name in KERNEL_MODULES if kernel_module(name) is not None)]


def _choose(device_type: str, requested: str | None) -> Backend:
    wanted = requested or {"cpu": "cpu", "cuda": "cuda"}.get(device_type, "torch")
    if wanted == "torch":
        backend: Backend = TorchBackend()
    elif (module := kernel_module(wanted)) is None:
        backend = TorchBackend()
        level = logging.WARNING if requested else logging.INFO
        _log.log(
            level,
            "GEMMLOWP %s kernel not available (%s); using the pure-PyTorch backend for %s tensors (%s)",
            wanted,
            _load_errors.get(wanted),
            device_type,
            BUILD_HINT,
        )
        return backend
    else:
        backend = _KERNEL_CLASSES[wanted](module)
    how = "requested" if requested else "automatic"
    _log.info("GEMMLOWP fake quantization of %s tensors: %s backend (%s)", device_type, backend.name, how)
    return backend


def select_backend(device: torch.device, requested: str | None = None) -> Backend:
    """The backend for tensors on ``device``; ``requested`` forces one by name ("torch", "cpu", "cuda").

    Automatic: CUDA tensors -> the CUDA kernel, CPU tensors -> the CPU kernel, anything else or a kernel
    that is not built -> PyTorch.  Cached per (device type, request), so the choice is logged once.  While
    ``torch.compile`` traces, always the reference: the kernels give the same bits, the trace fuses them."""
    if requested not in (None, *BACKENDS):
        raise ValueError(f"unknown backend {requested!r}: expected one of {', '.join(BACKENDS)}")
    if torch.compiler.is_compiling():
        return _TRACED
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    key = (device_type, requested)
    backend = _chosen.get(key)
    if backend is None:
        backend = _chosen[key] = _choose(device_type, requested)
    return backend
