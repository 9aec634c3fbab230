#!/usr/bin/env python3
"""The 4-bit table of docs/results.md: what each method buys, for mobilenet_v2 and efficientnet_lite0.

Every row is one precision sweep, built as a ``RunConfig`` and run with ``run.run`` (its equivalent
``inference_sim.py -ep`` command line is printed before it runs, so it can be rerun alone): FP32, then every
(weights, activations) pair of W8/W4 x A8/A6/A4 on the images held out of calibration.  Each row's table is saved as
``OUT/<net>/<row>.csv``; ``--resume`` skips rows whose file exists, so the table can be built in several sittings.
The whole table is written to ``OUT/table_4bit.csv`` (top-1; and top-5 in ``table_4bit_top5.csv``) from the row
files present, and as markdown beside it (``.md``).

    python scripts/table_4bit.py [--data ../shared/data] [--nets mv2,lite] [--rows minmax,laplace,...] [--resume]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import inference_sim  # noqa: E402
from pytorch_quantizer.config import DataConfig, RunConfig, flatten  # noqa: E402
from pytorch_quantizer.quant_config import (  # noqa: E402
    AUTO,
    SAME,
    ActivationConfig,
    AllocationConfig,
    CorrectionConfig,
    WeightConfig,
)
from pytorch_quantizer.run import run  # noqa: E402

SWEEP = {"eval_precision": True, "sweep_weight_bits": (8, 4), "sweep_bits": (8, 6, 4)}  # -ep -ep_w .. -ep_a ..


@dataclass(frozen=True)
class Row:
    """One row: what it adds to ``-sm use`` (keyword arguments of the config groups) and the statistics it reads:
    "out" collected at the outputs, "in" at the inputs, "out_pc" with per-channel moments too."""

    name: str
    description: str
    act: dict[str, Any] = field(default_factory=dict)
    weight: dict[str, Any] = field(default_factory=dict)
    alloc: dict[str, Any] = field(default_factory=dict)
    correct: dict[str, Any] = field(default_factory=dict)
    stats: str = "out"


HR = {"method": "laplace", "half_range": True}
PCW = {"per_channel": True}  # the rows after "pcw" add one method each to -hr with per-channel weights
ROWS = [
    Row("minmax", "min/max (no clipping, extreme range)", act={"method": "minmax"}),
    Row("laplace", "ACIQ Laplace as the seed does it (outputs, two-sided)", act={"method": "laplace"}),
    Row("hr", "+ ReLU-aware one-sided grids (-hr)", act=HR),
    Row("input", "ACIQ Laplace at the conv inputs (--act_point input)",
        act={"method": "laplace", "placement": "input"}, stats="in"),
    Row("pcw", "-hr + per-channel weights (-pcw)", act=HR, weight=PCW),
    Row("thw", "-hr -pcw + Laplace clipping of the weights (-thw laplace)", act=HR,
        weight={**PCW, "method": "laplace"}),
    Row("pcqa", "-hr -pcw + per-channel activations (-pcq_a)", act={**HR, "per_channel": True}, weight=PCW,
        stats="out_pc"),
    Row("ba", "-hr -pcw + bit allocation of weights and activations (-pcq_a -baa -baw)",
        act={**HR, "per_channel": True}, weight=PCW, alloc={"activations": True, "weights": True}, stats="out_pc"),
    Row("baw", "-hr -pcw + bit allocation of the weights only (-baw)", act=HR, weight=PCW, alloc={"weights": True}),
    Row("bcw", "-hr -pcw + bias correction of weights (-bcw)", act=HR, weight=PCW, correct={"weight_mean": True}),
    Row("bca", "-hr -pcw -bcw + bias correction of activations (-bca)", act=HR, weight=PCW,
        correct={"weight_mean": True, "act_bias": True}),
    Row("all", "-hr -pcw -pcq_a -baa -baw -bcw -bca", act={**HR, "per_channel": True}, weight=PCW,
        alloc={"activations": True, "weights": True}, correct={"weight_mean": True, "act_bias": True},
        stats="out_pc"),
]
COLLECT = {"out": {}, "in": {"placement": "input"}, "out_pc": {"per_channel": True}}  # the collect pass's act


def net_model(net: str, data: Path) -> dict[str, str]:
    if net == "mv2":
        return {"arch": "mobilenet_v2", "weights": str(data / "weights" / "mobilenet_v2_tflite_quant.pth")}
    if net == "lite":
        return {"arch": "efficientnet_lite0"}
    raise SystemExit(f"unknown net {net!r}: expected mv2 or lite")


def collect_config(model: dict[str, str], data: DataConfig, folder: Path, stats: str, results: Path) -> RunConfig:
    """The collect pass a row's statistics come from (``-cs`` images drawn from ``--data``)."""
    return RunConfig(**model, data=data, act=ActivationConfig(**COLLECT[stats]), stats_mode="collect",
                     stats_folder=folder, results=results)


def row_config(row: Row, model: dict[str, str], data: DataConfig, folder: Path, results: Path) -> RunConfig:
    """A row's precision sweep in use mode (weights at 8 bits by default, as the driver resolves them)."""
    return RunConfig(**model, data=data, act=ActivationConfig(**row.act),
                     weight=WeightConfig(**{"bits": AUTO, **row.weight}), alloc=AllocationConfig(**row.alloc),
                     correct=CorrectionConfig(**row.correct), stats_mode="use", stats_folder=folder, results=results,
                     **SWEEP)


def _qtype(bits: int | None) -> str:
    return "fp32" if bits is None else f"int{bits}"


def command_flags(cfg: RunConfig, base: RunConfig | None = None) -> list[str]:
    """The driver's flags that turn ``base`` (default: the driver's defaults for ``cfg``'s architecture) into
    ``cfg``, one per differing field, in the config's field order.  A differing field that no flag sets is an
    error, so the printed command is always the run's (tests/test_config.py parses it back)."""
    parser = inference_sim.build_parser()
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    ours, theirs = flatten(cfg), flatten(base if base is not None else RunConfig())
    if base is None:  # the default weights are the architecture's
        theirs["weights"] = RunConfig(arch=cfg.arch).weights
    # -qw (the weights' and biases' width) only where the driver would not resolve the same width without it
    auto = replace(cfg, weight=replace(cfg.weight, bits=AUTO, bias_bits=SAME)).weight.bits
    argv: list[str] = []
    for path, value in ours.items():
        action = actions.get(path)
        flag = action.option_strings[0] if action is not None else ""
        if path == "weight.bits":
            argv += [flag, _qtype(value)] if value != auto else []
        elif path == "weight.bias_bits":
            if value != cfg.weight.bits:
                raise ValueError(f"biases at {value} bits, weights at {cfg.weight.bits}: no flag gives that")
        elif path == "compare_bits" or value == theirs[path]:
            continue
        elif action is None:
            raise ValueError(f"{path} = {value!r}: no flag of inference_sim.py sets it")
        elif isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif action.nargs == 0:  # store_true / store_false: the flag alone
            argv.append(flag)
        elif path == "act.bits":  # with --compare a comma list of widths
            argv += [flag, ",".join(map(_qtype, cfg.compare_bits or (value,)))]
        elif path == "weight.edge_bits":
            argv += [flag, "same" if value is None else _qtype(value)]
        elif path in ("sweep_bits", "sweep_weight_bits"):
            argv += [flag, ",".join(map(_qtype, value))]
        elif path in ("compare", "observers"):
            argv += [flag, ",".join(value)]
        elif path == "device_ids":
            argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, str(value)]
    return argv


def call(cfg: RunConfig) -> list[dict]:
    print("+ python inference_sim.py " + shlex.join(command_flags(cfg)), flush=True)
    return run(cfg)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--nets", default="mv2,lite")
    p.add_argument("--rows", default=",".join(row.name for row in ROWS))
    p.add_argument("--out", type=Path, default=ROOT / "results" / "table_4bit")
    p.add_argument("--cal", type=int, default=250, help="calibration images drawn from the sample (-cs)")
    p.add_argument("--subset", type=int, default=None, help="evaluate on this many of the held-out images")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="skip rows whose table exists")
    args = p.parse_args()
    known = {row.name: row for row in ROWS}
    names = args.rows.split(",")
    unknown = [r for r in names if r not in known]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: expected some of {', '.join(known)}")
    results = args.out / "results.csv"
    data = DataConfig(root=args.data / "imagenet-sample", batch_size=args.batch, workers=2, subset=args.subset)
    for net in args.nets.split(","):
        model = net_model(net, args.data)
        for name in names:
            row = known[name]
            target = args.out / net / f"{name}.csv"
            if args.resume and target.exists():
                continue
            folder = args.out / "statistics" / f"{net}_{row.stats}"
            if not (folder / "meta.json").exists():
                call(collect_config(model, replace(data, cal_size=args.cal), folder, row.stats, results))
            cfg = row_config(row, model, data, folder, results)
            rows_out = call(cfg)
            flags = command_flags(cfg, row_config(Row("", ""), model, data, folder, results))
            table = pd.read_csv(rows_out[-1]["file"]).assign(row=name, description=row.description, net=net,
                                                              command=shlex.join(flags))
            target.parent.mkdir(parents=True, exist_ok=True)
            table.to_csv(target, index=False)
    assemble(args.out, args.nets.split(","))
    return 0


def assemble(out: Path, nets: list[str]) -> None:
    """One table from the row files present: rows in ROWS order, columns FP32 then each W/A pair."""
    frames = [pd.read_csv(out / net / f"{row.name}.csv") for net in nets for row in ROWS
              if (out / net / f"{row.name}.csv").exists()]
    if not frames:
        return
    long = pd.concat(frames)
    order = [row.name for row in ROWS]
    for metric, suffix in (("top1", ""), ("top5", "_top5")):
        wide = long.pivot_table(index=["net", "row", "description", "command"], columns="precision", values=metric,
                                aggfunc="first", sort=False)
        columns = ["fp32", *[c for c in ("W8A8", "W8A6", "W8A4", "W4A8", "W4A6", "W4A4") if c in wide.columns]]
        wide = wide[columns].reset_index()
        images = long.groupby(["net", "row"])["images"].max().rename("images").reset_index()
        wide = wide.merge(images, on=["net", "row"])
        wide = wide.assign(rank=wide["row"].map(order.index)).sort_values(["net", "rank"]).drop(columns="rank")
        wide.to_csv(out / f"table_4bit{suffix}.csv", index=False)
        (out / f"table_4bit{suffix}.md").write_text(markdown(wide))
    print((out / "table_4bit.md").read_text(), flush=True)


def markdown(wide: pd.DataFrame) -> str:
    """The table as docs/results.md shows it: one line per row, the command's flags in code."""
    precisions = [c for c in wide.columns if c == "fp32" or c.startswith("W")]
    lines = ["| net | row | flags (on top of `-sm use`) | " + " | ".join(p.upper() if p == "fp32" else p
                                                                  for p in precisions) + " | images |",
             "|---" * (len(precisions) + 4) + "|"]
    for _, r in wide.iterrows():
        cells = [f"{r[p]:.1f}" for p in precisions]
        lines.append(f"| {r['net']} | {r['description']} | `{r['command']}` | " + " | ".join(cells)
                     + f" | {r['images']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
