"""The network as a run quantizes it, written as an ONNX QDQ model (QuantizeLinear/DequantizeLinear pairs), and
evaluated in ONNX Runtime: the check that the simulator's grids mean the same thing in a real integer engine.

How a GEMMLOWP grid becomes an ONNX (scale, zero point)
-------------------------------------------------------
The simulator (``gemmlowp``) maps x onto the ``Q = 2**M - 1`` steps of a grid over ``[o, o + delta]``::

    s = delta / Q,   q = round_half_even(clamp((x - o) / s, 0, Q)),   y = q * s + o

ONNX's pair (opset 21) over a storage type of range ``[lo, hi]`` computes::

    q' = saturate(round_half_even(x / s') + z, lo, hi),   y = (q' - z) * s'

Take ``s' = s`` and ``q' = q + lo`` (unsigned storage: ``lo = 0``, ``q' = q``).  Then ``y = (q + lo - z) * s`` equals
``q * s + o`` for every q exactly when ``z = lo - o / s``, and the saturation bounds ``[lo, lo + Q]`` are the
grid's ends exactly when the type has ``Q + 1`` levels (uint8 at 8 bits, uint4 at 4 bits for activations; int8 /
int4 for weights, ``lo = -2**(M-1)``).  So an M-bit grid is exact in ONNX iff ``o / s`` is an integer with ``z``
in the type's range, i.e. 0.0 lies on the grid: what ``-pz`` guarantees (``o = round(o / s) * s``).  Without
``-pz`` the export writes the nearest exact grid, ``z = round(lo - o / s)`` clamped to the type, i.e. the offset
moves to ``o' = (lo - z) * s``, by at most half a step when 0 lies inside the range; the log gives the largest
move, in steps.  Rounding differs only at ties: the simulator rounds ``(x - o) * (1/s)``, ONNX ``x / s + z``, two
float32 computations of the same number that fall on different sides of a half only when it is a tie to within
an ulp, and the dequantized value ``(q' - z) * s`` is one float32 rounding where ``q * s + o`` is two (one ulp
apart at most).

Widths without an ONNX type: the activations of 5-7 bits would need a clamp inside the pair to keep their level
count, which no integer kernel fuses; they are refused (``config``) rather than emulated.  Weights are constants
whose codes are already on their grid, so any width up to 8 is stored exactly in uint8 (up to 4 in int4, up to 16
in int16) with its level count kept (``weight_codes`` says why uint8).
"""

from __future__ import annotations

import copy
import io
import logging
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write
from .gemmlowp import QParams
from .model_quantizer import ModelQuantizer

log = logging.getLogger("pytorch_quantizer")

OPSET = 21  # the first opset with the 4-bit types; torch's TorchScript exporter writes 20, lifted here
TORCH_OPSET = 20
IR_VERSION = 10  # the first IR version with INT4 / UINT4
ONNX_EXTRA = 'pip install -e ".[onnx]"'
ACT_WIDTHS = (4, 8)  # activation widths that have an ONNX type of exactly their level count
INTEGER_OPS = ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm")
FLOAT_OPS = ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul")


class ExportError(ValueError):
    """The network cannot be written as asked (a layer not found in the exported graph, a missing package)."""


def require_onnx(runtime: bool) -> None:
    """onnx (and with ``runtime`` onnxruntime) importable, else one line naming the extra that installs them."""
    for name in ("onnx", *(("onnxruntime",) if runtime else ())):
        try:
            __import__(name)
        except ImportError:
            flag = "--eval_onnx" if name == "onnxruntime" else "--export_onnx"
            raise ExportError(f"{flag} needs {name}, which is not installed: {ONNX_EXTRA}") from None


@dataclass(frozen=True)
class OnnxGrid:
    """One QuantizeLinear/DequantizeLinear grid: scale and zero point (scalars, or one per channel along
    ``axis``), the storage type's bounds and ONNX type, and how far the export moved the grid's offset (in steps)."""

    scale: np.ndarray
    zero_point: np.ndarray
    lo: int
    hi: int
    onnx_type: int
    axis: int | None
    moved: float = 0.0
    widened: int = 0  # grids (channels) widened to hold 0

    def zero_point_tensor(self, name: str) -> Any:
        from onnx import helper

        values = self.zero_point.astype(np.int64).reshape(-1).tolist()
        dims = [] if self.axis is None else [len(values)]
        return helper.make_tensor(name, self.onnx_type, dims, values)


def storage(bits: int, signed: bool) -> tuple[int, int, int]:
    """(lo, hi, ONNX type) of the narrowest ONNX integer type holding ``bits``-bit codes."""
    from onnx import TensorProto as T

    for width, stype, utype in ((4, T.INT4, T.UINT4), (8, T.INT8, T.UINT8), (16, T.INT16, T.UINT16)):
        if bits <= width:
            return (-(2 ** (width - 1)), 2 ** (width - 1) - 1, stype) if signed else (0, 2**width - 1, utype)
    raise ExportError(f"no ONNX integer type holds {bits}-bit codes")


def onnx_grid(qp: QParams, bits: int, axis: int | None, signed: bool = False) -> OnnxGrid:
    """The ONNX grid of a simulator grid (see the module docstring): ``s' = s``, ``z = round(lo - o / s)``;
    ``moved`` the largest ``|o' - o| / s``.  A grid whose range lies wholly above (below) 0 cannot hold 0 as a
    level with its own scale: it is widened to start (end) at 0 with the same level count (``widened`` counts
    them; ``moved`` then measures the move of its far end, in old steps).  A channel whose grid is a single value
    (scale 0: the simulator outputs its offset) gets ``s' = |o|`` and ``z`` placing that value on the grid."""
    lo, hi, onnx_type = storage(bits, signed)
    steps = float(2**bits - 1)
    scale = np.atleast_1d(np.asarray(_numpy(qp.scale), dtype=np.float32)).astype(np.float64)
    offset = np.atleast_1d(np.asarray(_numpy(qp.offset), dtype=np.float32)).astype(np.float64)
    dead = scale == 0
    safe = np.where(dead, 1.0, scale)
    top = offset + steps * safe
    above, below = ~dead & (offset > 0), ~dead & (top < 0)
    new_scale = np.where(above, top / steps, np.where(below, -offset / steps, safe))
    new_offset = np.where(above, 0.0, np.where(below, -steps * new_scale, offset))
    zero = np.clip(np.round(lo - new_offset / new_scale), lo, hi)
    moved = np.abs((lo - zero) * new_scale - offset) / safe
    moved = np.where(above | below, np.abs(new_offset + steps * new_scale - top) / safe + moved, moved)
    moved = np.where(dead, 0.0, moved)
    out_scale = np.where(dead, np.where(offset != 0, np.abs(offset), 1.0), new_scale).astype(np.float32)
    zero = np.where(dead, np.clip(lo - np.sign(offset), lo, hi), zero)
    if axis is None:
        out_scale, zero = out_scale.reshape(()), zero.reshape(())
    return OnnxGrid(out_scale, zero.astype(np.int64), lo, hi, onnx_type, axis, float(moved.max(initial=0.0)),
                    int((above | below).sum()))


def _numpy(value: float | torch.Tensor) -> np.ndarray | float:
    return value.detach().cpu().double().numpy() if isinstance(value, torch.Tensor) else value


def weight_codes(values: np.ndarray, qp: QParams, bits: int) -> tuple[np.ndarray, OnnxGrid] | None:
    """Integer codes (per output channel = axis 0 when ``qp`` is per channel) whose dequantized values are the
    simulator's quantized weight ``values``, and their grid; None when the grid's zero falls between two levels (no
    integer zero point reproduces it: the weight is then written in float).

    Storage: uint8 for 5-8 bits, int4 up to 4, int16 beyond 8.  Not int8: on x86 CPUs without VNNI, ORT's
    uint8 x int8 kernels sum pairs of products in int16 with saturation (VPMADDUBSW); measured on
    efficientnet_lite0 at W8A8, its fused int8 graph gave logits 2.8 away from the same graph unfused, where
    uint8 x uint8 kernels have no such saturation."""
    per_channel = isinstance(qp.scale, torch.Tensor)
    grid = onnx_grid(qp, bits, 0 if per_channel else None, signed=not 4 < bits <= 8)
    if grid.moved > 1e-3 or grid.widened:
        return None
    shape = (-1,) + (1,) * (values.ndim - 1) if per_channel else ()
    scale = grid.scale.astype(np.float64).reshape(shape)
    zero = grid.zero_point.reshape(shape)
    codes = np.round(values.astype(np.float64) / scale) + zero
    if codes.min() < grid.lo or codes.max() > grid.hi:
        return None
    back = ((codes - zero) * scale).astype(np.float32)
    # the simulator's q * s + o rounds twice, so its value may sit ulps of o (up to 2**M steps) off the level
    if not (np.abs(back.astype(np.float64) - values) <= 1e-4 * scale).all():
        return None
    return codes.astype(np.int64), grid


@dataclass
class ExportReport:
    """What an export wrote: activation pairs by type, weights by storage, the weights left in float (and why), the
    largest move of an activation grid's offset (in steps), and the planned tensors the pairs went to."""

    path: Path
    activation_pairs: Counter = field(default_factory=Counter)
    weights: Counter = field(default_factory=Counter)
    float_weights: list[str] = field(default_factory=list)
    moved_steps: float = 0.0
    moved_layers: int = 0
    widened: int = 0
    widened_weights: int = 0  # per-channel int8 weights stored in int16 (zero points differing between channels)
    quantized_tensors: list[str] = field(default_factory=list)
    repeated: int = 0  # grids repeated after a Relu/Clip (relu_pairs)
    int32_biases: int = 0  # biases written as int32 at the accumulator's scale
    identity: list[str] = field(default_factory=list)  # planned, but with an empty range: unquantized in both


class _Graph:
    """Small editing helpers over an onnx GraphProto: fresh names, producers and consumers, initializers."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.used = {n for node in graph.node for n in (*node.input, *node.output)} | set(self.inits)
        self.used |= {v.name for v in (*graph.input, *graph.output)}

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name

    def consumers(self, tensor: str) -> list[Any]:
        return [n for n in self.graph.node if tensor in n.input]

    def producer(self, tensor: str) -> Any | None:
        return next((n for n in self.graph.node if tensor in n.output), None)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer, following the Identity nodes the exporter adds for deduplicated ones."""
        from onnx import numpy_helper

        while name not in self.inits:
            node = self.producer(name)
            if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
                return numpy_helper.to_array(node.attribute[0].t)
            if node is None or node.op_type != "Identity":
                return None
            name = node.input[0]
        return numpy_helper.to_array(self.inits[name])

    def add_initializer(self, tensor: Any) -> str:
        self.graph.initializer.append(tensor)
        self.inits[tensor.name] = tensor
        return tensor.name

    def drop_unused(self) -> None:
        """Remove the initializers no node reads any more (the float weights replaced by integer codes)."""
        read = {name for node in self.graph.node for name in node.input} | {v.name for v in self.graph.output}
        for tensor in [t for t in self.graph.initializer if t.name not in read]:
            self.graph.initializer.remove(tensor)
            del self.inits[tensor.name]

    def add_node(self, node: Any, before: Any | None = None) -> None:
        nodes = list(self.graph.node)
        index = len(nodes) if before is None else nodes.index(before)
        self.graph.node.insert(index, node)

    def qdq(self, tensor: str, grid: OnnxGrid, stem: str, before: Any | None, out: str | None = None) -> str:
        """Q then DQ of ``tensor`` (inserted before node ``before``, None: at the end) into ``out`` (default a fresh
        name); returns the dequantized tensor's name."""
        from onnx import helper, numpy_helper

        scale = self.add_initializer(numpy_helper.from_array(grid.scale, self.fresh(f"{stem}.scale")))
        zero = self.add_initializer(grid.zero_point_tensor(self.fresh(f"{stem}.zero_point")))
        quantized = self.fresh(f"{stem}.quantized")
        out = out if out is not None else self.fresh(f"{stem}.dequantized")
        axis = {} if grid.axis is None else {"axis": grid.axis}
        self.add_node(helper.make_node("QuantizeLinear", [tensor, scale, zero], [quantized],
                                       self.fresh(f"{stem}/QuantizeLinear"), **axis), before)
        self.add_node(helper.make_node("DequantizeLinear", [quantized, scale, zero], [out],
                                       self.fresh(f"{stem}/DequantizeLinear"), **axis), before)
        return out


def scope_module(node_name: str) -> str:
    """The module path of a node the TorchScript exporter named by its scopes, ``/features/features.1/block/block.0/
    block.0.0/Conv`` -> ``features.1.block.0.0``: a container's children are named ``<its scope>.<key>``, so a
    scope that extends the previous one replaces it, any other is the next attribute."""
    parts: list[str] = []
    for scope in node_name.split("/")[1:-1]:
        if parts and scope.startswith(parts[-1] + "."):
            parts[-1] = scope
        else:
            parts.append(scope)
    return ".".join(parts)


def layer_nodes(graph: _Graph, module_name: str) -> list[Any]:
    """The Conv/Gemm/MatMul nodes the exporter made of module ``module_name`` (``scope_module``); each one's
    weight is then checked to be that module's (``_weight``)."""
    return [n for n in graph.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and scope_module(n.name) == module_name]


def output_tensor(graph: _Graph, node: Any) -> str:
    """The layer's output: the node's, or for a linear exported as MatMul then Add (the bias), the Add's."""
    out = node.output[0]
    if node.op_type == "MatMul":
        after = graph.consumers(out)
        if len(after) == 1 and after[0].op_type == "Add" and any(graph.constant(i) is not None for i in after[0].input):
            return after[0].output[0]
    return out


def export_onnx(model: nn.Module, quantizer: ModelQuantizer, example: torch.Tensor, path: Path,
                relu_pairs: bool = False) -> ExportReport:
    """Write ``model`` as ``quantizer`` quantizes it (its plan's activation grids at its placement, its weights'
    grids; BatchNorm as the model has it, folded by the session) to ``path`` atomically, as an opset-21 QDQ model
    with input ``input`` and output ``logits`` (batch dimension free).  ``example``: an input of the model's size.
    ``relu_pairs`` (output placement): the same grid again after each Relu/Clip that reads a planned output and
    keeps its values on that grid (``_repeat_after_clip``), so that ORT can fuse the next conv into QLinearConv."""
    import onnx

    report = ExportReport(path)
    weights = quantizer.weights
    attached_here = not weights.attached
    if attached_here:
        weights.attach()
    try:
        grids = dict(weights.grids)
        twin = copy.deepcopy(model).cpu().float().eval()
    finally:
        if attached_here:
            weights.detach()
    proto = onnx.load_from_string(_torch_export(twin, example))
    graph = _Graph(proto.graph)
    modules = dict(twin.named_modules())
    placement = quantizer.config.act.placement
    planned = {p.name: p.bits for p in quantizer.plan} if quantizer.plan is not None else {}
    for layer, spec in zip(quantizer.layers, quantizer.specs, strict=True):
        nodes = layer_nodes(graph, layer.module_name)
        bits = planned.get(layer.name)
        if not nodes:
            if bits is not None and isinstance(twin, torch.fx.GraphModule):
                raise ExportError("this network calls a ReLU6 module at several places, so --equalize rewrote its "
                                  "graph with torch.fx, whose exported node names the export cannot map to its "
                                  "modules yet: export it without --equalize")
            if bits is not None:
                raise ExportError(f"{layer.name} ({layer.module_name}): its activation is quantized, but the "
                                  "exported graph has no Conv/Gemm/MatMul node of that module to put the pair on")
            if grids.get(layer.name) is not None:  # used through its weight alone (attention's out_proj)
                report.float_weights.append(layer.name)
            continue
        weight = modules[layer.module_name].weight.detach().numpy()
        for node in nodes:
            _weight(graph, node, layer.name, weight, grids.get(layer.name), spec.weight.bits, report)
        if bits is None:
            continue
        qp = quantizer.activation_grid(layer.name)
        if qp is None:  # an empty observed range (delta 0): the simulator leaves the tensor as it is
            report.identity.append(layer.name)
            continue
        grid = onnx_grid(qp, bits, 1 if quantizer.config.act.per_channel else None)
        if grid.moved > 1e-3:
            report.moved_layers += 1
            report.moved_steps = max(report.moved_steps, grid.moved)
        report.widened += grid.widened
        for node in nodes:
            tensor = _activation(graph, node, layer.name, placement, grid, report)
            if relu_pairs and tensor is not None:
                _repeat_after_clip(graph, tensor, layer.name, grid, report)
    for layer in quantizer.layers:
        for node in layer_nodes(graph, layer.module_name):
            _integer_bias(graph, node, layer.name, report)
    graph.drop_unused()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = OPSET
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    atomic_write(path, lambda tmp: onnx.save(proto, tmp), suffix=".onnx")
    return report


def _torch_export(model: nn.Module, example: torch.Tensor) -> bytes:
    """The TorchScript exporter's opset-20 model, batch dimension free.  PyTorch's fused attention fast path
    (``aten::_native_multi_head_attention``) has no ONNX form: it is switched off for the export and restored.
    An exporter failure is one ``ExportError`` line."""
    buffer = io.BytesIO()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes, once per export
            torch.onnx.export(model, (example.cpu().float(),), buffer, dynamo=False, opset_version=TORCH_OPSET,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except (RuntimeError, TypeError, torch.onnx.errors.OnnxExporterError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"--export_onnx: torch's ONNX exporter cannot export this network: {first}") from None
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return buffer.getvalue()


def _weight(graph: _Graph, node: Any, name: str, weight: np.ndarray, qp: QParams | None, bits: int | None,
            report: ExportReport) -> None:
    """Replace ``node``'s weight by integer codes and a DequantizeLinear when its grid has an integer zero."""
    from onnx import TensorProto, helper, numpy_helper

    stored = graph.constant(node.input[1])
    transposed = stored is not None and stored.shape != weight.shape
    if stored is None or not np.array_equal(stored.T if transposed else stored, weight):
        raise ExportError(f"the weight of {name} in the exported graph is not the simulator's")
    if qp is None or bits is None:
        return
    found = weight_codes(weight, qp, bits)
    if found is None:
        report.float_weights.append(name)
        return
    codes, grid = found
    eight_bit = grid.onnx_type in (TensorProto.INT8, TensorProto.UINT8)
    if grid.axis is not None and eight_bit and np.unique(grid.zero_point).size > 1:
        # ORT's QLinearConv reads one zero point for every channel of an 8-bit weight (measured: logits off by
        # units on mobilenet_v2 -pcw); int16 codes keep the values exact and the conv out of that kernel
        grid = OnnxGrid(grid.scale, grid.zero_point, -(2**15), 2**15 - 1, TensorProto.INT16, grid.axis)
        report.widened_weights += 1
    if transposed:  # a MatMul reads [in, out]: the output channels are axis 1
        codes = codes.T
        grid = OnnxGrid(grid.scale, grid.zero_point, grid.lo, grid.hi, grid.onnx_type,
                        None if grid.axis is None else 1)
    values = helper.make_tensor(graph.fresh(f"{name}.weight_codes"), grid.onnx_type, list(codes.shape),
                                codes.reshape(-1).tolist())
    codes_name = graph.add_initializer(values)
    scale = graph.add_initializer(numpy_helper.from_array(grid.scale, graph.fresh(f"{name}.weight_scale")))
    zero = graph.add_initializer(grid.zero_point_tensor(graph.fresh(f"{name}.weight_zero_point")))
    out = graph.fresh(f"{name}.weight")
    axis = {} if grid.axis is None else {"axis": grid.axis}
    graph.add_node(helper.make_node("DequantizeLinear", [codes_name, scale, zero], [out],
                                    graph.fresh(f"{name}/weight/DequantizeLinear"), **axis), node)
    node.input[1] = out
    report.weights[helper.tensor_dtype_to_string(grid.onnx_type).removeprefix("TensorProto.")] += 1


def _integer_bias(graph: _Graph, node: Any, name: str, report: ExportReport) -> None:
    """A conv/Gemm that reads a per-tensor 8-bit DequantizeLinear and 8-bit integer weights gets its bias as int32
    codes at the accumulator's scale ``s_x * s_w`` (per output channel with per-channel weights), the form ORT's
    QLinearConv takes; within half an accumulator step of the simulator's bias.  The others keep the bias's float
    values exactly (at 4 bits that step is coarse: measured on mobilenet_v2 W4A4 -bca, int32 biases there took
    top-1 agreement down to 45 % of 64 photos)."""
    from onnx import TensorProto, helper, numpy_helper

    if len(node.input) < 3 or not node.input[2]:
        return
    bias = graph.constant(node.input[2])
    source, weight = graph.producer(node.input[0]), graph.producer(node.input[1])
    if bias is None or source is None or weight is None or "DequantizeLinear" not in (source.op_type, weight.op_type) \
            or source.op_type != weight.op_type:
        return
    s_x, s_w = graph.constant(source.input[1]), graph.constant(weight.input[1])
    if s_x is None or s_w is None or s_x.size != 1:
        return
    eight_bit = (TensorProto.UINT8, TensorProto.INT8)
    if any(_zero_point_type(graph, n) not in eight_bit for n in (source, weight)):
        return  # no integer kernel will take it (4-bit or int16): the simulator's float bias stays exact
    scale = (s_x.astype(np.float64).reshape(()) * s_w.astype(np.float64)).astype(np.float32)
    codes = np.round(bias.astype(np.float64) / scale.astype(np.float64))
    if np.abs(codes).max(initial=0) >= 2**31 - 1:
        return
    axis = {"axis": 0} if scale.size > 1 else {}
    stem = f"{name}.bias"
    values = graph.add_initializer(numpy_helper.from_array(codes.astype(np.int32), graph.fresh(f"{stem}_codes")))
    scale_name = graph.add_initializer(numpy_helper.from_array(scale, graph.fresh(f"{stem}_scale")))
    zero = graph.add_initializer(helper.make_tensor(graph.fresh(f"{stem}_zero_point"), TensorProto.INT32,
                                                    list(scale.shape), [0] * scale.size))
    out = graph.fresh(stem)
    graph.add_node(helper.make_node("DequantizeLinear", [values, scale_name, zero], [out],
                                    graph.fresh(f"{stem}/DequantizeLinear"), **axis), node)
    node.input[2] = out
    report.int32_biases += 1


def _zero_point_type(graph: _Graph, dq: Any) -> int | None:
    """The ONNX element type of a DequantizeLinear's zero point (its codes' type)."""
    name = dq.input[2] if len(dq.input) > 2 else ""
    tensor = graph.inits.get(name)
    return None if tensor is None else tensor.data_type


def _activation(graph: _Graph, node: Any, name: str, placement: str, grid: OnnxGrid, report: ExportReport
                ) -> str | None:
    """A Q/DQ pair on the layer's input (this node's alone: another reader keeps its own grid, as each hook
    quantizes a copy) or on its output (every reader sees it: renamed so that the readers keep their names).
    Returns the quantized output's name (None for an input pair)."""
    from onnx import helper

    if placement == "input":
        node.input[0] = graph.qdq(node.input[0], grid, f"{name}.input", node)
        report.quantized_tensors.append(f"{name}.input")
        tensor = None
    else:
        tensor = output_tensor(graph, node)
        producer = graph.producer(tensor)
        raw = graph.fresh(f"{tensor}.float")
        producer.output[list(producer.output).index(tensor)] = raw
        nodes = list(graph.graph.node)
        after = nodes[nodes.index(producer) + 1] if nodes.index(producer) + 1 < len(nodes) else None
        graph.qdq(raw, grid, f"{name}.output", after, out=tensor)  # the readers and graph outputs keep the name
        report.quantized_tensors.append(f"{name}.output")
    report.activation_pairs[helper.tensor_dtype_to_string(grid.onnx_type).removeprefix("TensorProto.")] += 1
    return tensor


def _on_levels(value: float, grid: OnnxGrid) -> bool:
    """Whether clipping a tensor of ``grid`` at ``value`` leaves every value on the grid: ``value`` is one of its
    levels (in every channel), or lies beyond its ends."""
    scale = np.asarray(grid.scale, dtype=np.float64).reshape(-1)
    zero = np.asarray(grid.zero_point, dtype=np.float64).reshape(-1)
    position = value / scale + zero
    beyond = (position <= grid.lo) | (position >= grid.hi)
    return bool((beyond | (np.abs(position - np.round(position)) < 1e-4)).all())


def _repeat_after_clip(graph: _Graph, tensor: str, name: str, grid: OnnxGrid, report: ExportReport) -> None:
    """The grid of ``tensor`` again on the output of each Relu/Clip reading it, where the clip's bounds are levels
    of the grid (0 always is one: its zero point is an integer): requantizing a value already on a grid returns it
    unchanged, so the network computes the same, and ORT finds DequantizeLinear right before the next conv."""
    for reader in graph.consumers(tensor):
        if reader.op_type == "Relu":
            bounds = [0.0]
        elif reader.op_type == "Clip":
            bounds = [float(v) for i in reader.input[1:3] if i and (v := graph.constant(i)) is not None]
            if len([i for i in reader.input[1:3] if i]) != len(bounds):
                continue  # a bound computed at run time
        else:
            continue
        if not all(_on_levels(b, grid) for b in bounds):
            continue
        out = reader.output[0]
        raw = graph.fresh(f"{out}.float")
        reader.output[0] = raw
        nodes = list(graph.graph.node)
        after = nodes[nodes.index(reader) + 1] if nodes.index(reader) + 1 < len(nodes) else None
        graph.qdq(raw, grid, f"{name}.after_{reader.op_type.lower()}", after, out=out)
        report.repeated += 1


def describe(report: ExportReport) -> str:
    """One log line of what the export wrote."""
    pairs = ", ".join(f"{n} {t}" for t, n in sorted(report.activation_pairs.items())) or "none"
    stored = ", ".join(f"{n} {t}" for t, n in sorted(report.weights.items())) or "none"
    text = (f"ONNX QDQ model (opset {OPSET}) written to {report.path}: activation pairs {pairs}; integer weights "
            f"{stored}")
    if report.float_weights:
        text += (f"; {len(report.float_weights)} weights as float values (their grid's zero falls between levels, or "
                 "the module is used through its weight alone): "
                 + ", ".join(report.float_weights[:5]) + (" ..." if len(report.float_weights) > 5 else ""))
    if report.moved_layers:
        text += (f"; {report.moved_layers} activation grids moved to put 0.0 on a level (no -pz), by up to "
                 f"{report.moved_steps:.3f} steps: the grids -pz gives (its run is the simulator's accuracy on them)")
    if report.int32_biases:
        text += f"; {report.int32_biases} biases as int32 at the accumulator's scale"
    if report.repeated:
        text += (f"; {report.repeated} grids repeated after the Relu/Clip that reads them (values unchanged, for "
                 "ORT's fusion)")
    if report.identity:
        text += (f"; {len(report.identity)} planned activations had an empty range (the simulator leaves them "
                 "unquantized), no pair: " + ", ".join(report.identity[:5]) + (" ..." if len(report.identity) > 5
                                                                              else ""))
    if report.widened_weights:
        text += (f"; {report.widened_weights} per-channel weights with zero points differing between channels "
                 "stored in int16 (ORT's QLinearConv takes one zero point for all channels), so run in float")
    if report.widened:
        text += (f"; {report.widened} activation grids (channels) lay wholly on one side of 0 and were widened to "
                 "reach it, level count kept")
    return text


class OrtModel:
    """An ONNX model in ONNX Runtime's CPU execution provider, with the optimised graph's kernels counted (whether
    the QDQ pairs were fused into integer kernels: a check that ran in float would prove nothing)."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        import onnx
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: its notes on serializing the optimised graph are not ours
        if threads:
            options.intra_op_num_threads = threads
        self.four_bit = _has_four_bit(onnx.load(str(path), load_external_data=False))
        if self.four_bit:  # its QDQ fusion would make a QLinearConv of 4-bit inputs, which no CPU kernel takes
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        with tempfile.TemporaryDirectory(prefix="aciq-ort-") as tmp:
            optimised = Path(tmp) / "optimised.onnx"
            options.optimized_model_filepath = str(optimised)
            # its WeightBiasQuantization would quantize the float weights (those the export could not write as
            # codes) on a grid of its own: a network the simulator never ran
            # with 4-bit grids its Clip/Relu-into-Q rewrites fail on a uint4 zero point (ORT 1.32)
            disabled = ["WeightBiasQuantization", *(("ClipQuantRewrite", "ReluQuantRewrite") if self.four_bit else ())]
            try:
                self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                                    disabled_optimizers=disabled)
            except Exception as err:  # onnxruntime's own exception types: one line, as for any refusal
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ExportError(f"--eval_onnx: ONNX Runtime cannot run {path}: {first}") from None
            self.kernels = Counter(n.op_type for n in onnx.load(str(optimised), load_external_data=False).graph.node)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().cpu().float().numpy()
        return torch.from_numpy(self.session.run(None, {self.input: array})[0])

    def kernel_line(self) -> str:
        """How many layers run in integer kernels and how many in float, in the optimised graph."""
        integer = {op: self.kernels[op] for op in INTEGER_OPS if self.kernels[op]}
        floats = {op: self.kernels[op] for op in FLOAT_OPS if self.kernels[op]}
        fmt = lambda d: ", ".join(f"{n} {op}" for op, n in d.items()) or "none"  # noqa: E731
        line = f"ONNX Runtime's optimised graph: integer kernels {fmt(integer)}; float {fmt(floats)}"
        if self.four_bit:
            line += (" (4-bit tensors: ORT's CPU provider has no 4-bit conv or matmul kernel, so QDQ fusion is off "
                     "and every layer runs in float between exact Q/DQ pairs)")
        elif not integer:
            line += " (no QDQ pair was fused: ORT ran the layers in float after dequantizing)"
        return line


def _has_four_bit(proto: Any) -> bool:
    from onnx import TensorProto

    return any(t.data_type in (TensorProto.INT4, TensorProto.UINT4) for t in proto.graph.initializer)
