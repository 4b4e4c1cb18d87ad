"""The Flax examples: linen TrainState and nnx.Optimizer with curvature
optimizers chained with clip_by_global_norm, a schedule and MultiSteps."""

import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import flat

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import flax_training  # noqa: E402  pylint: disable=g-import-not-at-top

DATA = flax_training.make_data(jax.random.key(42), num_examples=256)


@pytest.mark.parametrize("name", ["hessian_free", "adam"])
@pytest.mark.parametrize("train", [flax_training.train_linen,
                                   flax_training.train_nnx])
def test_training_lowers_the_loss(train, name):
  _, values = train(name, DATA, epochs=3, batch_size=32)
  assert np.all(np.isfinite(values))
  first, last = np.mean(values[:8]), np.mean(values[-8:])  # First/last epoch.
  assert last < (0.5 if name == "hessian_free" else 0.9) * first, values


def test_linen_multisteps_steps_every_k_and_forwards_batch():
  batches = flax_training.batches(DATA, 32)
  state, predict = flax_training.create_linen_state(
      jax.random.key(0), batches[0], "hessian_free", every_k=2)
  step = flax_training.make_linen_step(predict)
  state1, _ = step(state, batches[0])
  np.testing.assert_array_equal(flat(state1.params), flat(state.params))
  state2, _ = step(state1, batches[1])
  assert not np.allclose(flat(state2.params), flat(state1.params))
  hf = _hessian_free_state(state2.opt_state)
  assert int(hf.count) == 1 and int(hf.rejected_steps) == 0
  assert int(hf.cg_iterations) > 0  # The batch reached the curvature.


def test_nnx_multisteps_steps_every_k_and_forwards_batch():
  batches = flax_training.batches(DATA, 32)
  model, optimizer = flax_training.create_nnx_optimizer(0, "hessian_free", 2)
  params0 = flat(nnx.state(model, nnx.Param))
  flax_training.nnx_step(model, optimizer, batches[0])
  np.testing.assert_array_equal(flat(nnx.state(model, nnx.Param)), params0)
  flax_training.nnx_step(model, optimizer, batches[1])
  assert not np.allclose(flat(nnx.state(model, nnx.Param)), params0)
  hf = _hessian_free_state(nnx.as_pure(optimizer.opt_state))
  assert int(hf.count) == 1 and int(hf.cg_iterations) > 0


def _hessian_free_state(opt_state):
  import curvature  # pylint: disable=g-import-not-at-top
  is_hf = lambda x: isinstance(x, curvature.ScaleByHessianFreeState)
  return [s for s in jax.tree.leaves(opt_state, is_leaf=is_hf) if is_hf(s)][0]


def test_unknown_optimizer_name():
  with pytest.raises(ValueError, match="hessian_free"):
    flax_training.make_optimizer(lambda p, b: b, "lbfgs")
