"""Regenerate ``figures/opt_alpha_gaussian.png`` and ``figures/opt_alpha_laplace.png`` and print the fitted slopes.

The drawing code lives in :mod:`pytorch_quantizer.figures` (the notebook calls it too).  Output is
byte-identical from run to run, so a changed PNG in a diff means the math or the plotting changed.

    python scripts/make_figures.py [--out figures]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

from pytorch_quantizer.figures import FIGURE_NAMES, format_fits, write_figures  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "figures", help="output folder (default: figures/)")
    args = parser.parse_args(argv)
    fits = write_figures(args.out)
    print(format_fits(fits))
    for name in FIGURE_NAMES.values():
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
