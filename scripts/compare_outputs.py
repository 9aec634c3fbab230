"""Compare two output trees of scripts/behaviour_commands.sh file by file: every statistics file, plan, table and
results row byte for byte, except the columns that time a pass (``seconds``, ``cal_seconds``, ``eval_seconds``) and
the provenance that names the code or the folder (``version``, ``stats_folder``, ``file``, ``results``, ``settings``
and the settings-hash suffix of file names, given with ``--ignore-settings``).

    python scripts/compare_outputs.py OLD NEW [--ignore-settings] [--renamed old=new,...] [--added col,...]

Prints one line per difference and exits 1 if there is any."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd

TIMING = {"seconds", "cal_seconds", "eval_seconds", "shared_seconds"}
PROVENANCE = {"version", "stats_folder", "file", "settings", "results"}
HASH = re.compile(r"_[0-9a-f]{8}(?=(_channels)?\.(csv|html|png)$)")
PAGES = {".html"}  # bokeh pages carry fresh random element ids on every run: compared by name only


def key(path: Path, root: Path, ignore_settings: bool) -> str:
    rel = str(path.relative_to(root))
    return HASH.sub("_SETTINGS", rel) if ignore_settings else rel


def kept(path: Path) -> bool:
    """Files to compare: not the results append's lock file (``.<name>.lock``, empty)."""
    return path.is_file() and not (path.name.startswith(".") and path.name.endswith(".lock"))


def frame(path: Path, drop: set[str]) -> pd.DataFrame:
    data = pd.read_csv(path, dtype=str, keep_default_na=False)
    return data.drop(columns=[c for c in data.columns if c in drop])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--ignore-settings", action="store_true")
    parser.add_argument("--renamed", default="", help="old=new,... results columns renamed on purpose")
    parser.add_argument("--added", default="", help="col,... results columns only the new code writes (left out)")
    args = parser.parse_args(argv)
    renamed = dict(pair.split("=") for pair in args.renamed.split(",") if pair)
    added = {name for name in args.added.split(",") if name}
    old = {key(p, args.old, args.ignore_settings): p for p in args.old.rglob("*") if kept(p)}
    new = {key(p, args.new, args.ignore_settings): p for p in args.new.rglob("*") if kept(p)}
    problems = [f"only in {args.old}: {k}" for k in sorted(old.keys() - new.keys())]
    problems += [f"only in {args.new}: {k}" for k in sorted(new.keys() - old.keys())]
    same = pages = 0
    reordered: list[str] = []
    for name in sorted(old.keys() & new.keys()):
        a, b = old[name], new[name]
        if a.read_bytes() == b.read_bytes():
            same += 1
            continue
        if a.suffix in PAGES:
            pages += 1
            continue
        if a.name == "meta.json":
            ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
            for m in (ma, mb):
                m.pop("version", None)
                m.pop("created", None)
            if ma == mb:
                same += 1
                continue
        if a.suffix == ".csv":
            drop = TIMING | (PROVENANCE if args.ignore_settings else set())
            fa, fb = frame(a, drop).rename(columns=renamed), frame(b, drop | added)
            if fa.equals(fb):
                same += 1
                continue
            cols = sorted(set(fa.columns) ^ set(fb.columns))
            if cols:
                problems.append(f"{name}: columns differ: {cols}")
                continue
            diff = [c for c in fa.columns if not fa[c].equals(fb[c])]
            if diff:
                problems.append(f"{name}: values differ in {diff}")
            else:
                reordered.append(name)
                same += 1
            continue
        problems.append(f"{name}: bytes differ")
    for line in problems:
        print(line)
    for name in reordered:
        print(f"{name}: the same columns and values, columns in another order")
    print(f"{same} files identical, {pages} bokeh pages present in both (not compared: random element ids), "
          f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
