"""The benchmark script runs end to end at toy sizes and prints its machine-readable last line (no timings checked).

Eager cases run resnet18 on 32-pixel images; the ``--compile`` case runs conftest's TinyNet, since compiling resnet18
twice (FP32 and W8A4) takes over a minute on a cold Inductor cache and TinyNet a few seconds."""

from __future__ import annotations

import re

import pytest
import torchvision
from script_loading import load_script

from pytorch_quantizer import backends

LAST_LINE = re.compile(r"copy_ratio=(\S+) w8a4_overhead=(\S+) collect_overhead=(\S+)(?: compiled_w8a4_overhead=(\S+))?")


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_quant.py")


@pytest.fixture
def tiny_net(monkeypatch, tiny_model) -> None:
    """TinyNet (Conv-BN-ReLU twice, pooling, a classifier) as ``--arch tiny_net``: the script builds
    ``getattr(torchvision.models, arch)(weights=None)``."""
    monkeypatch.setattr(torchvision.models, "tiny_net", lambda weights: tiny_model, raising=False)


@pytest.mark.parametrize("flags", [[], ["--no-fold-bn"], ["--compile", "--part", "model", "--arch", "tiny_net"]])
def test_benchmark_runs_and_reports(bench, capsys, tiny_net, flags: list[str]) -> None:
    if backends.kernel_module("cpu") is None:
        pytest.skip(f"CPU kernel not built: {backends.kernel_load_error('cpu')}")
    bench.main(["--numel", "4100", "--repeats", "1", "--model-repeats", "1", "--batch-size", "1", "--image-size", "32",
                *flags])
    out = capsys.readouterr().out
    compiled = "--compile" in flags
    cases = ["W8A4", "collect statistics"] + (["W8A4 compiled"] if compiled else ["copy_", "cpu in place",
                                                                                   "statistics, cpu kernel"])
    for case in cases:
        assert case in out
    assert ("BatchNorm layers folded" in out) == ("--no-fold-bn" not in flags)
    assert len(re.findall(r"ms inside the hooks per forward", out)) == 2
    copy_ratio, *ratios = LAST_LINE.fullmatch(out.strip().splitlines()[-1]).groups()
    assert (copy_ratio == "nan") == compiled  # the kernel part ran unless only the model part was asked for
    assert all(float(r) > 0 for r in ratios[: 2 + compiled])  # measured, not nan: every part ran
    assert (ratios[2] is not None) == compiled


def test_benchmark_refuses_cuda_without_gpu(bench, monkeypatch) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cuda"])
    assert exit_info.value.code == 2
