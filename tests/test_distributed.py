"""torchrun on the CPU (gloo): 2 and 3 processes spawned here give the files and counts of one process.

Every process runs one thread (``OMP_NUM_THREADS=1``, torchrun's own default for several processes), the
one-process reference included: on the CPU a convolution's last bits depend on the thread count even in one
process, so only runs with equal threads per process can be compared byte for byte.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from pytorch_quantizer.distributed import DistContext, RankFailure, StoppedForPeer
from pytorch_quantizer.observers import Observer
from pytorch_quantizer.stats import StatisticsCollector

ROOT = Path(__file__).resolve().parents[1]
WNIDS = ["n01440764", "n01443537", "n02085620", "n04599235"]
IMAGES = 7  # divisible by neither 2 nor 3
ARCH = ["-a", "mobilenet_v3_small", "--weights", "none", "-j", "0"]
TIMEOUT = 240  # seconds for one launch on a loaded 2-core machine (a hang fails the test instead of blocking)


def make_images(root: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "val" / WNIDS[i * len(WNIDS) // count]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)).save(folder / f"img_{i}.JPEG")
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("imagenet"), IMAGES)


def launch(nproc: int | None, *flags: str, cwd: Path) -> subprocess.CompletedProcess:
    """The driver as users start it: ``torchrun --standalone --nproc_per_node N`` (None: plain python)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None), env.pop("RANK", None), env.pop("LOCAL_RANK", None)
    prefix = [sys.executable]
    if nproc is not None:
        prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([*prefix, str(ROOT / "inference_sim.py"), *ARCH, *flags], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def driver_errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("inference_sim.py: error:")]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def collect(nproc: int | None, data: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return launch(nproc, "--data", str(data), "-b", "2", "-sm", "collect", "-sf", str(out / "stats"),
                  "--results", str(out / "results.csv"), *flags, cwd=out)


@pytest.fixture(scope="module")
def one_process_stats(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    proc = collect(None, data_dir, out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("nproc", [2, 3])
def test_collect_writes_the_files_of_one_process(data_dir, one_process_stats, tmp_path, nproc):
    proc = collect(nproc, data_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert files(tmp_path / "stats") == files(one_process_stats / "stats")  # every file, byte for byte
    assert proc.stdout.count(" * Prec@1 ") == 1  # rank 0 alone prints
    rows = pd.read_csv(tmp_path / "results.csv", keep_default_na=False)
    assert len(rows) == 1 and rows["images"].iloc[0] == IMAGES and rows["world_size"].iloc[0] == nproc


@pytest.fixture(scope="module")
def use_stats(data_dir, tmp_path_factory) -> Path:
    """Statistics of 2 images collected in one process: 5 images are left to evaluate on."""
    out = tmp_path_factory.mktemp("use")
    proc = collect(None, data_dir, out, "-cs", "2")
    assert proc.returncode == 0, proc.stderr
    return out / "stats"


def evaluate(nproc: int | None, data: Path, stats: Path, out: Path, *flags: str) -> pd.DataFrame:
    proc = launch(nproc, "--data", str(data), "-b", "1", "-cs", "2", "-sm", "use", "-sf", str(stats),
                  "--results", str(out / "results.csv"), *flags, cwd=out)
    assert proc.returncode == 0, proc.stderr
    return pd.read_csv(out / "results.csv", keep_default_na=False)


MEASURED = ["pass", "qtype", "top1", "top5", "images", "settings"]


@pytest.mark.parametrize(("nproc", "flags"),
                         [(2, ["--qtype", "int4", "-th", "laplace"]), (3, ["-th", "laplace", "-ep"])])
def test_evaluation_counts_every_image_once_as_one_process(data_dir, use_stats, tmp_path, nproc, flags):
    (tmp_path / "one").mkdir(), (tmp_path / "many").mkdir()
    one = evaluate(None, data_dir, use_stats, tmp_path / "one", *flags)
    many = evaluate(nproc, data_dir, use_stats, tmp_path / "many", *flags)
    assert (many["images"] == IMAGES - 2).all()  # 5 images: no padding duplicate, none dropped
    pd.testing.assert_frame_equal(one[MEASURED], many[MEASURED])  # the same counts, settings hash and file names
    written = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.csv"))
    assert written == sorted(p.relative_to(tmp_path / "many") for p in (tmp_path / "many").rglob("*.csv"))
    for path in written:  # plans and sweep tables, byte for byte (results.csv differs in seconds, world_size)
        if path.name != "results.csv":
            assert (tmp_path / "many" / path).read_bytes() == (tmp_path / "one" / path).read_bytes(), path


def test_compare_gives_the_table_of_one_process(data_dir, use_stats, tmp_path):
    """--compare under torchrun: each method x width pass sharded, the same counts in the table."""
    flags = ["--compare", "no,laplace,kld", "--qtype", "int4,int8"]
    (tmp_path / "one").mkdir(), (tmp_path / "many").mkdir()
    evaluate(None, data_dir, use_stats, tmp_path / "one", *flags)
    evaluate(2, data_dir, use_stats, tmp_path / "many", *flags)
    tables = [pd.read_csv(next((tmp_path / run / "compare").glob("*.csv"))) for run in ("one", "many")]
    measured = [c for c in tables[0].columns if "seconds" not in c]
    assert len(tables[0]) == 7 and set(tables[0]["images"]) == {IMAGES - 2}
    pd.testing.assert_frame_equal(tables[0][measured], tables[1][measured])


def test_a_failing_rank_ends_the_run_and_writes_no_statistics(tmp_path):
    data = make_images(tmp_path / "data", IMAGES)
    broken = sorted((data / "val").rglob("*.JPEG"))[-1]  # the last image: in the last rank's shard
    broken.write_bytes(b"not a jpeg")
    proc = collect(2, data, tmp_path)
    assert proc.returncode != 0  # each worker exits 2; torchrun itself reports that with its exit code 1
    errors = driver_errors(proc)
    assert len(errors) == 1 and "rank 1 of 2: cannot read image" in errors[0] and broken.name in errors[0]
    assert not (tmp_path / "stats").exists() and not list(tmp_path.glob(".stats*"))


def test_a_failing_rank_keeps_earlier_statistics(data_dir, one_process_stats, tmp_path):
    data = make_images(tmp_path / "data", IMAGES)
    sorted((data / "val").rglob("*.JPEG"))[-1].write_bytes(b"not a jpeg")
    before = files(one_process_stats / "stats")
    proc = launch(3, "--data", str(data), "-b", "2", "-sm", "collect", "-sf", str(one_process_stats / "stats"),
                  "--results", str(tmp_path / "results.csv"), cwd=tmp_path)
    assert proc.returncode != 0 and len(driver_errors(proc)) == 1 and "rank 2 of 3" in driver_errors(proc)[0]
    assert files(one_process_stats / "stats") == before


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["-cs", "1"], "torchrun started 2 processes for 1 calibration images"),
     (["--device", "cpu", "--device_ids", "0 1 2"], "--device_ids 0 1 2 choose GPUs, but --device is cpu")],
)
def test_bad_launches_exit_with_one_line(data_dir, tmp_path, flags, message):
    proc = collect(2, data_dir, tmp_path, *flags)
    assert proc.returncode != 0
    errors = driver_errors(proc)
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert not (tmp_path / "stats").exists()


# -- in one process: the pieces the launches above rely on ---------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize(("items", "batch"), [(7, 2), (5, 1), (9, 4), (3, 8)])
def test_shards_are_whole_batches_covering_every_item_once(items, batch, world):
    shards = [DistContext(rank=r, world_size=world, backend="gloo").shard(items, batch) for r in range(world)]
    assert [i for shard in shards for i in shard] == list(range(items))  # in order, each once: no padding
    assert all(shard.start % batch == 0 for shard in shards if shard)  # the batches of one process


def test_a_failure_marks_the_store_so_peers_stop_at_their_next_batch(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ctx = DistContext(backend="gloo", device=torch.device("cpu"))
        ctx.stop_if_peer_failed()  # nothing has failed yet
        with pytest.raises(RankFailure, match="disk full"), ctx.together():
            raise OSError("disk full")
        with pytest.raises(StoppedForPeer):
            ctx.stop_if_peer_failed()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("observers", [("moments",), ("moments", "histogram")])
def test_merged_collectors_write_the_folder_of_one(tiny_model, tmp_path, observers):
    """Histograms too: each part primes its lattice with the first batch of one process, then bins its shard."""
    x = torch.randn(7, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x[6:] *= 30.0  # the last shard widens the range: the merge must coarsen the others' bins
    parts = [StatisticsCollector(tiny_model, observers=observers) for _ in range(3)]
    one = StatisticsCollector(tiny_model, observers=observers)
    with torch.no_grad():
        for collector, batches in zip(parts, [[x[:2], x[2:4]], [x[4:6]], [x[6:]]], strict=True):
            with collector:
                with collector.priming():
                    tiny_model(x[:2])
                for batch in batches:
                    tiny_model(batch)
        with one:
            for start in range(0, 7, 2):
                tiny_model(x[start:start + 2])
    parts[0].merge([part.state() for part in parts])
    assert parts[0].samples == 7
    merged, single = parts[0].save(tmp_path / "merged", {}), one.save(tmp_path / "one", {})
    assert files(merged) == files(single)


def test_an_observer_without_state_cannot_be_collected_across_processes():
    class Counting(Observer):
        name = "counting"

        def update(self, x, key):
            pass

        def export(self, folder, layer):
            pass

        @classmethod
        def load(cls, folder, layer, granularity):
            return None

    with pytest.raises(NotImplementedError, match="counting observer cannot be collected under torchrun"):
        Counting().state()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_rank_that_cannot_see_its_gpu(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # one GPU visible, two processes
    proc = collect(2, data_dir, tmp_path, "--device", "cuda")
    errors = driver_errors(proc)
    assert proc.returncode != 0 and len(errors) == 1 and "rank 1 of 2: cuda:1 is not visible" in errors[0]
    assert not (tmp_path / "stats").exists()


def test_real_images_give_the_counts_of_one_process(shared_data, tmp_path):
    """Random weights on random images hit no class; real weights on real photographs make the top-1 / top-5
    counts something that can differ (7 images, 2 processes, 6-bit activations from live ranges)."""
    val = shared_data / "imagenet-sample" / "val"
    for folder in sorted(val.iterdir())[::140][:IMAGES]:
        image = next(folder.iterdir())
        (tmp_path / "data" / "val" / folder.name).mkdir(parents=True)
        (tmp_path / "data" / "val" / folder.name / image.name).symlink_to(image)
    weights = shared_data / "weights" / "mobilenet_v2_tflite_quant.pth"
    tables = []
    for nproc in (None, 2):
        out = tmp_path / f"run{nproc}"
        out.mkdir()
        proc = launch(nproc, "--data", str(tmp_path / "data"), "-a", "mobilenet_v2", "--weights", str(weights),
                      "-b", "2", "-sm", "no", "-th", "laplace", "--qtype", "int6",
                      "--results", str(out / "results.csv"), cwd=out)
        assert proc.returncode == 0, proc.stderr
        tables.append(pd.read_csv(out / "results.csv", keep_default_na=False)[MEASURED])
    pd.testing.assert_frame_equal(tables[0], tables[1])
    assert tables[0]["top5"].max() > 0 and (tables[0]["images"] == IMAGES).all()
