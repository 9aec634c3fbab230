"""``--compare``: several clipping methods calibrated in ONE pass, each evaluated at several bit widths.

The calibration pass runs once, with every observer the listed methods require (``methods.required_observers``),
or its folder is loaded (``-sm use``, refused with one line naming what to collect when an observer is missing).
Each method then turns the same observations into its per-layer plan (``policy.plan_layers``); that range
computation is timed on its own (``cal_seconds``: the method's cost on top of the shared pass, with what the pass
learned or measured first: AdaRound's learning, ``-bca``'s passes) and the plan is handed to the evaluation pass as
is.  Decoded evaluation images are cached once for all passes when they fit
(``data.CACHE_MEMORY_FRACTION`` of the available memory; the log says when they do not).

Outputs, named by the run's settings hash so that runs never overwrite each other's files:

- ``results/compare/<arch>_<settings>.csv``: one row per method x bits plus the FP32 reference, each accuracy with
  its binomial standard error (``top1_se``, ``top5_se``), and a bokeh page ``.html`` beside it (accuracy per method
  and bit width with error bars, calibration cost per method, a subtitle saying where the images came from);
- with ``-ct``: ``results/custom_test/<arch>_<qtype>_compare_<settings>.csv``, ``.png`` and ``.html``: the seed's
  layer selection (k layers with the largest estimated MSE kept at 8 bits) for every method, accuracy against the
  number of layers left at ``--qtype`` (the seed's ``figures/<model>_fig1.png``, one line per method; the bokeh
  page adds top-5 and, on hover, the layer each step added).

Every pass is also a row of ``results.csv`` with all settings (``results.Recorder``), with its top-1 agreement
and logit SQNR against the FP32 pass.  The pages and the figure are drawn by ``report`` and ``figures``.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .agreement import ReferenceLogits
from .atomic import atomic_write, write_csv_atomic
from .figures import SELECTION_DPI, layer_selection_figure, png_bytes
from .methods import get_method, required_observers
from .model_quantizer import model_policy
from .observers import channel_observers
from .passes import Record, evaluate, layer_order, layer_selection, quantized_pass, selection_counts
from .passes import collect as collect_pass
from .policy import BitAllocation, plan_layers
from .quant_config import QuantConfig
from .report import compare_page, layer_selection_page
from .results import accuracy_cells
from .session import Session
from .stats import Statistics, load_statistics

log = logging.getLogger("pytorch_quantizer")

TABLE_COLUMNS = ("method", "bits", "top1", "top5", "top1_se", "top5_se", "images", "cal_seconds", "eval_seconds")
SECONDS_COLUMNS = ("cal_seconds", "eval_seconds")  # the only columns that differ between identical runs
CT_COLUMNS = ("method", "k", "layers_at_bits", "added_layer", "top1", "top5", "top1_se", "top5_se")
FP32 = "fp32"


def observers_for(methods: Sequence[str]) -> tuple[str, ...]:
    """The observers one pass must feed so that every method in ``methods`` can plan (moments always: every
    statistics folder holds them, the plan reads the layer's range from them)."""
    return tuple(dict.fromkeys(("moments", *required_observers(methods))))


def check_methods(methods: Sequence[str]) -> None:
    """Unknown names: one ``ValueError`` listing the registered methods."""
    for name in methods:
        get_method(name)


@contextlib.contextmanager
def calibrated(session: Session, record: Record, methods: Sequence[str]):
    """The statistics every method plans from, and the seconds of the shared pass (0 when loaded).

    Use mode: the loaded folder, if it holds every observer the methods need.  Collect mode: one pass into the
    run's folder (replaced only when complete).  No mode: one pass into a temporary folder, removed when the
    comparison is done (nothing saved, nothing overwritten)."""
    cfg = session.cfg
    if cfg.stats_mode == "use":
        for name in methods:
            session.stats.require(get_method(name).requires, f"clipping method {name!r}")
        yield observed(session.stats), 0.0
        return
    if cfg.data.cal_size is None and cfg.data.cal_root is None:
        raise ValueError("--compare evaluates on images held out of calibration: give -cs N (images drawn from "
                         "--data and left out of evaluation) or --cal-data DIR")
    observers = channel_observers(observers_for(methods)) if cfg.act.per_channel else observers_for(methods)
    with contextlib.ExitStack() as stack:
        if cfg.stats_mode == "collect":
            folder = session.stats_path
        elif session.dist.active:
            raise ValueError("--compare under torchrun calibrates into a folder every rank reads: give -sm collect "
                             "-sf DIR (on a filesystem all nodes share) instead of -sm no")
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="compare-stats-"))) / "statistics"
            log.info("-sm no: the calibration statistics go to a temporary folder that is removed afterwards; "
                     "-sm collect keeps them in -sf")
        log.info("one calibration pass for %s: observers %s", ", ".join(methods),
                 ", ".join(o if isinstance(o, str) else f"{o[0]} per channel" for o in observers))
        measured = collect_pass(session, observers, folder)
        session.stats_path = folder
        session.use_statistics(load_statistics(folder))
        record(measured, "collect", None, None, file=folder)
        yield observed(session.stats), measured.seconds


def observed(stats: Statistics) -> Statistics:
    """``stats`` with every layer's Observation built (``Statistics.observation`` keeps them), so that no method's
    timed plan pays for reading the folder's rows."""
    for name in stats.layer_names:
        if stats.has(name):
            stats.observation(name)
    return stats


def timed_plan(session: Session, stats: Statistics, method: str, bits: int) -> tuple[QuantConfig, list, float]:
    """The quantization of ``method`` at ``bits``, its per-layer plan and the seconds the plan took (the method's
    range computation over all layers; the layer policy, which may trace the model's graph, is not timed)."""
    quant = session.cfg.quant().with_pass(bits, method=method)
    specs = model_policy(quant, session.model, session.layers).specs(session.layers)
    allocation = BitAllocation.of(quant) if quant.alloc.activations else None
    start = time.perf_counter()
    plan = plan_layers(session.layers, stats, specs, quant.act.sigma, quant.act.per_channel, allocation,
                       quant.act.missing_stats == "float")
    return quant, plan, time.perf_counter() - start


def run_compare(session: Session, record: Record, settings: str) -> pd.DataFrame:
    """The ``--compare`` run (with layer selection: the sweep per method); returns the table it wrote."""
    cfg, dist = session.cfg, session.dist
    methods = cfg.compare
    check_methods(methods)
    out = cfg.results.parent
    with calibrated(session, record, methods) as (stats, shared_seconds):
        if cfg.layer_selection:
            stem = out / "custom_test" / f"{cfg.arch}_int{cfg.act.bits}_compare_{settings}"
            table = _layer_selection(session, record, methods, stem.with_suffix(".csv"))
            if dist.is_main:  # under torchrun rank 0 writes and prints
                write_csv_atomic(table, stem.with_suffix(".csv"))
                figure = layer_selection_figure(table, cfg)
                atomic_write(stem.with_suffix(".png"),
                             lambda tmp: Path(tmp).write_bytes(png_bytes(figure, SELECTION_DPI)))
                page = layer_selection_page(table, cfg, session.image_sources())
                atomic_write(stem.with_suffix(".html"), lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
                print(table.to_string(index=False), flush=True)
                log.info("layer-selection table and figures written to %s.{csv,png,html}", stem)
            return table
        path = out / "compare" / f"{cfg.arch}_{settings}.csv"
        table = _compare(session, record, stats, methods, cfg.compare_bits, path)
    if not dist.is_main:
        return table
    write_csv_atomic(table, path)
    html = path.with_suffix(".html")
    page = compare_page(table, shared_seconds, cfg, session.image_sources())
    atomic_write(html, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    print(table.to_string(index=False), flush=True)
    log.info("shared calibration pass: %.2f s; table written to %s, chart to %s", shared_seconds, path, html)
    return table


def _compare(session: Session, record: Record, stats: Statistics, methods: Sequence[str], widths: Sequence[int],
             path: Path) -> pd.DataFrame:
    """FP32, then every method at every width, all over the same (cached) evaluation images."""
    cfg = session.cfg
    loader = session.loader(calibration=False, passes=1 + len(methods) * len(widths))
    reference = ReferenceLogits()
    measured = evaluate(session, loader, FP32, keep=reference)
    record(measured, FP32, None, None, file=path, method="")
    rows = [_table_row(FP32, FP32, measured, np.nan)]
    for method in methods:
        for bits in widths:
            quant, plan, cal_seconds = timed_plan(session, stats, method, bits)
            measured, _ = quantized_pass(session, loader, quant, f"{method} int{bits}", plan=plan, against=reference)
            record(measured, f"compare int{bits}", bits, cfg.weight.bits, file=path, method=method)
            rows.append(_table_row(method, f"int{bits}", measured, cal_seconds + (measured.cal_seconds or 0.0)))
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _table_row(method: str, bits: str, measured, cal_seconds: float) -> dict:
    acc = measured.acc
    return {"method": method, "bits": bits, **accuracy_cells(acc), "images": acc.images,
            "cal_seconds": round(cal_seconds, 6), "eval_seconds": round(measured.seconds, 3)}


def _layer_selection(session: Session, record: Record, methods: Sequence[str], path: Path) -> pd.DataFrame:
    """The seed's layer selection for each method (its own MSE order), after one FP32 reference pass."""
    cfg = session.cfg
    orders = {method: layer_order(session, cfg.quant().with_pass(method=method)) for method in methods}
    loader = session.loader(calibration=False, passes=1 + sum(
        len(selection_counts(len(order), cfg.layer_selection_step)) for order in orders.values()))
    reference = ReferenceLogits()
    measured = evaluate(session, loader, FP32, keep=reference)
    record(measured, FP32, None, None, file=path, method="")
    frames = [pd.DataFrame([{"method": FP32, "k": -1, "layers_at_bits": 0, "added_layer": "",
                             **accuracy_cells(measured.acc)}])]
    for method, order in orders.items():
        frame = layer_selection(session, loader, order, record, path, method=method, against=reference)
        frames.append(frame.assign(method=method, layers_at_bits=len(order) - frame["k"]))
    return pd.concat(frames, ignore_index=True)[list(CT_COLUMNS)]
