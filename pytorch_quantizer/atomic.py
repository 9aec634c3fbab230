"""Files written under a temporary name and renamed into place, so that no reader (and no later run) ever sees a
half-written file: an interrupted run leaves the previous file, or none."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd


def atomic_write(path: Path, write: Callable[[str], object], suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it to ``path``.

    ``suffix`` keeps the extension on the temporary name, for writers that add one when it is missing
    (``numpy.savez``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_csv_atomic(frame: pd.DataFrame, path: Path, index: bool = False) -> Path:
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=index))
