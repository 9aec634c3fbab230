"""optimal_alpha.ipynb runs top to bottom in a fresh kernel and prints the seed's constants."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install nbclient)")
nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install nbformat)")
pytest.importorskip("ipykernel", reason="ipykernel is not installed: the notebook needs a python3 kernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "optimal_alpha.ipynb"
SEED = {"laplace": [2.83, 3.89, 5.03, 6.20, 7.41, 8.64, 9.89], "gaus": [1.71, 2.15, 2.55, 2.93, 3.28, 3.61, 3.92]}


def _tagged_text(nb, tag: str) -> str:
    cell = next(c for c in nb.cells if tag in c.get("metadata", {}).get("tags", []))
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _constants(text: str) -> dict[str, list[float]]:
    """Parse the constants table the notebook prints: header row of columns, then one row per bit width."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    header = next(line for line in lines if line[:2] == ["laplace", "gaus"])
    rows = [line for line in lines if line[0].isdigit() and len(line) == len(header) + 1]
    assert [int(r[0]) for r in rows] == list(range(2, 9)), text
    return {name: [float(r[1 + i]) for r in rows] for i, name in enumerate(header)}


def _check_constants(text: str) -> None:
    table = _constants(text)
    for prior, seed in SEED.items():
        for value, expected in zip(table[prior], seed, strict=True):
            assert abs(value - expected) <= 0.01, (prior, value, expected)


def test_committed_notebook_has_its_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code), "run the notebook and save it with its outputs"
    assert sum(bool(c.outputs) for c in code) >= len(code) - 1  # only the import cell prints nothing
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
    _check_constants(_tagged_text(nb, "constants"))


def test_notebook_executes_headless(tmp_path, monkeypatch):
    # A kernelspec named python3 that runs *this* interpreter (the venv with ipykernel and the package),
    # first on JUPYTER_PATH so a user-level python3 kernel elsewhere cannot be picked instead.
    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)",
        "language": "python",
        "env": {"PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"},
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=120, record_timing=False, resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()
    _check_constants(_tagged_text(nb, "constants"))
    gemmlowp = _tagged_text(nb, "gemmlowp")
    assert "synthetic" in gemmlowp and "in-range measured/theory" in gemmlowp
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 4
