"""The notebooks run top to bottom (offline, on the embedded model, with a small limit)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_every_notebook_is_collected():
    assert {p.stem for p in NOTEBOOKS} >= {"acceptance_rates", "multidraft_bound", "tree_budget"}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch):
    # the kernel inherits these: one prompt per dataset, a few tokens, few Monte Carlo samples
    monkeypatch.setenv("SPECDEC_NB_LIMIT", "1")
    monkeypatch.setenv("SPECDEC_NB_MAX_NEW_TOKENS", "8")
    monkeypatch.setenv("SPECDEC_NB_SAMPLES", "8")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2, "every notebook draws at least two figures"
