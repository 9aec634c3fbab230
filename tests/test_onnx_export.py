"""ONNX QDQ export and ONNX Runtime evaluation (issue 21): one QDQ pair in ORT against the simulator's grid, bit for
bit away from rounding ties; the exported graph's pairs at exactly the plan's tensors; the command line end to end
and its refusals (one line, exit 2, no .onnx left)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import inference_sim
from pytorch_quantizer.fake_quant import quantize_per_channel_with_qparams, quantize_with_qparams
from pytorch_quantizer.gemmlowp import QParams, gemmlowp_qparams, gemmlowp_qparams_per_channel
from pytorch_quantizer.onnx_export import ONNX_EXTRA, onnx_grid, require_onnx, scope_module, weight_codes

onnx = pytest.importorskip("onnx", reason=f"onnx not installed ({ONNX_EXTRA})")
ort = pytest.importorskip("onnxruntime", reason=f"onnxruntime not installed ({ONNX_EXTRA})")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bad_inputs import make_images  # noqa: E402

TIE = 1e-3  # |frac(v) - 0.5| below this counts as a rounding tie (float32 v = (x - o) / s, |v| <= 2**8)


def pair_model(grid, rank: int) -> bytes:
    """X -> QuantizeLinear -> codes (as int32) and -> DequantizeLinear -> Y, on ``grid`` (opset 21)."""
    axis = {} if grid.axis is None else {"axis": grid.axis}
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["codes"], **axis),
             helper.make_node("DequantizeLinear", ["codes", "scale", "zero"], ["y"], **axis),
             helper.make_node("Cast", ["codes"], ["levels"], to=TensorProto.INT32)]  # numpy has no 4-bit type
    graph = helper.make_graph(
        nodes, "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None] * rank)],
        [helper.make_tensor_value_info("levels", TensorProto.INT32, [None] * rank),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * rank)],
        [numpy_helper.from_array(grid.scale, "scale"), grid.zero_point_tensor("zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def run_pair(grid, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(pair_model(grid, x.dim()), providers=["CPUExecutionProvider"])
    codes, y = session.run(None, {"x": x.numpy()})
    return codes.astype(np.int64), y


def compare(qp: QParams, bits: int, x: torch.Tensor, axis: int | None) -> tuple[int, int]:
    """(ties, mismatches off ties) of ORT's codes against the simulator's on ``x``; asserts the dequantized values
    agree to a float32 rounding."""
    grid = onnx_grid(qp, bits, axis)
    assert grid.moved < 1e-3 and grid.widened == 0  # an exact grid (0.0 on a level)
    shape = (1, -1, 1, 1) if axis is not None else ()
    if axis is None:
        y_sim = quantize_with_qparams(x, qp, backend="torch")
        scale, offset, inv = qp.scale, qp.offset, qp.inv_scale
    else:
        y_sim = quantize_per_channel_with_qparams(x, qp, axis, backend="torch")
        scale, offset, inv = (t.reshape(shape) for t in (qp.scale, qp.offset, qp.inv_scale))
    codes_sim = torch.round((y_sim - offset) / scale).to(torch.int64).numpy()
    v = ((x - offset) * inv).numpy()
    inside = (v > 0.5) & (v < 2**bits - 1.5)  # saturated values have no tie to break
    tie = inside & (np.abs(v - np.floor(v) - 0.5) < TIE)
    codes, y = run_pair(grid, x)
    level = codes - grid.lo  # the storage's codes are the simulator's levels shifted by the type's lowest value
    mismatch = level != codes_sim
    assert (np.abs(level - codes_sim)[mismatch] == 1).all()  # a tie is never off by more than one level
    agree = ~mismatch
    step = np.broadcast_to(np.asarray(grid.scale, dtype=np.float64).reshape(shape), y.shape)
    assert (np.abs(y[agree] - y_sim.numpy()[agree]) <= 1e-4 * step[agree]).all()
    return int(tie.sum()), int((mismatch & ~tie).sum())


def images(seed: int, shape=(8, 6, 9, 9), spread: float = 3.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * spread


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("one_sided", [False, True])
def test_per_tensor_pair_is_the_simulators_grid(bits, one_sided):
    x = images(bits)
    if one_sided:  # a ReLU-fed grid over [0, alpha]: the zero point is 0
        x = x.relu()
        qp = gemmlowp_qparams(5.0, 0.0, bits, preserve_zero=True)
    else:
        qp = gemmlowp_qparams(7.3, -2.9, bits, preserve_zero=True)
    ties, off = compare(qp, bits, x, None)
    assert off == 0, f"{off} codes differ away from ties ({ties} ties)"


@pytest.mark.parametrize("bits", [8, 4])
def test_per_channel_pair_is_the_simulators_grid(bits):
    x = images(10 + bits)
    delta = torch.linspace(2.0, 9.0, 6, dtype=torch.float64)
    offset = -torch.linspace(0.0, 4.0, 6, dtype=torch.float64)  # channel 0 one-sided
    qp = gemmlowp_qparams_per_channel(delta, offset, bits, preserve_zero=True)
    ties, off = compare(qp, bits, x, 1)
    assert off == 0, f"{off} codes differ away from ties ({ties} ties)"


def test_ties_are_counted_and_are_the_only_differences():
    """Inputs placed exactly on half levels: every difference is a tie (ORT computes x / s + z, the simulator
    (x - o) * (1 / s)); the count is what the README reports as the tie share of a real network's differences."""
    qp = gemmlowp_qparams(255 * 0.0625, -128 * 0.0625, 8, preserve_zero=True)  # dyadic: halves are exact
    x = (torch.arange(-130, 130, dtype=torch.float32) + 0.5) * 0.0625
    ties, off = compare(qp, 8, x.reshape(1, -1), None)
    assert ties > 200 and off == 0


def test_grid_without_zero_on_a_level_moves_at_most_half_a_step():
    qp = gemmlowp_qparams(6.0, -2.345, 8, preserve_zero=False)
    assert abs(qp.offset / qp.scale - round(qp.offset / qp.scale)) > 0.01  # the simulator's zero between levels
    grid = onnx_grid(qp, 8, None)
    assert 0.01 < grid.moved <= 0.5
    assert float(-(grid.zero_point) * grid.scale) == pytest.approx(qp.offset, abs=0.5 * qp.scale)


def test_grid_on_one_side_of_zero_is_widened_keeping_its_levels():
    qp = gemmlowp_qparams(4.0, 1.0, 4, preserve_zero=True)  # [1, 5]: 0 is not inside, so not on the grid
    grid = onnx_grid(qp, 4, None)
    assert grid.widened == 1 and int(grid.zero_point) == 0
    assert float(grid.scale) * 15 == pytest.approx(5.0, rel=1e-6)  # [0, 5] on the same 16 levels


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_weight_codes_dequantize_to_the_simulators_weights(per_channel, bits):
    from pytorch_quantizer.weights import parameter_grid, quantize_on_grid

    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(bits))
    qp = parameter_grid(w, bits, per_channel, preserve_zero=True, pow2_scale=False)
    quantized = quantize_on_grid(w, qp).numpy()
    codes, grid = weight_codes(quantized, qp, bits)
    assert codes.min() >= grid.lo and codes.max() <= grid.hi and grid.lo == (0 if bits == 8 else -8)  # uint8, int4
    shape = (-1, 1, 1, 1) if per_channel else ()
    back = (codes - grid.zero_point.reshape(shape)) * grid.scale.astype(np.float64).reshape(shape)
    assert np.abs(back - quantized).max() <= 1e-4 * float(np.max(grid.scale))


def test_scope_names_give_module_paths():
    assert scope_module("/features/features.1/block/block.0/block.0.0/Conv") == "features.1.block.0.0"
    assert scope_module("/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    assert scope_module("/fc/Gemm") == "fc"


# -- the command line ---------------------------------------------------------------------------------------------

ARCH = ["-a", "mobilenet_v3_small", "--weights", "none", "-b", "4", "-j", "0"]


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    data = make_images(root / "data" / "val").parent
    base = ["--data", str(data), *ARCH, "-cs", "8", "--results", str(root / "collect.csv"), "-sm", "collect"]
    assert inference_sim.main([*base, "-sf", str(root / "stats")]) == 0
    assert inference_sim.main([*base, "-sf", str(root / "stats_in"), "--act_point", "input", "-pcq_a"]) == 0
    return {"data": data, "stats": root / "stats", "stats_in": root / "stats_in"}


def export(cli, tmp_path, *flags: str, stats: str = "stats") -> tuple[int, Path]:
    path = tmp_path / "model.onnx"
    code = inference_sim.main(["--data", str(cli["data"]), *ARCH, "-cs", "8", "-sm", "use", "-sf", str(cli[stats]),
                               "--results", str(tmp_path / "r.csv"), "--export_onnx", str(path), *flags])
    return code, path


def planned(tmp_path: Path) -> dict[str, int]:
    import pandas as pd

    plan = pd.read_csv(next((tmp_path / "plans").glob("*[0-9a-f].csv")), keep_default_na=False)
    return {row["module_name"]: int(float(row["bits"])) for _, row in plan.iterrows() if row["bits"] != ""}


def pairs(path: Path) -> tuple[list, dict]:
    model = onnx.load(str(path))
    producers = {out: n for n in model.graph.node for out in n.output}
    return list(model.graph.node), producers


def test_output_pairs_at_every_planned_tensor_and_nowhere_else(cli, tmp_path, capsys):
    import pandas as pd

    from pytorch_quantizer.onnx_export import scope_module as module_of

    code, path = export(cli, tmp_path, "--qtype", "int8", "-pz", "--eval_onnx")
    assert code == 0 and path.is_file()
    nodes, producers = pairs(path)
    quantized = [n for n in nodes if n.op_type == "QuantizeLinear"]
    seen = set()
    for q in quantized:
        layer = producers[q.input[0]]
        assert layer.op_type in ("Conv", "Gemm"), layer.op_type  # each pair sits on a conv/linear output
        seen.add(module_of(layer.name))
    plan = planned(tmp_path)
    assert set(seen) == set(plan) and len(quantized) == len(plan)
    layers = [n for n in nodes if n.op_type in ("Conv", "Gemm")]
    assert all(producers[n.input[1]].op_type == "DequantizeLinear" for n in layers)  # every weight as integer codes
    fed = [n for n in layers if n.input[0] in producers and producers[n.input[0]].op_type == "DequantizeLinear"]
    assert fed and all(producers[n.input[2]].op_type == "DequantizeLinear" for n in fed)  # int32 biases there
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[-5].startswith(" * Prec@1 ") and lines[-4].startswith(" * binomial standard error: Prec@1 ±")
    assert lines[-3].startswith(" * ONNX Runtime Prec@1 ")
    assert lines[-2].startswith(" * ONNX Runtime binomial standard error: Prec@1 ±")
    rows = pd.read_csv(tmp_path / "r.csv", keep_default_na=False)
    ort_row = rows[rows["pass"] == "onnxruntime"].iloc[0]
    assert float(ort_row["top1_agreement"]) >= 0 and float(ort_row["max_logit_diff"]) < 1e-3
    assert ort_row["file"] == str(path)


def test_input_pairs_per_channel_and_four_bit(cli, tmp_path, caplog):
    caplog.set_level("INFO", logger="pytorch_quantizer")
    code, path = export(cli, tmp_path, "--qtype", "int4", "-pcq_a", "--act_point", "input", "-qw", "int4", "-pcw",
                        "--eval_onnx", stats="stats_in")
    assert code == 0
    nodes, producers = pairs(path)
    consumers = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    plan = planned(tmp_path)
    quantized = [n for n in nodes if n.op_type == "QuantizeLinear"]
    assert len(quantized) == len(plan)
    for q in quantized:
        (dq,) = consumers[q.output[0]]
        (layer,) = consumers[dq.output[0]]
        assert layer.op_type in ("Conv", "Gemm") and layer.input[0] == dq.output[0]
        assert scope_module(layer.name) in plan
        assert {a.name: a.i for a in q.attribute}.get("axis") == 1  # per channel along the channels
    model = onnx.load(str(path))
    types = {t.data_type for t in model.graph.initializer}
    assert TensorProto.UINT4 in types and TensorProto.INT4 in types  # the first conv/classifier keep 8 bits
    assert "no 4-bit conv or matmul kernel" in caplog.text


BAD = [
    (["--qtype", "int4", "-s"], "stochastic rounding has no QDQ form"),
    (["--qtype", "int6"], "has no ONNX type of 64 levels"),
    (["-sm", "collect"], "a collect pass quantizes nothing"),
    (["--qtype", "int8", "-sm", "no"], "a QDQ model has fixed ones"),
    (["--qtype", "int4", "-ep"], "export one setting at a time"),
    (["--qtype", "int4", "-bcw"], "move the weights off their grid"),
]


@pytest.mark.parametrize("flags,fragment", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_refusals_are_one_line_and_leave_no_file(cli, tmp_path, capsys, flags, fragment):
    code, path = export(cli, tmp_path, *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert not any(tmp_path.rglob("*.onnx")) and not any(tmp_path.rglob(".model.onnx*"))


def test_eval_without_export_and_unwritable_path(cli, tmp_path, capsys):
    base = ["--data", str(cli["data"]), *ARCH, "-qw", "int8", "--results", str(tmp_path / "r.csv")]
    assert inference_sim.main([*base, "--eval_onnx"]) == 2
    assert "give --export_onnx PATH too" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert inference_sim.main([*base, "--export_onnx", str(tmp_path / "file" / "m.onnx")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


def test_missing_onnxruntime_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    require_onnx(runtime=False)
    with pytest.raises(ValueError, match=r'--eval_onnx needs onnxruntime, which is not installed: pip install -e '
                                         r'"\.\[onnx\]"'):
        require_onnx(runtime=True)


def test_export_failure_leaves_no_partial_file(cli, tmp_path, monkeypatch, capsys):
    def broken(proto, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save", broken)
    code, path = export(cli, tmp_path, "--qtype", "int8")
    assert code == 2 and "disk full" in capsys.readouterr().err
    assert not path.exists() and not any(p.name.startswith(".model.onnx") for p in tmp_path.iterdir())


def test_mobilenet_v2_w8a8_in_integer_kernels(shared_data, tmp_path, caplog, capsys):
    """The shared mobilenet_v2 (real weights, real photos): ORT fuses some convs into QLinearConv and follows the
    simulator to within the noise floor of rounding ties (docs/onnx.md: about 94 % top-1 agreement of the simulator
    with itself under 1e-6 input noise on 64 photos); 16 photos here, so one flip is 6.25 points."""
    caplog.set_level("INFO", logger="pytorch_quantizer")
    weights = shared_data / "weights" / "mobilenet_v2_tflite_quant.pth"
    if not weights.is_file():
        pytest.skip(f"{weights} not present")
    base = ["-a", "mobilenet_v2", "--weights", str(weights), "--cal-data", str(shared_data / "imagenet-sample" / "val"),
            "-cs", "16", "--data", str(shared_data / "imagenet-val-2k"), "--subset", "16", "-b", "16", "-j", "0",
            "-sf", str(tmp_path / "stats"), "--results", str(tmp_path / "r.csv")]
    assert inference_sim.main([*base, "-sm", "collect"]) == 0
    path = tmp_path / "mv2.onnx"
    assert inference_sim.main([*base, "-sm", "use", "--qtype", "int8", "-pz", "--export_onnx", str(path),
                               "--eval_onnx"]) == 0
    fused = re.search(r"integer kernels (\d+) QLinearConv", caplog.text)
    assert fused and int(fused.group(1)) > 0, caplog.text
    import pandas as pd

    row = pd.read_csv(tmp_path / "r.csv", keep_default_na=False).iloc[-1]
    assert row["pass"] == "onnxruntime" and int(row["images"]) == 16
    assert float(row["top1_agreement"]) >= 75.0 and float(row["max_logit_diff"]) < 3.0, row.to_dict()


def test_exporter_failure_is_one_line_and_restores_the_attention_fast_path(monkeypatch):
    from pytorch_quantizer.onnx_export import ExportError, _torch_export

    def refuse(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::foo' to ONNX opset version 20 is not supported.\nmore")

    before = torch.backends.mha.get_fastpath_enabled()
    monkeypatch.setattr(torch.onnx, "export", refuse)
    with pytest.raises(ExportError, match=r"cannot export this network: Exporting the operator 'aten::foo'") as err:
        _torch_export(torch.nn.Linear(2, 2), torch.zeros(1, 2))
    assert "\n" not in str(err.value) and torch.backends.mha.get_fastpath_enabled() == before


def test_relu_pairs_repeat_the_grid_and_change_no_value(cli, tmp_path, caplog):
    """--onnx_relu_pairs: each extra pair sits on a Relu/Clip output and has the grid of the planned pair it reads;
    ORT (fusion off, so both run the same float kernels) gives the same logits with and without them."""
    caplog.set_level("INFO", logger="pytorch_quantizer")
    flags = ("--qtype", "int8", "-pz", "-hr")
    code, plain = export(cli, tmp_path, *flags)
    assert code == 0
    plain = plain.rename(tmp_path / "plain.onnx")
    code, paired = export(cli, tmp_path, *flags, "--onnx_relu_pairs")
    assert code == 0
    repeated = re.search(r"(\d+) grids repeated after the Relu/Clip", caplog.text)
    assert repeated and int(repeated.group(1)) > 0
    model = onnx.load(str(paired))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    extra = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and producers[n.input[0]].op_type != "Conv"
             and producers[n.input[0]].op_type != "Gemm"]
    assert len(extra) == int(repeated.group(1))
    for q in extra:
        clip = producers[q.input[0]]
        assert clip.op_type in ("Relu", "Clip")
        upstream = producers[producers[clip.input[0]].input[0]]  # Clip <- DQ <- Q of the planned pair
        assert upstream.op_type == "QuantizeLinear"
        assert np.array_equal(inits[q.input[1]], inits[upstream.input[1]])
        assert np.array_equal(inits[q.input[2]], inits[upstream.input[2]])
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    outputs = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
               for p in (plain, paired)]
    np.testing.assert_array_equal(outputs[0], outputs[1])
