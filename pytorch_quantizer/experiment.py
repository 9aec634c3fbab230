"""The experiment passes behind ``inference_sim.py``: collect statistics, evaluate, sweep precisions, select layers,
dump activations.  Everything a run decides is data (``RunConfig`` in, CSV rows and files out)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from . import __version__
from .atomic import write_csv_atomic
from .bias_correction import ChannelMeans, ShiftRecorder, bias_shifts, check_biases
from .clipping import PRIORS
from .compiled import compile_model
from .data import (
    CACHE_MEMORY_FRACTION,
    CachedDataset,
    DataError,
    cache_budget,
    cache_bytes,
    imagenet_val_dataset,
    make_loader,
    relative_paths,
    wnid_folder_dataset,
)
from .distributed import DEFAULT_TIMEOUT_MINUTES, DistContext
from .dumps import write_dump
from .graph import relu_fed_layers
from .layers import activation_layers
from .models import build_model, fold_batchnorm, weights_fingerprint
from .observers import PER_CHANNEL
from .policy import BitAllocation, LayerPlan, channel_plan_table, mse_order, plan_table
from .quantizer import ActivationQuantizer, QuantConfig
from .stats import (
    COLLECTED_OBSERVERS,
    Statistics,
    StatisticsCollector,
    StatisticsError,
    folder_fingerprint,
    load_statistics,
)
from .weights import weight_corrections

log = logging.getLogger("pytorch_quantizer")

PRECISION_SWEEP = (8, 7, 6, 5, 4)
STATISTICS_ROOT = Path("~/asiq_data/statistics")
# What a results row measured, first; then every setting of the run (RunConfig, in field order) and its identity.
PASS_COLUMNS = ("arch", "weights", "pass", "qtype", "qweight", "threshold", "top1", "top5", "images", "seconds",
                "kept_8bit", "file")
IDENTITY_COLUMNS = ("weights_fingerprint", "stats_folder", "stats_fingerprint", "cal_images", "eval_images",
                    "settings", "version")
# Settings that cannot change any number or file content a run produces (only where its rows go and how it logs).
NOT_SHAPING = ("results", "print_freq", "world_size", "dist_timeout")


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
    edge_weight_bits: int | None = 8  # first conv and classifier weights when weight_bits is narrower
    threshold: str = "no"
    stats_mode: str = "no"  # collect | use | no
    stats_folder: Path | None = None
    preserve_zero: bool = False
    stochastic: bool = False
    hw_scale: bool = False
    per_channel_weights: bool = False
    weight_threshold: str = "no"  # -thw: clipping method of the weights ("no": their min/max)
    bias_correction: bool = False  # -bcw: restore each output channel's weight mean after quantization
    variance_correction: bool = False  # -vcw: restore each output channel's centred weight norm
    act_bias_correction: bool = False  # -bca: fold each channel's measured mean shift into its bias
    bca_rounds: int = 2  # measuring passes of -bca over the calibration images (bias_correction.py)
    half_range: bool = False  # one-sided grids for ReLU-fed outputs (the follow-up's -hr)
    act_point: str = "output"  # quantize each conv/linear's output (the seed) or its input
    per_channel_activations: bool = False  # -pcq_a: collect per-channel moments too / use per-channel grids
    alloc_activations: bool = False  # -baa: bit allocation over each activation's channels (needs -pcq_a)
    alloc_weights: bool = False  # -baw: bit allocation over each weight's output channels
    alloc_act_bits: float | None = None  # -bata: average bits of the allocated activations (None: the layer's)
    alloc_weight_bits: float | None = None  # -batw: average bits of the allocated weights (None: the layer's)
    alloc_mode: str = "round"  # -bam: round (quota kept exactly) or ceil (the follow-up's, may exceed it)
    alloc_prior: str | None = None  # -bap: laplace or gaus (None: the -th method's prior)
    sigma_estimator: str = "range"
    fold_bn: bool = True
    eval_precision: bool = False
    sweep_bits: tuple[int, ...] = PRECISION_SWEEP  # -ep's activation widths (-ep_a)
    sweep_weight_bits: tuple[int | None, ...] = ()  # -ep's weight widths (-ep_w); empty: -qw alone
    custom_test: bool = False
    ct_step: int = 1  # --ct_step: -ct evaluates k = 0, N, 2N, ... and L
    observers: tuple[str, ...] = COLLECTED_OBSERVERS  # --observers: what -sm collect gathers (per tensor)
    dump_dir: Path | None = None
    cal_set_size: int | None = None
    cal_data: Path | None = None  # statistics from this wnid folder instead of images of --data
    subset: int | None = None
    results: Path = Path("results/results.csv")
    cache: bool | None = None  # None: cache decoded images when several passes run over a small set
    compile: bool = False  # each pass under torch.compile (inference.compiled; use mode, round-to-nearest)
    world_size: int = 1  # processes torchrun started (each pass sharded over them; the numbers do not change)
    dist_timeout: float = DEFAULT_TIMEOUT_MINUTES  # how long a rank waits for a lost peer (torchrun only)
    compare: tuple[str, ...] = ()  # --compare: these methods, calibrated once, each at every width of compare_bits
    compare_bits: tuple[int, ...] = ()  # --qtype intA,intB,...: the activation widths --compare evaluates

    def statistics_path(self, fingerprint: str) -> Path:
        """``-sf``, or by default a folder keyed by architecture, weights fingerprint and BatchNorm folding, so that
        statistics of other weights never replace these."""
        if self.stats_folder is not None:
            return self.stats_folder.expanduser()
        name = f"{self.arch}-{fingerprint}" + ("" if self.fold_bn else "-unfolded")
        return (STATISTICS_ROOT / name).expanduser()

    @property
    def quantizes(self) -> bool:
        """Whether the run's own pass quantizes anything (activations or weights)."""
        return self.bits is not None or self.weight_bits is not None

    @property
    def needs_statistics(self) -> bool:
        """Use mode reads saved statistics only for passes that quantize activations."""
        return self.stats_mode == "use" and (self.bits is not None or self.eval_precision or self.custom_test
                                             or bool(self.compare))

    def allocation(self, target_bits: float | None) -> BitAllocation:
        """-baa / -baw settings: the prior from -bap, else from -th (laplace or gaus)."""
        prior = self.alloc_prior or (self.threshold if self.threshold in PRIORS else None)
        if prior is None:
            raise ValueError(f"bit allocation needs a prior for the channels' scales: give -bap laplace|gaus (-th "
                             f"{self.threshold} is not one)")
        return BitAllocation(prior, target_bits, self.alloc_mode, self.sigma_estimator)

    def quant_config(self, bits: int | None = None, keep_8bit: Iterable[str] = (),
                     weight_bits: int | None | str = "run", threshold: str | None = None) -> QuantConfig:
        """The quantizer's settings; ``bits`` / ``weight_bits`` override the run's widths for one pass of a sweep
        (``weight_bits`` None: float weights; "run": the run's ``-qw``), ``threshold`` replaces ``-th``
        (``--compare`` runs several methods)."""
        weight_bits = self.weight_bits if weight_bits == "run" else weight_bits
        return QuantConfig(
            bits=self.bits if bits is None else bits,
            threshold=self.threshold if threshold is None else threshold,
            weight_bits=weight_bits,
            bias_bits=weight_bits,
            edge_weight_bits=self.edge_weight_bits,
            weight_corrections=weight_corrections(self.bias_correction, self.variance_correction),
            weight_per_channel=self.per_channel_weights,
            weight_threshold=self.weight_threshold,
            preserve_zero=self.preserve_zero,
            stochastic=self.stochastic,
            pow2_scale=self.hw_scale,
            sigma_estimator=self.sigma_estimator,
            half_range=self.half_range,
            act_point=self.act_point,
            per_channel_activations=self.per_channel_activations,
            act_allocation=self.allocation(self.alloc_act_bits) if self.alloc_activations else None,
            weight_allocation=self.allocation(self.alloc_weight_bits) if self.alloc_weights else None,
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

    def __init__(self, cfg: RunConfig, dist: DistContext | None = None) -> None:
        """Validates everything a run needs (data, model, statistics, image sets) before any pass starts.

        ``dist`` (under torchrun, ``distributed.setup``): this process's rank; every pass then runs on the rank's
        shard and is reduced over the ranks (``run_pass``), statistics are gathered to rank 0 (``collect``)."""
        self.cfg = cfg
        self.dist = dist if dist is not None else DistContext()
        torch.manual_seed(cfg.seed)
        self.device = self.dist.device if self.dist.device is not None else torch.device(cfg.device)
        original, self.preprocess = build_model(cfg.arch, cfg.weights)
        decode = self.preprocess.decode_transform()
        self.dataset = imagenet_val_dataset(cfg.data, decode)
        self.cal_dataset = self.dataset
        if cfg.cal_data is not None:
            self.cal_dataset = wnid_folder_dataset(cfg.cal_data, decode, what="--cal-data folder")
        self.fingerprint = weights_fingerprint(original)
        self.stats_path = cfg.statistics_path(self.fingerprint)
        model, pairs = original, []
        if cfg.fold_bn:
            example = torch.randn(2, *self.preprocess.input_size, generator=torch.Generator().manual_seed(cfg.seed))
            model, pairs = fold_batchnorm(original, example)
        self.model = model.to(self.device).eval()
        # several GPUs: replicas share the hooks and parameters of self.model, which the quantizer edits
        self.runner: nn.Module = self.model
        if self.device.type == "cuda" and len(cfg.device_ids) > 1 and not self.dist.active:
            self.runner = nn.DataParallel(self.model, device_ids=list(cfg.device_ids))
        self.layers = activation_layers(self.model)
        self.calibration = self._calibration_indices()
        self.stats = self._load_statistics()
        if cfg.stats_mode != "collect":
            cfg.quant_config()  # bad allocation settings are refused before any pass runs
        if cfg.per_channel_activations and self.stats is not None and not self.stats.has_channel_moments:
            raise StatisticsError(f"-pcq_a needs per-channel statistics, but {self.stats.folder} holds per-tensor ones "
                                  "only; collect them with -sm collect -pcq_a")
        self.stats_fingerprint = folder_fingerprint(self.stats.folder) if self.stats is not None else ""
        self.evaluation = self._evaluation_indices() if cfg.stats_mode != "collect" else []
        self._correction: DataLoader | None = None
        self._relu_caps: dict[str, float | None] | None = None  # -bca: the layers that only feed a ReLU
        if cfg.act_bias_correction:
            check_biases(self.layers)
            self.dist.check_items(len(self._correction_images()[1]), cfg.batch_size, "-bca calibration")
        if cfg.stats_mode == "collect":
            self.dist.check_items(len(self.calibration), cfg.batch_size, "calibration")
        else:
            self.dist.check_items(len(self.evaluation), cfg.batch_size, "evaluation")
        log.info("%s on %s (%d CPU threads); %d BatchNorm layers folded", cfg.arch, self.device,
                 torch.get_num_threads(), len(pairs))

    # -- data ----------------------------------------------------------------------------------------------
    def _calibration_indices(self) -> list[int]:
        """The calibration images: ``-cs N`` drawn with the seed from the calibration folder (``--cal-data``, else
        ``--data``'s val), or all of them.  Asking for more images than the folder has is an error."""
        cfg, total = self.cfg, len(self.cal_dataset)
        if cfg.cal_set_size is None:
            return list(range(total))
        if cfg.cal_set_size > total:
            raise DataError(f"-cs {cfg.cal_set_size} asks for more calibration images than the "
                            f"{total} in {self.cal_dataset.root}")
        return sorted(self._seeded_order(total)[: cfg.cal_set_size])

    def _seeded_order(self, total: int) -> list[int]:
        """The one permutation of ``total`` images by ``--seed`` that calibration takes from the front of and
        evaluation from the end of."""
        return torch.randperm(total, generator=torch.Generator().manual_seed(self.cfg.seed)).tolist()

    def _evaluation_indices(self) -> list[int]:
        """The evaluation images: ``--data``'s val without the calibration images, ``--subset M`` of them drawn
        from the end of the seeded permutation (so ``-cs N --subset M`` give the images of the previous release).

        Left out: the ``-cs N`` images when they come from ``--data`` (so FP32 and quantized runs of one study see
        the same images), and in use mode also every image the statistics list as theirs when they were collected
        on this folder."""
        cfg, total = self.cfg, len(self.dataset)
        held_out: set[int] = set()
        if cfg.cal_set_size is not None and cfg.cal_data is None:
            held_out.update(self.calibration)
        if self.stats is not None:
            held_out.update(self._statistics_images())
        pool = [i for i in self._seeded_order(total) if i not in held_out]
        if not pool:
            raise DataError(f"no image of {self.dataset.root} is left to evaluate on: all {total} were used for "
                            "calibration; collect with a smaller -cs N, or calibrate on another folder with --cal-data")
        if cfg.subset is not None:
            if cfg.subset > len(pool):
                log.warning("asked for %d evaluation images but %d are left; using all of them", cfg.subset, len(pool))
            pool = pool[max(len(pool) - cfg.subset, 0):]
        pool.sort()
        log.info("evaluation: %d of the %d images in %s (%d held out for calibration)", len(pool), total,
                 self.dataset.root, len(held_out))
        return pool

    def _statistics_images(self) -> list[int]:
        """Indices in ``--data`` of the images the loaded statistics were collected on (when on this folder)."""
        record = self.stats.meta.get("calibration")
        if record is None:
            log.warning("the statistics in %s do not say which images they were collected on (an older release); "
                        "evaluation leaves out only the -cs images of this run", self.stats.folder)
            return []
        if record.get("folder") != str(Path(self.dataset.root).resolve()):
            return []
        names = set(self.stats.calibration_images())
        return [i for i, name in enumerate(relative_paths(self.dataset)) if name in names]

    def _correction_images(self) -> tuple[Dataset, list[int]]:
        """The images ``-bca`` measures its shifts on: those the loaded statistics were collected on (they are
        held out of evaluation), else this run's ``-cs`` / ``--cal-data`` calibration images."""
        cfg = self.cfg
        if self.stats is not None:
            record = self.stats.meta.get("calibration")
            if record is None:
                raise DataError(f"-bca measures on the calibration images, but the statistics in {self.stats.folder} "
                                "do not list theirs (an older release); collect them again")
            folder = Path(record["folder"])
            source = next((d for d in (self.cal_dataset, self.dataset) if Path(d.root).resolve() == folder), None)
            if source is None:
                source = wnid_folder_dataset(folder, self.preprocess.decode_transform(),
                                             what="folder the statistics were collected on")
            index = {name: i for i, name in enumerate(relative_paths(source))}
            names = self.stats.calibration_images()
            missing = [name for name in names if name not in index]
            if missing:
                raise DataError(f"-bca: {len(missing)} calibration images of {self.stats.folder} are no longer in "
                                f"{folder} (first: {missing[0]})")
            return source, sorted(index[name] for name in names)
        if cfg.cal_set_size is None and cfg.cal_data is None:
            raise DataError("-bca measures each layer's mean shift on calibration images held out of evaluation: "
                            "give -cs N or --cal-data DIR, or use statistics (-sm use)")
        return self.cal_dataset, self.calibration

    def loader(self, calibration: bool, passes: int = 1) -> DataLoader:
        source, indices = (self.cal_dataset, self.calibration) if calibration else (self.dataset, self.evaluation)
        return self._loader(source, indices, passes)

    def _loader(self, source: Dataset, indices: list[int], passes: int) -> DataLoader:
        """This rank's shard of ``indices`` in ``source`` (all of them in one process), cached for several passes."""
        cfg = self.cfg
        indices = [indices[i] for i in self.dist.shard(len(indices), cfg.batch_size)]
        dataset = source if len(indices) == len(source) else Subset(source, indices)
        budget = cache_budget()
        cache = cfg.cache
        if cache is None and passes > 1:
            estimate = cache_bytes(dataset)
            cache = estimate <= budget
            if not cache:
                log.info("%d passes over %d images decode them afresh each time: caching them would take about "
                         "%.0f MiB, over the %.0f MiB allowed (%.0f %% of the available memory)", passes,
                         len(dataset), estimate / 2**20, budget / 2**20, 100 * CACHE_MEMORY_FRACTION)
        normalize = self.preprocess.normalize_transform()
        if cache:
            dataset = CachedDataset(dataset, transform=normalize, workers=cfg.workers, max_bytes=max(budget, 1))
            return make_loader(dataset, cfg.batch_size, workers=0)
        return make_loader(_Mapped(dataset, normalize), cfg.batch_size, workers=cfg.workers)

    # -- passes --------------------------------------------------------------------------------------------
    def run_pass(self, loader: DataLoader, desc: str, check_outputs: bool = True, compile: bool = True
                 ) -> tuple[Accuracy, float]:
        """Top-1/top-5 over ``loader``; non-finite outputs stop the run (collect mode names the layer itself).

        With ``compile`` (and the run's ``--compile``) the model is compiled afresh for the hooks attached now; the
        time includes compiling.
        Under torchrun ``loader`` holds this rank's shard; the counts are summed over the ranks (exact integers),
        and a rank that fails stops every rank here (``DistContext.together``).  The progress bar shows rank 0's
        shard."""
        acc = Accuracy()
        start = time.perf_counter()
        with self.dist.together():
            runner = self.runner
            if self.cfg.compile and compile:
                torch.compiler.reset()  # drop the graphs traced with the previous pass's hooks
                runner = compile_model(self.runner)
            bar = tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                       disable=None if self.dist.is_main else True)
            with torch.inference_mode():
                for i, (images, target) in enumerate(bar):
                    self.dist.stop_if_peer_failed()
                    logits = runner(images.to(self.device, non_blocking=True))
                    if check_outputs and not torch.isfinite(logits).all():
                        raise FloatingPointError(
                            f"{desc}: the model produced non-finite outputs; run with -sm no to find the layer"
                        )
                    acc.add(logits.cpu(), target)
                    if self.cfg.print_freq and i % self.cfg.print_freq == 0:
                        bar.set_postfix(prec1=f"{acc.prec1:.2f}", prec5=f"{acc.prec5:.2f}")
        acc = Accuracy(*self.dist.sum_counts([acc.images, acc.top1, acc.top5]))
        return acc, time.perf_counter() - start

    def collect(self, observers: Iterable[str | tuple] | None = None, folder: Path | None = None
                ) -> tuple[Accuracy, float]:
        """FP32 pass over the calibration images with statistics hooks feeding ``observers`` (default: the run's
        ``--observers``, every observer of ``COLLECTED_OBSERVERS`` unless narrowed, and per-channel moments with
        ``-pcq_a``, in the same pass: one calibration serves every method); the folder (``folder``, default the
        run's) is replaced only on success."""
        devices = [f"cuda:{i}" for i in self.cfg.device_ids] if self.runner is not self.model else ()
        log.info("calibration: %d of the %d images in %s", len(self.calibration), len(self.cal_dataset),
                 self.cal_dataset.root)
        if observers is None:
            observers = (*self.cfg.observers,
                         *((("moments", PER_CHANNEL),) if self.cfg.per_channel_activations else ()))
        folder = self.stats_path if folder is None else folder
        with StatisticsCollector(self.model, devices=devices, point=self.cfg.act_point,
                                 observers=observers) as collector:
            if self.dist.active:  # every rank bins its histograms on the lattice of one process's first batch
                first = Subset(self.cal_dataset, self.calibration[: self.cfg.batch_size])
                images, _ = next(iter(make_loader(_Mapped(first, self.preprocess.normalize_transform()),
                                                  self.cfg.batch_size, workers=0)))
                with self.dist.together(), collector.priming(), torch.inference_mode():
                    self.runner(images.to(self.device))
            acc, seconds = self.run_pass(self.loader(calibration=True), "collect", check_outputs=False)
        if self.dist.active:  # every rank's per-sample rows to rank 0, in rank (= sample) order
            with self.dist.together():
                state = collector.state()
            states = self.dist.gather(state)
        with self.dist.together():  # the others wait here: rank 0 writing also ends every rank if it fails
            if self.dist.is_main:
                if self.dist.active:
                    collector.merge(states)
                self._save(collector, folder)
        return acc, seconds

    def _save(self, collector: StatisticsCollector, folder: Path) -> None:
        names = relative_paths(self.cal_dataset)
        images = [names[i] for i in self.calibration]
        meta = {**self.model_meta(), "calibration": {
            "folder": str(Path(self.cal_dataset.root).resolve()), "cal_set_size": self.cfg.cal_set_size}}
        collector.save(folder, meta, calibration=images)
        self.stats_fingerprint = folder_fingerprint(folder)
        log.info("statistics of %d images saved to %s", collector.samples, folder)

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
                log.info("no --qtype: activations stay in float, no statistics are used")
            return None
        stats = load_statistics(self.stats_path)
        expected = {k: v for k, v in self.model_meta().items() if k in ("arch", "fingerprint", "bn_folded")}
        stats.check_model(expected)
        stats.check_layers(self.layers)
        return stats

    def use_statistics(self, stats: Statistics) -> None:
        """Adopt statistics collected in this run (``--compare`` calibrates, then evaluates): evaluation then
        leaves out the images they list, as in use mode."""
        self.stats = stats
        self.stats_fingerprint = folder_fingerprint(stats.folder)
        self.evaluation = self._evaluation_indices()

    def quantized_pass(
        self, loader: DataLoader, quant: QuantConfig, stats: Statistics | None, desc: str,
        plan: list[LayerPlan] | None = None,
    ) -> tuple[Accuracy, float, ActivationQuantizer]:
        """One evaluation pass with ``quant``; ``plan`` (from ``plan_layers`` for this config) is used as given."""
        if quant.stochastic and self.dist.rank > 0:  # rank 0 keeps the seed's stream, the others their own
            quant = replace(quant, seed=rank_seed(quant.seed, self.dist.rank))
        shifts = None
        if self.cfg.act_bias_correction:
            if plan is None and stats is not None:  # the plan does not depend on the shifts: one for every round
                plan = ActivationQuantizer(self.model, quant, stats).plan
            shifts = self.bias_shifts(quant, stats, plan)
        quantizer = ActivationQuantizer(self.model, quant, stats, shifts, plan=plan)
        with quantizer:
            acc, seconds = self.run_pass(loader, desc)
        return acc, seconds, quantizer

    def bias_shifts(self, quant: QuantConfig, stats: Statistics | None, plan: list[LayerPlan] | None = None
                    ) -> ChannelMeans:
        """``-bca``: each layer's per-channel mean shift under ``quant``, measured on the calibration images in
        ``bca_rounds`` quantized passes (``bias_correction``), each with ``plan`` (the activation grids, which the
        shifts do not change) when given."""
        start = time.perf_counter()
        if self._correction is None:
            self._correction = self._loader(*self._correction_images(), passes=2)
        loader = self._correction

        def quantized_run(shifts: ChannelMeans, recorder: ShiftRecorder) -> None:
            with ActivationQuantizer(self.model, quant, stats, shifts, plan=plan), recorder:
                self.run_pass(loader, "bca", check_outputs=False, compile=False)

        if self._relu_caps is None:  # the graph does not change between passes: traced once per run
            example = torch.randn(2, *self.preprocess.input_size,
                                  generator=torch.Generator().manual_seed(self.cfg.seed))
            self._relu_caps = relu_fed_layers(self.model, example.to(self.device))
        shifts = bias_shifts(self.layers, quantized_run, self.cfg.bca_rounds, self._relu_caps, self.dist.sum_tensors)
        log.info("-bca: mean shifts of %d layers measured on %d images in %.1f s (%d rounds)", len(shifts),
                 len(loader.dataset), time.perf_counter() - start, self.cfg.bca_rounds)
        return shifts

    def mse_order(self, stats: Statistics | None, bits: int, threshold: str | None = None) -> list[str]:
        """Layers quantized at ``bits`` ordered by estimated quantization MSE, largest first (for ``-ct``).

        The MSE is the analytical one for the chosen clipping, relative to the layer's variance so that layers of
        different scales compare; it needs saved statistics (``-sm use``).
        """
        if stats is None:
            raise ValueError("-ct orders layers by their statistics: collect them first and run with -sm use")
        policy = self.cfg.quant_config(bits, threshold=threshold).policy(self.model)
        return mse_order(self.layers, stats, policy, self.cfg.sigma_estimator)

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


def rank_seed(seed: int, rank: int) -> int:
    """The stochastic-rounding seed of ``rank`` > 0 under torchrun: a stream of its own (60 bits of sha256 of
    seed and rank), so that shards do not repeat each other's noise.  One process draws the noise of all batches
    from one stream, so ``-s`` results depend on the world size (equally random, reproducible for each)."""
    return int(hashlib.sha256(f"{seed}/{rank}".encode()).hexdigest()[:15], 16)


def append_result(path: Path, row: dict) -> None:
    """Append one row to the results CSV (rewritten atomically, so an interrupted run cannot truncate it).

    Rows of older releases lack some columns (left empty); a new column is added to every row."""
    frame = pd.DataFrame([row])
    if path.exists():
        frame = pd.concat([pd.read_csv(path, keep_default_na=False, dtype=str), frame.astype(str)],
                          ignore_index=True).fillna("")
    write_csv_atomic(frame, path)


def final_line(acc: Accuracy) -> str:
    """The seed's closing line, exactly."""
    return f" * Prec@1 {acc.prec1:.3f} Prec@5 {acc.prec5:.3f}"


def _qtype(bits: int | None) -> str:
    return "fp32" if bits is None else f"int{bits}"


def _cell(value: Any) -> Any:
    """A config value as a CSV cell: paths and tuples as text, None as empty."""
    if value is None:
        return ""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return value


def config_columns(cfg: RunConfig) -> dict[str, Any]:
    """Every setting of the run, from the validated configuration itself (no hand-kept list).  ``bits`` and
    ``weight_bits`` are the ``qtype`` / ``qweight`` of each row's pass."""
    return {f.name: _cell(getattr(cfg, f.name)) for f in fields(cfg) if f.name not in ("bits", "weight_bits")}


def settings_hash(cfg: RunConfig, weights_fingerprint: str, stats_fingerprint: str) -> str:
    """Eight hex digits of sha256 over every setting that can shape a run's numbers or files, with the weights'
    and the statistics' fingerprints: the suffix of the files the run writes, so that runs that differ in any of
    them never overwrite each other's files, and identical runs write identical files."""
    shaping = {k: v for k, v in asdict(cfg).items() if k not in NOT_SHAPING}
    text = json.dumps([shaping, weights_fingerprint, stats_fingerprint], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run(cfg: RunConfig, dist: DistContext | None = None) -> list[dict]:
    """Carry out one invocation; returns the result rows it appended (the last one is the headline).

    Under torchrun (``dist`` from ``distributed.setup``) every rank runs this with the same configuration, each
    pass on its shard; only rank 0 prints, appends rows and writes files (the others return the same rows without
    writing them)."""
    dist = dist if dist is not None else DistContext()
    with dist.together():
        dist.claim_device()
        exp = Experiment(cfg, dist)
    rows: list[dict] = []
    out = cfg.results.parent
    settings = settings_hash(cfg, exp.fingerprint, exp.stats_fingerprint)

    def identity() -> dict:
        collected = cfg.stats_mode == "collect"
        stats_folder = exp.stats_path if collected or exp.stats is not None else ""
        cal_images = len(exp.calibration) if collected else exp.stats.meta["images"] if exp.stats is not None else 0
        return {
            "weights_fingerprint": exp.fingerprint, "stats_folder": str(stats_folder),
            "stats_fingerprint": exp.stats_fingerprint, "cal_images": cal_images,
            "eval_images": len(exp.evaluation), "settings": settings, "version": __version__,
        }

    def record(acc: Accuracy, seconds: float, name: str, bits: int | None, weight_bits: int | None,
               kept: Iterable[str] = (), file: Path | None = None, threshold: str | None = None) -> dict:
        row = {
            "arch": cfg.arch, "weights": cfg.weights, "pass": name, "qtype": _qtype(bits),
            "qweight": _qtype(weight_bits), "threshold": cfg.threshold if threshold is None else threshold,
            "top1": round(acc.prec1, 3),
            "top5": round(acc.prec5, 3), "images": acc.images, "seconds": round(seconds, 2),
            "kept_8bit": " ".join(kept), "file": "" if file is None else str(file),
        }
        row.update({k: v for k, v in config_columns(cfg).items() if k not in row})
        row.update(identity())
        if dist.is_main:
            append_result(cfg.results, row)
        rows.append(row)
        return row

    if cfg.compare:
        from .compare import run_compare

        run_compare(exp, record, settings)
        return rows

    if cfg.stats_mode == "collect":
        acc, seconds = exp.collect()
        record(acc, seconds, "collect", None, None, file=exp.stats_path)
        _say(dist, final_line(acc))
        return rows

    stats = exp.stats
    passes = 1 + (len(cfg.sweep_bits) * max(len(cfg.sweep_weight_bits), 1) if cfg.eval_precision else 0)
    order = exp.mse_order(stats, cfg.bits) if cfg.custom_test else []
    passes += len(ct_counts(len(order), cfg.ct_step)) if cfg.custom_test else 0
    loader = exp.loader(calibration=False, passes=passes)

    if cfg.dump_dir is not None:
        with dist.together():  # rank 0's first batch is the first batch of one process
            if dist.is_main:
                folder = exp.dump(loader, cfg.quant_config(), stats)
                log.info("activations of one batch dumped to %s", folder)

    if cfg.eval_precision:
        path = out / "precision" / f"{cfg.arch}_{cfg.threshold}_clipping_{settings}.csv"
        _publish(dist, _precision_sweep(exp, loader, stats, record, path), path, "precision")
        return rows

    if cfg.custom_test:
        path = out / "custom_test" / f"{cfg.arch}_{_qtype(cfg.bits)}_{cfg.threshold}_{settings}.csv"
        _publish(dist, _custom_test(exp, loader, stats, order, record, path), path, "layer-selection")
        return rows

    if not cfg.quantizes:
        acc, seconds = exp.run_pass(loader, "fp32")
        record(acc, seconds, "fp32", None, None)
        _say(dist, final_line(acc))
        return rows

    acc, seconds, quantizer = exp.quantized_pass(loader, cfg.quant_config(), stats, _qtype(cfg.bits))
    plan_path = None
    if quantizer.plan is not None:
        plan_path = out / "plans" / f"{cfg.arch}_{_qtype(cfg.bits)}_{cfg.threshold}_{settings}.csv"
        if dist.is_main:  # the same plan on every rank
            write_csv_atomic(plan_table(quantizer.plan), plan_path, index=True)
            log.info("per-layer plan written to %s", plan_path)
            if any(p.channels for p in quantizer.plan):
                channel_path = plan_path.with_name(f"{plan_path.stem}_channels.csv")
                write_csv_atomic(channel_plan_table(quantizer.plan), channel_path)
                log.info("per-channel plan written to %s", channel_path)
    record(acc, seconds, _qtype(cfg.bits), cfg.bits, cfg.weight_bits, file=plan_path)
    _say(dist, final_line(acc))
    return rows


def _say(dist: DistContext, text: str) -> None:
    """Print on rank 0 only (one process: always)."""
    if dist.is_main:
        print(text, flush=True)


def _publish(dist: DistContext, table: pd.DataFrame, path: Path, what: str) -> None:
    if not dist.is_main:
        return
    write_csv_atomic(table, path)
    print(table.to_string(index=False), flush=True)
    log.info("%s table written to %s", what, path)


def _precision_sweep(exp: Experiment, loader: DataLoader, stats: Statistics | None, record, path: Path
                     ) -> pd.DataFrame:
    """FP32, then each activation width of ``sweep_bits`` (the seed's int8 .. int4) with the weights at -qw, one
    row each; with ``sweep_weight_bits`` every (weights, activations) pair, labelled ``W<w>A<a>``."""
    cfg = exp.cfg
    acc, seconds = exp.run_pass(loader, "fp32")
    entries = [("fp32", acc, record(acc, seconds, "fp32", None, None, file=path))]
    for weight_bits in cfg.sweep_weight_bits or (cfg.weight_bits,):
        for bits in cfg.sweep_bits:
            name = f"W{_width(weight_bits)}A{bits}" if cfg.sweep_weight_bits else f"int{bits}"
            acc, seconds, _ = exp.quantized_pass(loader, cfg.quant_config(bits, weight_bits=weight_bits), stats, name)
            entries.append((name, acc, record(acc, seconds, name, bits, weight_bits, file=path)))
    return pd.DataFrame(
        [{"precision": name, "qweight": row["qweight"], "qtype": row["qtype"], "top1": row["top1"],
          "top5": row["top5"], "images": acc.images} for name, acc, row in entries]
    )


def _width(bits: int | None) -> str:
    return "32" if bits is None else str(bits)


def ct_counts(layers: int, step: int = 1) -> list[int]:
    """The k of a ``-ct`` sweep over ``layers`` layers: 0, step, 2 step, ... and always ``layers`` (all at 8 bits)."""
    return sorted({*range(0, layers + 1, step), layers})


def _custom_test(exp: Experiment, loader: DataLoader, stats: Statistics | None, order: list[str], record,
                 path: Path, threshold: str | None = None) -> pd.DataFrame:
    """The seed's layer selection: keep the k layers with the largest estimated MSE (``order``, from
    ``Experiment.mse_order``) at 8 bits, k = 0..L (every ``--ct_step``-th k and L); ``threshold`` replaces ``-th``
    (``-ct --compare``)."""
    out = []
    for k in ct_counts(len(order), exp.cfg.ct_step):
        kept = order[:k]
        quant = exp.cfg.quant_config(keep_8bit=kept, threshold=threshold)
        acc, seconds, _ = exp.quantized_pass(loader, quant, stats, f"k={k}")
        row = record(acc, seconds, f"k={k}", exp.cfg.bits, exp.cfg.weight_bits, kept, file=path, threshold=threshold)
        out.append({"k": k, "added_layer": kept[-1] if kept else "", "top1": row["top1"], "top5": row["top5"]})
    return pd.DataFrame(out)

