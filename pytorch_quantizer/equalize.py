"""Cross-layer equalization and high-bias absorption (Nagel, van Baalen, Blankevoort, Welling: "Data-Free
Quantization Through Weight Equalization and Bias Correction", ICCV 2019), on the BatchNorm-folded float model.

**Why.** One weight grid a tensor spends its levels on the widest output channel. After BatchNorm folding the
channels of a layer differ by orders of magnitude (mobilenet_v2's depthwise convs above all), so at 8 bits per
tensor the narrow channels round to zero and the network collapses.

**Equalization.** Two layers ``f`` and ``g`` joined by an activation ``h`` that commutes with a positive scale
(``h(x / s) = h(x) / s`` for ``s > 0``: ReLU, or nothing) keep their composition when ``f``'s output channel
``i`` is divided by ``s_i`` and ``g``'s input channel ``i`` multiplied by it::

    g(S h(S^-1 f(x))) = g(h(f(x))),   S = diag(s).

With ``r1_i`` the range (largest ``|w|``) of ``f``'s output channel ``i`` and ``r2_i`` that of ``g``'s input
channel ``i``, ``s_i = sqrt(r1_i / r2_i)`` makes both ranges ``sqrt(r1_i r2_i)``, the choice that maximises the
sum of the channels' precisions ``r_i / R`` over both layers (DFQ, section 4.1). A layer inside a chain
(expand -> depthwise -> project) belongs to two pairs, so the pairs are swept in turn until no scale moves by
more than ``tol`` (relative), as DFQ iterates.

**ReLU6 caps.** ``min(relu(x), 6)`` does not commute with a scale: ``min(relu(x / s), 6) != min(relu(x), 6) / s``.
Replacing it by ReLU would let the scaling through, but changes the float network (Brevitas' default: it costs the
shared mobilenet_v2 7 points of FP32 on our images). The cap is scaled with its channel instead:
``min(relu(x / s), 6 / s) = min(relu(x), 6) / s``, so each capped activation between a pair becomes a
:class:`~pytorch_quantizer.layers.ChannelClamp` with one cap a channel, and the float function is kept exactly.
A capped module called at several places (EfficientNet-Lite shares one ReLU6 per block) gets one clamp per call.

**High-bias absorption.** After folding, ``f``'s pre-activation channel ``i`` is, by its BatchNorm, about
``N(beta_i, gamma_i)`` (divided by the equalization's scale). Where ``c_i = max(0, beta_i - 3 |gamma_i|) > 0``
almost every value exceeds ``c_i``, and for ``x >= c``: ``relu(x) = relu(x - c) + c`` and
``min(relu(x), u) = min(relu(x - c), u - c) + c``. So ``c`` moves out of ``f``'s bias (and ``u``'s cap) into
``g``'s bias as ``g(c)``, which narrows the activation ``g`` reads without changing the function wherever the
pre-activation stays above ``c``. ``g(c)`` is a constant only where ``g`` sees no padding: 1x1 convs without
padding and linears; other consumers are left alone (a padded 3x3 conv would see ``c`` at its borders as 0).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import LAYER_TYPES, is_identity, layer_graph
from .layers import ChannelClamp, in_out_channels

_FREE_FUNCTIONS = (F.relu, torch.relu)  # commute with a positive scale: nothing to change
DEAD = 2.0**-24  # a channel below float32's resolution of its layer's largest weight is dead
Moments = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (mean, std) of its output channels


class EqualizeError(ValueError):
    """The model cannot be equalized (torch.fx cannot trace it, or the result changed its function)."""


@dataclass(frozen=True)
class Equalized:
    """An equalized copy of a model and what was done to it."""

    model: nn.Module  # the same module paths; a torch.fx GraphModule where a capped module is called twice
    pairs: tuple[tuple[str, str], ...]  # (producer, consumer) layer paths
    sweeps: int
    clamps: int  # capped activations turned into per-channel clamps
    absorbed: int  # pairs whose producer's high bias moved into the consumer
    with_moments: int  # pairs whose producer has BatchNorm statistics to absorb from
    max_error: float  # largest output change on the example input, relative to the largest output
    # the producers' BatchNorm moments as the equalized layers' outputs carry them: divided by the scales, less
    # the absorbed bias (what dfq_bias predicts input means from)
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def summary(self) -> str:
        if not self.pairs:
            return ("--equalize: no pair of conv/linear layers joined only through a ReLU, ReLU6 or nothing: the "
                    "model is unchanged")
        return (f"--equalize: {len(self.pairs)} pairs of layers equalized in {self.sweeps} sweeps, {self.clamps} "
                f"ReLU6/Hardtanh caps scaled per channel, high bias absorbed at {self.absorbed} pairs (of "
                f"{self.with_moments} whose producer has BatchNorm statistics); largest output change "
                f"{self.max_error:.2g} of the largest output")


@dataclass
class _Pair:
    first: str
    second: str
    clamp: ChannelClamp | None  # the per-channel cap between them, if any
    site: fx.Node | None = None  # the call of the capped activation the clamp replaces


def batchnorm_moments(original: nn.Module, folded: list[tuple[str, str]]) -> dict[str, tuple[torch.Tensor, ...]]:
    """Layer -> (mean, std) of its output channels as its folded BatchNorm normalises them: ``(beta, |gamma|)``.

    A BatchNorm with running mean 0 and variance 1 (or ``1 - eps``) normalises nothing: it is a placeholder carrying
    a bias folded before the weights were exported (the shared TFLite mobilenet_v2), or an untrained network's, and
    says nothing about its input's distribution, so its layer is left out (no absorption there)."""
    moments = {}
    for conv_name, bn_name in folded:
        bn = original.get_submodule(bn_name)
        unit = torch.minimum((bn.running_var - 1).abs(), (bn.running_var + bn.eps - 1).abs())  # eps folded or not
        placeholder = bool((bn.running_mean == 0).all()) and bool(unit.max() < 1e-4)
        if placeholder:
            continue
        if bn.affine:
            moments[conv_name] = (bn.bias.detach().clone(), bn.weight.detach().abs().clone())
        else:
            moments[conv_name] = (torch.zeros(bn.num_features), torch.ones(bn.num_features))
    return moments


def equalize(model: nn.Module, example_input: torch.Tensor, moments: Moments | None = None, *,
             tol: float = 1e-3, max_sweeps: int = 100, rtol: float = 1e-4) -> Equalized:
    """Equalize every pair of layers of a copy of ``model`` (eval mode, BatchNorm folded), then absorb high biases
    where ``moments`` (:func:`batchnorm_moments`) gives the producer's channel statistics.

    The equalized copy must reproduce ``model``'s output on ``example_input`` within ``rtol`` of its largest value
    (absorption is not checked there: it is exact only on inputs like the calibration images); otherwise
    ``EqualizeError``."""
    model = copy.deepcopy(model).eval()
    try:
        graph = layer_graph(model)
    except Exception as exc:  # fx fails in many ways; all mean "cannot"
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise EqualizeError(f"--equalize needs a network torch.fx can trace; {type(model).__name__}: {first}") from exc
    with torch.no_grad():
        reference = model(example_input)
    module = fx.GraphModule(model, graph)  # shares model's modules, which are edited in place from here on
    pairs = _find_pairs(module)
    module = _install_clamps(model, module, pairs)
    sweeps, divisors = _sweep(module, pairs, tol, max_sweeps)
    with torch.no_grad():
        error = (module(example_input) - reference).abs().max().item() / max(reference.abs().max().item(), 1e-12)
    if not error <= rtol:
        raise EqualizeError(f"equalizing {len(pairs)} pairs of layers changed the output by {error:.3g} of its "
                            "largest value: a layer's output is probably read besides its pair")
    after = {name: (mean.double() / divisors[name], std.double() / divisors[name]) if name in divisors
             else (mean.double(), std.double()) for name, (mean, std) in (moments or {}).items()}
    known = [pair for pair in pairs if pair.first in after]
    absorbed = 0
    for pair in known:
        shift = _absorb(module, pair, after[pair.first])
        if shift is not None:
            absorbed += 1
            after[pair.first] = (after[pair.first][0] - shift.double(), after[pair.first][1])
    clamps = sum(pair.clamp is not None for pair in pairs)
    return Equalized(module, tuple((p.first, p.second) for p in pairs), sweeps, clamps, absorbed, len(known), error,
                     after)


def _find_pairs(module: fx.GraphModule) -> list[_Pair]:
    """Every (producer, activation, consumer) chain whose producer's output reaches only the consumer, through
    identities and at most one scale-commuting activation; each capped activation gets its own ChannelClamp."""
    modules = dict(module.named_modules())
    calls = _module_calls(module.graph)

    def layer(node: fx.Node | None) -> nn.Module | None:
        if node is None or node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            return None
        found = modules[node.target]
        return found if isinstance(found, LAYER_TYPES) and calls[node.target] == 1 else None

    pairs = []
    for node in list(module.graph.nodes):
        first = layer(node)
        if first is None:
            continue
        consumer, clamp = _only_consumer(node, modules), None
        caps = _activation(consumer, modules)
        if caps is not None:
            activation, consumer = consumer, _only_consumer(consumer, modules)
        second = layer(consumer)
        if second is None or in_out_channels(first)[1] != in_out_channels(second)[0]:
            continue
        site = None
        if isinstance(caps, torch.Tensor):  # this call's own clamp, its caps then scaled with the channels
            clamp, site = ChannelClamp(caps.expand(in_out_channels(first)[1])), activation
        pairs.append(_Pair(node.target, consumer.target, clamp, site))
    return pairs


def _install_clamps(model: nn.Module, module: fx.GraphModule, pairs: list[_Pair]) -> nn.Module:
    """Put each pair's clamp in place of its capped activation: in ``model``'s own hierarchy when every such module
    is called once (the model keeps its class and code, which the ONNX export maps its nodes by), else as new calls
    in the traced graph (a shared ReLU6 needs one clamp a call)."""
    sites = [pair for pair in pairs if pair.site is not None]
    calls = _module_calls(module.graph)
    if all(calls[pair.site.target] == 1 for pair in sites):
        for pair in sites:
            model.set_submodule(pair.site.target, pair.clamp)
        return model
    for index, pair in enumerate(sites):
        name = f"equalize_clamp{index}"
        module.add_submodule(name, pair.clamp)
        pair.site.target = name
    module.recompile()
    return module


def _module_calls(graph: fx.Graph) -> Counter[str]:
    """Module path -> how many times the graph calls it."""
    return Counter(node.target for node in graph.nodes if node.op == "call_module")


def _only_consumer(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The one node that reads ``node``'s value, walking through identities; None for several or none."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not (user.op == "call_module" and is_identity(modules[user.target]) and len(user.args) == 1):
            return user
        node = user
    return None


def _activation(node: fx.Node | None, modules: dict[str, nn.Module]) -> str | torch.Tensor | None:
    """"free" for a ReLU (commutes with a positive scale), the caps of a ReLU6/Hardtanh(0, cap) or ChannelClamp
    (made to commute by scaling the caps), None for anything else."""
    if node is None or len(node.args) != 1:
        return None
    if node.op == "call_module":
        found = modules[node.target]
        if isinstance(found, nn.ReLU):
            return "free"
        if isinstance(found, nn.Hardtanh) and found.min_val == 0 and found.max_val > 0:
            return torch.tensor([float(found.max_val)])
        if isinstance(found, ChannelClamp):
            return found.upper.detach().clone()
    if (node.op == "call_function" and node.target in _FREE_FUNCTIONS) or (
            node.op == "call_method" and node.target == "relu"):
        return "free"
    return None


def _input_view(layer: nn.Module) -> torch.Tensor:
    """The weight as (input channel, everything it multiplies): a grouped conv's input channel ``i`` of group
    ``k`` is ``weight[k * O/g : (k+1) * O/g, i mod I/g]``."""
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        return weight.t()
    groups = layer.groups
    per_in, per_out = weight.shape[1], weight.shape[0] // groups
    grouped = weight.reshape(groups, per_out, per_in, -1)  # (group, out in group, in in group, kernel)
    return grouped.permute(0, 2, 1, 3).reshape(groups * per_in, -1)


def _scale_input(layer: nn.Module, scale: torch.Tensor) -> None:
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        weight.mul_(scale.view(1, -1))
        return
    groups, per_in = layer.groups, weight.shape[1]
    grouped = weight.view(groups, weight.shape[0] // groups, per_in, -1)
    grouped.mul_(scale.view(groups, 1, per_in, 1))


def _sweep(module: fx.GraphModule, pairs: list[_Pair], tol: float, max_sweeps: int
           ) -> tuple[int, dict[str, torch.Tensor]]:
    """Equalize the pairs in turn until no scale moves by more than ``tol``; returns the sweeps made and, per
    producer, the divisor its output channels now carry."""
    divisors = {p.first: torch.ones(in_out_channels(module.get_submodule(p.first))[1], dtype=torch.float64)
                for p in pairs}
    sweeps = 0
    with torch.no_grad():
        while pairs and sweeps < max_sweeps:
            sweeps += 1
            moved = 0.0
            for pair in pairs:
                first, second = module.get_submodule(pair.first), module.get_submodule(pair.second)
                r1 = first.weight.detach().flatten(1).abs().amax(1).double()
                r2 = _input_view(second).detach().abs().amax(1).double()
                scale = _scales(r1, r2)
                first.weight.div_(scale.to(first.weight.dtype).view(-1, *[1] * (first.weight.dim() - 1)))
                if first.bias is not None:
                    first.bias.div_(scale.to(first.bias.dtype))
                if pair.clamp is not None:
                    pair.clamp.upper.div_(scale.to(pair.clamp.upper.dtype))
                _scale_input(second, scale.to(second.weight.dtype))
                divisors[pair.first] *= scale
                moved = max(moved, (scale.log().abs().max().item()))
            if moved <= tol:
                break
    return sweeps, divisors


def _scales(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """DFQ's ``sqrt(r1 / r2)`` for live channels.  A dead producer channel (weights below float32's resolution of
    the layer's largest) outputs a constant, its bias; ``sqrt(r1 / r2)`` near 0 would blow that constant up, and
    scale 1 would leave the consumer's weights on it as wide as they are (the TFLite mobilenet_v2 feeds its first
    depthwise conv such a channel with weights 50x the others').  It gets the smallest scale that brings the
    consumer's weights on it down to the live channels' equalized range, and never a scale above 1."""
    live = (r1 > DEAD * r1.max()) & (r2 > 0)
    scale = torch.where(live, (r1 / r2.clamp_min(1e-300)).sqrt(), torch.ones_like(r1))
    if bool(live.any()) and not bool(live.all()):
        target = (r1 * r2).sqrt()[live].max()
        dead = (target / r2.clamp_min(1e-300)).clamp(max=1.0)
        scale = torch.where(live | (r2 == 0), scale, dead)
    return scale


def _pointwise(layer: nn.Module) -> bool:
    """Whether the layer sees no padding, so a constant input channel gives a constant output: linears, and 1x1
    convs without padding (nor a padding module of their own, as EfficientNet's same-padding convs have)."""
    if isinstance(layer, nn.Linear):
        return True
    own_padding = getattr(layer, "static_padding", None)
    padded = isinstance(own_padding, nn.ZeroPad2d) and any(own_padding.padding)
    return tuple(layer.kernel_size) == (1, 1) and layer.padding in ((0, 0), "valid") and not padded


def _absorb(module: fx.GraphModule, pair: _Pair, moments: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
    """Move ``c = max(0, mean - 3 std)`` of the producer's channels (``moments``: as equalized) into the consumer's
    bias; returns ``c`` (None: nothing moved)."""
    first, second = module.get_submodule(pair.first), module.get_submodule(pair.second)
    if first.bias is None or not _pointwise(second):
        return None
    mean, std = moments
    shift = (mean - 3 * std).clamp_min(0)
    if pair.clamp is not None:
        shift = torch.minimum(shift, pair.clamp.upper.double())
    if not bool((shift > 0).any()):
        return None
    with torch.no_grad():
        shift = shift.to(first.bias.dtype)
        first.bias.sub_(shift)
        if pair.clamp is not None:
            pair.clamp.upper.sub_(shift.to(pair.clamp.upper.dtype))
        if isinstance(second, nn.Linear):
            added = second.weight @ shift
        else:
            added = F.conv2d(shift.view(1, -1, 1, 1), second.weight, groups=second.groups).flatten()
        if second.bias is None:
            second.bias = nn.Parameter(torch.zeros_like(added))
        second.bias.add_(added)
    return shift
