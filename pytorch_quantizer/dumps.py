"""The activation dump format of ``inference_sim.py -dd DIR``: one ``<layer>.npz`` per hooked layer holding
``fp32`` (the layer's output without quantization) and ``quantized`` (with it), for one batch.

Written here by the passes (``passes.dump``), read here by the report (``report.py --dumps``) and by ``mse_analysis.py
--dumps``: one writer, one reader.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .atomic import atomic_write

SUFFIX = ".npz"
FP32, QUANTIZED = "fp32", "quantized"


class DumpError(ValueError):
    """A dump folder or file that is missing or does not hold what a dump holds."""


def dump_path(folder: Path, layer: str) -> Path:
    return Path(folder) / f"{layer}{SUFFIX}"


def write_dump(folder: Path, layer: str, fp32: np.ndarray, quantized: np.ndarray) -> Path:
    """Write one layer's dump atomically (compressed)."""
    return atomic_write(
        dump_path(folder, layer), lambda tmp: np.savez_compressed(tmp, **{FP32: fp32, QUANTIZED: quantized}),
        suffix=SUFFIX,
    )


def read_fp32(path: Path) -> np.ndarray:
    """The ``fp32`` array of one dump file."""
    with np.load(path) as data:
        if FP32 not in data:
            raise DumpError(f"{path} has no '{FP32}' array (keys: {', '.join(data.files)}): not a -dd dump")
        return data[FP32]


def natural_key(name: str) -> list:
    """conv2 before conv10: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def dumped_layers(folder: Path) -> list[str]:
    """Names of the layers dumped in ``folder``, in layer order (conv2 before conv10)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DumpError(f"dump folder {folder} does not exist")
    return sorted((p.stem for p in folder.glob(f"*{SUFFIX}")), key=natural_key)


def load_fp32(folder: Path) -> dict[str, np.ndarray]:
    """``{layer: fp32 activation}`` for every dump in ``folder``, in layer order; an empty folder is an error."""
    layers = dumped_layers(folder)
    if not layers:
        raise DumpError(f"no <layer>{SUFFIX} dump files in {folder}")
    return {layer: read_fp32(dump_path(folder, layer)) for layer in layers}
