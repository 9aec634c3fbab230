"""A peer library on the same work: Brevitas's post-training recipe beside ours, on the same images.

Same network (``--arch``, ``--weights``; built by our ``models.build_model``, torchvision preprocessing), the same
calibration images (``--cal-data DIR -cs N --seed S`` picks them through our ``data.seeded_calibration``, the
function ``inference_sim.py`` itself uses, so both sides calibrate on the very same photos) and the same evaluation
images (``--data``'s val, all of them or ``--subset M`` through ``data.seeded_evaluation``, as ``inference_sim.py
--subset M`` picks them).  Why a script and not a test: one width takes minutes on two cores, and the numbers are the
point, not a pass/fail.

The peer (Brevitas, the ``peer`` extra: ``pip install -e ".[peer]"``), per width: its ``preprocess_for_quantize``
(BatchNorm merge, graph equalization with bias merge; ReLU6 kept unless ``--relu6-to-relu``: its default swaps them
for ReLU, which changes this network's float function, so the FP32 row shows what the swap costs), the
``layerwise`` backend (per-channel symmetric weights, asymmetric activations at every conv/linear input, first conv
and classifier at 8 bits, int32 biases), activation calibration, then nearest rounding (the default), learned
rounding (AdaRound's rectified sigmoid, ``--peer-round learned``) or GPTQ (``--peer-round gptq``), then bias
correction.  Why nearest by default: on 2 shared cores Brevitas 0.13.4's learned rounding fails with accelerate 1.16
and its GPTQ took 570 s for 16 calibration images (docs/benchmarks.md).

Ours, per width: ``inference_sim.py`` as subprocesses, one ``-sm collect`` of the calibration images into a temporary
statistics folder (shared by every width, as a study shares it) and one ``-sm use`` run per width with ``--ours``'s
flags; the top-1 from `` * Prec@1`` and the results row, the calibration seconds = the collect pass's ``seconds`` +
the ``-bca`` measurement the use run logs.  Every accuracy carries its binomial standard error
100*sqrt(p(1-p)/n).  Output: a table on stdout and in the log (default
``benchmarks/logs/bench_peer_<arch>.txt``, written whole at the end, atomically); the last line is machine-readable:
``images=N`` then ``<side>_<width>_top1=X <side>_<width>_se=E <side>_<width>_cal_s=S`` for each cell.

    python benchmarks/bench_peer.py --weights ../shared/data/weights/mobilenet_v2_tflite_quant.pth \\
        --cal-data ../shared/data/imagenet-sample/val -cs 256 --data ../shared/data/imagenet-val-2k \\
        [--subset 64] [--widths W8A8,W4A8,W8A4,W4A4] [--peer-round learned|gptq|none] [--learned-round-iters N]
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: Brevitas's example loops draw progress bars

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from pytorch_quantizer.atomic import atomic_write  # noqa: E402
from pytorch_quantizer.data import (  # noqa: E402
    DataError,
    imagenet_val_dataset,
    seeded_calibration,
    seeded_evaluation,
    wnid_folder_dataset,
)
from pytorch_quantizer.models import ModelError, Preprocess, build_model  # noqa: E402

LOGS = ROOT / "benchmarks" / "logs"
PEER_EXTRA = "peer"
OURS_DEFAULT = "-th laplace -hr -pcw -bcw -bca --equalize --float_bias"
WIDTH = re.compile(r"^W(\d+)A(\d+)$")
PREC = re.compile(r"^ \* Prec@1 ([\d.]+) Prec@5 ([\d.]+)$", re.M)
BCA_SECONDS = re.compile(r"-bca: mean shifts of \d+ layers measured on \d+ images in ([\d.]+) s")


class Width(NamedTuple):
    """A weight/activation width pair, written ``W<w>A<a>`` as in the issue's tables.  (NamedTuples, not
    dataclasses, in this script: the tests load it as a module that ``sys.modules`` does not hold.)"""

    weight: int
    act: int

    @property
    def name(self) -> str:
        return f"W{self.weight}A{self.act}"


class Cell(NamedTuple):
    """One side's result for one width: top-1 (%) over ``images`` and its calibration seconds."""

    top1: float
    images: int
    cal_seconds: float

    @property
    def se(self) -> float:
        """Binomial standard error of the top-1, in points: 100*sqrt(p(1-p)/n)."""
        p = self.top1 / 100
        return 100 * math.sqrt(p * (1 - p) / self.images) if self.images else float("nan")


def parse_widths(text: str) -> list[Width]:
    """``W8A8,W4A4`` -> widths; ``none``: the FP32 rows only (what a preparation alone does to the float network);
    argparse turns the ArgumentTypeError into one line and exit 2."""
    if text.strip() == "none":
        return []
    widths = []
    for item in text.split(","):
        match = WIDTH.match(item.strip())
        if match is None or not all(2 <= int(b) <= 8 for b in match.groups()):
            raise argparse.ArgumentTypeError(f"{item!r} is not a width like W4A8 (2 to 8 bits each)")
        widths.append(Width(int(match[1]), int(match[2])))
    return widths


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--weights", required=True, help="torchvision weights name or a state_dict path")
    parser.add_argument("--cal-data", type=Path, required=True, help="calibration folder DIR/<wnid>/* (train photos)")
    parser.add_argument("-cs", "--cal-size", type=positive, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, required=True, help="evaluation root, DIR/val/<wnid>/*")
    parser.add_argument("--subset", type=positive, default=None, help="evaluate on M images (default: all)")
    parser.add_argument("--widths", type=parse_widths, default=parse_widths("W8A8,W4A8,W8A4,W4A4"),
                        help="comma list of W<bits>A<bits>, or none for the FP32 rows only")
    parser.add_argument("--peer-round", choices=("learned", "gptq", "none"), default="none",
                        help="the peer's weight rounding after calibration, then bias correction (default none: "
                             "its learned rounding fails with accelerate 1.16, and its GPTQ runs the network once "
                             "per layer, 570 s for 16 images on 2 loaded cores; docs/benchmarks.md)")
    parser.add_argument("--learned-round-iters", type=positive, default=200,
                        help="learned-rounding iterations per layer (Brevitas's default is 1000)")
    parser.add_argument("--learned-round-batch", type=positive, default=8)
    parser.add_argument("--graph-eq-iterations", type=int, default=20)
    parser.add_argument("--relu6-to-relu", action="store_true",
                        help="let Brevitas replace ReLU6 by ReLU (its default; changes the float network)")
    parser.add_argument("--ours", default=OURS_DEFAULT, help=f"our flags for every width (default: {OURS_DEFAULT})")
    parser.add_argument("--sides", choices=("both", "peer", "ours"), default="both")
    parser.add_argument("-b", "--batch-size", type=positive, default=64)
    parser.add_argument("--threads", type=positive, default=1,
                        help="torch threads, here and in our runs (default 1: on a loaded machine 2 OpenMP threads "
                             "wait for each other, docs/benchmarks.md)")
    parser.add_argument("--log", type=Path, default=None, help="default: benchmarks/logs/bench_peer_ARCH.txt")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Arguments, with the folders checked before anything runs (a bad one: one line, exit 2, nothing written)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, folder in (("--cal-data", args.cal_data), ("--data", args.data / "val")):
        if not folder.is_dir():
            parser.error(f"{flag}: {folder} is not a directory")
    if args.sides != "ours":
        require_peer()
    return args


def fail(message: str) -> None:
    """Bad input: one line on stderr and exit 2, before anything is written."""
    print(f"bench_peer: {message}", file=sys.stderr)
    sys.exit(2)


def require_peer() -> None:
    """Brevitas (and accelerate, which its learned rounding imports) or one line and exit 2."""
    try:
        import accelerate  # noqa: F401
        import brevitas  # noqa: F401
    except ImportError as exc:
        fail(f"{exc.name} is missing: install the '{PEER_EXTRA}' extra, pip install -e \".[{PEER_EXTRA}]\"")


# -- images ------------------------------------------------------------------------------------------------------
class Images(NamedTuple):
    """Decoded uint8 crops and their labels, normalized batch by batch (decoding is done once for every cell)."""

    pixels: torch.Tensor
    labels: torch.Tensor
    preprocess: Preprocess

    def batches(self, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        normalize = self.preprocess.normalize_transform()
        return [(normalize(p), t) for p, t in zip(self.pixels.split(size), self.labels.split(size), strict=True)]


def decode(dataset, indices: list[int], preprocess: Preprocess) -> Images:
    dataset.transform = preprocess.decode_transform()
    items = [dataset[i] for i in indices]
    return Images(torch.stack([p for p, _ in items]), torch.tensor([t for _, t in items]), preprocess)


def image_sets(args: argparse.Namespace, preprocess: Preprocess) -> tuple[Images, Images]:
    """The calibration and evaluation images that ``inference_sim.py --cal-data -cs --seed --data --subset`` use."""
    cal = wnid_folder_dataset(args.cal_data, what="--cal-data folder")
    val = imagenet_val_dataset(args.data)
    cal_indices = seeded_calibration(len(cal), args.cal_size, args.seed)
    eval_indices = seeded_evaluation(len(val), args.seed, set(), args.subset)
    return decode(cal, cal_indices, preprocess), decode(val, eval_indices, preprocess)


@torch.no_grad()
def top1(model: torch.nn.Module, images: Images, batch_size: int, quantized: bool = False) -> float:
    """Top-1 (%) of ``model`` on ``images``; a Brevitas model (``quantized``) under its ``quant_inference_mode``,
    which caches the weights' quantization (a third faster on these cores, same function)."""
    model.eval()
    hits = 0
    batches = images.batches(batch_size)
    context = nullcontext()
    if quantized:
        from brevitas.export.inference import quant_inference_mode

        context = quant_inference_mode(model)
    with context:
        if quantized:
            model(batches[0][0][:2])  # the mode records its cached quantizers on a first forward
        for x, t in batches:
            hits += int((model(x).argmax(1) == t).sum())
    return 100 * hits / len(images.labels)


# -- the peer ----------------------------------------------------------------------------------------------------
def peer_float(args: argparse.Namespace, model: torch.nn.Module) -> torch.nn.Module:
    """Brevitas's graph preparation: trace, BatchNorm merge, graph equalization (with bias merge)."""
    from brevitas.graph.quantize import preprocess_for_quantize

    return preprocess_for_quantize(copy.deepcopy(model), equalize_iters=args.graph_eq_iterations,
                                   equalize_merge_bias=True, merge_bn=True, relu6_to_relu=args.relu6_to_relu)


def peer_quantize(args: argparse.Namespace, float_model: torch.nn.Module, width: Width, cal: Images) -> torch.nn.Module:
    """The peer's recipe at ``width`` through the functions of Brevitas's own ImageNet PTQ example."""
    from brevitas_examples.imagenet_classification.ptq import ptq_common as ptq

    model = ptq.quantize_model(
        copy.deepcopy(float_model), backend="layerwise", weight_bit_width=width.weight, act_bit_width=width.act,
        bias_bit_width=32, weight_quant_granularity="per_channel", act_quant_percentile=99.999,
        act_quant_type="asym", scale_factor_type="float_scale", quant_format="int", layerwise_first_last_bit_width=8)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(cal.preprocess.normalize_transform()(cal.pixels), cal.labels),
        batch_size=args.batch_size)
    with torch.no_grad():
        model(next(iter(loader))[0])  # some quantizers initialise on a first forward
    ptq.calibrate(loader, model)
    if args.peer_round == "gptq":
        ptq.apply_gptq(loader, model, act_order=False, create_weight_orig=True)
    elif args.peer_round == "learned":
        from brevitas_examples.imagenet_classification.ptq.learned_round_utils import apply_learned_round

        settings = argparse.Namespace(
            learned_round="hard_sigmoid", learned_round_mode="layerwise", learned_round_loss="regularised_mse",
            learned_round_iters=args.learned_round_iters, learned_round_lr=1e-3, learned_round_lr_scheduler=None,
            learned_round_batch_size=args.learned_round_batch)
        apply_learned_round(model=model, calibration_loader=loader, args=settings)
    ptq.apply_bias_correction(loader, model)
    return model


def peer_recipe(args: argparse.Namespace) -> str:
    """The peer's recipe in words, for the log."""
    rounding = {"learned": f"learned rounding ({args.learned_round_iters} iterations a layer, batch "
                           f"{args.learned_round_batch})", "gptq": "GPTQ", "none": "nearest rounding"}[args.peer_round]
    relu6 = "ReLU6 -> ReLU" if args.relu6_to_relu else "ReLU6 kept"
    return (f"graph equalization ({args.graph_eq_iterations} iterations, {relu6}) + {rounding} + bias correction; "
            "per-channel weights, asymmetric activations at conv/linear inputs, first/last layer 8 bits")


def run_peer(args: argparse.Namespace, say: Callable[[str], None], model: torch.nn.Module, cal: Images,
             val: Images, cells: dict[str, Cell], done: Callable[[], object]) -> None:
    """Fill ``cells`` with the peer's FP32 and each width, calling ``done()`` after each (the log so far)."""
    start = time.perf_counter()
    float_model = peer_float(args, model)
    prepare = time.perf_counter() - start
    cells["FP32"] = Cell(top1(float_model, val, args.batch_size), len(val.labels), prepare)
    done()
    say(f"peer FP32 after its preparation ({'ReLU6 -> ReLU' if args.relu6_to_relu else 'ReLU6 kept'}): "
        f"{cells['FP32'].top1:.2f} % ({prepare:.1f} s to prepare)")
    for width in args.widths:
        start = time.perf_counter()
        quantized = peer_quantize(args, float_model, width, cal)
        seconds = prepare + time.perf_counter() - start
        cells[width.name] = Cell(top1(quantized, val, args.batch_size, quantized=True), len(val.labels), seconds)
        say(f"peer {width.name}: {cells[width.name].top1:.2f} %, calibration {seconds:.1f} s")
        done()


# -- ours --------------------------------------------------------------------------------------------------------
def ours_command(args: argparse.Namespace, tmp: Path, width: Width | None, collect: bool = False) -> list[str]:
    """One ``inference_sim.py`` command over the same images: collect, FP32 (``width`` None) or one width."""
    command = [sys.executable, str(ROOT / "inference_sim.py"), "-a", args.arch, "--weights", str(args.weights),
               "--cal-data", str(args.cal_data), "-cs", str(args.cal_size), "--seed", str(args.seed),
               "--data", str(args.data), "-b", str(args.batch_size), "--results", str(tmp / "results.csv")]
    if args.subset is not None:
        command += ["--subset", str(args.subset)]
    ours = shlex.split(args.ours)
    if collect:
        return command + ["-sm", "collect", "-sf", str(tmp / "stats")] + [f for f in ours if f == "--equalize"]
    if width is None:
        return command
    return command + ["-sm", "use", "-sf", str(tmp / "stats"), "--qtype", f"int{width.act}",
                      "-qw", f"int{width.weight}", *ours]


def run_ours_command(command: list[str], say: Callable[[str], None], tmp: Path) -> tuple[str, dict]:
    """Run one command; its output, and its results row (the last of the temporary results.csv)."""
    say("$ " + shlex.join(command))
    threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **threads})
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"our command failed (exit {done.returncode}): {output.strip().splitlines()[-1:]}")
    with open(tmp / "results.csv", newline="") as handle:
        row = list(csv.DictReader(handle))[-1]
    return output, row


def run_ours(args: argparse.Namespace, say: Callable[[str], None], cells: dict[str, Cell],
             done: Callable[[], object]) -> None:
    """Fill ``cells`` with our FP32 and each width, calling ``done()`` after each (the log so far)."""
    with tempfile.TemporaryDirectory(prefix="bench_peer_") as name:
        tmp = Path(name)
        _, row = run_ours_command(ours_command(args, tmp, None, collect=True), say, tmp)
        collect_seconds = float(row["seconds"])
        for width in [None, *args.widths]:
            output, row = run_ours_command(ours_command(args, tmp, width), say, tmp)
            printed = PREC.findall(output)
            if not printed or abs(float(printed[-1][0]) - float(row["top1"])) > 1e-3:
                raise RuntimeError(f"our run printed {printed[-1:]} but its results row says top1={row['top1']}")
            bca = sum(float(s) for s in BCA_SECONDS.findall(output))
            seconds = 0.0 if width is None else collect_seconds + bca
            key = "FP32" if width is None else width.name
            cells[key] = Cell(float(row["top1"]), int(row["images"]), seconds)
            say(f"ours {key}: {cells[key].top1:.2f} %, calibration {seconds:.1f} s")
            done()


# -- the table ---------------------------------------------------------------------------------------------------
def format_table(rows: Sequence[str], peer: dict[str, Cell], ours: dict[str, Cell]) -> str:
    """The table (rows = FP32 and widths; peer and ours side by side), then the machine-readable last line."""
    def accuracy(cell: Cell | None) -> str:
        return "–" if cell is None else f"{cell.top1:.2f} ± {cell.se:.2f}"

    def seconds(cell: Cell | None) -> str:
        return "–" if cell is None else f"{cell.cal_seconds:.1f}"

    lines = ["| width | peer top-1 % | peer calibration s | ours top-1 % | ours calibration s |",
             "|---|---|---|---|---|"]
    for row in rows:
        p, o = peer.get(row), ours.get(row)
        lines.append(f"| {row} | {accuracy(p)} | {seconds(p)} | {accuracy(o)} | {seconds(o)} |")
    images = next((c.images for c in [*peer.values(), *ours.values()]), 0)
    fields = [f"images={images}"]
    for side, cells in (("peer", peer), ("ours", ours)):
        for row in rows:
            if row in cells:
                c = cells[row]
                fields += [f"{side}_{row}_top1={c.top1:.3f}", f"{side}_{row}_se={c.se:.3f}",
                           f"{side}_{row}_cal_s={c.cal_seconds:.1f}"]
    return "\n".join([*lines, " ".join(fields)])


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    torch.manual_seed(args.seed)
    try:
        model, preprocess = build_model(args.arch, str(args.weights))
        cal, val = image_sets(args, preprocess)
    except (DataError, ModelError) as exc:
        fail(str(exc))
    say(f"bench_peer: {args.arch} ({args.weights}); calibration {len(cal.labels)} images of {args.cal_data} "
        f"(seed {args.seed}); evaluation {len(val.labels)} images of {args.data}/val; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    peer: dict[str, Cell] = {}
    ours: dict[str, Cell] = {}
    rows = ["FP32", *(w.name for w in args.widths)]
    log = args.log or LOGS / f"bench_peer_{args.arch}.txt"

    def write_log(final: bool = False) -> str:
        """The log so far, rewritten whole (atomically) after every cell, so a run cut short keeps its cells."""
        table = format_table(rows, peer, ours).splitlines()
        text = "\n".join([*lines, *([] if final else ["(partial: the run had not finished)"]), *table]) + "\n"
        atomic_write(log, lambda tmp: Path(tmp).write_text(text))
        return text

    if args.sides != "peer":  # ours first: the cheaper side
        say(f"ours: {args.ours}")
        run_ours(args, say, ours, write_log)
    if args.sides != "ours":
        import brevitas

        say(f"peer: Brevitas {brevitas.__version__}, {peer_recipe(args)}")
        run_peer(args, say, model, cal, val, peer, write_log)
    say(f"load average at the end {os.getloadavg()[0]:.1f} (calibration seconds depend on it)")
    for line in format_table(rows, peer, ours).splitlines():
        print(line)
    return write_log(final=True)


if __name__ == "__main__":
    main()
