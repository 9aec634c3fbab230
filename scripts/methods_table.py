#!/usr/bin/env python3
"""The table of what each method buys (README "Headline results", docs/results.md), measured as ImageNet studies
measure: statistics from ``--cal N`` ImageNet *train* photos of the sample (``--seed``), top-1 on every
*validation* photo of imagenet-val-2k, for mobilenet_v2 and efficientnet_lite0.

Every row is one ``inference_sim.py`` command, printed before it runs (so it can be rerun alone): ``-sm use``, the
row's flags, and the precision sweep FP32, W8/W4 x A8/A6/A4.  A row reads the statistics of its kind (plain,
equalized, per channel), collected once per network by the printed ``-sm collect`` command.  Each row's passes are
saved as ``OUT/<net>/<row>.csv``; ``--resume`` skips rows whose file exists, so the table can be built in several
sittings (each row costs 10-20 minutes on 2 CPU cores).  The table is assembled from the row files present into
``OUT/table.csv`` and ``OUT/table.md`` (top-1 with its binomial standard error, and the row's calibration seconds
beyond statistics: AdaRound's learning, ``-bca``'s passes).

    python scripts/methods_table.py [--data ../shared/data] [--nets mv2,lite] [--rows minmax,aciq,...] [--resume]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import inference_sim  # noqa: E402
from pytorch_quantizer.run import run  # noqa: E402

SWEEP = ["-ep", "-ep_w", "int8,int4", "-ep_a", "int8,int6,int4"]
PASSES = ("fp32", "W8A8", "W8A6", "W8A4", "W4A8", "W4A6", "W4A4")
# what each kind of statistics is collected with: -pcq_a per channel (moments and positive parts, all that the
# per-channel methods read), --equalize of the equalized model
STATS = {"plain": [], "equalized": ["--equalize"], "channels": ["-pcq_a", "--observers", "moments,positive"]}


@dataclass(frozen=True)
class Row:
    """One row: the flags it adds to ``-sm use`` and the kind of statistics (``STATS``) it reads."""

    name: str
    flags: str
    stats: str = "plain"


ROWS = [
    Row("minmax", "-th no"),
    Row("aciq", "-th laplace"),
    Row("hr", "-th laplace -hr"),
    Row("pcw", "-th laplace -hr -pcw"),
    Row("float_bias", "-th laplace -hr -pcw --float_bias"),
    Row("equalize", "--equalize -th laplace -hr -pcw", "equalized"),
    Row("equalize_float_bias", "--equalize -th laplace -hr -pcw --float_bias", "equalized"),
    Row("adaround", "-th laplace -hr -pcw --float_bias --weight_rounding adaround"),
    Row("bca", "-th laplace -hr -pcw -bca"),
    Row("baa", "-th slab -hr -pcw -pcq_a -baa", "channels"),
    Row("all", "-th slab -hr -pcw -pcq_a -baa --float_bias --weight_rounding adaround -bca", "channels"),
]


def net_flags(net: str, data: Path) -> list[str]:
    if net == "mv2":
        return ["-a", "mobilenet_v2", "--weights", str(data / "weights" / "mobilenet_v2_tflite_quant.pth")]
    if net == "lite":
        return ["-a", "efficientnet_lite0"]
    raise SystemExit(f"unknown net {net!r}: expected mv2 or lite")


def base_flags(data: Path, cal: int, seed: int, batch: int, results: Path) -> list[str]:
    return ["--cal-data", str(data / "imagenet-sample" / "val"), "-cs", str(cal), "--seed", str(seed),
            "--data", str(data / "imagenet-val-2k"), "-b", str(batch), "-j", "2", "--results", str(results)]


def collect_argv(base: list[str], net: list[str], folder: Path, stats: str) -> list[str]:
    return [*net, *base, "-sm", "collect", "-sf", str(folder), *STATS[stats]]


def row_argv(base: list[str], net: list[str], folder: Path, row: Row) -> list[str]:
    return [*net, *base, "-sm", "use", "-sf", str(folder), *shlex.split(row.flags), *SWEEP]


def call(argv: list[str]) -> list[dict]:
    """Run one command in this process, as ``inference_sim.py`` would (a refused setting raises here)."""
    print("+ python inference_sim.py " + shlex.join(argv), flush=True)
    parser = inference_sim.build_parser()
    return run(inference_sim.config_from_args(parser.parse_args(argv), parser))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--nets", default="mv2,lite")
    p.add_argument("--rows", default=",".join(row.name for row in ROWS))
    p.add_argument("--out", type=Path, default=ROOT / "results" / "methods_table")
    p.add_argument("--cal", type=int, default=500, help="calibration photos drawn from the sample's train photos")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="skip rows whose file exists")
    args = p.parse_args()
    known = {row.name: row for row in ROWS}
    names = args.rows.split(",")
    unknown = [r for r in names if r not in known]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: expected some of {', '.join(known)}")
    nets = args.nets.split(",")
    base = base_flags(args.data, args.cal, args.seed, args.batch, args.out / "results.csv")
    for net in nets:
        flags = net_flags(net, args.data)
        for name in names:
            row = known[name]
            target = args.out / net / f"{name}.csv"
            if args.resume and target.exists():
                continue
            folder = args.out / "statistics" / f"{net}_{row.stats}"
            if not (folder / "meta.json").exists():
                call(collect_argv(base, flags, folder, row.stats))
            passes = pd.DataFrame(call(row_argv(base, flags, folder, row)))
            passes = passes[["pass", "top1", "top1_se", "images", "cal_seconds"]].assign(net=net, row=name,
                                                                                       flags=row.flags)
            target.parent.mkdir(parents=True, exist_ok=True)
            passes.to_csv(target, index=False)
    assemble(args.out, nets)
    return 0


def assemble(out: Path, nets: list[str]) -> None:
    """One table from the row files present, rows in ``ROWS`` order: top-1 (standard error) a pass, and the
    calibration seconds beyond statistics (the range over the passes that spent any)."""
    files = [out / net / f"{row.name}.csv" for net in nets for row in ROWS]
    frames = [pd.read_csv(f) for f in files if f.exists()]
    if not frames:
        return
    long = pd.concat(frames)
    long["cell"] = long["top1"].map("{:.2f}".format) + " (" + long["top1_se"].map("{:.2f}".format) + ")"
    wide = long.pivot_table(index=["net", "row", "flags"], columns="pass", values="cell", aggfunc="first",
                            sort=False)
    wide = wide[[p for p in PASSES if p in wide.columns]]
    spent = long.dropna(subset=["cal_seconds"]).groupby(["net", "row"])["cal_seconds"]
    seconds = (spent.min().round().astype(int).astype(str) + "-" + spent.max().round().astype(int).astype(str))
    wide = wide.reset_index().merge(seconds.rename("cal_s").reset_index(), on=["net", "row"], how="left")
    wide = wide.merge(long.groupby(["net", "row"])["images"].max().reset_index(), on=["net", "row"])
    wide.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(markdown(wide))
    print((out / "table.md").read_text(), flush=True)


def markdown(wide: pd.DataFrame) -> str:
    """The table as the README shows it: one line a row, its flags in code."""
    passes = [p for p in PASSES if p in wide.columns]
    lines = ["| net | flags (`-sm use`) | " + " | ".join(p.upper() for p in passes) + " | cal. s | images |",
             "|---" * (len(passes) + 4) + "|"]
    for _, r in wide.iterrows():
        seconds = r["cal_s"] if isinstance(r["cal_s"], str) else "–"
        lines.append(f"| {r['net']} | `{r['flags']}` | " + " | ".join(str(r[p]) for p in passes)
                     + f" | {seconds} | {r['images']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
