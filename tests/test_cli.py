"""inference_sim.py end to end on a synthetic wnid-named ImageFolder and a small torchvision model."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import inference_sim

ROOT = Path(__file__).resolve().parents[1]
WNIDS = ["n01440764", "n01443537", "n02085620", "n04599235"]
ARCH = ["-a", "mobilenet_v3_small", "--weights", "none"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for wnid in WNIDS:
        (root / "val" / wnid).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "val" / wnid / f"{wnid}_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def stats_dir(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert run_cli(data_dir, out, "-sm", "collect", "-cs", "4") == 0  # the other 4 images are for evaluation
    return out


def run_cli(data_dir: Path, out: Path, *flags: str) -> int:
    """Run the driver in-process and return its exit code (argparse's refusals leave through SystemExit); a later
    -a/--weights in ``flags`` overrides the default small model."""
    argv = ["--data", str(data_dir), *ARCH, "-b", "4", "-j", "0", "-sf", str(out / "stats"),
            "--results", str(out / "results.csv"), *flags]
    try:
        return inference_sim.main(argv)
    except SystemExit as exit_:
        return int(exit_.code)


def last_result(out: Path) -> pd.Series:
    return pd.read_csv(out / "results.csv", keep_default_na=False).iloc[-1]


def assert_binomial_errors(table: pd.DataFrame, images: int | None = None) -> None:
    """Every row's ``top1_se`` and ``top5_se`` are the binomial standard errors of its accuracies on its images
    (the ``images`` column, or ``images`` for a table without one)."""
    from pytorch_quantizer.results import binomial_se

    images = table["images"] if images is None else pd.Series([images] * len(table))
    for metric in ("top1", "top5"):
        hits = (table[metric].astype(float) * images / 100).round().astype(int)
        expected = [round(binomial_se(h, n), 3) for h, n in zip(hits, images, strict=True)]
        assert table[f"{metric}_se"].astype(float).tolist() == pytest.approx(expected, abs=1e-3), metric


def test_collect_writes_statistics_and_prints_seed_line(data_dir, tmp_path, capsys):
    assert run_cli(data_dir, tmp_path, "-sm", "collect") == 0
    *_, line, error, note = capsys.readouterr().out.rstrip().splitlines()
    assert re.fullmatch(r" \* Prec@1 \d+\.\d{3} Prec@5 \d+\.\d{3}", line)  # the seed's line, exactly
    assert "not an evaluation" in note  # these are the calibration images, in float
    row = last_result(tmp_path)
    assert error == (f" * binomial standard error: Prec@1 ±{row['top1_se']:.2f} Prec@5 ±{row['top5_se']:.2f} "
                     "(8 images)")
    stats = tmp_path / "stats"
    assert (stats / "meta.json").is_file() and (stats / "conv0_activation_summary.csv").is_file()
    assert row["stats_mode"] == "collect" and row["images"] == 8 and row["qtype"] == "fp32"


@pytest.mark.parametrize("threshold", ["no", "laplace", "gaus", "mix", "laplace-grid", "gaus-grid"])
def test_use_every_threshold(data_dir, stats_dir, threshold, capsys):
    assert run_cli(data_dir, stats_dir, "-sm", "use", "--qtype", "int4", "-th", threshold) == 0
    out = capsys.readouterr().out
    assert " * Prec@1 " in out
    row = last_result(stats_dir)
    assert (row["qtype"], row["threshold"], row["stats_mode"], row["images"]) == ("int4", threshold, "use", 4)
    assert (row["cal_images"], row["eval_images"]) == (4, 4)
    plan = pd.read_csv(row["file"], index_col="name")
    assert Path(row["file"]).name == f"mobilenet_v3_small_int4_{threshold}_{row['settings']}.csv"
    assert set(plan["bits"].dropna()) <= {4, 8}


def test_no_qtype_is_fp32_as_in_the_seed(data_dir, tmp_path):
    """No --qtype quantizes nothing and needs no statistics (none exist here), like --qtype fp32 and -ep's FP32."""
    assert run_cli(data_dir, tmp_path, "-sm", "use") == 0
    assert run_cli(data_dir, tmp_path, "--qtype", "fp32") == 0
    assert run_cli(data_dir, tmp_path, "-sm", "no", "-th", "laplace", "-ep") == 0
    rows = pd.read_csv(tmp_path / "results.csv", keep_default_na=False)
    fp32 = rows[rows["qtype"] == "fp32"]
    assert len(fp32) == 3 and (fp32["qweight"] == "fp32").all()
    assert fp32["top1"].nunique() == 1 and fp32["top5"].nunique() == 1
    assert not (tmp_path / "stats").exists()


def test_weights_alone(data_dir, tmp_path):
    """--qtype fp32 with an explicit -qw quantizes the weights and leaves every activation in float."""
    assert run_cli(data_dir, tmp_path, "--qtype", "fp32", "-qw", "int2") == 0
    row = last_result(tmp_path)
    assert (row["qtype"], row["qweight"]) == ("fp32", "int2")


def test_compiled_use_mode(data_dir, tmp_path, capsys):
    """Runs end to end under torch.compile (the bits of the compiled quantization: tests/test_compiled.py).

    alexnet: the torchvision classifier with the fewest layers, so the fewest kernels for Inductor to build; building
    them is most of a cold-cache compile (here 84 s of CPU time for mobilenet_v3_small, 20 s for alexnet)."""
    alexnet = ["-a", "alexnet", "--weights", "none"]
    assert run_cli(data_dir, tmp_path, *alexnet, "-sm", "collect", "-cs", "4") == 0
    assert run_cli(data_dir, tmp_path, *alexnet, "-sm", "use", "--qtype", "int4", "-th", "laplace", "--compile") == 0
    assert " * Prec@1 " in capsys.readouterr().out
    row = last_result(tmp_path)
    assert (row["arch"], row["qtype"], row["images"], row["compile"]) == ("alexnet", "int4", 4, True)


def test_same_command_twice_gives_same_numbers(data_dir, tmp_path):
    for _ in range(2):
        assert run_cli(data_dir, tmp_path, "-sm", "collect", "--seed", "3", "-cs", "5") == 0
    first = {p.name: p.read_bytes() for p in (tmp_path / "stats").iterdir()}
    assert run_cli(data_dir, tmp_path, "-sm", "collect", "--seed", "3", "-cs", "5") == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "stats").iterdir()} == first
    for _ in range(2):
        assert run_cli(data_dir, tmp_path, "-sm", "use", "--qtype", "int4", "-th", "laplace", "--seed", "3") == 0
    rows = pd.read_csv(tmp_path / "results.csv").tail(2)
    assert rows["top1"].nunique() == 1 and rows["top5"].nunique() == 1


def test_eval_precision_table(data_dir, stats_dir):
    assert run_cli(data_dir, stats_dir, "-sm", "use", "-th", "laplace", "-ep") == 0
    table = pd.read_csv(last_result(stats_dir)["file"])
    assert list(table["precision"]) == ["fp32", "int8", "int7", "int6", "int5", "int4"]
    assert_binomial_errors(table)


def test_no_stats_mode_eval_precision(data_dir, tmp_path):
    assert run_cli(data_dir, tmp_path, "-sm", "no", "-th", "laplace", "-ep", "--subset", "4") == 0
    table = pd.read_csv(last_result(tmp_path)["file"])
    assert (table["images"] == 4).all()


def test_custom_test_orders_layers_from_statistics(data_dir, tmp_path):
    # resnet18: 19 passes instead of mobilenet_v3_small's 53
    resnet = ["-a", "resnet18", "--weights", "none", "--subset", "2"]
    assert run_cli(data_dir, tmp_path, *resnet, "-sm", "collect", "-cs", "2") == 0
    assert run_cli(data_dir, tmp_path, *resnet, "-sm", "use", "--qtype", "int4", "-th", "laplace") == 0
    plan = pd.read_csv(last_result(tmp_path)["file"], index_col="name", keep_default_na=False)
    assert run_cli(data_dir, tmp_path, *resnet, "-sm", "use", "--qtype", "int4", "-th", "laplace", "-ct") == 0
    table = pd.read_csv(last_result(tmp_path)["file"], keep_default_na=False)
    regular = plan[plan["role"] == ""].index
    assert list(table["k"]) == list(range(len(regular) + 1))
    assert sorted(table["added_layer"][1:]) == sorted(regular)
    # --ct_step 5: every fifth k and the last; each pass the same as the full sweep's for that k
    assert run_cli(data_dir, tmp_path, *resnet, "-sm", "use", "--qtype", "int4", "-th", "laplace", "-ct",
                   "--ct_step", "5") == 0
    coarse = pd.read_csv(last_result(tmp_path)["file"], keep_default_na=False)
    assert list(coarse["k"]) == [*range(0, len(regular) + 1, 5), len(regular)]
    pd.testing.assert_frame_equal(coarse.reset_index(drop=True),
                                  table.set_index("k").loc[coarse["k"]].reset_index())


def test_selection_counts():
    from pytorch_quantizer.passes import selection_counts

    assert selection_counts(4) == [0, 1, 2, 3, 4]
    assert selection_counts(7, 3) == [0, 3, 6, 7]
    assert selection_counts(6, 3) == [0, 3, 6]
    assert selection_counts(2, 10) == [0, 2]


def test_ct_step_needs_ct(data_dir, stats_dir, capsys):
    assert run_cli(data_dir, stats_dir, "-sm", "use", "--qtype", "int4", "--ct_step", "2") == 2
    assert "--ct_step" in capsys.readouterr().err.strip().splitlines()[-1]


def test_dump_dir(data_dir, stats_dir, tmp_path):
    dump = tmp_path / "dump"
    assert run_cli(data_dir, stats_dir, "-sm", "use", "--qtype", "int4", "-th", "laplace", "-dd", str(dump)) == 0
    with np.load(dump / "conv1_activation.npz") as f:
        fp32, quantized = f["fp32"], f["quantized"]
    assert fp32.shape == quantized.shape and fp32.shape[0] == 4
    assert len(np.unique(quantized)) <= 16 < len(np.unique(fp32))


def test_use_without_statistics(data_dir, tmp_path, capsys):
    assert run_cli(data_dir, tmp_path, "-sm", "use", "--qtype", "int8") == 2
    assert "-sm collect" in capsys.readouterr().err.strip().splitlines()[-1]


def test_statistics_of_another_model_are_refused(data_dir, stats_dir, capsys):
    assert run_cli(data_dir, stats_dir, "-sm", "use", "--qtype", "int8", "--seed", "1") == 2  # other random weights
    assert "fingerprint" in capsys.readouterr().err
    assert run_cli(data_dir, stats_dir, "-sm", "use", "--qtype", "int8", "--no_fold_bn") == 2
    assert "bn_folded" in capsys.readouterr().err


def test_failed_collect_keeps_previous_statistics(data_dir, stats_dir, tmp_path):
    before = {p.name: p.read_bytes() for p in (stats_dir / "stats").iterdir()}
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    (tmp_path / "val" / "n01440764" / "broken.JPEG").write_bytes(b"not a jpeg")
    assert run_cli(tmp_path, stats_dir, "-sm", "collect") == 2
    assert {p.name: p.read_bytes() for p in (stats_dir / "stats").iterdir()} == before


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-a", "resnet9000"], "unknown architecture"),
        (["--qtype", "int0"], "invalid type"),
        (["--qtype", "int33"], "invalid type"),
        (["--qtype", "float8"], "invalid type"),
        (["--qtype", "abc"], "invalid type"),
        (["--weights", "/nonexistent/w.pth"], "w.pth"),
        (["-th", "median"], "invalid choice"),
        (["-qw", "int99"], "invalid type"),
        (["-sm", "use", "--qtype", "int4", "-ep", "-ct"], ("-ep", "-ct", "one at a time")),
        (["-sm", "use", "-ct"], ("-ct", "--qtype", "layer selection keeps layers at 8 bits")),
        (["--compile"], ("--compile", "-sm", "compiling runs -sm use")),
        (["--compile", "-sm", "collect"], ("--compile", "-sm", "compiling runs -sm use")),
        (["--compile", "-sm", "use", "-s"], ("--compile", "-s/--stochastic", "compiling runs -sm use")),
    ],
)
def test_bad_flags_exit_2_with_one_line(data_dir, tmp_path, flags, message, capsys):
    try:  # argparse errors leave through SystemExit, the others through main's return code
        code = inference_sim.main(["--data", str(data_dir), *ARCH, "-sf", str(tmp_path / "s"), *flags])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    for part in (message,) if isinstance(message, str) else message:
        assert part in err[0], (part, err[0])
    assert not (tmp_path / "s").exists()


def test_bad_weights_file_does_not_fit(data_dir, tmp_path, capsys):
    path = tmp_path / "w.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    assert run_cli(data_dir, tmp_path, "--weights", str(path)) == 2
    assert "w.pth" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("layout", ["missing", "no_val", "empty_val", "not_wnids"])
def test_bad_data_dirs(tmp_path, layout, capsys):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout in ("empty_val", "not_wnids"):
        (root / "val").mkdir()
    if layout == "not_wnids":
        (root / "val" / "cats").mkdir()
        Image.new("RGB", (8, 8)).save(root / "val" / "cats" / "a.jpg")
    assert run_cli(root, tmp_path, "-sm", "collect") == 2
    assert str(root) in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "stats").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(data_dir, tmp_path, capsys):
    assert run_cli(data_dir, tmp_path, "--device", "cuda") == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_subprocess_error_is_one_line(tmp_path):
    """As a user runs it: a bad qtype prints exactly one line on stderr and exits with 2."""
    proc = subprocess.run([sys.executable, str(ROOT / "inference_sim.py"), "--qtype", "int0"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "int0" in proc.stderr


def test_a_registered_method_runs_through_the_driver(data_dir, stats_dir, capsys):
    """One class plus ``register``: -th accepts it, the plan, the results CSV and the report show it."""
    from test_design import HalfRange, NeedsHistogram  # tests/ is on sys.path (pytest's rootdir-less import)

    from pytorch_quantizer.methods import register, unregister
    from pytorch_quantizer.report import layer_table
    from pytorch_quantizer.stats import load_statistics

    register(HalfRange)
    register(NeedsHistogram)
    try:
        assert "toy_quarter" in inference_sim.build_parser().format_help()
        assert run_cli(data_dir, stats_dir, "-sm", "use", "--qtype", "int4", "-th", "toy_quarter") == 0
        row = last_result(stats_dir)
        assert row["threshold"] == "toy_quarter"
        plan = pd.read_csv(row["file"], index_col="name", keep_default_na=False)
        assert set(plan.loc[plan["role"] == "", "method"]) <= {"toy_quarter", "no"}
        assert (plan["method"] == "toy_quarter").any()
        table = layer_table(load_statistics(stats_dir / "stats"), 4)
        assert "alpha_toy_quarter" in table and "alpha_toy_hist" not in table  # no toy_sketch in the folder
        capsys.readouterr()
        assert run_cli(data_dir, stats_dir, "-sm", "use", "--qtype", "int4", "-th", "toy_hist") == 2
        assert "toy_sketch observer" in capsys.readouterr().err.strip().splitlines()[-1]
    finally:
        unregister(HalfRange.name)
        unregister(NeedsHistogram.name)


RUN_NUMBERS = ("seconds",)  # the only cells two identical runs may differ in


def test_rows_and_files_identify_their_settings(data_dir, stats_dir, tmp_path):
    """Identical runs give identical rows (but the time) and files; a run that differs in one setting differs in
    that column and writes files of its own, leaving the others' files as they were."""
    base = ["-sm", "use", "--qtype", "int4", "-th", "gaus", "--results", str(tmp_path / "r.csv")]
    for flags in ([], [], ["--sigma", "std"], ["-pcw"], ["-b", "2"], ["-pz"]):
        assert run_cli(data_dir, stats_dir, *base, *flags) == 0
    rows = pd.read_csv(tmp_path / "r.csv", keep_default_na=False).drop(columns=list(RUN_NUMBERS))
    assert rows.iloc[0].equals(rows.iloc[1])
    for i, column in ((2, "act.sigma"), (3, "weight.per_channel"), (4, "data.batch_size"), (5, "act.preserve_zero")):
        differing = set(rows.columns[rows.iloc[0] != rows.iloc[i]])
        assert column in differing and "settings" in differing and "file" in differing, (column, differing)
        assert differing <= {column, "settings", "file", "top1", "top5"}, differing
    files = [Path(f) for f in rows["file"]]
    assert files[0] == files[1] and len(set(files)) == 5 and all(f.is_file() for f in files)
    assert {"weights_fingerprint", "stats_fingerprint", "cal_images", "eval_images", "version", "data.seed",
            "data.cal_size", "data.subset", "data.batch_size", "stats_folder", "top1_se", "top1_agreement",
            "sqnr_db", "agreement"} <= set(rows.columns)
    assert rows["stats_fingerprint"].str.len().min() == 16


def test_calibration_images_are_held_out_of_evaluation(data_dir, tmp_path):
    """-cs N from --data: the N images are listed with the statistics and left out of every evaluation."""
    from pytorch_quantizer.session import Session

    assert run_cli(data_dir, tmp_path, "-sm", "collect", "-cs", "3", "--seed", "5") == 0
    listed = json.loads((tmp_path / "stats" / "calibration.json").read_text())
    assert len(listed) == 3 and last_result(tmp_path)["cal_images"] == 3
    parser = inference_sim.build_parser()
    cfg = inference_sim.config_from_args(parser.parse_args(
        ["--data", str(data_dir), *ARCH, "-sf", str(tmp_path / "stats"), "-sm", "use", "--qtype", "int4", "--seed",
         "5"]), parser)
    session = Session(cfg)  # no -cs here: the statistics' own list is what is left out
    evaluated = {p for i, p in enumerate(session.dataset.samples) if i in set(session.evaluation)}
    assert len(evaluated) == 5 and not {
        Path(p).relative_to(session.dataset.root).as_posix() for p, _ in evaluated} & set(listed)
    assert run_cli(data_dir, tmp_path, "-sm", "use", "--qtype", "int4", "--seed", "5") == 0
    assert (last_result(tmp_path)["images"], last_result(tmp_path)["cal_images"]) == (5, 3)
    # an FP32 run of the same study, with the same -cs and seed, sees the same 5 images
    assert run_cli(data_dir, tmp_path, "-cs", "3", "--seed", "5") == 0
    assert last_result(tmp_path)["images"] == 5


def test_cal_data_folder(data_dir, tmp_path, capsys):
    """--cal-data DIR: statistics from another wnid folder; every --data image is then evaluated."""
    assert run_cli(data_dir, tmp_path, "-sm", "collect", "--cal-data", str(data_dir / "val"), "-cs", "2") == 0
    assert last_result(tmp_path)["images"] == 2
    listed = json.loads((tmp_path / "stats" / "calibration.json").read_text())
    assert len(listed) == 2
    capsys.readouterr()
    other = tmp_path / "other"
    (other / "val").mkdir(parents=True)
    for name in ("n01440764", "n01443537"):
        (other / "val" / name).symlink_to(data_dir / "val" / name)
    assert run_cli(other, tmp_path, "-sm", "use", "--qtype", "int4", "-th", "laplace") == 0
    assert last_result(tmp_path)["images"] == 4  # another folder: nothing to leave out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cal-data", "/nonexistent/train"], "--cal-data folder /nonexistent/train does not exist"),
        (["--cal-data", "NOT_WNIDS"], "are not ImageNet wnids"),
        (["-cs", "9"], "-cs 9 asks for more calibration images than the 8"),
    ],
)
def test_bad_calibration_input_keeps_statistics(data_dir, stats_dir, tmp_path, flags, message, capsys):
    before = {p.name: p.read_bytes() for p in (stats_dir / "stats").iterdir()}
    if "NOT_WNIDS" in flags:
        (tmp_path / "cats" / "tabby").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "tabby" / "a.jpg")
        flags = ["--cal-data", str(tmp_path / "cats")]
    assert run_cli(data_dir, stats_dir, "-sm", "collect", *flags) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert {p.name: p.read_bytes() for p in (stats_dir / "stats").iterdir()} == before


def test_all_images_used_for_calibration_is_refused(data_dir, tmp_path, capsys):
    assert run_cli(data_dir, tmp_path, "-sm", "collect") == 0
    assert run_cli(data_dir, tmp_path, "-sm", "use", "--qtype", "int4") == 2
    assert "no image of" in capsys.readouterr().err.strip().splitlines()[-1]


def test_statistics_of_another_layout_version_are_refused(data_dir, stats_dir, tmp_path, capsys):
    import json
    import shutil

    folder = tmp_path / "stats"
    shutil.copytree(stats_dir / "stats", folder)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "format": 3}))
    assert run_cli(data_dir, tmp_path, "-sm", "use", "--qtype", "int4") == 2
    assert "layout format 3" in capsys.readouterr().err.strip().splitlines()[-1]


def test_default_statistics_folder_is_keyed_by_weights(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = ["--data", str(data_dir), *ARCH, "-b", "4", "-j", "0", "-cs", "2", "--results", str(tmp_path / "r.csv")]
    for seed in ("0", "1"):  # random weights: another seed, other weights
        assert inference_sim.main([*argv, "-sm", "collect", "--seed", seed]) == 0
    folders = sorted(p.name for p in (tmp_path / "asiq_data" / "statistics").iterdir())
    rows = pd.read_csv(tmp_path / "r.csv")
    assert folders == sorted(f"mobilenet_v3_small-{fp}" for fp in rows["weights_fingerprint"]) and len(folders) == 2


def test_half_range_through_the_driver(data_dir, stats_dir):
    """-hr: the ReLU-fed layers of mobilenet_v3_small (found in its graph) get one-sided grids; Hardswish-fed do not."""
    assert run_cli(data_dir, stats_dir, "-sm", "use", "--qtype", "int4", "-th", "laplace", "-hr") == 0
    row = last_result(stats_dir)
    assert row["act.half_range"]
    plan = pd.read_csv(row["file"], index_col="name", keep_default_na=False)
    one_sided = plan[plan["one_sided"]]
    assert 0 < len(one_sided) < len(plan) and (one_sided["offset"] == 0).all()
    assert "features.0.0" not in set(one_sided["module_name"])  # the stem conv feeds a Hardswish


def test_input_placement_through_the_driver(data_dir, tmp_path, capsys):
    assert run_cli(data_dir, tmp_path, "-sm", "collect", "-cs", "4", "--act_point", "input") == 0
    assert run_cli(data_dir, tmp_path, "-sm", "use", "--qtype", "int4", "-th", "laplace", "--act_point", "input") == 0
    row = last_result(tmp_path)
    assert row["act.placement"] == "input" and row["images"] == 4
    plan = pd.read_csv(row["file"], index_col="name", keep_default_na=False)
    assert plan.loc["conv0_activation", "bits"] == ""  # the image stays float
    capsys.readouterr()
    assert run_cli(data_dir, tmp_path, "-sm", "use", "--qtype", "int4", "-th", "laplace") == 2
    assert "--act_point output" in capsys.readouterr().err.strip().splitlines()[-1]
    assert run_cli(data_dir, tmp_path, "-sm", "use", "--qtype", "int4", "--act_point", "input", "-hr") == 2


def test_observers_narrow_what_collect_gathers(data_dir, tmp_path, capsys):
    assert run_cli(data_dir, tmp_path, "-sm", "collect", "-cs", "4", "--observers", "moments") == 0
    folder = Path(last_result(tmp_path)["stats_folder"])
    assert json.loads((folder / "meta.json").read_text())["observers"] == [
        {"granularity": "tensor", "name": "moments"}]
    assert not list(folder.glob("*_histogram.csv"))
    assert run_cli(data_dir, tmp_path, "-sm", "use", "--qtype", "int4", "-th", "laplace") == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert run_cli(data_dir, tmp_path, "-sm", "use", "--qtype", "int4", "-th", "kld") == 2
    assert "histogram" in capsys.readouterr().err.strip().splitlines()[-1]
    for names, message in (("histogram", "include moments"), ("moments,bogus", "unknown observer 'bogus'")):
        # argparse's type check: one line, exit 2
        assert run_cli(data_dir, tmp_path, "-sm", "collect", "-cs", "4", "--observers", names) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert run_cli(data_dir, tmp_path, "-sm", "use", "--qtype", "int4", "--observers", "moments") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--observers" in err[0] and "-sm/--stats_mode" in err[0]
    assert "with -sm collect" in err[0]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing overwritten
