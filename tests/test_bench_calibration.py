"""benchmarks/bench_calibration.py runs end to end at toy size and reports every case (no timing is checked)."""

from __future__ import annotations

import re

from script_loading import load_script

from pytorch_quantizer.methods import method_names


def test_calibration_benchmark_reports_every_case(tmp_path, capsys):
    bench = load_script("benchmarks/bench_calibration.py")
    log = tmp_path / "bench.txt"
    bench.main(["--arch", "mobilenet_v3_small", "--images", "2", "--batch-size", "2", "--rounds", "1",
                "--repeats", "1", "--log", str(log)])
    out = capsys.readouterr().out
    assert log.read_text() == out
    for case in ("FP32", "moments", "all observers"):
        assert re.search(rf"{case}\s+[\d.]+ s\s+[\d.]+x FP32", out)
    last = out.strip().splitlines()[-1]
    assert re.match(r"moments_overhead=[\d.]+ all_observers_overhead=[\d.]+ ", last)
    for method in method_names():  # every method's observers were collected (all of them were)
        assert f" {method}_vs_laplace=" in f" {last}"
