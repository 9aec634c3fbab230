"""Quantized inference through forward hooks: each Conv2d/Linear output is fake-quantized in place.

``ActivationQuantizer(model, config, statistics).attach()`` quantizes the layers' weights and biases (keeping
the originals) and registers one forward hook per layer; ``detach()`` removes the hooks and puts the exact
original parameters back.  Per-layer decisions (bits, clipping, alpha, grid, predicted MSE) are computed
once from the statistics (``plan_layers``) and can be printed as a table; with no statistics the grid is
computed from each live tensor instead (the seed's ``-sm no``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pandas as pd
import torch
from torch import nn

from .clipping import METHODS, SIGMA_ESTIMATORS, TensorStats, aciq_range, check_bits, choose_clipping
from .layers import ActivationLayer, HookSet, activation_layers, check_finite
from .quantize import (
    QParams,
    gemmlowp_qparams,
    gemmlowp_quantize,
    gemmlowp_quantize_per_channel,
    quantize_with_qparams,
    uniform_noise,
)
from .stats import Statistics


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize.  ``None`` for a bit width means "keep float" (for weights, biases, first, classifier)."""

    bits: int | None = 8  # activations; None: no activation is quantized (weights alone, or nothing)
    threshold: str = "no"  # clipping method: no | laplace | gaus | mix
    weight_bits: int | None = 8
    bias_bits: int | None = 8
    weight_per_channel: bool = False  # one grid per output channel instead of per tensor
    first_layer_bits: int | None = 8  # the first conv's activation
    classifier_bits: int | None = 8  # the last layer's output, min of mins .. max of maxes, never clipped
    keep_8bit: frozenset[str] = field(default_factory=frozenset)  # layer names kept at 8 bits
    preserve_zero: bool = False  # activations (the seed's -pz)
    weight_preserve_zero: bool = True  # weights keep exact zeros, as GEMMLOWP/TFLite weight grids do
    stochastic: bool = False
    pow2_scale: bool = False
    sigma_estimator: str = "range"
    seed: int = 0
    backend: str | None = None

    def __post_init__(self) -> None:
        for bits in (self.bits, self.weight_bits, self.bias_bits, self.first_layer_bits, self.classifier_bits):
            if bits is not None:
                check_bits(bits)
        if self.threshold not in METHODS:
            raise ValueError(f"unknown clipping method {self.threshold!r}: expected one of {', '.join(METHODS)}")
        if self.sigma_estimator not in SIGMA_ESTIMATORS:
            raise ValueError(
                f"unknown sigma estimator {self.sigma_estimator!r}: expected one of {', '.join(SIGMA_ESTIMATORS)}"
            )
        object.__setattr__(self, "keep_8bit", frozenset(self.keep_8bit))


@dataclass(frozen=True)
class LayerPlan:
    """The quantization decided for one layer's output."""

    name: str
    module_name: str
    role: str  # "first", "classifier", "kept", "unobserved" (never called) or "" (a regular layer)
    bits: int | None  # None: left in float
    method: str  # the clipping actually applied ("no", "laplace", "gaus"; "minmax" for the classifier)
    alpha: float
    delta: float
    offset: float
    predicted_mse: float


def layer_roles(layers: list[ActivationLayer], config: QuantConfig) -> list[tuple[str, int | None]]:
    """(role, bits) per layer under the seed's policy: first conv and classifier at their own widths."""
    if config.bits is None:
        return [("float", None) for _ in layers]
    first_conv = next((i for i, layer in enumerate(layers) if layer.kind == "conv"), None)
    roles = []
    for i, layer in enumerate(layers):
        if i == len(layers) - 1:
            roles.append(("classifier", config.classifier_bits))
        elif i == first_conv:
            roles.append(("first", config.first_layer_bits))
        elif layer.name in config.keep_8bit or layer.module_name in config.keep_8bit:
            roles.append(("kept", 8))
        else:
            roles.append(("", config.bits))
    return roles


def plan_layers(layers: list[ActivationLayer], statistics: Statistics, config: QuantConfig) -> list[LayerPlan]:
    """Each layer's grid from the saved statistics and the clipping rule (computed once, before inference)."""
    statistics.check_layers(layers)
    plans = []
    for layer, (role, bits) in zip(layers, layer_roles(layers, config), strict=True):
        if bits is None or not statistics.has(layer.name):  # kept in float, or never called by the forward
            role = role if bits is None else "unobserved"
            plans.append(LayerPlan(layer.name, layer.module_name, role, None, "float", 0.0, 0.0, 0.0, 0.0))
            continue
        if role == "classifier":
            lo, hi = statistics.extreme_range(layer.name)
            stats = TensorStats(lo, hi, 0.0, 0.0, 0.0, statistics.numel(layer.name))
            decision = choose_clipping(stats, "no", bits)
            plans.append(LayerPlan(layer.name, layer.module_name, role, bits, "minmax", 0.0, hi - lo, lo,
                                   decision.predicted_mse))
            continue
        stats = statistics.tensor_stats(layer.name)
        decision = choose_clipping(stats, config.threshold, bits, config.sigma_estimator)
        delta, offset = aciq_range(stats.min, stats.max, stats.mean, decision.alpha)
        method = decision.method if delta < stats.range else "no"
        plans.append(
            LayerPlan(layer.name, layer.module_name, role, bits, method, decision.alpha, delta, offset,
                      decision.predicted_mse)
        )
    return plans


def mse_order(layers: list[ActivationLayer], statistics: Statistics, config: QuantConfig) -> list[str]:
    """Regular layers (at ``config.bits``) ordered by estimated quantization MSE, largest first (the seed's ``-ct``).

    The MSE is the analytical one for the chosen clipping, relative to the layer's variance so that layers of
    different scales compare.  Layers the forward never called have no statistics and are not quantized, so they
    are left out (ViT's attention ``out_proj`` is used through its weights only)."""
    regular = [layer.name for layer, (role, _) in zip(layers, layer_roles(layers, config), strict=True)
               if role == "" and statistics.has(layer.name)]
    scores = {}
    for name in regular:
        ts = statistics.tensor_stats(name)
        mse = choose_clipping(ts, config.threshold, config.bits, config.sigma_estimator).predicted_mse
        scores[name] = mse / max(ts.std**2, 1e-30)
    return sorted(regular, key=lambda n: (-scores[n], n))


def plan_table(plans: list[LayerPlan]) -> pd.DataFrame:
    """The per-layer decisions as a table (printable, and saved beside results)."""
    return pd.DataFrame([asdict(p) for p in plans]).set_index("name")


def live_stats(name: str, x: torch.Tensor, need_spread: bool) -> TensorStats:
    """Statistics of a whole activation tensor (all samples), for quantizing without saved statistics."""
    flat = x.detach().reshape(-1).float()
    lo, hi = torch.aminmax(flat)
    check_finite(name, lo.item(), hi.item())
    mean = flat.mean()
    b = std = 0.0
    if need_spread:
        centred = flat - mean
        b = centred.abs().mean().item()
        std = centred.square_().mean().sqrt().item()
    return TensorStats(lo.item(), hi.item(), mean.item(), b, std, max(flat.numel(), 2))


class ActivationQuantizer:
    """Attaches GEMMLOWP quantization of weights and activations to a model, and removes it exactly.

    With ``statistics`` the grids come from them (use mode); without, from each live tensor (no-stats mode).
    """

    def __init__(self, model: nn.Module, config: QuantConfig, statistics: Statistics | None = None) -> None:
        self.model = model
        self.config = config
        self.layers = activation_layers(model)
        self.roles = layer_roles(self.layers, config)
        self.plan: list[LayerPlan] | None = None
        self._qparams: dict[str, QParams | None] = {}
        if statistics is not None:
            self.plan = plan_layers(self.layers, statistics, config)
            self._qparams = {
                p.name: None if p.bits is None else gemmlowp_qparams(
                    p.delta, p.offset, p.bits, config.preserve_zero, config.pow2_scale
                )
                for p in self.plan
            }
        self._hooks = HookSet()
        self._originals: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._generators: dict[torch.device, torch.Generator] = {}

    # -- attaching -----------------------------------------------------------------------------------------
    def attach(self) -> ActivationQuantizer:
        if self._hooks.attached:
            return self
        self._quantize_parameters()
        planned = {p.name: p.bits for p in self.plan} if self.plan is not None else None
        for layer, (role, bits) in zip(self.layers, self.roles, strict=True):
            if planned is not None:
                bits = planned[layer.name]
            if bits is not None:
                self._hooks.add(layer, self._hook(layer, role, bits))
        return self

    def detach(self) -> None:
        self._hooks.remove()
        with torch.no_grad():
            for param, original in self._originals:
                param.copy_(original)
        self._originals.clear()
        self._generators.clear()

    def __enter__(self) -> ActivationQuantizer:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- weights -------------------------------------------------------------------------------------------
    def _quantize_parameters(self) -> None:
        cfg = self.config
        with torch.no_grad():
            for layer in self.layers:
                for param, bits, per_channel in (
                    (layer.module.weight, cfg.weight_bits, cfg.weight_per_channel),
                    (getattr(layer.module, "bias", None), cfg.bias_bits, False),
                ):
                    if param is None or bits is None:
                        continue
                    self._originals.append((param, param.detach().clone()))
                    quantized = quantize_parameter(
                        param.detach(), bits, per_channel, cfg.weight_preserve_zero, cfg.pow2_scale
                    )
                    param.copy_(quantized)

    # -- activations ---------------------------------------------------------------------------------------
    def _noise(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.config.stochastic:
            return None
        generator = self._generators.get(x.device)
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(self.config.seed)
            self._generators[x.device] = generator
        return uniform_noise(x, generator)

    def _hook(self, layer: ActivationLayer, role: str, bits: int):
        cfg = self.config
        if self.plan is not None:
            qp = self._qparams[layer.name]

            def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
                quantize_with_qparams(output, qp, inplace=True, noise=self._noise(output), backend=cfg.backend)

            return hook

        method = "no" if role == "classifier" else cfg.threshold

        def dynamic_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            stats = live_stats(layer.name, output, need_spread=method != "no")
            alpha = choose_clipping(stats, method, bits, cfg.sigma_estimator).alpha
            delta, offset = aciq_range(stats.min, stats.max, stats.mean, alpha)
            qp = gemmlowp_qparams(delta, offset, bits, cfg.preserve_zero, cfg.pow2_scale)
            quantize_with_qparams(output, qp, inplace=True, noise=self._noise(output), backend=cfg.backend)

        return dynamic_hook


def quantize_parameter(
    w: torch.Tensor, bits: int, per_channel: bool, preserve_zero: bool, pow2_scale: bool
) -> torch.Tensor:
    """Min/max GEMMLOWP quantization of a weight or bias, per tensor or per output channel (dim 0)."""
    if per_channel and w.dim() > 1:
        flat = w.reshape(w.shape[0], -1)
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        return gemmlowp_quantize_per_channel(
            w, (hi - lo).double(), lo.double(), bits, dim=0, preserve_zero=preserve_zero, pow2_scale=pow2_scale
        )
    lo, hi = torch.aminmax(w)
    return gemmlowp_quantize(w, (hi - lo).item(), lo.item(), bits, preserve_zero=preserve_zero, pow2_scale=pow2_scale)
