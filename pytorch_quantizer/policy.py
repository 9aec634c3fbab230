"""Layer policies: which bit width and clipping method each layer gets, and the per-layer plan they lead to.

A policy maps the hooked layers to ``LayerSpec`` rows (a role, a bit width or None for float, a method name);
``plan_layers`` then asks each layer's method for its grid from the saved observations, once, before inference.
Bit widths are data: the seed's policy is a few fields (first conv and classifier at their own widths, some
layers kept at ``kept_bits``, explicit per-layer overrides), and another policy (bit allocation, ReLU-aware
placement) is another class with a ``specs`` method.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

import pandas as pd

from .clipping import check_bits
from .layers import ActivationLayer
from .methods import get_method
from .observers import Observation
from .stats import Statistics


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


def plan_layers(
    layers: list[ActivationLayer], statistics: Statistics, policy: LayerPolicy, sigma_estimator: str = "range"
) -> list[LayerPlan]:
    """Each layer's grid from the saved observations, its policy spec and its method (computed once)."""
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
        grid = methods[spec.method].grid(obs, spec.bits, spec.one_sided_for(obs), spec.cap)
        plans.append(LayerPlan(layer.name, layer.module_name, spec.role, spec.bits, grid.method, grid.alpha,
                               grid.delta, grid.offset, grid.predicted_mse, grid.one_sided, spec.cap))
    return plans


def plan_table(plans: list[LayerPlan]) -> pd.DataFrame:
    """The per-layer decisions as a table (printable, and saved beside results)."""
    return pd.DataFrame([asdict(p) for p in plans]).set_index("name")


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
