"""A self-contained HTML report of a statistics folder: per layer, the clipping each method picks and why.

    python -m pytorch_quantizer.report STATS_FOLDER -o report.html [--dumps DIR] [--bits 4] [--sigma-estimator range]

Per layer it shows the statistics (the summary's ``mean`` row, as the quantizer uses them), the alpha and the
predicted MSE of each registered clipping method whose observers the folder holds (``methods``) and the kurtosis
against the Gaussian (3) and Laplace (6) values, which hints at which prior fits.  With ``--dumps`` (a ``-dd``
folder of ``<layer>.npz`` files) it adds each layer's histogram of the dumped fp32 activation with the fitted
Laplace and Gaussian densities and the clipping grid each prior implies, so a poor fit is visible at a glance.
Bokeh's JavaScript is inlined (``bokeh.resources.INLINE``): the file opens offline.
"""

from __future__ import annotations

import argparse
import html
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from bokeh.embed import file_html
from bokeh.layouts import column, gridplot, row
from bokeh.models import BoxAnnotation, ColumnDataSource, DataTable, Div, HoverTool, Span, TableColumn, Whisker
from bokeh.plotting import figure
from bokeh.resources import INLINE
from scipy import stats as scipy_stats

from .clipping import SIGMA_ESTIMATORS, aciq_range, check_bits
from .dumps import dump_path, dumped_layers, read_fp32
from .figures import COLOURS, method_colour, weights_label
from .methods import get_method, method_names
from .stats import Statistics, StatisticsError, load_statistics


def report_methods(statistics: Statistics) -> list[str]:
    """The registered methods whose observers the folder holds (every one of them is in the report)."""
    return [m for m in method_names() if set(get_method(m).requires) <= set(statistics.observers)]
WIDTH = 1350
HIST_BINS = 120


def layer_table(statistics: Statistics, bits: int, sigma_estimator: str = "range") -> pd.DataFrame:
    """One row per layer: statistics, and for each method its alpha and predicted MSE (``mix``: which prior)."""
    bits = check_bits(bits)
    kinds = {layer["name"]: layer.get("kind", "") for layer in statistics.meta["layers"]}
    rows = []
    for name in statistics.layer_names:
        ts = statistics.tensor_stats(name)
        row = {
            "layer": name,
            "kind": kinds[name],
            "numel": ts.numel,
            "min": ts.min,
            "max": ts.max,
            "mean": ts.mean,
            "std": ts.std,
            "b": ts.b,
            "sigma": ts.sigma(sigma_estimator),
            "kurtosis": float(statistics.summary(name).loc["mean", "kurtosis"]),
            "half_range": ts.range / 2.0,
        }
        obs = statistics.observation(name)
        for method in report_methods(statistics):
            decision = get_method(method, sigma_estimator).clip(obs, bits)
            row[f"alpha_{method}"] = decision.alpha
            row[f"mse_{method}"] = decision.predicted_mse
            if method == "mix":
                row["mix_choice"] = decision.method
        rows.append(row)
    return pd.DataFrame(rows)


def _source(frame: pd.DataFrame) -> ColumnDataSource:
    """Columns as plain lists (handing bokeh the DataFrame trips a pandas deprecation inside bokeh)."""
    return ColumnDataSource(data={column: frame[column].tolist() for column in frame.columns})


def _table(frame: pd.DataFrame) -> DataTable:
    from bokeh.models import NumberFormatter, ScientificFormatter

    number = NumberFormatter(format="0.0000")
    sci = ScientificFormatter(precision=3, power_limit_low=-2)
    columns = [TableColumn(field="layer", title="layer", width=170), TableColumn(field="kind", title="kind", width=50)]
    columns += [TableColumn(field="numel", title="numel", width=80)]
    for field in ("min", "max", "mean", "std", "b", "sigma", "kurtosis", "half_range"):
        columns.append(TableColumn(field=field, title=field, formatter=number, width=70))
    for method in ("laplace", "gaus"):
        columns.append(TableColumn(field=f"alpha_{method}", title=f"α {method}", formatter=number, width=75))
    columns.append(TableColumn(field="mix_choice", title="mix picks", width=70))
    for method in (m for m in method_names() if f"mse_{m}" in frame.columns):
        columns.append(TableColumn(field=f"mse_{method}", title=f"MSE {method}", formatter=sci, width=85))
    height = min(600, 28 + 25 * len(frame))
    return DataTable(
        source=_source(frame), columns=columns, width=WIDTH, height=height, index_position=None, name="layers"
    )


def _per_layer_figure(frame: pd.DataFrame, title: str, y_label: str, log: bool, name: str):
    layers = list(frame["layer"])
    fig = figure(
        x_range=layers,
        width=WIDTH,
        height=380,
        title=title,
        y_axis_type="log" if log else "linear",
        y_axis_label=y_label,
        tools="pan,box_zoom,wheel_zoom,reset,save",
        name=name,
    )
    fig.xaxis.major_label_orientation = math.pi / 3
    fig.title.text_font_size = "14px"
    return fig


def mse_figure(frame: pd.DataFrame, bits: int):
    """Predicted MSE of each method per layer (log scale): how much each clipping rule is expected to save."""
    fig = _per_layer_figure(frame, f"Predicted MSE per layer at {bits} bits", "predicted MSE", True, "mse")
    source = _source(frame)
    methods = [m for m in method_names() if f"mse_{m}" in frame.columns]
    for method in methods:
        field = f"mse_{method}"
        if (frame[field] <= 0).all():
            continue
        fig.line("layer", field, source=source, color=method_colour(method), legend_label=method, line_width=2)
        fig.scatter("layer", field, source=source, color=method_colour(method), legend_label=method, size=6)
    fig.add_tools(HoverTool(tooltips=[("layer", "@layer")] + [(f"MSE {m}", f"@mse_{m}{{0.000e+0}}") for m in methods]))
    fig.legend.click_policy = "hide"
    fig.legend.location = "top_left"
    return fig


def alpha_figure(frame: pd.DataFrame, bits: int):
    """Each prior's alpha beside half the observed range (the no-clipping grid): how hard each one clips."""
    fig = _per_layer_figure(frame, f"Clipping value α per layer at {bits} bits", "α", True, "alpha")
    source = _source(frame)
    series = {
        "half_range": ("half range (no clipping)", COLOURS["no"]),
        "alpha_laplace": ("laplace", COLOURS["laplace"]),
        "alpha_gaus": ("gaus", COLOURS["gaus"]),
    }
    for field, (label, colour) in series.items():
        fig.line("layer", field, source=source, color=colour, legend_label=label, line_width=2)
        fig.scatter("layer", field, source=source, color=colour, legend_label=label, size=6)
    fig.add_tools(HoverTool(tooltips=[("layer", "@layer"), ("α laplace", "@alpha_laplace"), ("α gaus", "@alpha_gaus")]))
    fig.legend.click_policy = "hide"
    fig.legend.location = "top_left"
    return fig


def kurtosis_figure(frame: pd.DataFrame):
    """Kurtosis per layer against the Gaussian (3) and Laplace (6) values: a quick check of which prior fits."""
    fig = _per_layer_figure(frame, "Kurtosis per layer (Gaussian 3, Laplace 6)", "kurtosis", True, "kurtosis")
    fig.scatter("layer", "kurtosis", source=_source(frame), color="black", size=7)
    for value, colour in ((3.0, COLOURS["gaus"]), (6.0, COLOURS["laplace"])):
        fig.add_layout(Span(location=value, dimension="width", line_color=colour, line_dash="dashed", line_width=2))
    return fig


def histogram_figure(name: str, values: np.ndarray, row: pd.Series, bits: int):
    """Density histogram of one dumped activation, the fitted Laplace and Gaussian densities and their grids."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        hi = lo + 1.0
    density, edges = np.histogram(values, bins=HIST_BINS, range=(lo, hi), density=True)
    fig = figure(
        width=440,
        height=320,
        title=f"{name} ({values.size:,} values)",
        y_axis_type="log",
        x_axis_label="activation",
        y_axis_label="density",
        tools="pan,box_zoom,wheel_zoom,reset,save",
        name=f"hist_{name}",
    )
    keep = density > 0
    floor = density[keep].min() / 2.0 if keep.any() else 1e-6
    fig.quad(
        left=edges[:-1][keep],
        right=edges[1:][keep],
        top=density[keep],
        bottom=floor,
        fill_color="#bbbbbb",
        line_color="#999999",
        legend_label="fp32",
    )
    xs = np.linspace(lo, hi, 400)
    fits = {
        "laplace": scipy_stats.laplace.pdf(xs, loc=row["mean"], scale=max(row["b"], 1e-12)),
        "gaus": scipy_stats.norm.pdf(xs, loc=row["mean"], scale=max(row["sigma"], 1e-12)),
    }
    for prior, pdf in fits.items():
        visible = pdf > floor
        fig.line(xs[visible], pdf[visible], color=COLOURS[prior], line_width=2, legend_label=f"{prior} fit")
        alpha = row[f"alpha_{prior}"]
        delta, offset = aciq_range(row["min"], row["max"], row["mean"], alpha)
        for edge in (offset, offset + delta):
            fig.add_layout(Span(location=edge, dimension="height", line_color=COLOURS[prior], line_dash="dashed"))
    fig.title.text_font_size = "12px"
    fig.legend.label_text_font_size = "10px"
    fig.legend.location = "top_right"
    fig.legend.background_fill_alpha = 0.6
    return fig


def _header(statistics: Statistics, bits: int, sigma_estimator: str, dumps: Path | None, missing: Sequence[str]) -> Div:
    meta = statistics.meta
    facts = [
        ("statistics", str(statistics.folder)),
        ("model", f"{meta.get('arch', '?')} ({meta.get('weights', '?')})"),
        ("BatchNorm folded", str(meta.get("bn_folded", "?"))),
        ("images", str(meta.get("images", "?"))),
        ("fingerprint", str(meta.get("fingerprint", "?"))),
        ("package version", str(meta.get("version", "?"))),
        ("bits", str(bits)),
        ("sigma estimator", sigma_estimator),
        ("dumps", str(dumps) if dumps else "none (pass --dumps for histograms)"),
    ]
    items = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
                    f"<td>{html.escape(v)}</td></tr>" for k, v in facts)
    note = ""
    if missing:
        note = f"<p><b>No dump for:</b> {html.escape(', '.join(missing))}</p>"
    text = (
        f"<h1>ACIQ clipping report</h1><table>{items}</table>"
        "<p>Statistics are each layer's per-sample values averaged over samples (the quantizer's choice). "
        "α is the clipping value of each prior (optimal α per unit scale × b or σ); the predicted MSE is the "
        "paper's clipping + quantization noise model; <i>mix</i> takes the prior with the smaller predicted MSE. "
        "Dashed lines in the histograms mark each prior's quantization grid (aciq_range).</p>" + note
    )
    return Div(text=text, width=WIDTH)


def build_report(
    stats_folder: str | Path,
    out: str | Path,
    dumps: str | Path | None = None,
    bits: int = 4,
    sigma_estimator: str = "range",
) -> Path:
    """Write the HTML report; returns its path."""
    statistics = load_statistics(stats_folder)
    frame = layer_table(statistics, bits, sigma_estimator)
    parts = [
        None,  # header, once the missing dumps are known
        Div(text="<h2>Per-layer statistics and clipping decisions</h2>", width=WIDTH),
        _table(frame),
        mse_figure(frame, bits),
        alpha_figure(frame, bits),
        kurtosis_figure(frame),
    ]
    missing: list[str] = []
    if dumps is not None:
        dumps = Path(dumps)
        dumped = set(dumped_layers(dumps))
        histograms = []
        for _, row in frame.iterrows():
            values = read_fp32(dump_path(dumps, row["layer"])) if row["layer"] in dumped else None
            if values is None or values.size == 0:
                missing.append(row["layer"])
                continue
            histograms.append(histogram_figure(row["layer"], values, row, bits))
        if histograms:
            parts.append(Div(text="<h2>Dumped activations with fitted densities</h2>", width=WIDTH))
            parts.append(gridplot(histograms, ncols=3))
    parts[0] = _header(statistics, bits, sigma_estimator, dumps, missing)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(file_html(column(*parts), resources=INLINE, title="ACIQ clipping report"), encoding="utf-8")
    return out


# -- the comparison pages (compare.py's tables) ----------------------------------------------------------------
FP32 = "fp32"
ERROR_NOTE = ("error bars and the _se columns: one binomial standard error, 100 sqrt(p (1 - p) / n), the sampling "
              "error of these images, not a confidence interval on ImageNet; two passes over the same images are "
              "paired, so the error of their difference is smaller than the two bars suggest")


def _run_line(cfg) -> str:
    """Weights and activation placement of a ``config.RunConfig``, as the pages' headers say them."""
    return (f"weights {cfg.weights}, {weights_label(cfg)}, activations at the {cfg.act.placement}s"
            f"{', half range' if cfg.act.half_range else ''}")


def _accuracy_figures(lines: pd.DataFrame, fp32: pd.DataFrame, x: str, columns: Sequence[str], name: str,
                      titles: tuple[str, str], tooltips: list[tuple[str, str]], size: int) -> list:
    """Top-1 and top-5 figures: one line per method of ``lines`` against column ``x``, each point with error bars of
    one binomial standard error (the ``<metric>_se`` columns) either side, the FP32 accuracy dashed in a band of its
    own; ``titles`` are the title (with ``{metric}``) and the x-axis label; hover shows ``tooltips`` and the metric
    with its ±."""
    figures = []
    for metric in ("top1", "top5"):
        fig = figure(width=560, height=380, title=titles[0].format(metric=metric), x_axis_label=titles[1],
                     y_axis_label=f"{metric} (%), ± one binomial standard error", tools="pan,box_zoom,reset,save",
                     name=f"{name}_{metric}")
        error = f"{metric}_se"
        for method, part in lines.groupby("method", sort=False):
            part = part.sort_values(x)[list(columns)]
            source = _source(part.assign(lower=part[metric] - part[error], upper=part[metric] + part[error]))
            colour = method_colour(method)
            fig.line(x, metric, source=source, color=colour, legend_label=method, line_width=2)
            fig.scatter(x, metric, source=source, color=colour, legend_label=method, size=size)
            whisker = Whisker(source=source, base=x, lower="lower", upper="upper", line_color=colour,
                              name=f"{name}_{metric}_error")
            whisker.upper_head.line_color = whisker.lower_head.line_color = colour
            fig.add_layout(whisker)
        if len(fp32):
            level, spread = float(fp32[metric].iloc[0]), float(fp32[error].iloc[0])
            fig.add_layout(Span(location=level, dimension="width", line_color="black", line_dash="dashed"))
            fig.add_layout(BoxAnnotation(bottom=level - spread, top=level + spread, fill_color="black",
                                         fill_alpha=0.08, line_alpha=0))
        fig.add_tools(HoverTool(tooltips=[*tooltips, (metric, f"@{metric} ± @{error}")]))
        fig.legend.click_policy = "hide"
        figures.append(fig)
    return figures


def layer_selection_page(table: pd.DataFrame, cfg, images: str) -> str:
    """The ``-ct --compare`` sweep as a bokeh page: top-1 and top-5 against the number of layers at the activation
    width, one line per method with error bars (FP32 dashed); hovering a point names the layer that step kept at 8
    bits.  ``images``: how the images were chosen (``session.Session.image_sources``).  Opens offline."""
    bits = cfg.act.bits
    figures = _accuracy_figures(
        table[table["method"] != FP32], table[table["method"] == FP32], "layers_at_bits", list(table.columns),
        "layer_selection",
        (f"{{metric}} against the layers at {bits} bits", f"layers at {bits} bits (the others at 8)"),
        [("method", "@method"), ("layers at bits", "@layers_at_bits"), ("k kept at 8", "@k"),
         ("last kept", "@added_layer")], size=6)
    for fig in figures:
        fig.legend.location = "bottom_left"
    header = Div(width=1140, text=(
        f"<h2>{cfg.arch}: layer selection per clipping method</h2><p>{_run_line(cfg)}; the k layers with the largest "
        f"estimated MSE (each method's own) kept at 8 bits, k in steps of {cfg.layer_selection_step}; "
        f"{html.escape(images)}; {ERROR_NOTE}</p>"))
    return file_html(column(header, row(*figures)), resources=INLINE, title=f"{cfg.arch} layer selection")


def compare_page(table: pd.DataFrame, shared_seconds: float, cfg, images: str) -> str:
    """The ``--compare`` page: top-1 and top-5 per method against the bit width with error bars (FP32 dashed), the
    range computation time per method (log scale, beside the shared pass) and the table itself; ``images``: how the
    images were chosen (``session.Session.image_sources``).  Opens offline."""
    quantized = table[table["method"] != FP32].assign(width=lambda t: t["bits"].str[3:].astype(int))
    accuracy = _accuracy_figures(
        quantized, table[table["method"] == FP32], "width",
        ("method", "width", "top1", "top5", "top1_se", "top5_se", "cal_seconds", "eval_seconds"), "accuracy",
        ("{metric} per clipping method and activation width", "activation bits"),
        [("method", "@method"), ("bits", "@width")], size=8)
    for fig in accuracy:
        fig.xaxis.ticker = sorted(quantized["width"].unique().tolist())
        fig.legend.location = "bottom_right"
    cost = quantized.groupby("method", sort=False)["cal_seconds"].mean()
    labels, seconds = list(cost.index), [max(float(v), 1e-9) for v in cost.to_numpy()]
    colours = [method_colour(m) for m in labels]
    if shared_seconds > 0:  # 0: the statistics were loaded (-sm use), no pass ran
        labels, seconds, colours = [*labels, "shared pass"], [*seconds, shared_seconds], [*colours, "#444444"]
    bars = figure(y_range=labels[::-1], width=1120, height=80 + 40 * len(labels), x_axis_type="log",
                  title="calibration cost per method: range computation over all layers, mean over widths",
                  x_axis_label="seconds (log scale)", tools="save", name="calibration_cost")
    bars.hbar(y=labels, right=seconds, left=min(seconds) / 10, height=0.6, color=colours)
    shown = table.astype({"cal_seconds": object}).fillna("")
    header = Div(width=1140, text=(
        f"<h2>{cfg.arch}: clipping methods compared</h2><p>{_run_line(cfg)}; {html.escape(images)}; one shared "
        f"calibration pass of {shared_seconds:.2f} s (0: loaded with -sm use); {ERROR_NOTE}</p>"
        + shown.to_html(index=False, border=0)))
    layout = column(header, row(*accuracy), bars)
    return file_html(layout, resources=INLINE, title=f"{cfg.arch} clipping comparison")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytorch_quantizer.report", description=__doc__.splitlines()[0])
    parser.add_argument("stats", type=Path, help="statistics folder (written by -sm collect)")
    parser.add_argument("-o", "--out", type=Path, default=Path("report.html"), help="output HTML file")
    parser.add_argument("--dumps", type=Path, help="a -dd dump folder of <layer>.npz files (fp32 histograms)")
    parser.add_argument("--bits", type=int, default=4, help="activation bit width for alpha and MSE (default 4)")
    parser.add_argument("--sigma-estimator", choices=SIGMA_ESTIMATORS, default="range")
    args = parser.parse_args(argv)
    try:
        check_bits(args.bits)
        out = build_report(args.stats, args.out, args.dumps, args.bits, args.sigma_estimator)
    except (StatisticsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
