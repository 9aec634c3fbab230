"""Quantized inference of a whole model through forward hooks: each Conv2d/Linear output (or input) is
fake-quantized, and its weight and bias with it.

``ModelQuantizer(model, config, statistics).attach()`` quantizes the layers' weights and biases (a
``WeightQuantizer``, which keeps the originals) and registers one forward hook per layer; ``detach()`` removes the
hooks and puts the exact original parameters back.  Per-layer decisions come from the one layer policy
(``policy.layer_policy``) and the clipping methods (``policy.plan_layers``), computed once from the statistics;
with no statistics the grid is computed by the same method from each live tensor instead (the seed's ``-sm no``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .fake_quant import quantize_per_channel_with_qparams, quantize_with_qparams
from .gemmlowp import QParams, gemmlowp_qparams, gemmlowp_qparams_per_channel, uniform_noise
from .graph import relu_fed_layers
from .layers import ActivationLayer, HookSet, activation_layers
from .methods import get_method
from .observers import Observation
from .policy import ActSpec, BitAllocation, LayerPlan, LayerPolicy, layer_policy, plan_layers
from .quant_config import QuantConfig
from .stats import Statistics, StatisticsError
from .weights import WeightQuantizer, weight_corrections


def model_policy(config: QuantConfig, model: nn.Module, layers: list[ActivationLayer]) -> LayerPolicy:
    """The layer policy of ``config`` for ``model``: with the half range, the layers whose output only feeds a
    ReLU (found in the model's graph) get one-sided grids."""
    one_sided = {}
    if config.act.half_range:
        by_path = {layer.module_name: layer.name for layer in layers}
        one_sided = {by_path[path]: cap for path, cap in relu_fed_layers(model).items() if path in by_path}
    return layer_policy(config, layers, one_sided)


class ModelQuantizer:
    """Attaches GEMMLOWP quantization of weights and activations to a model, and removes it exactly.

    With ``statistics`` the grids come from them (use mode); without, from each live tensor (no-stats mode).
    ``bias_shifts`` are added to the layers' quantized biases (the activations' bias correction, ``bias_correction``).
    """

    def __init__(self, model: nn.Module, config: QuantConfig, statistics: Statistics | None = None,
                 bias_shifts: Mapping[str, torch.Tensor] | None = None, plan: list[LayerPlan] | None = None,
                 policy: LayerPolicy | None = None, rounding: Mapping[str, torch.Tensor] | None = None) -> None:
        """``plan``: the ``plan_layers`` result for this config and statistics when the caller computed it already
        (``--compare`` times it), so that it is not computed twice; ``policy``: a layer policy of the caller's own
        (default: ``model_policy``, the seed's rules for ``config``); ``rounding``: learned up/down rounding of
        the weights (``adaround``; layer name -> bool tensor), nearest rounding for the layers it lacks."""
        self.model = model
        self.config = config
        self.layers = activation_layers(model)
        self.policy = policy if policy is not None else model_policy(config, model, self.layers)
        self.specs = self.policy.specs(self.layers)
        allocation = BitAllocation.of(config)
        self.weights = WeightQuantizer(self.layers, [s.weight for s in self.specs], config.weight,
                                       weight_corrections(config.correct), bias_shifts,
                                       allocation if config.alloc.weights else None, config.act.sigma, rounding)
        self.plan: list[LayerPlan] | None = None
        self._qparams: dict[str, QParams | None] = {}
        act = config.act
        if statistics is not None:
            if statistics.point != act.placement:
                raise StatisticsError(
                    f"the statistics in {statistics.folder} were collected at the layers' {statistics.point}s, but "
                    f"this run quantizes their {act.placement}s; collect them with --act_point {act.placement}"
                )
            self.plan = plan if plan is not None else plan_layers(
                self.layers, statistics, self.specs, act.sigma, act.per_channel,
                allocation if config.alloc.activations else None, act.missing_stats == "float")
            self._qparams = {p.name: self._plan_qparams(p) for p in self.plan}
        elif act.per_channel:
            raise ValueError("-pcq_a takes its per-channel grids from statistics: collect them with -sm collect -pcq_a "
                             "and run with -sm use")
        self._hooks = HookSet()
        self._generators: dict[torch.device, torch.Generator] = {}

    def _plan_qparams(self, p: LayerPlan) -> QParams | None:
        """A layer's grid parameters, once: per tensor, or per channel with each channel's level count."""
        act = self.config.act
        if p.bits is None:
            return None
        if not p.channels:
            return gemmlowp_qparams(p.delta, p.offset, p.bits, act.preserve_zero, act.pow2_scale)
        return gemmlowp_qparams_per_channel(
            torch.tensor(p.channel_delta, dtype=torch.float64), torch.tensor(p.channel_offset, dtype=torch.float64),
            p.bits, act.preserve_zero, act.pow2_scale, torch.tensor(p.channel_levels, dtype=torch.float64))

    def activation_grid(self, name: str) -> QParams | None:
        """The planned grid of layer ``name``'s activation (None: float, or no plan: live grids)."""
        return self._qparams.get(name)

    # -- attaching -----------------------------------------------------------------------------------------
    def attach(self) -> ModelQuantizer:
        if self._hooks.attached:
            return self
        self.weights.attach()
        planned = {p.name: p.bits for p in self.plan} if self.plan is not None else None
        for layer, spec in zip(self.layers, self.specs, strict=True):
            bits = planned[layer.name] if planned is not None else spec.act.bits
            if bits is not None:
                self._hooks.add_at(self.config.act.placement, layer, self._hook(layer, spec.act, bits))
        return self

    def detach(self) -> None:
        self._hooks.remove()
        self.weights.detach()
        self._generators.clear()

    def __enter__(self) -> ModelQuantizer:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- activations ---------------------------------------------------------------------------------------
    def _noise(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.config.act.stochastic:
            return None
        generator = self._generators.get(x.device)
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(self.config.seed)
            self._generators[x.device] = generator
        return uniform_noise(x, generator)

    def _hook(self, layer: ActivationLayer, spec: ActSpec, bits: int):
        """``hook(module, x)``: outputs are quantized in place (nothing else has read them yet); inputs are
        replaced by a quantized copy (a residual add may read the same tensor)."""
        cfg, act = self.config, self.config.act
        inplace = act.placement == "output"

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

        method = get_method(spec.method, act.sigma)
        need_spread = spec.method not in ("no", "minmax")
        need_histogram = "histogram" in method.requires  # searched on each live tensor's own histogram
        need_positive = "positive" in method.requires

        def dynamic_hook(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
            obs = Observation.of_tensor(layer.name, x, need_spread, histogram=need_histogram,
                                      positive=need_positive)
            grid = method.grid(obs, bits, spec.one_sided_for(obs), spec.cap)
            return quantize(x, gemmlowp_qparams(grid.delta, grid.offset, bits, act.preserve_zero, act.pow2_scale))

        return dynamic_hook


ActivationQuantizer = ModelQuantizer  # the previous releases' name (it quantizes the weights too)
