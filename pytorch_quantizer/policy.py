"""Layer policies: which bit width and clipping method each layer gets, and the per-layer plan they lead to.

One ``LayerPolicy`` maps every hooked layer (by its role or a name pattern) to a ``LayerSpec``: an activation spec
and a weight spec (bits, method, granularity, one-sidedness, allocated width).  The seed's rules, layer selection's
kept layers, the half range and bit allocation are rules of that one policy (``layer_policy``), data rather than
code.  ``plan_layers`` then asks each layer's method for its grid from the saved observations, once, before
inference.
"""

from __future__ import annotations

import logging
import statistics as pystats
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Any

import pandas as pd

from .clipping import (
    ALLOCATION_MODES,
    SIGMA_ESTIMATORS,
    ClipDecision,
    allocate_levels,
    allocated_clip,
    allocation_quota,
    check_bits,
    check_prior,
)
from .layers import ActivationLayer, in_out_channels
from .methods import ClippingMethod, Grid, SpikeAndSlab, get_method
from .observers import Observation
from .quant_config import QuantConfig
from .stats import Statistics, StatisticsError

log = logging.getLogger(__name__)


class Role(StrEnum):
    """What a layer is to the policy.  The values are the plan table's ``role`` column of the previous releases."""

    FIRST = "first"  # the first conv: it sees the image
    CLASSIFIER = "classifier"  # the last layer, over its extreme range
    KEPT = "kept"  # kept at a wider width by a layer-selection sweep (the seed's -ct)
    REGULAR = ""  # every other layer
    FLOAT = "float"  # every layer when no activation is quantized


@dataclass(frozen=True)
class ActSpec:
    """A layer's activation grid: ``bits`` None leaves it in float; ``levels_bits`` is the average width of its
    channels under bit allocation (None: not allocated)."""

    bits: int | None
    method: str  # a registered clipping method
    one_sided: bool = False  # a grid over [0, ...]: the output only feeds a ReLU-like activation
    cap: float | None = None  # that activation's upper bound (ReLU6: 6), None when unbounded
    one_sided_if_nonnegative: bool = False  # one-sided when the observed minimum is >= 0 (post-ReLU inputs)
    levels_bits: float | None = None

    def one_sided_for(self, obs: Observation) -> bool:
        """Whether this layer's grid starts at 0, given what was observed of it."""
        return self.one_sided or (self.one_sided_if_nonnegative and obs.extreme[0] >= 0.0)


@dataclass(frozen=True)
class WeightSpec:
    """A layer's weight grid: ``bits`` None keeps the weight in float; ``levels_bits`` as for ``ActSpec``."""

    bits: int | None
    per_channel: bool = False
    method: str = "no"  # clipping from the weight's own moments ("no": its min/max)
    levels_bits: float | None = None


@dataclass(frozen=True)
class LayerSpec:
    """What the policy decides for one layer, found by the layer's one key: its (seed) name."""

    name: str
    role: Role
    act: ActSpec
    weight: WeightSpec


@dataclass(frozen=True)
class Rule:
    """Layers matched by their place in the network (a ``Role``: FIRST, CLASSIFIER or REGULAR) or by a name
    pattern (``fnmatch`` on the layer's name) take these activation and weight fields, and ``role`` when given."""

    match: Role | str
    act: Mapping[str, Any] = field(default_factory=dict)
    weight: Mapping[str, Any] = field(default_factory=dict)
    role: Role | None = None

    def __post_init__(self) -> None:
        for group, spec in ((self.act, ActSpec), (self.weight, WeightSpec)):
            unknown = set(group) - {f.name for f in fields(spec)}
            if unknown:
                raise ValueError(f"rule for {self.match!r}: {spec.__name__} has no field {', '.join(sorted(unknown))}")
        for key in ("bits",):
            for group in (self.act, self.weight):
                if group.get(key) is not None:
                    check_bits(group[key])

    def matches(self, name: str, place: Role) -> bool:
        return self.match is place if isinstance(self.match, Role) else fnmatchcase(name, self.match)


def edge_layers(layers: list[ActivationLayer]) -> tuple[int | None, int]:
    """Indices of the first conv (it sees the image) and of the classifier (the last layer): the layers the seed and
    its follow-up keep at 8 bits."""
    return next((i for i, layer in enumerate(layers) if layer.kind == "conv"), None), len(layers) - 1


def places(layers: list[ActivationLayer]) -> list[Role]:
    """Each layer's place in the network: FIRST, CLASSIFIER or REGULAR (the classifier wins in a one-layer net)."""
    first, classifier = edge_layers(layers)
    return [Role.CLASSIFIER if i == classifier else Role.FIRST if i == first else Role.REGULAR
            for i in range(len(layers))]


@dataclass(frozen=True)
class LayerPolicy:
    """One mapping from layers to their activation and weight specs: the defaults, then every matching rule in
    order (a later rule overrides an earlier one).  ``layer_policy`` writes the seed's rules, layer selection's
    kept layers, half range and bit allocation's widths as such rules."""

    act: ActSpec
    weight: WeightSpec
    rules: tuple[Rule, ...] = ()

    def specs(self, layers: list[ActivationLayer]) -> list[LayerSpec]:
        out = []
        for layer, place in zip(layers, places(layers), strict=True):
            role, act, weight = place, self.act, self.weight
            for rule in self.rules:
                if rule.matches(layer.name, place):
                    act, weight = replace(act, **rule.act), replace(weight, **rule.weight)
                    role = rule.role if rule.role is not None else role
            out.append(LayerSpec(layer.name, role, act, weight))
        return out


def layer_policy(quant: QuantConfig, layers: list[ActivationLayer],
                 one_sided: Mapping[str, float | None] | None = None) -> LayerPolicy:
    """The seed's and the follow-up's rules for ``quant`` as data.

    - Every layer: activations at ``act.bits`` with ``act.method``, weights at ``weight.bits``.
    - ``one_sided`` (layer name -> ReLU cap, from ``graph.relu_fed_layers``: the half range): one-sided grids.
    - Layers a layer-selection sweep keeps (``keep_8bit``): activations at ``act.kept_bits``.
    - The first conv: activations at ``act.first_bits`` (float with input placement: its input is the image);
      the classifier: ``act.classifier_bits`` over its extreme range, never clipped nor one-sided; both keep their
      weights at ``weight.edge_bits`` when that is wider.
    - With input placement every input observed only >= 0 gets a one-sided grid.
    - Bit allocation: regular layers share ``alloc.act_bits`` / ``alloc.weight_bits`` levels on average a channel
      (else their own width), the first and kept layers their own width; the classifier is not allocated.
    """
    act_cfg, weight_cfg, alloc = quant.act, quant.weight, quant.alloc
    if act_cfg.bits is None:
        act = ActSpec(None, "no")
        rules: list[Rule] = [Rule(place, role=Role.FLOAT) for place in Role if place is not Role.FLOAT]
    else:
        inputs = act_cfg.placement == "input"
        allocated = alloc.activations
        act = ActSpec(act_cfg.bits, act_cfg.method, one_sided_if_nonnegative=inputs,
                      levels_bits=(alloc.act_bits or act_cfg.bits) if allocated else None)
        rules = [Rule(name, act={"one_sided": True, "cap": cap}) for name, cap in (one_sided or {}).items()]
        rules += [Rule(name, act={"bits": act_cfg.kept_bits, "levels_bits": act_cfg.kept_bits if allocated else None},
                       role=Role.KEPT) for name in sorted(quant.keep_8bit)]
        first_bits = None if inputs else act_cfg.first_bits
        rules.append(Rule(Role.FIRST, act={"bits": first_bits, "levels_bits": first_bits if allocated else None},
                          role=Role.FIRST))
        rules.append(Rule(Role.CLASSIFIER, act={"bits": act_cfg.classifier_bits, "method": "minmax", "one_sided": False,
                                                "cap": None, "one_sided_if_nonnegative": False, "levels_bits": None},
                          role=Role.CLASSIFIER))
    bits = weight_cfg.bits
    weight = WeightSpec(bits, weight_cfg.per_channel, weight_cfg.method,
                        (alloc.weight_bits or bits) if alloc.weights and bits is not None else None)
    edge = weight_cfg.bits_for(edge=True)
    if edge != bits:
        edge_rule = {"bits": edge, "levels_bits": edge if alloc.weights else None}
        rules += [Rule(Role.FIRST, weight=edge_rule), Rule(Role.CLASSIFIER, weight=edge_rule)]
    return LayerPolicy(act, weight, tuple(rules))


@dataclass(frozen=True)
class BitAllocation:
    """The follow-up's bit allocation over the channels of a tensor (``-baa`` / ``-baw``): ``prior`` (laplace or
    gaus) gives each channel's scale and its alpha for the allocated level count; ``mode`` rounds the level counts
    (``clipping.allocate_levels``).  How many levels a tensor shares is the policy's (``levels_bits``).

    Under ``slab`` (``-th slab -baa``, activations only) a channel's scale is s sqrt(p): its optimal MSE with L
    levels is p s^2 g(L) with g ~ 1 / L^2 up to a logarithm (``clipping.slab_upper``), so minimising the sum over
    channels under a fixed total of levels gives L_i proportional to (p_i s_i^2)^(1/3) = (s_i sqrt(p_i))^(2/3), the
    follow-up's 2/3 law with that scale.  A channel seldom firing (small p) gives up levels to busy ones."""

    prior: str = "laplace"
    mode: str = "round"
    sigma_estimator: str = "range"

    def __post_init__(self) -> None:
        if self.prior != "slab":
            check_prior(self.prior)
        if self.mode not in ALLOCATION_MODES:
            raise ValueError(f"unknown allocation rounding {self.mode!r}: expected "
                             f"{' or '.join(ALLOCATION_MODES)}")
        if self.sigma_estimator not in SIGMA_ESTIMATORS:
            raise ValueError(f"unknown sigma estimator {self.sigma_estimator!r}")

    @classmethod
    def of(cls, quant: QuantConfig) -> BitAllocation | None:
        """The run's allocation (None when neither activations nor weights are allocated)."""
        if not quant.alloc.active:
            return None
        return cls(quant.alloc.resolved_prior(quant.act.method), quant.alloc.mode, quant.act.sigma)

    def scale(self, stats) -> float:
        """The channel's prior scale: Laplace b, or Gaussian sigma; alpha is proportional to it."""
        return stats.b if self.prior == "laplace" else stats.sigma(self.sigma_estimator)

    def levels(self, channel_stats, target_bits: float) -> list[int]:
        """Level counts of the channels of one tensor, ``target_bits`` a channel on average."""
        return allocate_levels([self.scale(c) for c in channel_stats],
                               allocation_quota(len(channel_stats), target_bits), self.mode)

    def channel_levels(self, obs: Observation, target_bits: float) -> list[int]:
        """``levels`` of an activation's channels; under ``slab`` by s sqrt(p) of each channel's positive part."""
        if self.prior != "slab":
            return self.levels(obs.channel_moments, target_bits)
        count = len(obs.channel_moments)
        slabs = [SLAB.fit(obs.channel(c)) for c in range(count)]
        return allocate_levels([slab.s * slab.p**0.5 for slab in slabs], allocation_quota(count, target_bits),
                               self.mode)


SLAB = SpikeAndSlab()


class AllocatedPrior(ClippingMethod):
    """The analytical clip of one channel given ``levels`` levels at the layer's ``bits`` (bit allocation):
    alpha = optimal_alpha_for_bins(prior, bins) * scale.  Asked at another width (``one_sided_grid`` asks at
    bits + 1, the one-sided grid's equivalence with the two-sided one at twice the bins), bins double per bit."""

    name = "allocated"

    def __init__(self, allocation: BitAllocation, levels: int, bits: int) -> None:
        super().__init__(allocation.sigma_estimator)
        self.allocation, self.levels, self.bits = allocation, levels, bits

    def grid(self, obs: Observation, bits: int, one_sided: bool = False, cap: float | None = None) -> Grid:
        if self.allocation.prior == "slab":
            return SLAB.levels_grid(obs, self.levels * 2.0 ** (bits - self.bits), one_sided, cap)
        return super().grid(obs, bits, one_sided, cap)

    def clip(self, obs: Observation, bits: int) -> ClipDecision:
        bins = self.levels * 2.0 ** (bits - self.bits)
        scale = self.allocation.scale(obs.moments)
        if scale <= 0.0:
            return ClipDecision(self.allocation.prior, 0.0, 0.0)
        alpha, predicted = allocated_clip(self.allocation.prior, scale, bins)
        return ClipDecision(self.allocation.prior, alpha, predicted)


@dataclass(frozen=True)
class LayerPlan:
    """The quantization decided for one layer's output (a row of the plan table)."""

    name: str
    module_name: str
    role: str  # a LayerSpec role; "unobserved" (never called by the forward) or "missing" (no statistics): float
    bits: int | None  # None: left in float
    method: str  # the rule actually applied ("no" when the method's clip would not cut the observed range)
    alpha: float
    delta: float
    offset: float
    predicted_mse: float
    one_sided: bool = False  # the grid starts at 0 (a ReLU-fed output)
    cap: float | None = None
    # per channel (-pcq_a): one grid per channel; alpha, delta and offset above are then their medians
    channel_method: tuple[str, ...] = ()
    channel_alpha: tuple[float, ...] = ()
    channel_delta: tuple[float, ...] = ()
    channel_offset: tuple[float, ...] = ()
    channel_levels: tuple[int, ...] = ()

    @property
    def channels(self) -> int:
        """0 for a per-tensor grid, else the number of channels."""
        return len(self.channel_delta)


CHANNEL_FIELDS = ("channel_method", "channel_alpha", "channel_delta", "channel_offset", "channel_levels")


def layer_channels(layer: ActivationLayer, point: str) -> int:
    """Channels (dim 1) of the tensor quantized at ``point`` ("input" or "output"): a conv's in/out channels, a
    linear's features."""
    inputs, outputs = in_out_channels(layer.module)
    return {"input": inputs, "output": outputs}[point]


def _channel_plan(layer: ActivationLayer, spec: ActSpec, role: Role, obs: Observation, method: ClippingMethod,
                  allocation: BitAllocation | None, statistics: Statistics) -> LayerPlan:
    """One grid per channel of the quantized tensor: the layer's method (or, under bit allocation, the clip for the
    channel's allocated level count) applied to that channel's moments; one-sidedness is decided for the layer."""
    channels = layer_channels(layer, statistics.point)
    if obs.channel_moments is None:
        raise StatisticsError(f"the statistics in {statistics.folder} hold no per-channel moments; collect them with "
                              "-sm collect -pcq_a")
    if len(obs.channel_moments) != channels:
        raise StatisticsError(f"the statistics in {statistics.folder} have {len(obs.channel_moments)} channels for "
                              f"{layer.name}, whose {statistics.point} has {channels}; collect them again with "
                              "-sm collect -pcq_a")
    one_sided = spec.one_sided_for(obs)
    count = len(obs.channel_moments)
    if allocation is not None and spec.levels_bits is not None:
        levels = allocation.channel_levels(obs, spec.levels_bits)
        grids = [AllocatedPrior(allocation, levels[c], spec.bits).grid(obs.channel(c), spec.bits, one_sided, spec.cap)
                 for c in range(count)]
    else:
        levels = [2**spec.bits] * count
        grids = [method.grid(obs.channel(c), spec.bits, one_sided, spec.cap) for c in range(count)]
    return LayerPlan(
        layer.name, layer.module_name, role.value, spec.bits, Counter(g.method for g in grids).most_common(1)[0][0],
        pystats.median(g.alpha for g in grids), pystats.median(g.delta for g in grids),
        pystats.median(g.offset for g in grids), sum(g.predicted_mse for g in grids) / count, one_sided, spec.cap,
        tuple(g.method for g in grids), tuple(g.alpha for g in grids), tuple(g.delta for g in grids),
        tuple(g.offset for g in grids), tuple(levels))


def plan_layers(
    layers: list[ActivationLayer], statistics: Statistics, specs: list[LayerSpec], sigma_estimator: str = "range",
    per_channel: bool = False, allocation: BitAllocation | None = None, missing_float: bool = False,
) -> list[LayerPlan]:
    """Each layer's grid from the saved observations, its spec (``LayerPolicy.specs``) and its method, computed once.

    ``per_channel`` gives every quantized layer but the classifier one grid per channel of its quantized tensor
    (dim 1, at output or input placement alike), from the per-channel moments.  The classifier keeps its per-tensor
    extreme range: its output channels are class scores, and a class's score is high only on images of that class,
    so its per-channel maximum measures which classes the calibration images cover, not the range the score takes.
    A class the calibration missed gets a ceiling below its own images' scores, which ties them with the clamped
    runners-up; even a class it covers was seen on one or two images.  Every score shares the tensor's extreme
    range.  ``allocation`` shares the levels among the channels of the layers whose spec has ``levels_bits``.  A
    quantized layer the forward calls but the folder has nothing for
    is refused, unless ``missing_float`` (``--missing_stats float``) leaves it float (role "missing"), logged."""
    if per_channel and not statistics.has_channel_moments:
        raise StatisticsError(f"the statistics in {statistics.folder} hold no per-channel moments; collect them with "
                              "-sm collect -pcq_a")
    statistics.check_layers(layers)
    acts = [s.act for s in specs]
    methods = {name: get_method(name, sigma_estimator) for name in dict.fromkeys(a.method for a in acts)}
    for name, method in methods.items():
        if any(a.bits is not None and a.method == name for a in acts):
            statistics.require(method.requires, f"clipping method {name!r}")
    plans, left_float = [], []
    for layer, spec in zip(layers, specs, strict=True):
        act = spec.act
        missing = act.bits is not None and statistics.missing(layer.name)
        if missing and not missing_float:
            raise StatisticsError(f"the statistics in {statistics.folder} have nothing for {layer.name}, which this "
                                  "run quantizes (and which the forward calls); collect them again, or leave such "
                                  "layers float with --missing_stats float")
        if act.bits is None or not statistics.has(layer.name):  # kept in float, or never called by the forward
            role = spec.role.value if act.bits is None else "missing" if missing else "unobserved"
            left_float += [layer.name] if missing else []
            plans.append(LayerPlan(layer.name, layer.module_name, role, None, "float", 0.0, 0.0, 0.0, 0.0))
            continue
        obs = statistics.observation(layer.name)
        method = methods[act.method]
        if per_channel and spec.role is not Role.CLASSIFIER:
            plans.append(_channel_plan(layer, act, spec.role, obs, method, allocation, statistics))
        else:
            grid = method.grid(obs, act.bits, act.one_sided_for(obs), act.cap)
            plans.append(LayerPlan(layer.name, layer.module_name, spec.role.value, act.bits, grid.method, grid.alpha,
                                   grid.delta, grid.offset, grid.predicted_mse, grid.one_sided, act.cap))
    if left_float:
        log.warning("%d layers have no statistics in %s and stay float (--missing_stats float): %s",
                    len(left_float), statistics.folder, ", ".join(left_float))
    return plans


def plan_table(plans: list[LayerPlan]) -> pd.DataFrame:
    """The per-layer decisions as a table (printable, and saved beside results).

    Per-channel plans add summary columns (``channels``; min/median/max of the channels' alpha; min/max and total of
    their level counts), the median being the row's ``alpha``/``delta``/``offset``; the per-channel values are in
    ``channel_plan_table``.  Per-tensor plans give the table of the previous releases, column for column."""
    scalar = [f.name for f in fields(LayerPlan) if f.name not in CHANNEL_FIELDS]
    frame = pd.DataFrame([{k: getattr(p, k) for k in scalar} for p in plans]).set_index("name")
    if any(p.channels for p in plans):
        frame["channels"] = [p.channels for p in plans]
        frame["alpha_min"] = [min(p.channel_alpha) if p.channels else p.alpha for p in plans]
        frame["alpha_max"] = [max(p.channel_alpha) if p.channels else p.alpha for p in plans]
        frame["levels_min"] = [min(p.channel_levels) if p.channels else "" for p in plans]
        frame["levels_max"] = [max(p.channel_levels) if p.channels else "" for p in plans]
        frame["levels_total"] = [sum(p.channel_levels) if p.channels else "" for p in plans]
    return frame


def channel_plan_table(plans: list[LayerPlan]) -> pd.DataFrame:
    """One row per (layer, channel) of the per-channel plans: method, alpha, delta, offset and level count."""
    rows = [{"name": p.name, "channel": c, "method": p.channel_method[c], "alpha": p.channel_alpha[c],
             "delta": p.channel_delta[c], "offset": p.channel_offset[c], "levels": p.channel_levels[c]}
            for p in plans for c in range(p.channels)]
    return pd.DataFrame(rows, columns=["name", "channel", "method", "alpha", "delta", "offset", "levels"])


def mse_order(layers: list[ActivationLayer], statistics: Statistics, specs: list[LayerSpec],
              sigma_estimator: str = "range") -> list[str]:
    """Regular layers ordered by estimated quantization MSE, largest first (the seed's layer selection).

    The MSE is the one the layer's method predicts, relative to the layer's variance so that layers of different
    scales compare.  Layers the forward never called have no statistics and are not quantized, so they are left
    out (ViT's attention ``out_proj`` is used through its weights only)."""
    scores = {}
    for layer, spec in zip(layers, specs, strict=True):
        if spec.role is Role.REGULAR and statistics.has(layer.name):
            obs = statistics.observation(layer.name)
            method = get_method(spec.act.method, sigma_estimator)
            mse = method.grid(obs, spec.act.bits, spec.act.one_sided, spec.act.cap).predicted_mse
            scores[layer.name] = mse / max(obs.moments.std**2, 1e-30)
    return sorted(scores, key=lambda n: (-scores[n], n))
