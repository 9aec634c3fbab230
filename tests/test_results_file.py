"""Results rows survive concurrent runs, and a results path that cannot take a row is refused before any pass."""

import multiprocessing as mp
import os
from pathlib import Path

import pandas as pd
import pytest

from pytorch_quantizer.results import (
    PASS_COLUMNS,
    Accuracy,
    Recorder,
    ResultsFileError,
    append_result,
    binomial_se,
    check_results_file,
    error_line,
    final_line,
)

ROW = {"arch": "tiny", "weights": "none", "pass": "fp32", "top1": 50.0, "note": 'a "quoted", cell'}


def _append_many(path: str, worker: int, rows: int) -> None:
    for i in range(rows):
        append_result(Path(path), {**ROW, "pass": f"w{worker}-{i}"})


def test_concurrent_appends_keep_every_row(tmp_path):
    path = tmp_path / "results.csv"
    ctx = mp.get_context("fork")
    workers = [ctx.Process(target=_append_many, args=(str(path), w, 25)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
        assert w.exitcode == 0
    frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    assert sorted(frame["pass"]) == sorted(f"w{w}-{i}" for w in range(4) for i in range(25))
    assert set(frame["note"]) == {ROW["note"]}
    assert path.read_text().count("\n") == 101  # one header, one line a row


def test_a_new_column_rewrites_the_older_rows_once(tmp_path):
    path = tmp_path / "results.csv"
    append_result(path, ROW)
    append_result(path, {**ROW, "pass": "int4", "agreement": 91.5})
    append_result(path, {k: v for k, v in ROW.items() if k != "note"})  # a column the row lacks: empty cell
    frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    assert list(frame.columns) == [*ROW, "agreement"]
    assert list(frame["agreement"]) == ["", "91.5", ""]
    assert list(frame["note"]) == [ROW["note"], ROW["note"], ""]


def test_an_empty_file_takes_a_header(tmp_path):
    path = tmp_path / "results.csv"
    path.touch()
    check_results_file(path)
    append_result(path, ROW)
    assert list(pd.read_csv(path).columns) == list(ROW)


@pytest.mark.parametrize("kind", ["directory", "foreign", "binary", "parent_is_file"])
def test_paths_that_cannot_take_a_row_are_refused_by_name(tmp_path, kind):
    path = tmp_path / "results.csv"
    if kind == "directory":
        path.mkdir()
    elif kind == "foreign":
        path.write_text("name,score\nx,1\n")
    elif kind == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    else:
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "results.csv"
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(ResultsFileError, match=str(path)):
        check_results_file(path)
    if before is not None:
        assert path.read_bytes() == before


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_device_is_refused():
    with pytest.raises(ResultsFileError, match="not a regular file"):
        check_results_file(Path("/dev/full"))


@pytest.mark.parametrize("flag", ["-sf", "-dd", "--results"])
def test_output_folders_under_a_file_are_refused_before_any_pass(tmp_path, flag):
    from pytorch_quantizer.config import DataConfig, RunConfig
    from pytorch_quantizer.quant_config import ActivationConfig
    from pytorch_quantizer.run import check_output_folders

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    kwargs = {"-sf": {"stats_mode": "collect", "stats_folder": blocker / "stats"},
              "-dd": {"dump_dir": blocker / "dumps"},
              "--results": {"eval_precision": True, "results": blocker / "results.csv"}}[flag]
    cfg = RunConfig(arch="resnet18", weights="none", data=DataConfig(root=tmp_path), device="cpu",
                    act=ActivationConfig(bits=None), **kwargs)
    with pytest.raises(ValueError, match=f"{flag}: cannot write into .*a_file is a file"):
        check_output_folders(cfg)


def test_a_collect_whose_results_row_fails_keeps_the_earlier_statistics(tmp_path, monkeypatch, capsys):
    """The statistics swap is a collect's last step: when the results row cannot be written, the run exits 2 and
    the earlier folder is untouched, with no staging folder left."""
    import hashlib

    import numpy as np
    from PIL import Image

    import inference_sim
    from pytorch_quantizer import results

    rng = np.random.default_rng(0)
    for i in range(4):
        folder = tmp_path / "data" / "val" / ("n01440764", "n01443537")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")
    argv = ["-a", "mobilenet_v3_small", "--weights", "none", "-b", "2", "-j", "0", "--device", "cpu",
            "--data", str(tmp_path / "data"), "-sm", "collect", "-cs", "2", "-sf", str(tmp_path / "stats"),
            "--results", str(tmp_path / "r.csv")]
    assert inference_sim.main(argv) == 0

    def digests() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "stats").iterdir()}

    before, rows = digests(), (tmp_path / "r.csv").read_text()

    def refuse(path, row):
        raise OSError(f"{path}: the disk is full")

    monkeypatch.setattr(results, "append_result", refuse)
    capsys.readouterr()
    assert inference_sim.main([*argv, "-cs", "3"]) == 2  # another calibration: other statistics were staged
    assert capsys.readouterr().err.strip().endswith("r.csv: the disk is full")
    assert digests() == before and (tmp_path / "r.csv").read_text() == rows
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".stats.")]


@pytest.mark.parametrize(("hits", "images", "points"), [
    (320, 400, 2.0),  # p = 0.8: 100 sqrt(0.16 / 400)
    (1139, 2278, 100 * 0.5 / 2278**0.5),  # p = 0.5, the largest error at n: 1.05 points
    (240, 300, 100 * (0.8 * 0.2 / 300) ** 0.5),  # the 300-image tables: 2.31 points
    (0, 50, 0.0), (50, 50, 0.0), (0, 0, 0.0),  # no spread at 0 % or 100 %, and no images
])
def test_binomial_standard_error_of_known_counts(hits, images, points):
    assert binomial_se(hits, images) == pytest.approx(points, rel=1e-12)


def test_the_error_line_stands_under_the_unchanged_seed_line():
    acc = Accuracy(images=2277, top1=1822, top5=2163)  # 80.0 % and 95.0 %
    assert final_line(acc) == " * Prec@1 80.018 Prec@5 94.993"
    assert error_line(acc) == " * binomial standard error: Prec@1 ±0.84 Prec@5 ±0.46 (2277 images)"
    assert error_line(acc, "ONNX Runtime ").startswith(" * ONNX Runtime binomial standard error: Prec@1 ±0.84 ")


def _recorder(tmp_path: Path) -> Recorder:
    from pytorch_quantizer.config import DataConfig, RunConfig

    cfg = RunConfig(arch="resnet18", weights="none", data=DataConfig(root=tmp_path), device="cpu",
                    results=tmp_path / "results.csv")
    return Recorder(cfg, lambda: {"eval_images": 400}, settings="0123abcd", write=True)


def test_rows_carry_both_errors_and_an_older_file_takes_the_new_column(tmp_path):
    """A results file of the release before ``top5_se`` is rewritten once with the column, empty in its rows."""
    from types import SimpleNamespace

    older = [c for c in PASS_COLUMNS if c != "top5_se"]
    path = tmp_path / "results.csv"
    path.write_text(",".join(older) + "\n" + ",".join("x" for _ in older) + "\n")
    measured = SimpleNamespace(acc=Accuracy(images=400, top1=320, top5=380), seconds=1.0, agreement=None)
    row = _recorder(tmp_path).record(measured, "fp32", None, None)
    assert (row["top1"], row["top1_se"], row["top5"], row["top5_se"]) == (80.0, 2.0, 95.0, 1.09)
    frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    assert list(frame["top1_se"]) == ["x", "2.0"] and list(frame["top5_se"]) == ["", "1.09"]
    assert set(PASS_COLUMNS) <= set(frame.columns)
