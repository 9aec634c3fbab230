"""inference_sim.py end to end on a synthetic wnid-named ImageFolder and a small torchvision model."""

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
    assert run_cli(data_dir, out, "-sm", "collect") == 0
    return out


def run_cli(data_dir: Path, out: Path, *flags: str) -> int:
    """Run the driver in-process; a later -a/--weights in ``flags`` overrides the default small model."""
    argv = ["--data", str(data_dir), *ARCH, "-b", "4", "-j", "0", "-sf", str(out / "stats"),
            "--results", str(out / "results.csv"), *flags]
    return inference_sim.main(argv)


def last_result(out: Path) -> pd.Series:
    return pd.read_csv(out / "results.csv", keep_default_na=False).iloc[-1]


def test_collect_writes_statistics_and_prints_seed_line(data_dir, tmp_path, capsys):
    assert run_cli(data_dir, tmp_path, "-sm", "collect") == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(" * Prec@1 ") or line.startswith("* Prec@1 ")
    stats = tmp_path / "stats"
    assert (stats / "meta.json").is_file() and (stats / "conv0_activation_summary.csv").is_file()
    row = last_result(tmp_path)
    assert row["stats_mode"] == "collect" and row["images"] == 8 and row["qtype"] == "fp32"


@pytest.mark.parametrize("threshold", ["no", "laplace", "gaus", "mix"])
def test_use_every_threshold(data_dir, stats_dir, threshold, capsys):
    assert run_cli(data_dir, stats_dir, "-sm", "use", "--qtype", "int4", "-th", threshold) == 0
    out = capsys.readouterr().out
    assert " * Prec@1 " in out
    row = last_result(stats_dir)
    assert (row["qtype"], row["threshold"], row["stats_mode"], row["images"]) == ("int4", threshold, "use", 8)
    plan = pd.read_csv(stats_dir / "plans" / f"mobilenet_v3_small_int4_{threshold}.csv", index_col="name")
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
    assert run_cli(data_dir, tmp_path, *alexnet, "-sm", "collect") == 0
    assert run_cli(data_dir, tmp_path, *alexnet, "-sm", "use", "--qtype", "int4", "-th", "laplace", "--compile") == 0
    assert " * Prec@1 " in capsys.readouterr().out
    row = last_result(tmp_path)
    assert (row["arch"], row["qtype"], row["images"], row["compiled"]) == ("alexnet", "int4", 8, True)


def test_same_command_twice_gives_same_numbers(data_dir, tmp_path):
    for _ in range(2):
        assert run_cli(data_dir, tmp_path, "-sm", "collect", "--seed", "3") == 0
    first = {p.name: p.read_bytes() for p in (tmp_path / "stats").iterdir()}
    assert run_cli(data_dir, tmp_path, "-sm", "collect", "--seed", "3") == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "stats").iterdir()} == first
    for _ in range(2):
        assert run_cli(data_dir, tmp_path, "-sm", "use", "--qtype", "int4", "-th", "laplace", "--seed", "3") == 0
    rows = pd.read_csv(tmp_path / "results.csv").tail(2)
    assert rows["top1"].nunique() == 1 and rows["top5"].nunique() == 1


def test_eval_precision_table(data_dir, stats_dir):
    assert run_cli(data_dir, stats_dir, "-sm", "use", "-th", "laplace", "-ep") == 0
    table = pd.read_csv(stats_dir / "precision" / "mobilenet_v3_small_laplace_clipping.csv")
    assert list(table["precision"]) == ["fp32", "int8", "int7", "int6", "int5", "int4"]


def test_no_stats_mode_eval_precision(data_dir, tmp_path):
    assert run_cli(data_dir, tmp_path, "-sm", "no", "-th", "laplace", "-ep", "--subset", "4") == 0
    table = pd.read_csv(tmp_path / "precision" / "mobilenet_v3_small_laplace_clipping.csv")
    assert (table["images"] == 4).all()


def test_custom_test_orders_layers_from_statistics(data_dir, tmp_path):
    # resnet18: 19 passes instead of mobilenet_v3_small's 53
    resnet = ["-a", "resnet18", "--weights", "none", "--subset", "2"]
    assert run_cli(data_dir, tmp_path, *resnet, "-sm", "collect", "-cs", "2") == 0
    assert run_cli(data_dir, tmp_path, *resnet, "-sm", "use", "--qtype", "int4", "-th", "laplace") == 0
    assert run_cli(data_dir, tmp_path, *resnet, "-sm", "use", "--qtype", "int4", "-th", "laplace", "-ct") == 0
    table = pd.read_csv(tmp_path / "custom_test" / "resnet18_int4_laplace.csv", keep_default_na=False)
    plan = pd.read_csv(tmp_path / "plans" / "resnet18_int4_laplace.csv", index_col="name")
    regular = plan[plan["role"].isna()].index
    assert list(table["k"]) == list(range(len(regular) + 1))
    assert sorted(table["added_layer"][1:]) == sorted(regular)


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
        (["-sm", "use", "--qtype", "int4", "-ep", "-ct"], "one at a time"),
        (["-sm", "use", "-ct"], "-ct keeps layers at 8 bits"),
        (["--compile"], "--compile runs -sm use"),
        (["--compile", "-sm", "collect"], "--compile runs -sm use"),
        (["--compile", "-sm", "use", "-s"], "--compile runs -sm use"),
    ],
)
def test_bad_flags_exit_2_with_one_line(data_dir, tmp_path, flags, message, capsys):
    try:  # argparse errors leave through SystemExit, the others through main's return code
        code = inference_sim.main(["--data", str(data_dir), *ARCH, "-sf", str(tmp_path / "s"), *flags])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
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
