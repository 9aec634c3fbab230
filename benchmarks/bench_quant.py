"""How fast is GEMMLOWP fake quantization, and what does simulating it cost a real network?

Benchmark 1 (kernels): each backend on one large float32 tensor, in GB/s counting 8 bytes per element (one
read, one write; for the per-sample statistics, two reads), against ``Tensor.copy_`` measured in the same run:
an in-place kernel cannot beat a copy by much, so copy_ is the bar. Benchmark 2 (model): torchvision
``--arch`` (random weights, BatchNorm folded into the convolutions as ``inference_sim.py`` does unless
``--no-fold-bn``) on a random batch; forward time with W8A4 quantization hooks (statistics "use"
mode) and with statistics-collection hooks, each over the plain FP32 forward. Runs are interleaved (each round
runs every case once) so that a noisy machine hurts all entries alike; kernels report the best and the median
of ``--repeats`` (each of ``--calls`` back-to-back calls, so that on a GPU the host's per-call work overlaps
the device's, as between a network's layers), the model the median over rounds of each round's time ratio.
A 2 % overhead drowns in a shared machine's noise, so the model benchmark also times the hooks themselves
(from a hook placed before the quantizer's to one placed after it, on every layer) and prints that time as a
share of the FP32 forward.
With ``--compile`` it also times FP32 and W8A4 under ``torch.compile``, where Inductor fuses the quantization
into the element-wise ops after each layer (``pytorch_quantizer.compiled``).

The last line printed is machine-readable:
``copy_ratio=R w8a4_overhead=X collect_overhead=Y`` where R is the compiled kernel's in-place GB/s over
copy_'s on ``--device`` (the CPU kernel on cpu), and X, Y are times over the FP32 forward; ``--compile`` appends
`` compiled_w8a4_overhead=Z``, compiled W8A4 time over compiled FP32 time.

    python benchmarks/bench_quant.py [--device cpu|cuda] [--arch resnet18] [--batch-size 32] [--image-size 224]
                                     [--threads N] [--calls N] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pytorch_quantizer import (  # noqa: E402
    backends,  # noqa: E402
    gemmlowp_qparams,
    gemmlowp_qparams_per_channel,
    quantize_per_channel_with_qparams,
    quantize_with_qparams,
)
from pytorch_quantizer.compiled import compile_model  # noqa: E402
from pytorch_quantizer.model_quantizer import ActivationQuantizer  # noqa: E402
from pytorch_quantizer.quant_config import ActivationConfig, QuantConfig, WeightConfig  # noqa: E402
from pytorch_quantizer.stats import (  # noqa: E402
    COLLECTED_OBSERVERS,
    StatisticsCollector,
    load_statistics,
    per_sample_stats,
)

DELTA, OFFSET, BITS = 6.0, -3.0, 8
BYTES_PER_ELEMENT = 8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved(cases: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 1):
    """Seconds per run of each case: ``repeats`` rounds, each running every case once in turn."""
    for _ in range(warmup):
        for fn in cases.values():
            _time_once(fn, device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(_time_once(fn, device))
    return times


# ---------------------------------------------------------------------------------------------- kernels


def _repeated(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def bench_kernels(device: torch.device, numel: int, repeats: int, calls: int = 1) -> float:
    """Print GB/s per backend; return the device kernel's in-place GB/s over copy_ (NaN without a kernel).

    Grid parameters are computed once, as the inference hooks do, so a case times the quantization itself.
    Each timed run makes ``calls`` calls back to back (then waits for the device): on a GPU one call's
    wall time is mostly the host's Python and the launch, which a network's layers overlap with the work
    queued before them; the same holds for copy_ and clamp_.
    """
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(numel, generator=g) * 8 - 4).to(device)
    dst = torch.empty_like(x)
    kernel = "cuda" if device.type == "cuda" else "cpu"
    have_kernel = backends.kernel_module(kernel) is not None
    channels = 256
    shape4d = (numel // (channels * 64 * 64), channels, 64, 64) if numel % (channels * 64 * 64) == 0 else None
    delta_c = torch.linspace(2.0, 8.0, channels, dtype=torch.float64)
    qp = gemmlowp_qparams(DELTA, OFFSET, BITS)
    qp_c = gemmlowp_qparams_per_channel(delta_c, -delta_c / 2, BITS)
    qp_c = dataclasses.replace(qp_c, **{f: getattr(qp_c, f).to(device) for f in ("scale", "inv_scale", "offset")})

    # copy_ is the bar; an in-place ATen element-wise op (clamp_, one read and one write like the kernels) shows
    # how close to it an in-place pass gets on this device (copy_ may use the copy engines / memcpy).
    cases: dict[str, Callable[[], object]] = {"copy_": lambda: dst.copy_(x), "ATen clamp_": lambda: x.clamp_(-8, 8)}
    names = ["torch"] + ([kernel] if have_kernel else [])
    for name in names:
        cases[f"{name} out of place"] = lambda name=name: quantize_with_qparams(x, qp, backend=name)
        cases[f"{name} in place"] = lambda name=name: quantize_with_qparams(x, qp, backend=name, inplace=True)
        if shape4d is not None:
            x4 = x.view(shape4d)
            cases[f"{name} per-channel in place"] = lambda name=name, x4=x4: quantize_per_channel_with_qparams(
                x4, qp_c, dim=1, backend=name, inplace=True
            )
    # per-sample statistics of the same data as 64 samples: two reads of 4 bytes, so also 8 bytes per element
    rows = x.view(64, -1) if numel % 64 == 0 else x.view(1, -1)
    cases["statistics, torch reductions"] = lambda: per_sample_stats(rows, fused=False)
    if have_kernel:
        cases[f"statistics, {kernel} kernel"] = lambda: per_sample_stats(rows)
    if not have_kernel:
        print(f"  ({kernel} kernel not available: {backends.kernel_load_error(kernel)})")

    times = interleaved({name: _repeated(fn, calls) for name, fn in cases.items()}, device, repeats)
    times = {name: [t / calls for t in ts] for name, ts in times.items()}
    gbs = {}
    print(f"  {'case':32s} {'best GB/s':>10s} {'median GB/s':>12s} {'median ms':>10s}")
    for name, ts in times.items():
        best, median = min(ts), statistics.median(ts)
        gbs[name] = numel * BYTES_PER_ELEMENT / best / 1e9
        print(f"  {name:32s} {gbs[name]:10.1f} {numel * BYTES_PER_ELEMENT / median / 1e9:12.1f} {median * 1e3:10.2f}")
    if not have_kernel:
        return float("nan")
    ratio = gbs[f"{kernel} in place"] / gbs["copy_"]
    print(f"  {kernel} kernel in place / copy_ = {ratio:.3f}, ATen clamp_ / copy_ = "
          f"{gbs['ATen clamp_'] / gbs['copy_']:.3f} (best of {repeats}, {calls} back-to-back calls each)")
    return ratio


# ------------------------------------------------------------------------------------------------ model


W8A4 = QuantConfig(act=ActivationConfig(bits=4, method="laplace"), weight=WeightConfig(bits=8, bias_bits=8))


def bench_model(
    device: torch.device, arch: str, batch_size: int, repeats: int, fold_bn: bool = True, compile_too: bool = False,
    image_size: int = 224,
) -> tuple[float, float, float]:
    """Print forward times; return the W8A4 / FP32 and collect / FP32 median time ratios, and with ``compile_too``
    compiled W8A4 / compiled FP32 (else NaN)."""
    import torchvision

    from pytorch_quantizer.models import fold_batchnorm

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    images = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    if fold_bn:  # as the experiment does: on the CPU (float32 exactly, no TF32), then moved to the device
        model, pairs = fold_batchnorm(model, images[:2])
        print(f"  {len(pairs)} BatchNorm layers folded")
    model, images = model.to(device), images.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def forward() -> None:
        with torch.inference_mode():
            model(images)

    with tempfile.TemporaryDirectory() as tmp:
        with StatisticsCollector(model) as collector:
            forward()
        collector.save(Path(tmp) / "stats", {"arch": arch, "weights": None})
        stats = load_statistics(Path(tmp) / "stats")

    configs = {
        "W8A4": W8A4,
        "W8A4 torch backend": dataclasses.replace(W8A4, backend="torch"),
    }
    # Each case: what to attach around the forward (None: plain FP32).  attach()/detach() (weight
    # quantization, hook registration) stay outside the timed forward.
    cases: dict[str, Callable[[], object | None]] = {"FP32": lambda: None}
    for name, cfg in configs.items():
        quantizer = ActivationQuantizer(model, cfg, stats)
        cases[name] = lambda q=quantizer: q
    cases["collect statistics"] = lambda: StatisticsCollector(model)
    cases["collect, torch reductions"] = lambda: StatisticsCollector(model, fused=False)
    cases["collect + histogram"] = lambda: StatisticsCollector(model, observers=COLLECTED_OBSERVERS)

    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(repeats + 1):  # round 0 warms up
        for name, make in cases.items():
            hooks = make()
            if hooks is not None:
                hooks.attach()
            try:
                seconds = _time_once(forward, device)
            finally:
                if hooks is not None:
                    hooks.detach()
            if round_ > 0:
                times[name].append(seconds)

    print(f"  {arch}, batch {batch_size}, {device.type}: {repeats} interleaved rounds")
    _print_model_times(times)
    fp32 = statistics.median(times["FP32"])
    for name in ("W8A4", "collect statistics"):
        inside = statistics.median(_time_in_hooks(cases[name](), forward, device) for _ in range(3))
        print(f"  {name}: {inside * 1e3:.1f} ms inside the hooks per forward = {inside / fp32:.1%} of FP32's time")
    compiled = bench_compiled(model, images, stats, device, repeats) if compile_too else float("nan")
    return _ratio(times, "W8A4"), _ratio(times, "collect statistics"), compiled


def _ratio(times: dict[str, list[float]], name: str, base: str = "FP32") -> float:
    """Median over rounds of each round's time ratio: cases run back to back under the same machine load, so
    this is steadier on a shared machine than a ratio of medians."""
    return statistics.median(t / f for t, f in zip(times[name], times[base], strict=True))


def _print_model_times(times: dict[str, list[float]]) -> None:
    print(f"  {'case':24s} {'median ms':>10s} {'min ms':>9s} {'x FP32 (median of rounds)':>26s}")
    for name, ts in times.items():
        print(f"  {name:24s} {statistics.median(ts) * 1e3:10.1f} {min(ts) * 1e3:9.1f} {_ratio(times, name):26.3f}")


def bench_compiled(model: torch.nn.Module, images: torch.Tensor, stats, device: torch.device, repeats: int) -> float:
    """Eager FP32 against FP32 and W8A4 under torch.compile (quantization fused by Inductor); returns compiled W8A4
    over compiled FP32.  Two copies of the model, each compiled once: the quantizer stays attached to its copy."""
    quantized = copy.deepcopy(model)
    ActivationQuantizer(quantized, W8A4, stats).attach()
    torch.compiler.reset()
    runners = {"FP32": model, "FP32 compiled": compile_model(model), "W8A4 compiled": compile_model(quantized)}
    cases = {name: (lambda m=m: m(images)) for name, m in runners.items()}
    with torch.inference_mode():
        for name in ("FP32 compiled", "W8A4 compiled"):
            print(f"  {name}: first forward (compiling) {_time_once(cases[name], device):.1f} s")
        times = interleaved(cases, device, repeats)
    print(f"  torch.compile (Inductor, {device.type}): {repeats} interleaved rounds")
    _print_model_times(times)
    ratio = _ratio(times, "W8A4 compiled", "FP32 compiled")
    print(f"  W8A4 compiled / FP32 compiled = {ratio:.3f}")
    return ratio


def _time_in_hooks(hooks, forward: Callable[[], None], device: torch.device) -> float:
    """Seconds one forward spends in the forward hooks of ``hooks`` (a quantizer or collector), summed over its
    layers."""
    marks: list[tuple[object, object]] = []

    def now() -> object:
        if device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    hooks.attach()
    handles = []
    try:
        for layer in hooks.layers:  # first of the module's hooks, then last
            handles.append(layer.module.register_forward_hook(lambda *_: marks.append((now(), None)), prepend=True))
            handles.append(layer.module.register_forward_hook(lambda *_: marks.append((marks.pop()[0], now()))))
        forward()
        _sync(device)
    finally:
        for handle in handles:
            handle.remove()
        hooks.detach()
    if device.type == "cuda":
        return sum(start.elapsed_time(end) for start, end in marks) / 1e3
    return sum(end - start for start, end in marks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--arch", default="resnet18", help="torchvision model name (random weights)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224,
                        help="height and width of the random model input (smaller: faster smoke runs)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, all cores)")
    parser.add_argument("--numel", type=int, default=64 * 2**20, help="elements of the kernel benchmark tensor")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each kernel case")
    parser.add_argument("--calls", type=int, default=None,
                        help="back-to-back calls per timed kernel run (default: 10 on cuda, 1 on cpu)")
    parser.add_argument("--model-repeats", type=int, default=9, help="timed forwards of each model case")
    parser.add_argument("--part", choices=("all", "kernels", "model"), default="all")
    parser.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm layers (folded by default)")
    parser.add_argument("--compile", action="store_true",
                        help="also time FP32 and W8A4 under torch.compile (adds compiled_w8a4_overhead)")
    args = parser.parse_args(argv)
    if args.calls is not None and args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}")

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is available")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}; backends available: {', '.join(backends.available_backends())}")

    ratio = overhead = collect = compiled = float("nan")
    if args.part in ("all", "kernels"):
        print(f"Benchmark 1: GEMMLOWP {BITS}-bit fake quantization of {args.numel / 2**20:.0f}M float32 elements")
        calls = args.calls or (10 if device.type == "cuda" else 1)
        ratio = bench_kernels(device, args.numel, args.repeats, calls)
    if args.part in ("all", "model"):
        print("Benchmark 2: simulation overhead, W8A4 (statistics use mode) and statistics collection")
        overhead, collect, compiled = bench_model(
            device, args.arch, args.batch_size, args.model_repeats, fold_bn=not args.no_fold_bn,
            compile_too=args.compile, image_size=args.image_size,
        )
    last = f"copy_ratio={ratio:.3f} w8a4_overhead={overhead:.3f} collect_overhead={collect:.3f}"
    if args.compile:
        last += f" compiled_w8a4_overhead={compiled:.3f}"
    print(last)


if __name__ == "__main__":
    main()
