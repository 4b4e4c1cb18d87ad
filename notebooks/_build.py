"""Writes the notebooks in this folder from their cells (run from anywhere).

``python notebooks/_build.py`` rewrites ``NN_*.ipynb`` without outputs; execute
them with ``python notebooks/_build.py --execute`` (full mode, in place) to
commit them with outputs.
"""

import os
import pathlib
import sys

import nbformat

HERE = pathlib.Path(__file__).resolve().parent

SETUP = '''\
import os
import functools

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from tqdm.auto import tqdm

import curvature
from curvature import datasets

jax.config.update("jax_enable_x64", True)  # float64: exact 2-D pictures
FAST = os.environ.get("CURVATURE_FAST") == "1"  # CI's fast mode
os.makedirs("figures", exist_ok=True)
print("fast mode" if FAST else "full mode")'''


def notebook(cells):
  nb = nbformat.v4.new_notebook()
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                               "language": "python"}
  for kind, text in cells:
    text = text.strip("\n")
    nb.cells.append(nbformat.v4.new_markdown_cell(text) if kind == "md"
                    else nbformat.v4.new_code_cell(text))
  return nb


def load_cells(name):
  namespace = {"SETUP": SETUP}
  exec((HERE / f"_{name}.py").read_text(), namespace)
  return namespace["CELLS"]


def main(argv):
  names = sorted(p.stem[1:] for p in HERE.glob("_[0-9][0-9]_*.py"))
  only = [a for a in argv if not a.startswith("--")]
  for name in names:
    if only and not any(name.startswith(o) for o in only):
      continue
    path = HERE / f"{name}.ipynb"
    nbformat.write(notebook(load_cells(name)), path)
    if "--execute" in argv:
      import nbclient  # pylint: disable=g-import-not-at-top
      nb = nbformat.read(path, as_version=4)
      nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                              resources={"metadata": {"path": str(HERE)}}
                              ).execute()
      nbformat.write(nb, path)
    print("wrote", path)


if __name__ == "__main__":
  main(sys.argv[1:])
