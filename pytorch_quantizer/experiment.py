"""The experiment passes behind ``inference_sim.py``: collect statistics, evaluate, sweep precisions, select layers,
dump activations.  Everything a run decides is data (``RunConfig`` in, CSV rows and files out)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from . import __version__
from .atomic import write_csv_atomic
from .compiled import compile_model
from .data import CachedDataset, imagenet_val_dataset, make_loader
from .dumps import write_dump
from .layers import activation_layers
from .models import build_model, fold_batchnorm, weights_fingerprint
from .policy import mse_order, plan_table
from .quantizer import ActivationQuantizer, QuantConfig
from .stats import Statistics, StatisticsCollector, load_statistics

log = logging.getLogger("pytorch_quantizer")

PRECISION_SWEEP = (8, 7, 6, 5, 4)
RESULT_COLUMNS = (
    "arch", "weights", "qtype", "qweight", "threshold", "stats_mode", "stats_folder", "images", "top1", "top5",
    "seconds", "version", "bn_folded", "preserve_zero", "stochastic", "hw_scale", "kept_8bit", "seed", "compiled",
)


@dataclass(frozen=True)
class RunConfig:
    """One invocation of the driver, validated by the CLI."""

    data: Path
    arch: str
    weights: str = "DEFAULT"
    workers: int = 2
    batch_size: int = 256
    print_freq: int = 10
    seed: int = 0
    device: str = "cpu"
    device_ids: tuple[int, ...] = ()
    bits: int | None = None  # activations; None: float (the seed's default, no --qtype)
    weight_bits: int | None = 8  # None: float weights
    threshold: str = "no"
    stats_mode: str = "no"  # collect | use | no
    stats_folder: Path | None = None
    preserve_zero: bool = False
    stochastic: bool = False
    hw_scale: bool = False
    per_channel_weights: bool = False
    sigma_estimator: str = "range"
    fold_bn: bool = True
    eval_precision: bool = False
    custom_test: bool = False
    dump_dir: Path | None = None
    cal_set_size: int | None = None
    subset: int | None = None
    results: Path = Path("results/results.csv")
    cache: bool | None = None  # None: cache decoded images when several passes run over a small set
    compile: bool = False  # each pass under torch.compile (inference.compiled; use mode, round-to-nearest)

    @property
    def statistics_path(self) -> Path:
        return (self.stats_folder or Path("~/asiq_data/statistics") / self.arch).expanduser()

    @property
    def quantizes(self) -> bool:
        """Whether the run's own pass quantizes anything (activations or weights)."""
        return self.bits is not None or self.weight_bits is not None

    @property
    def needs_statistics(self) -> bool:
        """Use mode reads saved statistics only for passes that quantize activations."""
        return self.stats_mode == "use" and (self.bits is not None or self.eval_precision or self.custom_test)

    def quant_config(self, bits: int | None = None, keep_8bit: Iterable[str] = ()) -> QuantConfig:
        return QuantConfig(
            bits=self.bits if bits is None else bits,
            threshold=self.threshold,
            weight_bits=self.weight_bits,
            bias_bits=self.weight_bits,
            weight_per_channel=self.per_channel_weights,
            preserve_zero=self.preserve_zero,
            stochastic=self.stochastic,
            pow2_scale=self.hw_scale,
            sigma_estimator=self.sigma_estimator,
            keep_8bit=frozenset(keep_8bit),
            seed=self.seed,
        )


@dataclass
class Accuracy:
    images: int = 0
    top1: int = 0
    top5: int = 0

    def add(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        k = min(5, logits.shape[1])
        best = logits.topk(k, dim=1).indices
        hits = best.eq(target.view(-1, 1))
        self.images += target.numel()
        self.top1 += int(hits[:, 0].sum())
        self.top5 += int(hits.any(dim=1).sum())

    @property
    def prec1(self) -> float:
        return 100.0 * self.top1 / max(self.images, 1)

    @property
    def prec5(self) -> float:
        return 100.0 * self.top5 / max(self.images, 1)


class Experiment:
    """Model, data and the passes of one run."""

    def __init__(self, cfg: RunConfig) -> None:
        """Validates everything a run needs (data, model, statistics) before any pass starts."""
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)
        original, self.preprocess = build_model(cfg.arch, cfg.weights)
        self.dataset = imagenet_val_dataset(cfg.data, self.preprocess.decode_transform())
        self._order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(cfg.seed))
        self.fingerprint = weights_fingerprint(original)
        model, pairs = original, []
        if cfg.fold_bn:
            example = torch.randn(2, *self.preprocess.input_size, generator=torch.Generator().manual_seed(cfg.seed))
            model, pairs = fold_batchnorm(original, example)
        self.model = model.to(self.device).eval()
        # several GPUs: replicas share the hooks and parameters of self.model, which the quantizer edits
        self.runner: nn.Module = self.model
        if self.device.type == "cuda" and len(cfg.device_ids) > 1:
            self.runner = nn.DataParallel(self.model, device_ids=list(cfg.device_ids))
        self.layers = activation_layers(self.model)
        self.stats = self._load_statistics()
        log.info("%s on %s (%d CPU threads); %d images in %s; %d BatchNorm layers folded", cfg.arch, self.device,
                 torch.get_num_threads(), len(self.dataset), cfg.data, len(pairs))

    # -- data ----------------------------------------------------------------------------------------------
    def _subset(self, n: int | None, from_end: bool) -> Dataset:
        """Deterministic subsets: calibration from the front of one seeded permutation, evaluation from its end,
        so ``-cs N --subset M`` never share an image when N + M <= the number of images."""
        total = len(self.dataset)
        if n is None or n >= total:
            if n is not None and n > total:
                log.warning("asked for %d images but %s has %d; using all of them", n, self.cfg.data, total)
            return self.dataset
        indices = self._order[total - n:] if from_end else self._order[:n]
        return Subset(self.dataset, sorted(indices.tolist()))

    def loader(self, calibration: bool, passes: int = 1) -> DataLoader:
        cfg = self.cfg
        dataset = self._subset(cfg.cal_set_size if calibration else cfg.subset, from_end=not calibration)
        cache = cfg.cache if cfg.cache is not None else passes > 1 and len(dataset) <= 5000
        normalize = self.preprocess.normalize_transform()
        if cache:
            dataset = CachedDataset(dataset, transform=normalize, workers=cfg.workers)
            return make_loader(dataset, cfg.batch_size, workers=0)
        return make_loader(_Mapped(dataset, normalize), cfg.batch_size, workers=cfg.workers)

    # -- passes --------------------------------------------------------------------------------------------
    def run_pass(self, loader: DataLoader, desc: str, check_outputs: bool = True) -> tuple[Accuracy, float]:
        """Top-1/top-5 over ``loader``; non-finite outputs stop the run (collect mode names the layer itself).

        With ``compile`` the model is compiled afresh for the hooks attached now; the time includes compiling."""
        acc = Accuracy()
        start = time.perf_counter()
        runner = self.runner
        if self.cfg.compile:
            torch.compiler.reset()  # drop the graphs traced with the previous pass's hooks
            runner = compile_model(self.runner)
        bar = tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=None)
        with torch.inference_mode():
            for i, (images, target) in enumerate(bar):
                logits = runner(images.to(self.device, non_blocking=True))
                if check_outputs and not torch.isfinite(logits).all():
                    raise FloatingPointError(
                        f"{desc}: the model produced non-finite outputs; run with -sm no to find the layer"
                    )
                acc.add(logits.cpu(), target)
                if self.cfg.print_freq and i % self.cfg.print_freq == 0:
                    bar.set_postfix(prec1=f"{acc.prec1:.2f}", prec5=f"{acc.prec5:.2f}")
        return acc, time.perf_counter() - start

    def collect(self) -> tuple[Accuracy, float]:
        """FP32 pass over the calibration images with statistics hooks; the folder is replaced only on success."""
        devices = [f"cuda:{i}" for i in self.cfg.device_ids] if self.runner is not self.model else ()
        with StatisticsCollector(self.model, devices=devices) as collector:
            acc, seconds = self.run_pass(self.loader(calibration=True), "collect", check_outputs=False)
        collector.save(self.cfg.statistics_path, self.model_meta())
        log.info("statistics of %d images saved to %s", collector.samples, self.cfg.statistics_path)
        return acc, seconds

    def model_meta(self) -> dict:
        return {
            "arch": self.cfg.arch,
            "weights": self.cfg.weights,
            "fingerprint": self.fingerprint,
            "bn_folded": self.cfg.fold_bn,
            "seed": self.cfg.seed,
            "version": __version__,
        }

    def _load_statistics(self) -> Statistics | None:
        if not self.cfg.needs_statistics:
            if self.cfg.stats_mode == "use":
                log.info("no --qtype: activations stay in float, the statistics in %s are not used",
                         self.cfg.statistics_path)
            return None
        stats = load_statistics(self.cfg.statistics_path)
        expected = {k: v for k, v in self.model_meta().items() if k in ("arch", "fingerprint", "bn_folded")}
        stats.check_model(expected)
        stats.check_layers(self.layers)
        return stats

    def quantized_pass(
        self, loader: DataLoader, quant: QuantConfig, stats: Statistics | None, desc: str
    ) -> tuple[Accuracy, float, ActivationQuantizer]:
        quantizer = ActivationQuantizer(self.model, quant, stats)
        with quantizer:
            acc, seconds = self.run_pass(loader, desc)
        return acc, seconds, quantizer

    def mse_order(self, stats: Statistics | None, bits: int) -> list[str]:
        """Layers quantized at ``bits`` ordered by estimated quantization MSE, largest first (for ``-ct``).

        The MSE is the analytical one for the chosen clipping, relative to the layer's variance so that layers of
        different scales compare; it needs saved statistics (``-sm use``).
        """
        if stats is None:
            raise ValueError("-ct orders layers by their statistics: collect them first and run with -sm use")
        return mse_order(self.layers, stats, self.cfg.quant_config(bits).policy(), self.cfg.sigma_estimator)

    def dump(self, loader: DataLoader, quant: QuantConfig, stats: Statistics | None) -> Path:
        """Save each layer's FP32 and quantized output for the first batch to ``dump_dir`` (see ``dumps``)."""
        images, _ = next(iter(loader))
        images = images.to(self.device)
        fp32 = _record(self.model, self.layers, images)
        quantizer = ActivationQuantizer(self.model, quant, stats)
        with quantizer:
            quantized = _record(self.model, self.layers, images)
        folder = self.cfg.dump_dir
        folder.mkdir(parents=True, exist_ok=True)
        for name in fp32:
            write_dump(folder, name, fp32[name], quantized[name])
        return folder


class _Mapped(Dataset):
    """Applies a tensor transform to the first item of each sample (decode → normalize split)."""

    def __init__(self, dataset: Dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        return self.transform(image), target


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


def append_result(path: Path, row: dict) -> None:
    """Append one row to the results CSV (rewritten atomically, so an interrupted run cannot truncate it)."""
    frame = pd.DataFrame([{col: row.get(col, "") for col in RESULT_COLUMNS}])
    if path.exists():
        frame = pd.concat([pd.read_csv(path, keep_default_na=False), frame], ignore_index=True)
    write_csv_atomic(frame, path)


def final_line(acc: Accuracy) -> str:
    """The seed's closing line, exactly."""
    return f" * Prec@1 {acc.prec1:.3f} Prec@5 {acc.prec5:.3f}"


def _qtype(bits: int | None) -> str:
    return "fp32" if bits is None else f"int{bits}"


def run(cfg: RunConfig) -> list[dict]:
    """Carry out one invocation; returns the result rows it appended (the last one is the headline)."""
    exp = Experiment(cfg)
    rows: list[dict] = []

    def record(acc: Accuracy, seconds: float, bits: int | None, mode: str, kept: Iterable[str] = (),
               weight_bits: int | None = cfg.weight_bits) -> dict:
        row = {
            "arch": cfg.arch, "weights": cfg.weights, "qtype": _qtype(bits),
            "qweight": _qtype(weight_bits), "threshold": cfg.threshold,
            "stats_mode": mode, "stats_folder": str(cfg.statistics_path) if mode in ("collect", "use") else "",
            "images": acc.images, "top1": round(acc.prec1, 3), "top5": round(acc.prec5, 3),
            "seconds": round(seconds, 2), "version": __version__, "bn_folded": cfg.fold_bn,
            "preserve_zero": cfg.preserve_zero, "stochastic": cfg.stochastic, "hw_scale": cfg.hw_scale,
            "kept_8bit": " ".join(kept), "seed": cfg.seed, "compiled": cfg.compile,
        }
        append_result(cfg.results, row)
        rows.append(row)
        return row

    if cfg.stats_mode == "collect":
        acc, seconds = exp.collect()
        record(acc, seconds, None, "collect", weight_bits=None)
        print(final_line(acc), flush=True)
        return rows

    stats = exp.stats
    passes = 1 + (len(PRECISION_SWEEP) if cfg.eval_precision else 0)
    if cfg.custom_test:
        passes += len(exp.mse_order(stats, cfg.bits)) + 1
    loader = exp.loader(calibration=False, passes=passes)

    if cfg.dump_dir is not None:
        folder = exp.dump(loader, cfg.quant_config(), stats)
        log.info("activations of one batch dumped to %s", folder)

    if cfg.eval_precision:
        table = _precision_sweep(exp, loader, stats, record)
        _publish(table, cfg.results.parent / "precision" / f"{cfg.arch}_{cfg.threshold}_clipping.csv", "precision")
        return rows

    if cfg.custom_test:
        table = _custom_test(exp, loader, stats, record)
        name = f"{cfg.arch}_{_qtype(cfg.bits)}_{cfg.threshold}.csv"
        _publish(table, cfg.results.parent / "custom_test" / name, "layer-selection")
        return rows

    if not cfg.quantizes:
        acc, seconds = exp.run_pass(loader, "fp32")
        record(acc, seconds, None, "fp32")
        print(final_line(acc), flush=True)
        return rows

    acc, seconds, quantizer = exp.quantized_pass(loader, cfg.quant_config(), stats, _qtype(cfg.bits))
    if quantizer.plan is not None:
        plan_path = cfg.results.parent / "plans" / f"{cfg.arch}_{_qtype(cfg.bits)}_{cfg.threshold}.csv"
        write_csv_atomic(plan_table(quantizer.plan), plan_path, index=True)
        log.info("per-layer plan written to %s", plan_path)
    record(acc, seconds, cfg.bits, cfg.stats_mode)
    print(final_line(acc), flush=True)
    return rows


def _publish(table: pd.DataFrame, path: Path, what: str) -> None:
    write_csv_atomic(table, path)
    print(table.to_string(index=False), flush=True)
    log.info("%s table written to %s", what, path)


def _precision_sweep(exp: Experiment, loader: DataLoader, stats: Statistics | None, record) -> pd.DataFrame:
    """FP32, then int8 .. int4 activations (weights at -qw), one row each."""
    acc, seconds = exp.run_pass(loader, "fp32")
    entries = [("fp32", acc, record(acc, seconds, None, "fp32", weight_bits=None))]
    for bits in PRECISION_SWEEP:
        acc, seconds, _ = exp.quantized_pass(loader, exp.cfg.quant_config(bits), stats, f"int{bits}")
        entries.append((f"int{bits}", acc, record(acc, seconds, bits, exp.cfg.stats_mode)))
    return pd.DataFrame(
        [{"precision": name, "top1": row["top1"], "top5": row["top5"], "images": acc.images} for name, acc, row in
         entries]
    )


def _custom_test(exp: Experiment, loader: DataLoader, stats: Statistics | None, record) -> pd.DataFrame:
    """The seed's layer selection: keep the k layers with the largest estimated MSE at 8 bits, k = 0..L."""
    order = exp.mse_order(stats, exp.cfg.bits)
    out = []
    for k in range(len(order) + 1):
        kept = order[:k]
        quant = exp.cfg.quant_config(keep_8bit=kept)
        acc, seconds, _ = exp.quantized_pass(loader, quant, stats, f"k={k}")
        row = record(acc, seconds, exp.cfg.bits, exp.cfg.stats_mode, kept)
        out.append({"k": k, "added_layer": kept[-1] if kept else "", "top1": row["top1"], "top5": row["top5"]})
    return pd.DataFrame(out)

