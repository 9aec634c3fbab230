"""Shared fixtures: small models, paths to the optional real data beside the checkout, and the host emulator of
the CUDA kernels."""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class TinyNet(nn.Module):
    """Conv-BN-ReLU twice, pooling and a classifier: every kind of layer the hooks care about, fast."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@pytest.fixture
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "imagenet-sample" / "val").is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA


EMULATOR_SOURCE = Path(__file__).resolve().parent / "cuda_emulation" / "emulator.cpp"
_FLOAT_P, _DOUBLE_P = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_double)


def _ptr(t: torch.Tensor | None, kind=_FLOAT_P):
    if t is None:
        return None
    assert t.device.type == "cpu" and t.dtype == (torch.float32 if kind is _FLOAT_P else torch.float64)
    return ctypes.cast(t.data_ptr(), kind)


class CudaEmulator:
    """tests/cuda_emulation/emulator.cpp loaded through ctypes: the CUDA kernels' per-thread code run on the host
    for every (block, thread) of the launch gemmlowp.cu makes.  ``max_grid`` > 0 caps grids (more grid-stride
    iterations); ``sms`` is the multiprocessor count the launch plans with."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        i64, f32, i32 = ctypes.c_int64, ctypes.c_float, ctypes.c_int
        lib.emulate_per_tensor.argtypes = [_FLOAT_P, _FLOAT_P, i64, f32, f32, f32, f32, i32, i64]
        lib.emulate_per_tensor.restype = i32
        lib.emulate_per_channel.argtypes = [_FLOAT_P, _FLOAT_P, i64, i64, i64, _FLOAT_P, _FLOAT_P, _FLOAT_P, _FLOAT_P,
                                            i32,
                                            i64, i32]
        lib.emulate_per_channel.restype = i32
        lib.emulate_per_sample_stats.argtypes = [_FLOAT_P, i64, i64, _DOUBLE_P, i32, i64]
        lib.emulate_per_sample_stats.restype = i64
        self.lib = lib

    def quantize_(self, x, qp, noise=None, sms=132, max_grid=0) -> int:
        """Per-tensor quantization of the contiguous float32 ``x`` in place; 1 when the 16-byte path ran."""
        assert x.is_contiguous() and (noise is None or noise.is_contiguous())
        return self.lib.emulate_per_tensor(_ptr(x), _ptr(noise), x.numel(), qp.scale, qp.inv_scale, qp.offset,
                                           qp.qmax, sms, max_grid)

    def quantize_per_channel_(self, x, noise, channels, inner, scale, inv_scale, offset, qmax, sms=132, max_grid=0,
                              force64=False) -> int:
        """Per-channel quantization in place over a contiguous (outer, channels, inner) ``x``; the index width.
        ``qmax`` is a float32 tensor with one value per channel."""
        return self.lib.emulate_per_channel(_ptr(x), _ptr(noise), x.numel(), channels, inner, _ptr(scale),
                                            _ptr(inv_scale), _ptr(offset), _ptr(qmax), sms, max_grid,
                                            int(force64))

    def per_sample_stats(self, x: torch.Tensor, sms=132, max_grid=0) -> torch.Tensor:
        """The CUDA per_sample_stats of a float32 [N, ...] tensor (N, M >= 1), as [N, 7] float64."""
        flat = x.reshape(x.shape[0], -1).contiguous()
        out = torch.empty(flat.shape[0], 7, dtype=torch.float64)
        self.lib.emulate_per_sample_stats(_ptr(flat), flat.shape[0], flat.shape[1], _ptr(out, _DOUBLE_P), sms,
                                          max_grid)
        return out


@pytest.fixture(scope="session")
def cuda_emulator(tmp_path_factory) -> CudaEmulator:
    from torch.utils.cpp_extension import get_cxx_compiler

    cxx = shutil.which(get_cxx_compiler()) or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the CUDA emulator")
    lib = tmp_path_factory.mktemp("cuda_emulation") / "emulator.so"
    flags = ["-O2", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-fno-strict-aliasing",
             "-Wall", "-Werror"]
    subprocess.run([cxx, *flags, "-o", str(lib), str(EMULATOR_SOURCE)], check=True, capture_output=True, text=True)
    return CudaEmulator(ctypes.CDLL(str(lib)))
