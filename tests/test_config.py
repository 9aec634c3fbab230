"""The run's configuration as nested frozen dataclasses: refusals without argparse (``ConfigError`` naming the
fields), the same refusals at the command line (one line naming the flag, exit 2), adding a setting, and the
package's import graph (no cycle)."""

from __future__ import annotations

import ast
import dataclasses
import graphlib
import importlib.util
import shlex
import sys
from pathlib import Path

import pandas as pd
import pytest

import inference_sim
from pytorch_quantizer.config import DataConfig, RunConfig, flatten, from_flat, settings_hash
from pytorch_quantizer.passes import Measured
from pytorch_quantizer.quant_config import (
    ActivationConfig,
    AllocationConfig,
    ConfigError,
    CorrectionConfig,
    QuantConfig,
    WeightConfig,
)
from pytorch_quantizer.results import Accuracy, Recorder, config_columns

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pytorch_quantizer"

# -- (a) the library refuses bad settings itself, naming the fields -------------------------------------------

REFUSED = [
    # (what builds the config, the fields the error names, a phrase of its message)
    (lambda: ActivationConfig(bits=0), ("act.bits",), "bits"),
    (lambda: ActivationConfig(bits=17), ("act.bits",), "bits"),
    (lambda: ActivationConfig(bits=4, first_bits=0), ("act.first_bits",), "bits"),
    (lambda: WeightConfig(bits=0), ("weight.bits",), "bits"),
    (lambda: WeightConfig(bits=4, bias_bits=99), ("weight.bias_bits",), "bits"),
    (lambda: QuantConfig(act=ActivationConfig(bits=0)), ("act.bits",), "bits"),
    (lambda: ActivationConfig(bits=4, method="median"), ("act.method",), "unknown clipping method 'median'"),
    (lambda: WeightConfig(method="median"), ("weight.method",), "unknown clipping method 'median'"),
    (lambda: WeightConfig(method="kld"), ("weight.method",), "needs only moments"),
    (lambda: WeightConfig(bits=None, method="laplace"), ("weight.method", "weight.bits"), "needs quantized weights"),
    (lambda: ActivationConfig(bits=4, placement="middle"), ("act.placement",), "one of output, input"),
    (lambda: ActivationConfig(bits=4, sigma="mad"), ("act.sigma",), "act.sigma must be one of"),
    (lambda: ActivationConfig(bits=4, placement="input", half_range=True), ("act.half_range", "act.placement"),
     "half range"),
    (lambda: AllocationConfig(mode="floor"), ("alloc.mode",), "alloc.mode must be one of"),
    (lambda: AllocationConfig(prior="cauchy"), ("alloc.prior",), "alloc.prior must be one of"),
    (lambda: AllocationConfig(act_bits=4.0), ("alloc.act_bits", "alloc.activations"), "give alloc.activations too"),
    (lambda: AllocationConfig(weights=True, weight_bits=0.5), ("alloc.weight_bits",), "target must be 1..16 bits"),
    (lambda: CorrectionConfig(act_bias_rounds=0), ("correct.act_bias_rounds",), "an integer in 1..100"),
    (lambda: QuantConfig(alloc=AllocationConfig(activations=True)), ("alloc.activations", "act.per_channel"),
     "needs per-channel activations"),
    (lambda: QuantConfig(weight=WeightConfig(bits=None), alloc=AllocationConfig(weights=True)),
     ("alloc.weights", "weight.bits"), "not with float weights"),
    (lambda: QuantConfig(act=ActivationConfig(bits=4, method="minmax"), weight=WeightConfig(bits=4),
                         alloc=AllocationConfig(weights=True)), ("alloc.prior", "act.method"), "needs a prior"),
    (lambda: DataConfig(seed=-1), ("data.seed",), "an integer in 0"),
    (lambda: DataConfig(batch_size=0), ("data.batch_size",), "positive integer"),
    (lambda: DataConfig(cal_size=0), ("data.cal_size",), "positive integer"),
    (lambda: DataConfig(workers=-1), ("data.workers",), "in 0..256"),
    (lambda: RunConfig(stats_mode="sometimes"), ("stats_mode",), "one of collect, use, no"),
    (lambda: RunConfig(device="tpu"), ("device",), "unknown device"),
    (lambda: RunConfig(device="cpu", device_ids=(0, 1)), ("device_ids", "device"), "but `device` is cpu"),
    (lambda: RunConfig(act=ActivationConfig(per_channel=True), stats_mode="use"), ("act.per_channel", "act.bits"),
     "give act.bits too"),
    (lambda: RunConfig(act=ActivationConfig(bits=4, per_channel=True)), ("act.per_channel", "stats_mode"),
     "per-channel activation grids come from statistics"),
    (lambda: RunConfig(act=ActivationConfig(bits=4), correct=CorrectionConfig(act_bias=True), stats_mode="collect"),
     ("correct.act_bias", "stats_mode"), "not in a collect pass"),
    (lambda: RunConfig(correct=CorrectionConfig(act_bias=True)), ("correct.act_bias", "act.bits", "weight.bits"),
     "nothing is quantized"),
    (lambda: RunConfig(act=ActivationConfig(bits=4), correct=CorrectionConfig(act_bias_rounds=3)),
     ("correct.act_bias_rounds", "correct.act_bias"), "give correct.act_bias too"),
    (lambda: RunConfig(act=ActivationConfig(bits=4), eval_precision=True, layer_selection=True, stats_mode="use"),
     ("eval_precision", "layer_selection"), "one at a time"),
    (lambda: RunConfig(act=ActivationConfig(bits=4), layer_selection=True), ("layer_selection", "stats_mode"),
     "with stats_mode use"),
    (lambda: RunConfig(layer_selection=True, stats_mode="use"), ("layer_selection", "act.bits"), "give act.bits"),
    (lambda: RunConfig(layer_selection_step=2), ("layer_selection_step", "layer_selection"),
     "give layer_selection too"),
    (lambda: RunConfig(sweep_bits=(8, 4)), ("sweep_bits", "sweep_weight_bits", "eval_precision"),
     "give eval_precision too"),
    (lambda: RunConfig(eval_precision=True, sweep_bits=(8, None)), ("sweep_bits",), "activation widths"),
    (lambda: RunConfig(eval_precision=True, sweep_bits=(8, 8)), ("sweep_bits",), "each width once"),
    (lambda: RunConfig(act=ActivationConfig(bits=4), compare_bits=(4, 8)), ("act.bits", "compare"),
     "comparison of methods"),
    (lambda: RunConfig(compare=("laplace",)), ("compare", "act.bits"), "give act.bits, one width or several"),
    (lambda: RunConfig(act=ActivationConfig(bits=4), compare=("laplace", "median")), ("compare",),
     "unknown clipping method 'median'"),
    (lambda: RunConfig(act=ActivationConfig(bits=4), compare=("laplace",), eval_precision=True),
     ("compare", "eval_precision"), "not with the precision sweep"),
    (lambda: RunConfig(act=ActivationConfig(bits=4), compare=("laplace",), compile=True, stats_mode="use"),
     ("compare", "dump_dir", "compile"), "one method at a time"),
    (lambda: RunConfig(observers=("moments",)), ("observers", "stats_mode"), "stats_mode collect"),
    (lambda: RunConfig(observers=("histogram",), stats_mode="collect"), ("observers",), "include moments"),
    (lambda: RunConfig(stats_mode="collect", eval_precision=True), ("stats_mode", "eval_precision",
                                                                    "layer_selection", "dump_dir"),
     "only collects statistics"),
    (lambda: RunConfig(compile=True), ("compile", "stats_mode", "act.stochastic"), "compiling runs stats_mode use"),
    (lambda: RunConfig(dist_timeout=0), ("dist_timeout",), "minutes"),
    (lambda: RunConfig(print_freq=-1), ("print_freq",), ">= 0"),
    (lambda: RunConfig(weight=WeightConfig(bits=None), alloc=AllocationConfig(weights=True)),
     ("alloc.weights", "weight.bits"), "not with float weights"),
]


@pytest.mark.parametrize(("build", "fields", "phrase"), REFUSED, ids=lambda v: None if callable(v) else str(v))
def test_configs_refuse_bad_settings_naming_the_fields(build, fields, phrase):
    with pytest.raises(ConfigError, match=phrase) as err:
        build()
    assert err.value.fields == fields
    assert isinstance(err.value, ValueError)  # the CLI's one-line path catches ValueError


VALID = [
    RunConfig(),
    RunConfig(act=ActivationConfig(bits=4, method="laplace"), stats_mode="use"),
    RunConfig(stats_mode="collect", act=ActivationConfig(per_channel=True), observers=("moments",)),
    RunConfig(act=ActivationConfig(bits=4, method="laplace"), eval_precision=True, sweep_weight_bits=(8, 4)),
    RunConfig(act=ActivationConfig(bits=4), layer_selection=True, layer_selection_step=3, stats_mode="use"),
    RunConfig(act=ActivationConfig(bits=4), compare=("no", "laplace"), compare_bits=(4, 8)),
    RunConfig(act=ActivationConfig(bits=4, method="laplace", per_channel=True), stats_mode="use",
              weight=WeightConfig(per_channel=True, method="laplace"),
              alloc=AllocationConfig(activations=True, weights=True, act_bits=3.5),
              correct=CorrectionConfig(weight_mean=True, act_bias=True, act_bias_rounds=3)),
]


@pytest.mark.parametrize("cfg", VALID, ids=range(len(VALID)))
def test_a_valid_config_is_a_fixed_point(cfg):
    """What validation resolves (weights' width, sweep widths, comparison widths, device) validates again as is:
    ``dataclasses.replace`` and ``from_flat(flatten(cfg))`` give the same config."""
    assert dataclasses.replace(cfg) == cfg
    assert from_flat(flatten(cfg)) == cfg


def test_from_flat_is_the_nested_config():
    flat = from_flat({"act.bits": 4, "act.method": "laplace", "data.seed": 3, "stats_mode": "use",
                      "correct.act_bias": True})
    nested = RunConfig(act=ActivationConfig(bits=4, method="laplace"), data=DataConfig(seed=3), stats_mode="use",
                       correct=CorrectionConfig(act_bias=True))
    assert flat == nested and flat.weight.bits == 8 and flat.quant().seed == 3  # int8 weights when quantizing


# -- (b) what moved from the CLI into the library still reaches the user as one line naming the flag ---------

MOVED = [
    (["-pcq_a", "-th", "kld", "--qtype", "int4", "-sm", "use"], "-th 'kld' needs moments, histogram"),
    (["-pcq_a", "--compare", "laplace,kld,p99", "--qtype", "int4", "-sm", "use"], "--compare 'kld' needs"),
    (["--device", "cpu", "--device_ids", "0"], "--device_ids 0 choose GPUs, but --device is cpu"),
    (["-pcq_a", "-sm", "use"], "--qtype"),
    # (flags, the flag the line must name) for every check that the driver's config_from_args made before
    (["--qtype", "int4,int8"], "--qtype"),
    (["--compare", "laplace"], "--compare"),
    (["--compare", "laplace", "--qtype", "int4", "-ep"], "-ep/--eval_precision"),
    (["--compare", "laplace", "--qtype", "int4,int8", "-ct", "-sm", "use"], "-ct/--custom_test"),
    (["--compare", "laplace", "--qtype", "int4", "-dd", "dump"], "-dd/--dump_dir"),
    (["--compare", "laplace", "--qtype", "int4", "--compile", "-sm", "use"], "--compile"),
    (["-ct", "--qtype", "int4"], "run it with -sm use"),
    (["-hr", "--act_point", "input", "--qtype", "int4"], "-hr/--half_range"),
    (["-sm", "use", "--qtype", "int4", "-ep", "-ct"], "-ep/--eval_precision"),
    (["--observers", "moments"], "--observers"),
    (["--ct_step", "2"], "--ct_step"),
    (["--layer-selection-step", "2"], "--ct_step"),
    (["-sm", "use", "-ct"], "--qtype"),
    (["-sm", "use", "--qtype", "int4", "-baa", "-th", "laplace"], "-baa/--bit_alloc_act"),
    (["--qtype", "int4", "-pcq_a"], "-pcq_a/--per_channel_activations"),
    (["-baw", "-qw", "f32", "--qtype", "int4"], "-baw/--bit_alloc_weight"),
    (["-bata", "4"], "-bata/--bit_alloc_target_act"),
    (["-batw", "4"], "-batw/--bit_alloc_target_weight"),
    (["-ep_a", "int8,int4"], "-ep_a/--ep_qtypes"),
    (["-ep_w", "int8"], "-ep_w/--ep_qweights"),
    (["-ep", "-ep_a", "int8,fp32"], "-ep_a/--ep_qtypes"),
    (["-bca", "-sm", "collect", "--qtype", "int4"], "-bca/--act_bias_correction"),
    (["-bca"], "-bca/--act_bias_correction"),
    (["--bca-rounds", "3", "--qtype", "int4"], "--bca_rounds"),
    (["-sm", "collect", "-ep"], "-sm/--stats_mode"),
    (["-sm", "collect", "-dd", "dump"], "-dd/--dump_dir"),
    (["--compile"], "--compile"),
    (["--compile", "-sm", "use", "-s", "--qtype", "int4"], "-s/--stochastic"),
    (["--device", "tpu"], "--device"),
    (["--dist_timeout", "0"], "--dist_timeout"),
    (["-thw", "kld", "--qtype", "int4"], "-thw/--weight_threshold"),
    (["--weight-method", "laplace", "-qw", "f32"], "-thw/--weight_threshold"),
]


@pytest.mark.parametrize(("flags", "flag"), MOVED, ids=[" ".join(f) for f, _ in MOVED])
def test_library_refusals_are_one_line_naming_the_flag(tmp_path, capsys, flags, flag):
    argv = ["--data", str(tmp_path / "no-imagenet"), "--results", str(tmp_path / "r.csv"), *flags]
    try:
        code = inference_sim.main(argv)
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("inference_sim.py: error: ") and flag in err[0], err[0]
    assert "no-imagenet" not in err[0]  # refused for the flags, before any image is looked for
    assert not (tmp_path / "r.csv").exists()


def test_config_from_args_names_the_flags_and_keeps_the_fields():
    parser = inference_sim.build_parser()
    with pytest.raises(ConfigError) as err:
        inference_sim.config_from_args(parser.parse_args(["--qtype", "int4", "-pcq_a"]), parser)
    assert err.value.fields == ("act.per_channel", "stats_mode")
    # the prefix names the flags the user gave; the text spells the other fields as flags
    assert str(err.value).startswith("-pcq_a/--per_channel_activations: ")
    assert "(-sm collect), then use them (-sm use)" in str(err.value)


@pytest.mark.parametrize("flags, idle", [
    ("-qw int8 --edge_weights int4", True),
    ("-qw int4 --edge_weights int4", True),
    ("-qw f32 --edge_weights int8", True),
    ("-qw int2 --edge_weights int4", False),
    ("-qw int8 --edge_weights same", False),  # None: edges like the others, which is the default's effect at int8
    ("-ep -ep_w int2,int8 --edge_weights int4", False),  # the int2 pass widens its edges
    ("-ep -ep_w int4,int8 --edge_weights int4", True),
])
def test_a_flag_without_effect_warns_and_keeps_the_settings_hash(caplog, flags, idle):
    """``--edge_weights`` narrower than every weight width changes nothing: one warning line, and the run's file
    names (its settings hash) are those of the same run without the flag."""
    parser = inference_sim.build_parser()
    argv = ["--qtype", "int4", "--device", "cpu", *shlex.split(flags)]
    with caplog.at_level("WARNING", logger="pytorch_quantizer"):
        cfg = inference_sim.config_from_args(parser.parse_args(argv), parser)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    plain = inference_sim.config_from_args(parser.parse_args(_without_edge(argv)), parser)
    assert ("weight.edge_bits" in cfg.without_effect()) == idle
    if idle:
        assert len(warnings) == 1 and warnings[0].startswith("warning: --edge_weights int") \
            and "has no effect" in warnings[0] and "\n" not in warnings[0], warnings
        assert settings_hash(cfg, "w", "s") == settings_hash(plain, "w", "s")
    else:
        assert not warnings
        assert settings_hash(cfg, "w", "s") != settings_hash(plain, "w", "s")


def _without_edge(argv: list[str]) -> list[str]:
    i = argv.index("--edge_weights")
    return argv[:i] + argv[i + 2:]


# -- (c) adding a setting: one field, one add_argument and the code that uses it ----------------------------


def _check_knob(self) -> None:
    RunConfig.__post_init__(self)
    if self.toy_knob < 0:
        raise ConfigError(f"toy_knob must be >= 0, got {self.toy_knob}", "toy_knob")


ToyRunConfig = dataclasses.make_dataclass(
    "ToyRunConfig", [("toy_knob", int, dataclasses.field(default=0))], bases=(RunConfig,), frozen=True,
    namespace={"__post_init__": _check_knob})


def toy_config(argv: list[str]) -> ToyRunConfig:
    """The flags to a ``ToyRunConfig``: the parser with one more ``add_argument`` (dest = the field), and
    ``from_flat`` building the config class that has the field, with no list of settings to keep."""
    parser = inference_sim.build_parser()
    parser.add_argument("--toy-knob", dest="toy_knob", type=int)
    return from_flat(vars(parser.parse_args(argv)), ToyRunConfig)


def test_a_new_flag_reaches_the_results_row():
    cfg = toy_config(["--qtype", "int4", "-th", "laplace", "--toy-knob", "3", "--device", "cpu"])
    assert cfg.toy_knob == 3 and cfg.act.bits == 4 and cfg.weight.bits == 8
    assert config_columns(cfg)["toy_knob"] == 3  # every field of the config is a column, no list to extend
    assert settings_hash(cfg, "w", "s") != settings_hash(dataclasses.replace(cfg, toy_knob=0), "w", "s")
    recorder = Recorder(cfg, lambda: {}, "settings", write=False)
    row = recorder.record(Measured(Accuracy(10, 7, 9), 1.0), "int4", 4, 8)
    assert row["toy_knob"] == 3 and row["act.method"] == "laplace" and row["top1"] == 70.0
    assert toy_config(["--device", "cpu"]).toy_knob == 0  # not given: the field's default
    with pytest.raises(ConfigError) as err:
        toy_config(["--toy-knob", "-1"])
    assert err.value.fields == ("toy_knob",)
    parser = inference_sim.build_parser()
    parser.add_argument("--toy-knob", dest="toy_knob", type=int)
    assert inference_sim.flags_of(parser)["toy_knob"] == "--toy-knob"  # how the CLI would name it


# -- (d) the package's import graph has no cycle -------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports, at module level or inside functions
    (relative or absolute).  ``from . import x`` is an edge to the module ``x`` when there is one, else to the
    package (its ``__init__`` defines ``x``)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in modules else source)
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def test_import_graph_reads_relative_and_function_level_imports():
    graph = import_graph()
    assert len(graph) > 30
    assert "pytorch_quantizer.passes" in graph["pytorch_quantizer.run"]  # module level
    assert "pytorch_quantizer.models" in graph["pytorch_quantizer.config"]  # inside __post_init__
    assert "pytorch_quantizer" in graph["pytorch_quantizer.results"]  # from . import __version__
    assert "pytorch_quantizer.kernel_build" in graph["pytorch_quantizer.backends"]  # from . import <module>


def test_package_import_graph_has_no_cycle():
    graph = import_graph()
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


# -- scripts/methods_table.py: every row is a command the driver accepts, and the table is assembled from rows --


def load_methods_table(monkeypatch):
    spec = importlib.util.spec_from_file_location("methods_table", ROOT / "scripts" / "methods_table.py")
    table = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "methods_table", table)  # its dataclass looks its module up
    spec.loader.exec_module(table)
    return table


def test_methods_table_rows_are_commands_the_driver_accepts(tmp_path, monkeypatch):
    table = load_methods_table(monkeypatch)
    parser = inference_sim.build_parser()
    base = table.base_flags(tmp_path, 500, 0, 100, tmp_path / "results.csv")
    for net in ("mv2", "lite"):
        flags = table.net_flags(net, tmp_path)
        for row in table.ROWS:
            folder = tmp_path / "statistics" / f"{net}_{row.stats}"
            collect = inference_sim.config_from_args(
                parser.parse_args(table.collect_argv(base, flags, folder, row.stats)), parser)
            use = inference_sim.config_from_args(parser.parse_args(table.row_argv(base, flags, folder, row)), parser)
            assert collect.stats_mode == "collect" and use.stats_mode == "use", row
            assert use.sweep_weight_bits == (8, 4) and use.sweep_bits == (8, 6, 4), row
            assert use.equalize == collect.equalize and use.act.per_channel == collect.act.per_channel, row
            assert use.data.cal_size == 500 and use.data.cal_root == tmp_path / "imagenet-sample" / "val", row


def test_methods_table_assembles_the_rows_present(tmp_path, monkeypatch, capsys):
    table = load_methods_table(monkeypatch)
    for name, top1, seconds in (("hr", 66.71, None), ("bca", 66.01, 85.4)):
        rows = [{"pass": p, "top1": top1, "top1_se": 0.99, "images": 2277,
                 "cal_seconds": None if p == "fp32" else seconds, "net": "mv2", "row": name,
                 "flags": f"-th laplace -{name}"} for p in ("fp32", "W8A8", "W8A4")]
        (tmp_path / "mv2").mkdir(exist_ok=True)
        pd.DataFrame(rows).to_csv(tmp_path / "mv2" / f"{name}.csv", index=False)
    table.assemble(tmp_path, ["mv2"])
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[0].startswith("| net | flags (`-sm use`) | FP32 | W8A8 | W8A4 | cal. s | images |")
    assert lines[2] == "| mv2 | `-th laplace -hr` | 66.71 (0.99) | 66.71 (0.99) | 66.71 (0.99) | – | 2277 |"
    assert lines[3].endswith("| 85-85 | 2277 |")
