"""Parity of the compiled GEMMLOWP kernels with the pure-PyTorch reference, bit for bit.

Every available kernel ("cpu" on CPU tensors, "cuda" on CUDA tensors) must give exactly the float32 bits of
``backend="torch"`` on the same device: random data of many shapes and layouts, all bit widths, the grid
options, stochastic rounding with fixed noise, per-channel grids with pass-through channels, NaN, +-inf and
empty tensors.  A kernel that is not built (or a GPU that is absent) skips its tests with the reason.  Last, how
the kernels are found or built on first use (``kernel_build``).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

from pytorch_quantizer import backends, gemmlowp_quantize, gemmlowp_quantize_per_channel, kernel_build
from pytorch_quantizer.fake_quant import (
    QParams,
    gemmlowp_qparams,
    gemmlowp_qparams_per_channel,
    quantize_per_channel_with_qparams,
)

KERNEL_DEVICES = {"cpu": "cpu", "cuda": "cuda"}
# (delta, offset) pairs: symmetric, all-positive, tiny, huge, zero/negative-zero offset, off-centre
RANGES = [(6.0, -3.0), (10.0, 1.0), (1e-3, -4e-4), (3e4, -2e4), (2.5, 0.0), (2.5, -0.0), (3e4, -0.0), (5.0, -4.1)]


def _skip_reason(name: str) -> str | None:
    if name == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU here"
    if backends.kernel_module(name) is None:
        return f"the {name} kernel is not available ({backends.kernel_load_error(name)})"
    return None


@pytest.fixture(params=list(KERNEL_DEVICES))
def kernel(request) -> tuple[str, torch.device]:
    """(backend name, device) for each compiled kernel that can run here."""
    reason = _skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return request.param, torch.device(KERNEL_DEVICES[request.param])


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal float32 bit patterns (so -0.0 != 0.0); NaN must sit at the same places (payloads not compared)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    a = actual.detach().float().cpu().contiguous()
    e = expected.detach().float().cpu().contiguous()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"NaN at different places: {int((nan_a != nan_e).sum())} elements"
    ai, ei = a.view(torch.int32)[~nan_a], e.view(torch.int32)[~nan_e]
    bad = (ai != ei).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        first = f"first: {a[~nan_a][i].item()!r} vs {e[~nan_e][i].item()!r}"
        raise AssertionError(f"{bad.numel()} of {ai.numel()} elements differ from the reference; {first}")


def _data(shape: tuple[int, ...], delta: float, offset: float, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Values spread over 1.5x the grid range, so that some clip on both sides."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * 1.5 * delta + offset - 0.25 * delta
    return x.float().to(device)


def _both(x: torch.Tensor, name: str, *args, per_channel: bool = False, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    fn = gemmlowp_quantize_per_channel if per_channel else gemmlowp_quantize
    return fn(x, *args, backend=name, **kwargs), fn(x, *args, backend="torch", **kwargs)


# ---------------------------------------------------------------------------------------------- per tensor


@pytest.mark.parametrize("shape", [(), (1,), (7,), (4, 5), (3, 8, 17), (2, 3, 33, 35), (1_000_003,)])
def test_shapes(kernel, shape):
    name, device = kernel
    x = _data(shape, 6.0, -3.0, device)
    assert_same_bits(*_both(x, name, 6.0, -3.0, 8))


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("preserve_zero", [True, False])
@pytest.mark.parametrize("pow2_scale", [False, True])
def test_bits_and_grid_options(kernel, bits, preserve_zero, pow2_scale):
    name, device = kernel
    for i, (delta, offset) in enumerate(RANGES):
        x = _data((4099,), delta, offset, device, seed=bits * 100 + i)
        got, ref = _both(x, name, delta, offset, bits, preserve_zero=preserve_zero, pow2_scale=pow2_scale)
        assert_same_bits(got, ref)


def test_round_half_to_even_exactly(kernel):
    """Ties on every level of a 16-bit grid (scale 1, offset 0: v == x), checked against known answers."""
    name, device = kernel
    impl = backends.select_backend(device, name)
    levels = torch.arange(0, 65535, dtype=torch.float32, device=device)
    qp = QParams(1.0, 1.0, 0.0, 65535.0)
    for frac in (0.5, 0.25, 0.75, 0.0):
        x = levels + frac
        want = torch.round(x.double()).float()  # float64 ties-to-even of the exact value
        if frac == 0.5:
            assert torch.equal(want % 2, torch.zeros_like(want))
        got = impl.quantize_(x.clone(), qp, None)
        assert_same_bits(got, want)
        assert_same_bits(got, backends.TorchBackend().quantize_(x.clone(), qp, None))


def test_special_values(kernel):
    name, device = kernel
    specials = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38, 1e-39]
    x = torch.tensor(specials * 37, dtype=torch.float32, device=device)
    for delta, offset in RANGES:
        for bits in (2, 8, 16):
            got, ref = _both(x, name, delta, offset, bits, preserve_zero=False)
            assert_same_bits(got, ref)
            assert torch.isnan(got).sum() == 37  # NaN stays NaN, nothing else becomes NaN
            assert torch.isfinite(got[1:3]).all() and got[1] > got[2]  # +-inf saturate to the grid ends


def test_offset_is_never_negative_zero():
    """A -0.0 offset would make the output's sign of zero depend on how a backend clamps/rounds -0.0."""
    assert math.copysign(1.0, gemmlowp_qparams(2.5, -0.0, 8).offset) == 1.0
    qp = gemmlowp_qparams(10.0, -0.001, 4, preserve_zero=True)  # zero point rounds to -0.0
    assert qp.offset == 0.0 and math.copysign(1.0, qp.offset) == 1.0
    delta = torch.tensor([2.5, 10.0], dtype=torch.float64)
    per_channel = gemmlowp_qparams_per_channel(delta, torch.tensor([-0.0, -0.001], dtype=torch.float64), 4)
    assert not torch.signbit(per_channel.offset).any()


def test_nan_noise_and_nan_input(kernel):
    name, device = kernel
    x = _data((1000,), 4.0, -2.0, device)
    noise = torch.rand(1000, generator=torch.Generator().manual_seed(3)).sub_(0.5).to(device)
    x[::7] = float("nan")
    noise[::11] = float("nan")
    assert_same_bits(*_both(x, name, 4.0, -2.0, 4, noise=noise))


# ------------------------------------------------------------------------------- layouts, in place, noise


def _layouts(device: torch.device) -> dict[str, torch.Tensor]:
    base = _data((6, 10, 9, 11), 6.0, -3.0, device, seed=7)
    return {
        "transposed": base.transpose(1, 3),
        "sliced": base[:, 1::3, :, 2:],
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "permuted": base.permute(2, 0, 3, 1),
        "matrix_t": base.reshape(60, 99).t(),
        "narrowed": base.narrow(2, 3, 4),
    }


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last", "permuted", "matrix_t", "narrowed"])
def test_non_contiguous_in_place(kernel, layout):
    name, device = kernel
    x = _layouts(device)[layout]
    base = x._base if x._base is not None else x
    before = base.clone()
    ref = gemmlowp_quantize(x, 6.0, -3.0, 4, backend="torch")
    out = gemmlowp_quantize(x, 6.0, -3.0, 4, backend=name, inplace=True)
    assert out is x
    assert_same_bits(x, ref)
    # Elements outside the view are untouched.
    mask = torch.ones_like(base, dtype=torch.bool)
    view_of_mask = mask.as_strided(x.shape, x.stride(), x.storage_offset() - base.storage_offset())
    view_of_mask.fill_(False)
    assert_same_bits(base[mask], before[mask])


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_non_contiguous_with_noise(kernel, layout):
    name, device = kernel
    x = _layouts(device)[layout]
    g = torch.Generator().manual_seed(11)
    dense_noise = torch.rand(x.shape, generator=g).sub_(0.5).to(device)
    strided_noise = torch.rand(x.shape[::-1], generator=g).sub_(0.5).to(device).permute(*range(x.dim() - 1, -1, -1))
    like_noise = torch.empty_like(x).copy_(dense_noise)  # x's own strides
    for noise in (dense_noise, strided_noise, like_noise):
        assert_same_bits(*_both(x, name, 6.0, -3.0, 3, noise=noise))


def test_expanded_out_of_place(kernel):
    name, device = kernel
    x = _data((1, 50), 6.0, -3.0, device).expand(40, 50)
    assert_same_bits(*_both(x, name, 6.0, -3.0, 5))


def test_in_place_matches_out_of_place(kernel):
    name, device = kernel
    x = _data((33, 65), 6.0, -3.0, device)
    original = x.clone()
    out = gemmlowp_quantize(x, 6.0, -3.0, 6, backend=name)
    assert_same_bits(x, original)  # out of place leaves the input alone
    ptr = x.data_ptr()
    res = gemmlowp_quantize(x, 6.0, -3.0, 6, backend=name, inplace=True)
    assert res is x and x.data_ptr() == ptr
    assert_same_bits(x, out)


def test_stochastic_rounding(kernel):
    name, device = kernel
    x = _data((257, 31), 8.0, -4.0, device)
    gen_device = device if device.type == "cuda" else "cpu"
    results = []
    for backend in (name, "torch"):
        gen = torch.Generator(device=gen_device).manual_seed(1234)
        results.append(gemmlowp_quantize(x, 8.0, -4.0, 2, stochastic=True, generator=gen, backend=backend))
    assert_same_bits(*results)
    noise = torch.full(x.shape, 0.4999, device=device)
    got, ref = _both(x, name, 8.0, -4.0, 2, noise=noise)
    assert_same_bits(got, ref)
    assert not torch.equal(got, gemmlowp_quantize(x, 8.0, -4.0, 2, backend=name))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_through_public_api(kernel, dtype):
    name, device = kernel
    x = _data((500,), 6.0, -3.0, device).to(dtype)
    got, ref = _both(x, name, 6.0, -3.0, 4)
    assert got.dtype == dtype
    assert_same_bits(got, ref)
    y = x.clone()
    gemmlowp_quantize(y, 6.0, -3.0, 4, backend=name, inplace=True)
    assert_same_bits(y, ref)


def test_noise_of_other_dtype_and_broadcast(kernel):
    """float64 noise is added in float64 by the reference's add_, so the kernels hand it to the reference."""
    name, device = kernel
    x = _data((20, 30), 6.0, -3.0, device)
    noise = torch.linspace(-0.5, 0.5, 30, dtype=torch.float64, device=device)
    assert_same_bits(*_both(x, name, 6.0, -3.0, 3, noise=noise))
    assert_same_bits(*_both(x, name, 6.0, -3.0, 3, noise=noise.float()))
    assert_same_bits(*_both(x, name, 6.0, -3.0, 3, noise=noise.half()))


def test_autograd_version_counter_and_inference_mode(kernel):
    """The kernels write behind ATen's back, so they must keep its bookkeeping: graphs, versions, inference."""
    name, device = kernel
    x = _data((64, 9), 6.0, -3.0, device).requires_grad_()
    got, ref = _both(x, name, 6.0, -3.0, 4)  # recorded by autograd: handed to the reference
    assert got.grad_fn is not None
    assert_same_bits(got, ref)
    y = x.detach().clone()
    version = y._version
    gemmlowp_quantize(y, 6.0, -3.0, 4, backend=name, inplace=True)
    assert y._version > version
    with torch.inference_mode():
        z = x.detach().clone()
        gemmlowp_quantize(z, 6.0, -3.0, 4, backend=name, inplace=True)  # what the inference hooks do
        assert_same_bits(z, ref)
    with pytest.raises(RuntimeError, match="inference tensor"):
        gemmlowp_quantize(z, 6.0, -3.0, 4, backend=name, inplace=True)


@pytest.mark.parametrize("shape", [(0,), (3, 0, 4), (0, 5)])
def test_empty(kernel, shape):
    name, device = kernel
    x = torch.empty(shape, device=device)
    assert gemmlowp_quantize(x, 1.0, 0.0, 8, backend=name).shape == shape
    assert gemmlowp_quantize(x, 1.0, 0.0, 8, backend=name, inplace=True) is x
    assert backends.select_backend(device, name).quantize_(x, gemmlowp_qparams(1.0, 0.0, 8), None) is x
    dim = 1 if len(shape) > 1 else 0
    delta = torch.ones(shape[dim])
    out = gemmlowp_quantize_per_channel(x, delta, -delta / 2, 4, dim=dim, backend=name)
    assert out.shape == shape


# ------------------------------------------------------------------------------------------- per channel


def _channel_params(channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    delta = torch.rand(channels, generator=g, dtype=torch.float64) * 6 + 0.01
    offset = -torch.rand(channels, generator=g, dtype=torch.float64) * delta
    delta[::3] = 0.0  # pass-through channels
    offset[1::4] = 0.5  # all-positive ranges
    return delta, offset


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_per_channel(kernel, dim, bits):
    name, device = kernel
    x = _data((5, 12, 7, 9), 8.0, -4.0, device, seed=dim + 10)
    x.view(-1)[::13] = float("nan")
    x.view(-1)[5::17] = float("inf")
    delta, offset = _channel_params(x.shape[dim], seed=bits)
    for preserve_zero in (True, False):
        got, ref = _both(x, name, delta, offset, bits, dim=dim, per_channel=True, preserve_zero=preserve_zero)
        assert_same_bits(got, ref)
    # Pass-through channels keep their exact input (NaN included).
    keep = (delta == 0).nonzero().flatten().to(device)
    assert_same_bits(got.index_select(dim, keep), x.index_select(dim, keep))


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last", "permuted"])
@pytest.mark.parametrize("dim", [1, 3])
def test_per_channel_layouts_noise_in_place(kernel, layout, dim):
    name, device = kernel
    x = _layouts(device)[layout]
    delta, offset = _channel_params(x.shape[dim], seed=dim)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)).sub_(0.5).to(device)
    for kwargs in ({}, {"noise": noise}, {"pow2_scale": True}):
        ref = gemmlowp_quantize_per_channel(x, delta, offset, 3, dim=dim, backend="torch", **kwargs)
        y = x.clone()
        out = gemmlowp_quantize_per_channel(y, delta, offset, 3, dim=dim, backend=name, inplace=True, **kwargs)
        assert out is y
        assert_same_bits(y, ref)


def _levels(channels: int, seed: int) -> torch.Tensor:
    """Per-channel level counts as bit allocation makes them: any whole number >= 2, not powers of two."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(2, 300, (channels,), generator=g).double()
    levels[::5] = 2.0
    levels[1::7] = 65536.0 + 3.0  # beyond 16 bits: the round-half-even trick still holds
    return levels


@pytest.mark.parametrize("dim", [0, 1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_per_channel_levels(kernel, dim, layout):
    """A level count per channel (bit allocation): the kernels equal the reference bit for bit, noise included."""
    name, device = kernel
    x = _data((5, 12, 7, 9), 8.0, -4.0, device, seed=dim + 20)
    x.view(-1)[::13] = float("nan")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    delta, offset = _channel_params(x.shape[dim], seed=dim)
    levels = _levels(x.shape[dim], seed=dim)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)).sub_(0.5).to(device)
    for kwargs in ({}, {"noise": noise}, {"preserve_zero": False}):
        qp = gemmlowp_qparams_per_channel(delta, offset, 8, levels=levels, preserve_zero=kwargs.get("preserve_zero",
                                                                                                      True))
        noise_arg = kwargs.get("noise")
        got = quantize_per_channel_with_qparams(x, qp, dim, noise=noise_arg, backend=name)
        ref = quantize_per_channel_with_qparams(x, qp, dim, noise=noise_arg, backend="torch")
        assert_same_bits(got, ref)
    # Each channel really has its own grid: levels_c distinct values at most, per channel.
    moved = got.movedim(dim, 0).reshape(x.shape[dim], -1).cpu()
    for c in range(x.shape[dim]):
        if delta[c] > 0:
            values = moved[c][torch.isfinite(moved[c])].unique()
            assert values.numel() <= int(levels[c])


def test_per_channel_levels_equal_per_tensor_grids_channel_by_channel():
    """Levels 2**b on channel c give exactly the per-tensor grid of b bits on that channel."""
    x = _data((4, 6, 10), 8.0, -4.0, torch.device("cpu"), seed=3)
    delta, offset = _channel_params(6, seed=2)
    bits = torch.tensor([2, 3, 4, 5, 6, 8])
    qp = gemmlowp_qparams_per_channel(delta, offset, 8, levels=2.0**bits)
    got = quantize_per_channel_with_qparams(x, qp, 1, backend="torch")
    for c in range(6):
        expected = gemmlowp_quantize(x[:, c], float(delta[c]), float(offset[c]), int(bits[c]), backend="torch")
        assert_same_bits(got[:, c], expected if delta[c] > 0 else x[:, c])


def test_per_channel_levels_refused_when_not_whole_or_too_few():
    delta = torch.ones(3, dtype=torch.float64)
    for levels in ([2, 3], [1, 4, 4], [2.5, 4, 4], [2, 4, 2**23]):
        with pytest.raises(ValueError, match="level counts"):
            gemmlowp_qparams_per_channel(delta, -delta / 2, 4, levels=torch.tensor(levels, dtype=torch.float64))


def test_per_channel_one_dim_and_all_pass_through(kernel):
    name, device = kernel
    x = _data((300,), 6.0, -3.0, device)
    delta, offset = _channel_params(300, seed=1)
    assert_same_bits(*_both(x, name, delta, offset, 4, dim=0, per_channel=True))
    zero = torch.zeros(300)
    assert_same_bits(gemmlowp_quantize_per_channel(x, zero, zero, 4, dim=0, backend=name), x)


# ------------------------------------------------------------------------------ refusals and selection


def test_kernel_refuses_other_dtypes(kernel):
    name, device = kernel
    impl = backends.select_backend(device, name)
    qp = gemmlowp_qparams(6.0, -3.0, 8)
    for dtype in (torch.float64, torch.float16, torch.int32):
        with pytest.raises(RuntimeError, match="float32"):
            impl.quantize_(torch.zeros(10, dtype=dtype, device=device), qp, None)
    with pytest.raises(RuntimeError, match="shape"):
        impl.module.quantize_(torch.zeros(10, device=device), torch.zeros(9, device=device), 1.0, 1.0, 0.0, 255.0)
    scale = torch.ones(4, device=device)
    with pytest.raises(RuntimeError, match="float32"):
        impl.module.quantize_per_channel_(torch.zeros(4, 2, device=device), None, scale.double(), scale, scale, 0,
                                          scale)
    with pytest.raises(RuntimeError, match="needs 2 values"):
        impl.module.quantize_per_channel_(torch.zeros(4, 2, device=device), None, scale, scale, scale, 1, scale[:2])
    with pytest.raises(RuntimeError, match="qmax needs 4 values"):
        impl.module.quantize_per_channel_(torch.zeros(4, 2, device=device), None, scale, scale, scale, 0, scale[:3])


def test_cuda_kernel_refuses_cpu_tensors():
    """Runs wherever the CUDA extension loads (a CUDA build of torch is enough: no GPU work happens)."""
    module = backends.kernel_module("cuda")
    if module is None:
        pytest.skip(f"the CUDA kernel is not built ({backends.kernel_load_error('cuda')})")
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        module.quantize_(torch.zeros(8), None, 1.0, 1.0, 0.0, 255.0)


def test_cpu_kernel_refuses_cuda_tensors():
    reason = _skip_reason("cpu") or _skip_reason("cuda")
    if reason:
        pytest.skip(reason)
    x = torch.zeros(8, device="cuda")
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        gemmlowp_quantize(x, 1.0, 0.0, 8, backend="cpu")
    with pytest.raises(RuntimeError, match="CUDA tensors only|is on cpu"):
        backends.select_backend(x.device, "cuda").quantize_(x, gemmlowp_qparams(1.0, 0.0, 8), torch.zeros(8))


@pytest.fixture
def fresh_selection(monkeypatch):
    """Backend choices and kernel loads forgotten for the test (the module caches them for speed)."""
    monkeypatch.setattr(backends, "_chosen", {})
    monkeypatch.setattr(backends, "_modules", dict(backends._modules))
    monkeypatch.setattr(backends, "_load_errors", dict(backends._load_errors))


def test_cpu_kernel_is_the_default_for_cpu_tensors(fresh_selection, caplog):
    reason = _skip_reason("cpu")
    if reason:
        pytest.skip(reason)
    with caplog.at_level(logging.INFO, logger="pytorch_quantizer"):
        for _ in range(3):
            impl = backends.select_backend(torch.device("cpu"))
    assert isinstance(impl, backends.CpuKernelBackend) and impl.name == "cpu"
    said = [r for r in caplog.records if r.name == "pytorch_quantizer"]
    assert len(said) == 1 and "cpu backend" in said[0].getMessage()
    assert isinstance(backends.select_backend(torch.device("cpu"), "torch"), backends.TorchBackend)


def test_cuda_kernel_is_the_default_for_cuda_tensors(fresh_selection):
    reason = _skip_reason("cuda")
    if reason:
        pytest.skip(reason)
    assert isinstance(backends.select_backend(torch.device("cuda", 0)), backends.CudaKernelBackend)


def test_missing_build_falls_back_and_says_so_once(fresh_selection, caplog):
    backends._modules.update(cpu=None, cuda=None)
    backends._load_errors.update(cpu="ImportError: not built", cuda="ImportError: not built")
    with caplog.at_level(logging.INFO, logger="pytorch_quantizer"):
        for _ in range(3):
            auto = backends.select_backend(torch.device("cpu"))
            forced = backends.select_backend(torch.device("cpu"), "cpu")
    assert isinstance(auto, backends.TorchBackend) and isinstance(forced, backends.TorchBackend)
    said = [r for r in caplog.records if r.name == "pytorch_quantizer"]
    assert len(said) == 2 and all("not available" in r.getMessage() for r in said)
    x = _data((100,), 6.0, -3.0, torch.device("cpu"))
    assert_same_bits(gemmlowp_quantize(x, 6.0, -3.0, 4), gemmlowp_quantize(x, 6.0, -3.0, 4, backend="torch"))


def test_other_devices_and_unknown_names(fresh_selection):
    assert isinstance(backends.select_backend(torch.device("meta")), backends.TorchBackend)
    with pytest.raises(ValueError, match="unknown backend"):
        backends.select_backend(torch.device("cpu"), "triton")


# ------------------------------------------------------------------------------ building on first use


def _no_in_place_build(monkeypatch, name: str = "cpu") -> None:
    monkeypatch.setitem(backends.KERNEL_MODULES, name, "pytorch_quantizer._no_such_kernel")


def test_an_in_place_build_comes_first(fresh_selection, monkeypatch):
    in_place = types.ModuleType("aciq_in_place_kernel")
    monkeypatch.setitem(sys.modules, in_place.__name__, in_place)
    monkeypatch.setitem(backends.KERNEL_MODULES, "cpu", in_place.__name__)
    monkeypatch.setattr(kernel_build, "load", lambda *args: pytest.fail("built although built in place"))
    backends._modules.pop("cpu", None)
    assert backends.kernel_module("cpu") is in_place


def test_build_switched_off(fresh_selection, monkeypatch):
    _no_in_place_build(monkeypatch)
    monkeypatch.setenv("ACIQ_BUILD_CPU", "0")
    backends._modules.pop("cpu", None)
    assert backends.kernel_module("cpu") is None
    assert backends.kernel_load_error("cpu") == "ACIQ_BUILD_CPU=0"


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_a_failing_build_falls_back_unless_insisted_on(fresh_selection, monkeypatch, tmp_path, caplog):
    """Automatic: the compiler's message is the reason, logged once; ACIQ_BUILD_CPU=1: it is an error."""
    (tmp_path / "broken.cpp").write_text("#error aciq-broken-kernel\n")
    monkeypatch.setitem(kernel_build.KERNELS, "cpu", kernel_build.Kernel("cpu", "_aciq_broken", ("broken.cpp",)))
    monkeypatch.setattr(kernel_build, "KERNELS_DIR", tmp_path)
    monkeypatch.setenv("ACIQ_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ACIQ_BUILD_CPU", raising=False)
    _no_in_place_build(monkeypatch)
    backends._modules.pop("cpu", None)
    with caplog.at_level(logging.INFO, logger="pytorch_quantizer"):
        for _ in range(2):
            assert isinstance(backends.select_backend(torch.device("cpu")), backends.TorchBackend)
    assert "aciq-broken-kernel" in backends.kernel_load_error("cpu")
    said = [r.getMessage() for r in caplog.records if "not available" in r.getMessage()]
    assert len(said) == 1 and "aciq-broken-kernel" in said[0]
    backends._modules.pop("cpu")
    monkeypatch.setenv("ACIQ_BUILD_CPU", "1")
    with pytest.raises(RuntimeError, match="(?s)ACIQ_BUILD_CPU=1.*aciq-broken-kernel"):
        backends.kernel_module("cpu")


PROBE = """#include <Python.h>
#define ACIQ_CAT(a, b) a##b
#define ACIQ_INIT(name) ACIQ_CAT(PyInit_, name)
#define ACIQ_STR(x) ACIQ_STR2(x)
#define ACIQ_STR2(x) #x
static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(ANSWER); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};
static PyModuleDef module = {PyModuleDef_HEAD_INIT, ACIQ_STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};
PyMODINIT_FUNC ACIQ_INIT(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module); }
"""
PROBE_LOADER = """import sys
from pathlib import Path
from pytorch_quantizer import kernel_build
probe = kernel_build.Kernel("cpu", "_aciq_probe", ("probe.cpp",))
print("answer", kernel_build.load(probe, Path(sys.argv[1]), Path(sys.argv[2])).answer())
"""


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_concurrent_first_uses_build_once_and_a_changed_source_rebuilds(tmp_path):
    """Two processes load a (tiny) kernel at once into an empty cache: one compiles, the other waits for it and
    finds it up to date; after a source change the next process rebuilds it."""
    source = tmp_path / "probe.cpp"
    source.write_text("#define ANSWER 41\n" + PROBE)
    cache = tmp_path / "cache"
    run = [sys.executable, "-c", PROBE_LOADER, str(tmp_path), str(cache)]

    def compiles() -> int:
        return (cache / "_aciq_probe" / ".ninja_log").read_text().count("probe.o")

    loaders = [subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in loaders]
    assert all(p.returncode == 0 and "answer 41" in out for p, out in zip(loaders, outputs, strict=True)), outputs
    assert compiles() == 1
    source.write_text("#define ANSWER 42\n" + PROBE)
    assert "answer 42" in subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert compiles() == 2


@pytest.mark.skipif(os.environ.get("CI", "").lower() != "true", reason="only CI insists on every build")
def test_ci_built_every_kernel_it_can():
    """In CI a kernel that should have been built must load: a build break fails here, not as skipped tests."""
    assert backends.kernel_module("cpu") is not None, backends.kernel_load_error("cpu")
    if kernel_build.cuda_unavailable() is None:
        assert backends.kernel_module("cuda") is not None, backends.kernel_load_error("cuda")
