"""The contract every public transform keeps.

Each transform runs inside one jitted train step, inside ``optax.chain`` with
``optax.clip_by_global_norm``, does not recompile on the second ``update``,
works under ``inject_hyperparams``, and keeps all of its state in the optax
state (``init(params)`` is enough).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature
from curvature import losses
import helpers
from helpers import CONTRACTS
from helpers import flat
from helpers import mlp_predict
from helpers import regression_problem

LOSS = losses.squared_error
# The table lives in helpers.py (typed rows with capability flags); these
# names stay importable from here for the other table tests.
TRANSFORMS = helpers.TRANSFORMS
_with_learning_rate = helpers.with_learning_rate
NAMES = helpers.contract_names()


def _problem():
  params, batch = regression_problem(n=16, sizes=(3, 6, 2), dtype=jnp.float32)
  return params, batch


def _loss(params, batch):
  return LOSS.value(mlp_predict(params, batch), batch["targets"])


def _train_step(opt):
  traces = []

  @jax.jit
  def step(params, state, batch):
    traces.append(1)
    value, grads = jax.value_and_grad(_loss)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch, value=value)
    return optax.apply_updates(params, updates), state, value

  return step, traces


@pytest.mark.parametrize("name", NAMES)
def test_jit_chain_and_no_recompilation(name):
  opt = optax.chain(optax.clip_by_global_norm(10.0), CONTRACTS[name].build())
  params, batch = _problem()
  state = opt.init(params)  # init(params) is enough.
  step, traces = _train_step(opt)
  values = []
  for k in range(3):
    shifted = dict(batch, inputs=batch["inputs"] + 0.01 * k)
    params, state, value = step(params, state, shifted)
    values.append(float(value))
  assert len(traces) == 1, "the second update recompiled"
  assert np.all(np.isfinite(flat(params)))
  assert all(jnp.dtype(x.dtype) == jnp.float32 for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams(name):
  row = CONTRACTS[name]
  injected = curvature.inject_hyperparams(row.factory)(**row.kwargs)
  opt = optax.chain(helpers.with_learning_rate(name, injected))
  params, batch = _problem()
  state = opt.init(params)
  inject_states = [
      s for s in jax.tree.leaves(
          state, is_leaf=lambda x: hasattr(x, "hyperparams"))
      if hasattr(s, "hyperparams")]
  hyperparams = inject_states[0].hyperparams
  step, traces = _train_step(opt)
  params1, state1, _ = step(params, state, batch)
  params2, _, _ = step(params1, state1, batch)
  assert len(traces) == 1
  assert np.all(np.isfinite(flat(params2)))
  # At least one numeric hyperparameter is injected, where there are any.
  assert bool(hyperparams) == row.numeric_hyperparameters


@pytest.mark.parametrize("name", helpers.contract_names(
    lambda row: "learning_rate" in row.kwargs))
def test_injected_learning_rate_is_used(name):
  row = CONTRACTS[name]
  opt = curvature.inject_hyperparams(row.factory)(**row.kwargs)
  params, batch = _problem()
  state = opt.init(params)
  grads = jax.grad(_loss)(params, batch)
  full, _ = opt.update(grads, state, params, batch=batch)
  state.hyperparams["learning_rate"] = 0.5 * state.hyperparams["learning_rate"]
  half, _ = opt.update(grads, state, params, batch=batch)
  np.testing.assert_allclose(flat(half), 0.5 * flat(full), rtol=1e-5,
                             atol=1e-7)
