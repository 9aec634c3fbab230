"""What one calibration pass costs on real images: the FP32 pass over the calibration images, the same pass with
the moments observer, and with moments + histogram (what ``-sm collect`` gathers), side by side in one run.

Decoded images are cached first, so every pass sees the same tensors and none pays for JPEG decoding; the
passes are interleaved (each round runs every case once) and each case's ratio to FP32 is the median over rounds
of that round's ratio.  Then the time each method's range computation takes over all layers, from the
collected folder, at ``--bits``.

    python benchmarks/bench_collect.py --data ../shared/data/imagenet-sample -a mobilenet_v2 \\
        --weights ../shared/data/weights/mobilenet_v2_tflite_quant.pth -cs 100 [--rounds 3] [--bits 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytorch_quantizer.experiment import Experiment, RunConfig  # noqa: E402
from pytorch_quantizer.methods import get_method  # noqa: E402
from pytorch_quantizer.stats import COLLECTED_OBSERVERS, StatisticsCollector, load_statistics  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("-a", "--arch", default="mobilenet_v2")
    p.add_argument("--weights", default="DEFAULT")
    p.add_argument("-cs", "--cal_set_size", type=int, default=100)
    p.add_argument("-b", "--batch-size", type=int, default=25)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--methods", default="no,laplace,gaus,mix,3std,p99.99,mse,kld,mix-measured")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(data=args.data, arch=args.arch, weights=args.weights, batch_size=args.batch_size,
                        workers=0, stats_mode="collect", cal_set_size=args.cal_set_size, cache=True,
                        stats_folder=Path(tmp) / "stats", print_freq=0)
        exp = Experiment(cfg)
        loader = exp.loader(calibration=True, passes=2)
        exp.run_pass(loader, "warm-up (decode and cache)")
        cases = {"FP32": (), "moments": ("moments",), "moments + histogram": COLLECTED_OBSERVERS}
        times: dict[str, list[float]] = {name: [] for name in cases}
        collector = None
        for _ in range(args.rounds):
            for name, observers in cases.items():
                if not observers:
                    times[name].append(exp.run_pass(loader, name)[1])
                    continue
                collector = StatisticsCollector(exp.model, observers=observers)
                with collector:
                    times[name].append(exp.run_pass(loader, name)[1])
        print(f"{args.arch}, {len(exp.calibration)} calibration images, batch {args.batch_size}, "
              f"{args.rounds} interleaved rounds")
        for name, ts in times.items():
            ratio = statistics.median(t / f for t, f in zip(ts, times["FP32"], strict=True))
            print(f"  {name:22s} median {statistics.median(ts):7.2f} s   x FP32 {ratio:.3f}")
        collector.save(Path(tmp) / "stats", exp.model_meta())
        stats = load_statistics(Path(tmp) / "stats")
        observations = [stats.observation(name) for name in stats.layer_names]
        print(f"range computation over {len(observations)} layers at {args.bits} bits (after the pass):")
        for name in args.methods.split(","):
            method = get_method(name)
            start = time.perf_counter()
            for obs in observations:
                method.grid(obs, args.bits)
            print(f"  {name:14s} {(time.perf_counter() - start) * 1e3:9.1f} ms")


if __name__ == "__main__":
    main()
