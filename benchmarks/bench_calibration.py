"""What does calibration cost: the shared pass with its observers, and each clipping method's range computation?

Benchmark (a), the pass: over the same images, the FP32 forward, the collect pass with the moments observer only,
and the collect pass with every registered observer (``observers.OBSERVERS``: a new observer, such as a histogram,
is included without touching this script); each as a ratio to the FP32 pass.  Runs are interleaved (each round runs
every case once), the ratio is the median over rounds of each round's ratio, so a noisy shared machine hurts every
case alike.  Benchmark (b), the methods: after one collect pass with every observer, each registered method whose
observers were collected computes its per-layer plan (``policy.plan_layers`` at ``--bits``), median of
``--repeats`` timings, and its ratio to ``laplace``'s.  Warm: a method's first call, which may solve and cache
constants (``clipping.optimal_alpha``), is left out of the median.

Images: ``--data DIR`` (an ImageNet-layout root: ``DIR/val/<wnid>/*``, ``--images`` of them, decoded once with the
model's preprocessing), or random images otherwise.  Output: a table on stdout, also written to
``benchmarks/logs/bench_calibration_<arch>.txt``; the last line is machine-readable:
``moments_overhead=X all_observers_overhead=Y`` followed by `` <method>_vs_laplace=R`` for each method.

    python benchmarks/bench_calibration.py [--arch mobilenet_v2] [--weights PATH] [--data DIR] [--images 64]
                                           [--batch-size 32] [--bits 4] [--rounds 3] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext, redirect_stdout
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pytorch_quantizer.data import deterministic_subset, imagenet_val_dataset  # noqa: E402
from pytorch_quantizer.layers import activation_layers  # noqa: E402
from pytorch_quantizer.methods import get_method, method_names  # noqa: E402
from pytorch_quantizer.models import build_model, fold_batchnorm  # noqa: E402
from pytorch_quantizer.observers import OBSERVERS  # noqa: E402
from pytorch_quantizer.policy import layer_policy, plan_layers  # noqa: E402
from pytorch_quantizer.quant_config import ActivationConfig, QuantConfig  # noqa: E402
from pytorch_quantizer.stats import StatisticsCollector, load_statistics  # noqa: E402

LOGS = Path(__file__).resolve().parent / "logs"


def batches(args: argparse.Namespace, preprocess) -> list[torch.Tensor]:
    """The images every case runs over, already decoded and normalised (so decoding is in no case's time)."""
    if args.data is None:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(args.images, *preprocess.input_size, generator=generator)
    else:
        dataset = deterministic_subset(imagenet_val_dataset(args.data, preprocess.decode_transform()), args.images)
        normalize = preprocess.normalize_transform()
        images = torch.stack([normalize(dataset[i][0]) for i in range(len(dataset))])
    return list(images.split(args.batch_size))


def time_pass(model: torch.nn.Module, data: list[torch.Tensor], observers: tuple[str, ...] | None) -> float:
    """Seconds of one pass over ``data``: plain FP32 (``observers`` None) or feeding those observers."""
    collector = StatisticsCollector(model, observers=observers) if observers is not None else nullcontext()
    start = time.perf_counter()
    with torch.inference_mode(), collector:
        for images in data:
            model(images)
    return time.perf_counter() - start


def bench_pass(model, data, rounds: int) -> dict[str, float]:
    """Median ratio to FP32 of each collect case (interleaved rounds, one warm-up round)."""
    cases = {"FP32": None, "moments": ("moments",), "all observers": tuple(OBSERVERS)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(rounds + 1):
        for name, observers in cases.items():
            seconds = time_pass(model, data, observers)
            if round_:
                times[name].append(seconds)
    print(f"(a) one pass over {sum(len(b) for b in data)} images, median of {rounds} interleaved rounds")
    print(f"    observers: all = {', '.join(cases['all observers'])}")
    ratios = {}
    for name, seconds in times.items():
        ratio = statistics.median(s / f for s, f in zip(seconds, times["FP32"], strict=True))
        ratios[name] = ratio
        print(f"    {name:<14} {statistics.median(seconds):8.3f} s   {ratio:6.3f}x FP32")
    return ratios


def bench_methods(model, data, bits: int, repeats: int) -> dict[str, float]:
    """Median seconds of each method's plan over all layers, after one collect pass with every observer."""
    layers = activation_layers(model)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        with StatisticsCollector(model, observers=tuple(OBSERVERS)) as collector:
            for images in data:
                model(images)
        stats = load_statistics(collector.save(Path(tmp) / "stats", {"arch": "bench"}))
        usable = [m for m in method_names() if set(get_method(m).requires) <= set(stats.observers)]
        seconds = {}
        for method in usable:
            specs = layer_policy(QuantConfig(act=ActivationConfig(bits=bits, method=method)), layers).specs(layers)
            runs = []
            for _ in range(repeats + 1):  # the first (cold) call is left out
                start = time.perf_counter()
                plan_layers(layers, stats, specs)
                runs.append(time.perf_counter() - start)
            seconds[method] = statistics.median(runs[1:])
    base = seconds.get("laplace", float("nan"))
    print(f"(b) range computation over all {len(layers)} layers at {bits} bits, median of {repeats} (warm)")
    for method, value in seconds.items():
        print(f"    {method:<14} {value * 1e3:9.3f} ms   {value / base:7.2f}x laplace")
    return {m: v / base for m, v in seconds.items()}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--weights", default="none", help="torchvision weights name, a state_dict path, or none")
    parser.add_argument("--data", type=Path, default=None, help="ImageNet-layout root (DIR/val/<wnid>/*)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="timed interleaved rounds of benchmark (a)")
    parser.add_argument("--repeats", type=int, default=5, help="timed plans per method in benchmark (b)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--log", type=Path, default=None, help="default: benchmarks/logs/bench_calibration_ARCH.txt")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        model, preprocess = build_model(args.arch, args.weights)
        example = torch.randn(2, *preprocess.input_size, generator=torch.Generator().manual_seed(0))
        model = fold_batchnorm(model, example)[0].eval()
        data = batches(args, preprocess)
        source = args.data or "random images"
        print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; {args.arch} ({args.weights}), "
              f"BatchNorm folded, {source}, batch {args.batch_size}")
        passes = bench_pass(model, data, args.rounds)
        methods = bench_methods(model, data, args.bits, args.repeats)
        last = f"moments_overhead={passes['moments']:.3f} all_observers_overhead={passes['all observers']:.3f}"
        last += "".join(f" {m}_vs_laplace={r:.3f}" for m, r in methods.items())
        print(last)
    text = buffer.getvalue()
    sys.stdout.write(text)
    log = args.log or LOGS / f"bench_calibration_{args.arch}.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(text)
    return text


if __name__ == "__main__":
    main()
