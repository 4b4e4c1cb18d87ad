"""Optimizer states round-trip through orbax-checkpoint.

Every state is a pytree of arrays (PRNG keys are typed key arrays), so
``orbax.checkpoint.StandardCheckpointer`` saves it as is and restores it
against a target: the concrete state, or ``jax.eval_shape(opt.init, params)``
when restoring into a fresh process. Typed keys need no conversion with
orbax >= 0.12 (tested here); without a target orbax returns plain dicts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from helpers import mlp_predict
from helpers import regression_problem
from test_contract import TRANSFORMS
from test_contract import _with_learning_rate

LOSS = TRANSFORMS["hessian_free"][1]["loss"]


def _problem():
  return regression_problem(n=16, sizes=(3, 6, 2), dtype=jnp.float32)


def _loss(params, batch):
  return LOSS.value(mlp_predict(params, batch), batch["targets"])


def _optimizer(name):
  factory, kwargs = TRANSFORMS[name]
  return _with_learning_rate(name, factory(**kwargs))


def _scramble(state):
  """Distinct, non-trivial values in every leaf, without running a step."""
  leaves, treedef = jax.tree.flatten(state)
  out = []
  for i, leaf in enumerate(leaves):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      out.append(jax.random.fold_in(leaf, i + 1))
    elif jnp.issubdtype(leaf.dtype, jnp.bool_):
      out.append(~leaf)
    else:
      ramp = jnp.arange(leaf.size, dtype=leaf.dtype).reshape(leaf.shape)
      out.append(leaf + ramp + jnp.asarray(i + 1, leaf.dtype))
  return jax.tree.unflatten(treedef, out)


def _bits(tree):
  """Leaves as NumPy arrays, keys as their raw key data, for exact compares."""
  def raw(leaf):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)
  return [raw(leaf) for leaf in jax.tree.leaves(tree)]


def _assert_bit_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(_bits(a), _bits(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def _save_and_restore(path, tree, target):
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tree)
  checkpointer.wait_until_finished()
  return checkpointer.restore(path, target)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_state_round_trips(name, tmp_path):
  """Every leaf, key arrays included, comes back bit for bit, with its
  dtype and the state's NamedTuple structure, into an abstract target."""
  opt = _optimizer(name)
  params, _ = _problem()
  state = _scramble(opt.init(params))
  abstract = jax.eval_shape(opt.init, params)
  restored = _save_and_restore(tmp_path / "state", state, abstract)
  _assert_bit_identical(state, restored)
  assert type(restored) is type(state)


def _run(step, params, state, batches):
  for batch in batches:
    params, state = step(params, state, batch)
  return params, state


# Transforms with keys, warm starts, factor EMAs and inverses refreshed every
# other step, moments, and optax's own stateful wrappers.
RESUMED = ["hessian_free_sampled_fisher", "natural_gradient_sampled", "kfac",
           "scale_by_curvature_diagonal_hutchinson", "adam"]


@pytest.mark.parametrize("name", RESUMED)
def test_resume_is_bit_identical(name, tmp_path):
  """Stopped at step k = 3, saved, restored: the next steps are identical."""
  opt = optax.chain(optax.clip_by_global_norm(1.0), _optimizer(name))
  params, batch = _problem()
  batches = [dict(batch, inputs=batch["inputs"] + 0.1 * k) for k in range(6)]

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(_loss)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  state0 = opt.init(params)
  expected = _run(step, params, state0, batches)

  stopped = _run(step, params, state0, batches[:3])
  target = (jax.eval_shape(lambda: params),
            jax.eval_shape(opt.init, params))
  restored = _save_and_restore(tmp_path / "step3", stopped, target)
  _assert_bit_identical(stopped, restored)
  resumed = _run(step, *restored, batches[3:])
  _assert_bit_identical(expected, resumed)
