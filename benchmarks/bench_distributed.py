"""What does torchrun buy, and what does its path cost?  Images/s of one FP32 evaluation pass of
``inference_sim.py`` in one process and under ``torchrun``, side by side in one run.

CPU (always): the same number of cores used in every case that compares processes: 1 process x T threads
against T processes x 1 thread (T = ``--cores``, default all cores of the machine), plus 1 process x 1 thread
(what one core does alone).  Each process's threads are set with ``OMP_NUM_THREADS`` (torchrun would set 1 anyway).
GPU (only when CUDA is present): 1 GPU in a plain process against the same run through ``torchrun
--nproc_per_node 1`` (process group, sharding and the per-pass status exchange and count reduction: the
overhead of the distributed path); ``--gpus N`` > 1 adds torchrun on N GPUs.

The rate is ``images / seconds`` of the results row the driver appends: the pass alone (rank 0's, which ends
after the slowest rank, at the count reduction), not the start-up of Python, the model or the process group.
Cases are interleaved over ``--rounds`` rounds and the median is kept, so a noisy shared machine hurts all alike.
Images are random JPEGs in an ImageFolder written to a temporary folder (decoding is part of the pass).
The last line is machine-readable: ``cpu_speedup=S`` (T processes over 1 process, same cores) and, with a GPU,
``gpu_torchrun_overhead=X`` (torchrun 1 process time over plain).

    python benchmarks/bench_distributed.py [--arch resnet18] [--images 96] [--batch-size 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
WNIDS = ["n01440764", "n01443537", "n02085620", "n04599235"]


def make_images(root: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "val" / WNIDS[i % len(WNIDS)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(256, 320, 3), dtype=np.uint8)).save(folder / f"img_{i}.JPEG")
    return root


def run_case(nproc: int | None, threads: int, flags: list[str], out: Path) -> float:
    """Seconds of the pass (the results row), one launch; nproc None: a plain process."""
    results = out / "results.csv"
    results.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    prefix = [sys.executable]
    if nproc is not None:
        prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*prefix, str(ROOT / "inference_sim.py"), *flags, "--results", str(results)], cwd=out,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"case failed ({nproc} processes): {proc.stderr.strip().splitlines()[-1:]}")
    return float(pd.read_csv(results)["seconds"].iloc[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--images", type=int, default=96, help="CPU images (default: 96)")
    p.add_argument("--gpu-images", type=int, default=2048, help="GPU images (default: 2048)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--gpu-batch-size", type=int, default=128)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores the CPU cases share")
    p.add_argument("--gpus", type=int, default=1, help="GPUs for an extra torchrun case (> 1)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU cases")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        summary = []
        if not args.no_cpu:
            data = make_images(tmp / "cpu", args.images)
            flags = ["--data", str(data), "-a", args.arch, "--weights", "none", "-b", str(args.batch_size), "-j", "0",
                     "--device", "cpu"]
            cores = args.cores
            cases = {f"1 process x {cores} threads": (None, cores), f"{cores} processes x 1 thread": (cores, 1),
                     "1 process x 1 thread": (None, 1)}
            times = _rounds(cases, flags, tmp, args.rounds)
            print(f"CPU, {args.arch}, {args.images} images, -b {args.batch_size}, {cores} cores "
                  f"(median of {args.rounds} rounds):")
            for name, seconds in times.items():
                print(f"  {name:28s} {args.images / seconds:8.1f} images/s  ({seconds:.2f} s)")
            speedup = times[f"1 process x {cores} threads"] / times[f"{cores} processes x 1 thread"]
            summary.append(f"cpu_speedup={speedup:.3f}")
        if torch.cuda.is_available():
            data = make_images(tmp / "gpu", args.gpu_images)
            flags = ["--data", str(data), "-a", args.arch, "--weights", "none", "-b", str(args.gpu_batch_size),
                     "-j", "4", "--device", "cuda"]
            cases = {"1 GPU, plain process": (None, 4), "1 GPU, torchrun 1 process": (1, 4)}
            if args.gpus > 1:
                cases[f"{args.gpus} GPUs, torchrun"] = (args.gpus, 4)
            times = _rounds(cases, flags, tmp, args.rounds)
            print(f"GPU ({torch.cuda.get_device_name(0)}), {args.arch}, {args.gpu_images} images, "
                  f"-b {args.gpu_batch_size}:")
            for name, seconds in times.items():
                print(f"  {name:28s} {args.gpu_images / seconds:8.1f} images/s  ({seconds:.2f} s)")
            overhead = times["1 GPU, torchrun 1 process"] / times["1 GPU, plain process"]
            summary.append(f"gpu_torchrun_overhead={overhead:.3f}")
        print(" ".join(summary))


def _rounds(cases: dict[str, tuple[int | None, int]], flags: list[str], out: Path, rounds: int) -> dict[str, float]:
    """Median pass seconds per case, the cases interleaved in every round."""
    seen: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (nproc, threads) in cases.items():
            seen[name].append(run_case(nproc, threads, flags, out))
    return {name: statistics.median(values) for name, values in seen.items()}


if __name__ == "__main__":
    main()
