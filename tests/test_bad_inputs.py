"""A corpus of bad and edge inputs to ``inference_sim.py`` (issue 23, item 6): every flag with bad values, every
refused combination, bad data, weights, statistics folders and output paths.

Each row is run in-process through ``inference_sim.main`` and must give exactly one line on stderr,
``inference_sim.py: error: ...`` containing the row's fragment, no traceback, exit code 2; the shared statistics
folders are unchanged (sha256 of every file) and a refused run creates no file (no results CSV).  Rows whose
current behaviour falls short are kept with the expectation they should meet, marked ``xfail(strict=True)``.

A few rows run as real subprocesses, as a user sees them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import inference_sim

ROOT = Path(__file__).resolve().parents[1]
WNIDS = ["n01440764", "n01443537", "n02085620", "n04599235"]
PER_CLASS = 3  # 12 images: the reference statistics are collected on 8 of them, 4 are left to evaluate on
PREFIX = "inference_sim.py: error: "
HUGE = "100000000000000000000"  # 10**20: beyond int64
USE = "-sm use --qtype int4 -th laplace"
CASE_SECONDS = 20  # a row still running after this is stopped (a refusal takes well under a second or two)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RUN_ID", "GROUP_RANK")

# -- the shared files -------------------------------------------------------------------------------------------


def make_images(folder: Path, per_class: int = PER_CLASS, wnids=WNIDS, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for wnid in wnids:
        (folder / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / wnid / f"{wnid}_{i}.JPEG", quality=90)
    return folder


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def call(argv: list[str]) -> int:
    try:
        return inference_sim.main(argv)
    except SystemExit as exit_:  # argparse's own refusals
        return exit_.code


class Stopped(BaseException):
    """A guard stopped a row (not an Exception, so that the driver cannot report it as a refusal)."""


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """The images, the reference statistics (moments and histograms of 8 images, collected once) and a second,
    moments-only collection of 4 images; the rows only ever read them, or damage copies of them."""
    root = tmp_path_factory.mktemp("bad-inputs")
    data = root / "imagenet"
    make_images(data / "val")
    argv = ["--data", str(data), "-a", "mobilenet_v3_small", "--weights", "none", "-b", "4", "-j", "0",
            "--results", str(root / "collect.csv"), "-sm", "collect"]
    assert call([*argv, "-cs", "8", "-sf", str(root / "stats")]) == 0
    assert call([*argv, "-cs", "4", "--observers", "moments", "-sf", str(root / "moments-only")]) == 0
    return {"data": data, "stats": root / "stats", "other": root / "moments-only"}


@pytest.fixture(scope="module")
def shared_digests(shared) -> dict[str, dict[str, str]]:
    return {name: digests(shared[name]) for name in ("stats", "other")}


# -- statistics folders damaged in a copy of the reference ---------------------------------------------------


def put(path: Path, content: str | bytes) -> None:
    """Write a file of a damaged copy.  The copy's files are hard links to the reference's (cheap to make): the link
    is removed first, so that the reference keeps its bytes (the digests after every row check that it does)."""
    path.unlink(missing_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def link_copy(source: Path, target: Path) -> None:
    try:
        shutil.copytree(source, target, copy_function=os.link)
    except OSError:  # another file system
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)


def read_meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


def write_meta(folder: Path, meta: dict) -> None:
    put(folder / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")


def rehash(folder: Path, *names: str) -> None:
    """Record the current size and sha256 of ``names`` in meta.json (an edit made to look like a collection)."""
    meta = read_meta(folder)
    for name in names:
        path = folder / name
        if path.exists():
            data = path.read_bytes()
            meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        else:
            meta["files"].pop(name, None)
    write_meta(folder, meta)


def edit_meta(change: Callable[[dict], object]) -> Callable[[Path, dict], None]:
    def edit(folder: Path, shared: dict) -> None:
        meta = read_meta(folder)
        change(meta)
        write_meta(folder, meta)

    return edit


def write_file(name: str, content: str | bytes, rehashed: bool = False) -> Callable[[Path, dict], None]:
    def edit(folder: Path, shared: dict) -> None:
        put(folder / name, content)
        if rehashed:
            rehash(folder, name)

    return edit


def truncate(name: str) -> Callable[[Path, dict], None]:
    def edit(folder: Path, shared: dict) -> None:
        data = (folder / name).read_bytes()
        put(folder / name, data[: len(data) // 2])

    return edit


def remove(name: str, rehashed: bool = False) -> Callable[[Path, dict], None]:
    def edit(folder: Path, shared: dict) -> None:
        (folder / name).unlink()
        if rehashed:
            rehash(folder, name)

    return edit


def copy_from_other(name: str) -> Callable[[Path, dict], None]:
    def edit(folder: Path, shared: dict) -> None:
        put(folder / name, (shared["other"] / name).read_bytes())

    return edit


def edit_csv(name: str, old: str, new: str, rehashed: bool = True) -> Callable[[Path, dict], None]:
    def edit(folder: Path, shared: dict) -> None:
        path = folder / name
        text = path.read_text()
        assert old in text, (name, old)
        put(path, text.replace(old, new, 1))
        if rehashed:
            rehash(folder, name)

    return edit


def edit_lines(name: str, change: Callable[[list[str]], list[str]]) -> Callable[[Path, dict], None]:
    def edit(folder: Path, shared: dict) -> None:
        path = folder / name
        put(path, "\n".join(change(path.read_text().splitlines())) + "\n")
        rehash(folder, name)

    return edit


def calibration_list(change: Callable[[list[str]], object]) -> Callable[[Path, dict], None]:
    def edit(folder: Path, shared: dict) -> None:
        names = json.loads((folder / "calibration.json").read_text())
        put(folder / "calibration.json", json.dumps(change(names)) + "\n")
        rehash(folder, "calibration.json")

    return edit


def without_calibration_record(folder: Path, shared: dict) -> None:
    meta = read_meta(folder)
    del meta["calibration"]
    write_meta(folder, meta)


def replace_meta_with_other(folder: Path, shared: dict) -> None:
    put(folder / "meta.json", (shared["other"] / "meta.json").read_bytes())


def add_file(name: str) -> Callable[[Path, dict], None]:
    def edit(folder: Path, shared: dict) -> None:
        put(folder / name, (folder / "conv0_activation.csv").read_bytes())

    return edit


def legacy_truncated(folder: Path, shared: dict) -> None:
    """A folder of an earlier release (no file hashes) whose summary was cut short."""
    meta = read_meta(folder)
    del meta["files"]
    write_meta(folder, meta)
    truncate("conv0_activation_summary.csv")(folder, shared)


def drop_layer_entry(folder: Path, shared: dict) -> None:
    meta = read_meta(folder)
    meta["layers"] = [layer for layer in meta["layers"] if layer["name"] != "conv1_activation"]
    write_meta(folder, meta)


def moved_layer(meta: dict) -> None:
    meta["layers"][1]["module"] = "features.99.block"


def negative_count(lines: list[str]) -> list[str]:
    cells = lines[2].split(",")
    cells[-1] = "-5"
    return [*lines[:2], ",".join(cells), *lines[3:]]


# -- the rows --------------------------------------------------------------------------------------------------

FULL, NO_DATA, BARE = "full", "no-data", "bare"


@dataclass(frozen=True)
class Case:
    argv: str  # shell words; {data}, {stats}, {other}, {tmp} and {sf} (the damaged copy) are filled in
    fragment: str
    code: int = 2
    setup: Callable[[Path, dict], None] | None = None  # prepares files under {tmp}
    damage: Callable[[Path, dict], None] | None = None  # damages a copy of the reference statistics, at {sf}
    base: str = FULL  # FULL: --data, the small model, -b 4 -j 0 and --results first; NO_DATA: without --data
    seconds: int = CASE_SECONDS  # the guard stops the row after this


CASES: list = []


def row(case_id: str, argv: str, fragment: str, xfail: str | None = None, **kwargs) -> None:
    case = Case(argv, fragment, **kwargs)
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    CASES.append(pytest.param(case, id=case_id, marks=marks))


def arg(flag: str, value: str) -> str:
    """``flag value`` as shell words; a value argparse would take for an option (``-1std``) goes as flag=value."""
    if value.startswith("-") and not re.fullmatch(r"-\d+|-\d*\.\d+", value):
        return shlex.quote(f"{flag}={value}")
    return f"{flag} {shlex.quote(value)}"


# every flag: one that takes a value, given none; one that takes none, given one
for action in inference_sim.build_parser()._actions:
    if not action.option_strings or isinstance(action, argparse._HelpAction):
        continue
    flag = action.option_strings[0]
    if action.nargs == 0:
        row(f"{flag}=1 takes no value", f"{flag}=1", "ignored explicit argument '1'",
            base=BARE if flag == "--demo" else FULL)
    else:
        row(f"{flag} without a value", flag, "expected one argument")

row("-th -1std (argparse sees an option)", "-th -1std", "argument -th/--threshold/--method: expected one argument")
row("--dist_timeout -inf (argparse sees an option)", "--dist_timeout -inf", "expected one argument")
row("unknown flag", "--qtpye int4", "unrecognized arguments: --qtpye int4")
row("stray positional", "int4", "unrecognized arguments: int4")
row("ambiguous abbreviation", "--ca x", "ambiguous option: --ca could match")
row("single-dash typo", "-qtype int4", "unrecognized arguments")

# integers: positive, non-negative, seed
POSITIVE = ("-b", "--bca_rounds", "--ct_step", "-cs", "--subset")
for flag in POSITIVE:
    for value, fragment in (("0", "must be a positive integer, got 0"), ("-1", "must be a positive integer, got -1"),
                            ("-7", "must be a positive integer, got -7"), ("abc", "invalid positive value: 'abc'"),
                            ("1.5", "invalid positive value: '1.5'"), ("", "invalid positive value: ''"),
                            ("1e3", "invalid positive value: '1e3'"), ("0x10", "invalid positive value: '0x10'")):
        row(f"{flag} {value!r}", arg(flag, value), fragment)
for flag in ("-j", "-p"):
    for value, fragment in (("-1", "must be >= 0, got -1"), ("abc", "invalid non_negative value: 'abc'"),
                            ("2.5", "invalid non_negative value: '2.5'"), ("", "invalid non_negative value: ''")):
        row(f"{flag} {value!r}", arg(flag, value), fragment)
for value, fragment in (("-1", "must be in 0..2**63-1, got -1"), (str(2**63), f"must be in 0..2**63-1, got {2**63}"),
                        (str(10**23), "must be in 0..2**63-1"), ("abc", "expected an integer, got 'abc'"),
                        ("1.5", "expected an integer, got '1.5'"), ("", "expected an integer, got ''"),
                        ("1e3", "expected an integer, got '1e3'")):
    row(f"--seed {value!r}", arg("--seed", value), fragment)

# huge numbers that the parser takes
row("-b 10**20", f"-b {HUGE}", "-b")
row("-j 10**20", f"-j {HUGE}", "-j")
row("--bca_rounds 10**20", f"-bca -cs 4 --qtype int4 --bca_rounds {HUGE}", "--bca_rounds",
    seconds=2)
row("-cs 10**20", f"-cs {HUGE}", "asks for more calibration images than the 12")

# types: --qtype, -qw, --edge_weights, -ep_a, -ep_w
BAD_TYPES = ("int0", "int17", "int4.5", "fp16", "int", "INT4", "uint8", "4", "int-4", "int 4", "int1_000", "",
             "int99999999999999999999")
for flag in ("--qtype", "-qw", "--edge_weights", "-ep_a", "-ep_w"):
    for value in BAD_TYPES:
        row(f"{flag} {value!r}", arg(flag, value), f"invalid type {value.strip()!r}")
row("--qtype int4, (empty second)", "--qtype int4,", "invalid type ''")
row("--qtype int4,,int8", "--qtype int4,,int8", "invalid type ''")
row("--qtype same", "--qtype same", "invalid type 'same'")
row("-qw same", "-qw same", "invalid type 'same'")
row("--edge_weights fp32", "--edge_weights fp32", "expected intN or same")
row("--edge_weights f32", "--edge_weights f32", "expected intN or same")
row("-ep_a int8,int8", "-ep -ep_a int8,int8", "each type once")
row("-ep_w int8,int8", "-ep -ep_w int8,int8", "each type once")
row("-ep_w int4,int17", "-ep -ep_w int4,int17", "invalid type 'int17'")

# clipping methods: -th, -thw, --compare
BAD_METHODS = (("median", "unknown clipping method 'median'"), ("p0", "the percentile must be in (0, 100], got 0"),
               ("p100.5", "the percentile must be in (0, 100], got 100.5"), ("p-1", "unknown clipping method 'p-1'"),
               ("0std", "N in Nstd must be > 0, got 0"), ("0.0std", "N in Nstd must be > 0, got 0.0"),
               ("p100.0000000001", "the percentile must be in (0, 100], got 100.0000000001"),
               ("p99." + "9" * 300, "clipping method p99.9999999999999999... (304 characters): its number is written "
                "with 302 digits, more than the 17 significant digits"),
               ("0" * 40 + "3std", "its number is written with 41 digits"),
               ("-1std", "unknown clipping method '-1std'"), ("P99", "unknown clipping method 'P99'"),
               ("p", "unknown clipping method 'p'"), ("std", "unknown clipping method 'std'"),
               ("1e3std", "unknown clipping method '1e3std'"), ("pnan", "unknown clipping method 'pnan'"),
               ("Laplace", "unknown clipping method 'Laplace'"), ("", "unknown clipping method ''"))
for flag in ("-th", "-thw"):
    for value, fragment in BAD_METHODS:
        row(f"{flag} {value!r}", arg(flag, value), fragment)
for value, fragment in BAD_METHODS[:-1]:
    row(f"--compare no,{value}", f"--qtype int4 --compare no,{value}", fragment)
row("--compare ''", "--qtype int4 --compare ''", "expected a comma list of clipping methods")
row("--compare ,", "--qtype int4 --compare ,", "expected a comma list of clipping methods")
row("--compare laplace,laplace", "--qtype int4 --compare laplace,laplace", "each method once, got laplace, laplace")
for value in ("kld", "mse", "p99.9"):
    row(f"-thw {value} needs a histogram", f"--qtype int4 -thw {value}", "needs only moments")

# observers
for value, fragment in (("histogram", "include moments"), ("moments,foo", "unknown observer 'foo'"),
                        ("", "include moments"), (",", "include moments"), ("MOMENTS", "unknown observer 'MOMENTS'"),
                        ("moments;histogram", "unknown observer 'moments;histogram'")):
    row(f"--observers {value!r}", f"-sm collect {arg('--observers', value)}", fragment)

# choices
for flag, good in (("-sm", "use"), ("--act_point", "input"), ("-bam", "ceil"), ("-bap", "laplace"),
                   ("--sigma", "std")):
    for value in ("bogus", "", good.upper()):
        row(f"{flag} {value!r}", arg(flag, value), f"invalid choice: {value!r}")

# bit-allocation targets
for flag in ("-bata", "-batw"):
    for value, fragment in (("0", "got 0"), ("0.5", "got 0.5"), ("17", "got 17"), ("-1", "got -1"),
                            ("nan", "got nan"), ("inf", "got inf"), ("abc", "expected a number of bits, got 'abc'"),
                            ("", "expected a number of bits, got ''")):
        row(f"{flag} {value!r}", arg(flag, value), fragment)

# --dist_timeout (minutes in (0, 10080])
for value in ("inf", "nan", "0", "-1", "1e12", "10081", "-0.5"):
    row(f"--dist_timeout {value}", arg("--dist_timeout", value), f"must be minutes in (0, 10080], got {float(value)}")
for value in ("abc", "", "1min"):
    row(f"--dist_timeout {value!r}", arg("--dist_timeout", value), f"invalid float value: {value!r}")

# devices (the corpus runs as on a host without a CUDA GPU)
GARBLED = "garbled: the word 'device' in the message is replaced by the flag: 'inference_sim.py: error: --device: " \
          "unknown --device {!r}: expected cuda or cpu'"
for value in ("tpu", "", "CPU", "cpu:0", "mps"):
    row(f"--device {value!r}", arg("--device", value), f"unknown device {value!r}: expected cuda or cpu")
for value in ("cuda", "cuda:0"):
    row(f"--device {value!r}", arg("--device", value), "no CUDA GPU is available")
for value, fragment in (("a", "device ids must be integers"), ("0,a", "device ids must be integers"),
                        ("1.5", "device ids must be integers"), ("0;1", "device ids must be integers")):
    row(f"--device_ids {value!r}", arg("--device_ids", value), fragment)
row("--device_ids 0 on cpu", "--device cpu --device_ids 0", "--device_ids 0 choose GPUs, but --device is cpu")
row("--device_ids -1", "--device_ids -1", "--device_ids")
row("--device_ids ''", "--device_ids ''", "device ids")
row("--device cuda:x", "--device cuda:x", "cuda:x")

# architectures and weights
for value, fragment in (("resnet", "unknown architecture 'resnet'"), ("", "unknown architecture ''"),
                        ("RESNET18", "unknown architecture 'RESNET18'"),
                        ("efficientnet_lite9", "unknown architecture 'efficientnet_lite9'"),
                        ("../resnet18", "unknown architecture '../resnet18'")):
    row(f"-a {value!r}", arg("-a", value), fragment)


def text_file(name: str, content: str | bytes) -> Callable[[Path, dict], None]:
    def setup(tmp: Path, shared: dict) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def folder(name: str) -> Callable[[Path, dict], None]:
    def setup(tmp: Path, shared: dict) -> None:
        (tmp / name).mkdir(parents=True)

    return setup


def torch_file(name: str, obj) -> Callable[[Path, dict], None]:
    def setup(tmp: Path, shared: dict) -> None:
        torch.save(obj, tmp / name)

    return setup


row("--weights missing file", "--weights {tmp}/missing.pth", "does not exist")
row("--weights ~/missing.pth", "--weights ~/missing.pth", "weights file {tmp}/home/missing.pth does not exist")
row("--weights missing file without suffix", "--weights {tmp}/missing", "does not exist")
row("--weights unknown name", "--weights IMAGENET1K_V9", "'IMAGENET1K_V9' is neither a weights name of")
row("--weights text file", "--weights {tmp}/w.pth", "w.pth: not a file written by torch.save",
    setup=text_file("w.pth", "hello\n"))
row("--weights empty file", "--weights {tmp}/w.pth", "w.pth: the file is empty", setup=text_file("w.pth", ""))
row("--weights a pickled module", "--weights {tmp}/w.pth",
    "w.pth: it pickles a Python object (torch.nn.modules.linear.Linear) besides tensors",
    setup=torch_file("w.pth", torch.nn.Linear(2, 2)))
row("--weights a checkpoint holding a Namespace", "--weights {tmp}/w.pth", "(argparse.Namespace) besides tensors",
    setup=torch_file("w.pth", {"model": {}, "args": argparse.Namespace(lr=0.1)}))
row("--weights directory", "--weights {tmp}/wdir", "is not a file", setup=folder("wdir"))
row("--weights a list", "--weights {tmp}/w.pth", "does not hold a state_dict", setup=torch_file("w.pth", [1, 2]))
row("--weights another model's state_dict", "--weights {tmp}/w.pth", "does not fit mobilenet_v3_small",
    setup=torch_file("w.pth", {"fc.weight": torch.zeros(2, 2)}))


def nan_weights(tmp: Path, shared: dict) -> None:
    import torchvision

    state = torchvision.models.mobilenet_v3_small().state_dict()
    state["features.0.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp / "w.pth")


row("--weights with a NaN", "--weights {tmp}/w.pth",
    "w.pth holds NaN or infinite values in 1 tensors: features.0.0.weight (1 of 432)", setup=nan_weights)

# every refusal of the configuration (config.py, quant_config.py), through the command line
COMBINATIONS = [
    ("several widths without --compare", "--qtype int4,int8", "several activation widths"),
    ("--compare widths twice", "--compare laplace --qtype int4,int4", "each activation width once"),
    ("--compare without --qtype", "--compare laplace", "give --qtype"),
    ("--compare fp32 first", "--compare laplace --qtype fp32,int4", "got fp32 among them"),
    ("--compare with -ep", "--compare laplace --qtype int4 -ep", "not with the precision sweep"),
    ("--compare -ct with two widths", "--compare laplace --qtype int4,int8 -ct -sm use", "at one activation width"),
    ("--compare with -dd", "--compare laplace --qtype int4 -dd {tmp}/dump", "without dumps and compiling"),
    ("--compare with --compile", "--compare laplace --qtype int4 --compile -sm use", "without dumps and compiling"),
    ("-ct with -ep", "-sm use --qtype int4 -ep -ct", "two different sweeps"),
    ("-ct without -sm use", "-ct --qtype int4", "run it with -sm use"),
    ("-ct without --qtype", "-sm use -ct", "give --qtype"),
    ("--ct_step without -ct", "--ct_step 2", "give -ct too"),
    ("--layer-selection-step without -ct", "--layer-selection-step 2", "give -ct too"),
    ("-ep_a without -ep", "-ep_a int8,int4", "give -ep too"),
    ("-ep_w without -ep", "-ep_w int8", "give -ep too"),
    ("-ep_a with fp32", "-ep -ep_a int8,fp32", "lists activation widths"),
    ("--observers outside collect", "--observers moments", "give them with -sm collect"),
    ("--observers with -sm use", "--observers moments -sm use", "give them with -sm collect"),
    ("--observers with --compare", "-sm collect --observers moments --compare laplace --qtype int4",
     "a comparison collects what its methods need"),
    ("-pcq_a without --qtype", "-pcq_a -sm use", "give --qtype too"),
    ("-pcq_a with -sm no", "--qtype int4 -pcq_a", "per-channel activation grids come from statistics"),
    ("-bca in a collect pass", "-bca -sm collect --qtype int4", "not in a collect pass"),
    ("-bca with nothing quantized", "-bca", "nothing is quantized"),
    ("-bca with float weights and activations", "-bca -qw f32 --qtype fp32", "nothing is quantized"),
    ("--bca_rounds without -bca", "--bca_rounds 3 --qtype int4", "give -bca too"),
    ("collect with -ep", "-sm collect -ep", "a collect pass only collects statistics"),
    ("collect with -dd", "-sm collect -dd {tmp}/dump", "a collect pass only collects statistics"),
    ("collect with -ct", "-sm collect -ct --qtype int4", "run it with -sm use"),
    ("--compile with -sm no", "--compile", "compiling runs -sm use"),
    ("--compile in a collect pass", "--compile -sm collect", "compiling runs -sm use"),
    ("--compile with -s", "--compile -sm use -s --qtype int4", "compiling runs -sm use"),
    ("-hr with --act_point input", "-hr --act_point input --qtype int4", "half range"),
    ("-thw on float weights", "-thw laplace -qw f32 --qtype int4", "needs quantized weights"),
    ("-thw without anything quantized", "-thw laplace", "needs quantized weights"),
    ("-bata without -baa", "-bata 4", "give -baa too"),
    ("-batw without -baw", "-batw 4", "give -baw too"),
    ("-baa without -pcq_a", "-sm use --qtype int4 -baa -th laplace", "needs per-channel activations"),
    ("-baw with float weights", "-baw -qw f32 --qtype int4", "not with float weights"),
    ("-baw without a prior", "-baw --qtype int4", "give -bap laplace or gaus"),
    ("-baw with a searched method and no prior", "-baw --qtype int4 -th kld", "give -bap laplace or gaus"),
    ("-baa in collect without a prior", "-baa -pcq_a -sm collect", "give -bap laplace or gaus"),
    ("--device_ids on cpu", "--device cpu --device_ids '0 1'", "choose GPUs, but --device is cpu"),
]
for case_id, argv, fragment in COMBINATIONS:
    row(case_id, argv, fragment)

# --export_onnx / --eval_onnx (issue 21): settings QDQ cannot express, and where the file cannot go
EXPORT = "--export_onnx {tmp}/m.onnx"
row("--eval_onnx without --export_onnx", "-qw int8 --eval_onnx", "give --export_onnx PATH too")
row("--export_onnx with -s", f"-sm use -sf {{stats}} --qtype int4 -s {EXPORT}", "stochastic rounding has no QDQ form")
row("--export_onnx in collect mode", f"-sm collect {EXPORT}", "a collect pass quantizes nothing")
row("--export_onnx with int6 activations", f"-sm use -sf {{stats}} --qtype int6 {EXPORT}", "no ONNX type of 64 levels")
row("--export_onnx with live grids", f"--qtype int8 {EXPORT}", "a QDQ model has fixed ones")
row("--export_onnx with -ep", f"-sm use -sf {{stats}} --qtype int8 -ep {EXPORT}", "export one setting at a time")
row("--export_onnx with --compare", f"-sm use -sf {{stats}} --compare laplace --qtype int4 {EXPORT}",
    "export one setting at a time")
row("--export_onnx with -baa", f"-sm use -sf {{stats}} --qtype int4 -pcq_a -baa -th laplace {EXPORT}",
    "its own level count")
row("--export_onnx with -vcw", f"-sm use -sf {{stats}} --qtype int4 -vcw {EXPORT}", "off their grid")
row("--export_onnx with nothing quantized", f"-qw f32 {EXPORT}", "nothing is quantized")
row("--onnx_relu_pairs without --export_onnx", "-qw int8 --onnx_relu_pairs", "give --export_onnx")
row("--onnx_relu_pairs with input placement", f"-sm use -sf {{stats}} --qtype int8 --act_point input "
    f"--onnx_relu_pairs {EXPORT}", "with --act_point output")
row("--export_onnx a folder", "-qw int8 --export_onnx {tmp}/out", "is a folder", setup=folder("out"))
row("--export_onnx under a file", "-qw int8 --export_onnx {tmp}/f/m.onnx", "is a file, not a folder",
    setup=text_file("f", "x"))
row("--compare int4,fp32 widths", "--compare laplace --qtype int4,fp32 -cs 4", "fp32")

# --demo runs alone
row("--demo with --qtype", "--demo --qtype int4", "--demo runs alone (it takes --results only): drop --qtype",
    base=BARE)
row("--demo with -a and -b", "--demo -a resnet18 -b 2", "drop -a/--arch, -b/--batch-size", base=BARE)
row("--demo --results a directory", "--demo --results {tmp}/out", "is not a regular file", base=BARE,
    setup=folder("out"))

# data paths


def data_layout(build: Callable[[Path], None]) -> Callable[[Path, dict], None]:
    def setup(tmp: Path, shared: dict) -> None:
        build(tmp / "d")

    return setup


def _empty_val(d: Path) -> None:
    (d / "val").mkdir(parents=True)


def _loose_images(d: Path) -> None:
    make_images(d / "val", 1, ["x"])
    for path in (d / "val" / "x").iterdir():
        path.rename(d / "val" / path.name)
    (d / "val" / "x").rmdir()


def _no_images(d: Path) -> None:
    for wnid in WNIDS:
        (d / "val" / wnid).mkdir(parents=True)
        (d / "val" / wnid / "notes.txt").write_text("not an image\n")


def _corrupt_image(d: Path) -> None:
    make_images(d / "val", 2, WNIDS[:2])
    (d / "val" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG").write_bytes(b"not a jpeg")


def _empty_image(d: Path) -> None:
    make_images(d / "val", 2, WNIDS[:2])
    (d / "val" / WNIDS[1] / f"{WNIDS[1]}_1.JPEG").write_bytes(b"")


def _val_is_file(d: Path) -> None:
    d.mkdir()
    (d / "val").write_text("")


row("--data missing", "--data {tmp}/missing", "data directory {tmp}/missing does not exist")
row("--data ~/missing", "--data ~/missing", "data directory {tmp}/home/missing does not exist")
row("no --data and no ImageNet at the default", "", "datasets/ILSVRC2012 does not exist", base=NO_DATA)
row("--data a file", "--data {tmp}/f", "is not a directory", setup=text_file("f", "x"))
row("--data without val", "--data {tmp}/d", "no val/ folder in", setup=folder("d"))
row("--data whose val is a file", "--data {tmp}/d", "no val/ folder in", setup=data_layout(_val_is_file))
row("--data is the val folder", "--data {data}/val", "no val/ folder in")
row("--data empty val", "--data {tmp}/d", "has no class folders", setup=data_layout(_empty_val))
row("--data loose images", "--data {tmp}/d", "holds images directly", setup=data_layout(_loose_images))
row("--data non-wnid folders", "--data {tmp}/d", "are not ImageNet wnids",
    setup=data_layout(lambda d: make_images(d / "val", 1, ["cats", "dogs"])))
row("--data wnid and non-wnid folders", "--data {tmp}/d", "1 folders in",
    setup=data_layout(lambda d: make_images(d / "val", 1, [WNIDS[0], "n0144"])))
row("--data folders without images", "--data {tmp}/d", "no images", setup=data_layout(_no_images))
row("--data a corrupt image", "--data {tmp}/d", "cannot read image", setup=data_layout(_corrupt_image))
row("--data an empty image file", "--data {tmp}/d", "cannot read image", setup=data_layout(_empty_image))
row("--cal-data missing", "-sm collect --cal-data {tmp}/missing", "--cal-data folder {tmp}/missing does not exist")
row("--cal-data a file", "-sm collect --cal-data {tmp}/f", "is not a directory", setup=text_file("f", "x"))
row("--cal-data empty", "-sm collect --cal-data {tmp}/c", "has no class folders", setup=folder("c"))
row("--cal-data non-wnid folders", "-sm collect --cal-data {tmp}/c", "are not ImageNet wnids",
    setup=lambda tmp, shared: make_images(tmp / "c", 1, ["cats"]))
row("--cal-data a folder with val inside", "-sm collect --cal-data {data}", "are not ImageNet wnids (val)")
row("-cs larger than --data", "-sm collect -cs 13", "-cs 13 asks for more calibration images than the 12")
row("-cs larger than --cal-data", "-sm collect -cs 3 --cal-data {tmp}/c", "asks for more calibration images than the 2",
    setup=lambda tmp, shared: make_images(tmp / "c", 1, WNIDS[:2]))
row("--subset with everything held out", "-cs 12 --subset 2", "no image of")
row("-cs holds out every image", "-cs 12 --qtype int4", "is left to evaluate on")
row("use mode: statistics and -cs hold out every image", f"{USE} -sf {{stats}} -cs 12", "is left to evaluate on")
row("-bca without calibration images", "-bca --qtype int4", "give -cs N or --cal-data DIR")

# statistics folders: missing, not one, damaged copies of the reference, another model's
STATS = [
    ("-sf missing", "-sf {tmp}/missing", "no statistics in {tmp}/missing (no meta.json)", None, None),
    ("-sf empty folder", "-sf {tmp}/s", "(no meta.json)", folder("s"), None),
    ("-sf a file (use)", "-sf {tmp}/s", "no statistics in", text_file("s", "x"), None),
    ("no -sf and nothing collected", "", "no statistics in", None, None),
    ("no meta.json", "-sf {sf}", "(no meta.json)", None, remove("meta.json")),
    ("meta.json not JSON", "-sf {sf}", "are unreadable: JSONDecodeError", None, write_file("meta.json", "{")),
    ("meta.json empty", "-sf {sf}", "are unreadable: JSONDecodeError", None, write_file("meta.json", "")),
    ("meta.json binary", "-sf {sf}", "are unreadable", None, write_file("meta.json", b"\xff\xfe\x00garbage")),
    ("meta.json a list", "-sf {sf}", "is not a statistics description", None, write_file("meta.json", "[]")),
    ("meta.json null", "-sf {sf}", "is not a statistics description", None, write_file("meta.json", "null")),
    ("meta.json a number", "-sf {sf}", "is not a statistics description", None, write_file("meta.json", "8")),
    ("format 99", "-sf {sf}", "has layout format 99", None, edit_meta(lambda m: m.update(format=99))),
    ("format '2'", "-sf {sf}", "has layout format '2'", None, edit_meta(lambda m: m.update(format="2"))),
    ("format missing", "-sf {sf}", "has layout format None", None, edit_meta(lambda m: m.pop("format"))),
    ("images -3", "-sf {sf}", "'images' must be a positive count, got -3", None,
     edit_meta(lambda m: m.update(images=-3))),
    ("images 0", "-sf {sf}", "'images' must be a positive count, got 0", None,
     edit_meta(lambda m: m.update(images=0))),
    ("images a string", "-sf {sf}", "'images' must be a positive count, got '8'", None,
     edit_meta(lambda m: m.update(images="8"))),
    ("images true", "-sf {sf}", "'images' must be a positive count, got True", None,
     edit_meta(lambda m: m.update(images=True))),
    ("images 8.0", "-sf {sf}", "'images' must be a positive count, got 8.0", None,
     edit_meta(lambda m: m.update(images=8.0))),
    ("images missing", "-sf {sf}", "'images' must be a positive count, got None", None,
     edit_meta(lambda m: m.pop("images"))),
    ("images 9 for 8 listed", "-sf {sf}", "names 8 images (8 distinct), but meta.json counts 9", None,
     edit_meta(lambda m: m.update(images=9))),
    ("files a list", "-sf {sf}", "'files' must map file names", None, edit_meta(lambda m: m.update(files=[]))),
    ("a file's record edited", "-sf {sf}", "conv0_activation.csv is not the file that was collected", None,
     edit_meta(lambda m: m["files"].update({"conv0_activation.csv": {"bytes": 1, "sha256": "0" * 64}}))),
    ("a file recorded that was never written", "-sf {sf}", "ghost.csv is missing from the statistics folder", None,
     edit_meta(lambda m: m["files"].update({"ghost.csv": {"bytes": 1, "sha256": "0" * 64}}))),
    ("layer summary truncated", "-sf {sf}", "conv0_activation_summary.csv is not the file that was collected",
     None, truncate("conv0_activation_summary.csv")),
    ("layer samples truncated", "-sf {sf}", "conv3_activation.csv is not the file that was collected", None,
     truncate("conv3_activation.csv")),
    ("histogram truncated", "-sf {sf}", "conv2_activation_histogram.csv is not the file that was collected", None,
     truncate("conv2_activation_histogram.csv")),
    ("layer summary edited", "-sf {sf}", "conv0_activation_summary.csv is not the file that was collected", None,
     edit_csv("conv0_activation_summary.csv", "reduce", "REDUCE", rehashed=False)),
    ("layer summary emptied", "-sf {sf}", "conv5_activation_summary.csv is not the file that was collected", None,
     write_file("conv5_activation_summary.csv", "")),
    ("layer summary removed", "-sf {sf}", "conv0_activation_summary.csv is missing from the statistics folder",
     None, remove("conv0_activation_summary.csv")),
    ("histogram removed", "-sf {sf}", "conv4_activation_histogram.csv is missing", None,
     remove("conv4_activation_histogram.csv")),
    ("a file added", "-sf {sf}", "extra.csv is not one of the files meta.json records", None,
     add_file("extra.csv")),
    ("another layer's file added", "-sf {sf}", "conv99_activation.csv is not one of the files", None,
     add_file("conv99_activation.csv")),
    ("summary copied from another collection", "-sf {sf}",
     "conv0_activation_summary.csv is not the file that was collected", None,
     copy_from_other("conv0_activation_summary.csv")),
    ("samples copied from another collection", "-sf {sf}", "conv7_activation.csv is not the file that was collected",
     None, copy_from_other("conv7_activation.csv")),
    ("meta.json copied from another collection", "-sf {sf}", "is not one of the files meta.json records", None,
     replace_meta_with_other),
    ("calibration.json damaged", "-sf {sf}", "calibration.json is not the file that was collected", None,
     write_file("calibration.json", "[")),
    ("calibration.json removed", "-sf {sf}", "calibration.json is missing from the statistics folder", None,
     remove("calibration.json")),
    ("calibration.json not JSON (rehashed)", "-sf {sf}", "calibration.json is unreadable", None,
     write_file("calibration.json", "[", rehashed=True)),
    ("calibration.json an object (rehashed)", "-sf {sf}", "must be a JSON list of image names", None,
     write_file("calibration.json", '{"a": 1}', rehashed=True)),
    ("calibration.json numbers (rehashed)", "-sf {sf}", "must be a JSON list of image names", None,
     calibration_list(lambda names: list(range(len(names))))),
    ("calibration.json one name short (rehashed)", "-sf {sf}", "names 7 images (7 distinct), but meta.json counts 8",
     None, calibration_list(lambda names: names[:-1])),
    ("calibration.json a name twice (rehashed)", "-sf {sf}", "names 8 images (7 distinct)", None,
     calibration_list(lambda names: [*names[:-1], names[0]])),
    ("legacy folder with a truncated summary", "-sf {sf}", "conv0_activation_summary.csv", None, legacy_truncated),
    ("summary with NaN (rehashed)", "-sf {sf}", "holds non-finite values", None,
     edit_lines("conv0_activation_summary.csv", lambda lines: [lines[0], *(
         ",".join([line.split(",")[0], "nan", *line.split(",")[2:]]) for line in lines[1:])])),
    ("summary without its mean row (rehashed)", "-sf {sf}", "conv0_activation_summary.csv is malformed", None,
     edit_lines("conv0_activation_summary.csv", lambda lines: [line for line in lines
                                                               if not line.startswith("mean,")])),
    ("histogram columns renamed (rehashed)", "-sf {sf}", "expected columns left,right,count", None,
     edit_lines("conv0_activation_histogram.csv", lambda lines: ["a,b,c", *lines[1:]])),
    ("histogram with a negative count (rehashed)", "-sf {sf}", "a count is negative", None,
     edit_lines("conv0_activation_histogram.csv", negative_count)),
    ("histogram with a gap (rehashed)", "-sf {sf}", "each bin must start where the previous one ends", None,
     edit_lines("conv0_activation_histogram.csv", lambda lines: [lines[0], *lines[1:3], *lines[4:]])),
    ("meta.json without layers", "-sf {sf}", "are unreadable: KeyError: 'layers'", None,
     edit_meta(lambda m: m.pop("layers"))),
    ("meta.json a layer at another module", "-sf {sf}", "at module 'features.99.block'", None,
     edit_meta(moved_layer)),
    ("meta.json without a collected layer", "-sf {sf}", "conv1_activation", None, drop_layer_entry),
    ("meta.json an unknown observer", "-sf {sf}", "unknown observer 'foo'", None,
     edit_meta(lambda m: m["observers"].append({"name": "foo", "granularity": "tensor"}))),
    ("meta.json a bad granularity", "-sf {sf}", "unknown granularity 'channel:0'", None,
     edit_meta(lambda m: m["observers"][0].update(granularity="channel:0"))),
    ("statistics of another architecture (meta)", "-sf {sf}", "collected with arch='resnet18'", None,
     edit_meta(lambda m: m.update(arch="resnet18"))),
    ("statistics of other weights (meta)", "-sf {sf}", "collected with fingerprint='0123'", None,
     edit_meta(lambda m: m.update(fingerprint="0123"))),
    ("statistics of an unfolded model (meta)", "-sf {sf}", "collected with bn_folded=False", None,
     edit_meta(lambda m: m.update(bn_folded=False))),
]
for case_id, argv, fragment, setup, damage in STATS:
    row(case_id, f"{USE} {argv}", fragment, setup=setup, damage=damage)
row("histogram of text (rehashed)", f"{USE} -sf {{sf}}", "conv0_activation_histogram.csv",
    damage=write_file("conv0_activation_histogram.csv", "left,right,count\na,b,c\n", rehashed=True))
row("calibration.json and its record removed", f"{USE} -sf {{sf}}", "calibration.json",
    damage=remove("calibration.json", rehashed=True))
row("-sf ~/missing", f"{USE} -sf ~/missing", "no statistics in {tmp}/home/missing (no meta.json)")
row("statistics of another architecture", f"{USE} -sf {{stats}} -a squeezenet1_1",
    "collected with arch='mobilenet_v3_small', but this run has arch='squeezenet1_1'")
row("statistics of other weights (another seed)", f"{USE} -sf {{stats}} --seed 1", "collected with fingerprint=")
row("folded statistics with --no_fold_bn", f"{USE} -sf {{stats}} --no_fold_bn", "collected with bn_folded=True")
row("statistics of the plain model with --equalize", f"{USE} -sf {{stats}} --equalize",
    "collected with equalized=False")
row("--equalize with --no_fold_bn", "--equalize --no_fold_bn --qtype int4", "drop --no_fold_bn")
row("--weight_rounding adaround with float weights", "--qtype int4 -qw f32 --weight_rounding adaround -cs 4",
    "not with float weights")
row("--weight_rounding adaround without calibration images", "-qw int4 --weight_rounding adaround",
    "AdaRound learns each layer's rounding on calibration images held out of evaluation")
row("--adaround_iters 0", "-qw int4 --weight_rounding adaround -cs 4 --adaround_iters 0", "--adaround_iters")
row("--adaround_batch 0", "-qw int4 --weight_rounding adaround -cs 4 --adaround_batch 0", "--adaround_batch")
row("--weight_rounding adaround in a collect pass", "-sm collect -cs 4 --weight_rounding adaround",
    "not in a collect pass")
row("output statistics with --act_point input", f"{USE} -sf {{stats}} --act_point input",
    "collect them with --act_point input")
row("per-tensor statistics with -pcq_a", f"{USE} -sf {{stats}} -pcq_a", "-pcq_a needs per-channel statistics")
row("moments-only statistics with -th kld", "-sm use --qtype int4 -th kld -sf {other}", "histogram")
row("moments-only statistics with -th p99.9", "-sm use --qtype int4 -th p99.9 -sf {other}", "histogram")
row("moments-only statistics with --compare mse", "-sm use --qtype int4 --compare no,mse -sf {other}", "histogram")
row("moments-only statistics with -ct -th kld", "-sm use --qtype int4 -ct -th kld -sf {other}", "histogram")
row("-bca with statistics that list no calibration record", f"{USE} -bca -sf {{sf}}", "do not list theirs",
    damage=without_calibration_record)
row("-bca with statistics of a moved folder", f"{USE} -bca -sf {{sf}}", "{tmp}/gone does not exist",
    damage=edit_meta(lambda m: m["calibration"].update(folder="{tmp}/gone")))

# output paths
for case_id, argv, fragment, setup in (
    ("--results a directory", "--results {tmp}/out", "is not a regular file", folder("out")),
    ("--results empty string", "--results ''", "is not a regular file", None),
    ("--results /dev/null", "--results /dev/null", "is not a regular file", None),
    ("--results a binary file", "--results {tmp}/r.csv", "is not a results CSV (not text)",
     text_file("r.csv", b"\x89PNG\r\n\x1a\n\xff\xfe")),
    ("--results a foreign CSV", "--results {tmp}/r.csv", "is not a results CSV of this tool",
     text_file("r.csv", "name,score\na,1\n")),
    ("--results a CSV of other columns", "--results {tmp}/r.csv", "its header starts 'weights,arch,pass'",
     text_file("r.csv", "weights,arch,pass\n")),
    ("--results under a file", "--results {tmp}/f/r.csv", "{tmp}/f is a file, not a folder", text_file("f", "x")),
    ("--results two levels under a file", "--results {tmp}/f/a/b/r.csv", "{tmp}/f is a file, not a folder",
     text_file("f", "x")),
    ("plans folder is a file", f"{USE} -sf {{stats}} --results {{tmp}}/o/r.csv", "plans is a file, not a folder",
     text_file("o/plans", "x")),
    ("precision folder is a file", "-ep --results {tmp}/o/r.csv", "precision is a file, not a folder",
     text_file("o/precision", "x")),
    ("compare folder is a file", "--compare no,laplace --qtype int4 --results {tmp}/o/r.csv",
     "compare is a file, not a folder", text_file("o/compare", "x")),
    ("custom_test folder is a file", f"{USE} -sf {{stats}} -ct --results {{tmp}}/o/r.csv",
     "custom_test is a file, not a folder", text_file("o/custom_test", "x")),
    ("-sf under a file", "-sm collect -sf {tmp}/f/stats", "-sf: cannot write into {tmp}/f: {tmp}/f is a file",
     text_file("f", "x")),
    ("-sf a folder of other files", "-sm collect -sf {tmp}/mine", "is not a statistics folder; refusing to replace it",
     text_file("mine/notes.txt", "keep me\n")),
    ("-dd under a file", "-dd {tmp}/f/dump", "-dd: cannot write into {tmp}/f/dump", text_file("f", "x")),
    ("-dd a file", "-dd {tmp}/f", "-dd: cannot write into {tmp}/f", text_file("f", "x")),
):
    row(case_id, argv, fragment, setup=setup)

row("-sf a file (collect)", "-sm collect -sf {tmp}/f", "-sf", setup=text_file("f", "x"))

# -- running a row ---------------------------------------------------------------------------------------------


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """HOME and the working directory in the row's own folder (no default path reaches real files), no torchrun
    variables, no CUDA GPU, and at most a few data-loading workers."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from torch.utils.data import DataLoader

    start = DataLoader._get_iterator

    def guarded(loader):
        if loader.num_workers > 8:
            raise Stopped(f"guard: the data loader was about to start {loader.num_workers} workers")
        return start(loader)

    monkeypatch.setattr(DataLoader, "_get_iterator", guarded)
    return tmp_path


def call_with_deadline(argv: list[str], seconds: int) -> int:
    """``call``, stopped (``Stopped``) after ``seconds``."""

    def alarm(signum, frame):
        raise Stopped(f"guard: still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return call(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def expand(text: str, paths: dict[str, Path]) -> str:
    return text.format(**{k: str(v) for k, v in paths.items()})


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2(case: Case, shared, shared_digests, sandbox, capsys):
    tmp = sandbox
    paths = {**shared, "tmp": tmp, "sf": tmp / "stats"}
    if case.setup is not None:
        case.setup(tmp, shared)
    if case.damage is not None:
        link_copy(shared["stats"], tmp / "stats")
        case.damage(tmp / "stats", {**shared, "tmp": tmp})
        for name in ("meta.json",):  # a {tmp} in an edited meta.json (the calibration folder) is filled in
            path = tmp / "stats" / name
            if path.is_file() and b"{tmp}" in path.read_bytes():
                put(path, path.read_text().replace("{tmp}", str(tmp)))
    base = {FULL: ["--data", str(shared["data"])], NO_DATA: [], BARE: None}[case.base]
    if base is not None:
        base += ["-a", "mobilenet_v3_small", "--weights", "none", "-b", "4", "-j", "0",
                 "--results", str(tmp / "results.csv")]
    argv = [*(base or []), *(expand(word, paths) for word in shlex.split(case.argv))]
    before = files_under(tmp)
    capsys.readouterr()

    code = call_with_deadline(argv, case.seconds)

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX), lines[0]
    assert expand(case.fragment, paths) in lines[0], lines[0]
    assert code == case.code, (code, lines[0])
    for name, recorded in shared_digests.items():
        assert digests(shared[name]) == recorded, f"the shared {name} folder changed"
    assert files_under(tmp) == before, f"a refused run wrote {sorted(files_under(tmp) - before)}"
    assert not (tmp / "results.csv").exists()


def test_the_corpus_is_large():
    ids = [param.id for param in CASES]
    assert len(ids) >= 250 and len(set(ids)) == len(ids)


# -- as a user sees them -----------------------------------------------------------------------------------------

SUBPROCESS_CASES = [  # (flags, fragment, whether the error is all of stderr: later refusals follow log lines)
    (["--qtype", "int17"], "argument --qtype: invalid type 'int17'", True),
    (["--compare", "laplace"], "--compare: a comparison of clipping methods compares quantized activations", True),
    (["--data", "{tmp}/missing", "-a", "mobilenet_v3_small", "--weights", "none"],
     "data directory {tmp}/missing does not exist", False),
]


def test_as_a_user_sees_them(tmp_path):
    """Real processes, all at once: exit code 2, the error as stderr's one line (or its last line after log lines,
    none of them an error or a traceback), nothing on stdout, no file written."""
    env = dict(os.environ)
    for name in TORCHRUN_VARIABLES:
        env.pop(name, None)
    runs = []
    for argv, fragment, alone in SUBPROCESS_CASES:
        words = [word.replace("{tmp}", str(tmp_path)) for word in argv]
        runs.append((subprocess.Popen([sys.executable, str(ROOT / "inference_sim.py"), *words], cwd=tmp_path,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                     fragment.replace("{tmp}", str(tmp_path)), alone))
    for proc, fragment, alone in runs:
        out, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (proc.args, err)
        assert "Traceback" not in err and lines and lines[-1].startswith(PREFIX) and fragment in lines[-1], err
        assert not any("error" in line.lower() for line in lines[:-1]), err
        assert len(lines) == 1 or not alone, err
        assert out == ""
    assert not any(tmp_path.rglob("*"))
