"""Which Conv2d/Linear outputs are consumed only by a ReLU-like activation, found from the model's graph.

Such an output can be quantized on a one-sided grid ``[0, alpha]``: everything below zero is mapped to zero by
the activation anyway, so spending half the grid on negative values wastes a bit. That only holds when the ReLU
is the *only* consumer: an output that also feeds a residual add, a concat or another layer passes its negative
values on, and clipping them to zero would change the network.

Rules (shared by the graph walk and the forward-pass fallback):

* **layers**: every ``nn.Conv2d``/``nn.Linear``, subclasses included, named by module path as
  :func:`pytorch_quantizer.layers.activation_layers` names them. Subclasses are traced as leaves, so
  EfficientNet-Lite's padded convs (``Conv2dStaticSamePadding``) are one node instead of their ``pad`` + ``conv2d``.
* **identities** the walk passes through: ``nn.Identity`` (what :func:`pytorch_quantizer.models.fold_batchnorm`
  leaves in place of a folded BatchNorm) and dropout (modules or functions) when not training. BatchNorm itself is
  *not* followed: ``a * y + b`` with ``b > 0`` lifts negative ``y`` above zero and ``a < 0`` flips signs, so a
  conv -> BN -> ReLU conv of an unfolded model does not qualify; fold first.
* activation modules from outside ``torch.nn`` (subclasses too) are traced through like any module, so they are
  judged by the calls their ``forward`` makes.
* **shape queries** (``size``, ``dim``, ``shape``, ``ndim``, ``dtype``, ``device``, ``numel``) read no values and
  are ignored as consumers.
* **ReLU-like** consumers and the cap (upper clip) they give: ``nn.ReLU``, ``F.relu``, ``torch.relu``, ``.relu()``
  and their in-place forms -> ``None`` (unbounded); ``nn.ReLU6``, ``F.relu6`` -> ``6.0``; ``nn.Hardtanh``,
  ``F.hardtanh(_)`` with ``min_val == 0`` -> ``max_val`` (any other ``min_val`` keeps negatives: not ReLU-like);
  ``clamp``/``clip`` (function or method, in place or not) with ``min == 0`` and no ``max`` or a number
  ``max > 0`` -> that ``max`` or ``None``, and ``clamp_min(0)`` -> ``None``, since these compute exactly
  ``relu``/``min(relu, max)``. The layer's output must be the activation's input and nothing else of the call.
* several ReLU-like consumers (or a layer called several times) combine to the loosest cap: ``None`` if any is
  unbounded, else the largest, because every value a consumer still distinguishes must stay on the grid.

Tracing uses ``torch.fx`` (no forward pass). A model fx cannot trace (data-dependent control flow, ...) falls back
to recording one forward pass on ``example_input`` through a ``TorchFunctionMode``, which sees the same calls as they
run; without ``example_input`` it raises ``ValueError`` naming the model.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .layers import QUANTIZED_TYPES, ChannelClamp, activation_layers

Kind = Literal["relu", "identity", "ignore", "other"]
Use = tuple[Kind, float | None]  # how one consumer uses a layer output, and its cap for "relu"

LAYER_TYPES = tuple(cls for _, cls in QUANTIZED_TYPES)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_METADATA = frozenset({"size", "dim", "shape", "ndim", "dtype", "device", "numel"})
_DROPOUTS = ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")

# Parameter names of the calls the rules know, to read positional and keyword arguments alike. Methods take
# ``self`` as ``input``, so ``x.clamp(0, 6)`` and ``torch.clamp(x, 0, 6)`` read the same.
_PARAMETERS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("relu", "relu_", "relu6"), ("input", "inplace")),
    **dict.fromkeys(("hardtanh", "hardtanh_"), ("input", "min_val", "max_val", "inplace")),
    **dict.fromkeys(("clamp", "clamp_", "clip", "clip_"), ("input", "min", "max")),
    **dict.fromkeys(("clamp_min", "clamp_min_"), ("input", "min")),
    **dict.fromkeys(_DROPOUTS, ("input", "p", "training", "inplace")),
}
_FUNCTIONS: dict[Callable[..., Any], str] = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu_", F.relu6: "relu6",
    F.hardtanh: "hardtanh", F.hardtanh_: "hardtanh_", torch.clamp: "clamp", torch.clamp_: "clamp_",
    torch.clip: "clip", torch.clip_: "clip_", torch.clamp_min: "clamp_min", torch.clamp_min_: "clamp_min_",
    F.dropout: "dropout", F.dropout1d: "dropout1d", F.dropout2d: "dropout2d", F.dropout3d: "dropout3d",
    F.alpha_dropout: "alpha_dropout", F.feature_alpha_dropout: "feature_alpha_dropout",
}


def relu_fed_layers(model: nn.Module, example_input: torch.Tensor | None = None) -> dict[str, float | None]:
    """Module path -> cap of every Conv2d/Linear whose output only goes into ReLU-like activations.

    The cap is the activation's upper clip (``None`` for plain ReLU, ``6.0`` for ReLU6, ``max_val`` of
    ``Hardtanh(0, max_val)``); the module docstring lists the rules. Keys follow the order of
    :func:`~pytorch_quantizer.layers.activation_layers`. The model is traced with ``torch.fx``; where that fails,
    one forward pass on ``example_input`` is recorded instead (run it on an eval-mode model: a training one would
    update its BatchNorm statistics), and without ``example_input`` a ``ValueError`` names the model.
    """
    try:
        graph = layer_graph(model)
    except Exception as exc:  # fx fails in many ways (TraceError, TypeError, AttributeError...): all mean "cannot"
        if example_input is None:
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ValueError(f"torch.fx cannot trace {type(model).__name__} ({first}); pass example_input to find "
                             "the ReLU-fed layers from a forward pass instead") from exc
        return _combine(model, _recorded_uses(model, example_input))
    return _combine(model, _graph_uses(model, graph))


def _combine(model: nn.Module, uses: dict[str, list[list[Use]]]) -> dict[str, float | None]:
    """Keep the layers whose every call has at least one consumer and only ReLU-like ones; loosest cap wins."""
    result: dict[str, float | None] = {}
    for layer in activation_layers(model):
        calls = uses.get(layer.module_name)
        if not calls or not all(call and all(kind == "relu" for kind, _ in call) for call in calls):
            continue
        caps = [cap for call in calls for _, cap in call]
        result[layer.module_name] = None if None in caps else max(c for c in caps if c is not None)
    return result


def _classify(name: str | None, args: tuple[Any, ...], kwargs: dict[str, Any], value: object) -> Use:
    """How the call ``name(*args, **kwargs)`` uses ``value`` (a layer output, as an fx node or a tensor)."""
    if name in _METADATA:
        return "ignore", None
    if name not in _PARAMETERS:
        return "other", None
    bound = dict(zip(_PARAMETERS[name], args, strict=False)) | kwargs
    if bound.get("input") is not value or sum(leaf is value for leaf in tree_leaves((args, kwargs))) != 1:
        return "other", None  # e.g. clamp(x, max=y) with y the layer output: not y's activation
    if name in _DROPOUTS:
        return ("identity", None) if bound.get("training", True) is False else ("other", None)
    if name.startswith("relu"):
        return "relu", 6.0 if name == "relu6" else None
    if name.startswith("hardtanh"):
        return _clip_use(bound.get("min_val", -1.0), bound.get("max_val", 1.0))
    return _clip_use(bound.get("min"), bound.get("max"))


def _clip_use(low: Any, high: Any) -> Use:
    """``clamp(y, low, high)`` is ReLU-like when ``low`` is the number 0 and ``high`` is absent or a number > 0."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (number(low) and low == 0) or not (high is None or (number(high) and high > 0)):
        return "other", None
    return "relu", None if high is None else float(high)


def _classify_module(module: nn.Module) -> Use:
    """How a leaf module (standard ``torch.nn`` one, or a traced-as-leaf layer) uses its input."""
    if isinstance(module, nn.Identity) or (isinstance(module, _DROPOUT_MODULES) and not module.training):
        return "identity", None
    if isinstance(module, nn.ReLU):
        return "relu", None
    if isinstance(module, ChannelClamp):  # the loosest of its caps, as for several consumers
        return "relu", float(module.upper.max())
    if isinstance(module, nn.Hardtanh):  # nn.ReLU6 is Hardtanh(0, 6)
        return _clip_use(module.min_val, module.max_val)
    return "other", None


def is_identity(module: nn.Module) -> bool:
    """Whether a leaf module passes its input on unchanged (``nn.Identity``, dropout when not training)."""
    return _classify_module(module)[0] == "identity"


class _LayerLeafTracer(fx.Tracer):
    """fx tracer that keeps every Conv2d/Linear subclass (and ``ChannelClamp``) as one node, like the standard
    ``torch.nn`` leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (*LAYER_TYPES, ChannelClamp)) or super().is_leaf_module(m, module_qualified_name)


def layer_graph(model: nn.Module) -> fx.Graph:
    """The model's fx graph with every Conv2d/Linear (subclasses too) as one ``call_module`` node; raises what
    ``torch.fx`` raises for a model it cannot trace."""
    return _LayerLeafTracer().trace(model)


def _graph_uses(model: nn.Module, graph: fx.Graph) -> dict[str, list[list[Use]]]:
    """Layer path -> per call of the layer, the uses of its output, from the fx graph (identities walked through)."""
    modules = dict(model.named_modules())

    def node_uses(node: fx.Node) -> list[Use]:
        found: list[Use] = []
        for user in node.users:
            use = node_use(user, node, modules)
            if use[0] == "identity":
                found.extend(node_uses(user))
            elif use[0] != "ignore":
                found.append(use)
        return found

    uses: dict[str, list[list[Use]]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[str(node.target)], LAYER_TYPES):
            uses.setdefault(str(node.target), []).append(node_uses(node))
    return uses


def node_use(user: fx.Node, node: fx.Node, modules: Mapping[str, nn.Module]) -> Use:
    """How the graph node ``user`` uses the value of ``node`` (the module docstring's rules); ``modules``: the
    traced model's ``named_modules()``."""
    if user.op == "call_module":
        use = _classify_module(modules[str(user.target)])
        return ("other", None) if use[0] != "other" and (len(user.args) != 1 or user.kwargs) else use
    if user.op == "call_function" and user.target is builtins.getattr:
        return _classify(str(user.args[1]), (), {}, node)
    if user.op == "call_function":
        return _classify(_FUNCTIONS.get(user.target), tuple(user.args), dict(user.kwargs), node)
    if user.op == "call_method":
        return _classify(str(user.target), tuple(user.args), dict(user.kwargs), node)
    return "other", None  # the graph's output: the model returns the value as it is


def _call_name(func: Callable[..., Any]) -> str | None:
    """The rule name of a function seen by ``__torch_function__``: a known function, a Tensor method or property."""
    if func in _FUNCTIONS:
        return _FUNCTIONS[func]
    name = getattr(func, "__name__", None)
    if name == "__get__":  # a property getter such as Tensor.shape.__get__
        return getattr(getattr(func, "__self__", None), "__name__", None)
    return name if name is not None and getattr(torch.Tensor, name, None) is func else None


class _UseRecorder(TorchFunctionMode):
    """Records, for every tracked layer output, how each torch call made on it uses it."""

    def __init__(self) -> None:
        super().__init__()
        self.tracked: dict[int, tuple[torch.Tensor, list[Use]]] = {}  # id -> (tensor kept alive, its call's uses)

    def track(self, tensor: torch.Tensor, uses: list[Use]) -> None:
        self.tracked[id(tensor)] = (tensor, uses)

    def hits(self, values: Iterable[Any]) -> list[tuple[torch.Tensor, list[Use]]]:
        hits = {id(v): self.tracked[id(v)] for v in values if id(v) in self.tracked and self.tracked[id(v)][0] is v}
        return list(hits.values())

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for tensor, uses in self.hits(tree_leaves((args, kwargs))):
            use = _classify(_call_name(func), args, kwargs, tensor)
            if use[0] == "identity" and isinstance(out, torch.Tensor) and out is not tensor:
                self.track(out, uses)
            if use[0] in ("identity", "ignore"):
                continue
            uses.append(use)
            if use[0] == "relu" and out is tensor:  # in place: the tensor now holds the activation's output
                del self.tracked[id(tensor)]
        return out


def _recorded_uses(model: nn.Module, example_input: torch.Tensor) -> dict[str, list[list[Use]]]:
    """The uses :func:`_graph_uses` finds, recorded instead from one forward pass on ``example_input``."""
    recorder = _UseRecorder()
    uses: dict[str, list[list[Use]]] = {}

    def hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                uses.setdefault(name, []).append([])
                recorder.track(output, uses[name][-1])
        return record

    handles = [layer.module.register_forward_hook(hook(layer.module_name)) for layer in activation_layers(model)]
    try:
        with torch.no_grad(), recorder:
            output = model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    for _, call_uses in recorder.hits(tree_leaves(output)):
        call_uses.append(("other", None))  # returned as it is
    return uses
