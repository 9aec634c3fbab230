"""DFQ's data-free bias correction (Nagel, van Baalen, Blankevoort, Welling, ICCV 2019, section 4.2): the mean
shift that quantizing a layer's weights causes, predicted from the BatchNorm statistics of its input's producer
instead of measured on images (``-bca``).

**The shift.** A layer ``y = W x + b`` quantized to ``W~``, ``b~`` computes ``y~ = y + (W~ - W) x + (b~ - b)``, so
its output channel ``o`` moves on average by

    E[y~ - y]_o = sum_{c,k} (W~ - W)[o, c, k] E[x_c] + (b~ - b)_o,

with ``k`` the kernel positions (a conv's input channel has one mean at every position away from the padding; the
borders are ignored, as in DFQ). Subtracting it from the bias gives ``E[y~] = E[y]`` wherever ``E[x]`` is right.
The bias's own rounding error is counted, as ``-bca`` counts it: a deployment keeps the corrected bias in int32 at
the accumulator's scale.

**E[x] from BatchNorm.** A folded BatchNorm normalised its layer's output channel to ``N(beta, |gamma|)``
(``equalize.batchnorm_moments``; divided by the channel's scale and less the absorbed bias after ``--equalize``).
Through an activation ``clamp(., 0, u)`` (ReLU: ``u`` infinite; ReLU6 and per-channel clamps: their caps), with
``a = -beta / |gamma|`` and ``b = (u - beta) / |gamma|``,

    E[clamp(X, 0, u)] = beta (Phi(b) - Phi(a)) + |gamma| (phi(a) - phi(b)) + u (1 - Phi(b))

(the mean of the part inside ``[0, u]`` plus ``u`` times the mass above it). Through a smooth elementwise
activation ``f`` (SiLU, Hardswish, GELU, sigmoid, tanh, ...) there is no such form, and Gauss-Hermite quadrature
gives it: ``E[f(X)] = sum_i w_i f(beta + sqrt(2) |gamma| t_i) / sqrt(pi)`` over ``QUADRATURE`` nodes ``t_i``, exact
for polynomials of degree ``2 QUADRATURE - 1`` and within 1e-3 of the mean for the kinked ones. Identities
(folded BatchNorms, eval-mode dropout), average pooling and flattening keep each channel's mean, and a residual add
adds the means of its two operands. Any other producer (the image, a concat, a product such as
squeeze-excitation, an activation of a sum) leaves its consumer uncorrected, and the run says at how many layers
the correction was made.

Against ``-bca``: no images and no pass, but only as good as the Gaussian model of each pre-activation, and blind
to what the layers before this one changed in its input (DFQ's "empirical" variant, our ``-bca``, sees both).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import LAYER_TYPES, layer_graph, node_use
from .layers import ActivationLayer, ChannelClamp, in_out_channels

Moments = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # layer path -> (mean, std) of its output channels
_ADDS = (operator.add, operator.iadd, torch.add)
_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.Flatten)
_POOL_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.avg_pool1d, F.avg_pool2d, torch.flatten)
# elementwise activations whose mean over a Gaussian input the quadrature gives (called with the input alone)
_ACTIVATION_MODULES = (nn.SiLU, nn.Hardswish, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Mish, nn.ELU,
                       nn.LeakyReLU, nn.Softplus)
_ACTIVATION_FUNCTIONS = (F.silu, F.hardswish, F.gelu, F.sigmoid, F.tanh, F.hardsigmoid, F.mish, F.elu, F.leaky_relu,
                         F.softplus, torch.sigmoid, torch.tanh)
QUADRATURE = 64  # Gauss-Hermite nodes


class DataFreeBiasError(ValueError):
    """The network's graph cannot be followed (torch.fx cannot trace it)."""


def clipped_normal_mean(mean: torch.Tensor, std: torch.Tensor, upper: torch.Tensor | float | None = None
                        ) -> torch.Tensor:
    """``E[clamp(X, 0, upper)]`` for ``X ~ N(mean, std)`` per channel, in float64 (``upper`` None: ReLU); a
    channel of zero ``std`` is the constant ``clamp(mean, 0, upper)``."""
    mean, std = mean.double(), std.double().abs()
    cap = torch.full_like(mean, math.inf) if upper is None else torch.as_tensor(upper, dtype=torch.float64)
    cap = cap.expand_as(mean)
    sigma = std.clamp_min(1e-300)
    a, b = -mean / sigma, (cap - mean) / sigma
    pdf = lambda z: torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)  # noqa: E731 - phi(inf) = 0
    above = 1 - torch.special.ndtr(b)
    inside = mean * (torch.special.ndtr(b) - torch.special.ndtr(a)) + std * (pdf(a) - pdf(b))
    expected = inside + torch.where(above > 0, cap, 0.0) * above
    return torch.where(std > 0, expected, torch.minimum(mean.clamp_min(0), cap))


def gaussian_mean(f: Callable[[torch.Tensor], torch.Tensor], mean: torch.Tensor, std: torch.Tensor,
                  nodes: int = QUADRATURE) -> torch.Tensor:
    """``E[f(X)]`` for ``X ~ N(mean, std)`` per channel by Gauss-Hermite quadrature (float64); ``f`` is elementwise."""
    t, w = (torch.from_numpy(a) for a in np.polynomial.hermite.hermgauss(nodes))
    x = mean.double().unsqueeze(-1) + math.sqrt(2.0) * std.double().abs().unsqueeze(-1) * t
    with torch.no_grad():
        return (f(x).double() * w).sum(-1) / math.sqrt(math.pi)


@dataclass(frozen=True)
class _Value:
    """What is known of a node's value per channel: its mean, and its std where it is a layer's Gaussian output."""

    mean: torch.Tensor
    std: torch.Tensor | None = None


def expected_inputs(model: nn.Module, moments: Moments) -> dict[str, torch.Tensor]:
    """Layer path -> the expected value of each input channel of every Conv2d/Linear whose input follows from
    ``moments`` (the module docstring's rules); a layer called on inputs of different means is left out."""
    try:
        graph = layer_graph(model)
    except Exception as exc:  # fx fails in many ways; all mean "cannot"
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise DataFreeBiasError(f"data-free bias correction follows the network's graph, which torch.fx cannot trace "
                                f"for {type(model).__name__}: {first}") from exc
    modules = dict(model.named_modules())
    known: dict[fx.Node, _Value] = {}
    found: dict[str, torch.Tensor | None] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[str(node.target)], LAYER_TYPES):
            source = known.get(node.args[0]) if len(node.args) == 1 and isinstance(node.args[0], fx.Node) else None
            name = str(node.target)
            if source is not None and in_out_channels(modules[name])[0] == source.mean.numel():
                seen = found.setdefault(name, source.mean)
                if seen is not None and not torch.equal(seen, source.mean):
                    found[name] = None
            else:
                found[name] = None
            if name in moments:
                mean, std = moments[name]
                known[node] = _Value(mean.double(), std.double())
            continue
        value = _propagate(node, known, modules)
        if value is not None:
            known[node] = value
    return {name: mean for name, mean in found.items() if mean is not None}


def _propagate(node: fx.Node, known: Mapping[fx.Node, _Value], modules: Mapping[str, nn.Module]) -> _Value | None:
    """The channel means of ``node``'s value from those of its inputs, where the rules know them."""
    inputs = [arg for arg in node.args if isinstance(arg, fx.Node)]
    if node.op == "call_function" and node.target in _ADDS and len(inputs) == 2 == len(node.args):
        left, right = (known.get(arg) for arg in inputs)
        if left is None or right is None or left.mean.shape != right.mean.shape:
            return None
        return _Value(left.mean + right.mean)
    if not inputs or inputs[0] not in known:
        return None
    source = known[inputs[0]]
    if _pools(node, modules):
        return _Value(source.mean)
    kind, cap = node_use(node, inputs[0], modules)
    if kind == "identity":
        return source
    if source.std is None:
        return None
    if kind != "relu":
        f = _elementwise(node, modules)
        return None if f is None else _Value(gaussian_mean(f, source.mean, source.std))
    if node.op == "call_module" and isinstance(modules[str(node.target)], ChannelClamp):
        cap = modules[str(node.target)].upper.double()
    return _Value(clipped_normal_mean(source.mean, source.std, cap))


def _elementwise(node: fx.Node, modules: Mapping[str, nn.Module]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The smooth elementwise activation ``node`` applies to its one input, if it is one the quadrature takes."""
    if len(node.args) != 1 or any(k != "inplace" for k in node.kwargs):
        return None
    if node.op == "call_module" and isinstance(modules[str(node.target)], _ACTIVATION_MODULES):
        return modules[str(node.target)]
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        return node.target
    if node.op == "call_method" and node.target in ("sigmoid", "tanh"):
        return getattr(torch, str(node.target))
    return None


def _pools(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Average pooling or flattening of one input: each channel's mean is kept."""
    if len(node.args) < 1 or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], _POOLS)
    if node.op == "call_function":
        return node.target in _POOL_FUNCTIONS
    if node.op == "call_method" and node.target == "flatten":
        return True
    if node.op == "call_method" and node.target == "mean":  # x.mean((2, 3)): spatial dims only
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else dims
        return isinstance(dims, (tuple, list)) and bool(dims) and all(isinstance(d, int) and d >= 2 for d in dims)
    return False


def mean_error(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, expected: torch.Tensor
               ) -> torch.Tensor:
    """``E[y~ - y]`` per output channel of ``layer`` (holding its quantized weight and bias) against its float
    ``weight`` and ``bias``, for input channel means ``expected`` (float64)."""
    delta = layer.weight.detach().double() - weight.double()
    expected = expected.to(delta.device, torch.float64)
    if isinstance(layer, nn.Linear):
        error = delta @ expected
    else:
        groups, out = layer.groups, delta.shape[0]
        per_position = delta.flatten(2).sum(2).view(groups, out // groups, -1)  # kernel positions summed
        error = torch.einsum("goc,gc->go", per_position, expected.view(groups, -1)).reshape(out)
    if bias is not None and layer.bias is not None:
        error = error + (layer.bias.detach().double() - bias.double())
    return error


def data_free_shifts(layers: Sequence[ActivationLayer], originals: Mapping[str, tuple[torch.Tensor, ...]],
                     expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module path -> the bias shift ``-E[y~ - y]`` of every layer in ``expected`` that has a bias, read while a
    quantizer holds the layers' quantized weights; ``originals``: module path -> (float weight, float bias)."""
    shifts = {}
    for layer in layers:
        name = layer.module_name
        if name not in expected or getattr(layer.module, "bias", None) is None:
            continue
        weight, bias = originals[name]
        shifts[name] = -mean_error(layer.module, weight, bias, expected[name]).cpu()
    return shifts
