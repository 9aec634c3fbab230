"""gemmlowp_quantize against an independent NumPy implementation of the same definition."""

import numpy as np
import pytest
import torch

from pytorch_quantizer import (
    gemmlowp_qparams,
    gemmlowp_qparams_per_channel,
    gemmlowp_quantize,
    gemmlowp_quantize_per_channel,
    quantize_per_channel_with_qparams,
    quantize_with_qparams,
)


def numpy_gemmlowp(x, delta, offset, bits, preserve_zero, noise=None, pow2=False):
    """Written from the definition with NumPy float32 arithmetic, independently of the package."""
    x = np.asarray(x, dtype=np.float32)
    if delta <= 0:
        return x.copy()
    qmax = 2**bits - 1
    scale = delta / qmax
    if pow2:
        scale = 2.0 ** np.ceil(np.log2(scale))
    scale = np.float32(scale)
    off = np.float32(offset)
    if preserve_zero and offset < 0 < offset + delta:
        off = np.float32(np.float32(round(offset / float(scale))) * scale)
    inv = np.float32(1.0 / float(scale))
    v = (x - off) * inv
    if noise is not None:
        v = v + np.asarray(noise, dtype=np.float32)
    q = np.rint(np.clip(v, np.float32(0), np.float32(qmax)))
    return (q * scale + off).astype(np.float32)


CASES = [
    (4.0, -2.0, 4, True),
    (4.0, -2.0, 4, False),
    (3.3, -0.7, 2, True),
    (1.0, 0.0, 8, True),
    (10.0, 1.5, 3, True),  # zero outside the range: preserve_zero has nothing to do
    (0.05, -0.01, 16, True),
    (7.0, -7.0, 1, False),
]


@pytest.mark.parametrize(("delta", "offset", "bits", "pz"), CASES)
def test_matches_numpy_definition(delta, offset, bits, pz):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 17, 11, generator=g) * 3
    got = gemmlowp_quantize(x, delta, offset, bits, preserve_zero=pz, backend="torch")
    want = numpy_gemmlowp(x.numpy(), delta, offset, bits, pz)
    np.testing.assert_array_equal(got.numpy(), want)
    # values land on at most 2**bits levels, inside the range (clamping)
    assert got.unique().numel() <= 2**bits
    lo, hi = min(offset, want.min()), max(offset + delta, want.max())
    assert got.min() >= lo - 1e-6 and got.max() <= hi + 1e-6


def test_preserve_zero_makes_zero_exact():
    x = torch.zeros(10)
    out = gemmlowp_quantize(x, 3.3, -1.0, 4, preserve_zero=True)
    assert torch.equal(out, torch.zeros(10))
    assert not torch.equal(gemmlowp_quantize(x, 3.3, -1.0, 4, preserve_zero=False), torch.zeros(10))


def test_clamps_outside_values():
    x = torch.tensor([-100.0, 100.0, float("inf"), -float("inf")])
    out = gemmlowp_quantize(x, 2.0, -1.0, 4, preserve_zero=False)
    assert out.tolist() == [-1.0, 1.0, 1.0, -1.0]


def test_nan_propagates():
    out = gemmlowp_quantize(torch.tensor([float("nan"), 0.3]), 2.0, -1.0, 4)
    assert out[0].isnan() and not out[1].isnan()


def test_nonpositive_delta_is_identity():
    x = torch.randn(50)
    for delta in (0.0, -1.0):
        out = gemmlowp_quantize(x, delta, 0.0, 4)
        assert torch.equal(out, x) and out is not x
    y = x.clone()
    assert gemmlowp_quantize(y, 0.0, 0.0, 4, inplace=True) is y


def test_stochastic_with_generator_is_reproducible_and_matches_numpy():
    x = torch.randn(1000)
    a = gemmlowp_quantize(x, 4.0, -2.0, 3, stochastic=True, generator=torch.Generator().manual_seed(5))
    b = gemmlowp_quantize(x, 4.0, -2.0, 3, stochastic=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    noise = torch.rand(1000, generator=torch.Generator().manual_seed(5)) - 0.5
    want = numpy_gemmlowp(x.numpy(), 4.0, -2.0, 3, True, noise=noise.numpy())
    np.testing.assert_array_equal(a.numpy(), want)
    # unbiased on average, unlike nearest rounding
    v = torch.full((200_000,), 0.1)
    mean = gemmlowp_quantize(v, 1.0, 0.0, 2, stochastic=True, generator=torch.Generator().manual_seed(0)).mean()
    assert abs(mean.item() - 0.1) < 0.005


def test_pow2_scale():
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    got = gemmlowp_quantize(x, 3.0, -1.5, 4, pow2_scale=True, preserve_zero=False)
    np.testing.assert_array_equal(got.numpy(), numpy_gemmlowp(x.numpy(), 3.0, -1.5, 4, False, pow2=True))
    steps = torch.diff(got.unique()) / 0.25  # 3/15 = 0.2 rounds up to 0.25; every level is a multiple of it
    assert torch.equal(steps, steps.round()) and steps.min() == 1


def test_inplace_writes_input():
    x = torch.randn(20)
    want = gemmlowp_quantize(x, 4.0, -2.0, 4)
    y = x.clone()
    assert gemmlowp_quantize(y, 4.0, -2.0, 4, inplace=True) is y
    assert torch.equal(y, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_computed_in_float32(dtype):
    x = torch.randn(64).to(dtype)
    out = gemmlowp_quantize(x, 4.0, -2.0, 4)
    assert out.dtype == dtype
    want = numpy_gemmlowp(x.float().numpy(), 4.0, -2.0, 4, True)
    np.testing.assert_array_equal(out.float().numpy(), torch.tensor(want).to(dtype).float().numpy())


def test_bad_inputs():
    with pytest.raises(TypeError, match="floating-point"):
        gemmlowp_quantize(torch.arange(5), 4.0, 0.0, 4)
    with pytest.raises(ValueError, match="bits"):
        gemmlowp_quantize(torch.randn(5), 4.0, 0.0, 0)
    with pytest.raises(ValueError, match="bits"):
        gemmlowp_quantize(torch.randn(5), 4.0, 0.0, 17)
    with pytest.raises(ValueError, match="finite"):
        gemmlowp_quantize(torch.randn(5), float("nan"), 0.0, 4)


def test_per_channel_matches_per_tensor_per_slice():
    x = torch.randn(4, 6, 5)
    deltas = torch.tensor([1.0, 2.0, 0.0, 3.0, 0.5, 4.0])
    offsets = torch.tensor([-0.5, -1.0, 0.0, 0.2, -0.1, -3.0])
    out = gemmlowp_quantize_per_channel(x, deltas, offsets, 3, dim=1, preserve_zero=True)
    for c in range(6):
        want = numpy_gemmlowp(x[:, c].numpy(), deltas[c].item(), offsets[c].item(), 3, True)
        np.testing.assert_array_equal(out[:, c].numpy(), want)
    with pytest.raises(ValueError, match="channel"):
        gemmlowp_quantize_per_channel(x, deltas[:3], offsets[:3], 3, dim=1)


def test_precomputed_qparams_give_the_same_bits():
    """The entry points the hooks and the benchmark use, with parameters computed once, match the one-call forms."""
    x = torch.randn(3, 5, 7) * 3
    np.testing.assert_array_equal(
        quantize_with_qparams(x, gemmlowp_qparams(6.0, -2.5, 4)).numpy(), gemmlowp_quantize(x, 6.0, -2.5, 4).numpy()
    )
    deltas = torch.tensor([1.0, 2.0, 0.0, 3.0, 0.5], dtype=torch.float64)
    offsets = torch.tensor([-0.5, -1.0, 0.0, 0.2, -3.0], dtype=torch.float64)
    qp = gemmlowp_qparams_per_channel(deltas, offsets, 3)
    want = gemmlowp_quantize_per_channel(x, deltas, offsets, 3, dim=-2)
    np.testing.assert_array_equal(quantize_per_channel_with_qparams(x, qp, dim=-2).numpy(), want.numpy())
    y = x.clone()
    assert quantize_per_channel_with_qparams(y, qp, dim=1, inplace=True) is y
    np.testing.assert_array_equal(y.numpy(), want.numpy())
    with pytest.raises(ValueError, match="5 channel parameters for 3 channels along dim 0"):
        quantize_per_channel_with_qparams(x, qp, dim=0)
    with pytest.raises(ValueError, match="at least one dimension"):
        quantize_per_channel_with_qparams(torch.tensor(1.0), qp)
