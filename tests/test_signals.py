"""SIGTERM (a scheduler's stop) ends a run like Ctrl-C: one line, exit 143, no staging folder left, the earlier
statistics untouched."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WNIDS = ["n01440764", "n01443537", "n02085620", "n04599235"]


MESSAGE = "inference_sim.py: terminated (statistics are saved only by a completed collect pass)"


def _images_and_old_statistics(tmp_path: Path, count: int) -> Path:
    """``count`` random 64x64 JPEGs under tmp_path/data and a statistics folder a successful collect would replace."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = tmp_path / "data" / "val" / WNIDS[i % len(WNIDS)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")
    stats = tmp_path / "stats"
    stats.mkdir()
    (stats / "meta.json").write_text("{}")
    return stats


def _collect_args(tmp_path: Path, stats: Path) -> list[str]:
    return [str(ROOT / "inference_sim.py"), "-a", "resnet50", "--weights", "none", "-j", "0", "-b", "1",
            "--data", str(tmp_path / "data"), "-sm", "collect", "-sf", str(stats), "--results", str(tmp_path / "r.csv")]


def _terminate_during_calibration(proc: subprocess.Popen, settle_s: float) -> tuple[list[str], str]:
    """Wait until the calibration pass runs, SIGTERM the process, and return the stderr lines before and after."""
    lines = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if line.startswith("calibration:") or not line:
            break
    time.sleep(settle_s)
    proc.send_signal(signal.SIGTERM)
    return lines, proc.stderr.read()


def _nothing_left(tmp_path: Path, stats: Path) -> None:
    assert (stats / "meta.json").read_text() == "{}" and [p.name for p in stats.iterdir()] == ["meta.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".stats.")]  # no staging folder
    assert not (tmp_path / "r.csv").exists()


def test_sigterm_during_collect_leaves_nothing_behind(tmp_path):
    stats = _images_and_old_statistics(tmp_path, 64)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, *_collect_args(tmp_path, stats)], cwd=tmp_path, env=env,
                            stderr=subprocess.PIPE, text=True)
    lines, rest = _terminate_during_calibration(proc, 1.0)
    code = proc.wait(timeout=120)
    errors = [line for line in rest.splitlines() if line.startswith("inference_sim.py:")]
    assert code == 143, (lines, rest[-2000:])
    assert errors == [MESSAGE], (code, rest[-2000:])
    assert "Traceback" not in rest
    _nothing_left(tmp_path, stats)


def test_sigterm_to_torchrun_during_collect_prints_one_line_and_leaves_nothing(tmp_path):
    """A scheduler stops a torchrun job with SIGTERM to torchrun, which passes it to every rank: rank 0 alone
    prints the one line, and no rank leaves a staging folder or touches the earlier statistics."""
    stats = _images_and_old_statistics(tmp_path, 256)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *_collect_args(tmp_path, stats)], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    lines, rest = _terminate_during_calibration(proc, 2.0)
    proc.wait(timeout=120)
    ours = [line for line in rest.splitlines() if line.startswith("inference_sim.py:")]
    assert ours == [MESSAGE], (lines, rest[-3000:])
    _nothing_left(tmp_path, stats)
