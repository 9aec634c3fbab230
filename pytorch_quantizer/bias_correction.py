"""Empirical bias correction of activations (``-bca``): measure, on calibration images, the mean shift that
quantization causes in each output channel of each layer, and fold the opposite shift into that layer's bias.

Quantizing a layer changes the expectation of what it passes on: rounding a skewed weight distribution does not
average to zero, and clipping one long tail of an activation removes mass from one side only.  The shift is
measured *locally*: for layer ``l`` with input ``x`` as it arrives in the quantized network (before this layer's
own input quantizer, with ``--act_point input``),

    d_lc = E[ f_l(x; W, b) ]_c  -  E[ Q_out( f_l(Q_in(x); Q(W), Q(b) + d_l) ) ]_c

the mean over the calibration images and spatial positions of channel ``c`` of the float layer on that input,
minus the mean of what the quantized layer actually passes on: after its output quantizer (the seed's
placement), or computed from the quantized input (input placement).  So ``d_l`` counts the error of layer
``l``'s weights and of its own activation quantizer only; what the layers before it did is their own
correction's business.  For a layer whose output only feeds a ReLU (``graph.relu_fed_layers``) both means are
taken after that ReLU (``clamp(0, cap)``): what the ReLU discards is no error, and a one-sided grid (``-hr``)
already sets those values to 0 — measured before the ReLU, the "shift" of such a layer is the mean of its
negative part, and correcting it pushes the whole channel down (mobilenet_v2 W8A4 ``-hr``: 0.1 % top-1).

Why local: measuring against the float *network* (E[y_l(float net)] - E[y_l(quantized net)]) and correcting
every layer from one measurement counts each upstream shift again in every later layer; on mobilenet_v2 W8A4
with ``-hr`` that took top-1 on the sample from 61.9 % to 0.0 % after two rounds.  Correcting one layer at a time
in network order avoids it but costs a pass per layer.

The bias enters before the output quantizer, whose rounding and clipping make ``E[Q_out(y + d)]`` not exactly
``E[Q_out(y)] + d``; and the corrections of the layers before ``l`` change its input.  Each further *round*
measures again with the corrections in place and adds what is left (a fixed-point iteration of ``d_l``).  Cost:
one quantized pass over the calibration images per round, each layer's float twin computed beside it.

A deployed network keeps its bias in int32 at the accumulator's scale, so the correction is added after the bias
is quantized, not rounded to the weights' width (which would undo most of it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .layers import ActivationLayer, hook_free_copy

ChannelMeans = dict[str, torch.Tensor]  # module path -> float64 [out_channels] on the CPU


def _channel_sums(y: torch.Tensor) -> torch.Tensor:
    """float64 sums over every dimension but the channels (dim 1; a Linear's features)."""
    dims = [d for d in range(y.dim()) if d != 1] if y.dim() > 1 else [0]
    return y.detach().sum(dim=dims, dtype=torch.float64)


class ShiftRecorder:
    """Hooks measuring, per layer and output channel, the float layer's mean on the layer's incoming input minus
    the mean of what the quantized layer passes on (the module docstring's ``d_lc``).

    Enter it *after* the quantizer has attached its hooks: its pre-hook is prepended, so it stashes the input
    before an input quantizer replaces it, and its forward hook runs last, after an in-place output quantizer.
    The float layer is a copy of each module made at construction (so construct it before quantizing), run through
    its own ``forward`` (conv subclasses that pad in ``forward`` included).  Sums are float64 on the output's
    device; under DataParallel the replicas add theirs in the order they finish (the means move in the last bits
    only)."""

    def __init__(self, layers: Sequence[ActivationLayer], relu_caps: Mapping[str, float | None] | None = None
                 ) -> None:
        self.layers = list(layers)
        self.relu_caps = dict(relu_caps or {})  # module path -> cap of the ReLU it feeds (None: plain ReLU)
        self._float = {layer.module_name: hook_free_copy(layer.module) for layer in self.layers}
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._inputs = threading.local()  # the stashed input, per replica thread
        self._handles: list = []
        self._lock = threading.Lock()

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()

    def _hooks(self, layer: ActivationLayer) -> tuple[Callable, Callable]:
        name = layer.module_name

        def pre_hook(module: nn.Module, inputs: tuple) -> None:
            setattr(self._inputs, name, inputs[0].detach())

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = getattr(self._inputs, name)
            reference = self._float[name].to(x.device).forward(x)
            delattr(self._inputs, name)
            if name in self.relu_caps:
                reference = reference.clamp(0.0, self.relu_caps[name])
                output = output.clamp(0.0, self.relu_caps[name])
            step = _channel_sums(reference) - _channel_sums(output)
            with self._lock:
                previous = self._sums.get(name)
                self._sums[name] = step if previous is None else previous + step.to(previous.device)
                self._counts[name] = self._counts.get(name, 0) + output.numel() // max(step.numel(), 1)

        return pre_hook, hook

    def __enter__(self) -> ShiftRecorder:
        for layer in self.layers:
            pre_hook, hook = self._hooks(layer)
            self._handles.append(layer.module.register_forward_pre_hook(pre_hook, prepend=True))
            self._handles.append(layer.module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def shifts(self, reduce: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
               ) -> ChannelMeans:
        """The measured ``d_lc`` of every layer that ran (CPU, float64); ``reduce`` sums the per-channel sums and
        the counts over processes first (torchrun: ``DistContext.sum_tensors``; every rank runs every layer)."""
        sums = {name: total.cpu() for name, total in self._sums.items()}
        counts = {name: torch.tensor(float(n), dtype=torch.float64) for name, n in self._counts.items()}
        if reduce is not None:
            sums, counts = reduce(sums), reduce(counts)
        return {name: total / counts[name] for name, total in sums.items()}


def check_biases(layers: Iterable[ActivationLayer]) -> None:
    """``-bca`` folds each shift into a bias: every layer needs one (BatchNorm folding gives every conv a bias)."""
    missing = [layer.module_name for layer in layers if getattr(layer.module, "bias", None) is None]
    if missing:
        raise ValueError(f"-bca folds the mean shift into each layer's bias, but {len(missing)} layers have none "
                         f"(first: {missing[0]}); run with BatchNorm folding (without --no_fold_bn)")


def bias_shifts(
    layers: Sequence[ActivationLayer],
    quantized_run: Callable[[Mapping[str, torch.Tensor], ShiftRecorder], None],
    rounds: int,
    relu_caps: Mapping[str, float | None] | None = None,
    reduce: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> ChannelMeans:
    """The accumulated shifts after ``rounds`` rounds (see the module docstring).

    ``quantized_run(shifts, recorder)`` runs one calibration pass of the quantized network with ``shifts`` folded
    into the biases, entering ``recorder`` once the quantizer is attached.  ``relu_caps``: the layers that only
    feed a ReLU, measured after it (``ShiftRecorder``); ``reduce``: see ``ShiftRecorder.shifts``."""
    if rounds < 1:
        raise ValueError(f"-bca needs at least one round, got {rounds}")
    check_biases(layers)
    recorder = ShiftRecorder(layers, relu_caps)  # the float weights, before any quantizer touches them
    shifts: ChannelMeans = {}
    for _ in range(rounds):
        recorder.reset()
        quantized_run(shifts, recorder)
        for name, step in recorder.shifts(reduce).items():
            shifts[name] = shifts[name] + step if name in shifts else step
    return shifts
