"""Quantized inference through forward hooks: each Conv2d/Linear output is fake-quantized in place.

``ActivationQuantizer(model, config, statistics).attach()`` quantizes the layers' weights and biases (a
``WeightQuantizer``, which keeps the originals) and registers one forward hook per layer; ``detach()`` removes the
hooks and puts the exact original parameters back.  Per-layer decisions come from the layer policy and the
clipping methods (``policy.plan_layers``), computed once from the statistics; with no statistics the grid is
computed by the same method from each live tensor instead (the seed's ``-sm no``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .clipping import SIGMA_ESTIMATORS, check_bits
from .graph import relu_fed_layers
from .grid import QParams, gemmlowp_qparams, gemmlowp_qparams_per_channel, uniform_noise
from .layers import ACT_POINTS, ActivationLayer, HookSet, activation_layers
from .methods import get_method
from .observers import Observation
from .policy import BitAllocation, LayerPlan, LayerSpec, SeedPolicy, edge_layers, plan_layers
from .quantize import quantize_per_channel_with_qparams, quantize_with_qparams
from .stats import Statistics, StatisticsError
from .weights import WeightCorrection, WeightQuantizer


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize.  ``None`` for a bit width means "keep float" (for weights, biases, first, classifier)."""

    bits: int | None = 8  # activations; None: no activation is quantized (weights alone, or nothing)
    threshold: str = "no"  # a registered clipping method (methods.method_names())
    weight_bits: int | None = 8
    bias_bits: int | None = 8
    edge_weight_bits: int | None = 8  # first conv and classifier weights when weight_bits is lower (None: no exception)
    weight_per_channel: bool = False  # one grid per output channel instead of per tensor
    weight_threshold: str = "no"  # clipping method of the weights (moment-based; "no": min/max)
    first_layer_bits: int | None = 8  # the first conv's activation
    classifier_bits: int | None = 8  # the last layer's output, min of mins .. max of maxes, never clipped
    keep_8bit: frozenset[str] = field(default_factory=frozenset)  # layer names kept at ``kept_bits``
    kept_bits: int = 8
    preserve_zero: bool = False  # activations (the seed's -pz)
    weight_preserve_zero: bool = True  # weights keep exact zeros, as GEMMLOWP/TFLite weight grids do
    stochastic: bool = False
    pow2_scale: bool = False  # activations (the seed's -hs)
    weight_pow2_scale: bool = False  # weights and biases: -hs used to apply to them too, against its documentation
    sigma_estimator: str = "range"
    seed: int = 0
    backend: str | None = None
    weight_corrections: tuple[WeightCorrection, ...] = ()
    half_range: bool = False  # one-sided grids for outputs that only feed a ReLU (the follow-up's -hr)
    act_point: str = "output"  # quantize each layer's output (the seed) or its input (what an integer GEMM reads)
    per_channel_activations: bool = False  # -pcq_a: one grid per channel (dim 1) from per-channel statistics
    act_allocation: BitAllocation | None = None  # -baa: levels shared among each layer's channels (needs -pcq_a)
    weight_allocation: BitAllocation | None = None  # -baw: levels shared among each weight's output channels

    def __post_init__(self) -> None:
        for bits in (self.bits, self.weight_bits, self.bias_bits, self.first_layer_bits, self.classifier_bits,
                     self.kept_bits, self.edge_weight_bits):
            if bits is not None:
                check_bits(bits)
        get_method(self.threshold)  # an unknown name lists the registered ones
        get_method(self.weight_threshold)
        if self.sigma_estimator not in SIGMA_ESTIMATORS:
            raise ValueError(
                f"unknown sigma estimator {self.sigma_estimator!r}: expected one of {', '.join(SIGMA_ESTIMATORS)}"
            )
        if self.act_point not in ACT_POINTS:
            raise ValueError(f"unknown activation point {self.act_point!r}: expected one of {', '.join(ACT_POINTS)}")
        if self.half_range and self.act_point == "input":
            raise ValueError("half range marks outputs that feed a ReLU; with input placement every non-negative "
                             "input gets a one-sided grid already")
        if self.act_allocation is not None and not self.per_channel_activations:
            raise ValueError("-baa shares levels among the channels of an activation: it needs -pcq_a")
        object.__setattr__(self, "keep_8bit", frozenset(self.keep_8bit))

    def policy(self, model: nn.Module | None = None) -> SeedPolicy:
        """The seed's layer policy with this configuration's widths and method; with ``half_range`` the ReLU-fed
        layers of ``model`` (found in its graph) get one-sided grids.  With input placement the first layer's input
        (the image) stays float, and every input whose observed minimum is >= 0 gets a one-sided grid."""
        inputs = self.act_point == "input"
        one_sided = {}
        if self.half_range:
            if model is None:
                raise ValueError("half_range needs the model, to find which layers feed a ReLU")
            one_sided = relu_fed_layers(model)
        return SeedPolicy(bits=self.bits, method=self.threshold,
                          first_layer_bits=None if inputs else self.first_layer_bits,
                          classifier_bits=self.classifier_bits, kept=self.keep_8bit, kept_bits=self.kept_bits,
                          one_sided=one_sided, one_sided_if_nonnegative=inputs)

    def weight_quantizer(self, layers: list[ActivationLayer],
                         bias_shifts: Mapping[str, torch.Tensor] | None = None) -> WeightQuantizer:
        """Weights at ``weight_bits``; the first conv's and the classifier's at ``edge_weight_bits`` when that is
        wider (the follow-up quantizes the other layers to 4 bits and keeps these two at 8)."""
        layer_bits = {}
        edge = self.edge_weight_bits
        if self.weight_bits is not None and edge is not None and edge > self.weight_bits:
            layer_bits = {layers[i].module_name: edge for i in edge_layers(layers) if i is not None}
        return WeightQuantizer(layers, self.weight_bits, self.bias_bits, self.weight_per_channel,
                               self.weight_preserve_zero, self.weight_pow2_scale, self.weight_corrections, layer_bits,
                               bias_shifts, get_method(self.weight_threshold, self.sigma_estimator),
                               self.weight_allocation)


class ActivationQuantizer:
    """Attaches GEMMLOWP quantization of weights and activations to a model, and removes it exactly.

    With ``statistics`` the grids come from them (use mode); without, from each live tensor (no-stats mode).
    ``bias_shifts`` are added to the layers' quantized biases (the activations' bias correction, ``bias_correction``).
    """

    def __init__(self, model: nn.Module, config: QuantConfig, statistics: Statistics | None = None,
                 bias_shifts: Mapping[str, torch.Tensor] | None = None, plan: list[LayerPlan] | None = None) -> None:
        """``plan``: the ``plan_layers`` result for this config and statistics when the caller computed it already
        (``--compare`` times it), so that it is not computed twice."""
        self.model = model
        self.config = config
        self.layers = activation_layers(model)
        self.policy = config.policy(model)
        self.specs = self.policy.specs(self.layers)
        self.weights = config.weight_quantizer(self.layers, bias_shifts)
        self.plan: list[LayerPlan] | None = None
        self._qparams: dict[str, QParams | None] = {}
        if statistics is not None:
            if statistics.point != config.act_point:
                raise StatisticsError(
                    f"the statistics in {statistics.folder} were collected at the layers' {statistics.point}s, but "
                    f"this run quantizes their {config.act_point}s; collect them with --act_point {config.act_point}"
                )
            self.plan = plan if plan is not None else plan_layers(
                self.layers, statistics, self.policy, config.sigma_estimator, config.per_channel_activations,
                config.act_allocation)
            self._qparams = {p.name: self._plan_qparams(p) for p in self.plan}
        elif config.per_channel_activations:
            raise ValueError("-pcq_a takes its per-channel grids from statistics: collect them with -sm collect -pcq_a "
                             "and run with -sm use")
        self._hooks = HookSet()
        self._generators: dict[torch.device, torch.Generator] = {}

    def _plan_qparams(self, p: LayerPlan) -> QParams | None:
        """A layer's grid parameters, once: per tensor, or per channel with each channel's level count."""
        cfg = self.config
        if p.bits is None:
            return None
        if not p.channels:
            return gemmlowp_qparams(p.delta, p.offset, p.bits, cfg.preserve_zero, cfg.pow2_scale)
        return gemmlowp_qparams_per_channel(
            torch.tensor(p.channel_delta, dtype=torch.float64), torch.tensor(p.channel_offset, dtype=torch.float64),
            p.bits, cfg.preserve_zero, cfg.pow2_scale, torch.tensor(p.channel_levels, dtype=torch.float64))

    # -- attaching -----------------------------------------------------------------------------------------
    def attach(self) -> ActivationQuantizer:
        if self._hooks.attached:
            return self
        self.weights.attach()
        planned = {p.name: p.bits for p in self.plan} if self.plan is not None else None
        for layer, spec in zip(self.layers, self.specs, strict=True):
            bits = planned[layer.name] if planned is not None else spec.bits
            if bits is not None:
                self._hooks.add_at(self.config.act_point, layer, self._hook(layer, spec, bits))
        return self

    def detach(self) -> None:
        self._hooks.remove()
        self.weights.detach()
        self._generators.clear()

    def __enter__(self) -> ActivationQuantizer:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- activations ---------------------------------------------------------------------------------------
    def _noise(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.config.stochastic:
            return None
        generator = self._generators.get(x.device)
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(self.config.seed)
            self._generators[x.device] = generator
        return uniform_noise(x, generator)

    def _hook(self, layer: ActivationLayer, spec: LayerSpec, bits: int):
        """``hook(module, x)``: outputs are quantized in place (nothing else has read them yet); inputs are
        replaced by a quantized copy (a residual add may read the same tensor)."""
        cfg = self.config
        inplace = cfg.act_point == "output"

        def quantize(x: torch.Tensor, qp: QParams | None) -> torch.Tensor | None:
            if qp is not None and isinstance(qp.scale, torch.Tensor):  # one grid per channel, dim 1
                y = quantize_per_channel_with_qparams(x, qp, 1, inplace=inplace, noise=self._noise(x),
                                                      backend=cfg.backend)
            else:
                y = quantize_with_qparams(x, qp, inplace=inplace, noise=self._noise(x), backend=cfg.backend)
            return None if inplace else y

        if self.plan is not None:
            qp = self._qparams[layer.name]
            on_device: dict[torch.device, QParams] = {}

            def planned_hook(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
                grid = qp
                if grid is not None and isinstance(grid.scale, torch.Tensor):  # copied to the device once, not per call
                    grid = on_device.get(x.device) or on_device.setdefault(
                        x.device, QParams(*(t.to(x.device) for t in (qp.scale, qp.inv_scale, qp.offset, qp.qmax))))
                return quantize(x, grid)

            return planned_hook

        method = get_method(spec.method, cfg.sigma_estimator)
        need_spread = spec.method not in ("no", "minmax")
        need_histogram = "histogram" in method.requires  # searched on each live tensor's own histogram

        def dynamic_hook(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
            obs = Observation.of_tensor(layer.name, x, need_spread, histogram=need_histogram)
            grid = method.grid(obs, bits, spec.one_sided_for(obs), spec.cap)
            return quantize(x, gemmlowp_qparams(grid.delta, grid.offset, bits, cfg.preserve_zero, cfg.pow2_scale))

        return dynamic_hook
