"""Theoretical ACIQ MSE against the MSE measured by clipping and quantizing with the GEMMLOWP quantizer.

    python mse_analysis.py --out DIR [--samples N] [--bits 2 3 ... 8] [--dumps DIR] [--max-elements N]

For (a) samples drawn from Laplace(0, 1) and N(0, 1) and (b) the fp32 activations in a ``-dd`` dump folder
(``<layer>.npz`` files holding ``fp32`` and ``quantized``), and for each bit width, alpha is swept around the
analytical optimum; every point is quantized with ``gemmlowp_quantize`` and its MSE is measured.  Written to
DIR: ``mse_summary.csv`` (one row per source/prior/bit width: theory vs measured MSE at the analytical alpha,
the alpha minimising the measured MSE, the noise split in clipping and in-range parts), ``mse_sweep.csv``
(every sweep point) and ``mse_synthetic.png`` (plus ``mse_dumps.png`` with ``--dumps``).

Synthetic samples are clipped symmetrically: ``delta = 2 alpha, offset = -alpha, preserve_zero=False``.  Dumped
activations use the inference rule: stats averaged over the batch's samples, ``aciq_range`` for the grid.

What it shows (10^6 samples, seed 0; seeds 1-3 agree to within a few tenths of a percent):

* 4-8 bits: the analytical alpha's measured MSE is within 0.3 % of the sweep's minimum (Laplace and Gaussian;
  at most 0.6 % over seeds 0-5, the rest of the spread being sampling noise in the few hundred tail samples).
* 2 bits: the measured optimum lies 18.7 % (Laplace) / 12.8 % (Gaussian) below the analytical alpha, the
  analytical alpha's MSE is 9.8 % / 6.3 % above the measured minimum, and the theory underestimates the MSE:
  measured = 1.52x / 1.45x theory (theory 34 % / 31 % low).  3 bits: optimum -7 % / -4.4 %, excess 1.7 % /
  1.1 %, measured = 1.23x / 1.20x theory.

Why: the analysis models rounding noise as uniform within 2^M bins of width 2 alpha / 2^M, i.e. alpha^2 / (3 4^M).
GEMMLOWP puts 2^M *levels* on [-alpha, alpha], both end points included, so there are only 2^M - 1 steps of width
2 alpha / (2^M - 1): the rounding noise is (2^M / (2^M - 1))^2 times the model's, 1.78x at 2 bits, 1.31x at
3 bits, 1.01x at 8 bits (column ``quant_steps_model``).  Clipping noise is measured as the theory predicts.
The rest is the density not being flat within a cell (columns ``inner_cells_vs_uniform``,
``end_cells_vs_uniform``): at 2 bits the half cells next to the end levels +-alpha carry 20-24 % more noise than
a flat density would, because the density falls towards the end level and its mass sits at the cell's inner
edge, farthest from the level it rounds to; for the Laplace prior the interior cells add 11 %, because with
four levels (+-alpha/3, +-alpha) the density's peak at zero sits on the decision boundary, where the rounding
error is largest.  The heavier rounding noise favours a smaller alpha: minimising clipping noise plus the
wider steps' noise (column ``alpha_steps_model``) moves the optimum -14.7 % / -11.3 %, most of the measured
-18.7 % / -12.8 %.  From 4 bits on all of this is small enough that the analytical alpha is as good as the best.

The exact-grid model (``clipping.optimal_alpha_grid``: 2^M levels, 2^M - 1 steps, each cell's rounding error
integrated under the density) accounts for all of this: its alpha is the measured optimum to the sweep's
resolution at 2-4 bits (alpha/b 2.307 vs best 2.309 at 2 bits Laplace, alpha/sigma 1.494 vs 1.494 Gaussian; 10^6
samples, seed 0, sweep 0.6-1.4 with 241 points), its MSE is the measured minimum (excess 0.00 % against the paper
alpha's 9.8 % / 6.3 %), and its model is within 1 % of the measured MSE there.  From 5 bits on the two alphas
differ by under 1 % and so do their MSEs (columns ``alpha_grid``, ``excess_at_grid``, ``mse_grid_model``).

On real activations (``--dumps``) the gap is dominated by how poorly a Laplace or Gaussian fits the layer
(skew, heavy tails, a spike at zero), not by the grid.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import optimize

from pytorch_quantizer.clipping import (
    PRIORS,
    SIGMA_ESTIMATORS,
    TensorStats,
    aciq_range,
    check_bits,
    clipping_noise,
    mse,
    mse_grid,
    optimal_alpha,
    optimal_alpha_grid,
    quantization_noise,
)
from pytorch_quantizer.dumps import load_fp32
from pytorch_quantizer.fake_quant import gemmlowp_qparams, gemmlowp_quantize
from pytorch_quantizer.stats import STAT_COLUMNS, per_sample_stats

BITS = tuple(range(2, 9))
SYNTHETIC_SWEEP = (0.6, 1.4, 121)  # alpha / analytical alpha: from, to, points (geometric)
DUMP_SWEEP = (0.2, 3.0, 61)
PRIOR_LABELS = {"laplace": "Laplace", "gaus": "Gaussian"}
Grid = Callable[[float], tuple[float, float]]  # alpha -> (delta, offset)


@dataclass(frozen=True)
class Case:
    """One tensor to analyse against one prior: the data, the fitted scale and how alpha becomes a grid."""

    source: str  # "synthetic" or "dump"
    name: str  # the distribution or the layer
    prior: str
    scale: float  # b or sigma
    x: torch.Tensor  # float32, flat
    grid: Grid
    preserve_zero: bool


def measured_mse(x: torch.Tensor, delta: float, offset: float, bits: int, preserve_zero: bool) -> float:
    """Mean squared error of quantizing ``x`` with ``gemmlowp_quantize`` on the grid [offset, offset + delta]."""
    err = gemmlowp_quantize(x, delta, offset, bits, preserve_zero=preserve_zero).sub_(x).double()
    return float(err.square_().sum()) / x.numel()


@dataclass(frozen=True)
class ErrorSplit:
    """Where the measured squared error comes from (each part summed over its elements, divided by all).

    ``inner`` / ``end``: elements in the grid's interior cells / in the half cells next to its two end levels;
    the ``*_uniform`` values are what a flat density within each cell would give (step^2 / 12 per element).
    """

    clip: float
    inner: float
    inner_uniform: float
    end: float
    end_uniform: float

    @property
    def in_range(self) -> float:
        return self.inner + self.end


def error_split(x: torch.Tensor, delta: float, offset: float, bits: int, preserve_zero: bool) -> ErrorSplit:
    """Split the measured MSE into clipping (outside the end levels), interior cells and end half cells."""
    qp = gemmlowp_qparams(delta, offset, bits, preserve_zero)
    if qp is None:
        return ErrorSplit(0.0, 0.0, 0.0, 0.0, 0.0)
    y = gemmlowp_quantize(x, delta, offset, bits, preserve_zero=preserve_zero)
    err = y.sub_(x).double().square_()
    lo, hi, half = qp.offset, qp.offset + qp.qmax * qp.scale, qp.scale / 2.0
    outside = (x < lo) | (x > hi)
    end = ~outside & ((x < lo + half) | (x > hi - half))
    inner = ~outside & ~end
    n, cell = x.numel(), qp.scale**2 / 12.0

    def part(mask: torch.Tensor) -> float:
        return float(err[mask].sum()) / n

    return ErrorSplit(
        part(outside), part(inner), cell * float(inner.sum()) / n, part(end), cell * float(end.sum()) / n
    )


def steps_model_noise(alpha: float, bits: int) -> float:
    """Rounding noise of GEMMLOWP's 2^M - 1 steps over 2 alpha: the uniform model for the wider bins.

    Equal to ``quantization_noise`` of a range stretched by 2^M / (2^M - 1), so it reuses that formula.
    """
    levels = 2.0**bits
    return quantization_noise(alpha * levels / (levels - 1.0), bits)


def steps_model_alpha(prior: str, scale: float, bits: int) -> float:
    """The alpha minimising clipping noise + ``steps_model_noise``: the optimum the GEMMLOWP grid implies."""
    upper = 2.0 * scale * optimal_alpha(prior, bits)
    result = optimize.minimize_scalar(
        lambda a: clipping_noise(prior, a, scale) + steps_model_noise(a, bits),
        bounds=(0.0, upper),
        method="bounded",
        options={"xatol": 1e-9 * scale},
    )
    return float(result.x)


def sweep_alphas(center: float, sweep: tuple[float, float, int], *extra: float) -> np.ndarray:
    """Geometric sweep around ``center`` that contains ``center`` itself and the ``extra`` alphas (so their
    measured MSE is on the curve)."""
    lo, hi, points = sweep
    alphas = center * np.geomspace(lo, hi, int(points))
    return np.unique(np.append(alphas, (center, *extra)))


def analyse(case: Case, bits: int, sweep: tuple[float, float, int]) -> tuple[dict, pd.DataFrame]:
    """Sweep alpha for one case and bit width: a summary row and the sweep's points."""
    bits = check_bits(bits)
    alpha0 = optimal_alpha(case.prior, bits) * case.scale
    alpha_grid = optimal_alpha_grid(case.prior, bits) * case.scale
    alphas = sweep_alphas(alpha0, sweep, alpha_grid)
    measured = np.array([measured_mse(case.x, *case.grid(a), bits, case.preserve_zero) for a in alphas])
    theory = np.array([mse(case.prior, a, case.scale, bits) for a in alphas])
    best = int(np.argmin(measured))
    at0 = int(np.flatnonzero(alphas == alpha0)[0])
    at_grid = int(np.flatnonzero(alphas == alpha_grid)[0])
    split = error_split(case.x, *case.grid(alpha0), bits, case.preserve_zero)
    row = {
        "source": case.source,
        "name": case.name,
        "prior": case.prior,
        "bits": bits,
        "scale": case.scale,
        "alpha_analytical": alpha0,
        "alpha_best": float(alphas[best]),
        "alpha_best_rel": float(alphas[best] / alpha0 - 1.0),
        "alpha_steps_model": steps_model_alpha(case.prior, case.scale, bits),
        "alpha_grid": alpha_grid,
        "alpha_grid_vs_best": float(alpha_grid / alphas[best] - 1.0),
        "best_at_sweep_edge": best in (0, len(alphas) - 1),
        "mse_theory": float(theory[at0]),
        "mse_measured": float(measured[at0]),
        "mse_measured_min": float(measured[best]),
        "excess_at_analytical": float(measured[at0] / measured[best] - 1.0),
        "mse_grid_model": mse_grid(case.prior, alpha_grid, case.scale, bits),
        "mse_measured_grid": float(measured[at_grid]),
        "excess_at_grid": float(measured[at_grid] / measured[best] - 1.0),
        "theory_gap": float(theory[at0] / measured[at0] - 1.0),
        "clip_theory": clipping_noise(case.prior, alpha0, case.scale),
        "clip_measured": split.clip,
        "quant_theory": quantization_noise(alpha0, bits),
        "quant_steps_model": steps_model_noise(alpha0, bits),
        "quant_measured": split.in_range,
        "inner_cells_vs_uniform": _ratio(split.inner, split.inner_uniform),
        "end_cells_vs_uniform": _ratio(split.end, split.end_uniform),
        "elements": case.x.numel(),
    }
    points = pd.DataFrame(
        {
            "source": case.source,
            "name": case.name,
            "prior": case.prior,
            "bits": bits,
            "alpha": alphas,
            "alpha_rel": alphas / alpha0,
            "mse_theory": theory,
            "mse_measured": measured,
        }
    )
    return row, points


def _ratio(measured: float, expected: float) -> float:
    return measured / expected if expected > 0 else float("nan")


def synthetic_cases(samples: int, seed: int) -> list[Case]:
    """Unit-scale Laplace and Gaussian samples, clipped symmetrically at +-alpha."""
    rng = np.random.default_rng(seed)
    draws = {"laplace": rng.laplace(0.0, 1.0, samples), "gaus": rng.normal(0.0, 1.0, samples)}
    return [
        Case("synthetic", prior, prior, 1.0, torch.from_numpy(x.astype(np.float32)), _symmetric_grid, False)
        for prior, x in draws.items()
    ]


def _symmetric_grid(alpha: float) -> tuple[float, float]:
    return 2.0 * alpha, -alpha


def dump_stats(fp32: np.ndarray) -> TensorStats:
    """The statistics the inference path would use: per-sample values (``per_sample_stats``, the collector's
    own function) averaged over the batch, i.e. the summary's ``mean`` row."""
    x = torch.from_numpy(np.ascontiguousarray(fp32, dtype=np.float32))
    batch = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
    mean = dict(zip(STAT_COLUMNS, per_sample_stats(batch).mean(dim=0).tolist(), strict=True))
    return TensorStats(mean["min"], mean["max"], mean["mean"], mean["b"], mean["std"], numel=batch.shape[1])


def dump_cases(
    name: str, fp32: np.ndarray, sigma_estimator: str, max_elements: int, seed: int, preserve_zero: bool
) -> list[Case]:
    """One case per prior for a dumped layer, on a fixed random subset of at most ``max_elements`` values."""
    stats = dump_stats(fp32)
    x = torch.from_numpy(np.ascontiguousarray(fp32, dtype=np.float32).ravel())
    if x.numel() > max_elements:
        generator = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(x.numel(), generator=generator)[:max_elements]]
    if not torch.isfinite(x).all():
        raise ValueError(f"dump {name} holds non-finite values")

    def grid(alpha: float) -> tuple[float, float]:
        return aciq_range(stats.min, stats.max, stats.mean, alpha)

    scales = {"laplace": stats.b, "gaus": stats.sigma(sigma_estimator)}
    return [Case("dump", name, prior, scales[prior], x, grid, preserve_zero) for prior in PRIORS if scales[prior] > 0]


def run(
    cases: Sequence[Case], bits: Sequence[int], sweep: tuple[float, float, int]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, points = [], []
    for case in cases:
        for m in bits:
            row, pts = analyse(case, m, sweep)
            rows.append(row)
            points.append(pts)
    return pd.DataFrame(rows), pd.concat(points, ignore_index=True)


def plot_synthetic(summary: pd.DataFrame, sweep: pd.DataFrame, path: Path) -> None:
    """Per prior: measured and theoretical MSE against alpha, and the relative gaps against bits."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    priors = list(dict.fromkeys(summary["prior"]))
    fig = Figure(figsize=(13.0, 4.6 * len(priors)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(priors), 2, squeeze=False)
    cmap = _cmap()
    bits_all = sorted(summary["bits"].unique())
    for (ax_curve, ax_gap), prior in zip(axes, priors, strict=True):
        rows = summary[summary["prior"] == prior].sort_values("bits")
        for _, r in rows.iterrows():
            colour = cmap(bits_all.index(r["bits"]) / max(len(bits_all) - 1, 1) * 0.9)
            pts = sweep[(sweep["prior"] == prior) & (sweep["bits"] == r["bits"])]
            ax_curve.semilogy(pts["alpha"], pts["mse_measured"], "-", color=colour, label=f"{r['bits']} bits")
            ax_curve.semilogy(pts["alpha"], pts["mse_theory"], "--", color=colour, alpha=0.7)
            ax_curve.plot(r["alpha_analytical"], r["mse_measured"], "o", color=colour, markersize=5)
            ax_curve.plot(r["alpha_best"], r["mse_measured_min"], "x", color="black", markersize=6)
        ax_curve.set_title(
            f"{PRIOR_LABELS[prior]}: measured (solid) vs theory (dashed); o analytical α, x measured min"
        )
        ax_curve.set_xlabel("α (unit scale)")
        ax_curve.set_ylabel("MSE")
        ax_curve.grid(True, which="both", alpha=0.3)
        ax_curve.legend(fontsize=8, ncol=2)
        pct = 100.0
        ax_gap.plot(rows["bits"], pct * rows["alpha_best_rel"], "o-", label="measured optimum vs analytical α")
        ax_gap.plot(
            rows["bits"],
            pct * (rows["alpha_steps_model"] / rows["alpha_analytical"] - 1.0),
            "s--",
            label="2^M−1-step model optimum vs analytical α",
        )
        ax_gap.plot(rows["bits"], pct * rows["excess_at_analytical"], "^-", label="MSE at analytical α above minimum")
        ax_gap.plot(rows["bits"], pct * rows["theory_gap"], "v-", label="theory / measured MSE − 1")
        ax_gap.axhline(0.0, color="grey", lw=0.8)
        ax_gap.set_title(f"{PRIOR_LABELS[prior]}: relative gaps (%)")
        ax_gap.set_xlabel("bits")
        ax_gap.set_ylabel("%")
        ax_gap.grid(True, alpha=0.3)
        ax_gap.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})


def plot_dumps(summary: pd.DataFrame, path: Path) -> None:
    """Per prior and layer: how far the analytical alpha is from the measured optimum, one line per bit width."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    priors = list(dict.fromkeys(summary["prior"]))
    layers = list(dict.fromkeys(summary["name"]))
    fig = Figure(figsize=(max(13.0, 0.3 * len(layers) + 4.0), 4.6 * len(priors)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(priors), 2, squeeze=False)
    cmap = _cmap()
    bits_all = sorted(summary["bits"].unique())
    positions = np.arange(len(layers))
    for (ax_excess, ax_alpha), prior in zip(axes, priors, strict=True):
        for m in bits_all:
            rows = summary[(summary["prior"] == prior) & (summary["bits"] == m)].set_index("name").reindex(layers)
            colour = cmap(bits_all.index(m) / max(len(bits_all) - 1, 1) * 0.9)
            ax_excess.plot(positions, 100.0 * rows["excess_at_analytical"], "o-", color=colour, ms=3, label=f"{m} bits")
            ax_alpha.plot(positions, rows["alpha_best"] / rows["alpha_analytical"], "o-", color=colour, ms=3)
        ax_excess.set_title(f"{PRIOR_LABELS[prior]}: MSE at analytical α above the measured minimum (%)")
        ax_excess.set_yscale("symlog", linthresh=1.0)
        ax_alpha.set_title(f"{PRIOR_LABELS[prior]}: best measured α / analytical α")
        ax_alpha.set_yscale("log")
        for ax in (ax_excess, ax_alpha):
            ax.set_xticks(positions, layers, rotation=90, fontsize=7)
            ax.grid(True, alpha=0.3)
        ax_excess.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})


def _cmap():
    from matplotlib import colormaps

    return colormaps["viridis"]


def format_summary(summary: pd.DataFrame) -> str:
    """The summary as a compact text table (percentages for the relative columns)."""
    view = pd.DataFrame(
        {
            "source": summary["source"],
            "name": summary["name"],
            "prior": summary["prior"],
            "bits": summary["bits"],
            "alpha*": summary["alpha_analytical"].map("{:.3f}".format),
            "best alpha": summary["alpha_best"].map("{:.3f}".format),
            "best vs alpha*": (100 * summary["alpha_best_rel"]).map("{:+.1f}%".format),
            "steps-model alpha": summary["alpha_steps_model"].map("{:.3f}".format),
            "MSE theory": summary["mse_theory"].map("{:.4g}".format),
            "MSE measured": summary["mse_measured"].map("{:.4g}".format),
            "excess over min": (100 * summary["excess_at_analytical"]).map("{:.2f}%".format),
            "measured/theory": (summary["mse_measured"] / summary["mse_theory"]).map("{:.3f}".format),
        }
    )
    return view.to_string(index=False)


def format_alpha_table(summary: pd.DataFrame) -> str:
    """Synthetic rows as the table of docs/methods.md: alpha / scale of the paper's model, of the exact-grid model
    and of the measured optimum, and the measured MSE at each (with the exact-grid model's own prediction)."""
    rows = summary[summary["source"] == "synthetic"]
    scale = rows["scale"]
    view = pd.DataFrame(
        {
            "prior": rows["prior"],
            "bits": rows["bits"],
            "paper alpha/s": (rows["alpha_analytical"] / scale).map("{:.3f}".format),
            "grid alpha/s": (rows["alpha_grid"] / scale).map("{:.3f}".format),
            "best alpha/s": (rows["alpha_best"] / scale).map("{:.3f}".format),
            "paper vs best": (100 * (rows["alpha_analytical"] / rows["alpha_best"] - 1.0)).map("{:+.1f}%".format),
            "grid vs best": (100 * rows["alpha_grid_vs_best"]).map("{:+.1f}%".format),
            "MSE paper": rows["mse_measured"].map("{:.5g}".format),
            "MSE grid": rows["mse_measured_grid"].map("{:.5g}".format),
            "MSE min": rows["mse_measured_min"].map("{:.5g}".format),
            "paper excess": (100 * rows["excess_at_analytical"]).map("{:.2f}%".format),
            "grid excess": (100 * rows["excess_at_grid"]).map("{:.2f}%".format),
            "grid model/measured": (rows["mse_grid_model"] / rows["mse_measured_grid"]).map("{:.3f}".format),
        }
    )
    return view.to_string(index=False)


def explanation() -> str:
    """The paragraph of the module docstring that explains the low-bit gap (printed by the CLI)."""
    doc = __doc__ or ""
    return doc[doc.index("Why:") : doc.index("On real activations")].strip()


def _sweep_arg(values: list[str]) -> tuple[float, float, int]:
    lo, hi, points = float(values[0]), float(values[1]), int(values[2])
    if not (0 < lo < 1 < hi and points >= 3):
        raise argparse.ArgumentTypeError(f"sweep must be LO < 1 < HI with LO > 0 and at least 3 points, got {values}")
    return lo, hi, points


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder for the CSVs and figures")
    parser.add_argument("--samples", type=int, default=10**6, help="synthetic samples per distribution (0: skip)")
    parser.add_argument("--bits", type=int, nargs="+", default=list(BITS), help="bit widths (default 2..8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", nargs=3, metavar=("LO", "HI", "N"), default=list(map(str, SYNTHETIC_SWEEP)),
                        help="synthetic sweep: alpha from LO to HI times the analytical alpha, N points")
    parser.add_argument("--dumps", type=Path, help="a -dd dump folder of <layer>.npz files (fp32, quantized)")
    parser.add_argument("--dump-sweep", nargs=3, metavar=("LO", "HI", "N"), default=list(map(str, DUMP_SWEEP)),
                        help="sweep for dumped layers (their optimum can be far from the analytical alpha)")
    parser.add_argument("--max-elements", type=int, default=100_000,
                        help="random subset of each dumped activation to quantize (statistics use all of it)")
    parser.add_argument("--sigma-estimator", choices=SIGMA_ESTIMATORS, default="range",
                        help="Gaussian sigma for dumped layers (as the inference path)")
    parser.add_argument("--preserve-zero", action="store_true", help="dumped layers: snap the grid so 0 is a level")
    args = parser.parse_args(argv)
    try:
        args.sweep = _sweep_arg(args.sweep)
        args.dump_sweep = _sweep_arg(args.dump_sweep)
        args.bits = [check_bits(m) for m in args.bits]
    except (ValueError, argparse.ArgumentTypeError) as err:
        parser.error(str(err))
    if args.samples < 0 or (args.samples == 0 and args.dumps is None):
        parser.error("--samples must be positive (or 0 together with --dumps)")
    if args.max_elements < 1:
        parser.error("--max-elements must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summaries, sweeps = [], []
    if args.samples:
        summary, sweep = run(synthetic_cases(args.samples, args.seed), args.bits, args.sweep)
        plot_synthetic(summary, sweep, args.out / "mse_synthetic.png")
        summaries.append(summary)
        sweeps.append(sweep)
    if args.dumps is not None:
        try:
            dumps = load_fp32(args.dumps)
            cases = []
            for name, fp32 in dumps.items():
                cases += dump_cases(name, fp32, args.sigma_estimator, args.max_elements, args.seed, args.preserve_zero)
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        summary, sweep = run(cases, args.bits, args.dump_sweep)
        plot_dumps(summary, args.out / "mse_dumps.png")
        summaries.append(summary)
        sweeps.append(sweep)
    summary = pd.concat(summaries, ignore_index=True)
    pd.concat(sweeps, ignore_index=True).to_csv(args.out / "mse_sweep.csv", index=False, float_format="%.9g")
    summary.to_csv(args.out / "mse_summary.csv", index=False, float_format="%.9g")
    with pd.option_context("display.width", 200, "display.max_rows", 10_000):
        print(format_summary(summary))
        if args.samples:
            print("\nPaper-model alpha vs exact-grid alpha (clipping.optimal_alpha_grid) vs the measured optimum:")
            print(format_alpha_table(summary))
    print()
    print(explanation())
    print(f"\nwrote {args.out / 'mse_summary.csv'}, {args.out / 'mse_sweep.csv'} and the figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
