"""Collect mode: per-layer CSVs, summaries, metadata, determinism and atomic writes."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from pytorch_quantizer import stats as sm
from pytorch_quantizer.layers import activation_layers
from pytorch_quantizer.observers import MomentsObserver
from pytorch_quantizer.stats import (
    StatisticsCollector,
    StatisticsError,
    load_statistics,
    per_sample_stats,
)


def collect(model, batches, folder, meta=None):
    with torch.no_grad(), StatisticsCollector(model) as collector:
        for x in batches:
            model(x)
    return collector.save(folder, meta or {"arch": "tiny", "fingerprint": "abc"})


def batches(n=3, size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 16, 16, generator=g) for _ in range(n)]


def test_layer_names_follow_seed(tiny_model):
    names = [layer.name for layer in activation_layers(tiny_model)]
    assert names == ["conv0_activation", "conv1_activation", "linear0_activation"]


def test_per_sample_stats_match_scipy():
    x = torch.randn(3, 5, 7, 7) * 2 + 0.5
    got = per_sample_stats(x).numpy()
    for i in range(3):
        s = x[i].flatten().double().numpy()
        want = [s.min(), s.max(), s.mean(), s.std(), sps.kurtosis(s, fisher=False), np.abs(s).mean(),
                np.abs(s - s.mean()).mean()]
        np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-5)


def test_constant_sample_has_defined_stats():
    got = per_sample_stats(torch.full((2, 10), 3.0))
    assert torch.isfinite(got).all()
    assert got[0, 3] == 0 and got[0, 4] == 0  # std, kurtosis


STATS_KERNELS = ["cpu", "cuda", "cuda-emulated"]


def _compiled_stats(name: str):
    from pytorch_quantizer.backends import kernel_module

    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    module = kernel_module(name)
    if module is None or not hasattr(module, "per_sample_stats"):
        pytest.skip(f"the {name} kernel (per_sample_stats) is not built")
    return module.per_sample_stats


@pytest.fixture(params=STATS_KERNELS)
def stats_kernel(request):
    """A fused per_sample_stats taking and returning CPU tensors ([N, ...] -> [N, 7]): the CPU kernel, the CUDA
    kernel (on a GPU), or the CUDA kernel's own code run on the host (tests/cuda_emulation)."""
    if request.param == "cuda-emulated":
        return request.getfixturevalue("cuda_emulator").per_sample_stats
    kernel = _compiled_stats(request.param)
    device = "cuda" if request.param == "cuda" else "cpu"
    return lambda x: kernel(x.reshape(x.shape[0], -1).contiguous().to(device)).cpu()


def _torch_stats(x):
    """The PyTorch path of per_sample_stats (the one other dtypes and missing builds take)."""
    return per_sample_stats(x, fused=False)


def _float64_stats(x):
    d = x.reshape(x.shape[0], -1).double()
    mean = d.mean(1, keepdim=True)
    c = d - mean
    std = c.pow(2).mean(1).sqrt()
    kurt = torch.where(std > 0, (c / torch.where(std > 0, std, 1.0)[:, None]).pow(4).mean(1), 0.0)
    return torch.stack([d.amin(1), d.amax(1), mean[:, 0], std, kurt, d.abs().mean(1), c.abs().mean(1)], 1)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_dispatch_takes_the_kernel_of_the_device(device):
    kernel = _compiled_stats(device)
    x = torch.randn(3, 4, 5, 6, device=device)
    got = per_sample_stats(x)
    assert got.device == x.device and got.dtype == torch.float64
    assert torch.equal(got, kernel(x.reshape(3, -1)))


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 7), (5, 1000), (2, 3, 17, 19), (1, 40000), (3, 5000)])
def test_stats_kernel_matches_torch_path(stats_kernel, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g) * 2.5 + 0.75
    got = stats_kernel(x)
    assert got.dtype == torch.float64 and got.shape == (shape[0], len(sm.STAT_COLUMNS))
    torch.testing.assert_close(got, _torch_stats(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, _float64_stats(x), rtol=1e-6, atol=1e-7)


def test_stats_kernel_long_samples_match_float64(stats_kernel):
    x = torch.randn(2, 300_001, generator=torch.Generator().manual_seed(1)) * 3 + 1
    torch.testing.assert_close(stats_kernel(x), _float64_stats(x), rtol=1e-6, atol=1e-7)


def test_stats_kernel_constant_samples(stats_kernel):
    x = torch.tensor([0.1, -3.0, 0.0, 7.5])[:, None].expand(4, 5000).contiguous()
    got = stats_kernel(x)
    v = x[:, 0].double()
    zero = torch.zeros_like(v)
    assert torch.equal(got[:, [0, 1, 2, 3, 4, 6]], torch.stack([v, v, v, zero, zero, zero], 1))  # exact
    torch.testing.assert_close(got[:, 5], v.abs(), rtol=1e-6, atol=0.0)  # a float32 sum of |x|


def test_stats_kernel_huge_values_give_finite_kurtosis(stats_kernel):
    x = torch.randn(3, 20_000, generator=torch.Generator().manual_seed(2)) * 1e10
    x[2] += 5e10
    got = stats_kernel(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _float64_stats(x), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(got, _torch_stats(x), rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("m", [1, 999, 70_000])
def test_stats_kernel_nan_reaches_min_max(stats_kernel, m):
    x = torch.randn(3, m)
    x[1, m // 2] = float("nan")
    got = stats_kernel(x)
    assert torch.isnan(got[1, :2]).all()
    assert torch.isfinite(got[[0, 2]]).all()


def test_stats_kernel_infinite_values(stats_kernel):
    x = torch.randn(3, 5000)
    x[0, 7] = float("inf")
    x[1, 9] = -float("inf")
    got = stats_kernel(x)
    assert got[0, 1] == float("inf") and got[1, 0] == -float("inf")
    assert torch.isnan(got[:2, 3:5]).all()  # std and kurtosis of an infinite sample are undefined
    assert torch.isfinite(got[2]).all()


@pytest.mark.parametrize("shape", [(5, 1), (4, 999), (3, 250_000)])
def test_stats_kernel_sample_does_not_depend_on_its_batch(stats_kernel, shape):
    """Same bits for a sample alone, in a batch, or at another position: the split of a row into pieces
    depends on its length only."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4)) * 2 - 1
    whole = stats_kernel(x)
    assert torch.equal(stats_kernel(x[1:2]), whole[1:2])
    assert torch.equal(stats_kernel(x.flip(0)), whole.flip(0))
    assert torch.equal(stats_kernel(x), whole)  # and on a second run


@pytest.mark.parametrize("shape", [(1, 1_000_000), (3, 250_000), (16, 40_000), (128, 3000)])
def test_cpu_stats_kernel_deterministic_across_threads(shape):
    _compiled_stats("cpu")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 4 - 1
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(per_sample_stats(x))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_stats_kernel_rejects_bad_input(device):
    kernel = _compiled_stats(device)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel(torch.randn(4, 6, device=device).t())
    with pytest.raises(RuntimeError, match="float32"):
        kernel(torch.randn(4, 6, dtype=torch.float64, device=device))
    with pytest.raises(RuntimeError, match="at least one element"):
        kernel(torch.randn(4, 0, device=device))
    assert kernel(torch.randn(0, 6, device=device)).shape == (0, 7)
    assert per_sample_stats(torch.randn(4, 6, device=device).t()).shape == (6, 7)  # the dispatch makes it contiguous


def test_batch_of_one(tiny_model, tmp_path):
    folder = collect(tiny_model, [torch.randn(1, 3, 16, 16)], tmp_path / "s")
    st = load_statistics(folder)
    assert st.meta["images"] == 1
    assert st.tensor_stats("conv0_activation").max >= st.tensor_stats("conv0_activation").min


def test_observation_is_built_once_and_matches_the_summary(tiny_model, tmp_path):
    st = load_statistics(collect(tiny_model, batches(), tmp_path / "s"))
    obs = st.observation("conv1_activation")
    assert st.observation("conv1_activation") is obs  # plans reuse it (--compare times methods, not file rows)
    assert obs.moments == st.tensor_stats("conv1_activation")
    assert load_statistics(st.folder).observation("conv1_activation") == obs


def test_collect_writes_layout(tiny_model, tmp_path):
    folder = collect(tiny_model, batches(), tmp_path / "s")
    files = sorted(p.name for p in folder.iterdir())
    for name in ("conv0_activation", "conv1_activation", "linear0_activation"):
        assert f"{name}.csv" in files and f"{name}_summary.csv" in files
        per_sample = pd.read_csv(folder / f"{name}.csv")
        assert list(per_sample.columns) == ["min", "max", "mean", "std", "kurtosis", "mean_abs", "b"]
        assert len(per_sample) == 12
        summary = pd.read_csv(folder / f"{name}_summary.csv", index_col="reduce")
        assert list(summary.index) == ["min", "mean", "max"]
        assert "range" in summary.columns
        # the summary is the reduction of the per-sample table, computed here independently
        np.testing.assert_allclose(summary.loc["mean", "b"], per_sample["b"].mean(), rtol=1e-7)
        np.testing.assert_allclose(summary.loc["max", "range"], (per_sample["max"] - per_sample["min"]).max(),
                                   rtol=1e-7)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["arch"] == "tiny" and meta["fingerprint"] == "abc" and meta["images"] == 12
    assert [layer["numel"] for layer in meta["layers"]] == [8 * 16 * 16, 16 * 8 * 8, 10]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_second_identical_run_gives_identical_files(tiny_model, tmp_path):
    a = collect(tiny_model, batches(), tmp_path / "a")
    b = collect(tiny_model, batches(), tmp_path / "b")
    for path in a.iterdir():
        assert path.read_bytes() == (b / path.name).read_bytes(), path.name


def test_failed_save_leaves_previous_statistics(tiny_model, tmp_path, monkeypatch):
    folder = collect(tiny_model, batches(seed=1), tmp_path / "s")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    calls = {"n": 0}
    real = MomentsObserver.export

    def failing(self, folder, layer):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # interrupted half-way through writing
        real(self, folder, layer)

    monkeypatch.setattr(MomentsObserver, "export", failing)
    with pytest.raises(KeyboardInterrupt):
        collect(tiny_model, batches(seed=2), tmp_path / "s")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_nan_activation_names_the_layer(tiny_model, tmp_path):
    with torch.no_grad():
        tiny_model.features[3].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="conv1_activation"):
        collect(tiny_model, batches(), tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_no_batches_is_an_error(tiny_model, tmp_path):
    with pytest.raises(StatisticsError, match="no statistics"):
        collect(tiny_model, [], tmp_path / "s")


def test_load_errors(tmp_path, tiny_model):
    with pytest.raises(StatisticsError, match="-sm collect"):
        load_statistics(tmp_path / "missing")
    folder = collect(tiny_model, batches(), tmp_path / "s")
    st = load_statistics(folder)
    st.check_model({"arch": "tiny", "fingerprint": "abc"})
    with pytest.raises(StatisticsError, match="fingerprint"):
        st.check_model({"arch": "tiny", "fingerprint": "other"})
    (folder / "conv0_activation_summary.csv").write_text("garbage\n1,2\n")
    with pytest.raises(StatisticsError):
        load_statistics(folder)


def test_refuses_to_replace_unrelated_folder(tmp_path, tiny_model):
    target = tmp_path / "s"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(StatisticsError, match="not a statistics folder"):
        collect(tiny_model, batches(), target)
    assert (target / "precious.txt").read_text() == "keep me"


def test_unfused_collector_agrees_with_fused(tiny_model, tmp_path):
    data = batches(2)
    tables = []
    for fused in (True, False):
        with torch.no_grad(), StatisticsCollector(tiny_model, fused=fused) as collector:
            for x in data:
                tiny_model(x)
        tables.append(collector.frames())
    assert tables[0].keys() == tables[1].keys()
    for name, frame in tables[0].items():
        pd.testing.assert_frame_equal(frame, tables[1][name], rtol=1e-5, atol=1e-6)


class _Replicas(StatisticsCollector):
    """Stands in for DataParallel on the CPU: ``replica`` says which replica the next forward is."""

    replica = 0

    def _replica(self, output):
        return self.replica


def test_replicas_are_gathered_in_sample_order(tiny_model, tmp_path):
    """Two replicas whose chunks arrive in reverse order give the statistics of one device, row for row."""
    data = batches(n=3, size=4)
    # The device runs the very chunks the replicas run, in sample order: a convolution of 2 images need not give the
    # bits of the same images in a batch of 4 (oneDNN and the GEMM choose their kernels by shape and CPU), while the
    # same chunk through the same kernels on one machine does.  So the bytes can be compared, and differ only if the
    # rows are gathered out of order.
    reference = collect(tiny_model, [x[i: i + 2] for x in data for i in (0, 2)], tmp_path / "one")
    with torch.no_grad(), _Replicas(tiny_model) as collector:
        for x in data:
            for replica in (1, 0):  # the second chunk's thread runs first
                collector.replica = replica
                tiny_model(x[2 * replica: 2 * replica + 2])
    gathered = collector.save(tmp_path / "two", {"arch": "tiny", "fingerprint": "abc"})
    for name in ("conv0_activation", "linear0_activation"):
        assert (gathered / f"{name}.csv").read_bytes() == (reference / f"{name}.csv").read_bytes()
