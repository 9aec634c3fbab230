"""What one quantized pass does, as five small frozen groups that validate themselves: activations, weights, bit
allocation, corrections and weight rounding; ``QuantConfig`` holds them with the layers a sweep keeps at 8 bits.

Each field is one setting under one name from the command line (its flag's ``dest`` is ``<group>.<field>``,
``inference_sim.build_parser``) down to the code that reads it.  A bad value raises ``ConfigError`` naming the
fields it concerns, in the library's terms; the CLI maps those fields back to their flags.  This module sits
below the policy, the quantizers and the passes, and imports only the clipping math, the method and observer
registries and the layer placements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .clipping import ALLOCATION_MODES, PRIORS, SIGMA_ESTIMATORS, allocation_quota, check_bits
from .layers import ACT_POINTS
from .methods import get_method

MISSING_STATS = ("error", "float")  # what a quantized layer without statistics gets (act.missing_stats)

class ConfigError(ValueError):
    """A setting the library refuses; ``fields`` are the config paths (``act.bits``, ``stats_mode``) it concerns."""

    def __init__(self, message: str, *fields: str) -> None:
        super().__init__(message)
        self.fields = fields


def check_width(bits: int | None, name: str) -> int | None:
    """A bit width of 1..16, or None (float)."""
    if bits is None:
        return None
    try:
        return check_bits(bits)
    except ValueError as err:
        raise ConfigError(f"{name}: {err}", name) from None


def check_choice(value: str, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}", name)
    return value


def check_method(name: str, path: str) -> str:
    """A registered clipping method (or a family member such as ``p99.9``); an unknown one lists the valid names."""
    try:
        get_method(name)
    except ValueError as err:
        raise ConfigError(str(err), path) from None
    return name


# What a per-channel collect gathers for each channel (``observers.channel_observers``); a weight has its moments.
CHANNEL_OBSERVERS = ("moments", "positive")


def check_moments_only(method: str, path: str, why: str, available: tuple[str, ...] = ("moments",)) -> None:
    """``method`` needs nothing but ``available`` (no histogram): what per-channel grids and weights can give it."""
    requires = get_method(method).requires
    if any(name not in available for name in requires):
        raise ConfigError(f"{why}: `{path}` {method!r} needs {', '.join(requires)}; take one that needs only moments "
                          "(no, laplace, gaus, mix, minmax, Nstd, ...)", path)


MAX_BIAS_ROUNDS = 100  # measuring passes of the activations' bias correction (two are the default)
SAME = "same"  # WeightConfig.bias_bits: the biases at the weights' width
AUTO = "auto"  # WeightConfig.bits until the run resolves it: 8 when anything is quantized, else float


@dataclass(frozen=True)
class ActivationConfig:
    """How activations are quantized: ``bits`` None leaves them in float (the seed's default)."""

    bits: int | None = None
    method: str = "no"  # a registered clipping method (methods.method_names())
    placement: str = "output"  # each conv/linear's output (the seed) or its input (what an integer GEMM reads)
    half_range: bool = False  # one-sided grids for outputs that only feed a ReLU (the follow-up's -hr)
    per_channel: bool = False  # one grid per channel (dim 1), from per-channel statistics
    preserve_zero: bool = False  # 0.0 exactly on the grid (the seed's -pz)
    stochastic: bool = False  # stochastic rounding (the seed's -s)
    pow2_scale: bool = False  # scales rounded up to powers of two (the seed's -hs)
    sigma: str = "range"  # the Gaussian sigma estimator: from the range (the seed's) or the sample std
    first_bits: int | None = 8  # the first conv's output (the seed's rule; its input, the image, stays float)
    classifier_bits: int | None = 8  # the classifier's output, over its extreme range, never clipped
    kept_bits: int = 8  # the width of the layers a layer-selection sweep keeps
    missing_stats: str = "error"  # a quantized layer without statistics: refused, or left float and logged

    def __post_init__(self) -> None:
        for name in ("bits", "first_bits", "classifier_bits", "kept_bits"):
            check_width(getattr(self, name), f"act.{name}")
        check_method(self.method, "act.method")
        if self.per_channel:
            check_moments_only(self.method, "act.method", "per-channel activation grids come from per-channel moments",
                               CHANNEL_OBSERVERS)
        check_choice(self.placement, ACT_POINTS, "act.placement")
        check_choice(self.sigma, SIGMA_ESTIMATORS, "act.sigma")
        check_choice(self.missing_stats, MISSING_STATS, "act.missing_stats")
        if self.half_range and self.placement == "input":
            raise ConfigError("half range marks outputs that feed a ReLU; with input placement every non-negative "
                              "input gets a one-sided grid already", "act.half_range", "act.placement")


@dataclass(frozen=True)
class WeightConfig:
    """How weights and biases are quantized: ``bits`` None keeps them in float."""

    bits: int | None | str = 8  # AUTO: resolved by the run (RunConfig)
    edge_bits: int | None = 8  # the first conv's and the classifier's weights when ``bits`` is narrower (None: same)
    per_channel: bool = False  # one grid per output channel
    method: str = "no"  # clipping of the weights from their own moments ("no": min/max)
    bias_bits: int | None | str = SAME  # SAME: the weights' width (float with float_bias)
    float_bias: bool = False  # biases stay float: what a deployment's int32 biases at the accumulator's scale are
    preserve_zero: bool = True  # weights keep exact zeros, as GEMMLOWP/TFLite weight grids do
    pow2_scale: bool = False

    def __post_init__(self) -> None:
        check_width(self.edge_bits, "weight.edge_bits")
        check_method(self.method, "weight.method")
        check_moments_only(self.method, "weight.method", "weight clipping reads each weight's own moments")
        if self.bits == AUTO:
            return
        if self.bias_bits == SAME:
            object.__setattr__(self, "bias_bits", None if self.float_bias else self.bits)
        check_width(self.bits, "weight.bits")
        check_width(self.bias_bits, "weight.bias_bits")
        if self.method != "no" and self.bits is None:
            raise ConfigError(f"weight clipping ({self.method}) needs quantized weights", "weight.method",
                              "weight.bits")

    def bits_for(self, edge: bool) -> int | None:
        """The width of a layer's weights: edge layers (first conv, classifier) keep ``edge_bits`` when wider."""
        if edge and self.bits is not None and self.edge_bits is not None and self.edge_bits > self.bits:
            return self.edge_bits
        return self.bits


@dataclass(frozen=True)
class AllocationConfig:
    """The follow-up's bit allocation over channels (section 4): levels per channel proportional to scale^(2/3)."""

    activations: bool = False  # over each activation's channels (needs per-channel activations)
    weights: bool = False  # over each weight's output channels
    act_bits: float | None = None  # average bits a channel of the allocated activations (None: each layer's width)
    weight_bits: float | None = None  # likewise for the weights
    mode: str = "round"  # round (quota kept exactly) or ceil (the follow-up's, may exceed it)
    prior: str | None = None  # laplace or gaus (None: the activation method's prior)

    def __post_init__(self) -> None:
        check_choice(self.mode, ALLOCATION_MODES, "alloc.mode")
        if self.prior is not None:
            check_choice(self.prior, PRIORS, "alloc.prior")
        for name, on in (("act_bits", "activations"), ("weight_bits", "weights")):
            target = getattr(self, name)
            if target is None:
                continue
            try:
                allocation_quota(1, target)
            except ValueError as err:
                raise ConfigError(str(err), f"alloc.{name}") from None
            if not getattr(self, on):
                raise ConfigError(f"alloc.{name} is the target of the allocation of {on}: give alloc.{on} too",
                                  f"alloc.{name}", f"alloc.{on}")

    @property
    def active(self) -> bool:
        return self.activations or self.weights

    def resolved_prior(self, method: str) -> str:
        """The prior of the channels' scales: ``prior``, else the activation method when it is one (``slab``: the
        spike and slab of each channel's positive part, which a weight does not have)."""
        prior = self.prior or (method if method in (*PRIORS, "slab") else None)
        if prior is None:
            raise ConfigError(f"bit allocation needs a prior for the channels' scales: give alloc.prior laplace or "
                              f"gaus (the clipping method {method!r} is not one)", "alloc.prior", "act.method")
        if prior == "slab" and self.weights:
            raise ConfigError("weight bit allocation needs a prior for the weights' scales: give alloc.prior laplace "
                              "or gaus (the slab describes an activation's positive part)", "alloc.prior",
                              "alloc.weights")
        return prior


@dataclass(frozen=True)
class CorrectionConfig:
    """Bias corrections after quantization: of the weights (the follow-up's eq. 12 and 13) and of the activations
    (mean shifts folded into the biases: measured, ``bias_correction``, or predicted, ``dfq_bias``)."""

    weight_mean: bool = False  # restore each output channel's weight mean
    weight_variance: bool = False  # restore each output channel's centred weight norm
    act_bias: bool = False  # fold each channel's measured output mean shift into its bias
    act_bias_rounds: int = 2  # measuring passes over the calibration images
    data_free_bias: bool = False  # fold each channel's mean shift predicted from BatchNorm statistics (DFQ)

    def __post_init__(self) -> None:
        if isinstance(self.act_bias_rounds, bool) or not isinstance(self.act_bias_rounds, int) \
                or not 1 <= self.act_bias_rounds <= MAX_BIAS_ROUNDS:
            raise ConfigError(f"correct.act_bias_rounds must be an integer in 1..{MAX_BIAS_ROUNDS} (each is a pass "
                              f"over the calibration images), got {self.act_bias_rounds!r}", "correct.act_bias_rounds")


WEIGHT_ROUNDINGS = ("nearest", "adaround")  # how a weight is put on its grid (rounding.method)
ROUNDING_INPUTS = ("float", "quantized")  # where AdaRound's layer inputs come from (rounding.input)
MAX_ADAROUND_ITERS = 1_000_000


@dataclass(frozen=True)
class RoundingConfig:
    """How each weight is put on its grid: to the nearest level (the seed), or up or down as AdaRound learned it
    from the layer's output on the calibration images (``adaround``)."""

    method: str = "nearest"
    iters: int = 300  # Adam steps per layer
    batch: int = 16  # calibration images a step
    input: str = "float"  # a layer's input from the float network, or from the network quantized up to it
    reg: float = 0.01  # weight of the rounding regulariser against the reconstruction error (the paper's)

    def __post_init__(self) -> None:
        check_choice(self.method, WEIGHT_ROUNDINGS, "rounding.method")
        check_choice(self.input, ROUNDING_INPUTS, "rounding.input")
        for name, top in (("iters", MAX_ADAROUND_ITERS), ("batch", 1 << 16)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise ConfigError(f"rounding.{name} must be an integer in 1..{top}, got {value!r}", f"rounding.{name}")
        if not (isinstance(self.reg, int | float) and math.isfinite(self.reg) and self.reg >= 0):
            raise ConfigError(f"rounding.reg must be a finite number >= 0, got {self.reg!r}", "rounding.reg")

    @property
    def learned(self) -> bool:
        return self.method == "adaround"


@dataclass(frozen=True)
class QuantConfig:
    """Everything one quantized pass needs: the five groups, the layers a sweep keeps at ``act.kept_bits``, the
    stochastic-rounding seed and the kernel backend (None: the tensor's device decides)."""

    act: ActivationConfig = field(default_factory=lambda: ActivationConfig(bits=8))
    weight: WeightConfig = field(default_factory=WeightConfig)
    alloc: AllocationConfig = field(default_factory=AllocationConfig)
    correct: CorrectionConfig = field(default_factory=CorrectionConfig)
    rounding: RoundingConfig = field(default_factory=RoundingConfig)
    keep_8bit: frozenset[str] = field(default_factory=frozenset)  # layer names kept at act.kept_bits
    seed: int = 0
    backend: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_8bit", frozenset(self.keep_8bit))
        if self.alloc.activations and not self.act.per_channel:
            raise ConfigError("bit allocation of activations shares levels among the channels of an activation: it "
                              "needs per-channel activations", "alloc.activations", "act.per_channel")
        if self.alloc.weights and self.weight.bits is None:
            raise ConfigError("bit allocation of weights shares the levels of quantized weights: not with float "
                              "weights", "alloc.weights", "weight.bits")
        if self.alloc.active:
            self.alloc.resolved_prior(self.act.method)
        if self.rounding.learned and self.weight.bits is None:
            raise ConfigError("AdaRound learns how quantized weights round: not with float weights",
                              "rounding.method", "weight.bits")

    def with_pass(self, bits: int | None | str = SAME, weight_bits: int | None | str = SAME,
                  method: str | None = None, keep_8bit: frozenset[str] | None = None) -> QuantConfig:
        """This configuration for one pass of a sweep: another activation width, weight width, method or kept
        layers (SAME / None: unchanged)."""
        act = self.act if bits == SAME else replace(self.act, bits=bits)
        act = act if method is None else replace(act, method=method)
        weight = self.weight if weight_bits == SAME else replace(self.weight, bits=weight_bits, bias_bits=SAME)
        return replace(self, act=act, weight=weight, keep_8bit=self.keep_8bit if keep_8bit is None else keep_8bit)
