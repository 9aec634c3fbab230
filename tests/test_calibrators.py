"""The histogram observer and the methods searched on it (kld, mse, pP, Nstd, mix-measured): known answers on
synthetic samples and hand-built histograms, exact and deterministic widening, the files, and the driver."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import optimize
from test_cli import data_dir, last_result, run_cli  # noqa: F401  (data_dir is a fixture)

import inference_sim
from pytorch_quantizer import observers
from pytorch_quantizer.methods import get_method, method_names, required_observers
from pytorch_quantizer.observers import Histogram, HistogramObserver, Observation, ObserverError
from pytorch_quantizer.searches import (
    kl_divergence,
    kld_range,
    kld_upper,
    measured_mse,
    mse_range,
    percentile_range,
    percentile_upper,
)
from pytorch_quantizer.stats import StatisticsCollector, StatisticsError, load_statistics


def observe(batches, bins: int = 64) -> Histogram:
    observer = HistogramObserver(bins=bins)
    for batch in batches:
        observer.update(batch, (0, 0))
    return observer.histogram()


def sample_mse(x: np.ndarray, lo: float, hi: float, bits: int) -> float:
    """The quantization MSE of the sample itself on the grid [lo, hi] (the definition, no histogram)."""
    step = (hi - lo) / (2**bits - 1)
    q = lo + np.rint((np.clip(x, lo, hi) - lo) / step) * step
    return float(np.mean((q - x) ** 2))


def uniform(bins: int = 100, lo: float = 0.0, hi: float = 1.0) -> Histogram:
    return Histogram(np.linspace(lo, hi, bins + 1), np.full(bins, 10.0))


# -- the observer ----------------------------------------------------------------------------------------------
def heavy_data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(40, 500, generator=gen) * torch.linspace(0.05, 8.0, 40)[:, None]


def test_widening_keeps_counts_exact():
    """The first batch spans a fraction of the data: every later batch widens; each value is counted once, in the
    bin of the final lattice that holds it."""
    data = heavy_data()
    hist = observe([data[:2], data[2:10], data[10:]])
    values = data.numpy().ravel().astype(np.float64)
    assert hist.numel == values.size
    assert (hist.min, hist.max) == (values.min(), values.max())
    reference, _ = np.histogram(values, bins=hist.edges)
    np.testing.assert_array_equal(reference, hist.counts)


def test_same_first_batch_any_split_or_order_of_the_rest_gives_the_same_histogram():
    """What is guaranteed: given the first batch, the histogram depends only on the multiset of the other values."""
    data = heavy_data()
    first, rest = data[:3], data[3:].reshape(-1)
    expected = observe([first, rest])
    for seed in (1, 2):
        shuffled = rest[torch.randperm(rest.numel(), generator=torch.Generator().manual_seed(seed))]
        got = observe([first, *shuffled.split(333 * seed)])
        np.testing.assert_array_equal(got.edges, expected.edges)
        np.testing.assert_array_equal(got.counts, expected.counts)


def test_compiled_kernel_and_pytorch_bin_alike(monkeypatch):
    data = heavy_data()
    data[5, 7] = 3e38  # far beyond 2^62 first-batch bins: the end bins take it, both ways
    compiled = observe([data[:4], data[4:]])
    monkeypatch.setattr(observers, "_histogram_kernel", lambda flat: None)
    plain = observe([data[:4], data[4:]])
    np.testing.assert_array_equal(compiled.counts, plain.counts)


def conv_activations(seed: int, samples: int, channels: int, side: int) -> torch.Tensor:
    """Conv-like outputs (BatchNorm folded, before the ReLU): each channel Gaussian or Laplace with its own scale
    (log-normal over channels) and shift, plus a spatially smooth component shared by neighbouring pixels."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(channels, generator=gen) * 0.8)[None, :, None, None]
    shift = torch.randn(channels, generator=gen)[None, :, None, None] * 0.5 * scale
    shape = (samples, channels, side, side)
    laplace = -torch.rand(shape, generator=gen).log() * torch.randint(0, 2, shape, generator=gen).mul(2).sub(1)
    gauss = torch.randn(shape, generator=gen)
    noise = torch.where(torch.rand(samples, channels, 1, 1, generator=gen) < 0.5, gauss, laplace)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(shape, generator=gen), 9, 1, 4) * 3
    return (noise + smooth) * scale + shift


def test_sample_stride_is_coprime_and_within_budget():
    for per_sample, period in ((32 * 112 * 112, 112 * 112), (1280 * 49, 49), (1000, 1), (96 * 28 * 28, 784),
                               (8192, 64), (8193, 64), (10, 10)):
        stride = observers.sample_stride(per_sample, period)
        assert np.gcd(stride, period) == 1
        assert -(-per_sample // stride) <= observers.HISTOGRAM_SAMPLE_VALUES
        assert stride == 1 or -(-per_sample // (stride - 1)) > observers.HISTOGRAM_SAMPLE_VALUES or \
            np.gcd(stride - 1, period) != 1  # the smallest such stride
    assert observers.sample_stride(32 * 112 * 112, 112 * 112) == 51  # 49 and 50 share a factor with 112 * 112
    with pytest.raises(ValueError):
        observers.sample_stride(0, 1)


def test_strided_binning_counts_the_documented_subsample(monkeypatch):
    """The kernel and the PyTorch expression bin exactly the values at offsets 0, s, 2s, ... of every sample, and
    the range stays the full tensor's."""
    x = conv_activations(0, 3, 16, 30)
    stride = observers.sample_stride(16 * 900, 900, 1000)
    assert stride > 1
    expected = x.reshape(3, -1)[:, ::stride].reshape(-1).double().numpy()
    results = []
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(observers, "_histogram_kernel", lambda flat: None)
        observer = HistogramObserver(bins=256, sample_values=1000)
        observer.update(x[:1], (0, 0))
        observer.update(x[1:], (1, 0))
        results.append(observer.histogram())
    for hist in results:
        assert hist.numel == expected.size
        assert (hist.min, hist.max) == (float(x.min()), float(x.max()))
        inner, _ = np.histogram(expected, bins=hist.edges)
        assert abs(inner - hist.counts).sum() <= 2  # the extremes' bins: the full tensor's min/max are outside
    np.testing.assert_array_equal(results[0].counts, results[1].counts)


def test_subsampled_histogram_moves_searched_ranges_little():
    """The bound stated in docs/statistics.md: binning at most HISTOGRAM_SAMPLE_VALUES values a sample moves each
    searched range's ends, as a fraction of the layer's range, by at most: p99.99 0.06, p99.9 0.02, mse 0.07 (0.16
    at 8 bits), kld 0.05 (0.35 at 8 bits, where the KL optimum is flat), on conv-like activations at the sizes of
    mobilenet_v2's early, middle and late layers (measured worst: 0.055, 0.006, 0.021 (0.063), 0.028 (0.261))."""
    bounds = {"p99.99": 0.06, "p99.9": 0.02, "mse": 0.07, "kld": 0.05}
    worst: dict[tuple[str, int], float] = {}
    for seed in (0, 2):
        for side, channels in ((112, 32), (28, 96), (7, 320)):
            full, sub = HistogramObserver(sample_values=None), HistogramObserver()
            for batch in range(2):
                x = conv_activations(seed * 10 + batch, 8, channels, side)
                full.update(x, (batch, 0))
                sub.update(x, (batch, 0))
            exact, sampled = full.histogram(), sub.histogram()
            assert sampled.numel <= 16 * observers.HISTOGRAM_SAMPLE_VALUES < exact.numel
            assert (sampled.min, sampled.max) == (exact.min, exact.max)
            width = exact.max - exact.min
            for bits in (2, 4, 8):
                for name, search in (("kld", kld_range), ("mse", mse_range)):
                    a, b = search(exact, bits), search(sampled, bits)
                    moved = max(abs(a.lo - b.lo), abs(a.hi - b.hi)) / width
                    worst[name, bits] = max(worst.get((name, bits), 0.0), moved)
            for percent in (99.9, 99.99):
                (a_lo, a_hi), (b_lo, b_hi) = percentile_range(exact, percent), percentile_range(sampled, percent)
                moved = max(abs(a_lo - b_lo), abs(a_hi - b_hi)) / width
                worst[f"p{percent}", 0] = max(worst.get((f"p{percent}", 0), 0.0), moved)
    for (name, bits), moved in worst.items():
        bound = {("mse", 8): 0.16, ("kld", 8): 0.35}.get((name, bits), bounds[name])
        assert moved <= bound, f"{name} at {bits} bits moved by {moved:.3f} of the range (bound {bound})"


def test_constant_first_batch_then_spread():
    hist = observe([torch.zeros(2, 10), torch.linspace(-3.0, 5.0, 101).reshape(1, -1)])
    assert hist.numel == 121 and (hist.min, hist.max) == (-3.0, 5.0)
    assert hist.counts[np.searchsorted(hist.edges, 0.0, side="right") - 1] >= 21  # the 20 zeros and the linspace's 0


def test_constant_tensor_is_one_bin_and_not_clipped():
    hist = observe([torch.full((3, 8), 1.5)])
    assert hist.constant and len(hist.counts) == 1 and hist.numel == 24
    obs = Observation.of_moments(observers.TensorStats(1.5, 1.5, 1.5, 0.0, 0.0, 8))
    obs = Observation(obs.numel, obs.moments, obs.extreme, extra={"histogram": hist})
    for name in ("kld", "mse", "p99", "mix-measured"):
        grid = get_method(name).grid(obs, 4)
        assert grid.delta == 0.0 and grid.method == "no", name


def test_bad_histograms_are_refused():
    with pytest.raises(ObserverError, match="per tensor"):
        HistogramObserver(observers.PER_CHANNEL)
    with pytest.raises(ObserverError, match="empty"):
        Histogram(np.array([0.0, 1.0]), np.array([0.0]))
    with pytest.raises(ObserverError, match="decrease"):
        Histogram(np.array([1.0, 0.0]), np.array([3.0]))


def test_export_and_load_round_trip(tmp_path):
    observer = HistogramObserver(bins=128)
    data = heavy_data()
    observer.update(data[:5], (0, 0))
    observer.update(data[5:], (1, 0))
    observer.export(tmp_path, "layer")
    loaded = HistogramObserver.load(tmp_path, "layer", observers.PER_TENSOR)
    np.testing.assert_array_equal(loaded.edges, observer.histogram().edges)
    np.testing.assert_array_equal(loaded.counts, observer.histogram().counts)
    assert list(pd.read_csv(tmp_path / "layer_histogram.csv").columns) == ["left", "right", "count"]


def test_collector_gathers_moments_and_histograms_in_one_pass(tiny_model, tmp_path):
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), StatisticsCollector(tiny_model, observers=("moments", "histogram")) as collector:
        tiny_model(x[:4])
        tiny_model(x[4:])
    folder = collector.save(tmp_path / "s", {"arch": "tiny"})
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["observers"] == [{"name": "moments", "granularity": "tensor"},
                                 {"name": "histogram", "granularity": "tensor"}]
    stats = load_statistics(folder)
    obs = stats.observation("conv1_activation")
    with torch.no_grad():
        out = tiny_model.features[:4](x)
    assert obs.extra["histogram"].numel == out.numel()
    assert obs.extra["histogram"].max == pytest.approx(out.max().item())


def test_collector_hands_the_moments_extremes_to_the_histogram(tiny_model, monkeypatch):
    """The histogram takes each batch's range from the moments observer (not a second read of the output), in
    whatever order the observers are named, and that range is the output's exact minimum and maximum."""
    seen: list[tuple[float, float, float, float]] = []
    original = HistogramObserver._update

    def spy(self, x, extremes=None):
        assert extremes is not None, "the histogram was not given the moments' extremes"
        seen.append((float(extremes[0]), float(extremes[1]), float(x.min()), float(x.max())))
        return original(self, x, extremes)

    monkeypatch.setattr(HistogramObserver, "_update", spy)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for names in (("moments", "histogram"), ("histogram", "moments")):
        with torch.no_grad(), StatisticsCollector(tiny_model, observers=names):
            tiny_model(x)
    assert len(seen) >= 2
    assert all((a, b) == (c, d) for a, b, c, d in seen)


# -- percentiles and KL on hand-built histograms ----------------------------------------------------------------
def test_percentile_of_a_uniform_histogram():
    hist = uniform()
    assert percentile_range(hist, 90.0) == pytest.approx((0.05, 0.95))
    assert percentile_range(hist, 100.0) == (0.0, 1.0)
    assert percentile_upper(hist, 75.0) == pytest.approx(0.75)
    assert percentile_range(hist, 10.0) == pytest.approx((0.45, 0.55))


def test_percentile_method_grids():
    hist = uniform(100, -1.0, 3.0)
    obs = Observation(400, observers.TensorStats(-1.0, 3.0, 1.0, 1.0, 1.15, 400), (-1.0, 3.0),
                      extra={"histogram": hist})
    grid = get_method("p80").grid(obs, 4)
    assert (grid.offset, grid.offset + grid.delta) == pytest.approx((-0.6, 2.6))
    # one-sided: a quarter of the values are negative (zeros after the ReLU); p80 of clamp(x, 0, 3) is 2.2
    one = get_method("p80").grid(obs, 4, one_sided=True)
    assert (one.offset, one.delta) == pytest.approx((0.0, 2.2)) and one.one_sided
    capped = get_method("p99").grid(obs, 4, one_sided=True, cap=2.0)
    assert capped.delta == pytest.approx(2.0) and capped.method == "no"  # the 99 % quantile is at the cap


def test_kl_of_an_unclipped_uniform_histogram_is_zero_and_kld_keeps_it():
    hist = uniform(256)
    assert kl_divergence(hist, np.array([0]), np.array([256]), np.array([0.0]), np.array([1.0]), 4)[0] == 0.0
    found = kld_range(hist, 4)
    assert (found.lo, found.hi) == (0.0, 1.0)


def test_kld_clips_a_far_outlier():
    """A half-Gaussian bulk over the first 200 of 2000 bins and one value at the far end: at 2..6 bits the KL
    threshold leaves the outlier out and keeps most of the bulk (on the full range the bulk would share one or a
    few levels, whose flat Q misses its shape)."""
    counts = np.zeros(2000)
    counts[:200] = np.rint(1000 * np.exp(-((np.arange(200) / 70.0) ** 2))) + 1
    counts[-1] = 1
    hist = Histogram(np.arange(2001, dtype=float), counts)
    for bits in (2, 4, 6):
        found = kld_range(hist, bits)
        assert 120 <= found.hi <= 260 and found.lo == 0.0, bits
        assert 120 <= kld_upper(hist, bits).hi <= 260, bits
        full = kl_divergence(hist, np.array([0]), np.array([2000]), np.array([0.0]), np.array([2000.0]), bits)[0]
        assert found.score < full


# -- the MSE search against the brute-force optimum of the sample ------------------------------------------------
@pytest.mark.parametrize("dist", ["laplace", "gauss"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_mse_search_lands_at_the_measured_optimum_of_the_sample(dist, bits):
    rng = np.random.default_rng(bits)
    x = rng.laplace(0.3, 1.0, 100_000) if dist == "laplace" else rng.normal(0.3, 1.0, 100_000)
    hist = Histogram.of_tensor(torch.from_numpy(x).float())
    found = mse_range(hist, bits)
    x = x.astype(np.float32).astype(np.float64)

    def objective(v):  # the sample's own measured MSE, minimised numerically over both ends
        return sample_mse(x, v[0], v[1], bits)

    start = np.array([found.lo, found.hi])
    best = optimize.minimize(objective, start, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-12})
    brute = min(best.fun, min(sample_mse(x, 0.3 - a, 0.3 + a, bits) for a in np.linspace(0.5, 12.0, 400)))
    assert sample_mse(x, found.lo, found.hi, bits) <= brute * 1.02
    # the histogram's own estimate of that MSE is close to the sample's
    assert measured_mse(hist, found.lo, found.hi, bits)[0] == pytest.approx(sample_mse(x, found.lo, found.hi, bits),
                                                                            rel=0.05)


def test_mse_method_one_sided_honours_the_cap():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.laplace(1.0, 2.0, 50_000)).float()
    hist = Histogram.of_tensor(x)
    obs = Observation(x.numel(), observers.TensorStats(hist.min, hist.max, 1.0, 2.0, 2.8, x.numel()),
                      (hist.min, hist.max), extra={"histogram": hist})
    for name in ("mse", "kld", "p99.9", "mix-measured", "3std"):
        grid = get_method(name).grid(obs, 4, one_sided=True, cap=6.0)
        assert grid.one_sided and grid.offset == 0.0 and 0.0 < grid.delta <= 6.0, name
        two = get_method(name).grid(obs, 4)
        assert hist.min <= two.offset and two.offset + two.delta <= hist.max + 1e-9, name


def test_mix_measured_takes_the_grid_of_smallest_measured_mse():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.laplace(0.0, 1.0, 50_000)).float()
    hist = Histogram.of_tensor(x)
    stats = observers.TensorStats(hist.min, hist.max, float(x.mean()), float((x - x.mean()).abs().mean()),
                                  float(x.std()), x.numel())
    obs = Observation(x.numel(), stats, (hist.min, hist.max), extra={"histogram": hist})
    for bits in (2, 4, 8):
        measured = {}
        for name in ("no", "laplace", "gaus"):
            g = get_method(name).grid(obs, bits)
            measured[g.method] = measured_mse(hist, g.offset, g.offset + g.delta, bits)[0]
        chosen = get_method("mix-measured").grid(obs, bits)
        assert chosen.predicted_mse == pytest.approx(min(measured.values()))
        assert chosen.method == min(measured, key=measured.get)


def test_std_family():
    stats = observers.TensorStats(-1.0, 10.0, 0.5, 0.8, 1.0, 100)
    grid = get_method("3std").grid(Observation.of_moments(stats), 4)
    assert (grid.offset, grid.offset + grid.delta) == pytest.approx((-1.0, 3.5)) and grid.method == "3std"
    wide = get_method("20std").grid(Observation.of_moments(stats), 4)
    assert (wide.offset, wide.delta, wide.method) == (-1.0, 11.0, "no")
    assert get_method("2.5std").stds == 2.5 and required_observers(["2std"]) == ("moments",)


def test_families_in_the_registry():
    names = method_names()
    assert names[:5] == ("no", "laplace", "gaus", "mix", "minmax")
    assert {"kld", "mse", "mix-measured", "p99.99", "2std"} <= set(names)
    assert get_method("p99.9").percent == 99.9 and get_method("p100").percent == 100.0
    assert required_observers(["kld", "p99"]) == ("moments", "histogram")
    for bad, message in [("p0", r"\(0, 100\]"), ("p100.5", r"\(0, 100\]"), ("0std", "> 0"), ("0.0std", "> 0"),
                         ("median", "expected one of no, laplace")]:
        with pytest.raises(ValueError, match=message):
            get_method(bad)


# -- the driver ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def collected(data_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("calibrators")
    assert run_cli(data_dir, out, "-sm", "collect", "-cs", "4") == 0
    return out


@pytest.mark.parametrize(("flags", "message"), [
    (["-th", "p0"], "the percentile must be in (0, 100]"),
    (["-th", "p101"], "the percentile must be in (0, 100]"),
    (["-th", "0std"], "must be > 0"),
    (["-th", "entropy"], "expected one of no, laplace, gaus, mix, minmax, laplace-grid, gaus-grid, slab, mse, kld, "
                         "mix-measured, pP"),
])
def test_bad_method_names_exit_2_with_one_line(data_dir, tmp_path, flags, message, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as exc:
        inference_sim.main(["--data", str(data_dir), "-sf", str(tmp_path / "s"), "--qtype", "int4", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "s").exists()


def test_collect_lists_its_observers(collected):
    meta = json.loads((collected / "stats" / "meta.json").read_text())
    assert [o["name"] for o in meta["observers"]] == ["moments", "histogram", "positive"]
    assert (collected / "stats" / "conv0_activation_histogram.csv").is_file()


@pytest.mark.parametrize("threshold", ["kld", "mse", "p99.9", "3std", "mix-measured"])
def test_use_every_new_method(data_dir, collected, threshold):  # noqa: F811
    assert run_cli(data_dir, collected, "-sm", "use", "--qtype", "int4", "-th", threshold) == 0
    row = last_result(collected)
    assert (row["threshold"], row["qtype"], row["eval_images"]) == (threshold, "int4", 4)
    plan = pd.read_csv(row["file"], index_col="name", keep_default_na=False)
    regular = set(plan.loc[plan["role"] == "", "method"])
    allowed = {"no", "laplace", "gaus"} if threshold == "mix-measured" else {threshold, "no"}
    assert regular <= allowed and regular


def test_live_statistics_search_each_tensor(data_dir, tmp_path):  # noqa: F811
    assert run_cli(data_dir, tmp_path, "-sm", "no", "--qtype", "int4", "-th", "kld") == 0


def test_moments_only_folder_refuses_histogram_methods(data_dir, collected, tmp_path, capsys):  # noqa: F811
    """An older folder (moments only) still serves laplace; kld is refused naming what to collect, nothing lost."""
    folder = tmp_path / "stats"
    folder.mkdir()
    for path in (collected / "stats").iterdir():
        if not path.name.endswith("_histogram.csv"):
            (folder / path.name).write_bytes(path.read_bytes())
    meta = json.loads((folder / "meta.json").read_text())
    meta["observers"] = [o for o in meta["observers"] if o["name"] != "histogram"]
    meta["files"] = {name: record for name, record in meta["files"].items() if not name.endswith("_histogram.csv")}
    (folder / "meta.json").write_text(json.dumps(meta))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert run_cli(data_dir, tmp_path, "-sm", "use", "--qtype", "int4", "-th", "laplace") == 0
    capsys.readouterr()
    assert run_cli(data_dir, tmp_path, "-sm", "use", "--qtype", "int4", "-th", "kld") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the histogram observer" in err[0] and "-sm collect" in err[0]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    with pytest.raises(StatisticsError, match="histogram"):
        load_statistics(folder).require(["histogram"], "kld")


def test_kld_one_sided_treats_the_relu_zeros_as_exact():
    """Half the values at exactly 0 (a ReLU's), the rest uniform on (0, 1]: on the grid [0, 1] the zeros are
    quantized exactly and the uniform part is flat in every level, so KL is 0 and nothing is clipped."""
    hist = Histogram(np.linspace(-1.0, 1.0, 513), np.full(512, 10.0)).clamped(0.0, 1.0)
    assert hist.edges[0] == hist.edges[1] == 0.0 and hist.counts[0] == pytest.approx(2560.0)
    for bits in (2, 4):
        found = kld_upper(hist, bits)
        assert found.hi == 1.0 and found.score == pytest.approx(0.0, abs=1e-12), bits
