"""Layer policies: which bit width and clipping method each layer gets, and the per-layer plan they lead to.

A policy maps the hooked layers to ``LayerSpec`` rows (a role, a bit width or None for float, a method name);
``plan_layers`` then asks each layer's method for its grid from the saved observations, once, before inference.
Bit widths are data: the seed's policy is a few fields (first conv and classifier at their own widths, some
layers kept at ``kept_bits``, explicit per-layer overrides), and another policy (bit allocation, ReLU-aware
placement) is another class with a ``specs`` method.
"""

from __future__ import annotations

import statistics as pystats
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Protocol

import pandas as pd

from .clipping import (
    ALLOCATION_MODES,
    SIGMA_ESTIMATORS,
    ClipDecision,
    allocate_levels,
    allocated_alpha,
    allocation_quota,
    check_bits,
    check_prior,
    clipping_noise,
)
from .layers import ActivationLayer
from .methods import ClippingMethod, Grid, get_method
from .observers import Observation
from .stats import Statistics, StatisticsError


@dataclass(frozen=True)
class LayerSpec:
    """What a policy decides for one layer's output."""

    role: str  # "first", "classifier", "kept", "float" (activations not quantized) or "" (a regular layer)
    bits: int | None  # None: left in float
    method: str  # a registered clipping method
    one_sided: bool = False  # a grid over [0, ...]: the output only feeds a ReLU-like activation
    cap: float | None = None  # that activation's upper bound (ReLU6: 6), None when unbounded
    one_sided_if_nonnegative: bool = False  # one-sided when the observed minimum is >= 0 (post-ReLU inputs)

    def one_sided_for(self, obs: Observation) -> bool:
        """Whether this layer's grid starts at 0, given what was observed of it."""
        return self.one_sided or (self.one_sided_if_nonnegative and obs.extreme[0] >= 0.0)


class LayerPolicy(Protocol):
    def specs(self, layers: list[ActivationLayer]) -> list[LayerSpec]: ...


def edge_layers(layers: list[ActivationLayer]) -> tuple[int | None, int]:
    """Indices of the first conv (it sees the image) and of the classifier (the last layer): the layers the seed and
    its follow-up keep at 8 bits."""
    return next((i for i, layer in enumerate(layers) if layer.kind == "conv"), None), len(layers) - 1


@dataclass(frozen=True)
class SeedPolicy:
    """The seed's rules: every layer at ``bits`` with ``method``; the first conv at ``first_layer_bits``; the last
    layer (the classifier) at ``classifier_bits`` over its extreme range (``classifier_method``, never clipped);
    layers named in ``kept`` (seed names or module paths) at ``kept_bits``; ``layer_bits`` overrides any layer's
    width by name.  ``bits`` None quantizes no activation at all."""

    bits: int | None = 8
    method: str = "no"
    first_layer_bits: int | None = 8
    classifier_bits: int | None = 8
    classifier_method: str = "minmax"
    kept: frozenset[str] = field(default_factory=frozenset)
    kept_bits: int = 8
    layer_bits: Mapping[str, int | None] = field(default_factory=dict)
    one_sided: Mapping[str, float | None] = field(default_factory=dict)  # module path -> ReLU cap (graph.py)
    one_sided_if_nonnegative: bool = False  # inputs seen only >= 0 (after a ReLU) get one-sided grids

    def __post_init__(self) -> None:
        for bits in (self.bits, self.first_layer_bits, self.classifier_bits, self.kept_bits,
                     *self.layer_bits.values()):
            if bits is not None:
                check_bits(bits)
        get_method(self.method)
        get_method(self.classifier_method)
        object.__setattr__(self, "kept", frozenset(self.kept))

    def specs(self, layers: list[ActivationLayer]) -> list[LayerSpec]:
        if self.bits is None:
            return [LayerSpec("float", None, "no") for _ in layers]
        first_conv, classifier = edge_layers(layers)
        out = []
        for i, layer in enumerate(layers):
            if i == classifier:
                spec = LayerSpec("classifier", self.classifier_bits, self.classifier_method)
            elif i == first_conv:
                spec = LayerSpec("first", self.first_layer_bits, self.method)
            elif layer.name in self.kept or layer.module_name in self.kept:
                spec = LayerSpec("kept", self.kept_bits, self.method)
            else:
                spec = LayerSpec("", self.bits, self.method)
            for key in (layer.name, layer.module_name):
                if key in self.layer_bits:
                    spec = replace(spec, bits=self.layer_bits[key])
            if layer.module_name in self.one_sided and spec.role != "classifier":
                spec = replace(spec, one_sided=True, cap=self.one_sided[layer.module_name])
            if self.one_sided_if_nonnegative and spec.role != "classifier":
                spec = replace(spec, one_sided_if_nonnegative=True)
            out.append(spec)
        return out


@dataclass(frozen=True)
class BitAllocation:
    """The follow-up's bit allocation over the channels of a layer (``-baa`` / ``-baw``): ``prior`` (laplace or gaus)
    gives each channel's scale and its alpha for the allocated level count; ``target_bits`` is the average width of
    the regular layers (None: each layer's own width; first, kept and classifier layers always use theirs);
    ``mode`` rounds the level counts (``clipping.allocate_levels``)."""

    prior: str = "laplace"
    target_bits: float | None = None
    mode: str = "round"
    sigma_estimator: str = "range"

    def __post_init__(self) -> None:
        check_prior(self.prior)
        if self.mode not in ALLOCATION_MODES:
            raise ValueError(f"unknown allocation rounding {self.mode!r}: expected "
                             f"{' or '.join(ALLOCATION_MODES)}")
        if self.sigma_estimator not in SIGMA_ESTIMATORS:
            raise ValueError(f"unknown sigma estimator {self.sigma_estimator!r}")
        if self.target_bits is not None:
            allocation_quota(1, self.target_bits)  # the range check

    def scale(self, stats) -> float:
        """The channel's prior scale: Laplace b, or Gaussian sigma; alpha is proportional to it."""
        return stats.b if self.prior == "laplace" else stats.sigma(self.sigma_estimator)

    def levels(self, channel_stats, bits: int, regular: bool) -> list[int]:
        """Level counts of the channels of one tensor, at ``target_bits`` on average for a regular layer, else at its
        own ``bits``."""
        target = self.target_bits if regular and self.target_bits is not None else bits
        return allocate_levels([self.scale(c) for c in channel_stats],
                               allocation_quota(len(channel_stats), target), self.mode)


class AllocatedPrior(ClippingMethod):
    """The analytical clip of one channel given ``levels`` levels at the layer's ``bits`` (bit allocation):
    alpha = optimal_alpha_for_bins(prior, bins) * scale.  Asked at another width (``one_sided_grid`` asks at
    bits + 1, the one-sided grid's equivalence with the two-sided one at twice the bins), bins double per bit."""

    name = "allocated"

    def __init__(self, allocation: BitAllocation, levels: int, bits: int) -> None:
        super().__init__(allocation.sigma_estimator)
        self.allocation, self.levels, self.bits = allocation, levels, bits

    def clip(self, obs: Observation, bits: int) -> ClipDecision:
        bins = self.levels * 2.0 ** (bits - self.bits)
        scale = self.allocation.scale(obs.moments)
        if scale <= 0.0:
            return ClipDecision(self.allocation.prior, 0.0, 0.0)
        alpha = allocated_alpha(self.allocation.prior, scale, bins)
        predicted = clipping_noise(self.allocation.prior, alpha, scale) + alpha**2 / (3.0 * bins * bins)
        return ClipDecision(self.allocation.prior, alpha, predicted)


@dataclass(frozen=True)
class LayerPlan:
    """The quantization decided for one layer's output (a row of the plan table)."""

    name: str
    module_name: str
    role: str  # a LayerSpec role, or "unobserved" (never called by the forward: no statistics, not quantized)
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


def layer_channels(layer: ActivationLayer, point: str) -> int | None:
    """Channels (dim 1) of the tensor quantized at ``point``: a conv's out/in channels, a linear's features."""
    module = layer.module
    attr = {("conv", "output"): "out_channels", ("conv", "input"): "in_channels",
            ("linear", "output"): "out_features", ("linear", "input"): "in_features"}[(layer.kind, point)]
    return getattr(module, attr, None)


def _channel_plan(layer: ActivationLayer, spec: LayerSpec, obs: Observation, method: ClippingMethod,
                  allocation: BitAllocation | None, statistics: Statistics) -> LayerPlan:
    """One grid per channel of the quantized tensor: the layer's method (or, under bit allocation, the clip for the
    channel's allocated level count) applied to that channel's moments; one-sidedness is decided for the layer."""
    channels = layer_channels(layer, statistics.point)
    if obs.channel_moments is None:
        raise StatisticsError(f"the statistics in {statistics.folder} hold no per-channel moments; collect them with "
                              "-sm collect -pcq_a")
    if channels is not None and len(obs.channel_moments) != channels:
        raise StatisticsError(f"the statistics in {statistics.folder} have {len(obs.channel_moments)} channels for "
                              f"{layer.name}, whose {statistics.point} has {channels}; collect them again with "
                              "-sm collect -pcq_a")
    one_sided = spec.one_sided_for(obs)
    count = len(obs.channel_moments)
    if allocation is not None and spec.role != "classifier":
        levels = allocation.levels(obs.channel_moments, spec.bits, spec.role == "")
        grids = [AllocatedPrior(allocation, levels[c], spec.bits).grid(obs.channel(c), spec.bits, one_sided, spec.cap)
                 for c in range(count)]
    else:
        levels = [2**spec.bits] * count
        grids = [method.grid(obs.channel(c), spec.bits, one_sided, spec.cap) for c in range(count)]
    return LayerPlan(
        layer.name, layer.module_name, spec.role, spec.bits, Counter(g.method for g in grids).most_common(1)[0][0],
        pystats.median(g.alpha for g in grids), pystats.median(g.delta for g in grids),
        pystats.median(g.offset for g in grids), sum(g.predicted_mse for g in grids) / count, one_sided, spec.cap,
        tuple(g.method for g in grids), tuple(g.alpha for g in grids), tuple(g.delta for g in grids),
        tuple(g.offset for g in grids), tuple(levels))


def _tensor_plan(layer: ActivationLayer, spec: LayerSpec, grid: Grid) -> LayerPlan:
    return LayerPlan(layer.name, layer.module_name, spec.role, spec.bits, grid.method, grid.alpha, grid.delta,
                     grid.offset, grid.predicted_mse, grid.one_sided, spec.cap)


def plan_layers(
    layers: list[ActivationLayer], statistics: Statistics, policy: LayerPolicy, sigma_estimator: str = "range",
    per_channel: bool = False, allocation: BitAllocation | None = None,
) -> list[LayerPlan]:
    """Each layer's grid from the saved observations, its policy spec and its method (computed once).

    ``per_channel`` (-pcq_a) gives every quantized layer one grid per channel of its quantized tensor (dim 1, at
    output or input placement alike), from the per-channel moments; ``allocation`` (-baa, needs ``per_channel``)
    shares the levels among a layer's channels (the classifier keeps its never-clipped rule)."""
    if allocation is not None and not per_channel:
        raise ValueError("bit allocation of activations shares levels among channels: it needs -pcq_a")
    if per_channel and not statistics.has_channel_moments:
        raise StatisticsError(f"the statistics in {statistics.folder} hold no per-channel moments; collect them with "
                              "-sm collect -pcq_a")
    statistics.check_layers(layers)
    specs = policy.specs(layers)
    methods = {name: get_method(name, sigma_estimator) for name in dict.fromkeys(s.method for s in specs)}
    for name, method in methods.items():
        if any(s.bits is not None and s.method == name for s in specs):
            statistics.require(method.requires, f"clipping method {name!r}")
    plans = []
    for layer, spec in zip(layers, specs, strict=True):
        if spec.bits is None or not statistics.has(layer.name):  # kept in float, or never called by the forward
            role = spec.role if spec.bits is None else "unobserved"
            plans.append(LayerPlan(layer.name, layer.module_name, role, None, "float", 0.0, 0.0, 0.0, 0.0))
            continue
        obs = statistics.observation(layer.name)
        method = methods[spec.method]
        if per_channel:
            plans.append(_channel_plan(layer, spec, obs, method, allocation, statistics))
        else:
            plans.append(_tensor_plan(layer, spec, method.grid(obs, spec.bits, spec.one_sided_for(obs), spec.cap)))
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


def mse_order(layers: list[ActivationLayer], statistics: Statistics, policy: SeedPolicy,
              sigma_estimator: str = "range") -> list[str]:
    """Regular layers (at ``policy.bits``) ordered by estimated quantization MSE, largest first (the seed's ``-ct``).

    The MSE is the one the layer's method predicts, relative to the layer's variance so that layers of different
    scales compare.  Layers the forward never called have no statistics and are not quantized, so they are left
    out (ViT's attention ``out_proj`` is used through its weights only)."""
    method = get_method(policy.method, sigma_estimator)
    scores = {}
    for layer, spec in zip(layers, policy.specs(layers), strict=True):
        if spec.role == "" and statistics.has(layer.name):
            obs = statistics.observation(layer.name)
            mse = method.grid(obs, spec.bits, spec.one_sided, spec.cap).predicted_mse
            scores[layer.name] = mse / max(obs.moments.std**2, 1e-30)
    return sorted(scores, key=lambda n: (-scores[n], n))
