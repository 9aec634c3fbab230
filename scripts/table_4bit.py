#!/usr/bin/env python3
"""The 4-bit table of docs/results.md: what each method buys, for mobilenet_v2 and efficientnet_lite0.

Every row is one ``inference_sim.py -ep`` command (printed before it runs, so it can be rerun alone): FP32, then
every (weights, activations) pair of W8/W4 x A8/A6/A4 on the images held out of calibration.  Each row's table is
saved as ``OUT/<net>/<row>.csv``; ``--resume`` skips rows whose file exists, so the table can be built in several
sittings.  The whole table is written to ``OUT/table_4bit.csv`` (top-1; and top-5 in ``table_4bit_top5.csv``)
from the row files present, and as markdown beside it (``.md``).

    python scripts/table_4bit.py [--data ../shared/data] [--nets mv2,lite] [--rows minmax,laplace,...] [--resume]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import inference_sim  # noqa: E402
from pytorch_quantizer.experiment import run  # noqa: E402

SWEEP = ["-ep", "-ep_w", "int8,int4", "-ep_a", "int8,int6,int4"]
BASE = ["-th", "laplace", "-hr", "-pcw"]  # the rows below add one method each to -hr with per-channel weights
# (row name, description, flags, statistics: "out" collected at the outputs, "in" at the inputs, "out_pc" with
# per-channel moments too)
ROWS = [
    ("minmax", "min/max (no clipping, extreme range)", ["-th", "minmax"], "out"),
    ("laplace", "ACIQ Laplace as the seed does it (outputs, two-sided)", ["-th", "laplace"], "out"),
    ("hr", "+ ReLU-aware one-sided grids (-hr)", ["-th", "laplace", "-hr"], "out"),
    ("input", "ACIQ Laplace at the conv inputs (--act_point input)", ["-th", "laplace", "--act_point", "input"], "in"),
    ("pcw", "-hr + per-channel weights (-pcw)", ["-th", "laplace", "-hr", "-pcw"], "out"),
    ("thw", "-hr -pcw + Laplace clipping of the weights (-thw laplace)", [*BASE, "-thw", "laplace"], "out"),
    ("pcqa", "-hr -pcw + per-channel activations (-pcq_a)", [*BASE, "-pcq_a"], "out_pc"),
    ("ba", "-hr -pcw + bit allocation of weights and activations (-pcq_a -baa -baw)",
     [*BASE, "-pcq_a", "-baa", "-baw"], "out_pc"),
    ("baw", "-hr -pcw + bit allocation of the weights only (-baw)", [*BASE, "-baw"], "out"),
    ("bcw", "-hr -pcw + bias correction of weights (-bcw)", [*BASE, "-bcw"], "out"),
    ("bca", "-hr -pcw -bcw + bias correction of activations (-bca)", [*BASE, "-bcw", "-bca"], "out"),
    ("all", "-hr -pcw -pcq_a -baa -baw -bcw -bca", [*BASE, "-pcq_a", "-baa", "-baw", "-bcw", "-bca"], "out_pc"),
]
COLLECT = {"out": [], "in": ["--act_point", "input"], "out_pc": ["-pcq_a"]}


def net_flags(net: str, data: Path) -> list[str]:
    if net == "mv2":
        return ["-a", "mobilenet_v2", "--weights", str(data / "weights" / "mobilenet_v2_tflite_quant.pth")]
    if net == "lite":
        return ["-a", "efficientnet_lite0"]
    raise SystemExit(f"unknown net {net!r}: expected mv2 or lite")


def call(argv: list[str]) -> list[dict]:
    print("+ python inference_sim.py " + shlex.join(argv), flush=True)
    cfg = inference_sim.config_from_args(inference_sim.build_parser().parse_args(argv))
    return run(cfg)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--nets", default="mv2,lite")
    p.add_argument("--rows", default=",".join(name for name, *_ in ROWS))
    p.add_argument("--out", type=Path, default=ROOT / "results" / "table_4bit")
    p.add_argument("--cal", type=int, default=250, help="calibration images drawn from the sample (-cs)")
    p.add_argument("--subset", type=int, default=None, help="evaluate on this many of the held-out images")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="skip rows whose table exists")
    args = p.parse_args()
    known = {name: (text, flags, stats) for name, text, flags, stats in ROWS}
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in known]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: expected some of {', '.join(known)}")
    common = ["--data", str(args.data / "imagenet-sample"), "-b", str(args.batch), "-j", "2",
              "--results", str(args.out / "results.csv")]
    if args.subset:
        common += ["--subset", str(args.subset)]
    for net in args.nets.split(","):
        base = [*net_flags(net, args.data), *common]
        for name in rows:
            text, flags, stats = known[name]
            target = args.out / net / f"{name}.csv"
            if args.resume and target.exists():
                continue
            folder = args.out / "statistics" / f"{net}_{stats}"
            if not (folder / "meta.json").exists():
                call([*base, "-cs", str(args.cal), "-sm", "collect", "-sf", str(folder), *COLLECT[stats]])
            rows_out = call([*base, "-sm", "use", "-sf", str(folder), *flags, *SWEEP])
            table = pd.read_csv(rows_out[-1]["file"]).assign(row=name, description=text, net=net,
                                                              command=shlex.join(flags))
            target.parent.mkdir(parents=True, exist_ok=True)
            table.to_csv(target, index=False)
    assemble(args.out, args.nets.split(","))
    return 0


def assemble(out: Path, nets: list[str]) -> None:
    """One table from the row files present: rows in ROWS order, columns FP32 then each W/A pair."""
    frames = [pd.read_csv(out / net / f"{name}.csv") for net in nets for name, *_ in ROWS
              if (out / net / f"{name}.csv").exists()]
    if not frames:
        return
    long = pd.concat(frames)
    order = [name for name, *_ in ROWS]
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
