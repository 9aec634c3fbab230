#!/usr/bin/env python3
"""ACIQ inference simulation: collect activation statistics, then evaluate a torchvision CNN with quantized
activations clipped analytically (flag-compatible with the seed's ``inference-sim``).

    python inference_sim.py -a resnet18 -b 512 --qtype int8 -sm collect
    python inference_sim.py -a resnet18 -b 512 --qtype int4 -sm use -th laplace
    python inference_sim.py -a resnet18 -b 512 --qtype int4 -sm use -th no
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import torch

from pytorch_quantizer.clipping import MAX_BITS, MIN_BITS, SIGMA_ESTIMATORS
from pytorch_quantizer.layers import ACT_POINTS
from pytorch_quantizer.methods import get_method, method_names

EXIT_USAGE = 2
AUTO = object()  # -qw not given: int8 weights when anything else is quantized (not a str: argparse converts those)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line on stderr (no usage dump), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


FLOAT_NAMES = ("f32", "fp32", "float", "none")


def qtype(text: str) -> int | None:
    """``intN`` with N in 1..16 → N; ``fp32`` (or ``f32``) → None, no quantization (the seed's default)."""
    if text.strip().lower() in FLOAT_NAMES:
        return None
    match = re.fullmatch(r"int(\d+)", text.strip())
    if not match or not MIN_BITS <= int(match.group(1)) <= MAX_BITS:
        raise argparse.ArgumentTypeError(
            f"invalid type {text!r}: expected fp32 or int{MIN_BITS}..int{MAX_BITS}, e.g. int4"
        )
    return int(match.group(1))


def qtypes(text: str) -> tuple[int | None, ...]:
    """One ``--qtype`` or a comma list of them (``int4,int6,int8``: only with ``--compare``)."""
    return tuple(qtype(part) for part in text.split(","))


def method_list(text: str) -> tuple[str, ...]:
    """``--compare no,laplace,...``: registered clipping methods, each once, in the order given."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise argparse.ArgumentTypeError("expected a comma list of clipping methods, e.g. no,laplace,gaus,mix")
    unknown = [name for name in names if name not in method_names()]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown clipping method(s) {', '.join(unknown)}: expected some of "
                                         f"{', '.join(method_names())}")
    return names


qweight = qtype  # the same names: intN, or f32 for float weights


def edge_weights(text: str) -> int | None:
    """``intN`` → N, ``same`` → None (no exception for the first and last layers)."""
    if text.strip().lower() == "same":
        return None
    bits = qtype(text)
    if bits is None:
        raise argparse.ArgumentTypeError("expected intN or same")
    return bits


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def device_ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"device ids must be integers such as '0 1' or 0,1; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from pytorch_quantizer.models import available_archs

    archs = available_archs()
    p = OneLineParser(
        prog="inference_sim.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=Path("~/datasets/ILSVRC2012"),
                   help="ImageNet root; images are read from DATA/val/<wnid>/ (default: %(default)s)")
    p.add_argument("-a", "--arch", default="resnet18", metavar="ARCH",
                   help="model architecture: " + " | ".join(archs) + " (default: %(default)s)")
    p.add_argument("--weights", default=None,
                   help="torchvision weights name (IMAGENET1K_V1, DEFAULT, ...), a path to a state_dict file, "
                        "or 'none' for random initialisation (tests and timing only) (default: the weights the seed "
                        "evaluated, IMAGENET1K_V1 where the architecture has them, else DEFAULT)")
    p.add_argument("-j", "--workers", type=non_negative, default=2, help="data loading workers (default: 2)")
    p.add_argument("-b", "--batch-size", type=positive, default=256, help="mini-batch size (default: 256)")
    p.add_argument("-p", "--print-freq", type=non_negative, default=10, help="progress update every N batches")
    p.add_argument("--seed", type=int, default=0, help="seed for subsets, random weights, stochastic rounding")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available, else cpu)")
    p.add_argument("--device_ids", type=device_ids, default=(), help="GPU ids, e.g. '0 1' (several: DataParallel)")
    p.add_argument("--qtype", type=qtypes, default=(None,), metavar="intN",
                   help="activation type intN, or fp32; without it nothing is quantized, as in the seed; with "
                        "--compare a comma list, e.g. int4,int6,int8")
    p.add_argument("-qw", "--qweight", type=qweight, default=AUTO, metavar="intN",
                   help="weight and bias type intN, or f32 for float weights (default: int8 when activations are "
                        "quantized, f32 otherwise)")
    methods = method_names()
    p.add_argument("--edge_weights", type=edge_weights, default=8, metavar="intN",
                   help="weights of the first conv and the classifier when -qw is narrower (the follow-up keeps them "
                        "at 8 bits), or 'same' to quantize them like the others (default: int8)")
    p.add_argument("-th", "--threshold", choices=methods, default="no", metavar="METHOD",
                   help="clipping method: " + "; ".join(f"{m}: {get_method(m).summary}" for m in methods)
                        + " (default: %(default)s)")
    p.add_argument("-sm", "--stats_mode", choices=("collect", "use", "no"), default="no",
                   help="collect statistics, use saved ones, or take ranges from each live tensor (default: no)")
    p.add_argument("-sf", "--stats_folder", type=Path, default=None,
                   help="statistics folder (default: ~/asiq_data/statistics/ARCH-WEIGHTSFINGERPRINT)")
    p.add_argument("-pz", "--preserve_zero", action="store_true", help="make 0.0 exactly representable")
    p.add_argument("-s", "--stochastic", action="store_true", help="stochastic rounding of activations")
    p.add_argument("-hs", "--hw_scale", action="store_true", help="round scales up to powers of two")
    p.add_argument("-pcw", "-pcq_w", "--per_channel_weights", action="store_true",
                   help="one weight grid per output channel (-pcq_w is the follow-up's name)")
    p.add_argument("-bcw", "--bias_correction", action="store_true",
                   help="restore each output channel's weight mean after quantization (the follow-up's eq. 12)")
    p.add_argument("-vcw", "--variance_correction", action="store_true",
                   help="restore each output channel's centred weight norm after quantization (eq. 13)")
    p.add_argument("-hr", "--half_range", action="store_true",
                   help="one-sided grids [0, ...] for conv/linear outputs that only feed a ReLU/ReLU6 (found in the "
                        "model's graph): the follow-up's half range")
    p.add_argument("--act_point", choices=ACT_POINTS, default="output",
                   help="quantize (and, with -sm collect, observe) each conv/linear's output, as the seed does, or its "
                        "input, what an integer GEMM reads; inputs never below 0 get one-sided grids, the image stays "
                        "float (default: %(default)s)")
    p.add_argument("--sigma", choices=SIGMA_ESTIMATORS, default="range",
                   help="Gaussian sigma estimate: from the range (the seed's) or the sample std (default: range)")
    p.add_argument("--no_fold_bn", action="store_true", help="keep BatchNorm layers instead of folding them")
    p.add_argument("-ep", "--eval_precision", action="store_true", help="FP32, then int8..int4 in one run")
    p.add_argument("-ct", "--custom_test", action="store_true",
                   help="keep the k layers with the largest estimated MSE at 8 bits, k = 0..L")
    p.add_argument("--compare", type=method_list, default=(), metavar="M1,M2,...",
                   help="calibrate once (one pass with every observer these methods need, or -sm use's folder), "
                        "then evaluate FP32 and each method at each --qtype width: a table, a CSV and a bokeh chart "
                        "under results/compare/; with -ct the layer-selection sweep per method, a CSV and a PNG")
    p.add_argument("-dd", "--dump_dir", type=Path, default=None, help="dump one batch's activations here")
    p.add_argument("-cs", "--cal_set_size", type=positive, default=None,
                   help="calibrate on N images drawn with --seed (from --cal-data, else from --data, where they are "
                        "then held out of every evaluation of the run)")
    p.add_argument("--cal-data", "--cal_data", dest="cal_data", type=Path, default=None, metavar="DIR",
                   help="calibration images from DIR/<wnid>/* (an ImageNet train folder, or any wnid folder) "
                        "instead of --data")
    p.add_argument("--subset", type=positive, default=None,
                   help="evaluate on N images drawn with --seed from those not used for calibration")
    p.add_argument("--results", type=Path, default=Path("results/results.csv"),
                   help="CSV that every run appends a row to (default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="run the forward under torch.compile, quantization fused (-sm use, no -s; see README)")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="keep decoded images in memory between passes (default: when several passes run and the "
                        "images take at most half the available memory)")
    return p


def pick_device(requested: str | None, ids: tuple[int, ...]) -> str:
    if requested is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif requested in ("cpu", "cuda") or requested.startswith("cuda:"):
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {requested} was asked for, but no CUDA GPU is available; use --device cpu")
        device = requested
    else:
        raise ValueError(f"unknown device {requested!r}: expected cuda or cpu")
    if device == "cuda" and ids:
        device = f"cuda:{ids[0]}"
    return device


def compare_widths(args: argparse.Namespace) -> tuple[int, ...]:
    """Check ``--compare``'s companions and return its activation widths (``--qtype``, each once)."""
    widths = tuple(dict.fromkeys(args.qtype))
    if not args.compare:
        if len(args.qtype) > 1:
            raise ValueError("a comma list of --qtype values is for --compare only; give one --qtype")
        return ()
    if None in widths:
        raise ValueError("--compare compares quantized activations: give --qtype intN[,intN...] (the FP32 reference "
                         "row is always included)")
    if args.eval_precision:
        raise ValueError("--compare sweeps the widths of --qtype itself: run it without -ep")
    if args.custom_test and len(widths) != 1:
        raise ValueError("-ct --compare runs the layer selection at one width: give a single --qtype, e.g. int4")
    if args.dump_dir or args.compile:
        raise ValueError("--compare runs without -dd and --compile; dump or compile one method at a time")
    return widths


def config_from_args(args: argparse.Namespace):
    from pytorch_quantizer.experiment import RunConfig
    from pytorch_quantizer.models import default_weights

    widths = compare_widths(args)
    args.qtype = args.qtype[0]
    if args.custom_test and args.stats_mode != "use" and not args.compare:
        raise ValueError("-ct orders layers by their statistics: run it with -sm use")
    if args.half_range and args.act_point == "input":
        raise ValueError("-hr marks outputs that feed a ReLU; with --act_point input every non-negative input gets a "
                         "one-sided grid already")
    if args.custom_test and args.eval_precision:
        raise ValueError("-ep and -ct are two different sweeps: run them one at a time")
    if args.custom_test and args.qtype is None:
        raise ValueError("-ct keeps layers at 8 bits among the others at --qtype: give it, e.g. --qtype int4")
    sweeps = args.eval_precision or args.custom_test
    weight_bits = args.qweight
    if weight_bits is AUTO:
        weight_bits = 8 if args.qtype is not None or sweeps else None
    if args.stats_mode == "collect" and not args.compare and (args.eval_precision or args.custom_test
                                                              or args.dump_dir):
        raise ValueError("-sm collect only collects statistics; run -ep, -ct or -dd with -sm use or -sm no")
    if args.compile and (args.stats_mode != "use" or args.stochastic or len(args.device_ids) > 1):
        raise ValueError("--compile runs -sm use with round-to-nearest on one device (collection, live statistics, "
                         "-s and several GPUs would split the compiled graph at every layer)")
    return RunConfig(
        data=args.data.expanduser(), arch=args.arch, weights=args.weights or default_weights(args.arch),
        workers=args.workers,
        batch_size=args.batch_size, print_freq=args.print_freq, seed=args.seed,
        device=pick_device(args.device, args.device_ids), device_ids=args.device_ids, bits=args.qtype,
        weight_bits=weight_bits, threshold=args.threshold, stats_mode=args.stats_mode,
        stats_folder=args.stats_folder, preserve_zero=args.preserve_zero, stochastic=args.stochastic,
        hw_scale=args.hw_scale, per_channel_weights=args.per_channel_weights,
        bias_correction=args.bias_correction, variance_correction=args.variance_correction, half_range=args.half_range,
        act_point=args.act_point, sigma_estimator=args.sigma, edge_weight_bits=args.edge_weights,
        fold_bn=not args.no_fold_bn, eval_precision=args.eval_precision, custom_test=args.custom_test,
        dump_dir=args.dump_dir, cal_set_size=args.cal_set_size,
        cal_data=args.cal_data.expanduser() if args.cal_data else None, subset=args.subset, results=args.results,
        cache=args.cache, compile=args.compile, compare=args.compare, compare_bits=widths,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        cfg = config_from_args(args)
        from pytorch_quantizer.experiment import run

        run(cfg)
    except (ValueError, OSError, FloatingPointError, torch.OutOfMemoryError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted (statistics are saved only by a completed collect pass)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
