"""Which layers' outputs are activations to observe or quantize, how they are named, and hook bookkeeping."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

ACT_POINTS = ("output", "input")  # which tensor of each layer is observed and quantized
QUANTIZED_TYPES: tuple[tuple[str, type[nn.Module]], ...] = (("conv", nn.Conv2d), ("linear", nn.Linear))


def in_out_channels(layer: nn.Module) -> tuple[int, int]:
    """The (input, output) channels of a conv, or the features of a linear layer."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


@dataclass(frozen=True)
class ActivationLayer:
    """One hooked layer: ``name`` is the seed's (``conv3_activation``), ``module_name`` the model's path."""

    name: str
    module_name: str
    kind: str  # "conv" or "linear"
    module: nn.Module


def activation_layers(model: nn.Module) -> list[ActivationLayer]:
    """Every Conv2d and Linear (subclasses included) in module order, convs and linears numbered apart."""
    counters = {kind: 0 for kind, _ in QUANTIZED_TYPES}
    layers = []
    for module_name, module in model.named_modules():
        for kind, cls in QUANTIZED_TYPES:
            if isinstance(module, cls):
                layers.append(ActivationLayer(f"{kind}{counters[kind]}_activation", module_name, kind, module))
                counters[kind] += 1
                break
    if not layers:
        raise ValueError("the model has no Conv2d or Linear layer to quantize")
    return layers


def hook_free_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with its current parameters and none of its hooks: the float twin that bias correction
    and AdaRound compute a layer's reference output with while the quantizer's hooks sit on the original."""
    twin = copy.deepcopy(module)
    for hooks in (twin._forward_hooks, twin._forward_pre_hooks):
        hooks.clear()
    return twin


@torch.no_grad()
def execution_order(model: nn.Module, layers: list[ActivationLayer], example: torch.Tensor) -> list[ActivationLayer]:
    """``layers`` in the order one forward of ``example`` first calls them (a model may register its modules in
    another order than it runs them); layers it never calls come last, in their order."""
    order: dict[str, int] = {}

    def seen(name: str) -> Callable[..., None]:
        return lambda _module, _inputs: (order.setdefault(name, len(order)), None)[1]  # None: the input is kept

    handles = [layer.module.register_forward_pre_hook(seen(layer.name)) for layer in layers]
    try:
        model(example)
    finally:
        for handle in handles:
            handle.remove()
    return sorted(layers, key=lambda layer: order.get(layer.name, len(order) + layers.index(layer)))


class ChannelClamp(nn.Module):
    """``min(relu(x), upper[c])`` with one cap a channel (dim 1): a ReLU6/Hardtanh(0, cap) whose channels were
    rescaled by cross-layer equalization (``equalize``), which keeps ``min(relu(x / s), cap / s)`` equal to
    ``min(relu(x), cap) / s``."""

    def __init__(self, upper: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("upper", upper.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        upper = self.upper.view(1, -1, *([1] * (x.dim() - 2)))
        return torch.minimum(x.clamp_min(0), upper)

    def extra_repr(self) -> str:
        return f"channels={self.upper.numel()}"


class HookSet:
    """Forward hooks on a list of layers that can be removed together; usable as a context manager."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def add(self, layer: ActivationLayer, hook: Callable[[nn.Module, tuple, torch.Tensor], None]) -> None:
        self._handles.append(layer.module.register_forward_hook(hook))

    def add_at(self, point: str, layer: ActivationLayer, hook: Callable[[nn.Module, torch.Tensor], object]) -> None:
        """``hook(module, tensor)`` on the layer's output (``point`` "output") or on its input ("input"); an input
        hook's return value, when not None, replaces the input (inputs are often read elsewhere too, e.g. by a
        residual add, so they are replaced, never changed in place)."""
        if point == "output":
            self.add(layer, lambda module, inputs, output: hook(module, output))
        elif point == "input":
            def pre_hook(module: nn.Module, inputs: tuple):
                new = hook(module, inputs[0])
                return None if new is None else (new, *inputs[1:])

            self._handles.append(layer.module.register_forward_pre_hook(pre_hook))
        else:
            raise ValueError(f"unknown activation point {point!r}: expected one of {', '.join(ACT_POINTS)}")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def check_finite(name: str, lo: float, hi: float) -> None:
    """Raise when a layer produced NaN or Inf (its min or max is not finite), naming the layer."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise FloatingPointError(f"layer {name} produced non-finite values (min {lo}, max {hi})")
