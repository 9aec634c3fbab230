"""The CUDA kernels' own code, run on the host: bit parity with the PyTorch reference without a GPU.

``tests/cuda_emulation/emulator.cpp`` compiles the per-thread code of the CUDA kernels
(``kernels/gemmlowp_device.cuh``, the file nvcc builds into ``gemmlowp.cu``) with the host C++ compiler and
runs every (block, thread) of the launch that ``gemmlowp.cu`` would make.  These tests hold it to the
pure-PyTorch reference bit for bit, over tile and tail boundaries, grid-stride loops (a capped grid), the
aligned 16-byte and the unaligned scalar paths, both index widths of the per-channel kernel, noise and
special values.  What they cannot see is the GPU itself (launch, memory system, device intrinsics): the
parity tests in test_kernels.py cover that where a GPU is present (scripts/gpu_check.sh).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pytorch_quantizer.gemmlowp import (
    gemmlowp_qparams,
    gemmlowp_qparams_per_channel,
    reference_quantize_,
    uniform_noise,
)

THREADS, UNROLL = 256, 4
TILE_FLOATS = THREADS * UNROLL * 4  # floats per tile of the 16-byte path


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint32)


def _emulate(cuda_emulator, x, qp, noise=None, sms=132, max_grid=0) -> tuple[torch.Tensor, int]:
    out = x.clone()
    return out, cuda_emulator.quantize_(out, qp, noise, sms, max_grid)


def _reference(x, qp, noise=None) -> torch.Tensor:
    return reference_quantize_(x.clone(), qp, noise)


def _data(n: int, seed: int = 0, lo: float = -5.0, hi: float = 5.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) * (hi - lo) + lo


SIZES = [1, 3, 4, 5, 7, 1023, 1024, 1025, TILE_FLOATS - 1, TILE_FLOATS, TILE_FLOATS + 3, 3 * TILE_FLOATS + 5,
         200_003]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("with_noise", [False, True])
@pytest.mark.parametrize("max_grid", [0, 3])
def test_per_tensor_sizes(cuda_emulator, n, with_noise, max_grid):
    x = _data(n, seed=n)
    qp = gemmlowp_qparams(7.0, -3.0, 4)
    noise = uniform_noise(x, torch.Generator().manual_seed(1)) if with_noise else None
    got, vec4 = _emulate(cuda_emulator, x, qp, noise, max_grid=max_grid)
    assert vec4 == (n >= 4)  # torch's CPU allocations are 16-byte aligned
    np.testing.assert_array_equal(_bits(got), _bits(_reference(x, qp, noise)))


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("preserve_zero", [True, False])
@pytest.mark.parametrize("pow2_scale", [False, True])
def test_per_tensor_bits_and_grid_options(cuda_emulator, bits, preserve_zero, pow2_scale):
    x = _data(3 * TILE_FLOATS + 1, seed=bits, lo=-7.0, hi=4.0)
    qp = gemmlowp_qparams(9.0, -5.0, bits, preserve_zero, pow2_scale)
    got, _ = _emulate(cuda_emulator, x, qp)
    np.testing.assert_array_equal(_bits(got), _bits(_reference(x, qp)))


@pytest.mark.parametrize("shift", [(1, 0), (0, 1), (3, 2)])
def test_per_tensor_unaligned_takes_the_scalar_path(cuda_emulator, shift):
    """A view starting mid-allocation (x, or only the noise) is not 16-byte aligned: the scalar kernel runs,
    its grid-stride loop several times over with one multiprocessor's worth of blocks."""
    n = 20_001
    base, noise_base = _data(n + 4, seed=5), uniform_noise(torch.empty(n + 4), torch.Generator().manual_seed(2))
    x, noise = base[shift[0]:shift[0] + n], noise_base[shift[1]:shift[1] + n]
    qp = gemmlowp_qparams(6.0, -2.5, 3)
    expected = _reference(x, qp, noise)
    assert cuda_emulator.quantize_(x, qp, noise, sms=1) == 0
    np.testing.assert_array_equal(_bits(x), _bits(expected))


def test_per_tensor_special_values(cuda_emulator):
    qp = gemmlowp_qparams(4.0, -2.0, 2)  # grid step 4/3
    step = qp.scale
    halfway = [qp.offset + (k + 0.5) * step for k in range(3)]
    specials = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 1e-45, *halfway]
    x = torch.tensor(specials * 100, dtype=torch.float32)
    got, _ = _emulate(cuda_emulator, x, qp)
    np.testing.assert_array_equal(_bits(got), _bits(_reference(x, qp)))
    assert torch.isnan(got[0]) and not torch.isnan(got[1:9]).any()


def _per_channel_case(outer: int, channels: int, inner: int, seed: int):
    x = _data(outer * channels * inner, seed=seed).view(outer, channels, inner)
    delta = torch.linspace(0.5, 9.0, channels, dtype=torch.float64)
    delta[::3] = 0.0  # pass-through channels
    offset = -delta / 2 - 0.25
    return x, gemmlowp_qparams_per_channel(delta, offset, 4)


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 7, 1), (3, 5, 33), (1, 64, 1000), (5, 3, 4099)])
@pytest.mark.parametrize("with_noise", [False, True])
@pytest.mark.parametrize(("max_grid", "force64"), [(0, 0), (2, 0), (0, 1)])
def test_per_channel(cuda_emulator, shape, with_noise, max_grid, force64):
    outer, channels, inner = shape
    x, qp = _per_channel_case(outer, channels, inner, seed=channels)
    noise = uniform_noise(x, torch.Generator().manual_seed(3)) if with_noise else None
    params = [qp.scale.float().contiguous(), qp.inv_scale.float().contiguous(), qp.offset.float().contiguous()]
    got = x.clone()
    width = cuda_emulator.quantize_per_channel_(got, noise, channels, inner, *params, qp.qmax.contiguous(),
                                                max_grid=max_grid,
                                                force64=force64)
    assert width == (64 if force64 else 32)
    shaped = [p.view(1, -1, 1) for p in params]
    expected = reference_quantize_(x.clone(), type(qp)(*shaped, qp.qmax.view(1, -1, 1)), noise)
    expected = torch.where(shaped[0] == 0, x, expected)
    np.testing.assert_array_equal(_bits(got), _bits(expected))
    assert torch.equal(got[:, ::3], x[:, ::3])


@pytest.mark.parametrize("shape", [(2, 7, 1), (3, 5, 33), (1, 64, 1000)])
@pytest.mark.parametrize("force64", [0, 1])
def test_per_channel_levels(cuda_emulator, shape, force64):
    """One level count per channel (bit allocation), as the CUDA kernel reads it, equals the reference."""
    outer, channels, inner = shape
    x = _data(outer * channels * inner, seed=channels).view(outer, channels, inner)
    delta = torch.linspace(0.5, 9.0, channels, dtype=torch.float64)
    levels = torch.arange(channels, dtype=torch.float64) * 37 % 251 + 2
    qp = gemmlowp_qparams_per_channel(delta, -delta / 2 - 0.25, 4, levels=levels)
    noise = uniform_noise(x, torch.Generator().manual_seed(4))
    params = [qp.scale.contiguous(), qp.inv_scale.contiguous(), qp.offset.contiguous(), qp.qmax.contiguous()]
    got = x.clone()
    cuda_emulator.quantize_per_channel_(got, noise, channels, inner, *params, force64=force64)
    expected = reference_quantize_(x.clone(), type(qp)(*(p.view(1, -1, 1) for p in params)), noise)
    np.testing.assert_array_equal(_bits(got), _bits(expected))


# ---- per-sample statistics ----------------------------------------------------------------------------------
# Agreement with float64 and with the PyTorch path is tested for every kernel, this emulation included, in
# test_statistics.py; here: what only the emulation can show, and the GPU against it.

STATS_SHAPES = [(1, 1), (3, 63), (2, 64), (5, 1000), (4, 64 * 1024 + 17), (2, 300_001), (70, 129)]


@pytest.mark.parametrize("shape", STATS_SHAPES)
def test_stats_capped_grids_give_the_same_bits(cuda_emulator, shape):
    """Grid-stride loops (a grid capped at 1 or 2 blocks, one multiprocessor) change no bit."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])) * 3 + 0.5
    full = cuda_emulator.per_sample_stats(x)
    for sms, max_grid in ((1, 0), (132, 1), (132, 2)):
        assert torch.equal(cuda_emulator.per_sample_stats(x, sms=sms, max_grid=max_grid), full)


def _cuda_module():
    from pytorch_quantizer.backends import kernel_module

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    module = kernel_module("cuda")
    if module is None:
        pytest.skip("the CUDA kernel is not built")
    return module


@pytest.mark.parametrize("shape", STATS_SHAPES)
def test_gpu_stats_are_the_emulated_bits(cuda_emulator, shape):
    module = _cuda_module()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])) * 3 + 0.5
    x[0, 0] = 1e9
    assert torch.equal(module.per_sample_stats(x.cuda()).cpu(), cuda_emulator.per_sample_stats(x))


@pytest.mark.parametrize("n", [5, TILE_FLOATS + 3, 200_003])
def test_gpu_quantization_is_the_emulated_bits(cuda_emulator, n):
    module = _cuda_module()
    x = _data(n, seed=n)
    noise = uniform_noise(x, torch.Generator().manual_seed(1))
    qp = gemmlowp_qparams(7.0, -3.0, 4)
    got = x.cuda()
    module.quantize_(got, noise.cuda(), qp.scale, qp.inv_scale, qp.offset, qp.qmax)
    expected, _ = _emulate(cuda_emulator, x, qp, noise)
    np.testing.assert_array_equal(_bits(got.cpu()), _bits(expected))
