"""Multi-process training on JAX's distributed runtime equals one process.

``examples/multiprocess_training.py`` runs two processes on this machine
(``jax.distributed.initialize`` on localhost, Gloo CPU collectives, two local
devices each: four global devices); each feeds only its own shard of the
global batch through ``jax.make_array_from_process_local_data``. Hessian-free,
adaptive K-FAC and Adam must end where a single process ends after the same
steps on the whole global batch, to float64 rounding.
"""

import importlib.util
import pathlib

import jax
import numpy as np

EXAMPLE = (pathlib.Path(__file__).parent.parent / "examples"
           / "multiprocess_training.py")
STEPS = 3


def _example():
  spec = importlib.util.spec_from_file_location("multiprocess_training",
                                                EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
  example = _example()
  out = tmp_path / "final.npz"
  log = example.launch(STEPS, str(out))
  assert "kfac: loss after" in log, log
  distributed = np.load(out)

  params, batch = example.make_problem()
  for name, optimizer in example.optimizers().items():
    final, _ = example.train(optimizer, params, batch, STEPS)
    leaves = jax.tree.leaves(final)
    for i, leaf in enumerate(leaves):
      np.testing.assert_allclose(
          distributed[f"{name}/{i}"], np.asarray(leaf), rtol=1e-9,
          atol=1e-11, err_msg=f"{name}, leaf {i}")
    # The run moved the parameters: the comparison is not vacuous.
    start = jax.tree.leaves(params)
    assert max(float(np.max(np.abs(a - b))) for a, b in
               zip(leaves, start)) > 1e-3, name
