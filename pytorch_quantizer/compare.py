"""``--compare``: several clipping methods calibrated in ONE pass, each evaluated at several bit widths.

The calibration pass runs once, with every observer the listed methods require (``methods.required_observers``),
or its folder is loaded (``-sm use``, refused with one line naming what to collect when an observer is missing).
Each method then turns the same observations into its per-layer plan (``policy.plan_layers``); that range
computation is timed on its own (``cal_seconds``: the method's cost on top of the shared pass) and the plan is
handed to the evaluation pass as is.  Decoded evaluation images are cached once for all passes when they fit
(``data.CACHE_MEMORY_FRACTION`` of the available memory; the log says when they do not).

Outputs, named by the run's settings hash so that runs never overwrite each other's files:

- ``results/compare/<arch>_<settings>.csv``: one row per method x bits plus the FP32 reference, and a bokeh
  page ``.html`` beside it (accuracy per method and bit width, calibration cost per method);
- with ``-ct``: ``results/custom_test/<arch>_<qtype>_compare_<settings>.csv``, ``.png`` and ``.html``: the seed's
  layer selection (k layers with the largest estimated MSE kept at 8 bits) for every method, accuracy against the
  number of layers left at ``--qtype`` (the seed's ``figures/<model>_fig1.png``, one line per method; the bokeh
  page adds top-5 and, on hover, the layer each step added).

Every pass is also a row of ``results.csv`` with all settings (the experiment's ``record``).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from bokeh.embed import file_html
from bokeh.layouts import column, row
from bokeh.models import Div, HoverTool, Span
from bokeh.plotting import figure
from bokeh.resources import INLINE
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .atomic import atomic_write, write_csv_atomic
from .methods import get_method, required_observers
from .observers import PER_CHANNEL
from .policy import plan_layers
from .report import _source, method_colour
from .stats import Statistics, load_statistics

if TYPE_CHECKING:
    from .experiment import Experiment

log = logging.getLogger("pytorch_quantizer")

TABLE_COLUMNS = ("method", "bits", "top1", "top5", "images", "cal_seconds", "eval_seconds")
SECONDS_COLUMNS = ("cal_seconds", "eval_seconds")  # the only columns that differ between identical runs
CT_COLUMNS = ("method", "k", "layers_at_bits", "added_layer", "top1", "top5")
FP32 = "fp32"
PNG_DPI = 100
PNG_SIZE = (7.0, 4.5)
Record = Callable[..., dict]


def observers_for(methods: Sequence[str]) -> tuple[str, ...]:
    """The observers one pass must feed so that every method in ``methods`` can plan (moments always: every
    statistics folder holds them, the plan reads the layer's range from them)."""
    return tuple(dict.fromkeys(("moments", *required_observers(methods))))


def check_methods(methods: Sequence[str]) -> None:
    """Unknown names: one ``ValueError`` listing the registered methods."""
    for name in methods:
        get_method(name)


@contextlib.contextmanager
def calibrated(exp: Experiment, record: Record, methods: Sequence[str]):
    """The statistics every method plans from, and the seconds of the shared pass (0 when loaded).

    ``-sm use``: the loaded folder, if it holds every observer the methods need.  ``-sm collect``: one pass into
    the run's folder (replaced only when complete).  ``-sm no``: one pass into a temporary folder, removed when
    the comparison is done (nothing saved, nothing overwritten)."""
    cfg = exp.cfg
    if cfg.stats_mode == "use":
        for name in methods:
            exp.stats.require(get_method(name).requires, f"clipping method {name!r}")
        yield observed(exp.stats), 0.0
        return
    if cfg.cal_set_size is None and cfg.cal_data is None:
        raise ValueError("--compare evaluates on images held out of calibration: give -cs N (images drawn from "
                         "--data and left out of evaluation) or --cal-data DIR")
    observers = (*observers_for(methods), *((("moments", PER_CHANNEL),) if cfg.per_channel_activations else ()))
    with contextlib.ExitStack() as stack:
        if cfg.stats_mode == "collect":
            folder = exp.stats_path
        elif exp.dist.active:
            raise ValueError("--compare under torchrun calibrates into a folder every rank reads: give -sm collect "
                             "-sf DIR (on a filesystem all nodes share) instead of -sm no")
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="compare-stats-"))) / "statistics"
            log.info("-sm no: the calibration statistics go to a temporary folder that is removed afterwards; "
                     "-sm collect keeps them in -sf")
        log.info("one calibration pass for %s: observers %s", ", ".join(methods),
                 ", ".join(o if isinstance(o, str) else f"{o[0]} per channel" for o in observers))
        acc, seconds = exp.collect(observers, folder)
        exp.stats_path = folder
        exp.use_statistics(load_statistics(folder))
        record(acc, seconds, "collect", None, None, file=folder)
        yield observed(exp.stats), seconds


def observed(stats: Statistics) -> Statistics:
    """``stats`` with every layer's Observation built (``Statistics.observation`` keeps them), so that no method's
    timed plan pays for reading the folder's rows."""
    for name in stats.layer_names:
        if stats.has(name):
            stats.observation(name)
    return stats


def timed_plan(exp: Experiment, stats: Statistics, method: str, bits: int):
    """The quantization of ``method`` at ``bits``, its per-layer plan and the seconds the plan took (the method's
    range computation over all layers; the layer policy, which may trace the model's graph, is not timed)."""
    quant = exp.cfg.quant_config(bits, threshold=method)
    policy = quant.policy(exp.model)
    start = time.perf_counter()
    plan = plan_layers(exp.layers, stats, policy, exp.cfg.sigma_estimator, quant.per_channel_activations,
                       quant.act_allocation)
    return quant, plan, time.perf_counter() - start


def run_compare(exp: Experiment, record: Record, settings: str) -> pd.DataFrame:
    """The ``--compare`` run (with ``-ct``: the layer-selection sweep per method); returns the table it wrote."""
    cfg = exp.cfg
    methods = cfg.compare
    check_methods(methods)
    out = cfg.results.parent
    with calibrated(exp, record, methods) as (stats, shared_seconds):
        if cfg.custom_test:
            stem = out / "custom_test" / f"{cfg.arch}_int{cfg.bits}_compare_{settings}"
            table = _layer_selection(exp, record, stats, methods, stem.with_suffix(".csv"))
            if exp.dist.is_main:  # under torchrun rank 0 writes and prints
                write_csv_atomic(table, stem.with_suffix(".csv"))
                atomic_write(stem.with_suffix(".png"),
                             lambda tmp: _save_png(layer_selection_figure(table, cfg), tmp))
                atomic_write(stem.with_suffix(".html"),
                             lambda tmp: Path(tmp).write_text(layer_selection_page(table, exp), encoding="utf-8"))
                print(table.to_string(index=False), flush=True)
                log.info("layer-selection table and figures written to %s.{csv,png,html}", stem)
            return table
        path = out / "compare" / f"{cfg.arch}_{settings}.csv"
        table = _compare(exp, record, stats, methods, cfg.compare_bits, path)
    if not exp.dist.is_main:
        return table
    write_csv_atomic(table, path)
    html = path.with_suffix(".html")
    atomic_write(html, lambda tmp: Path(tmp).write_text(compare_page(table, shared_seconds, exp), encoding="utf-8"))
    print(table.to_string(index=False), flush=True)
    log.info("shared calibration pass: %.2f s; table written to %s, chart to %s", shared_seconds, path, html)
    return table


def _compare(exp: Experiment, record: Record, stats: Statistics, methods: Sequence[str], widths: Sequence[int],
             path: Path) -> pd.DataFrame:
    """FP32, then every method at every width, all over the same (cached) evaluation images."""
    cfg = exp.cfg
    loader = exp.loader(calibration=False, passes=1 + len(methods) * len(widths))
    acc, seconds = exp.run_pass(loader, FP32)
    record(acc, seconds, FP32, None, None, file=path, threshold="")
    rows = [_table_row(FP32, FP32, acc, np.nan, seconds)]
    for method in methods:
        for bits in widths:
            quant, plan, cal_seconds = timed_plan(exp, stats, method, bits)
            acc, seconds, _ = exp.quantized_pass(loader, quant, stats, f"{method} int{bits}", plan=plan)
            record(acc, seconds, f"compare int{bits}", bits, cfg.weight_bits, file=path, threshold=method)
            rows.append(_table_row(method, f"int{bits}", acc, cal_seconds, seconds))
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _table_row(method: str, bits: str, acc, cal_seconds: float, eval_seconds: float) -> dict:
    return {"method": method, "bits": bits, "top1": round(acc.prec1, 3), "top5": round(acc.prec5, 3),
            "images": acc.images, "cal_seconds": round(cal_seconds, 6), "eval_seconds": round(eval_seconds, 3)}


def _layer_selection(exp: Experiment, record: Record, stats: Statistics, methods: Sequence[str],
                     path: Path) -> pd.DataFrame:
    """The seed's ``-ct`` sweep for each method (its own MSE order), after one FP32 reference pass."""
    from .experiment import _custom_test, ct_counts

    cfg = exp.cfg
    orders = {method: exp.mse_order(stats, cfg.bits, threshold=method) for method in methods}
    loader = exp.loader(calibration=False, passes=1 + sum(len(ct_counts(len(order), cfg.ct_step))
                                                               for order in orders.values()))
    acc, seconds = exp.run_pass(loader, FP32)
    record(acc, seconds, FP32, None, None, file=path, threshold="")
    frames = [pd.DataFrame([{"method": FP32, "k": -1, "layers_at_bits": 0, "added_layer": "",
                             "top1": round(acc.prec1, 3), "top5": round(acc.prec5, 3)}])]
    for method, order in orders.items():
        frame = _custom_test(exp, loader, stats, order, record, path, threshold=method)
        frames.append(frame.assign(method=method, layers_at_bits=len(order) - frame["k"]))
    return pd.concat(frames, ignore_index=True)[list(CT_COLUMNS)]


# -- outputs -------------------------------------------------------------------------------------------------
def _save_png(fig: Figure, path: str) -> None:
    """PNG without a Software/date entry, so the same table always gives the same bytes (as ``figures.py``)."""
    fig.savefig(path, format="png", dpi=PNG_DPI, metadata={"Software": None})


def layer_selection_figure(table: pd.DataFrame, cfg) -> Figure:
    """Top-1 against the number of regular layers at ``--qtype`` (the others kept at 8 bits), one line per method,
    the FP32 accuracy dashed."""
    fig = Figure(figsize=PNG_SIZE, dpi=PNG_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method, part in table[table["method"] != FP32].groupby("method", sort=False):
        part = part.sort_values("layers_at_bits")
        ax.plot(part["layers_at_bits"], part["top1"], "o-", markersize=3, color=method_colour(method), label=method)
    fp32 = table[table["method"] == FP32]
    if len(fp32):
        ax.axhline(float(fp32["top1"].iloc[0]), color="black", linestyle="--", linewidth=1, label="FP32")
    ax.set_xlabel(f"layers at {cfg.bits} bits (the others at 8, largest estimated MSE kept first)")
    ax.set_ylabel("top-1 (%) on the held-out images")
    weights = f"W{cfg.weight_bits or 32}{' per channel' if getattr(cfg, 'per_channel_weights', False) else ''}"
    grids = ", ReLU-aware grids" if getattr(cfg, "half_range", False) else ""
    ax.set_title(f"{cfg.arch}, {weights}{grids}: layer selection per clipping method", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return fig


def _accuracy_figures(lines: pd.DataFrame, fp32: pd.DataFrame, x: str, columns: Sequence[str], name: str,
                      titles: tuple[str, str], tooltips: list[tuple[str, str]], size: int) -> list:
    """Top-1 and top-5 figures: one line per method of ``lines`` against column ``x``, the FP32 accuracy dashed;
    ``titles`` are the title (with ``{metric}``) and the x-axis label; hover shows ``tooltips`` and the metric."""
    figures = []
    for metric in ("top1", "top5"):
        fig = figure(width=560, height=380, title=titles[0].format(metric=metric), x_axis_label=titles[1],
                     y_axis_label=f"{metric} (%)", tools="pan,box_zoom,reset,save", name=f"{name}_{metric}")
        for method, part in lines.groupby("method", sort=False):
            source = _source(part.sort_values(x)[list(columns)])
            colour = method_colour(method)
            fig.line(x, metric, source=source, color=colour, legend_label=method, line_width=2)
            fig.scatter(x, metric, source=source, color=colour, legend_label=method, size=size)
        if len(fp32):
            fig.add_layout(Span(location=float(fp32[metric].iloc[0]), dimension="width", line_color="black",
                                line_dash="dashed"))
        fig.add_tools(HoverTool(tooltips=[*tooltips, (metric, f"@{metric}")]))
        fig.legend.click_policy = "hide"
        figures.append(fig)
    return figures


def layer_selection_page(table: pd.DataFrame, exp: Experiment) -> str:
    """The ``-ct --compare`` sweep as a bokeh page: top-1 and top-5 against the number of layers at ``--qtype``, one
    line per method (FP32 dashed); hovering a point names the layer that step kept at 8 bits.  Opens offline."""
    cfg = exp.cfg
    figures = _accuracy_figures(
        table[table["method"] != FP32], table[table["method"] == FP32], "layers_at_bits", CT_COLUMNS,
        "layer_selection", (f"{{metric}} against the layers at {cfg.bits} bits",
                            f"layers at {cfg.bits} bits (the others at 8)"),
        [("method", "@method"), ("layers at bits", "@layers_at_bits"), ("k kept at 8", "@k"),
         ("last kept", "@added_layer")], size=6)
    for fig in figures:
        fig.legend.location = "bottom_left"
    header = Div(width=1140, text=(
        f"<h2>{cfg.arch}: layer selection per clipping method</h2><p>weights {cfg.weights}, "
        f"W{cfg.weight_bits or 32}{' per channel' if cfg.per_channel_weights else ''}, activations at the "
        f"{cfg.act_point}s{', half range' if cfg.half_range else ''}; the k layers with the largest estimated MSE "
        f"(each method's own) kept at 8 bits, k in steps of {cfg.ct_step}; {len(exp.evaluation)} evaluation "
        f"images held out of calibration.</p>"))
    return file_html(column(header, row(*figures)), resources=INLINE, title=f"{cfg.arch} layer selection")


def compare_page(table: pd.DataFrame, shared_seconds: float, exp: Experiment) -> str:
    """The bokeh page: top-1 and top-5 per method against the bit width (FP32 dashed), the range computation
    time per method (log scale, beside the shared pass) and the table itself.  JavaScript inlined: opens offline."""
    cfg = exp.cfg
    quantized = table[table["method"] != FP32].assign(width=lambda t: t["bits"].str[3:].astype(int))
    accuracy = _accuracy_figures(
        quantized, table[table["method"] == FP32], "width",
        ("method", "width", "top1", "top5", "cal_seconds", "eval_seconds"), "accuracy",
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
        f"<h2>{cfg.arch}: clipping methods compared</h2><p>weights {cfg.weights}, W{cfg.weight_bits or 32}"
        f"{' per channel' if cfg.per_channel_weights else ''}, activations at the {cfg.act_point}s"
        f"{', half range' if cfg.half_range else ''}; {int(table['images'].iloc[0])} evaluation images held out "
        f"of {exp.stats.meta['images']} calibration images; one shared calibration pass of {shared_seconds:.2f} s "
        f"(0: loaded with -sm use).</p>" + shown.to_html(index=False, border=0)))
    layout = column(header, row(*accuracy), bars)
    return file_html(layout, resources=INLINE, title=f"{cfg.arch} clipping comparison")
