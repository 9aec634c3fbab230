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
import os
import re
import sys
from pathlib import Path

import torch

from pytorch_quantizer import distributed
from pytorch_quantizer.clipping import ALLOCATION_MODES, MAX_BITS, MIN_BITS, PRIORS, SIGMA_ESTIMATORS
from pytorch_quantizer.layers import ACT_POINTS
from pytorch_quantizer.methods import get_method, method_class, method_names

EXIT_USAGE = 2
AUTO = object()  # -qw not given: int8 weights when anything else is quantized (not a str: argparse converts those)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line on stderr (no usage dump), exit code 2; under torchrun only
    rank 0 prints it (every rank parses the same flags)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        quiet = distributed.environment_rank() != 0
        self.exit(EXIT_USAGE, None if quiet else f"{self.prog}: error: {message}\n")


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


def threshold(text: str) -> str:
    """A clipping method: a registered name or a family's member (``p99.9``, ``3std``); else the valid names."""
    try:
        method_class(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"invalid choice: {err}") from None
    return text


def qtypes(text: str) -> tuple[int | None, ...]:
    """One ``--qtype`` or a comma list of them (``int4,int6,int8``: only with ``--compare``)."""
    return tuple(qtype(part) for part in text.split(","))


def method_list(text: str) -> tuple[str, ...]:
    """``--compare no,laplace,...``: registered clipping methods, each once, in the order given."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise argparse.ArgumentTypeError("expected a comma list of clipping methods, e.g. no,laplace,gaus,mix")
    for name in names:
        threshold(name)  # a family member (p99.9, 3std) counts; an unknown name lists the valid ones
    return names


def observer_list(text: str) -> tuple[str, ...]:
    """``--observers moments,histogram``: registered observers, each once; the moments are always among them."""
    from pytorch_quantizer.observers import ObserverError, observer_class

    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    try:
        for name in names:
            observer_class(name)
    except ObserverError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if "moments" not in names:
        raise argparse.ArgumentTypeError(f"every clipping rule reads the moments: include moments, got {text!r}")
    return names


qweight = qtype  # the same names: intN, or f32 for float weights


def qtype_list(text: str) -> tuple[int | None, ...]:
    """A comma list of qtypes, e.g. ``int8,int6,int4``; each name once."""
    values = tuple(qtype(part) for part in text.split(","))
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"each type once, got {text!r}")
    return values


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


def alloc_bits(text: str) -> float:
    """A bit-allocation target: average bits a channel, 1..16 (2 to 65536 levels on average)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bits, got {text!r}") from None
    if not MIN_BITS <= value <= MAX_BITS:
        raise argparse.ArgumentTypeError(f"a bit-allocation target must be {MIN_BITS}..{MAX_BITS} bits on average "
                                         f"(each channel needs at least 2 levels), got {text}")
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
    p.add_argument("-th", "--threshold", type=threshold, default="no", metavar="METHOD",
                   help=("clipping method: " + "; ".join(f"{m}: {get_method(m).summary}" for m in methods)
                         ).replace("%", "%%") + " (default: %(default)s)")
    p.add_argument("-thw", "--weight_threshold", type=threshold, default="no", metavar="METHOD",
                   help="clipping method of the weights, per tensor or per channel with -pcw, from each weight's own "
                        "moments (one needing only moments: no, laplace, gaus, mix, laplace-grid, ...) (default: no, "
                        "their min/max)")
    p.add_argument("-sm", "--stats_mode", choices=("collect", "use", "no"), default="no",
                   help="collect statistics, use saved ones, or take ranges from each live tensor (default: no)")
    p.add_argument("--observers", type=observer_list, default=None, metavar="O1,O2,...",
                   help="what -sm collect gathers (default: moments,histogram, so that one folder serves every "
                        "method; moments alone skip the histogram's cost, and the searched methods then refuse it)")
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
    p.add_argument("-bca", "--act_bias_correction", action="store_true",
                   help="measure on the calibration images each layer's per-channel output mean shift that "
                        "quantization causes and fold it into the bias (the follow-up's -bca; bias_correction.py)")
    p.add_argument("--bca_rounds", type=positive, default=2,
                   help="-bca measuring passes: each corrects what the previous corrections left (default: 2)")
    p.add_argument("-hr", "--half_range", action="store_true",
                   help="one-sided grids [0, ...] for conv/linear outputs that only feed a ReLU/ReLU6 (found in the "
                        "model's graph): the follow-up's half range")
    p.add_argument("--act_point", choices=ACT_POINTS, default="output",
                   help="quantize (and, with -sm collect, observe) each conv/linear's output, as the seed does, or its "
                        "input, what an integer GEMM reads; inputs never below 0 get one-sided grids, the image stays "
                        "float (default: %(default)s)")
    p.add_argument("-pcq_a", "--per_channel_activations", action="store_true",
                   help="one activation grid per channel (dim 1 of the quantized tensor); with -sm collect, collect "
                        "per-channel moments beside the per-tensor ones")
    p.add_argument("-baa", "--bit_alloc_act", action="store_true",
                   help="bit allocation over each activation's channels: levels proportional to scale^(2/3) under "
                        "the quota of 2^M levels a channel (needs -pcq_a)")
    p.add_argument("-baw", "--bit_alloc_weight", action="store_true",
                   help="bit allocation over each weight's output channels, clipped at the optimum for their levels")
    p.add_argument("-bata", "--bit_alloc_target_act", type=alloc_bits, default=None, metavar="BITS",
                   help="average bits of the allocated activations of regular layers (default: each layer's width)")
    p.add_argument("-batw", "--bit_alloc_target_weight", type=alloc_bits, default=None, metavar="BITS",
                   help="average bits of the allocated weights of regular layers (default: each layer's width)")
    p.add_argument("-bam", "--bit_alloc_mode", choices=ALLOCATION_MODES, default="round",
                   help="level counts rounded keeping the quota exactly (round), or each rounded up as the follow-up "
                        "does, exceeding it by under one level a channel (ceil) (default: %(default)s)")
    p.add_argument("-bap", "--bit_alloc_prior", choices=PRIORS, default=None,
                   help="prior whose scale and optimal alpha bit allocation uses (default: -th's, laplace or gaus)")
    p.add_argument("--sigma", choices=SIGMA_ESTIMATORS, default="range",
                   help="Gaussian sigma estimate: from the range (the seed's) or the sample std (default: range)")
    p.add_argument("--no_fold_bn", action="store_true", help="keep BatchNorm layers instead of folding them")
    p.add_argument("-ep", "--eval_precision", action="store_true", help="FP32, then int8..int4 in one run")
    p.add_argument("-ep_a", "--ep_qtypes", type=qtype_list, default=None, metavar="intN,...",
                   help="-ep's activation types (default: int8,int7,int6,int5,int4)")
    p.add_argument("-ep_w", "--ep_qweights", type=qtype_list, default=None, metavar="intN,...",
                   help="-ep's weight types: every (weights, activations) pair is evaluated, rows named W<w>A<a> "
                        "(f32: float weights) (default: -qw alone)")
    p.add_argument("-ct", "--custom_test", action="store_true",
                   help="keep the k layers with the largest estimated MSE at 8 bits, k = 0..L")
    p.add_argument("--ct_step", type=positive, default=1, metavar="N",
                   help="-ct evaluates k = 0, N, 2N, ... and L only (default 1: every k); a coarse sweep of a deep "
                        "network at a fraction of its L + 1 passes")
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
                   help="run the forward under torch.compile, quantization fused (-sm use, no -s; see docs/kernels.md)")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="keep decoded images in memory between passes (default: when several passes run and the "
                        "images take at most half the available memory)")
    p.add_argument("--dist_timeout", type=float, default=distributed.DEFAULT_TIMEOUT_MINUTES, metavar="MINUTES",
                   help="under torchrun, how long a rank waits for a lost peer at a collective (default: %(default)s)")
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
    if args.observers is not None and (args.stats_mode != "collect" or args.compare):
        raise ValueError("--observers chooses what -sm collect gathers (--compare collects what its methods need): "
                         "give it with -sm collect")
    if args.ct_step != 1 and not args.custom_test:
        raise ValueError("--ct_step thins the -ct sweep: give it with -ct")
    if args.custom_test and args.qtype is None:
        raise ValueError("-ct keeps layers at 8 bits among the others at --qtype: give it, e.g. --qtype int4")
    if args.bit_alloc_act and not args.per_channel_activations:
        raise ValueError("-baa shares levels among the channels of an activation: it needs -pcq_a (and statistics "
                         "collected with -sm collect -pcq_a)")
    if args.per_channel_activations and args.stats_mode == "no":
        raise ValueError("-pcq_a takes per-channel grids from statistics: collect them with -sm collect -pcq_a, then "
                         "run -sm use -pcq_a")
    if args.bit_alloc_weight and args.qweight is not AUTO and args.qweight is None:
        raise ValueError("-baw allocates the levels of quantized weights: not with -qw f32")
    if args.bit_alloc_target_act is not None and not args.bit_alloc_act:
        raise ValueError("-bata is the target of -baa: give -baa too")
    if args.bit_alloc_target_weight is not None and not args.bit_alloc_weight:
        raise ValueError("-batw is the target of -baw: give -baw too")
    sweeps = args.eval_precision or args.custom_test
    if (args.ep_qtypes or args.ep_qweights) and not args.eval_precision:
        raise ValueError("-ep_a and -ep_w choose the widths of the -ep sweep: give -ep too")
    if args.ep_qtypes and None in args.ep_qtypes:
        raise ValueError("-ep_a lists activation widths intN; the sweep's FP32 row comes first anyway")
    if args.act_bias_correction and args.stats_mode == "collect":
        raise ValueError("-bca corrects a quantized network: run it with -sm use or -sm no, not with -sm collect")
    weight_bits = args.qweight
    if weight_bits is AUTO:
        weight_bits = 8 if args.qtype is not None or sweeps else None
    if args.act_bias_correction and args.qtype is None and weight_bits is None and not sweeps:
        raise ValueError("-bca corrects the mean shift that quantization causes, but nothing is quantized: "
                         "give --qtype intN or -qw intN")
    if args.stats_mode == "collect" and not args.compare and (args.eval_precision or args.custom_test
                                                              or args.dump_dir):
        raise ValueError("-sm collect only collects statistics; run -ep, -ct or -dd with -sm use or -sm no")
    several = len(args.device_ids) > 1 and not distributed.launched_by_torchrun()  # DataParallel
    if args.compile and (args.stats_mode != "use" or args.stochastic or several):
        raise ValueError("--compile runs -sm use with round-to-nearest on one device (collection, live statistics, "
                         "-s and several GPUs would split the compiled graph at every layer)")
    return RunConfig(
        data=args.data.expanduser(), arch=args.arch, weights=args.weights or default_weights(args.arch),
        workers=args.workers,
        batch_size=args.batch_size, print_freq=args.print_freq, seed=args.seed,
        device=pick_device(args.device, args.device_ids), device_ids=args.device_ids, bits=args.qtype,
        weight_bits=weight_bits, threshold=args.threshold, stats_mode=args.stats_mode,
        stats_folder=args.stats_folder, preserve_zero=args.preserve_zero, stochastic=args.stochastic,
        hw_scale=args.hw_scale, per_channel_weights=args.per_channel_weights, weight_threshold=args.weight_threshold,
        bias_correction=args.bias_correction, variance_correction=args.variance_correction, half_range=args.half_range,
        act_bias_correction=args.act_bias_correction, bca_rounds=args.bca_rounds,
        act_point=args.act_point, per_channel_activations=args.per_channel_activations,
        alloc_activations=args.bit_alloc_act, alloc_weights=args.bit_alloc_weight,
        alloc_act_bits=args.bit_alloc_target_act, alloc_weight_bits=args.bit_alloc_target_weight,
        alloc_mode=args.bit_alloc_mode, alloc_prior=args.bit_alloc_prior, sigma_estimator=args.sigma,
        edge_weight_bits=args.edge_weights,
        fold_bn=not args.no_fold_bn, eval_precision=args.eval_precision, custom_test=args.custom_test,
        ct_step=args.ct_step, **({"observers": args.observers} if args.observers else {}),
        **({"sweep_bits": args.ep_qtypes} if args.ep_qtypes else {}),
        sweep_weight_bits=args.ep_qweights or (),
        dump_dir=args.dump_dir, cal_set_size=args.cal_set_size,
        cal_data=args.cal_data.expanduser() if args.cal_data else None, subset=args.subset, results=args.results,
        cache=args.cache, compile=args.compile, compare=args.compare, compare_bits=widths,
        world_size=int(os.environ["WORLD_SIZE"]) if distributed.launched_by_torchrun() else 1,
        dist_timeout=args.dist_timeout,
    )


def report_error(prog: str, err: BaseException, ctx: distributed.DistContext | None) -> None:
    """The run's one error line.  Under torchrun: a failure every rank agreed on (``RankFailure``) and any error
    before the process group exists (every rank parses the same flags and environment) are printed by rank 0
    alone; an error only one rank met outside those steps by that rank, naming itself."""
    message = " ".join(str(err).split()) or type(err).__name__
    rank = distributed.environment_rank()
    if rank != 0:
        if isinstance(err, distributed.RankFailure) or ctx is None or not ctx.active:
            return
        message = f"rank {rank}: {message}"
    print(f"{prog}: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = distributed.environment_rank() != 0  # under torchrun, rank 0 alone logs what is not a warning
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    ctx = None
    try:
        cfg = config_from_args(args)
        from pytorch_quantizer.experiment import run

        ctx = distributed.setup(cfg.device, cfg.device_ids, cfg.dist_timeout)
        run(cfg, ctx)
    except (ValueError, OSError, FloatingPointError, torch.OutOfMemoryError, torch.distributed.DistError) as err:
        report_error(parser.prog, err, ctx)  # DistError: a collective timed out or lost a peer
        if ctx is not None and isinstance(err, distributed.RankFailure):
            ctx.end_together(err)  # rank 0 has printed before any rank exits (torchrun then stops the rest)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted (statistics are saved only by a completed collect pass)", file=sys.stderr)
        return 130
    finally:
        if ctx is not None:
            ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
