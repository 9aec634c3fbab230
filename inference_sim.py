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
import signal
import sys
from pathlib import Path

try:  # an interrupt while torch loads (seconds) is one line, not an import traceback
    import torch

    from pytorch_quantizer import distributed
    from pytorch_quantizer.clipping import ALLOCATION_MODES, MAX_BITS, MIN_BITS, PRIORS, SIGMA_ESTIMATORS
    from pytorch_quantizer.layers import ACT_POINTS
    from pytorch_quantizer.methods import get_method, method_class, method_names
    from pytorch_quantizer.quant_config import MISSING_STATS, ROUNDING_INPUTS, WEIGHT_ROUNDINGS
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    print("inference_sim.py: interrupted while loading torch; nothing was run", file=sys.stderr)
    sys.exit(130)

EXIT_USAGE = 2
DEMO_RESULTS = Path("results/demo/results.csv")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, ``kill``) taken like Ctrl-C: every ``finally`` and cleanup runs, so no staging
    folder or temporary statistics are left behind."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


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
    names = tuple(part.strip() for part in text.split(",") if part.strip())
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


def seed(text: str) -> int:
    """A seed: an integer in 0..2**63-1 (what torch.Generator.manual_seed takes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in 0..2**63-1, got {text}")
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
        ids = tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"device ids must be integers such as '0 1' or 0,1; got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("device ids must be integers such as '0 1' or 0,1; got none")
    return ids


class QtypeAction(argparse.Action):
    """``--qtype intN`` (the activation width) or ``intA,intB,...`` (the widths of ``--compare``): the first width
    goes to ``act.bits``, a list of several to ``compare_bits`` as well."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values[0])
        if len(values) > 1:
            namespace.compare_bits = values


def hyphenated(*names: str) -> tuple[str, ...]:
    """Each long flag in both spellings: ``--bca-rounds`` is the style, ``--bca_rounds`` keeps working."""
    out = []
    for name in names:
        out.append(name)
        if name.startswith("--"):
            for other in ("--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")):
                if other not in out and other not in names:
                    out.append(other)
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    """The driver's flags: each ``dest`` is the path of its ``RunConfig`` field (``config.from_flat``)."""
    from pytorch_quantizer.models import available_archs

    archs = available_archs()
    p = OneLineParser(
        prog="inference_sim.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # a flag not given leaves its field's default (config.py) in place
    )

    def add(*names: str, **kwargs) -> None:
        p.add_argument(*hyphenated(*names), **kwargs)

    add("--demo", action="store_true", help="the first run after install: efficientnet_lite0 on 15 bundled photos "
        "(collect, then 4-bit activations with and without Laplace clipping), top-1 agreement with FP32 and the "
        f"logits' SQNR; needs no ImageNet and no network; rows to --results (default: {DEMO_RESULTS})")
    add("--agreement", dest="agreement", action="store_true",
        help="run FP32 first and give each quantized pass's top-1 agreement with it and its logits' SQNR (label-free "
             "measures; -ep and --compare give them anyway, having an FP32 pass)")
    add("--data", dest="data.root", type=Path,
        help="ImageNet root; images are read from DATA/val/<wnid>/ (default: ~/datasets/ILSVRC2012)")
    add("-a", "--arch", dest="arch", metavar="ARCH",
        help="model architecture: " + " | ".join(archs) + " (default: resnet18)")
    add("--weights", dest="weights",
        help="torchvision weights name (IMAGENET1K_V1, DEFAULT, ...), a path to a state_dict file, or 'none' for "
             "random initialisation (tests and timing only) (default: the weights the seed evaluated, IMAGENET1K_V1 "
             "where the architecture has them, else DEFAULT)")
    add("-j", "--workers", dest="data.workers", type=non_negative, help="data loading workers (default: 2)")
    add("-b", "--batch-size", dest="data.batch_size", type=positive, help="mini-batch size (default: 256)")
    add("-p", "--print-freq", dest="print_freq", type=non_negative, help="progress update every N batches")
    add("--seed", dest="data.seed", type=seed,
        help="seed for subsets, random weights, stochastic rounding (default: 0)")
    add("--device", dest="device", help="cuda or cpu (default: cuda when available, else cpu)")
    add("--device_ids", dest="device_ids", type=device_ids, help="GPU ids, e.g. '0 1' (several: DataParallel)")
    add("--qtype", dest="act.bits", type=qtypes, action=QtypeAction, metavar="intN",
        help="activation type intN, or fp32; without it nothing is quantized, as in the seed; with --compare a "
             "comma list, e.g. int4,int6,int8")
    add("-qw", "--qweight", dest="weight.bits", type=qweight, metavar="intN",
        help="weight and bias type intN, or f32 for float weights (default: int8 when activations are quantized, "
             "f32 otherwise)")
    add("--float_bias", dest="weight.float_bias", action="store_true",
        help="keep biases in float, as a deployment's int32 biases at the accumulator's scale are (default: at -qw's "
             "width, per tensor, as the seed does)")
    methods = method_names()
    add("--edge_weights", dest="weight.edge_bits", type=edge_weights, metavar="intN",
        help="weights of the first conv and the classifier when -qw is narrower (the follow-up keeps them at 8 "
             "bits), or 'same' to quantize them like the others (default: int8)")
    add("-th", "--threshold", "--method", dest="act.method", type=threshold, metavar="METHOD",
        help=("clipping method of the activations: " + "; ".join(f"{m}: {get_method(m).summary}" for m in methods)
              ).replace("%", "%%") + " (default: no)")
    add("-thw", "--weight_threshold", "--weight-method", dest="weight.method", type=threshold, metavar="METHOD",
        help="clipping method of the weights, per tensor or per channel with -pcw, from each weight's own moments "
             "(one needing only moments: no, laplace, gaus, mix, laplace-grid, ...) (default: no, their min/max)")
    add("-sm", "--stats_mode", dest="stats_mode", choices=("collect", "use", "no"),
        help="collect statistics, use saved ones, or take ranges from each live tensor (default: no)")
    add("--observers", dest="observers", type=observer_list, metavar="O1,O2,...",
        help="what -sm collect gathers (default: moments,histogram, so that one folder serves every method; moments "
             "alone skip the histogram's cost, and the searched methods then refuse it)")
    add("-sf", "--stats_folder", dest="stats_folder", type=Path,
        help="statistics folder (default: ~/asiq_data/statistics/ARCH-WEIGHTSFINGERPRINT)")
    add("-pz", "--preserve_zero", dest="act.preserve_zero", action="store_true",
        help="make 0.0 exactly representable")
    add("-s", "--stochastic", dest="act.stochastic", action="store_true", help="stochastic rounding of activations")
    add("-hs", "--hw_scale", dest="act.pow2_scale", action="store_true", help="round scales up to powers of two")
    add("-pcw", "-pcq_w", "--per_channel_weights", dest="weight.per_channel", action="store_true",
        help="one weight grid per output channel (-pcq_w is the follow-up's name)")
    add("-bcw", "--bias_correction", dest="correct.weight_mean", action="store_true",
        help="restore each output channel's weight mean after quantization (the follow-up's eq. 12)")
    add("-vcw", "--variance_correction", dest="correct.weight_variance", action="store_true",
        help="restore each output channel's centred weight norm after quantization (eq. 13)")
    add("-bca", "--act_bias_correction", dest="correct.act_bias", action="store_true",
        help="measure on the calibration images each layer's per-channel output mean shift that quantization "
             "causes and fold it into the bias (the follow-up's -bca; bias_correction.py)")
    add("--bca_rounds", dest="correct.act_bias_rounds", type=positive,
        help="-bca measuring passes: each corrects what the previous corrections left (default: 2)")
    add("-bcdf", "--data_free_bias_correction", dest="correct.data_free_bias", action="store_true",
        help="predict each layer's per-channel output mean shift from the BatchNorm statistics of its input's "
             "producer, without images, and fold it into the bias (DFQ's data-free bias correction; dfq_bias.py)")
    add("--weight_rounding", dest="rounding.method", choices=WEIGHT_ROUNDINGS,
        help="how each weight goes to its grid: nearest level (the seed), or adaround: up or down as learned layer by "
             "layer to reconstruct the layer's output on the calibration images (Nagel et al. 2020; adaround.py; "
             "cached in results/adaround) (default: nearest)")
    add("--adaround_iters", dest="rounding.iters", type=positive,
        help="AdaRound's optimisation steps per layer (default: 300)")
    add("--adaround_batch", dest="rounding.batch", type=positive,
        help="calibration images in each AdaRound step (default: 16)")
    add("--adaround_input", dest="rounding.input", choices=ROUNDING_INPUTS,
        help="where each layer's input comes from while AdaRound learns it: the float network, or the network "
             "quantized up to that layer (its learned weights and activation grids) (default: float)")
    add("-hr", "--half_range", dest="act.half_range", action="store_true",
        help="one-sided grids [0, ...] for conv/linear outputs that only feed a ReLU/ReLU6 (found in the model's "
             "graph): the follow-up's half range")
    add("--act_point", dest="act.placement", choices=ACT_POINTS,
        help="quantize (and, with -sm collect, observe) each conv/linear's output, as the seed does, or its input, "
             "what an integer GEMM reads; inputs never below 0 get one-sided grids, the image stays float "
             "(default: output)")
    add("-pcq_a", "--per_channel_activations", dest="act.per_channel", action="store_true",
        help="one activation grid per channel (dim 1 of the quantized tensor); with -sm collect, collect per-channel "
             "moments beside the per-tensor ones")
    add("-baa", "--bit_alloc_act", dest="alloc.activations", action="store_true",
        help="bit allocation over each activation's channels: levels proportional to scale^(2/3) under the quota of "
             "2^M levels a channel (needs -pcq_a)")
    add("-baw", "--bit_alloc_weight", dest="alloc.weights", action="store_true",
        help="bit allocation over each weight's output channels, clipped at the optimum for their levels")
    add("-bata", "--bit_alloc_target_act", dest="alloc.act_bits", type=alloc_bits, metavar="BITS",
        help="average bits of the allocated activations of regular layers (default: each layer's width)")
    add("-batw", "--bit_alloc_target_weight", dest="alloc.weight_bits", type=alloc_bits, metavar="BITS",
        help="average bits of the allocated weights of regular layers (default: each layer's width)")
    add("-bam", "--bit_alloc_mode", dest="alloc.mode", choices=ALLOCATION_MODES,
        help="level counts rounded keeping the quota exactly (round), or each rounded up as the follow-up does, "
             "exceeding it by under one level a channel (ceil) (default: round)")
    add("-bap", "--bit_alloc_prior", dest="alloc.prior", choices=PRIORS,
        help="prior whose scale and optimal alpha bit allocation uses (default: -th's, laplace or gaus)")
    add("--sigma", dest="act.sigma", choices=SIGMA_ESTIMATORS,
        help="Gaussian sigma estimate: from the range (the seed's) or the sample std (default: range)")
    add("--missing_stats", dest="act.missing_stats", choices=MISSING_STATS,
        help="a quantized layer the statistics have nothing for: refuse the run (error), or leave it float and "
             "log it (float) (default: error)")
    add("--no_fold_bn", dest="fold_bn", action="store_false", help="keep BatchNorm layers instead of folding them")
    add("--equalize", dest="equalize", action="store_true",
        help="cross-layer equalization and high-bias absorption (DFQ) of the folded float model, before statistics "
             "are collected or used (statistics must be collected with it too)")
    add("-ep", "--eval_precision", dest="eval_precision", action="store_true",
        help="FP32, then int8..int4 in one run")
    add("-ep_a", "--ep_qtypes", dest="sweep_bits", type=qtype_list, metavar="intN,...",
        help="-ep's activation types (default: int8,int7,int6,int5,int4)")
    add("-ep_w", "--ep_qweights", dest="sweep_weight_bits", type=qtype_list, metavar="intN,...",
        help="-ep's weight types: every (weights, activations) pair is evaluated, rows named W<w>A<a> (f32: float "
             "weights) (default: -qw alone)")
    add("-ct", "--custom_test", "--layer-selection", dest="layer_selection", action="store_true",
        help="layer selection: keep the k layers with the largest estimated MSE at 8 bits, k = 0..L")
    add("--ct_step", "--layer-selection-step", dest="layer_selection_step", type=positive, metavar="N",
        help="-ct evaluates k = 0, N, 2N, ... and L only (default 1: every k); a coarse sweep of a deep network at "
             "a fraction of its L + 1 passes")
    add("--compare", dest="compare", type=method_list, metavar="M1,M2,...",
        help="calibrate once (one pass with every observer these methods need, or -sm use's folder), then evaluate "
             "FP32 and each method at each --qtype width: a table, a CSV and a bokeh chart under results/compare/; "
             "with -ct the layer-selection sweep per method, a CSV and a PNG")
    add("-dd", "--dump_dir", dest="dump_dir", type=Path, help="dump one batch's activations here")
    add("--export_onnx", dest="export_onnx", type=Path, metavar="PATH",
        help="write the network as this run quantizes it as an ONNX QDQ model (opset 21; -sm use, or -sm no for "
             "weights alone), atomically; see docs/onnx.md")
    add("--eval_onnx", dest="eval_onnx", action="store_true",
        help="evaluate the --export_onnx model in ONNX Runtime (CPU) on the same images after the simulator's pass: "
             "its top-1/top-5, top-1 agreement with the simulator and largest logit difference (a results row)")
    add("--onnx_relu_pairs", dest="onnx_relu_pairs", action="store_true",
        help="with --export_onnx (output placement): repeat each output's grid after the Relu/Clip that reads it "
             "when its bounds are levels of the grid (values unchanged), so that ONNX Runtime can fuse the next "
             "conv into an integer kernel; these pairs are outside the plan")
    add("-cs", "--cal_set_size", dest="data.cal_size", type=positive,
        help="calibrate on N images drawn with --seed (from --cal-data, else from --data, where they are then held "
             "out of every evaluation of the run)")
    add("--cal-data", dest="data.cal_root", type=Path, metavar="DIR",
        help="calibration images from DIR/<wnid>/* (an ImageNet train folder, or any wnid folder) instead of --data")
    add("--subset", dest="data.subset", type=positive,
        help="evaluate on N images drawn with --seed from those not used for calibration")
    add("--results", dest="results", type=Path,
        help="CSV that every run appends a row to (default: results/results.csv)")
    add("--compile", dest="compile", action="store_true",
        help="run the forward under torch.compile, quantization fused (-sm use, no -s; see docs/kernels.md)")
    add("--cache", dest="data.cache", action=argparse.BooleanOptionalAction,
        help="keep decoded images in memory between passes (default: when several passes run and the images take "
             "at most half the available memory)")
    add("--dist_timeout", dest="dist_timeout", type=float, metavar="MINUTES",
        help=f"under torchrun, how long a rank waits for a lost peer at a collective (default: "
             f"{distributed.DEFAULT_TIMEOUT_MINUTES})")
    return p


def flags_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each config field path -> the flags that set it, as the user reads them (``-th/--threshold/--method``)."""
    out = {}
    for action in parser._actions:
        spellings: dict[str, str] = {}  # one spelling style each: --ct_step, not also --ct-step
        for option in action.option_strings:
            spellings.setdefault(option.replace("_", "-"), option)
        if spellings:
            out[action.dest] = "/".join(list(spellings.values())[:2])
    out["compare_bits"] = out["act.bits"]
    return out


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None):
    """The run's ``RunConfig`` from the parsed flags (their dests are its field paths); a refused setting is a
    ``ConfigError`` whose message names the flags (``parser``: the one that parsed ``args``)."""
    from pytorch_quantizer.config import from_flat
    from pytorch_quantizer.quant_config import ConfigError

    values = {k: v for k, v in vars(args).items() if k != "demo"}
    parser = parser or build_parser()
    try:
        cfg = from_flat(values)
    except ConfigError as err:
        raise ConfigError(flag_message(err, parser, set(values)), *err.fields) from None
    for path, why in cfg.without_effect().items():
        if path in values:  # a flag the user gave; a default that changes nothing needs no word
            warning = flag_message(ConfigError(why, path, "weight.bits", "sweep_weight_bits"), parser, {path}, False)
            logging.getLogger("pytorch_quantizer").warning("warning: %s", warning)
    return cfg


def flag_message(err, parser: argparse.ArgumentParser, given: set[str], prefix: bool = True) -> str:
    """A library refusal in the CLI's terms: prefixed with the flags the user gave among the fields it concerns
    (else the first field's flag; ``prefix`` False: none), and each field in the text replaced by its flag: paths
    such as ``act.bits`` or ``stats_mode`` as they stand, one-word fields only when quoted as ```device```."""
    flags = flags_of(parser)
    if "compare_bits" in given:
        given = given | {"act.bits"}
    fields = [f for f in err.fields if f in given] or list(err.fields[:1])
    named = ", ".join(dict.fromkeys(flags.get(f, f) for f in fields))
    text = str(err)
    for field in sorted(err.fields, key=len, reverse=True):
        if field in flags:
            flag = flags[field].split("/")[0]
            text = text.replace(f"`{field}`", flag)
            if "." in field or "_" in field:  # a field path, never an English word (a bare `device` may be one)
                text = re.sub(rf"(?<![\w.-]){re.escape(field)}(?![\w.])", flag, text)
    return f"{named}: {text}" if named and prefix else text


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
    demo = vars(args).pop("demo", False)
    if demo and set(vars(args)) - {"results"}:
        flags = flags_of(parser)
        extra = ", ".join(flags[k] for k in vars(args) if k != "results")
        parser.error(f"--demo runs alone (it takes --results only): drop {extra}")
    try:
        if demo:
            from pytorch_quantizer import run

            run.demo(getattr(args, "results", DEMO_RESULTS))
            return 0
        cfg = config_from_args(args, parser)
        from pytorch_quantizer.run import run

        ctx = distributed.setup(cfg.device, cfg.device_ids, cfg.dist_timeout)
        run(cfg, ctx)
    except (ValueError, OSError, FloatingPointError, torch.OutOfMemoryError, torch.distributed.DistError) as err:
        report_error(parser.prog, err, ctx)  # DistError: a collective timed out or lost a peer
        if ctx is not None and isinstance(err, distributed.RankFailure):
            ctx.end_together(err)  # rank 0 has printed before any rank exits (torchrun then stops the rest)
        return EXIT_USAGE
    except KeyboardInterrupt as stop:
        if distributed.environment_rank() == 0:  # under torchrun every rank is stopped; one line says so
            what = "terminated" if isinstance(stop, Terminated) else "interrupted"
            print(f"{parser.prog}: {what} (statistics are saved only by a completed collect pass)", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    finally:
        if ctx is not None:
            ctx.close()
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)  # the command line only: a library caller keeps its own handler
    sys.exit(main())
