"""Statistics folders: collecting observers with hooks in one calibration pass, and the on-disk layout.

A statistics folder holds ``meta.json`` (which model the statistics came from: arch, weights, weight fingerprint,
BatchNorm folding; how many images, the seed, the package version, each layer's module path and elements per
sample; and since format 2 the observers it holds with their granularity) and each observer's files per layer
(``observers``).  The moments observer per tensor writes, for every hooked layer ``<name>``:

- ``<name>.csv``: one row per sample, columns ``min,max,mean,std,kurtosis,mean_abs,b``;
- ``<name>_summary.csv``: rows ``min``, ``mean``, ``max`` (the reduction over samples, first column ``reduce``),
  columns the statistics plus ``range`` (max - min).

That is the whole layout of format 1 (the previous releases), which still loads: it holds per-tensor moments.

The folder is written to a temporary sibling and swapped in only when complete, so a failed or
interrupted run leaves earlier statistics untouched.

Since this release a folder also proves its integrity: ``meta.json``'s ``files`` records every other file's size
and sha256, and loading refuses a folder whose files do not match (a truncated histogram, a layer's files copied
in from another folder, an edited summary), naming the file.  ``calibration.json`` lists the calibration images
as a JSON list (any file name round-trips; ``calibration.txt`` of earlier releases still reads), as many as
``meta.json``'s ``images``; ``unobserved`` names the hooked layers the forward never called, so that a layer
missing for any other reason is an error.  Folders of earlier releases, without ``files``, load with a note in
the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from .clipping import TensorStats
from .layers import ACT_POINTS, ActivationLayer, HookSet, activation_layers
from .observers import (
    PER_TENSOR,
    POOLED,
    STAT_COLUMNS,
    Granularity,
    Moments,
    MomentsObserver,
    Observation,
    Observer,
    ObserverError,
    observer_class,
    per_sample_stats,
    stats_from_row,
)

__all__ = ["STAT_COLUMNS", "Statistics", "StatisticsCollector", "StatisticsError", "load_statistics",
           "per_sample_stats"]

log = logging.getLogger("pytorch_quantizer")

META_FILE = "meta.json"
CALIBRATION_FILE = "calibration.json"
LEGACY_CALIBRATION_FILE = "calibration.txt"  # earlier releases: one name a line
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
FORMAT_1_OBSERVERS = [{"name": "moments", "granularity": "tensor"}]
# What ``-sm collect`` gathers in its one pass: the moments every ACIQ method reads and the histogram the searched
# methods (kld, mse, pP, mix-measured) read.
COLLECTED_OBSERVERS = ("moments", "histogram", "positive")


class StatisticsError(ValueError):
    """Statistics that are missing, malformed or belong to another model."""


class StatisticsCollector:
    """Feeds every Conv2d/Linear output of a model to its observers while the model runs.

    ``with StatisticsCollector(model) as collector: model(x)`` attaches forward hooks and removes them on exit;
    the model itself is never modified.  ``observers`` names the observers per layer (default: the moments, per
    tensor or at ``granularity``); ``fused=False`` computes the moments with PyTorch reductions instead of the
    compiled kernels (for comparison).

    Under ``nn.DataParallel`` the replicas share these hooks and call them from their own threads, each on its
    chunk of the batch.  ``devices`` lists the replicas' devices in the order DataParallel scatters the batch
    (its ``device_ids``): a record is keyed by (the how-many-th call of that layer on that replica, the replica's
    position), and sorting by that key puts the rows back in sample order, the order one device would have seen.
    Only the last batch can leave a replica without a chunk, so the keys stay aligned.  Records stay on their
    device until read and are moved to the CPU one by one before they are joined.
    """

    def __init__(self, model: nn.Module, fused: bool = True, devices: Sequence[torch.device | str] = (),
                 observers: Iterable[str | tuple[str, Granularity]] = ("moments",),
                 granularity: Granularity = PER_TENSOR, point: str = "output") -> None:
        if point not in ACT_POINTS:
            raise ValueError(f"unknown activation point {point!r}: expected one of {', '.join(ACT_POINTS)}")
        self.point = point
        self.fused = fused
        self.granularity = granularity
        # (name, granularity) pairs: a plain name is at ``granularity``; the same observer may be collected at two
        # granularities (-pcq_a: per-channel moments beside the per-tensor ones, whose files stay as they were)
        self.observer_specs = tuple(dict.fromkeys(
            (o, granularity) if isinstance(o, str) else (o[0], o[1]) for o in observers))
        for name, _ in self.observer_specs:
            observer_class(name)
        self.layers: list[ActivationLayer] = activation_layers(model)
        self.devices = [torch.device(d) for d in devices]
        self.observers: dict[str, list[Observer]] = {
            layer.name: [self._make(name, g) for name, g in self.observer_specs] for layer in self.layers
        }
        self._calls: dict[tuple[str, int], int] = {}
        self._samples: dict[str, int] = {}
        self._lock = threading.Lock()
        self.numel: dict[str, int] = {}
        self._hooks = HookSet()
        self._priming = False

    def _make(self, name: str, granularity: Granularity) -> Observer:
        """Observer ``name`` at ``granularity``; one that is only per tensor (the histogram) stays per tensor, and
        the folder's meta says so."""
        cls = observer_class(name)
        if cls is MomentsObserver:
            return MomentsObserver(granularity, fused=self.fused)
        return cls(granularity if cls.per_channel else PER_TENSOR)

    def attach(self) -> StatisticsCollector:
        if not self._hooks.attached:
            for layer in self.layers:
                self._hooks.add_at(self.point, layer, self._hook(layer.name))
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
        observers = self.observers[name]
        # the observers that read the output's exact range anyway (the moments) run first and hand it to the others
        # (the histogram), so that no observer reads the whole output again just for its minimum and maximum
        ordered = sorted(observers, key=lambda o: type(o).extremes is Observer.extremes)

        def hook(module: nn.Module, output: torch.Tensor) -> None:
            if self._priming:
                for observer in observers:
                    observer.prime(output)
                return
            replica = self._replica(output)
            with self._lock:
                call = self._calls.get((name, replica), 0)
                self._calls[(name, replica)] = call + 1
                self._samples[name] = self._samples.get(name, 0) + output.shape[0]
                self.numel[name] = output[0].numel()
            extremes = None
            for observer in ordered:  # kept on the activation's device: no host synchronisation per layer
                observer.observe(output, (call, replica), extremes)
                extremes = extremes or observer.extremes((call, replica))

        return hook

    @contextmanager
    def priming(self) -> Iterator[None]:
        """While inside, a forward only fixes the observers' binning (``HistogramObserver.prime``) and counts
        nothing: under torchrun every rank runs the batch one process would see first, so that all ranks bin
        alike and rank 0 can merge their histograms exactly."""
        self._priming = True
        try:
            yield
        finally:
            self._priming = False

    @property
    def samples(self) -> int:
        """Samples seen by the first layer that ran (layers the forward never calls record nothing)."""
        return next((self._samples[layer.name] for layer in self.layers if layer.name in self._samples), 0)

    def observed(self) -> list[ActivationLayer]:
        """The layers whose forward actually ran.  Some models hold Linear modules whose weights are used without
        calling them (``nn.MultiheadAttention``'s ``out_proj``); those have no output to observe or quantize."""
        if self.samples == 0:
            raise StatisticsError("no statistics were collected: the model never ran with the hooks attached")
        return [layer for layer in self.layers if layer.name in self._samples]

    def state(self) -> dict[str, Any]:
        """What this process collected, picklable and on the CPU: rank 0 ``merge``s every rank's (torchrun)."""
        return {"samples": dict(self._samples), "numel": dict(self.numel),
                "observers": {name: [o.state() for o in observers] for name, observers in self.observers.items()}}

    def merge(self, states: Sequence[dict[str, Any]]) -> None:
        """Become the collector of all the ranks' samples, ``states`` in rank order: the sample order of one
        process, since each rank collected a contiguous shard (``distributed.DistContext.shard``).  Each observer
        merges its own part (``Observer.merge``); sample counts add up."""
        samples: dict[str, int] = {}
        for state in states:
            for name, count in state["samples"].items():
                samples[name] = samples.get(name, 0) + count
            self.numel.update(state["numel"])
        self._samples = samples
        for name, observers in self.observers.items():
            for i, observer in enumerate(observers):
                observer.merge([state["observers"][name][i] for state in states])

    def frames(self) -> dict[str, pd.DataFrame]:
        """Per-layer per-sample moment tables collected so far (per tensor), for the layers that ran."""
        frames = {}
        for layer in self.observed():
            moments = next(o for o in self.observers[layer.name]
                           if isinstance(o, MomentsObserver) and o.granularity.axis is None)
            frames[layer.name] = pd.DataFrame(moments.table().numpy(), columns=list(STAT_COLUMNS))
        return frames

    def save(self, folder: str | os.PathLike, meta: dict[str, Any], calibration: Sequence[str] | None = None,
             before_swap: Callable[[Path], object] | None = None) -> Path:
        """Write the statistics folder atomically (see the module docstring); ``meta`` describes the model and
        ``calibration`` names the images seen, in order (``calibration.json``, so evaluation can leave them out);
        ``before_swap``: see ``write_statistics``."""
        if calibration is not None and len(calibration) != self.samples:
            raise StatisticsError(f"{len(calibration)} calibration image names for {self.samples} samples")
        layers = self.observed()
        entries = [
            {"name": layer.name, "module": layer.module_name, "kind": layer.kind, "numel": self.numel[layer.name]}
            for layer in layers
        ]
        observers = list({(o.name, o.granularity.label): {"name": o.name, "granularity": o.granularity.label}
                          for o in self.observers[layers[0].name]}.values())
        seen = {layer.name for layer in layers}
        full_meta = {"format": FORMAT_VERSION, **meta, "images": self.samples, "layers": entries,
                     "observers": observers, "point": self.point,
                     "unobserved": [layer.name for layer in self.layers if layer.name not in seen]}

        def write(staging: Path) -> None:
            if calibration is not None:
                (staging / CALIBRATION_FILE).write_text(json.dumps(list(calibration), indent=0) + "\n")
            for layer in layers:
                for observer in self.observers[layer.name]:
                    observer.export(staging, layer.name)

        return write_statistics(folder, write, full_meta, before_swap)


def write_statistics(folder: str | os.PathLike, write, meta: dict[str, Any],
                     before_swap: Callable[[Path], object] | None = None) -> Path:
    """Call ``write(staging)`` for a temporary sibling folder, add ``meta.json``, then swap it in.

    ``before_swap(staging)`` runs on the complete staged folder just before the swap: the run's other writes (its
    results row) go there, so that a run that fails to write them leaves the earlier statistics in place."""
    folder = Path(folder).expanduser()
    if folder.is_symlink():  # the swap happens in the link's target, so the link keeps pointing at the statistics
        folder = folder.resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        write(staging)
        meta = {**meta, "files": {path.name: file_record(path) for path in sorted(staging.iterdir())}}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if before_swap is not None:
            before_swap(staging)
        _swap_in(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def file_record(path: Path) -> dict[str, Any]:
    """What ``meta.json`` records of a file: its size in bytes and its sha256."""
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def verify_files(folder: Path, meta: dict[str, Any]) -> None:
    """Refuse a folder whose files are not the ones ``meta.json`` recorded (missing, extra, resized or changed),
    naming the file.  Folders of earlier releases record none: they load unverified, with a note in the log."""
    recorded = meta.get("files")
    if recorded is None:
        log.info("the statistics in %s were written by an earlier release, without file hashes: not verified", folder)
        return
    if not isinstance(recorded, dict):
        raise StatisticsError(f"{folder / META_FILE}: 'files' must map file names to their size and sha256")
    present = {path.name for path in folder.iterdir() if path.is_file() and path.name != META_FILE}
    for name in sorted(present - set(recorded)):
        raise StatisticsError(f"{folder / name} is not one of the files {META_FILE} records: it was added to the "
                              "folder afterwards; collect the statistics again")
    for name, expected in sorted(recorded.items()):
        path = folder / name
        if not path.is_file():
            raise StatisticsError(f"{path} is missing from the statistics folder; collect them again")
        if file_record(path) != expected:
            raise StatisticsError(f"{path} is not the file that was collected (its size or sha256 differs from "
                                  f"{META_FILE}'s record): damaged or replaced; collect the statistics again")


# what a folder written before a meta key existed means by its absence
RECORDED_BEFORE: dict[str, Any] = {"equalized": False}


def check_replaceable(folder: Path) -> None:
    """Refuse a folder that a collect would replace but that holds something other than statistics (a user's own
    files).  Called before the pass, so the refusal costs nothing, and again at the swap."""
    if folder.is_dir() and not (folder / META_FILE).exists() and any(folder.iterdir()):
        raise StatisticsError(f"{folder} exists and is not a statistics folder; refusing to replace it")


def _swap_in(staging: Path, folder: Path) -> None:
    """Replace ``folder`` by ``staging``: the old folder is moved aside first and removed only afterwards."""
    if not folder.exists():
        staging.rename(folder)
        return
    check_replaceable(folder)
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
    """A loaded statistics folder: its meta and, per layer, each observer's loaded state."""

    folder: Path
    meta: dict[str, Any]
    states: dict[str, dict[str, Any]]  # layer -> observer name -> state (``Observer.load``)
    # layer -> its Observation, built once: a per-channel folder holds thousands of rows to turn into TensorStats,
    # which would otherwise be repeated by every plan (and timed as the method's cost by --compare)
    _observations: dict[str, Observation] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def layer_names(self) -> list[str]:
        return [layer["name"] for layer in self.meta["layers"]]

    @property
    def point(self) -> str:
        """Which tensor of each layer was observed: "output" (the seed's, and every format-1 folder) or "input"."""
        return self.meta.get("point", "output")

    @property
    def observers(self) -> dict[str, Granularity]:
        """The observers this folder holds, with their granularity."""
        return {o["name"]: Granularity.parse(o["granularity"]) for o in self.meta.get("observers", FORMAT_1_OBSERVERS)}

    @property
    def has_channel_moments(self) -> bool:
        """Whether per-channel moments were collected (``-sm collect -pcq_a``)."""
        return any(o["name"] == "moments" and Granularity.parse(o["granularity"]).axis is not None
                   for o in self.meta.get("observers", FORMAT_1_OBSERVERS))

    def require(self, observers: Iterable[str], why: str) -> None:
        """Refuse, naming what to collect, when ``why`` (a method) needs an observer this folder lacks."""
        missing = [name for name in observers if name not in self.observers]
        if missing:
            raise StatisticsError(
                f"{why} needs the {', '.join(missing)} observer(s), but {self.folder} holds only "
                f"{', '.join(self.observers) or 'none'}; collect them again with -sm collect"
            )

    def numel(self, name: str) -> int:
        return next(int(layer["numel"]) for layer in self.meta["layers"] if layer["name"] == name)

    def _moments(self, name: str) -> Moments:
        try:
            return self.states[name]["moments"]
        except KeyError:
            raise StatisticsError(f"{self.folder} has no moments for layer {name}") from None

    def summary(self, name: str) -> pd.DataFrame:
        summary = self._moments(name).summary
        if summary is None:
            raise StatisticsError(f"{self.folder} holds per-channel moments only; per-tensor ones were not collected")
        return summary

    def tensor_stats(self, name: str, reduce: str = "mean") -> TensorStats:
        """The statistics the clipping rule uses: each column reduced over samples (the seed used the mean)."""
        return stats_from_row(self.summary(name).loc[reduce], self.numel(name))

    def extreme_range(self, name: str) -> tuple[float, float]:
        """The min of the per-sample minima and the max of the maxima (the seed's rule for the classifier)."""
        summary = self.summary(name)
        return float(summary.loc["min", "min"]), float(summary.loc["max", "max"])

    def observation(self, name: str) -> Observation:
        """What a clipping method sees of layer ``name`` (built on first use, then the same object)."""
        if name not in self._observations:
            self._observations[name] = self._observe(name)
        return self._observations[name]

    def _observe(self, name: str) -> Observation:
        moments = self._moments(name)
        channels = extremes = None
        if moments.channel_summary is not None:
            summary = moments.channel_summary
            reductions = summary.index.get_level_values("reduce")
            rows = summary.loc[POOLED if POOLED in reductions else "mean"]
            numel = max(self.numel(name) // max(len(rows), 1), 2)
            channels = tuple(stats_from_row(row, numel) for row in rows.to_dict("records"))
            extremes = tuple(zip(summary.loc["min"]["min"].astype(float), summary.loc["max"]["max"].astype(float),
                                 strict=True))
        extra = {key: state for key, state in self.states[name].items() if key != "moments"}
        if moments.summary is None:
            return Observation(self.numel(name), channels[0], (channels[0].min, channels[0].max), channels, extra,
                               extremes)
        return Observation(self.numel(name), self.tensor_stats(name), self.extreme_range(name), channels, extra,
                           extremes)

    def check_model(self, expected: dict[str, Any]) -> None:
        """Refuse statistics of another model: every key of ``expected`` must match the recorded meta."""
        for key, value in expected.items():
            recorded = self.meta.get(key, RECORDED_BEFORE.get(key))
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
        return name in self.states

    def calibration_images(self) -> list[str]:
        """The images the statistics were collected on (``<wnid>/<file>``), empty when the folder does not say."""
        path = self.folder / CALIBRATION_FILE
        if path.is_file():
            return json.loads(path.read_text())
        legacy = self.folder / LEGACY_CALIBRATION_FILE
        return legacy.read_text().split("\n")[:-1] if legacy.is_file() else []

    @property
    def lists_calibration(self) -> bool:
        return (self.folder / CALIBRATION_FILE).is_file() or (self.folder / LEGACY_CALIBRATION_FILE).is_file()

    def check_calibration(self) -> None:
        """The calibration list, when there is one, names as many images as ``meta.json`` counts, each once; a
        folder of this release whose meta says where it calibrated must have one."""
        if not self.lists_calibration:
            if "files" in self.meta and self.meta.get("calibration") is not None:
                raise StatisticsError(f"{self.folder / CALIBRATION_FILE} is missing, but {META_FILE} says the "
                                      "statistics were calibrated on listed images; collect them again")
            return
        try:
            names = self.calibration_images()
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StatisticsError(f"{self.folder / CALIBRATION_FILE} is unreadable: {err}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise StatisticsError(f"{self.folder / CALIBRATION_FILE} must be a JSON list of image names")
        if len(names) != self.meta.get("images") or len(set(names)) != len(names):
            raise StatisticsError(f"the calibration list of {self.folder} names {len(names)} images "
                                  f"({len(set(names))} distinct), but {META_FILE} counts {self.meta.get('images')!r}; "
                                  "collect the statistics again")

    def missing(self, name: str) -> bool:
        """Whether ``name`` should have statistics and has none: neither collected nor recorded as never called
        by the forward (folders of earlier releases do not record that, so nothing counts as missing there)."""
        unobserved = self.meta.get("unobserved")
        return unobserved is not None and name not in self.states and name not in unobserved


def _merge(first: Any, second: Any) -> Any:
    """One observer collected at two granularities: per-tensor and per-channel moments make one ``Moments``."""
    if isinstance(first, Moments) and isinstance(second, Moments):
        return Moments(summary=first.summary if first.summary is not None else second.summary,
                       channel_summary=first.channel_summary if first.channel_summary is not None
                       else second.channel_summary)
    raise ObserverError(f"observer state {type(first).__name__} is listed twice")


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """Short sha256 over a statistics folder's files (names and bytes): which statistics a result came from."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).expanduser().iterdir()):
        if path.is_file():
            digest.update(f"{path.name}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _load_state(folder: Path, layer: str, observer: str, granularity: Granularity) -> Any:
    """One observer's state of one layer; a file it cannot parse is named in the error."""
    try:
        return observer_class(observer).load(folder, layer, granularity)
    except (StatisticsError, ObserverError):
        raise
    except (OSError, KeyError, TypeError, ValueError) as err:
        files = sorted(p.name for p in folder.glob(f"{layer}_{observer}*")) or \
            sorted(p.name for p in folder.glob(f"{layer}*") if p.name.removeprefix(layer)[:1] in (".", "_"))
        raise StatisticsError(f"statistics in {folder}: {', '.join(files)} ({observer} of {layer}) unreadable: "
                              f"{type(err).__name__}: {err}") from err


def load_statistics(folder: str | os.PathLike) -> Statistics:
    """Read a statistics folder (format 1 or 2); clear one-line errors when it is not one."""
    folder = Path(folder).expanduser()
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise StatisticsError(f"no statistics in {folder} (no {META_FILE}); run with -sm collect first")
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise StatisticsError(f"{meta_path} is not a statistics description (a JSON object)")
        images = meta.get("images")
        if isinstance(images, bool) or not isinstance(images, int) or images < 1:
            raise StatisticsError(f"{meta_path}: 'images' must be a positive count, got {images!r}")
        verify_files(folder, meta)
        if meta.get("format") not in READABLE_FORMATS:
            raise StatisticsError(
                f"{meta_path} has layout format {meta.get('format')!r}; this release reads formats "
                f"{', '.join(map(str, READABLE_FORMATS))}: collect them again with -sm collect"
            )
        observers = [(o["name"], Granularity.parse(o["granularity"]))
                     for o in meta.get("observers", FORMAT_1_OBSERVERS)]
        states = {}
        for layer in meta["layers"]:
            loaded: dict[str, Any] = {}
            for name, granularity in observers:
                state = _load_state(folder, layer["name"], name, granularity)
                loaded[name] = _merge(loaded[name], state) if name in loaded else state
            states[layer["name"]] = loaded
    except StatisticsError:
        raise
    except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        message = str(err) if isinstance(err, ObserverError) else f"{type(err).__name__}: {err}"
        raise StatisticsError(f"statistics in {folder} are unreadable: {message}") from err
    stats = Statistics(folder, meta, states)
    stats.check_calibration()
    return stats
