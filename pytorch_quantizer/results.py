"""What a pass measured and the results rows a run appends: ``Accuracy``, the seed's closing line, and
``Recorder``, which writes one row per pass with every setting of the run and its provenance."""

from __future__ import annotations

import csv
import fcntl
import io
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from . import __version__
from .atomic import atomic_write, write_csv_atomic
from .config import RunConfig, flatten

# What a results row measured, first; then every setting of the run (RunConfig's field paths) and its identity.
PASS_COLUMNS = ("arch", "weights", "pass", "qtype", "qweight", "threshold", "top1", "top5", "top1_se", "top5_se",
                "images", "seconds", "cal_seconds", "top1_agreement", "sqnr_db", "max_logit_diff", "kept_8bit", "file")
IDENTITY_COLUMNS = ("weights_fingerprint", "stats_folder", "stats_fingerprint", "cal_images", "eval_images",
                    "settings", "version")
PER_PASS = ("act.bits", "weight.bits", "weight.bias_bits")  # each row's qtype / qweight say them


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

    @property
    def prec1_se(self) -> float:
        """The binomial standard error of top-1, in points (``binomial_se``)."""
        return binomial_se(self.top1, self.images)

    @property
    def prec5_se(self) -> float:
        """The binomial standard error of top-5, in points (``binomial_se``)."""
        return binomial_se(self.top5, self.images)


def binomial_se(hits: int, images: int) -> float:
    """The binomial standard error of an accuracy of ``hits`` out of ``images``, in percentage points:
    ``100 sqrt(p (1 - p) / n)`` with ``p = hits / n`` (0.84 at 80 % of 2277 images, 2.3 at 80 % of 300).

    Every accuracy the tool prints, writes or draws carries it, so that a reader of a 300-image table does not have
    to work out whether two rows differ by more than the image set's luck.  It is the sampling error of *this* image
    set, as if its images were drawn at random from a larger pool; it is not a confidence interval of the method on
    ImageNet (a subset of easier or harder images shifts every row alike, which no error bar shows), and for two
    passes over the same images it overstates the error of their difference, which is paired.  0 for no image."""
    if images <= 0:
        return 0.0
    p = hits / images
    return 100.0 * math.sqrt(p * (1.0 - p) / images)


ACCURACY_COLUMNS = ("top1", "top5", "top1_se", "top5_se")  # every table of accuracies has them, in this order


def accuracy_cells(acc: Accuracy) -> dict[str, float]:
    """Top-1 and top-5 and their binomial standard errors (``ACCURACY_COLUMNS``), in points, to 3 decimals: the
    cells of a results row and of every table a run writes."""
    values = (acc.prec1, acc.prec5, acc.prec1_se, acc.prec5_se)
    return {name: round(value, 3) for name, value in zip(ACCURACY_COLUMNS, values, strict=True)}


def final_line(acc: Accuracy) -> str:
    """The seed's closing line, exactly (scripts and tests parse it; the error goes on ``error_line``)."""
    return f" * Prec@1 {acc.prec1:.3f} Prec@5 {acc.prec5:.3f}"


def error_line(acc: Accuracy, who: str = "") -> str:
    """The line under a closing line: the binomial standard errors of its two accuracies and the image count;
    ``who`` names whose accuracies they are when the line above does (``"ONNX Runtime "``)."""
    return (f" * {who}binomial standard error: Prec@1 ±{acc.prec1_se:.2f} Prec@5 ±{acc.prec5_se:.2f} "
            f"({acc.images} images)")


def qtype_name(bits: int | None) -> str:
    return "fp32" if bits is None else f"int{bits}"


def _cell(value: Any) -> Any:
    """A config value as a CSV cell: paths and tuples as text, None as empty."""
    if value is None:
        return ""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | frozenset):
        return " ".join(map(str, value))
    return value


def config_columns(cfg: RunConfig) -> dict[str, Any]:
    """Every setting of the run, by field path, from the validated configuration itself (no hand-kept list)."""
    return {name: _cell(value) for name, value in flatten(cfg).items() if name not in PER_PASS}


RESULTS_HEADER_START = ("arch", "weights", "pass")  # every release's results file starts with these columns


class ResultsFileError(ValueError):
    """An output path this tool cannot write, or a ``--results`` file that is not one of its results files."""


def _header(path: Path) -> list[str] | None:
    """The columns of an existing results file (None: absent or empty), read from its first line only."""
    if not path.exists():
        return None
    if not path.is_file():
        raise ResultsFileError(f"--results {path} is not a regular file; give a .csv file path")
    with path.open("rb") as handle:
        first = handle.readline(1 << 20)
    if not first.strip():
        return None
    try:
        line = first.decode("utf-8")
    except UnicodeDecodeError:
        raise ResultsFileError(f"--results {path} is not a results CSV (not text); give another file") from None
    columns = next(csv.reader([line]))
    if tuple(columns[: len(RESULTS_HEADER_START)]) != RESULTS_HEADER_START:
        raise ResultsFileError(f"--results {path} is not a results CSV of this tool (its header starts "
                               f"{','.join(columns[:3])!r}, not {','.join(RESULTS_HEADER_START)!r}); give another file")
    return columns


def check_writable_folder(folder: Path, flag: str) -> None:
    """``folder`` can be written into or created: its nearest existing ancestor is a folder we may write in (a
    ``ValueError`` naming ``flag`` otherwise).  Creates nothing."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise ResultsFileError(f"{flag}: cannot write into {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ResultsFileError(f"{flag}: cannot write into {folder}: {existing} is not writable")


def check_results_file(path: Path) -> None:
    """Refuse, before any pass, a results path that cannot take a row: a directory or device, a file that is not
    ours or not writable, a parent that is a file or not writable."""
    path = Path(path)
    _header(path)
    if path.exists() and not os.access(path, os.W_OK):
        raise ResultsFileError(f"--results {path} is not writable")
    check_writable_folder(path.parent, f"--results {path}")


def _line(values: Iterable[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(["" if v is None else v for v in values])
    return buffer.getvalue()


def append_result(path: Path, row: dict) -> None:
    """Append one row to the results CSV, safe against other runs appending to the same file at once.

    Under an exclusive ``fcntl`` lock on a sidecar ``.<name>.lock`` file, the header (the first line only) is
    read; a row whose columns the header has is appended as one whole line, with empty cells for the header's
    columns it lacks.  A row with a column the file lacks (a file of an older release) rewrites the file once,
    atomically, with the new column empty in the older rows.  A new or empty file gets the header first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            header = _header(path)
            if header is None:
                atomic_write(path, lambda tmp: Path(tmp).write_text(_line(row) + _line(row.values()),
                                                                      encoding="utf-8"))
            elif set(row) <= set(header):
                with path.open("a", encoding="utf-8") as handle:
                    handle.write(_line(row.get(name, "") for name in header))
                    handle.flush()
                    os.fsync(handle.fileno())
            else:
                frame = pd.concat([pd.read_csv(path, keep_default_na=False, dtype=str),
                                   pd.DataFrame([row]).astype(str)], ignore_index=True).fillna("")
                write_csv_atomic(frame, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Recorder:
    """The results rows of one run: ``record`` appends one per pass (on rank 0) and keeps them all in ``rows``."""

    def __init__(self, cfg: RunConfig, identity, settings: str, write: bool) -> None:
        """``identity()``: the provenance columns at the time of the row (statistics may be collected mid-run);
        ``settings``: the settings hash; ``write``: whether this process appends (rank 0)."""
        self.cfg, self.identity, self.settings, self.write = cfg, identity, settings, write
        self.rows: list[dict] = []

    def record(self, measured, name: str, bits: int | None, weight_bits: int | None, kept: Iterable[str] = (),
               file: Path | None = None, method: str | None = None) -> dict:
        """One row for a pass (``passes.Measured``): its name, widths, the layers it kept at 8 bits, the file it
        wrote and the clipping method when it is not the run's."""
        cfg, acc, agreement = self.cfg, measured.acc, measured.agreement
        row = {
            "arch": cfg.arch, "weights": cfg.weights, "pass": name, "qtype": qtype_name(bits),
            "qweight": qtype_name(weight_bits), "threshold": cfg.act.method if method is None else method,
            **accuracy_cells(acc), "images": acc.images, "seconds": round(measured.seconds, 2),
            "cal_seconds": "" if getattr(measured, "cal_seconds", None) is None else round(measured.cal_seconds, 2),
            "top1_agreement": "" if agreement is None else round(agreement.top1_agreement, 3),
            "sqnr_db": "" if agreement is None else round(agreement.sqnr_db, 3),
            "max_logit_diff": "" if agreement is None else float(f"{agreement.max_abs_diff:.6g}"),
            "kept_8bit": " ".join(kept), "file": "" if file is None else str(file),
        }
        row.update({k: v for k, v in config_columns(cfg).items() if k not in row})
        row.update(self.identity())
        row.update({"settings": self.settings, "version": __version__})
        if self.write:
            append_result(cfg.results, row)
        self.rows.append(row)
        return row
