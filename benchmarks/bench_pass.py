"""What does each kind of pass of the driver cost against a plain torchvision evaluation loop over the same images?

A plain loop is the reference ``evaluate()`` of torchvision's ``references/classification``: an ``ImageFolder`` with
the model's standard transforms, a ``DataLoader``, the model, top-1 / top-5 counted.  Each case runs the whole pass
through ``inference_sim.main`` in this process (argument parsing, model build, BatchNorm folding, data loading,
hooks, the forward passes, the results row): what a user pays for a pass, without the interpreter's and torch's
start-up, which both sides would pay alike.  The plain loop builds its model inside its time too.

Cases (``--cases``, default all): ``fp32`` (no quantization); ``collect`` (``-sm collect --observers moments``),
``collect_hist`` (moments + histogram, what ``-sm collect`` gathers by default), ``collect_pc`` (``-pcq_a``:
per-channel moments beside the per-tensor ones); the W8A4 use passes ``w8a4`` (``-th laplace``), ``w8a4_pcw``,
``w8a4_pcq_a``, ``w8a4_hr`` and ``w8a4_input`` (``--act_point input``); ``compare`` (``--compare`` of
``--compare-methods`` at ``--compare-widths``, FP32 included: one calibration folder, images decoded once).  The
statistics the use passes read are collected once beforehand, untimed.

The images: ``--images`` drawn with seed 0 from ``--data``'s val folder (``data.deterministic_subset``), linked
into a temporary ImageNet layout that every case and the plain loop read (the collects through ``--cal-data``, so
that the use passes evaluate all of them).  Rounds are interleaved (each round runs the plain loop and every case
once, after one untimed warm-up round); a case's ratio is the median over rounds of its time over that round's
plain loop, so a busy machine slows both sides alike.  The machine's load average is printed at the start and the
end: ratios from a loaded machine are noisy, and the lines say so.

Time split: the DataLoader alone (decode and transform, no model) and the forward alone (the model over batches
decoded beforehand) give the plain loop's shares; a case's time beyond ``fp32`` is what it adds (hooks,
quantization, statistics, files).

Output: a table on stdout, also written to ``--log`` (default ``benchmarks/logs/bench_pass_<arch>.txt``); the
last line is machine-readable: ``plain_s=S decode_share=D <case>=<ratio to the plain loop> ...``.

    python benchmarks/bench_pass.py --data ../shared/data/imagenet-sample --arch mobilenet_v2 --images 64 \\
        --batch-size 32 --workers 2 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

LOGS = Path(__file__).resolve().parent / "logs"
PROG = "bench_pass.py"
USE = ["--qtype", "int4", "-qw", "int8", "-sm", "use", "-th", "laplace"]
CASES: dict[str, list[str]] = {
    "fp32": [],
    "collect": ["-sm", "collect", "--observers", "moments"],
    "collect_hist": ["-sm", "collect", "--observers", "moments,histogram"],
    "collect_pc": ["-sm", "collect", "-pcq_a"],
    "w8a4": USE,
    "w8a4_pcw": [*USE, "-pcw"],
    "w8a4_pcq_a": [*USE, "-pcq_a"],
    "w8a4_hr": [*USE, "-hr"],
    "w8a4_input": [*USE, "--act_point", "input"],
    "compare": [],  # built from --compare-methods and --compare-widths
}
# the statistics folder each use case reads, and how it is collected (once, untimed)
STATS_FOR = {"w8a4": "tensor", "w8a4_pcw": "tensor", "w8a4_hr": "tensor", "compare": "tensor",
             "w8a4_pcq_a": "channel", "w8a4_input": "input"}
COLLECT_FOR = {"tensor": ["-sm", "collect"], "channel": ["-sm", "collect", "-pcq_a"],
               "input": ["-sm", "collect", "--act_point", "input"]}
COMPARE_METHODS = "no,laplace,gaus,mix,minmax,laplace-grid,gaus-grid,mse,kld,p99.99,mix-measured"
COMPARE_WIDTHS = "int4,int6,int8"


class BenchError(ValueError):
    """Bad input: one line and exit 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message}\n")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="ImageNet-layout root (DIR/val/<wnid>/*)")
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--weights", default="none", help="torchvision weights name, a state_dict path, or none")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timed interleaved rounds (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every pass runs")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of: {', '.join(CASES)}")
    parser.add_argument("--compare-methods", default=COMPARE_METHODS)
    parser.add_argument("--compare-widths", default=COMPARE_WIDTHS)
    parser.add_argument("--log", type=Path, default=None, help="default: benchmarks/logs/bench_pass_ARCH.txt")
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown or not args.cases:
        parser.error(f"unknown case(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(CASES)}")
    for flag in ("images", "batch_size", "rounds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible to torch")
    if args.workers < 0:
        parser.error(f"--workers must be at least 0, got {args.workers}")
    if not (args.data / "val").is_dir():
        parser.error(f"no ImageNet-layout folder {args.data / 'val'} (--data DIR needs DIR/val/<wnid>/*)")
    from pytorch_quantizer.models import available_archs

    if args.arch not in available_archs():
        parser.error(f"unknown network {args.arch!r} (see inference_sim.py --help for the list)")
    return args


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    cores = os.cpu_count() or 1
    note = "idle" if one < 0.25 * cores else "LOADED: ratios are noisy" if one > 0.75 * cores else "partly loaded"
    return f"{one:.2f} {five:.2f} {fifteen:.2f} on {cores} cores ({note})"


def link_images(args: argparse.Namespace, root: Path) -> int:
    """Link the chosen images into ``root/val/<wnid>/`` (evaluation) and ``root/cal/<wnid>/`` (collects)."""
    from pytorch_quantizer.data import deterministic_subset, imagenet_val_dataset

    dataset = imagenet_val_dataset(args.data)
    subset = deterministic_subset(dataset, args.images)
    for index in subset.indices:
        path = Path(dataset.samples[index][0])
        for kind in ("val", "cal"):
            folder = root / kind / path.parent.name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / path.name).symlink_to(path.resolve())
    return len(subset)


class Plain:
    """torchvision's reference evaluation: ImageFolder + standard transforms, DataLoader, model, top-k."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args, self.root = args, root

    def _model(self):
        from pytorch_quantizer.models import build_model

        model, preprocess = build_model(self.args.arch, self.args.weights)
        return model.to(self.args.device).eval(), preprocess

    def _loader(self, transform) -> torch.utils.data.DataLoader:
        from torchvision.datasets import ImageFolder

        from pytorch_quantizer.data import imagenet_wnids

        dataset = ImageFolder(str(self.root / "val"), transform=transform)
        # the linked folder holds some of the 1000 classes: map its class index to ImageNet's, as a full val has
        wnids = imagenet_wnids()
        dataset.target_transform = {i: wnids.index(c) for i, c in enumerate(dataset.classes)}.__getitem__
        return torch.utils.data.DataLoader(dataset, batch_size=self.args.batch_size, shuffle=False,
                                           num_workers=self.args.workers, pin_memory=self.args.device == "cuda")

    def evaluate(self) -> float:
        """The whole pass (model build included); returns top-1 (%), which the driver's FP32 pass must match."""
        model, preprocess = self._model()
        correct = total = 0
        with torch.inference_mode():
            for images, target in self._loader(preprocess.transform()):
                output = model(images.to(self.args.device, non_blocking=True)).cpu()
                top5 = output.topk(min(5, output.shape[1]), dim=1).indices
                correct += int((top5[:, 0] == target).sum())
                total += len(target)
        return 100.0 * correct / max(total, 1)

    def split(self) -> tuple[float, float]:
        """Seconds of the DataLoader alone (decode, resize, crop, normalise) and of the forward alone."""
        model, preprocess = self._model()
        start = time.perf_counter()
        batches = [images.to(self.args.device) for images, _ in self._loader(preprocess.transform())]
        decode = time.perf_counter() - start
        start = time.perf_counter()
        with torch.inference_mode():
            for images in batches:
                model(images)
        if self.args.device == "cuda":
            torch.cuda.synchronize()
        return decode, time.perf_counter() - start


def driver(argv: list[str], workdir: Path) -> None:
    """One whole pass through inference_sim.main, in ``workdir`` (its results files land there); its output is
    kept unless it fails, then its last line is the error."""
    import inference_sim

    out, err = io.StringIO(), io.StringIO()
    cwd = Path.cwd()
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _quiet_logging():
            code = inference_sim.main(argv)
    finally:
        os.chdir(cwd)
    if code:
        lines = (err.getvalue() or out.getvalue()).strip().splitlines() or ["(no output)"]
        raise BenchError(f"the pass {' '.join(argv)} failed: {lines[-1]}")


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """The driver logs each pass at INFO; a benchmark of dozens of passes keeps warnings only."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)


def case_argv(args: argparse.Namespace, case: str, root: Path, stats: dict[str, Path], run: int) -> list[str]:
    common = ["--data", str(root), "-a", args.arch, "--weights", args.weights, "-b", str(args.batch_size),
              "-j", str(args.workers), "--device", args.device, "--results", str(root / "results.csv")]
    extra = list(CASES[case])
    if case.startswith("collect"):
        extra += ["--cal-data", str(root / "cal"), "-sf", str(root / "collected" / f"{case}-{run}")]
    if case == "compare":
        extra = ["--compare", args.compare_methods, "--qtype", args.compare_widths, "-sm", "use"]
    if case in STATS_FOR:
        extra += ["-sf", str(stats[STATS_FOR[case]])]
    return common + extra


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def run(args: argparse.Namespace, root: Path, say: Callable[[str], None]) -> str:
    count = link_images(args, root)
    plain = Plain(args, root)
    stats = {kind: root / "stats" / kind for kind in {STATS_FOR[c] for c in args.cases if c in STATS_FOR}}
    common = case_argv(args, "fp32", root, {}, 0)
    for kind, folder in stats.items():
        driver([*common, *COLLECT_FOR[kind], "--cal-data", str(root / "cal"), "-sf", str(folder)], root)
    passes = 1 + len(args.compare_methods.split(",")) * len(args.compare_widths.split(","))
    times: dict[str, list[float]] = {name: [] for name in ["plain", *args.cases]}
    top1: list[float] = []
    for round_ in range(args.rounds + 1):  # round 0 warms up (kernel builds, file caches, workers)
        results = {"plain": timed(lambda: top1.append(plain.evaluate()))}
        for case in args.cases:
            argv = case_argv(args, case, root, stats, round_)
            results[case] = timed(lambda argv=argv: driver(argv, root))
        if round_:
            for name, seconds in results.items():
                times[name].append(seconds)
    decode, forward = plain.split()
    plain_s = statistics.median(times["plain"])
    ratios = {case: statistics.median(t / p for t, p in zip(times[case], times["plain"], strict=True))
              for case in args.cases}
    say(f"{count} images on {args.device}, batch {args.batch_size}, {args.workers} workers, "
        f"{torch.get_num_threads()} threads; "
        f"{args.arch} ({args.weights}); median of {args.rounds} interleaved rounds")
    say(f"plain torchvision loop: {plain_s:.3f} s; decode/transform alone {decode:.3f} s and forward alone "
        f"{forward:.3f} s (decode share {decode / (decode + forward):.2f})")
    fp32 = statistics.median(times["fp32"]) if "fp32" in times else None
    say(f"{'case':<14} {'seconds':>9} {'x plain':>8} {'x fp32':>8}")
    for case in args.cases:
        seconds = statistics.median(times[case])
        versus = f"{seconds / fp32:8.3f}" if fp32 else f"{'-':>8}"
        say(f"{case:<14} {seconds:9.3f} {ratios[case]:8.3f} {versus}")
    if "fp32" in args.cases:
        import pandas as pd

        rows = pd.read_csv(root / "results.csv")
        driver_top1 = float(rows.loc[rows["qtype"] == "fp32", "top1"].iloc[-1])
        verdict = "the same" if abs(driver_top1 - top1[-1]) < 1e-6 else "DIFFERENT: not the same images or crops?"
        say(f"top-1 on these images: plain loop {top1[-1]:.2f} %, driver FP32 {driver_top1:.2f} % ({verdict})")
    if "compare" in args.cases:
        bound = decode + passes * forward
        say(f"compare ran {passes} pass(es) (FP32 + {passes - 1} quantized) in "
            f"{statistics.median(times['compare']):.3f} s; one decode + {passes} forwards alone would be "
            f"{bound:.3f} s (ratio {statistics.median(times['compare']) / bound:.2f})")
    last = f"plain_s={plain_s:.3f} decode_share={decode / (decode + forward):.3f}"
    return last + "".join(f" {case}={ratios[case]:.3f}" for case in args.cases)


def main(argv: Sequence[str] | None = None) -> str:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines: list[str] = []

    def say(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    say(f"load average at start: {load_average()}")
    try:
        with tempfile.TemporaryDirectory(prefix="bench_pass_") as tmp:
            last = run(args, Path(tmp), say)
    except (BenchError, ValueError, OSError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    say(f"load average at end: {load_average()}")
    say(last)
    text = "\n".join(lines) + "\n"
    log = args.log or LOGS / f"bench_pass_{args.arch}.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    partial = log.with_name(log.name + ".partial")
    partial.write_text(text)
    partial.replace(log)
    return text


if __name__ == "__main__":
    main()
