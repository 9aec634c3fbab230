"""benchmarks/bench_pass.py runs every kind of pass end to end at toy size and prints its parseable last line (no
timing is checked); bad input is one line and exit 2."""

from __future__ import annotations

import re

import pytest
from script_loading import load_script
from test_cli import data_dir  # noqa: F401  (a fixture: 8 synthetic JPEGs in ImageNet layout)


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_pass.py")


def test_pass_benchmark_reports_each_case(bench, data_dir, tmp_path, capsys):  # noqa: F811
    cases = ["fp32", "collect_hist", "w8a4", "w8a4_pcq_a", "compare"]
    log = tmp_path / "bench.txt"
    bench.main(["--data", str(data_dir), "--arch", "mobilenet_v3_small", "--images", "8", "--batch-size", "4",
                "--workers", "0", "--rounds", "1", "--cases", ",".join(cases), "--compare-methods", "laplace,p99",
                "--compare-widths", "int4", "--log", str(log)])
    out = capsys.readouterr().out
    assert log.read_text() == out
    assert "load average at start" in out and "load average at end" in out
    assert re.search(r"decode/transform alone [\d.]+ s and forward alone [\d.]+ s", out)
    assert re.search(r"compare .* 3 pass\(es\)", out)  # FP32 and two quantized passes
    last = dict(item.split("=") for item in out.strip().splitlines()[-1].split())
    assert list(last) == ["plain_s", "decode_share", *cases]
    assert all(float(value) > 0 for value in last.values())


@pytest.mark.parametrize("flags", [["--arch", "no_such_net"], ["--data", "/no/such/folder"], ["--cases", "fp64"]])
def test_pass_benchmark_refuses_bad_input_in_one_line(bench, data_dir, flags, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--data", str(data_dir), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("bench_pass.py: error:")
