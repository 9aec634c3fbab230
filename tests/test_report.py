"""The bokeh HTML report on a small synthetic statistics folder (and, when chromium is present, its rendering)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pytorch_quantizer.clipping import optimal_alpha
from pytorch_quantizer.report import build_report, layer_table, main
from pytorch_quantizer.stats import load_statistics

LAYERS = {
    "conv0_activation": ("conv", lambda rng: rng.laplace(0.0, 0.5, (6, 4, 12, 12))),
    "conv1_activation": ("conv", lambda rng: rng.normal(0.2, 1.5, (6, 8, 6, 6))),
    "linear0_activation": ("linear", lambda rng: rng.standard_t(4, (6, 50))),
}
COLUMNS = ["min", "max", "mean", "std", "kurtosis", "mean_abs", "b"]


def _per_sample(x: np.ndarray) -> pd.DataFrame:
    flat = x.reshape(x.shape[0], -1)
    mean = flat.mean(axis=1, keepdims=True)
    centred = flat - mean
    var = (centred**2).mean(axis=1)
    return pd.DataFrame({
        "min": flat.min(axis=1), "max": flat.max(axis=1), "mean": mean[:, 0], "std": np.sqrt(var),
        "kurtosis": (centred**4).mean(axis=1) / var**2, "mean_abs": np.abs(flat).mean(axis=1),
        "b": np.abs(centred).mean(axis=1),
    })[COLUMNS]


@pytest.fixture
def stats_and_dumps(tmp_path: Path) -> tuple[Path, Path]:
    """A statistics folder written to the documented layout (meta.json, <name>.csv, <name>_summary.csv)."""
    rng = np.random.default_rng(0)
    stats, dumps = tmp_path / "stats", tmp_path / "dumps"
    stats.mkdir()
    dumps.mkdir()
    layers = []
    for name, (kind, draw) in LAYERS.items():
        x = draw(rng).astype(np.float32)
        np.savez(dumps / f"{name}.npz", fp32=x, quantized=np.round(x))
        samples = _per_sample(x.astype(np.float64))
        samples.to_csv(stats / f"{name}.csv", index=False)
        summary = samples.assign(range=samples["max"] - samples["min"]).agg(["min", "mean", "max"])
        summary.index.name = "reduce"
        summary.to_csv(stats / f"{name}_summary.csv")
        layers.append({"name": name, "module": f"m.{name}", "kind": kind, "numel": int(x[0].size)})
    meta = {"format": 1, "arch": "tinynet", "weights": "random", "fingerprint": "abc123", "bn_folded": False,
            "images": 6, "seed": 0, "version": "0.1.0", "layers": layers}
    (stats / "meta.json").write_text(json.dumps(meta))
    return stats, dumps


def _plot_names(page: str) -> set[str]:
    return set(re.findall(r'\\?"name\\?":\\?"((?:mse|alpha|kurtosis|layers|hist_\w+))\\?"', page))


def test_layer_table_uses_choose_clipping(stats_and_dumps):
    stats, _ = stats_and_dumps
    table = layer_table(load_statistics(stats), bits=4).set_index("layer")
    assert list(table.index) == list(LAYERS)
    row = table.loc["conv0_activation"]
    assert row["alpha_laplace"] == pytest.approx(optimal_alpha("laplace", 4) * row["b"])
    assert row["alpha_no"] == 0.0
    assert row["mse_mix"] == pytest.approx(min(row["mse_laplace"], row["mse_gaus"]))
    assert row["mix_choice"] in ("laplace", "gaus")
    assert table.loc["conv0_activation", "kurtosis"] > 4.5  # Laplace-like, and the report shows it


def test_report_has_all_plots_and_histograms(stats_and_dumps, tmp_path):
    stats, dumps = stats_and_dumps
    out = build_report(stats, tmp_path / "r" / "report.html", dumps=dumps, bits=4)
    page = out.read_text(encoding="utf-8")
    assert "cdn.bokeh.org" not in page and "Bokeh" in page  # INLINE resources: works offline
    names = _plot_names(page)
    assert {"mse", "alpha", "kurtosis", "layers"} <= names
    assert {f"hist_{name}" for name in LAYERS} <= names
    assert "tinynet" in page and "abc123" in page


def test_report_without_dumps_and_cli(stats_and_dumps, tmp_path, capsys):
    stats, _ = stats_and_dumps
    out = tmp_path / "plain.html"
    assert main([str(stats), "-o", str(out), "--bits", "3"]) == 0
    names = _plot_names(out.read_text(encoding="utf-8"))
    assert {"mse", "alpha", "kurtosis", "layers"} <= names
    assert not any(n.startswith("hist_") for n in names)
    assert main([str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "no statistics" in capsys.readouterr().err


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(stats_and_dumps, tmp_path):
    from PIL import Image

    stats, dumps = stats_and_dumps
    out = build_report(stats, tmp_path / "report.html", dumps=dumps)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1400,2400", out.as_uri()],
        capture_output=True, timeout=120, check=False,
    )
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # The canvases drew: the Laplace (#d62728) and Gaussian (#1f77b4) lines are on the page.
    for colour in ((0xD6, 0x27, 0x28), (0x1F, 0x77, 0xB4)):
        close = (np.abs(pixels - np.array(colour)).sum(axis=2) < 30).sum()
        assert close > 200, f"too few pixels of colour {colour}: the plots did not render"


PLUS_MINUS = r"(?:±|\\u00b1)"  # as it stands in the page's JSON


def _compare_table() -> pd.DataFrame:
    from pytorch_quantizer.compare import TABLE_COLUMNS

    rows = [("fp32", "fp32", 80.0, 95.0, 2.0, 1.09, float("nan")), ("laplace", "int4", 60.0, 85.0, 2.449, 1.785, 1e-3),
            ("laplace", "int8", 79.0, 94.5, 2.037, 1.14, 1e-3)]
    return pd.DataFrame([{"method": m, "bits": b, "top1": t1, "top5": t5, "top1_se": s1, "top5_se": s5, "images": 400,
                          "cal_seconds": c, "eval_seconds": 1.0} for m, b, t1, t5, s1, s5, c in rows],
                        columns=list(TABLE_COLUMNS))


def test_compare_page_draws_error_bars_and_says_where_the_images_came_from():
    from pytorch_quantizer.config import RunConfig
    from pytorch_quantizer.report import compare_page

    sources = "400 evaluation images from /data/val; 500 calibration images drawn with seed 0 from /train"
    page = compare_page(_compare_table(), 2.5, RunConfig(arch="tinynet", weights="none"), sources)
    for metric in ("top1", "top5"):
        assert re.search(rf'\\?"name\\?":\\?"accuracy_{metric}_error\\?"', page), metric  # the Whisker
        assert re.search(rf"@{metric} {PLUS_MINUS} @{metric}_se", page), metric  # the tooltip
    assert sources in page and "one binomial standard error" in page
    assert "top5_se" in page and "1.785" in page  # the table under the subtitle has the columns


def test_layer_selection_page_draws_error_bars(tmp_path):
    from pytorch_quantizer.compare import CT_COLUMNS
    from pytorch_quantizer.config import RunConfig
    from pytorch_quantizer.quant_config import ActivationConfig
    from pytorch_quantizer.report import layer_selection_page

    table = pd.DataFrame([("fp32", -1, 0, "", 80.0, 95.0, 2.0, 1.09), ("no", 0, 2, "", 50.0, 70.0, 2.5, 2.29),
                          ("no", 1, 1, "conv1", 70.0, 90.0, 2.29, 1.5)], columns=list(CT_COLUMNS))
    cfg = RunConfig(arch="tinynet", weights="none", act=ActivationConfig(bits=4))
    page = layer_selection_page(table, cfg, "4 evaluation images held out of the 4 calibration images of /d/val")
    assert re.search(r'\\?"name\\?":\\?"layer_selection_top1_error\\?"', page)
    assert re.search(rf"@top1 {PLUS_MINUS} @top1_se", page)
    assert "held out of the 4 calibration images of /d/val" in page

