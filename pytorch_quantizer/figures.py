"""Figures and tables of the optimal clipping value, shared by ``scripts/make_figures.py`` and the notebook.

Both call these functions so the committed PNGs and the notebook's plots cannot drift apart.  Nothing here
re-derives the ACIQ math: every MSE value comes from :mod:`pytorch_quantizer.clipping`.  The PNGs are
written with the Agg backend, a fixed size and dpi and no ``Software`` metadata, so regenerating them
gives byte-identical files (matplotlib's PNG writer stores no dates).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import optimize

from .clipping import clipping_noise, mse, optimal_alpha, quantization_noise
from .methods import method_names

BITS = tuple(range(2, 9))
SCALES = tuple(float(s) for s in np.linspace(0.25, 4.0, 16))
FIGURE_NAMES = {"gaus": "opt_alpha_gaussian.png", "laplace": "opt_alpha_laplace.png"}
PRIOR_LABELS = {"gaus": "Gaussian", "laplace": "Laplace"}
SCALE_SYMBOLS = {"gaus": "σ", "laplace": "b"}
DPI = 120
FIGSIZE = (7.0, 5.0)
# The seed project's table of alpha* / scale (2..8 bits); the notebook and tests check agreement within 0.01.
SEED_CONSTANTS = {
    "laplace": (2.83, 3.89, 5.03, 6.20, 7.41, 8.64, 9.89),
    "gaus": (1.71, 2.15, 2.55, 2.93, 3.28, 3.61, 3.92),
}
_PNG_METADATA = {"Software": None}
COLOURS = {"no": "#7f7f7f", "laplace": "#d62728", "gaus": "#1f77b4", "mix": "#2ca02c", "minmax": "#8c564b"}
OTHER_COLOURS = ("#9467bd", "#e377c2", "#bcbd22", "#17becf", "#ff7f0e")


def method_colour(method: str) -> str:
    """A method's colour: the seed's fixed ones, then a palette in registration order for registered methods."""
    if method in COLOURS:
        return COLOURS[method]
    others = [m for m in method_names() if m not in COLOURS]
    return OTHER_COLOURS[others.index(method) % len(OTHER_COLOURS)] if method in others else "#000000"


def constants_table(bits: Iterable[int] = BITS) -> pd.DataFrame:
    """alpha*/scale per bit width (rows) for each prior, beside the seed's two-decimal values."""
    bits = list(bits)
    table = pd.DataFrame(
        {
            "laplace": [optimal_alpha("laplace", m) for m in bits],
            "gaus": [optimal_alpha("gaus", m) for m in bits],
        },
        index=pd.Index(bits, name="bits"),
    )
    for prior, values in SEED_CONSTANTS.items():
        seed = dict(zip(BITS, values, strict=True))
        table[f"{prior}_seed"] = [seed.get(m, np.nan) for m in bits]
    return table


def minimise_mse(prior: str, scale: float, bits: int) -> float:
    """alpha minimising ``mse(prior, alpha, scale, bits)`` found directly (bounded Brent search on the MSE).

    Deliberately not ``scale * optimal_alpha(...)``: the figures solve each scale afresh, so the straight
    lines they show are a check of the MSE's scaling, not an assumption.
    """
    upper = 4.0 * scale * optimal_alpha(prior, bits)
    result = optimize.minimize_scalar(
        lambda a: mse(prior, a, scale, bits), bounds=(0.0, upper), method="bounded", options={"xatol": 1e-10 * scale}
    )
    return float(result.x)


def alpha_vs_scale(
    prior: str, bits: Sequence[int] = BITS, scales: Sequence[float] = SCALES
) -> tuple[dict[int, np.ndarray], dict[int, tuple[float, float]]]:
    """Per bit width, the optimal alpha at each scale and the least-squares (slope, intercept) of the line."""
    xs = np.asarray(scales, dtype=float)
    alphas: dict[int, np.ndarray] = {}
    fits: dict[int, tuple[float, float]] = {}
    for m in bits:
        alphas[m] = np.array([minimise_mse(prior, s, m) for s in xs])
        slope, intercept = np.polyfit(xs, alphas[m], 1)
        fits[m] = (float(slope), float(intercept))
    return alphas, fits


def optimal_alpha_figure(
    prior: str, bits: Sequence[int] = BITS, scales: Sequence[float] = SCALES
) -> tuple[Figure, dict[int, tuple[float, float]]]:
    """alpha* against the scale (sigma or b), one line per bit width, the fitted slope in the legend."""
    alphas, fits = alpha_vs_scale(prior, bits, scales)
    symbol = SCALE_SYMBOLS[prior]
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = _colours(len(bits))
    for colour, m in zip(colours, bits, strict=True):
        slope, _ = fits[m]
        ax.plot(scales, alphas[m], "o-", color=colour, markersize=4, label=f"{m} bits: α* = {slope:.2f}·{symbol}")
    ax.set_xlabel(f"{symbol} ({'standard deviation' if prior == 'gaus' else 'Laplace scale'})", fontsize=12)
    ax.set_ylabel("optimal clipping value α*", fontsize=12)
    ax.set_title(f"{PRIOR_LABELS[prior]} prior: α* is linear in {symbol}", fontsize=13)
    ax.set_xlim(0.0, max(scales) * 1.02)
    ax.set_ylim(0.0, None)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=11)
    ax.legend(loc="upper left", fontsize=10, title="fitted slope", title_fontsize=10)
    fig.tight_layout()
    return fig, fits


def mse_curves_figure(prior: str, bits: Sequence[int] = (2, 4, 8)) -> Figure:
    """MSE against alpha for unit scale: clipping noise, quantization noise and their sum, optimum marked."""
    fig = Figure(figsize=(4.2 * len(bits), 4.0), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(bits), squeeze=False)[0]
    for ax, m in zip(axes, bits, strict=True):
        best = optimal_alpha(prior, m)
        alphas = np.linspace(0.02, 2.0 * best, 400)
        clipping = np.array([clipping_noise(prior, a, 1.0) for a in alphas])
        rounding = np.array([quantization_noise(a, m) for a in alphas])
        ax.semilogy(alphas, clipping, "--", color="tab:red", label="clipping noise")
        ax.semilogy(alphas, rounding, ":", color="tab:blue", label="quantization noise")
        ax.semilogy(alphas, clipping + rounding, "-", color="black", label="total MSE")
        ax.plot([best], [mse(prior, best, 1.0, m)], "o", color="tab:green", label=f"α* = {best:.2f}")
        ax.axvline(best, color="tab:green", alpha=0.4)
        ax.set_title(f"{PRIOR_LABELS[prior]}, {m} bits", fontsize=12)
        ax.set_xlabel(f"α (units of {SCALE_SYMBOLS[prior]})", fontsize=11)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=9, loc="upper center")
        lo = mse(prior, best, 1.0, m)
        ax.set_ylim(lo / 30.0, max(clipping[0], rounding[-1]) * 3.0)
    axes[0].set_ylabel("expected MSE (unit scale)", fontsize=11)
    fig.tight_layout()
    return fig


def png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes, exactly as :func:`write_figures` saves it (the notebook displays these); no
    Software/date entry, so the same figure always gives the same bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata=_PNG_METADATA)
    return buffer.getvalue()


SELECTION_DPI = 100
SELECTION_SIZE = (7.0, 4.5)


def weights_label(cfg) -> str:
    """``W4 per channel`` (``W32``: float weights) of a ``config.RunConfig``."""
    return f"W{cfg.weight.bits or 32}{' per channel' if cfg.weight.per_channel else ''}"


def layer_selection_figure(table: pd.DataFrame, cfg) -> Figure:
    """Top-1 against the number of regular layers at the activation width (the others kept at 8 bits), one line
    per method of a ``-ct --compare`` table (``compare.CT_COLUMNS``), the FP32 accuracy dashed (the seed's
    ``figures/<model>_fig1.png``); ``cfg``: the run's ``config.RunConfig``.  Each point has error bars of one
    binomial standard error (``top1_se``) and FP32 a band of its own, so that a step smaller than the image set's
    sampling error does not read as an effect."""
    fig = Figure(figsize=SELECTION_SIZE, dpi=SELECTION_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method, part in table[table["method"] != "fp32"].groupby("method", sort=False):
        part = part.sort_values("layers_at_bits")
        ax.errorbar(part["layers_at_bits"], part["top1"], yerr=part["top1_se"], fmt="o-", markersize=3, capsize=2,
                    elinewidth=0.8, color=method_colour(method), label=method)
    fp32 = table[table["method"] == "fp32"]
    if len(fp32):
        level, spread = float(fp32["top1"].iloc[0]), float(fp32["top1_se"].iloc[0])
        ax.axhline(level, color="black", linestyle="--", linewidth=1, label="FP32")
        ax.axhspan(level - spread, level + spread, color="black", alpha=0.08, linewidth=0)
    ax.set_xlabel(f"layers at {cfg.act.bits} bits (the others at 8, largest estimated MSE kept first)")
    ax.set_ylabel("top-1 (%) on the held-out images, ± 1 s.e.")
    grids = ", ReLU-aware grids" if cfg.act.half_range else ""
    ax.set_title(f"{cfg.arch}, {weights_label(cfg)}{grids}: layer selection per clipping method", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return fig


def write_figures(out_dir: str | Path = "figures") -> dict[str, dict[int, tuple[float, float]]]:
    """Write both alpha*-vs-scale PNGs into ``out_dir``; returns the fitted (slope, intercept) per prior and bits."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    all_fits = {}
    for prior, name in FIGURE_NAMES.items():
        fig, fits = optimal_alpha_figure(prior)
        (out / name).write_bytes(png_bytes(fig))
        all_fits[prior] = fits
    return all_fits


def format_fits(all_fits: dict[str, dict[int, tuple[float, float]]]) -> str:
    """A plain-text table of the fitted lines, beside the solver's alpha* for unit scale."""
    lines = []
    for prior, fits in all_fits.items():
        symbol = SCALE_SYMBOLS[prior]
        lines.append(f"{PRIOR_LABELS[prior]} prior: alpha* = slope * {symbol} + intercept")
        for m, (slope, intercept) in fits.items():
            solver = optimal_alpha(prior, m)
            lines.append(f"  {m} bits: slope {slope:.4f}  intercept {intercept:+.1e}  (optimal_alpha {solver:.4f})")
    return "\n".join(lines)


def _colours(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1) * 0.9) for i in range(n)]
