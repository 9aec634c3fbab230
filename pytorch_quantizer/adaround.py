"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020): learn, layer
by layer, whether each weight goes to the grid level below or above it, so that the layer's output on the
calibration images changes least.

**Why rounding to nearest is not best.**  Nearest rounding minimises each weight's own error, but a layer's output
error is ``dW x`` summed over the fan-in: with correlated inputs the per-weight errors add up through the second
moment ``E[x x^T]``, and the best rounding of a whole output channel is a quadratic binary problem in which
neighbouring weights compensate each other.  AdaRound relaxes it.

**The relaxation.**  On the layer's grid (scale ``s``, offset ``o``, levels ``0..qmax``, exactly the grid the
quantizer uses, per tensor or per output channel, any clipping or bit allocation), a weight ``w`` has the level
``f = floor((w - o) / s)`` below it.  The soft weight is

    w~ = s * clamp(f + h(V), 0, qmax) + o,      h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)

with zeta = 1.1, gamma = -0.1 (the rectified sigmoid: it reaches exactly 0 and 1 with finite V, so that a decided
weight stops receiving gradient).  V starts where h(V) equals the fractional part of ``(w - o) / s``, so the soft
weight starts at the float weight.  The loss is

    || f_a(W~ x + b) - f_a(W x_fp + b) ||^2  +  lambda * sum (1 - |2 h(V) - 1|^beta)

the squared error summed over output channels and averaged over images and positions (``f_a``: the ReLU/ReLU6 the
layer feeds when it feeds nothing else, as the paper does), plus the regulariser that pushes every h to 0 or 1.
beta anneals linearly from 20 to 2 after the first 20 % of the steps, during which the regulariser is off; lambda
= 0.01.  These are the paper's values.  Adam's step is ``TRAVEL / iters``: the paper's 10 000 steps at 1e-3 let a
V travel 10 units at most, and fewer steps keep that reach with a longer step (our default is 300 steps, so that
mobilenet_v2 learns in minutes on two cores).  At the end a weight rounds up where h(V) >= 1/2 (V >= 0): every
weight sits on the level below or above its scaled value (``weights.round_on_grid``).

**Where the input comes from** (``RoundingConfig.input``).  ``float``: ``x`` is the layer's input in the float
network, so the learned rounding depends only on the weights, their grid and the calibration images, and one
learning serves every activation width of a sweep or ``--compare``.  ``quantized``: ``x`` is the input in the
network quantized up to this layer (its learned weights and its activation grids), as the paper's asymmetric
reconstruction does, so that each layer also compensates what the layers before it did; the target is still the
float layer on the float input.  It costs a second capture per layer and a learning per activation setting.

The biases stay as they are while learning (the quantizer puts them on their own grid afterwards, and ``-bca``
measures its shifts with the learned weights in place).  Learned layers are cached by the caller (``passes``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from .atomic import atomic_write
from .gemmlowp import QParams
from .layers import ActivationLayer, hook_free_copy
from .quant_config import RoundingConfig
from .weights import grid_floor, grid_view, quantize_on_grid, round_on_grid

log = logging.getLogger("pytorch_quantizer")

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch
BETA_START, BETA_END, WARMUP = 20.0, 2.0, 0.2  # the regulariser's annealing, as in the paper
TRAVEL = 10.0  # Adam's step times the number of steps: the paper's 1e-3 x 10 000
CHUNK = 32  # images a forward of the reconstruction error reads at once
CAPTURE_BUDGET = 2 << 30  # bytes of float layer inputs held at once (the float inputs of several layers per pass)

QuantizedContext = Callable[[Mapping[str, torch.Tensor]], AbstractContextManager]


class SoftRounding(nn.Module):
    """The relaxed weight of one layer on its grid (the module docstring's ``w~``), with V as its parameter."""

    def __init__(self, weight: torch.Tensor, grid: QParams) -> None:
        super().__init__()
        w = weight.detach().float()
        self.register_buffer("w", w)
        scale, inv_scale, offset, qmax = grid_view(grid, w)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.register_buffer("qmax", qmax)
        self.register_buffer("floor", grid_floor(w, grid))
        rest = ((w - offset) * inv_scale - self.floor).clamp(0.0, 1.0)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0))

    def h(self) -> torch.Tensor:
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def forward(self) -> torch.Tensor:
        q = torch.minimum((self.floor + self.h()).clamp(min=0.0), self.qmax)
        return torch.where(self.scale > 0, q * self.scale + self.offset, self.w)

    def up(self) -> torch.Tensor:
        """Where the learned weight rounds up: h(V) >= 1/2, i.e. V >= 0."""
        return (self.v.detach() >= 0).cpu()

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()


def beta_at(step: int, iters: int) -> float | None:
    """The regulariser's exponent at ``step`` (None during the warm-up, when it is off)."""
    start = int(WARMUP * iters)
    if step < start:
        return None
    return BETA_END + (BETA_START - BETA_END) * max(0.0, 1.0 - (step - start) / max(iters - start, 1))


def reconstruction_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over output channels (dim 1), averaged over images and positions."""
    return (out - target).pow(2).sum(1).mean()


@dataclass
class LayerResult:
    """What learning one layer did: its reconstruction error on all calibration images with nearest and with
    learned rounding, the share of weights rounded away from nearest, and the seconds it took."""

    nearest: float
    learned: float
    flipped: float
    seconds: float


@dataclass
class LearnedRounding:
    """Every layer's learned rounding (layer name -> bool tensor, True: up), the seconds the learning took and
    what it did to each layer."""

    up: dict[str, torch.Tensor]
    seconds: float
    layers: dict[str, LayerResult] = field(default_factory=dict)

    def summary(self) -> str:
        if not self.layers:
            return f"AdaRound: {len(self.up)} layers"
        ratios = [r.learned / r.nearest for r in self.layers.values() if r.nearest > 0]
        median = sorted(ratios)[len(ratios) // 2] if ratios else float("nan")
        flipped = sum(r.flipped for r in self.layers.values()) / len(self.layers)
        return (f"AdaRound: {len(self.layers)} layers learned in {self.seconds:.1f} s; reconstruction error against "
                f"nearest rounding x{median:.3f} (median over layers), {100 * flipped:.1f} % of the weights "
                "rounded away from nearest (mean over layers)")

    def worse(self) -> list[str]:
        """The layers whose learned rounding reconstructs their output worse than nearest rounding on the
        calibration images: the learning did not converge (too few steps, each moving V by ``TRAVEL / iters``)."""
        return [name for name, r in self.layers.items() if r.learned > r.nearest]


class _Captured(Exception):
    """Stops a forward once the wanted layer's input is recorded (the rest of the network is not needed)."""


@torch.no_grad()
def capture_inputs(model: nn.Module, modules: Sequence[nn.Module], batches: Iterable[torch.Tensor],
                   context: AbstractContextManager | None = None) -> list[torch.Tensor]:
    """Each of ``modules``' input (its first call in a forward) on every image of ``batches``, as the model computes
    it, inside ``context`` (a quantizer attached; a module's own input quantizer runs first), on the model's
    device.  A forward stops at the last module: the rest of the network is not needed."""
    captured: list[list[torch.Tensor]] = [[] for _ in modules]
    seen: set[int] = set()

    def hook(i: int) -> Callable[..., None]:
        def record(_module: nn.Module, inputs: tuple) -> None:
            if i not in seen:
                seen.add(i)
                captured[i].append(inputs[0].detach().float().clone())
            if len(seen) == len(modules):
                raise _Captured
        return record

    with context if context is not None else contextlib.nullcontext():
        handles = [module.register_forward_pre_hook(hook(i)) for i, module in enumerate(modules)]
        try:
            for images in batches:
                seen.clear()
                with contextlib.suppress(_Captured):
                    model(images)
        finally:
            for handle in handles:
                handle.remove()
    return [torch.cat(parts) for parts in captured]


def capture_groups(sizes: Sequence[int], images: int, budget: int = CAPTURE_BUDGET) -> list[range]:
    """Consecutive layers whose inputs on ``images`` images (``sizes``: bytes an image) fit ``budget`` together:
    each group is captured in one float pass instead of one pass a layer."""
    groups, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size * images > budget:
            groups.append(range(start, i))
            start, total = i, 0
        total += size * images
    groups.append(range(start, len(sizes)))
    return groups


@torch.no_grad()
def _outputs(twin: nn.Module, weight: torch.Tensor, inputs: torch.Tensor, cap: tuple[float, float] | None
             ) -> torch.Tensor:
    params = {"weight": weight}
    out = torch.cat([functional_call(twin, params, (inputs[i:i + CHUNK],)) for i in range(0, len(inputs), CHUNK)])
    return out.clamp_(*cap) if cap is not None else out


def learn_layer(twin: nn.Module, grid: QParams, inputs: torch.Tensor, targets: torch.Tensor,
                cap: tuple[float, float] | None, cfg: RoundingConfig, generator: torch.Generator
                ) -> tuple[torch.Tensor, LayerResult]:
    """Learn the rounding of ``twin``'s weight on ``grid`` (the module docstring): ``inputs`` and ``targets`` are
    the layer's input and float output (after ``cap``'s clamp) on every calibration image."""
    start = time.perf_counter()
    weight = twin.weight.detach()
    soft = SoftRounding(weight, grid)
    optimizer = torch.optim.Adam([soft.v], lr=TRAVEL / cfg.iters)
    n = len(inputs)
    for step in range(cfg.iters):
        index = torch.randint(n, (min(cfg.batch, n),), generator=generator)
        out = functional_call(twin, {"weight": soft()}, (inputs[index],))
        if cap is not None:
            out = out.clamp(*cap)
        loss = reconstruction_error(out, targets[index])
        beta = beta_at(step, cfg.iters)
        if beta is not None and cfg.reg > 0:
            loss = loss + cfg.reg * soft.regulariser(beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    up = soft.up()
    nearest_w, learned_w = quantize_on_grid(weight, grid), round_on_grid(weight, grid, up)
    errors = [float(reconstruction_error(_outputs(twin, w, inputs, cap), targets)) for w in (nearest_w, learned_w)]
    flipped = float((nearest_w != learned_w).float().mean())
    return up, LayerResult(errors[0], errors[1], flipped, time.perf_counter() - start)


def learn_rounding(model: nn.Module, layers: Sequence[ActivationLayer], grids: Mapping[str, QParams | None],
                   batches: Callable[[], Iterable[torch.Tensor]], images: int, cfg: RoundingConfig, seed: int,
                   relu_caps: Mapping[str, float | None] | None = None,
                   quantized: QuantizedContext | None = None) -> LearnedRounding:
    """Learn every layer of ``layers`` that has a grid, in the order given (the network's execution order).

    ``batches()``: the ``images`` calibration images, one iterable per call (on the model's device); ``grids``:
    layer name -> the weight's grid; ``relu_caps``: module path -> the cap of the ReLU a layer alone feeds (None:
    plain ReLU); ``quantized(up)`` (input ``quantized``): a context attaching the quantized network with the
    rounding learned so far.  The float inputs of consecutive layers are captured together in one pass, up to
    ``CAPTURE_BUDGET`` bytes; quantized inputs take a pass a layer (each depends on the layers learned before)."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    relu_caps = relu_caps or {}
    up: dict[str, torch.Tensor] = {}
    results: dict[str, LayerResult] = {}
    learned = [layer for layer in layers if grids.get(layer.name) is not None]
    example = next(iter(batches()))[:1]
    sizes = [x.numel() * 4 for x in capture_inputs(model, [layer.module for layer in learned], [example])]
    groups = {group.start: group for group in capture_groups(sizes, images)}
    float_inputs: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(learned):
        if i in groups:
            group = [learned[j] for j in groups[i]]
            float_inputs = dict(zip([g.name for g in group], capture_inputs(model, [g.module for g in group],
                                                                           batches()), strict=True))
        twin = hook_free_copy(layer.module).float()
        cap = None
        if layer.module_name in relu_caps:
            cap = (0.0, math.inf if relu_caps[layer.module_name] is None else float(relu_caps[layer.module_name]))
        inputs = float_inputs.pop(layer.name)
        targets = _outputs(twin, twin.weight.detach(), inputs, cap)
        if cfg.input == "quantized" and quantized is not None:
            inputs = capture_inputs(model, [layer.module], batches(), quantized(up))[0]
        up[layer.name], results[layer.name] = learn_layer(twin, grids[layer.name], inputs, targets, cap, cfg,
                                                          generator)
        r = results[layer.name]
        log.info("AdaRound %d/%d %s: reconstruction error %.4g with nearest rounding, %.4g learned; %.1f %% of the "
                 "weights rounded the other way (%.1f s)", i + 1, len(learned), layer.module_name, r.nearest,
                 r.learned, 100 * r.flipped, r.seconds)
        del inputs, targets
    return LearnedRounding(up, time.perf_counter() - start, results)


def save_rounding(path: Path, key: str, learned: LearnedRounding) -> None:
    """Write ``learned`` to ``path`` atomically (a crash leaves the earlier file or none), with its ``key``."""
    payload = {"key": key, "seconds": learned.seconds, "up": learned.up,
               "layers": {name: [r.nearest, r.learned, r.flipped, r.seconds] for name, r in learned.layers.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_rounding(path: Path, key: str, grids: Mapping[str, QParams | None]) -> LearnedRounding | None:
    """The rounding saved at ``path`` when it was learned for ``key`` and fits every weight of ``grids`` (layer
    name -> grid); None when there is none.  A file that cannot be read, or that holds another key, is learned
    again (and replaced) with a warning: a cache never decides a result."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
        up = {name: tensor.bool() for name, tensor in payload["up"].items()}
        layers = {name: LayerResult(*values) for name, values in payload["layers"].items()}
        seconds, saved_key = float(payload["seconds"]), payload["key"]
    except Exception as err:  # noqa: BLE001 - any unreadable file is learned again
        log.warning("AdaRound: %s cannot be read (%s); learning again", path, err)
        return None
    if saved_key != key or set(up) != {name for name, grid in grids.items() if grid is not None}:
        log.warning("AdaRound: %s holds the rounding of other settings; learning again", path)
        return None
    return LearnedRounding(up, seconds, layers)
