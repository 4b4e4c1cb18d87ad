"""Every notebook in ``notebooks/`` runs top to bottom in fast mode.

Each notebook is executed with ``nbclient`` in a temporary copy of the
folder (``CURVATURE_FAST=1`` in the kernel's environment), so the committed
outputs and figures are never overwritten; any cell error fails the test.
"""

import os
import pathlib
import shutil

import nbclient
import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))


def test_notebooks_exist():
  assert len(PATHS) >= 4, PATHS


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs_in_fast_mode(path, tmp_path, monkeypatch):
  work = tmp_path / "notebooks"
  shutil.copytree(NOTEBOOKS, work,
                  ignore=shutil.ignore_patterns("figures", ".ipynb_checkpoints"))
  monkeypatch.setenv("CURVATURE_FAST", "1")  # inherited by the kernel
  monkeypatch.setenv("MPLBACKEND", "Agg")
  notebook = nbformat.read(work / path.name, as_version=4)
  client = nbclient.NotebookClient(
      notebook, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": str(work)}})
  client.execute()  # raises CellExecutionError on any cell error
  outputs = [o for cell in notebook.cells if cell.cell_type == "code"
             for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  assert "fast mode" in "".join(o.get("text", "") for o in outputs)
  assert list((work / "figures").glob("*.png")), "no figure was saved"
  assert os.environ["CURVATURE_FAST"] == "1"
