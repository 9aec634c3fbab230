"""One invocation of the driver as nested frozen dataclasses: ``RunConfig`` holds the run's own settings and the
``DataConfig``, ``ActivationConfig``, ``WeightConfig``, ``AllocationConfig``, ``CorrectionConfig`` and
``RoundingConfig`` groups.

Every group validates itself in ``__post_init__`` and raises ``ConfigError`` (the fields it concerns, the reason in
the library's terms), so a script or a test builds ``RunConfig(...)`` directly and gets the same refusals as the
command line.  ``from_flat`` builds the tree from ``{"act.bits": 4, "data.root": ..., "stats_mode": "use"}`` (the
parsed flags, whose ``dest`` is the field path): adding a setting is one field here, one ``add_argument`` and the
code that reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .distributed import DEFAULT_TIMEOUT_MINUTES, world_size
from .observers import ObserverError, observer_class
from .quant_config import (
    AUTO,
    CHANNEL_OBSERVERS,
    ActivationConfig,
    AllocationConfig,
    ConfigError,
    CorrectionConfig,
    QuantConfig,
    RoundingConfig,
    WeightConfig,
    check_method,
    check_moments_only,
    check_width,
)
from .stats import COLLECTED_OBSERVERS

PRECISION_SWEEP = (8, 7, 6, 5, 4)
STATISTICS_ROOT = Path("~/asiq_data/statistics")
STATS_MODES = ("collect", "use", "no")
MAX_SEED = 2**63 - 1
MAX_BATCH = 2**20  # images a batch: far beyond any memory, small enough for every index type
MAX_WORKERS = 256  # data-loading processes  # torch.Generator.manual_seed takes a 64-bit integer
# Settings that cannot change any number or file content a run produces (only where its rows go and how it logs).
NOT_SHAPING = ("results", "print_freq", "world_size", "dist_timeout", "export_onnx", "eval_onnx", "onnx_relu_pairs")
EXPORT_ACT_WIDTHS = (4, 8)  # activation widths with an ONNX type of exactly their level count (uint4, uint8)


def _positive(value: int | None, name: str, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}", name)


@dataclass(frozen=True)
class DataConfig:
    """Which images a run reads and how: evaluation from ``root/val``, calibration from ``cal_root`` (else from
    ``root/val``, held out of evaluation), ``cal_size`` and ``subset`` drawn with ``seed``."""

    root: Path = Path("~/datasets/ILSVRC2012")
    cal_root: Path | None = None
    cal_size: int | None = None
    subset: int | None = None
    seed: int = 0
    batch_size: int = 256
    workers: int = 2
    cache: bool | None = None  # keep decoded images between passes (None: when several passes fit in memory)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser())
        if self.cal_root is not None:
            object.__setattr__(self, "cal_root", Path(self.cal_root).expanduser())
        for name in ("cal_size", "subset"):
            _positive(getattr(self, name), f"data.{name}")
        _positive(self.batch_size, "data.batch_size", allow_none=False)
        if self.batch_size > MAX_BATCH:
            raise ConfigError(f"data.batch_size must be at most {MAX_BATCH}, got {self.batch_size}", "data.batch_size")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or not 0 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"data.workers must be in 0..{MAX_WORKERS}, got {self.workers!r}", "data.workers")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"data.seed must be an integer in 0..2**63-1, got {self.seed!r}", "data.seed")


@dataclass(frozen=True)
class RunConfig:
    """One invocation: the model, what the run does (collect, evaluate, sweep, compare) and where its outputs go,
    with the data, activation, weight, allocation and correction groups."""

    arch: str = "resnet18"
    weights: str | None = None  # torchvision weights name, a state_dict file or "none"; None: the seed's default
    data: DataConfig = field(default_factory=DataConfig)
    act: ActivationConfig = field(default_factory=ActivationConfig)
    weight: WeightConfig = field(default_factory=lambda: WeightConfig(bits=AUTO))
    alloc: AllocationConfig = field(default_factory=AllocationConfig)
    correct: CorrectionConfig = field(default_factory=CorrectionConfig)
    rounding: RoundingConfig = field(default_factory=RoundingConfig)
    device: str | None = None  # None: cuda when available, else cpu
    device_ids: tuple[int, ...] = ()
    stats_mode: str = "no"  # collect | use | no
    stats_folder: Path | None = None
    observers: tuple[str, ...] = COLLECTED_OBSERVERS  # what a collect pass gathers
    fold_bn: bool = True
    equalize: bool = False  # cross-layer equalization + high-bias absorption of the folded float model (DFQ)
    eval_precision: bool = False  # FP32, then each width of sweep_bits (x sweep_weight_bits)
    sweep_bits: tuple[int, ...] = PRECISION_SWEEP
    sweep_weight_bits: tuple[int | None, ...] = ()  # empty: weight.bits alone
    layer_selection: bool = False  # the seed's -ct: keep the k layers of largest estimated MSE at 8 bits
    layer_selection_step: int = 1  # evaluate k = 0, N, 2N, ... and L
    compare: tuple[str, ...] = ()  # these methods, calibrated once, each at every width of compare_bits
    compare_bits: tuple[int, ...] = ()  # empty: act.bits alone
    agreement: bool = False  # an FP32 pass first, then each quantized pass's top-1 agreement and logit SQNR with it
    dump_dir: Path | None = None
    export_onnx: Path | None = None  # write the quantized network as an ONNX QDQ model here (onnx_export)
    eval_onnx: bool = False  # evaluate that model in ONNX Runtime right after the simulator's pass
    onnx_relu_pairs: bool = False  # repeat each output grid after the Relu/Clip reading it (same values; ORT fuses)
    results: Path = Path("results/results.csv")
    compile: bool = False  # each pass under torch.compile (use mode, round-to-nearest)
    print_freq: int = 10
    world_size: int = field(default_factory=world_size)  # processes torchrun started
    dist_timeout: float = DEFAULT_TIMEOUT_MINUTES  # minutes a rank waits for a lost peer (torchrun only)

    def __post_init__(self) -> None:  # noqa: C901 - one check a rule, in the order a reader meets the flags
        from .models import default_weights

        set_ = object.__setattr__
        if self.weights is None:
            set_(self, "weights", default_weights(self.arch))
        set_(self, "device", _resolve_device(self.device, self.device_ids))
        if self.stats_mode not in STATS_MODES:
            raise ConfigError(f"stats_mode must be one of {', '.join(STATS_MODES)}, got {self.stats_mode!r}",
                              "stats_mode")
        act, sweeps = self.act, self.eval_precision or self.layer_selection
        if self.weight.bits == AUTO:  # int8 weights when anything else is quantized, float otherwise
            bits = 8 if act.bits is not None or sweeps else None
            set_(self, "weight", replace(self.weight, bits=bits))
        if self.equalize and not self.fold_bn:
            raise ConfigError("`equalize` rescales the BatchNorm-folded network (and reads the BatchNorm statistics "
                              "for its bias absorption): drop `fold_bn`", "equalize", "fold_bn")
        self._check_widths()
        self._check_sweeps()
        _check_observers(self.observers)
        if tuple(self.observers) != COLLECTED_OBSERVERS:
            if self.stats_mode != "collect" or self.compare:
                raise ConfigError("the observers choose what a collect pass gathers (a comparison collects what its "
                                  "methods need): give them with stats_mode collect", "observers", "stats_mode")
        if act.per_channel and act.bits is None and not sweeps and not self.compare and self.stats_mode != "collect":
            raise ConfigError("per-channel activation grids quantize activations: give act.bits too",
                              "act.per_channel", "act.bits")
        if act.per_channel and self.stats_mode == "no":
            raise ConfigError("per-channel activation grids come from statistics: collect them with per-channel "
                              "activations (stats_mode collect), then use them (stats_mode use)",
                              "act.per_channel", "stats_mode")
        correct = self.correct
        if correct.act_bias and self.stats_mode == "collect":
            raise ConfigError("activation bias correction corrects a quantized network: not in a collect pass",
                              "correct.act_bias", "stats_mode")
        if correct.act_bias and act.bits is None and self.weight.bits is None and not sweeps:
            raise ConfigError("activation bias correction corrects the mean shift that quantization causes, but "
                              "nothing is quantized", "correct.act_bias", "act.bits", "weight.bits")
        if correct.data_free_bias:
            if self.stats_mode == "collect":
                raise ConfigError("data-free bias correction corrects a quantized network: not in a collect pass",
                                  "correct.data_free_bias", "stats_mode")
            if correct.act_bias:
                raise ConfigError("correct.act_bias measures the mean shifts that correct.data_free_bias predicts: "
                                  "give one of them", "correct.data_free_bias", "correct.act_bias")
            if not self.fold_bn:
                raise ConfigError("data-free bias correction reads the folded BatchNorms' statistics: drop `fold_bn`",
                                  "correct.data_free_bias", "fold_bn")
            if self.weight.bits is None and not sweeps:
                raise ConfigError("data-free bias correction corrects the mean shift of quantized weights, but the "
                                  "weights are float", "correct.data_free_bias", "weight.bits")
        if correct.act_bias_rounds != 2 and not correct.act_bias:
            raise ConfigError("correct.act_bias_rounds counts the passes of activation bias correction: give "
                              "correct.act_bias too",
                              "correct.act_bias_rounds", "correct.act_bias")
        if self.rounding.learned and self.stats_mode == "collect" and not self.compare:
            raise ConfigError("AdaRound learns the rounding of a quantized network's weights: not in a collect pass",
                              "rounding.method", "stats_mode")
        if self.rounding.learned and self.world_size > 1:
            raise ConfigError("AdaRound learns each layer on all calibration images in one process: run it without "
                              "torchrun", "rounding.method")
        if self.stats_mode == "collect" and not self.compare and (sweeps or self.dump_dir):
            raise ConfigError("a collect pass only collects statistics; sweeps and dumps run with stats_mode use or no",
                              "stats_mode", "eval_precision", "layer_selection", "dump_dir")
        several = len(self.device_ids) > 1 and self.world_size == 1  # DataParallel
        if self.compile and (self.stats_mode != "use" or act.stochastic or several):
            raise ConfigError("compiling runs stats_mode use with round-to-nearest on one device (collection, live "
                              "statistics, stochastic rounding and several GPUs would split the compiled graph at "
                              "every layer)", "compile", "stats_mode", "act.stochastic")
        if not (isinstance(self.dist_timeout, int | float) and math.isfinite(self.dist_timeout)
                and 0 < self.dist_timeout <= 7 * 24 * 60):
            raise ConfigError(f"dist_timeout must be minutes in (0, 10080], got {self.dist_timeout!r}",
                              "dist_timeout")
        if isinstance(self.print_freq, bool) or not isinstance(self.print_freq, int) or self.print_freq < 0:
            raise ConfigError(f"print_freq must be >= 0, got {self.print_freq!r}", "print_freq")
        self._check_export()
        self.quant()  # the quantization groups together (allocation's prior, float weights) are checked now

    def _check_export(self) -> None:  # noqa: C901 - one refusal a setting QDQ cannot express
        """What an ONNX QDQ model can hold: one network with fixed grids of ONNX's integer widths."""
        if self.export_onnx is not None:
            object.__setattr__(self, "export_onnx", Path(self.export_onnx).expanduser())
        elif self.eval_onnx:
            raise ConfigError("eval_onnx evaluates the exported model: give export_onnx PATH too", "eval_onnx",
                              "export_onnx")
        if self.onnx_relu_pairs and (self.export_onnx is None or self.act.placement != "output"):
            raise ConfigError("onnx_relu_pairs repeats the grids of the layers' outputs after their activation "
                              "function: give export_onnx, with act.placement output", "onnx_relu_pairs",
                              "export_onnx", "act.placement")
        if self.export_onnx is None:
            return
        act, why = self.act, None
        if self.stats_mode == "collect":
            why = ("a collect pass quantizes nothing; export with stats_mode use (or no, for weights alone)",
                   "stats_mode")
        elif not self.quantizes:
            why = "nothing is quantized: give act.bits and/or weight.bits", "act.bits", "weight.bits"
        elif self.compare or self.eval_precision or self.layer_selection:
            why = ("a sweep or comparison evaluates many networks; export one setting at a time",
                   "compare", "eval_precision", "layer_selection")
        elif self.world_size > 1:
            why = "export from one process, not under torchrun", "export_onnx"
        elif act.stochastic:
            why = "QuantizeLinear rounds to nearest; stochastic rounding has no QDQ form", "act.stochastic"
        elif self.alloc.activations:
            why = ("bit allocation gives each activation channel its own level count, which a QuantizeLinear "
                   "saturating at its type's ends cannot keep", "alloc.activations")
        elif self.correct.weight_mean or self.correct.weight_variance:
            why = ("weight bias and variance corrections move the weights off their grid; a QDQ weight is on one",
                   "correct.weight_mean", "correct.weight_variance")
        elif self.stats_mode == "no" and act.bits is not None:
            why = ("stats_mode no takes each batch's own activation grids; a QDQ model has fixed ones: collect "
                   "statistics and export with stats_mode use", "stats_mode", "act.bits")
        if why is None and act.bits is not None:
            for name in ("bits", "first_bits", "classifier_bits"):
                bits = getattr(act, name)
                if bits is not None and bits not in EXPORT_ACT_WIDTHS:
                    why = (f"act.{name} int{bits} has no ONNX type of {2**bits} levels (QDQ activations are uint4 or "
                           "uint8); export int4 or int8 activations", f"act.{name}")
                    break
        if why is not None:
            message, *fields_ = why
            raise ConfigError(message, "export_onnx", *fields_)

    def _check_widths(self) -> None:
        act = self.act
        if self.compare_bits and not self.compare:
            raise ConfigError("several activation widths are for a comparison of methods (`compare`); give one width",
                              "act.bits", "compare")
        if len(set(self.compare_bits)) != len(self.compare_bits):
            raise ConfigError(f"each activation width once, got {self.compare_bits}", "act.bits")
        if len(set(self.compare)) != len(self.compare):
            raise ConfigError(f"each method once, got {', '.join(self.compare)}", "compare")
        if None in self.compare_bits:
            raise ConfigError("the compared activation widths are integer widths (the FP32 row comes first anyway), "
                              "got fp32 among them", "act.bits")
        for bits in self.compare_bits:
            check_width(bits, "act.bits")
        if not self.compare:
            return
        for name in self.compare:
            check_method(name, "compare")
            if act.per_channel:
                check_moments_only(name, "compare", "per-channel activation grids come from per-channel moments",
                                   CHANNEL_OBSERVERS)
        if act.bits is None:
            raise ConfigError("a comparison of clipping methods compares quantized activations: give act.bits, "
                              "one width or several (the FP32 reference row is always included)", "compare", "act.bits")
        if not self.compare_bits:
            object.__setattr__(self, "compare_bits", (act.bits,))
        if self.eval_precision:
            raise ConfigError("a comparison sweeps its own activation widths: not with the precision sweep",
                              "compare", "eval_precision")
        if self.layer_selection and len(self.compare_bits) != 1:
            raise ConfigError("a comparison of layer selections runs at one activation width", "compare",
                              "layer_selection", "act.bits")
        if self.dump_dir or self.compile:
            raise ConfigError("a comparison runs without dumps and compiling; dump or compile one method at a time",
                              "compare", "dump_dir", "compile")

    def _check_sweeps(self) -> None:
        if self.layer_selection and self.eval_precision:
            raise ConfigError("the precision sweep and layer selection are two different sweeps: run them one at a "
                              "time", "eval_precision", "layer_selection")
        if self.layer_selection and self.stats_mode != "use" and not self.compare:
            raise ConfigError("layer selection orders layers by their statistics: run it with stats_mode use",
                              "layer_selection", "stats_mode")
        if self.layer_selection and self.act.bits is None:
            raise ConfigError("layer selection keeps layers at 8 bits among the others at the activation width: give "
                              "act.bits, e.g. 4", "layer_selection", "act.bits")
        _positive(self.layer_selection_step, "layer_selection_step", allow_none=False)
        if self.layer_selection_step != 1 and not self.layer_selection:
            raise ConfigError("layer_selection_step thins the layer-selection sweep: give layer_selection too",
                              "layer_selection_step", "layer_selection")
        if (tuple(self.sweep_bits) != PRECISION_SWEEP or self.sweep_weight_bits) and not self.eval_precision:
            raise ConfigError("sweep_bits and sweep_weight_bits choose the widths of the precision sweep: give "
                              "eval_precision too", "sweep_bits", "sweep_weight_bits", "eval_precision")
        if None in self.sweep_bits:
            raise ConfigError("sweep_bits lists activation widths; the sweep's FP32 row comes first anyway",
                              "sweep_bits")
        for name in ("sweep_bits", "sweep_weight_bits"):
            values = getattr(self, name) or ()
            if len(set(values)) != len(values):
                raise ConfigError(f"{name}: each width once, got {values}", name)
            for bits in values:
                check_width(bits, name)

    def statistics_path(self, fingerprint: str) -> Path:
        """``stats_folder``, or by default a folder keyed by architecture, weights fingerprint, BatchNorm folding and
        equalization, so that statistics of other weights or another model never replace these."""
        if self.stats_folder is not None:
            return Path(self.stats_folder).expanduser()
        suffix = ("" if self.fold_bn else "-unfolded") + ("-equalized" if self.equalize else "")
        name = f"{self.arch}-{fingerprint}{suffix}"
        return (STATISTICS_ROOT / name).expanduser()

    @property
    def quantizes(self) -> bool:
        """Whether the run's own pass quantizes anything (activations or weights)."""
        return self.act.bits is not None or self.weight.bits is not None

    @property
    def needs_statistics(self) -> bool:
        """Use mode reads saved statistics only for passes that quantize activations."""
        return self.stats_mode == "use" and (self.act.bits is not None or self.eval_precision
                                             or self.layer_selection or bool(self.compare))

    def without_effect(self) -> dict[str, str]:
        """The settings that change nothing in this run, each with why: the CLI warns of those the user gave, and
        ``settings_hash`` leaves them out, so that a no-op flag never renames the run's files."""
        out = {}
        weight, edge = self.weight, self.weight.edge_bits
        widths = set(self.sweep_weight_bits) if self.eval_precision and self.sweep_weight_bits else {weight.bits}
        if edge is not None and not self.alloc.weights and all(w is None or edge <= w for w in widths):
            used = ", ".join(f"int{w}" for w in sorted(w for w in widths if w))
            out["weight.edge_bits"] = (
                f"weight.edge_bits int{edge} has no effect: it widens the first conv's and the classifier's weights "
                + (f"where weight.bits is narrower, and weight.bits is {used}" if used else
                   "when they are quantized, and weight.bits keeps them float"))
        rounding = self.rounding
        if not rounding.learned:
            for name in ("iters", "batch", "input", "reg"):
                if getattr(rounding, name) != getattr(RoundingConfig, name):
                    out[f"rounding.{name}"] = (f"rounding.{name} has no effect: it sets AdaRound, and the weights "
                                               "round to nearest")
        if weight.float_bias and all(w is None for w in widths):
            out["weight.float_bias"] = "weight.float_bias has no effect: weight.bits keeps weights and biases float"
        return out

    def quant(self) -> QuantConfig:
        """The run's quantization (``QuantConfig.with_pass`` varies it for one pass of a sweep)."""
        return QuantConfig(self.act, self.weight, self.alloc, self.correct, self.rounding, seed=self.data.seed)


def _resolve_device(requested: str | None, ids: tuple[int, ...]) -> str:
    import torch

    if requested is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif requested in ("cpu", "cuda") or requested.startswith("cuda:"):
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {requested} was asked for, but no CUDA GPU is available; use cpu", "device")
        device = requested
    else:
        raise ConfigError(f"unknown device {requested!r}: expected cuda or cpu", "device")
    if device == "cpu" and ids:
        raise ConfigError(f"device_ids {' '.join(map(str, ids))} choose GPUs, but `device` is cpu", "device_ids",
                          "device")
    if device == "cuda" and ids:
        device = f"cuda:{ids[0]}"
    return device


def _check_observers(names: tuple[str, ...]) -> None:
    try:
        for name in names:
            observer_class(name)
    except ObserverError as err:
        raise ConfigError(str(err), "observers") from None
    if "moments" not in names:
        raise ConfigError(f"every clipping rule reads the moments: include moments, got {', '.join(names)}",
                          "observers")


GROUPS = {f.name: f.default_factory for f in fields(RunConfig) if str(f.type).endswith("Config")}  # data, act, ...


def from_flat(values: Mapping[str, Any], cls: type[RunConfig] = RunConfig) -> RunConfig:
    """The tree from field paths (``act.bits``, ``data.root``, ``stats_mode``): the parsed flags as they are.

    ``cls``: ``RunConfig`` or a subclass with fields of its own (a plugin's settings).  A path that names no field
    is a programming error (a flag whose ``dest`` is not a field)."""
    groups: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
    top: dict[str, Any] = {}
    for path, value in values.items():
        group, _, name = path.rpartition(".")
        (groups[group] if group else top)[name] = value
    for name, kwargs in groups.items():
        factory = GROUPS[name]
        top[name] = replace(factory(), **kwargs) if kwargs else factory()
    return cls(**top)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Every setting of a (nested) config as ``{"act.bits": 4, ...}``, in field order."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def settings_hash(cfg: RunConfig, weights_fingerprint: str, stats_fingerprint: str) -> str:
    """Eight hex digits of sha256 over every setting that can shape a run's numbers or files, with the weights'
    and the statistics' fingerprints: the suffix of the files the run writes, so that runs that differ in any of
    them never overwrite each other's files, and identical runs write identical files."""
    shaping = {k: v for k, v in flatten(cfg).items() if k not in NOT_SHAPING}
    for path in cfg.without_effect():  # as if left at its default, which keeps the default runs' names
        group, _, name = path.rpartition(".")
        shaping[path] = getattr(GROUPS[group]() if group else RunConfig, name)
    text = json.dumps([shaping, weights_fingerprint, stats_fingerprint], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]
