"""The passes a run is made of, as functions of a ``Session``: evaluate, collect, one quantized evaluation (with the
activations' bias correction measured first when asked), the precision sweep and the seed's layer selection.

``run`` (the driver) and ``compare`` both build on these; neither imports the other.  A pass returns what it
measured (``Measured``); the results rows are written by the caller (``results.Recorder``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .adaround import LearnedRounding, learn_rounding, load_rounding, save_rounding
from .agreement import LogitAgreement, ReferenceLogits
from .bias_correction import ChannelMeans, ShiftRecorder, bias_shifts
from .compiled import compile_model
from .config import flatten
from .data import make_loader, relative_paths
from .dfq_bias import data_free_shifts
from .dumps import write_dump
from .layers import execution_order
from .model_quantizer import ModelQuantizer, model_policy
from .observers import channel_observers
from .policy import LayerPlan, mse_order
from .quant_config import QuantConfig
from .results import ACCURACY_COLUMNS, Accuracy
from .session import Mapped, Session
from .stats import StatisticsCollector

log = logging.getLogger("pytorch_quantizer")


@dataclass
class Measured:
    """What one pass measured: accuracy against the labels, seconds, and (when an FP32 reference pass ran over the
    same images) the label-free agreement of its logits with the reference's."""

    acc: Accuracy
    seconds: float
    agreement: LogitAgreement | None = None
    cal_seconds: float | None = None  # what the pass learned or measured first (AdaRound, -bca), in seconds


Record = Callable[..., dict]  # results.Recorder.record


def evaluate(session: Session, loader: DataLoader, desc: str, check_outputs: bool = True, compile: bool = True,
             keep: ReferenceLogits | None = None, against: ReferenceLogits | None = None) -> Measured:
    """Top-1/top-5 over ``loader``; non-finite outputs stop the run (collect mode names the layer itself).

    ``keep`` records each batch's logits (the FP32 reference); ``against`` holds them against such a record
    (top-1 agreement, logit SQNR).  With ``compile`` (and the run's ``--compile``) the model is compiled afresh for
    the hooks attached now; the time includes compiling.  Under torchrun ``loader`` holds this rank's shard; the
    counts are summed over the ranks (exact integers), the agreements gathered to rank 0, and a rank that fails
    stops every rank here (``DistContext.together``).  The progress bar shows rank 0's shard."""
    cfg, dist = session.cfg, session.dist
    acc = Accuracy()
    agreement = LogitAgreement() if against is not None else None
    start = time.perf_counter()
    with dist.together():
        runner = session.runner
        if cfg.compile and compile:
            torch.compiler.reset()  # drop the graphs traced with the previous pass's hooks
            runner = compile_model(session.runner)
        bar = tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                   disable=None if dist.is_main else True)
        with torch.inference_mode():
            for i, (images, target) in enumerate(bar):
                dist.stop_if_peer_failed()
                logits = runner(images.to(session.device, non_blocking=True))
                if check_outputs and not torch.isfinite(logits).all():
                    raise FloatingPointError(
                        f"{desc}: the model produced non-finite outputs; run with -sm no to find the layer"
                    )
                logits = logits.cpu()
                acc.add(logits, target)
                if keep is not None:
                    keep.record(i, logits)
                if agreement is not None:
                    agreement.add(logits, against[i])
                if cfg.print_freq and i % cfg.print_freq == 0:
                    bar.set_postfix(prec1=f"{acc.prec1:.2f}", prec5=f"{acc.prec5:.2f}")
    acc = Accuracy(*dist.sum_counts([acc.images, acc.top1, acc.top5]))
    if agreement is not None and dist.active:
        parts = dist.gather(agreement)
        agreement = LogitAgreement.merged(parts) if parts is not None else agreement
    return Measured(acc, time.perf_counter() - start, agreement)


def collect(session: Session, observers: Iterable[str | tuple] | None = None, folder: Path | None = None,
            before_swap: Callable[[Measured], object] | None = None) -> Measured:
    """FP32 pass over the calibration images with statistics hooks feeding ``observers`` (default: the run's, and
    per-channel moments with per-channel activations, in the same pass: one calibration serves every method); the
    folder (default the run's) is replaced only on success, after ``before_swap(measured)`` (the run's results
    row) has succeeded on rank 0."""
    cfg, dist = session.cfg, session.dist
    devices = [f"cuda:{i}" for i in cfg.device_ids] if session.runner is not session.model else ()
    log.info("calibration: %d of the %d images in %s", len(session.calibration), len(session.cal_dataset),
             session.cal_dataset.root)
    if observers is None:
        observers = channel_observers(cfg.observers) if cfg.act.per_channel else cfg.observers
    folder = session.stats_path if folder is None else folder
    with StatisticsCollector(session.model, devices=devices, point=cfg.act.placement,
                             observers=observers) as collector:
        if dist.active:  # every rank bins its histograms on the lattice of one process's first batch
            first = Subset(session.cal_dataset, session.calibration[: cfg.data.batch_size])
            images, _ = next(iter(make_loader(Mapped(first, session.preprocess.normalize_transform()),
                                              cfg.data.batch_size, workers=0)))
            with dist.together(), collector.priming(), torch.inference_mode():
                session.runner(images.to(session.device))
        measured = evaluate(session, session.loader(calibration=True), "collect", check_outputs=False)
    if dist.active:  # every rank's per-sample rows to rank 0, in rank (= sample) order
        with dist.together():
            state = collector.state()
        states = dist.gather(state)
    with dist.together():  # the others wait here: rank 0 writing also ends every rank if it fails
        if dist.is_main:
            if dist.active:
                collector.merge(states)
            session.save_statistics(collector, folder,
                                    None if before_swap is None else lambda: before_swap(measured))
    return measured


def rank_seed(seed: int, rank: int) -> int:
    """The stochastic-rounding seed of ``rank`` > 0 under torchrun: a stream of its own (60 bits of sha256 of
    seed and rank), so that shards do not repeat each other's noise.  One process draws the noise of all batches
    from one stream, so ``-s`` results depend on the world size (equally random, reproducible for each)."""
    return int(hashlib.sha256(f"{seed}/{rank}".encode()).hexdigest()[:15], 16)


def quantized_pass(session: Session, loader: DataLoader, quant: QuantConfig, desc: str,
                   plan: list[LayerPlan] | None = None, against: ReferenceLogits | None = None,
                   keep: ReferenceLogits | None = None) -> tuple[Measured, ModelQuantizer]:
    """One evaluation pass with ``quant`` and the session's statistics; ``plan`` (from ``plan_layers`` for this
    config) is used as given; ``against``: the FP32 reference logits of ``loader``'s batches; ``keep`` records
    this pass's logits (``onnx_pass`` holds ONNX Runtime's against them)."""
    stats, dist = session.stats, session.dist
    if quant.act.stochastic and dist.rank > 0:  # rank 0 keeps the seed's stream, the others their own
        quant = replace(quant, seed=rank_seed(quant.seed, dist.rank))
    shifts, rounding, cal_seconds = None, None, None
    if (quant.correct.act_bias or quant.correct.data_free_bias or quant.rounding.learned) and plan is None \
            and stats is not None:
        plan = ModelQuantizer(session.model, quant, stats).plan  # one plan for every round and every layer learned
    if quant.rounding.learned:
        learned = learned_rounding(session, quant, plan)
        rounding, cal_seconds = learned.up, learned.seconds
    if quant.correct.act_bias:
        start = time.perf_counter()
        shifts = measure_bias_shifts(session, quant, plan, rounding)
        cal_seconds = (cal_seconds or 0.0) + time.perf_counter() - start
    if quant.correct.data_free_bias:
        start = time.perf_counter()
        shifts = predict_bias_shifts(session, quant, plan, rounding)
        cal_seconds = (cal_seconds or 0.0) + time.perf_counter() - start
    quantizer = ModelQuantizer(session.model, quant, stats, shifts, plan=plan, rounding=rounding)
    with quantizer:
        measured = evaluate(session, loader, desc, against=against, keep=keep)
    return replace(measured, cal_seconds=cal_seconds), quantizer


def learned_rounding(session: Session, quant: QuantConfig, plan: list[LayerPlan] | None = None) -> LearnedRounding:
    """The AdaRound rounding of ``quant``'s weights (``adaround``), learned on the calibration images, or taken
    from this session's memory or from ``results/adaround/`` when learned before with the same weights, grids,
    images and settings (``rounding_key``): a sweep or ``--compare`` learns it once per weight grid (and, with
    input ``quantized``, once per activation setting).  Its ``seconds`` are those of the learning, even when
    loaded: what the method costs."""
    quantizer = ModelQuantizer(session.model, quant, session.stats, plan=plan)
    grids = {layer.name: quantizer.weights.grid_of(layer, spec.weight)
             for layer, spec in zip(quantizer.layers, quantizer.specs, strict=True)}
    images = session.correction_images("AdaRound learns each layer's rounding")
    key = rounding_key(session, quant, quantizer, images)
    if key in session.roundings:
        return session.roundings[key]
    path = session.cfg.results.parent / "adaround" / f"{session.cfg.arch}_{key[:16]}.pt"
    learned = load_rounding(path, key, grids)
    if learned is not None:
        log.info("AdaRound: the rounding learned in %.1f s is read from %s", learned.seconds, path)
    else:
        loader = session.correction_loader()
        device = session.device

        def quantized(up):
            return ModelQuantizer(session.model, quant, session.stats, plan=quantizer.plan, policy=quantizer.policy,
                                  rounding=up)

        order = execution_order(session.model, quantizer.layers, session.example_input().to(device))
        log.info("AdaRound: learning %d layers on %d calibration images (%d steps of %d images a layer, inputs "
                 "from the %s network)", sum(g is not None for g in grids.values()), len(loader.dataset),
                 quant.rounding.iters, quant.rounding.batch, quant.rounding.input)
        learned = learn_rounding(session.model, order, grids,
                                 lambda: (images.to(device) for images, _ in loader), len(loader.dataset),
                                 quant.rounding, quant.seed,
                                 session.relu_fed(), quantized)
        log.info("%s", learned.summary())
        worse = learned.worse()
        if worse:
            log.warning("AdaRound: %d of %d layers reconstruct their output worse than nearest rounding does (first: "
                        "%s); the learning did not settle in %d steps: give more (--adaround_iters)", len(worse),
                        len(learned.layers), worse[0], quant.rounding.iters)
        if session.dist.is_main:
            save_rounding(path, key, learned)
            log.info("AdaRound: the learned rounding is saved to %s", path)
    session.roundings[key] = learned
    return learned


def rounding_key(session: Session, quant: QuantConfig, quantizer: ModelQuantizer, images: tuple) -> str:
    """sha256 over everything the learned rounding depends on: the model (weights, folding, equalization), every
    layer's weight grid setting, the calibration images, the rounding settings and seed, and, when the inputs come
    from the quantized network, its activation settings and statistics.  With inputs from the float network the
    biases' grid does not count (each layer learns with its float bias, ``adaround``): it is keyed as the default,
    biases at the weights' width, so that ``--float_bias`` and ``bias_bits`` read the same rounding."""
    cfg = session.cfg
    source, indices = images
    names = relative_paths(source)
    weight = flatten(quant.weight)
    if quant.rounding.input == "float":
        weight.update(bias_bits=quant.weight.bits, float_bias=False)
    parts = {
        "model": [cfg.arch, session.fingerprint, cfg.fold_bn, cfg.equalize],
        "weights": [weight, flatten(quant.alloc) if quant.alloc.weights else None,
                    [[layer.name, spec.weight.bits, spec.weight.per_channel, spec.weight.method,
                      spec.weight.levels_bits] for layer, spec in zip(quantizer.layers, quantizer.specs, strict=True)]],
        "images": [str(Path(source.root).resolve()), [names[i] for i in indices]],
        "rounding": [flatten(quant.rounding), quant.seed],
    }
    if quant.rounding.input == "quantized":
        parts["activations"] = [flatten(quant.act), sorted(quant.keep_8bit), flatten(quant.correct),
                                session.stats_fingerprint]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def onnx_pass(session: Session, loader: DataLoader, quantizer: ModelQuantizer,
              simulated: ReferenceLogits | None) -> Measured | None:
    """Export the network as ``quantizer`` quantizes it to ``--export_onnx`` (``onnx_export``) and, with
    ``--eval_onnx``, evaluate it in ONNX Runtime's CPU provider over ``loader``: its accuracy, and its agreement
    with the simulator's logits of the same batches (``simulated``, recorded by the simulator's pass, so that the
    check costs one pass, not two).  Returns the ORT pass (None without ``--eval_onnx``)."""
    from .onnx_export import OrtModel, describe, export_onnx

    cfg = session.cfg
    start = time.perf_counter()
    report = export_onnx(session.model, quantizer, session.example_input(), cfg.export_onnx, cfg.onnx_relu_pairs)
    log.info("%s (%.1f s)", describe(report), time.perf_counter() - start)
    if not cfg.eval_onnx:
        return None
    start = time.perf_counter()
    model = OrtModel(cfg.export_onnx)
    log.info("%s", model.kernel_line())
    acc, agreement = Accuracy(), LogitAgreement()
    for i, (images, target) in enumerate(tqdm(loader, desc="onnxruntime", unit="batch", leave=False,
                                              dynamic_ncols=True, disable=None)):
        logits = model(images)
        acc.add(logits, target)
        agreement.add(logits, simulated[i])
    return Measured(acc, time.perf_counter() - start, agreement)


def measure_bias_shifts(session: Session, quant: QuantConfig, plan: list[LayerPlan] | None = None,
                        rounding: dict[str, torch.Tensor] | None = None) -> ChannelMeans:
    """The activations' bias correction: each layer's per-channel mean shift under ``quant``, measured on the
    calibration images in ``act_bias_rounds`` quantized passes (``bias_correction``), each with ``plan`` (the
    activation grids, which the shifts do not change) when given, and the weights' learned ``rounding``."""
    start = time.perf_counter()
    loader = session.correction_loader()
    rounds = quant.correct.act_bias_rounds

    def quantized_run(shifts: ChannelMeans, recorder: ShiftRecorder) -> None:
        with ModelQuantizer(session.model, quant, session.stats, shifts, plan=plan, rounding=rounding), recorder:
            evaluate(session, loader, "bca", check_outputs=False, compile=False)

    shifts = bias_shifts(session.layers, quantized_run, rounds, session.relu_fed(), session.dist.sum_tensors)
    log.info("-bca: mean shifts of %d layers measured on %d images in %.1f s (%d rounds)", len(shifts),
             len(loader.dataset), time.perf_counter() - start, rounds)
    return shifts


def predict_bias_shifts(session: Session, quant: QuantConfig, plan: list[LayerPlan] | None = None,
                        rounding: dict[str, torch.Tensor] | None = None) -> ChannelMeans:
    """DFQ's data-free bias correction: each layer's per-channel mean shift under ``quant``'s weights (with the
    learned ``rounding``), predicted from its input's BatchNorm statistics (``dfq_bias``), no image read."""
    expected = session.expected_inputs()
    originals = {layer.module_name: (layer.module.weight.detach().clone(),
                                     None if layer.module.bias is None else layer.module.bias.detach().clone())
                 for layer in session.layers if layer.module_name in expected}
    with ModelQuantizer(session.model, quant, session.stats, plan=plan, rounding=rounding):
        return data_free_shifts(session.layers, originals, expected)


def layer_order(session: Session, quant: QuantConfig) -> list[str]:
    """Layers quantized at ``quant.act.bits`` ordered by estimated quantization MSE, largest first (for the seed's
    layer selection); the MSE is the analytical one of each layer's method, relative to the layer's variance."""
    if session.stats is None:
        raise ValueError("layer selection orders layers by their statistics: collect them first and run with -sm use")
    specs = model_policy(quant, session.model, session.layers).specs(session.layers)
    return mse_order(session.layers, session.stats, specs, quant.act.sigma)


def dump(session: Session, loader: DataLoader, quant: QuantConfig, folder: Path) -> Path:
    """Save each layer's FP32 and quantized output for the first batch to ``folder`` (see ``dumps``)."""
    images, _ = next(iter(loader))
    images = images.to(session.device)
    fp32 = _record(session.model, session.layers, images)
    rounding = learned_rounding(session, quant).up if quant.rounding.learned else None
    with ModelQuantizer(session.model, quant, session.stats, rounding=rounding):
        quantized = _record(session.model, session.layers, images)
    folder.mkdir(parents=True, exist_ok=True)
    for name in fp32:
        write_dump(folder, name, fp32[name], quantized[name])
    return folder


def _record(model: nn.Module, layers, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Run one batch and copy every hooked layer's output (hooks registered last, so they see quantized values)."""
    seen: dict[str, np.ndarray] = {}
    handles = [
        layer.module.register_forward_hook(
            lambda m, i, o, name=layer.name: seen.__setitem__(name, o.detach().float().cpu().numpy().copy())
        )
        for layer in layers
    ]
    try:
        with torch.inference_mode():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def precision_sweep(session: Session, loader: DataLoader, record: Record, path: Path) -> pd.DataFrame:
    """FP32, then each activation width of ``sweep_bits`` (the seed's int8 .. int4) with the run's weights, one
    row each; with ``sweep_weight_bits`` every (weights, activations) pair, labelled ``W<w>A<a>``.  Each quantized
    row also says its agreement with the FP32 pass."""
    cfg = session.cfg
    reference = ReferenceLogits()
    measured = evaluate(session, loader, "fp32", keep=reference)
    entries = [("fp32", measured, record(measured, "fp32", None, None, file=path))]
    quant = cfg.quant()
    for weight_bits in cfg.sweep_weight_bits or (cfg.weight.bits,):
        for bits in cfg.sweep_bits:
            name = f"W{_width(weight_bits)}A{bits}" if cfg.sweep_weight_bits else f"int{bits}"
            measured, _ = quantized_pass(session, loader, quant.with_pass(bits, weight_bits), name, against=reference)
            entries.append((name, measured, record(measured, name, bits, weight_bits, file=path)))
    return pd.DataFrame(
        [{"precision": name, "qweight": row["qweight"], "qtype": row["qtype"],
          **{column: row[column] for column in ACCURACY_COLUMNS}, "images": m.acc.images} for name, m, row in entries]
    )


def _width(bits: int | None) -> str:
    return "32" if bits is None else str(bits)


def selection_counts(layers: int, step: int = 1) -> list[int]:
    """The k of a layer-selection sweep over ``layers`` layers: 0, step, 2 step, ... and always ``layers``."""
    return sorted({*range(0, layers + 1, step), layers})


def layer_selection(session: Session, loader: DataLoader, order: list[str], record: Record, path: Path,
                    method: str | None = None, against: ReferenceLogits | None = None) -> pd.DataFrame:
    """The seed's layer selection: keep the k layers with the largest estimated MSE (``order``, from
    ``layer_order``) at 8 bits, k = 0..L (every ``layer_selection_step``-th k and L); ``method`` replaces the
    run's clipping method (a comparison of methods)."""
    cfg = session.cfg
    out = []
    for k in selection_counts(len(order), cfg.layer_selection_step):
        kept = order[:k]
        quant = cfg.quant().with_pass(method=method, keep_8bit=frozenset(kept))
        measured, _ = quantized_pass(session, loader, quant, f"k={k}", against=against)
        row = record(measured, f"k={k}", cfg.act.bits, cfg.weight.bits, kept, file=path, method=method)
        out.append({"k": k, "added_layer": kept[-1] if kept else "", **{c: row[c] for c in ACCURACY_COLUMNS}})
    return pd.DataFrame(out)

