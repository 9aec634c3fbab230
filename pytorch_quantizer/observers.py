"""Observers: one small class per thing a clipping method needs to see of a layer's output during calibration.

An observer is fed every output of its layer during the one calibration pass (``update``), keeps what it needs
(on the activation's device, so that the pass never waits for the host), writes it into a statistics folder
(``export``) and reads it back (``load``).  A clipping method declares the observers it requires by name; the
statistics folder lists the observers it holds, so a method whose observer was not collected is refused with a
message naming what to collect.

Each observer has a ``Granularity``: per tensor (one set of values per sample) or per channel along an axis (one
set per sample and channel).  ``MomentsObserver`` is the seed's statistics (min, max, mean, std, kurtosis, mean
|x|, Laplace b of each sample; the fused kernels compute them); its per-tensor export is the statistics folder's
CSV layout of the previous releases, byte for byte.  ``HistogramObserver`` keeps a fixed-bin histogram of each
layer's values (per tensor), for the methods that search the measured distribution (``kld``, ``mse``, ``pNN``,
``mix-measured``).  New observers are a class here plus ``register_observer``.

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
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
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


def channel_observers(names: Sequence[str]) -> tuple[str | tuple[str, Granularity], ...]:
    """What a per-channel collect (``-pcq_a``) gathers for ``names``: the moments per tensor (their files as without
    it) and per channel beside them; the positive part per channel only (its tensor value is the channels' mean)."""
    specs: list[str | tuple[str, Granularity]] = [("positive", PER_CHANNEL) if n == "positive" else n for n in names]
    return (*specs, ("moments", PER_CHANNEL))


# -- observers ---------------------------------------------------------------------------------------------
class Observer(ABC):
    """Accumulates one kind of statistic of one layer's outputs.  ``update`` receives each output with its
    ``key`` (the collector's (call, replica) pair: sorting by key gives sample order under DataParallel too)."""

    name: ClassVar[str]
    per_channel: ClassVar[bool] = True  # False: kept per tensor even when the collection is per channel

    def __init__(self, granularity: Granularity = PER_TENSOR) -> None:
        self.granularity = granularity

    @abstractmethod
    def update(self, x: torch.Tensor, key: tuple[int, int]) -> None: ...

    def observe(self, x: torch.Tensor, key: tuple[int, int],
                extremes: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """``update``, given the exact minimum and maximum of ``x`` when another observer of the layer has read them
        already (``extremes``; the collector passes them so that ``x`` is not read again just for its range)."""
        self.update(x, key)

    def extremes(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The exact float32 minimum and maximum (0-d, on the activation's device) of the output recorded under
        ``key``, when this observer computes them anyway (the moments do); None otherwise."""
        return None

    @abstractmethod
    def export(self, folder: Path, layer: str) -> None:
        """Write this layer's state into ``folder`` (a staging folder; the collector swaps it in when complete)."""

    @classmethod
    @abstractmethod
    def load(cls, folder: Path, layer: str, granularity: Granularity) -> Any:
        """The state ``export`` wrote, as the object clipping methods read (``Observation.extra[name]``)."""

    def prime(self, x: torch.Tensor) -> None:
        """See the first batch one process would see, without counting it (torchrun; nothing to fix by default)."""
        return None

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
    """Make an observer collectable and loadable by its ``name`` (a class decorator); a name is taken once, as
    ``methods.register`` takes a method's."""
    name = getattr(cls, "name", "")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ObserverError(f"an observer needs a name of letters, digits, '_' and '-', got {name!r}")
    if name in OBSERVERS and OBSERVERS[name] is not cls:
        raise ObserverError(f"an observer named {name!r} is already registered ({OBSERVERS[name].__name__})")
    OBSERVERS[name] = cls
    return cls


def unregister_observer(name: str) -> None:
    """Remove a registered observer (for tests and plugins that add one for one run)."""
    OBSERVERS.pop(name, None)


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


class SampleRowsObserver(Observer):
    """An observer that keeps, per batch, one row of statistics per sample (or per (sample, channel) pair,
    sample-major): a table whose rows do not depend on how the samples were batched or split among ranks, so
    that concatenating the ranks' tables in sample order is the table one process builds.  Subclasses say what a
    row holds (``sample_rows``) and how the table is exported."""

    def __init__(self, granularity: Granularity = PER_TENSOR) -> None:
        super().__init__(granularity)
        self.records: dict[tuple[int, int], torch.Tensor] = {}
        self.channels = 1

    @abstractmethod
    def sample_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """[rows, k] statistics of ``rows`` ([rows, values], ``Granularity.rows``), in float64."""

    def update(self, x: torch.Tensor, key: tuple[int, int]) -> None:
        self.channels = self.granularity.channels(x)
        self.records[key] = self.sample_rows(self.granularity.rows(x))

    def table(self) -> torch.Tensor:
        """[rows, k] on the CPU in sample order."""
        return torch.cat([self.records[key].cpu() for key in sorted(self.records)])

    def state(self) -> tuple[int, torch.Tensor] | None:
        """(channels, this rank's table in sample order), or None when the layer saw nothing here (an idle rank)."""
        return (self.channels, self.table()) if self.records else None

    def merge(self, states: Sequence[tuple[int, torch.Tensor] | None]) -> None:
        """The rank tables one after the other (the class docstring says why that is exact); what is exported
        is computed from the merged table afterwards."""
        seen = [state for state in states if state is not None]
        self.records = {(i, 0): table for i, (_, table) in enumerate(seen)}
        if seen:
            self.channels = seen[0][0]


@register_observer
class MomentsObserver(SampleRowsObserver):
    """Per-sample moments (``per_sample_stats``), per tensor or per channel.

    Files per layer ``L``: per tensor ``L.csv`` (a row per sample, columns ``STAT_COLUMNS``) and ``L_summary.csv``
    (rows ``min``, ``mean``, ``max`` over samples, plus ``range``) — the layout of the previous releases; per
    channel ``L_channels.csv`` (columns ``sample``, ``channel`` and the statistics) and ``L_channels_summary.csv``
    (columns ``reduce``, ``channel``, statistics, ``range``)."""

    name = "moments"

    def __init__(self, granularity: Granularity = PER_TENSOR, fused: bool = True) -> None:
        super().__init__(granularity)
        self.fused = fused

    def sample_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return per_sample_stats(rows, self.fused)

    def extremes(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Min of the per-row minima and max of the maxima: the tensor's exact range (float32 values, kept in
        float64 by ``per_sample_stats``, so the cast back is exact)."""
        record = self.records.get(key)
        if record is None or record.numel() == 0:
            return None
        return record[:, 0].min().float(), record[:, 1].max().float()

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


@dataclass(frozen=True)
class PositivePart:
    """E[max(x, 0)] and E[max(x, 0)^2] of a layer's tensor over all its calibration values, and per channel when
    collected per channel: the two moments of what a ReLU lets through, which the spike-and-slab clip reads
    (``clipping.slab_fit``).  Both are plain means over equal-sized samples, so pooling them is exact."""

    mean: float
    mean_sq: float
    channels: tuple[tuple[float, float], ...] | None = None

    def channel(self, c: int) -> PositivePart:
        if self.channels is None:
            raise ObserverError("the positive-part observer was not collected per channel")
        return PositivePart(*self.channels[c])


POSITIVE_COLUMNS = ("mean_pos", "mean_pos_sq")


@register_observer
class PositivePartObserver(SampleRowsObserver):
    """The mean of max(x, 0) and of its square, per sample (per tensor) or per (sample, channel); exported pooled
    over the samples: ``L_positive.csv`` (one row per channel, or one row ``channel`` -1 per tensor).

    Why its own observer: the moments describe x, but a ReLU-fed tensor is clipped where the ReLU lets it through,
    and a channel that fires on few images has its positive part in a tail the moments of x do not locate."""

    name = "positive"

    def sample_rows(self, rows: torch.Tensor) -> torch.Tensor:
        positive = rows.detach().double().clamp_(min=0.0)
        return torch.stack([positive.mean(dim=1), positive.square_().mean(dim=1)], dim=1)

    def export(self, folder: Path, layer: str) -> None:
        if not self.records:
            raise ObserverError(f"the positive-part observer of {layer} saw no values")
        pooled = self.table().reshape(-1, self.channels, 2).mean(dim=0).numpy()
        index = [-1] if self.granularity.axis is None else list(range(self.channels))
        frame = pd.DataFrame(pooled, columns=list(POSITIVE_COLUMNS), index=pd.Index(index, name="channel"))
        frame.to_csv(folder / f"{layer}_positive.csv", float_format=CSV_FLOAT_FORMAT)

    @classmethod
    def load(cls, folder: Path, layer: str, granularity: Granularity) -> PositivePart:
        path = folder / f"{layer}_positive.csv"
        frame = _read(path, index_col="channel")
        values = frame.reindex(columns=list(POSITIVE_COLUMNS)).to_numpy(np.float64)
        if not len(values) or not np.isfinite(values).all() or (values < 0).any():
            raise ObserverError(f"{path} is malformed: expected finite non-negative columns "
                                f"{', '.join(POSITIVE_COLUMNS)}")
        mean, mean_sq = values.mean(axis=0)  # channels hold equally many values: the tensor's moments
        channels = None if granularity.axis is None else tuple((float(a), float(b)) for a, b in values)
        return PositivePart(float(mean), float(mean_sq), channels)


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
    if not np.isfinite(summary[list(SUMMARY_COLUMNS)].to_numpy(np.float64)).all():  # vectorised: per channel, 1e5+
        raise ObserverError(f"{path} holds non-finite values")


# -- histograms --------------------------------------------------------------------------------------------
HISTOGRAM_BINS = 2048
HISTOGRAM_SAMPLE_VALUES = 8192  # values binned per sample and layer, at most (``sample_stride``)
EDGE_FORMAT = "%.17g"  # float64 edges round-trip exactly
_MAX_BASE = 2.0**62  # first-batch bin indices are exact up to here (float32 integers, clamped)
_LEVELS = 65  # merge levels 2^0 .. 2^64: at 2^64 any clamped range fits in 2 bins


@dataclass(frozen=True, eq=False)
class Histogram:
    """How many of a layer's values fell in each bin ``[edges[i], edges[i+1])`` (the last bin closed).

    The bins run from the first to the last non-empty one, and ``edges[0]`` / ``edges[-1]`` are the observed
    minimum and maximum (those two bins are trimmed to where values were seen), so ``min``/``max`` are exact and a
    constant tensor is one bin of zero width.  Edges never decrease; a bin of zero width is a point mass (the
    zeros a ReLU makes: ``clamped``).  Counts are float64 (whole numbers as collected; ``clamped`` splits bins)."""

    edges: np.ndarray
    counts: np.ndarray

    def __post_init__(self) -> None:
        edges = np.asarray(self.edges, dtype=np.float64)
        counts = np.asarray(self.counts, dtype=np.float64)
        if edges.ndim != 1 or counts.ndim != 1 or len(edges) != len(counts) + 1:
            raise ObserverError(f"a histogram needs bins + 1 edges, got {edges.shape} edges for {counts.shape} counts")
        if len(counts) == 0 or not counts.sum() > 0:
            raise ObserverError("the histogram is empty: no values were counted")
        if not (np.isfinite(edges).all() and np.isfinite(counts).all()):
            raise ObserverError("the histogram holds non-finite edges or counts")
        if (np.diff(edges) < 0).any() or (counts < 0).any():
            raise ObserverError("the histogram's edges decrease or a count is negative")
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "counts", counts)

    @property
    def numel(self) -> int:
        """How many values were counted."""
        return int(round(self.counts.sum()))

    @property
    def min(self) -> float:
        return float(self.edges[0])

    @property
    def max(self) -> float:
        return float(self.edges[-1])

    @property
    def constant(self) -> bool:
        return self.min == self.max

    @property
    def centres(self) -> np.ndarray:
        return 0.5 * (self.edges[:-1] + self.edges[1:])

    def mean(self) -> float:
        return float(np.dot(self.centres, self.counts) / self.counts.sum())

    def quantile(self, q: float | np.ndarray) -> np.ndarray:
        """The ``q`` quantile(s) (0..1), values uniform within each bin: 0 is the minimum, 1 the maximum."""
        q = np.clip(np.asarray(q, dtype=np.float64), 0.0, 1.0)
        cum = np.concatenate([[0.0], np.cumsum(self.counts)])
        target = q * cum[-1]
        i = np.clip(np.searchsorted(cum[1:], target, side="left"), 0, len(self.counts) - 1)
        inside = np.clip((target - cum[i]) / np.maximum(self.counts[i], 1e-300), 0.0, 1.0)
        return self.edges[i] + inside * (self.edges[i + 1] - self.edges[i])

    def clamped(self, lo: float, hi: float) -> Histogram:
        """The histogram of ``clamp(x, lo, hi)``: what lies outside becomes a point mass (a zero-width bin) at
        ``lo`` or ``hi``, a bin cut by a bound keeps the share of its count inside (values uniform in a bin).
        ``clamped(0, cap)`` is what a ReLU (ReLU6: cap 6) makes of a layer's output."""
        if not lo <= hi:
            raise ValueError(f"clamp bounds must satisfy lo <= hi, got {lo} and {hi}")
        left, right = self.edges[:-1], self.edges[1:]
        width = right - left
        safe = np.where(width > 0, width, 1.0)
        below = np.where(width > 0, np.clip((lo - left) / safe, 0.0, 1.0), (left < lo).astype(float))
        above = np.where(width > 0, np.clip((right - hi) / safe, 0.0, 1.0), (left > hi).astype(float))
        inner = self.counts * np.clip(1.0 - below - above, 0.0, 1.0)
        cut = np.clip(self.edges, lo, hi)
        kept = (np.diff(cut) > 0) | (inner > 0)  # the bins left inside (a contiguous run), and point masses in it
        if kept.any():
            first, last = np.flatnonzero(kept)[[0, -1]]
            cut, inner = cut[first:last + 2], inner[first:last + 1]
        else:
            cut, inner = np.array([lo, hi]), np.array([0.0])
        edges = np.concatenate([[lo], cut, [hi]])
        counts = np.concatenate([[float(np.dot(self.counts, below))], inner, [float(np.dot(self.counts, above))]])
        live = np.flatnonzero(counts > 0)
        first, last = live[0], live[-1]
        return Histogram(edges[first:last + 2], counts[first:last + 1])

    @classmethod
    def of_tensor(cls, x: torch.Tensor, bins: int = HISTOGRAM_BINS,
                  extremes: tuple[torch.Tensor, torch.Tensor] | None = None) -> Histogram:
        """The histogram of one tensor (all its values, not subsampled: one live tensor is binned once), as the
        observer would record it from one batch; ``extremes``: its ``aminmax`` when the caller has it already."""
        observer = HistogramObserver(bins=bins, sample_values=None)
        observer._update(x, extremes)  # a fresh observer: nothing to lock, no device to move to
        return observer.histogram()


def sample_stride(per_sample: int, period: int, budget: int = HISTOGRAM_SAMPLE_VALUES) -> int:
    """The stride at which the histogram observer bins a sample's values: the smallest ``s >= ceil(per_sample /
    budget)`` with ``gcd(s, period) == 1``, so at most ``budget`` values (offsets 0, s, 2s, ... of the sample,
    ``ceil(per_sample / s)`` of them) are binned per sample.

    Why a subsample: binning every value reads each activation a second time after the moments, and cost about
    0.8 of a mobilenet_v2 forward pass; 8192 values a sample cut that to a few percent while the range searched on
    the histogram moves little (``tests/test_calibrators.py``, bound in docs/statistics.md).  Why coprime with
    ``period`` (H*W of an NCHW output, the features of an [N, T, F] one, 1 otherwise): a stride that divides it
    would see the same few pixel positions of every channel (or the same features); a coprime stride walks
    across every position and every channel, and the rows of a sample are taken alike whatever the batch, so the
    histogram stays a function of the samples, as exact to merge across torchrun ranks as before.  The range
    (minimum and maximum) is never subsampled: it comes from the full tensor."""
    if per_sample < 1 or period < 1 or budget < 1:
        raise ValueError(f"sample_stride needs positive sizes, got {per_sample}, {period}, {budget}")
    stride = max(1, -(-per_sample // budget))
    while math.gcd(stride, period) != 1:
        stride += 1
    return stride


def _period(x: torch.Tensor) -> int:
    """What a sample's stride must be coprime with: the product of the dimensions after the channels (1 for
    [N, F] outputs)."""
    return math.prod(x.shape[2:]) if x.dim() >= 3 else 1


def _base_index(x: torch.Tensor, lo: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """floor((x - lo) * inv) in float32: the index of ``x``'s bin on the first batch's lattice."""
    return torch.floor((x - lo) * inv)


@register_observer
class HistogramObserver(Observer):
    """A histogram of a layer's values (per tensor, all samples together) in ``bins`` bins, kept on the activation's
    device: each batch costs an ``aminmax`` and one binning pass, and the pass never waits for the host.

    The lattice: the first batch fixes the origin ``lo0`` (its minimum) and the bin width ``w0 = (max - min) /
    (bins - 1/2)`` (so its maximum falls inside the last bin; a constant first batch gets a tiny width).  A value's
    base index is ``floor((x - lo0) / w0)`` (float32, the same expression for every value).  The histogram is
    always the ``bins`` bins of width ``2^e w0`` starting at the bin that holds the smallest value seen so far,
    with ``e >= 0`` the smallest level at which every value seen fits: a value's bin is ``floor(base / 2^e) -
    start``.  When a batch falls outside, ``e`` grows and the old counts are merged exactly (every ``2^k`` old bins
    are one new bin: old edges stay edges) before the batch is added.  Because ``e`` and ``start`` depend only on
    the overall minimum and maximum, the result is a function of the first batch and of the multiset of all
    values: how the later values are split into batches, and in which order they come, does not change one count.
    Exact while the range stays within 2^62 first-batch bins (beyond, the extreme values share the end bins).
    CPU tensors go to the compiled kernel's ``histogram_accumulate_`` when it is built (the same float32 steps,
    one read and no temporary), others to the PyTorch expression.  Under ``nn.DataParallel`` the replicas' chunks
    are added one at a time on the first chunk's device; the counts stay exact, but which chunk comes first (and so
    the lattice) is the threads' order, not the samples'.

    Subsampled counts: of each sample only ``sample_stride`` values are binned (at most ``sample_values``, default
    ``HISTOGRAM_SAMPLE_VALUES``; None bins every value), the strided values read in place by the kernel.  The
    range is exact all the same: ``observe`` takes the full tensor's minimum and maximum from the moments observer
    (the collector passes them), or reads them itself.  What it costs the searched ranges is bounded in
    ``tests/test_calibrators.py::test_subsampled_histogram_moves_searched_ranges_little`` (docs/statistics.md).

    Under torchrun every rank first ``prime``s its lattice with the batch that one process would see first (the
    collector runs it, ``StatisticsCollector.priming``), then bins its shard; rank 0 ``merge``s the ranks' counts at
    the level that fits the overall range, which by the rule above is the one process's histogram, count for
    count."""

    name = "histogram"
    per_channel = False

    def __init__(self, granularity: Granularity = PER_TENSOR, bins: int = HISTOGRAM_BINS,
                 sample_values: int | None = HISTOGRAM_SAMPLE_VALUES) -> None:
        if granularity.axis is not None:
            raise ObserverError("the histogram observer is per tensor: per-channel histograms are not supported")
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 4:
            raise ObserverError(f"a histogram needs an integer number of bins >= 4, got {bins!r}")
        if sample_values is not None and (isinstance(sample_values, bool) or not isinstance(sample_values, int)
                                          or sample_values < 1):
            raise ObserverError(f"a histogram needs sample_values >= 1 or None, got {sample_values!r}")
        super().__init__(granularity)
        self.bins = bins
        self.sample_values = sample_values
        self.counts: torch.Tensor | None = None  # int64 [bins]
        self.lo = self.inv = self.min = self.max = torch.zeros(())  # float32 0-d, on the device
        self.level = self.start = torch.zeros((), dtype=torch.float64)  # e and the window's first bin at level e
        self.primed = False  # the lattice (lo, inv) is set
        self._lock = threading.Lock()  # DataParallel's replicas call update from their own threads

    def update(self, x: torch.Tensor, key: tuple[int, int]) -> None:
        self.observe(x, key)

    def observe(self, x: torch.Tensor, key: tuple[int, int],
                extremes: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        with self._lock:
            if self.counts is not None:
                x = x.to(self.counts.device)
                if extremes is not None:
                    extremes = (extremes[0].to(self.counts.device), extremes[1].to(self.counts.device))
            self._update(x, extremes)

    def _update(self, x: torch.Tensor, extremes: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        x = x.detach()
        rows = x.reshape(x.shape[0] if x.dim() >= 2 else x.numel(), -1)
        if rows.dtype != torch.float32:
            rows = rows.float()
        if rows.numel() == 0:
            return
        stride = 1
        if self.sample_values is not None:
            stride = sample_stride(rows.shape[1], _period(x), self.sample_values)
        mn, mx = torch.aminmax(rows) if extremes is None else extremes
        first = self.counts is None
        if not self.primed:
            self._set_lattice(mn, mx)
        if first:
            self.min, self.max = mn, mx
        else:
            self.min, self.max = torch.minimum(self.min, mn), torch.maximum(self.max, mx)
        level, start = self._fit(self.min, self.max)
        counts = torch.zeros(self.bins, dtype=torch.int64, device=rows.device)
        if not first:
            self._move(counts, self.counts, self.level, self.start, level, start)
        self.level, self.start, self.counts = level, start, counts
        self._accumulate(rows, torch.ldexp(self.inv, -level.float()), start.float(), stride)

    def _set_lattice(self, mn: torch.Tensor, mx: torch.Tensor) -> None:
        width = mx - mn
        w0 = torch.where(width > 0, width / (self.bins - 0.5), torch.clamp(mn.abs(), min=1.0) * 2.0**-20)
        self.lo, self.inv, self.primed = mn, 1.0 / w0, True

    def prime(self, x: torch.Tensor) -> None:
        """Fix the lattice from ``x`` (the first batch one process would see) without counting it."""
        if not self.primed:
            self._set_lattice(*torch.aminmax(x.detach().reshape(-1).float()))

    def _fit(self, mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest level e at which [mn, mx] fits in ``bins`` bins, and the window's first bin (exact: float32
        integers in float64)."""
        ends = _base_index(torch.stack([mn, mx]), self.lo, self.inv)
        ends = torch.nan_to_num(ends, nan=0.0).clamp(-_MAX_BASE, _MAX_BASE).double()
        levels = torch.arange(_LEVELS, dtype=torch.float64, device=ends.device)
        lows, highs = (torch.floor(end * torch.exp2(-levels)) for end in ends)
        level = torch.argmax((highs - lows <= self.bins - 1).int())
        return level.double(), lows.gather(0, level.view(1)).squeeze(0)

    def _move(self, into: torch.Tensor, counts: torch.Tensor, old_level: torch.Tensor, old_start: torch.Tensor,
              level: torch.Tensor, start: torch.Tensor) -> None:
        """Add ``counts`` (a window at ``old_level`` from ``old_start``) into ``into`` (at ``level`` >= it, from
        ``start``): old bin j is bin old_start + j at its level, merged into its bin at the new level."""
        old = torch.arange(self.bins, dtype=torch.float64, device=into.device) + old_start.to(into.device)
        moved = torch.floor(old * torch.exp2(old_level.to(into.device) - level)) - start
        into.index_add_(0, moved.clamp(0, self.bins - 1).long(), counts.to(into.device))

    def state(self) -> dict[str, torch.Tensor] | None:
        """This rank's lattice, range and counts on the CPU (None when it saw no values: an idle rank)."""
        if self.counts is None:
            return None
        return {key: getattr(self, key).cpu() for key in ("lo", "inv", "min", "max", "level", "start", "counts")}

    def merge(self, states: Sequence[dict[str, torch.Tensor] | None]) -> None:
        live = [state for state in states if state is not None]
        if not live:
            return
        lattices = {(float(state["lo"]), float(state["inv"])) for state in live}
        if len(lattices) > 1:
            raise ObserverError(f"the ranks' histograms were binned on {len(lattices)} different lattices: prime "
                                "them with the same first batch (StatisticsCollector.priming)")
        self.lo, self.inv, self.primed = live[0]["lo"], live[0]["inv"], True
        self.min = torch.stack([state["min"] for state in live]).min()
        self.max = torch.stack([state["max"] for state in live]).max()
        level, start = self._fit(self.min, self.max)
        counts = torch.zeros(self.bins, dtype=torch.int64)
        for state in live:
            self._move(counts, state["counts"], state["level"], state["start"], level, start)
        self.level, self.start, self.counts = level, start, counts

    def _accumulate(self, rows: torch.Tensor, scale: torch.Tensor, start: torch.Tensor, stride: int) -> None:
        """counts[clamp(nan_to_0(floor((x - lo) * scale) - start), 0, bins - 1)] += 1 for the values at offsets
        0, stride, 2 stride, ... of each row (sample) of ``rows``."""
        kernel = _histogram_kernel(rows)
        if kernel is not None:
            kernel(rows.contiguous(), self.counts, self.lo.item(), scale.item(), start.item(), stride)
            return
        t = rows[:, ::stride] - self.lo
        index = t.mul_(scale).floor_().sub_(start).nan_to_num_(nan=0.0).clamp_(0, self.bins - 1).long().reshape(-1)
        if index.device.type == "cpu":
            self.counts += torch.bincount(index, minlength=self.bins)
        else:  # bincount sizes its output from the data's maximum: a host synchronisation
            self.counts.index_add_(0, index, torch.ones((), dtype=torch.int64, device=index.device).expand_as(index))

    def histogram(self) -> Histogram:
        """The histogram so far, trimmed to the non-empty bins and to the observed min and max (float64 edges)."""
        if self.counts is None:
            raise ObserverError("the histogram observer saw no values")
        counts = self.counts.cpu().numpy()
        live = np.flatnonzero(counts)
        first, last = int(live[0]), int(live[-1])
        lo, width = float(self.lo), 2.0 ** float(self.level) / float(self.inv)
        edges = lo + (float(self.start) + np.arange(first, last + 2, dtype=np.float64)) * width
        mn, mx = float(self.min), float(self.max)
        edges = np.clip(edges, mn, mx)
        edges[0], edges[-1] = mn, mx
        return Histogram(edges, counts[first:last + 1])

    def export(self, folder: Path, layer: str) -> None:
        if self.counts is None:
            raise ObserverError(f"the histogram observer of {layer} saw no values")
        check_finite(layer, float(self.min), float(self.max))
        hist = self.histogram()
        frame = pd.DataFrame({"left": hist.edges[:-1], "right": hist.edges[1:],
                              "count": hist.counts.astype(np.int64)})
        frame.to_csv(folder / f"{layer}_histogram.csv", index=False, float_format=EDGE_FORMAT)

    @classmethod
    def load(cls, folder: Path, layer: str, granularity: Granularity) -> Histogram:
        path = folder / f"{layer}_histogram.csv"
        frame = _read(path, index_col=None)
        if list(frame.columns) != ["left", "right", "count"]:
            raise ObserverError(f"{path} is malformed: expected columns left,right,count, got {list(frame.columns)}")
        left, right = frame["left"].to_numpy(np.float64), frame["right"].to_numpy(np.float64)
        if len(frame) > 1 and not np.array_equal(left[1:], right[:-1]):
            raise ObserverError(f"{path} is malformed: each bin must start where the previous one ends")
        try:
            return Histogram(np.concatenate([left[:1], right]), frame["count"].to_numpy(np.float64))
        except ObserverError as err:
            raise ObserverError(f"{path}: {err}") from None


def _histogram_kernel(flat: torch.Tensor):
    """The compiled CPU ``histogram_accumulate_`` when built with its ``stride`` argument, else None (CUDA tensors
    and stale in-place builds from before the subsample use PyTorch's ops)."""
    if flat.device.type != "cpu":
        return None
    module = kernel_module("cpu")
    kernel = getattr(module, "histogram_accumulate_", None) if module is not None else None
    return kernel if kernel is not None and "stride" in (kernel.__doc__ or "") else None


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
        extra = {name: state.channel(c) for name, state in self.extra.items() if isinstance(state, PositivePart)
                 and state.channels is not None}
        return Observation(stats.numel, stats, self.channel_extremes[c], extra=extra)

    @classmethod
    def of_tensor(cls, name: str, x: torch.Tensor, need_spread: bool = True, histogram: bool = False,
                  positive: bool = False) -> Observation:
        """The observation of one live tensor, all its samples together (the seed's ``-sm no``); with
        ``histogram`` also its histogram (``extra["histogram"]``) for the methods that search one, with
        ``positive`` its positive part's moments (``extra["positive"]``)."""
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
        extra: dict[str, Any] = {"histogram": Histogram.of_tensor(flat, extremes=(lo, hi))} if histogram else {}
        if positive:
            part = flat.double().clamp(min=0.0)
            extra["positive"] = PositivePart(part.mean().item(), part.square_().mean().item())
        return cls(numel=stats.numel, moments=stats, extreme=(stats.min, stats.max), extra=extra)

    @classmethod
    def of_moments(cls, stats: TensorStats) -> Observation:
        """An observation holding just ``stats`` (for the pure ``choose_clipping`` interface)."""
        return cls(numel=stats.numel, moments=stats, extreme=(stats.min, stats.max))
