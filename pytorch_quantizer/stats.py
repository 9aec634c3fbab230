"""Per-sample activation statistics: collecting them with hooks, and the on-disk layout.

A statistics folder holds, for every hooked layer ``<name>`` (``conv0_activation``, ...):

- ``<name>.csv``: one row per sample, columns ``min,max,mean,std,kurtosis,mean_abs,b``;
- ``<name>_summary.csv``: rows ``min``, ``mean``, ``max`` (the reduction over samples, first column ``reduce``),
  columns the statistics plus ``range`` (max - min);
- ``meta.json``: which model the statistics came from (arch, weights, weight fingerprint, BatchNorm folding),
  how many images, the seed, the package version, and each layer's module path and elements per sample.

The folder is written to a temporary sibling and swapped in only when complete, so a failed or
interrupted run leaves earlier statistics untouched.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from .backends import kernel_module
from .clipping import TensorStats
from .layers import ActivationLayer, HookSet, activation_layers, check_finite

STAT_COLUMNS = ("min", "max", "mean", "std", "kurtosis", "mean_abs", "b")
SUMMARY_COLUMNS = (*STAT_COLUMNS, "range")
REDUCTIONS = ("min", "mean", "max")
META_FILE = "meta.json"
FORMAT_VERSION = 1


class StatisticsError(ValueError):
    """Statistics that are missing, malformed or belong to another model."""


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


class StatisticsCollector:
    """Records per-sample statistics of every Conv2d/Linear output of a model while it runs.

    ``with StatisticsCollector(model) as collector: model(x)`` attaches forward hooks and removes them on exit;
    the model itself is never modified.  ``fused=False`` computes the statistics with PyTorch reductions
    instead of the compiled kernels (for comparison).

    Under ``nn.DataParallel`` the replicas share these hooks and call them from their own threads, each on its
    chunk of the batch.  ``devices`` lists the replicas' devices in the order DataParallel scatters the batch
    (its ``device_ids``): a record is keyed by (the how-many-th call of that layer on that replica, the replica's
    position), and sorting by that key puts the rows back in sample order, the order one device would have seen.
    Only the last batch can leave a replica without a chunk, so the keys stay aligned.  Records stay on their
    device until read and are moved to the CPU one by one before they are joined.
    """

    def __init__(self, model: nn.Module, fused: bool = True, devices: Sequence[torch.device | str] = ()) -> None:
        self.fused = fused
        self.layers: list[ActivationLayer] = activation_layers(model)
        self.devices = [torch.device(d) for d in devices]
        self._records: dict[str, dict[tuple[int, int], torch.Tensor]] = {layer.name: {} for layer in self.layers}
        self._calls: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self.numel: dict[str, int] = {}
        self._hooks = HookSet()

    def attach(self) -> StatisticsCollector:
        if not self._hooks.attached:
            for layer in self.layers:
                self._hooks.add(layer, self._hook(layer.name))
        return self

    def detach(self) -> None:
        self._hooks.remove()

    def __enter__(self) -> StatisticsCollector:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _replica(self, output: torch.Tensor) -> int:
        """Position of the replica that produced ``output`` in the scatter order (0 on one device)."""
        return self.devices.index(output.device) if output.device in self.devices else 0

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            # kept on the activation's device: no host synchronisation per layer; checked when read
            stats = per_sample_stats(output, self.fused)
            replica = self._replica(output)
            with self._lock:
                call = self._calls.get((name, replica), 0)
                self._calls[(name, replica)] = call + 1
                self._records[name][(call, replica)] = stats
                self.numel[name] = output[0].numel()

        return hook

    def _table(self, name: str) -> torch.Tensor | None:
        """One layer's [samples, 7] statistics on the CPU, in sample order; None when the layer never ran."""
        records = self._records[name]
        if not records:
            return None
        return torch.cat([records[key].cpu() for key in sorted(records)])

    @property
    def samples(self) -> int:
        """Samples seen by the first layer that ran (layers the forward never calls record nothing)."""
        return next(
            (sum(len(t) for t in records.values()) for records in self._records.values() if records), 0
        )

    def frames(self) -> dict[str, pd.DataFrame]:
        """Per-layer sample tables collected so far, for the layers whose forward actually ran.

        Some models hold Linear modules whose weights are used without calling them (``nn.MultiheadAttention``'s
        ``out_proj``); those have no output to observe or quantize and are left out.
        """
        if self.samples == 0:
            raise StatisticsError("no statistics were collected: the model never ran with the hooks attached")
        frames = {}
        for name in self._records:
            table = self._table(name)
            if table is not None:
                check_finite(name, table[:, 0].min().item(), table[:, 1].max().item())
                frames[name] = pd.DataFrame(table.numpy(), columns=list(STAT_COLUMNS))
        return frames

    def save(self, folder: str | os.PathLike, meta: dict[str, Any]) -> Path:
        """Write the statistics folder atomically (see the module docstring); ``meta`` describes the model."""
        frames = self.frames()
        layers = [
            {"name": layer.name, "module": layer.module_name, "kind": layer.kind, "numel": self.numel[layer.name]}
            for layer in self.layers
            if layer.name in frames
        ]
        full_meta = {"format": FORMAT_VERSION, **meta, "images": self.samples, "layers": layers}
        return write_statistics(folder, frames, full_meta)


def _write_csv(frame: pd.DataFrame, path: Path, index: bool) -> None:
    frame.to_csv(path, index=index, float_format="%.9g")


def write_statistics(folder: str | os.PathLike, frames: dict[str, pd.DataFrame], meta: dict[str, Any]) -> Path:
    """Write per-layer tables, summaries and meta into a temporary sibling folder, then swap it in."""
    folder = Path(folder).expanduser()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for name, frame in frames.items():
            _write_csv(frame, staging / f"{name}.csv", index=False)
            _write_csv(summarize(frame), staging / f"{name}_summary.csv", index=True)
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _swap_in(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _swap_in(staging: Path, folder: Path) -> None:
    """Replace ``folder`` by ``staging``: the old folder is moved aside first and removed only afterwards."""
    if not folder.exists():
        staging.rename(folder)
        return
    if not (folder / META_FILE).exists() and any(folder.iterdir()):
        raise StatisticsError(f"{folder} exists and is not a statistics folder; refusing to replace it")
    retired = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    folder.rename(retired)
    try:
        staging.rename(folder)
    except BaseException:
        retired.rename(folder)
        raise
    shutil.rmtree(retired, ignore_errors=True)


@dataclass(frozen=True)
class Statistics:
    """A loaded statistics folder: its meta and each layer's summary."""

    folder: Path
    meta: dict[str, Any]
    summaries: dict[str, pd.DataFrame]

    @property
    def layer_names(self) -> list[str]:
        return [layer["name"] for layer in self.meta["layers"]]

    def numel(self, name: str) -> int:
        return next(int(layer["numel"]) for layer in self.meta["layers"] if layer["name"] == name)

    def summary(self, name: str) -> pd.DataFrame:
        try:
            return self.summaries[name]
        except KeyError:
            raise StatisticsError(f"{self.folder} has no statistics for layer {name}") from None

    def tensor_stats(self, name: str, reduce: str = "mean") -> TensorStats:
        """The statistics the clipping rule uses: each column reduced over samples (the seed used the mean)."""
        row = self.summary(name).loc[reduce]
        return TensorStats(
            min=float(row["min"]),
            max=float(row["max"]),
            mean=float(row["mean"]),
            b=float(row["b"]),
            std=float(row["std"]),
            numel=self.numel(name),
        )

    def extreme_range(self, name: str) -> tuple[float, float]:
        """The min of the per-sample minima and the max of the maxima (the seed's rule for the classifier)."""
        summary = self.summary(name)
        return float(summary.loc["min", "min"]), float(summary.loc["max", "max"])

    def check_model(self, expected: dict[str, Any]) -> None:
        """Refuse statistics of another model: every key of ``expected`` must match the recorded meta."""
        for key, value in expected.items():
            recorded = self.meta.get(key)
            if recorded != value:
                raise StatisticsError(
                    f"statistics in {self.folder} were collected with {key}={recorded!r}, "
                    f"but this run has {key}={value!r}; collect them again with -sm collect"
                )

    def check_layers(self, layers: list[ActivationLayer]) -> None:
        """Every layer with statistics must be the same module of this model (layers never called have none)."""
        modules = {layer.name: layer.module_name for layer in layers}
        for recorded in self.meta["layers"]:
            if modules.get(recorded["name"]) != recorded["module"]:
                raise StatisticsError(
                    f"statistics in {self.folder} have {recorded['name']} at module {recorded['module']!r}, this "
                    f"model has it at {modules.get(recorded['name'])!r}; collect them again with -sm collect"
                )

    def has(self, name: str) -> bool:
        return name in self.summaries


def load_statistics(folder: str | os.PathLike) -> Statistics:
    """Read a statistics folder written by ``StatisticsCollector.save``; clear errors when it is not one."""
    folder = Path(folder).expanduser()
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise StatisticsError(f"no statistics in {folder} (no {META_FILE}); run with -sm collect first")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise StatisticsError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT_VERSION}")
        summaries = {}
        for layer in meta["layers"]:
            summary = pd.read_csv(folder / f"{layer['name']}_summary.csv", index_col="reduce")
            missing = set(SUMMARY_COLUMNS) - set(summary.columns)
            if missing or list(summary.index) != list(REDUCTIONS):
                raise StatisticsError(f"{folder / layer['name']}_summary.csv is malformed (columns {sorted(missing)})")
            if not all(math.isfinite(v) for v in summary.to_numpy().ravel()):
                raise StatisticsError(f"{folder / layer['name']}_summary.csv holds non-finite values")
            summaries[layer["name"]] = summary
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as err:
        if isinstance(err, StatisticsError):
            raise
        raise StatisticsError(f"statistics in {folder} are unreadable: {err}") from err
    return Statistics(folder, meta, summaries)
