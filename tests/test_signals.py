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


def test_sigterm_during_collect_leaves_nothing_behind(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(64):
        folder = tmp_path / "data" / "val" / WNIDS[i % len(WNIDS)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")
    stats = tmp_path / "stats"
    stats.mkdir()
    (stats / "meta.json").write_text("{}")  # a folder a successful collect would replace
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "inference_sim.py"), "-a", "resnet50", "--weights", "none", "-j", "0", "-b", "1",
         "--data", str(tmp_path / "data"), "-sm", "collect", "-sf", str(stats), "--results",
         str(tmp_path / "r.csv")], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # wait until the calibration pass runs
        line = proc.stderr.readline()
        lines.append(line)
        if line.startswith("calibration:") or not line:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    code = proc.wait(timeout=120)
    errors = [line for line in rest.splitlines() if line.startswith("inference_sim.py:")]
    assert code == 143, (lines, rest[-2000:])
    assert errors == ["inference_sim.py: terminated (statistics are saved only by a completed "
                                      "collect pass)"], (code, rest[-2000:])
    assert "Traceback" not in rest
    assert (stats / "meta.json").read_text() == "{}" and [p.name for p in stats.iterdir()] == ["meta.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".stats.")]  # no staging folder
    assert not (tmp_path / "r.csv").exists()
