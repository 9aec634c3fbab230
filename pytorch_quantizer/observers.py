"""Observers: one small class per thing a clipping method needs to see of a layer's output during calibration.

An observer is fed every output of its layer during the one calibration pass (``update``), keeps what it needs
(on the activation's device, so that the pass never waits for the host), writes it into a statistics folder
(``export``) and reads it back (``load``).  A clipping method declares the observers it requires by name; the
statistics folder lists the observers it holds, so a method whose observer was not collected is refused with a
message naming what to collect.

Each observer has a ``Granularity``: per tensor (one set of values per sample) or per channel along an axis (one
set per sample and channel).  ``MomentsObserver`` is the seed's statistics (min, max, mean, std, kurtosis, mean
|x|, Laplace b of each sample; the fused kernels compute them); its per-tensor export is the statistics folder's
CSV layout of the previous releases, byte for byte.  New observers (histograms, ...) are a class here plus
``register_observer``.

Distributed collect (``torchrun``, see ``distributed``): each rank observes a contiguous shard of the calibration
images; rank 0 gathers every rank's ``state()`` (in rank order, which is sample order) and ``merge``s them into
its own observer before ``export``.  A new observer must provide both: ``state`` a picklable CPU object of what it
saw on this rank, ``merge`` the state one process would have after seeing all the ranks' samples in that order
(per-sample rows concatenated; integer counts summed over one shared binning; never a float sum that one process
would have accumulated in another order), and ``export`` must compute anything over samples (summaries) from the
merged state.  Without them the observer still collects in one process; under torchrun it fails with a message.

``Observation`` is what a method sees of one layer: the reduced moments (the seed took the mean over samples),
the extreme range, per-channel moments where collected, and the state of any other observer by name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch

from .backends import kernel_module
from .clipping import TensorStats
from .layers import check_finite

STAT_COLUMNS = ("min", "max", "mean", "std", "kurtosis", "mean_abs", "b")
SUMMARY_COLUMNS = (*STAT_COLUMNS, "range")
REDUCTIONS = ("min", "mean", "max")
POOLED = "pooled"  # per channel: the statistics of the channel over all calibration images together
CSV_FLOAT_FORMAT = "%.9g"


class ObserverError(ValueError):
    """Observer files that are missing or malformed, or an observer that is not known."""


# -- the moments kernel ------------------------------------------------------------------------------------
def _stats_kernel(flat: torch.Tensor):
    """The compiled ``per_sample_stats`` for ``flat``'s device (CPU or CUDA) when it is built and applies
    (float32, non-empty), else None."""
    if flat.dtype != torch.float32 or flat.device.type not in ("cpu", "cuda") or flat.numel() == 0:
        return None
    module = kernel_module(flat.device.type)
    return getattr(module, "per_sample_stats", None) if module is not None else None


def per_sample_stats(x: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """``[batch, 7]`` float64 statistics of each sample of an activation (on its device), columns ``STAT_COLUMNS``.

    Moments are computed in float32 over each sample (as the activations are) and returned as float64.
    Kurtosis is Pearson's (3 for a Gaussian, 6 for a Laplace); a constant sample has std 0 and kurtosis 0.
    float32 tensors go to the fused kernel of their device when it is built (kernels/stats_math.h: two reads
    per sample, float partial sums accumulated in float64; deterministic, the CPU one for any thread count);
    other tensors, missing builds and ``fused=False`` use the PyTorch reductions below.  The CPU and CUDA
    kernels sum in different orders, so their results differ in the last bits.
    """
    flat = x.detach().reshape(x.shape[0], -1)
    if not flat.is_floating_point():
        raise TypeError(f"activation statistics need a floating-point tensor, got {flat.dtype}")
    kernel = _stats_kernel(flat) if fused else None
    if kernel is not None:
        return kernel(flat.contiguous())
    flat = flat.float()
    n = flat.shape[1]
    lo, hi = torch.aminmax(flat, dim=1)
    mean_abs = torch.linalg.vector_norm(flat, 1, dim=1) / n
    mean = flat.mean(dim=1, keepdim=True)
    centred = flat - mean  # the only full-size temporary
    b = torch.linalg.vector_norm(centred, 1, dim=1) / n
    std = torch.linalg.vector_norm(centred, 2, dim=1) / math.sqrt(n)
    # kurtosis from standardised values: x^4 of raw activations overflows float32 beyond |x| ~ 1e9
    live = std > 0
    z = centred.div_(torch.where(live, std, 1.0).unsqueeze(1))
    kurtosis = torch.where(live, torch.linalg.vector_norm(z, 4, dim=1).pow(4) / n, 0.0)
    columns = (lo, hi, mean.squeeze(1), std, kurtosis, mean_abs, b)
    return torch.stack(columns, dim=1).double()


def summarize(samples: pd.DataFrame) -> pd.DataFrame:
    """The min / mean / max over samples of each statistic and of the range."""
    frame = samples.assign(range=samples["max"] - samples["min"])
    summary = frame.agg(list(REDUCTIONS))
    summary.index.name = "reduce"
    return summary[list(SUMMARY_COLUMNS)]


# -- granularity -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Granularity:
    """Per tensor (``axis`` None: one set of values per sample) or per channel along ``axis`` (1: the channels of
    an NCHW conv output or the features of a Linear output)."""

    axis: int | None = None

    @property
    def label(self) -> str:
        return "tensor" if self.axis is None else f"channel:{self.axis}"

    @classmethod
    def parse(cls, label: str) -> Granularity:
        if label == "tensor":
            return cls()
        kind, _, axis = label.partition(":")
        if kind != "channel" or not axis.isdigit() or int(axis) == 0:
            raise ObserverError(f"unknown granularity {label!r}: expected 'tensor' or 'channel:AXIS' (AXIS >= 1)")
        return cls(int(axis))

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[rows, elements]``: one row per sample, or per (sample, channel) in sample-major order."""
        if self.axis is None:
            return x.reshape(x.shape[0], -1)
        if not 0 < self.axis < x.dim():
            raise ObserverError(f"per-channel axis {self.axis} does not exist in an output of shape {tuple(x.shape)}")
        moved = x.movedim(self.axis, 1)
        return moved.reshape(moved.shape[0] * moved.shape[1], -1)

    def channels(self, x: torch.Tensor) -> int:
        return 1 if self.axis is None else x.shape[self.axis]


PER_TENSOR = Granularity()
PER_CHANNEL = Granularity(1)


# -- observers ---------------------------------------------------------------------------------------------
class Observer(ABC):
    """Accumulates one kind of statistic of one layer's outputs.  ``update`` receives each output with its
    ``key`` (the collector's (call, replica) pair: sorting by key gives sample order under DataParallel too)."""

    name: ClassVar[str]

    def __init__(self, granularity: Granularity = PER_TENSOR) -> None:
        self.granularity = granularity

    @abstractmethod
    def update(self, x: torch.Tensor, key: tuple[int, int]) -> None: ...

    @abstractmethod
    def export(self, folder: Path, layer: str) -> None:
        """Write this layer's state into ``folder`` (a staging folder; the collector swaps it in when complete)."""

    @classmethod
    @abstractmethod
    def load(cls, folder: Path, layer: str, granularity: Granularity) -> Any:
        """The state ``export`` wrote, as the object clipping methods read (``Observation.extra[name]``)."""

    def state(self) -> Any:
        """What this rank observed, picklable and on the CPU (distributed collect; see the module docstring)."""
        raise NotImplementedError(f"the {self.name} observer cannot be collected under torchrun: it defines no "
                                  "state()/merge(); collect it in one process")

    def merge(self, states: Sequence[Any]) -> None:
        """Become the observer of every rank's samples, ``states`` in rank (= sample) order."""
        raise NotImplementedError(f"the {self.name} observer cannot be collected under torchrun: it defines no "
                                  "state()/merge(); collect it in one process")


OBSERVERS: dict[str, type[Observer]] = {}


def register_observer(cls: type[Observer]) -> type[Observer]:
    """Make an observer collectable and loadable by its ``name`` (usable as a class decorator)."""
    OBSERVERS[cls.name] = cls
    return cls


def observer_class(name: str) -> type[Observer]:
    try:
        return OBSERVERS[name]
    except KeyError:
        raise ObserverError(f"unknown observer {name!r}: known are {', '.join(sorted(OBSERVERS))}") from None


@dataclass(frozen=True)
class Moments:
    """A layer's loaded moments: the per-tensor summary (rows min/mean/max over samples), and per channel the
    summary of each channel (a frame indexed by (reduce, channel)) when collected per channel."""

    summary: pd.DataFrame | None = None
    channel_summary: pd.DataFrame | None = None


@register_observer
class MomentsObserver(Observer):
    """Per-sample moments (``per_sample_stats``), per tensor or per channel.

    Files per layer ``L``: per tensor ``L.csv`` (a row per sample, columns ``STAT_COLUMNS``) and ``L_summary.csv``
    (rows ``min``, ``mean``, ``max`` over samples, plus ``range``) — the layout of the previous releases; per
    channel ``L_channels.csv`` (columns ``sample``, ``channel`` and the statistics) and ``L_channels_summary.csv``
    (columns ``reduce``, ``channel``, statistics, ``range``)."""

    name = "moments"

    def __init__(self, granularity: Granularity = PER_TENSOR, fused: bool = True) -> None:
        super().__init__(granularity)
        self.fused = fused
        self.records: dict[tuple[int, int], torch.Tensor] = {}
        self.channels = 1

    def update(self, x: torch.Tensor, key: tuple[int, int]) -> None:
        self.channels = self.granularity.channels(x)
        self.records[key] = per_sample_stats(self.granularity.rows(x), self.fused)

    def table(self) -> torch.Tensor:
        """[rows, 7] on the CPU in sample order (rows: samples, or (sample, channel) pairs sample-major)."""
        return torch.cat([self.records[key].cpu() for key in sorted(self.records)])

    def state(self) -> tuple[int, torch.Tensor] | None:
        """(channels, this rank's table in sample order), or None when the layer saw nothing here (an idle rank)."""
        return (self.channels, self.table()) if self.records else None

    def merge(self, states: Sequence[tuple[int, torch.Tensor] | None]) -> None:
        """The rank tables one after the other: rows are per sample, so concatenation in sample order gives the
        very table one process builds (the summaries are computed from it afterwards, in ``export``)."""
        seen = [state for state in states if state is not None]
        self.records = {(i, 0): table for i, (_, table) in enumerate(seen)}
        if seen:
            self.channels = seen[0][0]

    def export(self, folder: Path, layer: str) -> None:
        table = self.table()
        check_finite(layer, table[:, 0].min().item(), table[:, 1].max().item())
        frame = pd.DataFrame(table.numpy(), columns=list(STAT_COLUMNS))
        if self.granularity.axis is None:
            frame.to_csv(folder / f"{layer}.csv", index=False, float_format=CSV_FLOAT_FORMAT)
            summarize(frame).to_csv(folder / f"{layer}_summary.csv", index=True, float_format=CSV_FLOAT_FORMAT)
            return
        samples = len(frame) // self.channels
        frame.insert(0, "channel", torch.arange(self.channels).repeat(samples).numpy())
        per_channel = frame.assign(range=frame["max"] - frame["min"]).groupby("channel")
        reduced = {reduce: per_channel.agg(reduce) for reduce in REDUCTIONS}
        summary = pd.concat({**reduced, POOLED: pooled_channel_stats(frame, reduced)}, names=["reduce"])
        summary[list(SUMMARY_COLUMNS)].to_csv(folder / f"{layer}_channels_summary.csv", float_format=CSV_FLOAT_FORMAT)

    @classmethod
    def load(cls, folder: Path, layer: str, granularity: Granularity) -> Moments:
        """Per channel the summary holds, beside the reductions, the ``pooled`` rows (``pooled_channel_stats``;
        absent from folders written before them)."""
        if granularity.axis is None:
            path = folder / f"{layer}_summary.csv"
            summary = _read(path, index_col="reduce")
            _check_summary(path, summary, list(summary.index))
            return Moments(summary=summary)
        path = folder / f"{layer}_channels_summary.csv"
        summary = _read(path, index_col=["reduce", "channel"])
        reductions = [r for r in dict.fromkeys(summary.index.get_level_values("reduce")) if r != POOLED]
        _check_summary(path, summary, reductions)
        return Moments(channel_summary=summary)


def pooled_channel_stats(frame: pd.DataFrame, reduced: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Each channel's statistics over all its calibration samples together, from the per-sample rows.

    Per tensor the seed averages each image's statistics, and an image's tensor varies enough on its own.  One
    channel of one image does not: a channel that fires on some images only has a small spread and maximum in
    every single image, so averaged per-image statistics clip it hard on the images where it fires (mobilenet_v2
    W8A4 ``-hr -pcq_a``: 68.5 % -> 14.0 % top-1 on 200 sample images).  The pooled values, with S samples of equal
    size, per-sample mean m_s, std s_s and mean absolute deviation b_s, and m = mean(m_s):

    - min, max: the extremes over samples; mean: m; mean_abs: mean of the per-sample values (exact);
    - std = sqrt(mean(s_s^2) + mean((m_s - m)^2))  (the law of total variance: exact);
    - b <= mean(b_s) + mean(|m_s - m|)  (E|x - m| <= E|x - m_s| + |m_s - m|): the bound is used, so b errs wide;
    - kurtosis: the mean of the per-sample values (not pooled; no rule reads it)."""
    group = frame.groupby("channel")
    mean = group["mean"].transform("mean")
    spread = frame.assign(var=frame["std"] ** 2, dev2=(frame["mean"] - mean) ** 2,
                          dev=(frame["mean"] - mean).abs()).groupby("channel")
    out = reduced["mean"].copy()
    out["min"], out["max"] = reduced["min"]["min"], reduced["max"]["max"]
    out["std"] = (spread["var"].mean() + spread["dev2"].mean()) ** 0.5
    out["b"] = spread["b"].mean() + spread["dev"].mean()
    out["range"] = out["max"] - out["min"]
    return out


def _read(path: Path, index_col) -> pd.DataFrame:
    try:
        return pd.read_csv(path, index_col=index_col)
    except (OSError, ValueError) as err:
        raise ObserverError(f"{path} is unreadable: {err}") from err


def _check_summary(path: Path, summary: pd.DataFrame, reductions: list[str]) -> None:
    missing = set(SUMMARY_COLUMNS) - set(summary.columns)
    if missing or reductions != list(REDUCTIONS):
        raise ObserverError(f"{path} is malformed (missing columns {sorted(missing)}, rows {reductions})")
    if not all(math.isfinite(v) for v in summary[list(SUMMARY_COLUMNS)].to_numpy().ravel()):
        raise ObserverError(f"{path} holds non-finite values")


def stats_from_row(row: Mapping[str, float], numel: int) -> TensorStats:
    """The clipping rule's statistics from a summary row (one reduction over samples)."""
    return TensorStats(min=float(row["min"]), max=float(row["max"]), mean=float(row["mean"]), b=float(row["b"]),
                       std=float(row["std"]), numel=numel)


# -- what a method sees ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Observation:
    """What a clipping method sees of one layer: the moments reduced over samples (the seed took the mean), the
    extreme range (min of minima, max of maxima), elements per sample, per-channel moments when they were
    collected, and any other observer's loaded state by name."""

    numel: int
    moments: TensorStats
    extreme: tuple[float, float]
    channel_moments: tuple[TensorStats, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    channel_extremes: tuple[tuple[float, float], ...] | None = None  # per channel: min of minima, max of maxima

    def channel(self, c: int) -> Observation:
        """What a method sees of channel ``c`` alone (per-channel moments and extremes must have been collected)."""
        if self.channel_moments is None or self.channel_extremes is None:
            raise ObserverError("no per-channel moments were collected for this layer")
        stats = self.channel_moments[c]
        return Observation(stats.numel, stats, self.channel_extremes[c])

    @classmethod
    def of_tensor(cls, name: str, x: torch.Tensor, need_spread: bool = True) -> Observation:
        """The observation of one live tensor, all its samples together (the seed's ``-sm no``)."""
        flat = x.detach().reshape(-1).float()
        lo, hi = torch.aminmax(flat)
        check_finite(name, lo.item(), hi.item())
        mean = flat.mean()
        b = std = 0.0
        if need_spread:
            centred = flat - mean
            b = centred.abs().mean().item()
            std = centred.square_().mean().sqrt().item()
        stats = TensorStats(lo.item(), hi.item(), mean.item(), b, std, max(flat.numel(), 2))
        return cls(numel=stats.numel, moments=stats, extreme=(stats.min, stats.max))

    @classmethod
    def of_moments(cls, stats: TensorStats) -> Observation:
        """An observation holding just ``stats`` (for the pure ``choose_clipping`` interface)."""
        return cls(numel=stats.numel, moments=stats, extreme=(stats.min, stats.max))
