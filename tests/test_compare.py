"""``--compare``: one calibration pass for every method, a table / CSV / bokeh page, and ``-ct`` per method."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from test_cli import ARCH, assert_binomial_errors, data_dir  # noqa: F401  (the synthetic wnid folder fixture)

import inference_sim
from pytorch_quantizer import ClippingMethod, compare, register, run
from pytorch_quantizer.clipping import ClipDecision
from pytorch_quantizer.compare import CT_COLUMNS, SECONDS_COLUMNS, TABLE_COLUMNS, observers_for
from pytorch_quantizer.config import RunConfig
from pytorch_quantizer.figures import SELECTION_DPI, layer_selection_figure, png_bytes
from pytorch_quantizer.methods import unregister
from pytorch_quantizer.observers import OBSERVERS, PER_TENSOR, Observer, register_observer
from pytorch_quantizer.quant_config import ActivationConfig


@register_observer
class CountObserver(Observer):
    """A toy observer: how many values the layer produced (stands in for histograms and other new observers)."""

    name = "toy_count"

    def __init__(self, granularity=PER_TENSOR) -> None:
        super().__init__(PER_TENSOR)
        self.count = 0

    def update(self, x, key) -> None:
        self.count += x.numel()

    def export(self, folder: Path, layer: str) -> None:
        (folder / f"{layer}_toy_count.json").write_text(json.dumps(self.count))

    @classmethod
    def load(cls, folder: Path, layer: str, granularity) -> int:
        return json.loads((folder / f"{layer}_toy_count.json").read_text())


class QuarterRange(ClippingMethod):
    """A toy method that needs the toy observer: clip at a quarter of the observed range."""

    name = "toy_quarter_count"
    requires = ("moments", "toy_count")

    def clip(self, obs, bits):
        assert obs.extra["toy_count"] > 0
        alpha = obs.moments.range / 4.0
        return ClipDecision(self.name, alpha, alpha**2 / (3.0 * 4.0**bits))


@pytest.fixture
def toy_method():
    register(QuarterRange)
    yield QuarterRange.name
    unregister(QuarterRange.name)


@pytest.fixture(autouse=True, scope="module")
def _forget_toy_observer():
    yield
    OBSERVERS.pop(CountObserver.name, None)


@pytest.fixture
def collects(monkeypatch) -> list[tuple[str, ...]]:
    """The observers of every calibration pass the run makes (a plain collect in ``run``, --compare's in
    ``compare``; both call ``passes.collect``)."""
    calls: list[tuple[str, ...]] = []
    original = run.collect

    def counted(session, observers=None, folder=None, **kwargs):
        calls.append(tuple(observers) if observers is not None else session.cfg.observers)
        return original(session, observers, folder, **kwargs)

    monkeypatch.setattr(run, "collect", counted)
    monkeypatch.setattr(compare, "collect_pass", counted)
    return calls


def run_cli(data: Path, out: Path, *flags: str, arch: tuple[str, ...] = tuple(ARCH)) -> int:
    argv = ["--data", str(data), *arch, "-b", "4", "-j", "0", "-sf", str(out / "stats"),
            "--results", str(out / "results.csv"), *flags]
    try:
        return inference_sim.main(argv)
    except SystemExit as exit_:  # argparse's one-line errors
        return int(exit_.code)


def compare_csv(out: Path) -> Path:
    (path,) = (out / "compare").glob("*.csv")
    return path


def test_compare_calibrates_once_and_writes_table_csv_chart(data_dir, tmp_path, collects, toy_method, capsys):  # noqa: F811
    methods = ["no", "laplace", "gaus", "mix", toy_method]
    flags = ("--compare", ",".join(methods), "--qtype", "int4,int8", "-sm", "collect", "-cs", "4")
    assert run_cli(data_dir, tmp_path, *flags) == 0
    assert collects == [("moments", "toy_count")]  # one pass, with every observer the methods need
    meta = json.loads((tmp_path / "stats" / "meta.json").read_text())
    assert [o["name"] for o in meta["observers"]] == ["moments", "toy_count"]
    table = pd.read_csv(compare_csv(tmp_path), keep_default_na=False)
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert_binomial_errors(table)
    assert list(table["method"]) == ["fp32"] + [m for m in methods for _ in (4, 8)]
    assert list(table["bits"]) == ["fp32"] + ["int4", "int8"] * len(methods)
    assert (table["images"] == 4).all()  # the 4 calibration images are held out
    assert table["cal_seconds"][0] == "" and (table["cal_seconds"][1:].astype(float) >= 0).all()
    printed = capsys.readouterr().out
    assert "cal_seconds" in printed and toy_method in printed
    results = pd.read_csv(tmp_path / "results.csv", keep_default_na=False)
    assert list(results["pass"]).count("collect") == 1
    quantized = results[results["pass"].str.startswith("compare")]
    assert list(zip(quantized["threshold"], quantized["qtype"], strict=True)) == [
        (m, f"int{b}") for m in methods for b in (4, 8)]
    assert (results["compare"].iloc[-1], results["compare_bits"].iloc[-1]) == (" ".join(methods), "4 8")
    assert set(quantized["top1"]) == set(table["top1"][1:])
    assert set(quantized["top5_se"]) == set(table["top5_se"][1:])
    page = compare_csv(tmp_path).with_suffix(".html").read_text()
    assert "Bokeh" in page and toy_method in page and "calibration cost" in page
    # -cs from --data: the subtitle says the evaluated images are held out of the calibration images of that folder
    assert f"4 evaluation images held out of the 4 calibration images of {(data_dir / 'val').resolve()} (drawn " \
           "with seed 0)" in page

    # the same command again: the same table but for the timings, and the statistics are replaced, not stacked
    first = table.drop(columns=list(SECONDS_COLUMNS))
    assert run_cli(data_dir, tmp_path, *flags) == 0
    again = pd.read_csv(compare_csv(tmp_path), keep_default_na=False).drop(columns=list(SECONDS_COLUMNS))
    pd.testing.assert_frame_equal(first, again)
    assert len(collects) == 2


def test_compare_page_names_a_calibration_folder_of_its_own(data_dir, tmp_path):  # noqa: F811
    """--cal-data: the subtitle names both folders, the calibration draw and its seed (no "held out")."""
    train = tmp_path / "train"
    shutil.copytree(data_dir / "val", train)
    flags = ("--compare", "no", "--qtype", "int8", "--cal-data", str(train), "-cs", "3", "--subset", "4", "--seed", "2")
    assert run_cli(data_dir, tmp_path, *flags) == 0
    page = compare_csv(tmp_path).with_suffix(".html").read_text()
    assert (f"4 evaluation images drawn with seed 2 from {(data_dir / 'val').resolve()}; 3 calibration images drawn "
            f"with seed 2 from {train.resolve()}") in page
    assert "held out" not in page


def test_compare_uses_a_folder_without_collecting(data_dir, tmp_path, collects):  # noqa: F811
    assert run_cli(data_dir, tmp_path, "-sm", "collect", "-cs", "4") == 0
    assert run_cli(data_dir, tmp_path, "--compare", "laplace,no", "--qtype", "int6", "-sm", "use") == 0
    assert len(collects) == 1  # the plain collect; --compare only loaded the folder
    table = pd.read_csv(compare_csv(tmp_path), keep_default_na=False)
    assert list(table["method"]) == ["fp32", "laplace", "no"] and (table["images"] == 4).all()


def test_compare_without_statistics_mode_keeps_nothing(data_dir, tmp_path, collects):  # noqa: F811
    """-sm no: one pass into a temporary folder; no statistics folder is written or overwritten."""
    assert run_cli(data_dir, tmp_path, "--compare", "gaus", "--qtype", "int4", "-cs", "4") == 0
    assert len(collects) == 1 and not (tmp_path / "stats").exists()
    assert len(pd.read_csv(compare_csv(tmp_path))) == 2


@pytest.mark.parametrize(("flags", "message"), [
    (("--compare", "laplace,kld2", "--qtype", "int4"), "unknown clipping method 'kld2': expected one of no, laplace"),
    (("--qtype", "int4,int8"), ("--qtype", "--compare", "several activation widths are for a comparison of methods")),
    (("--compare", "laplace", "--qtype", "int4", "-ep"), ("--compare", "-ep", "not with the precision sweep")),
    (("--compare", "laplace", "--qtype", "int4,int8", "-ct"),
     ("--compare", "-ct", "--qtype", "at one activation width")),
    (("--compare", "laplace"), ("--compare", "--qtype", "give --qtype, one width or several")),
    (("--compare", "laplace", "--qtype", "int4"), "give -cs N"),
    (("--compare", "toy_quarter_count", "--qtype", "int4", "-sm", "use"), "needs the toy_count observer"),
])
def test_compare_bad_input_is_one_line_exit_2(data_dir, tmp_path, toy_method, capsys, flags, message):  # noqa: F811
    if "use" in flags:
        assert run_cli(data_dir, tmp_path, "-sm", "collect", "-cs", "4") == 0  # moments only
        before = {p.name: p.read_bytes() for p in (tmp_path / "stats").iterdir()}
    capsys.readouterr()
    assert run_cli(data_dir, tmp_path, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for part in (message,) if isinstance(message, str) else message:
        assert part in err, (part, err)
    if "use" in flags:
        assert {p.name: p.read_bytes() for p in (tmp_path / "stats").iterdir()} == before
    assert not (tmp_path / "compare").exists()


def test_custom_test_for_several_methods_writes_csv_and_png(data_dir, tmp_path):  # noqa: F811
    alexnet = ("-a", "alexnet", "--weights", "none")
    flags = ("-ct", "--compare", "laplace,no", "--qtype", "int4", "-sm", "collect", "-cs", "4", "--subset", "2")
    assert run_cli(data_dir, tmp_path, *flags, arch=alexnet) == 0
    (csv,) = (tmp_path / "custom_test").glob("alexnet_int4_compare_*.csv")
    table = pd.read_csv(csv, keep_default_na=False)
    assert list(table.columns) == list(CT_COLUMNS)
    assert_binomial_errors(table, images=2)
    regular = 6  # alexnet: 8 layers, less the first conv and the classifier
    assert list(table["method"]) == ["fp32"] + ["laplace"] * (regular + 1) + ["no"] * (regular + 1)
    sweep = table[table["method"] == "no"]
    assert list(sweep["k"]) == list(range(regular + 1))
    assert list(sweep["layers_at_bits"]) == list(range(regular, -1, -1))
    png = csv.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG")
    again = tmp_path / "again.png"  # the same table draws the same bytes (no date or software in the PNG)
    cfg = RunConfig(arch="alexnet", weights="none", act=ActivationConfig(bits=4), device="cpu")  # the run's W8
    figure = layer_selection_figure(table, cfg)
    again.write_bytes(png_bytes(figure, SELECTION_DPI))
    assert again.read_bytes() == png
    assert len(figure.axes[0].containers) == 2  # one set of error bars per method
    html = csv.with_suffix(".html").read_text()
    assert "layer_selection_top1" in html and "layer_selection_top5" in html


def test_observers_for_adds_moments_once(toy_method):
    assert observers_for(["no", "laplace"]) == ("moments",)
    assert observers_for([toy_method, "mix"]) == ("moments", "toy_count")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (a development check)")
def test_compare_page_renders_in_headless_chromium(data_dir, tmp_path):  # noqa: F811
    assert run_cli(data_dir, tmp_path, "--compare", "no,laplace", "--qtype", "int4,int8", "-cs", "4") == 0
    html = compare_csv(tmp_path).with_suffix(".html")
    shot = tmp_path / "page.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,900",
                        html.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
