"""Dtypes: float32 and float64 throughout; bfloat16 parameters with float32
curvature, CG and damping.

Policy (documented in ``scale_by_hessian_free``): the Hessian-free engine and
everything built on it compute in the parameters' dtype but at least float32;
bfloat16 parameters are upcast for the curvature products, CG and damping,
and only the update is cast back. First-order transforms keep optax's rule:
state and updates follow the parameters' dtype.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature
from helpers import flat
from helpers import mlp_predict
from helpers import regression_problem
from test_contract import TRANSFORMS
from test_contract import _with_learning_rate

LOSS = curvature.losses.squared_error
NAMES = sorted(TRANSFORMS)


def _loss(params, batch):
  return LOSS.value(mlp_predict(params, batch), batch["targets"])


def _problem(dtype, batch_dtype=None):
  params, batch = regression_problem(n=16, sizes=(3, 6, 2), dtype=jnp.float32)
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  batch = jax.tree.map(lambda x: x.astype(batch_dtype or dtype), batch)
  return params, batch


def _optimizer(name):
  factory, kwargs = TRANSFORMS[name]
  return _with_learning_rate(name, factory(**kwargs))


def _floating_dtypes(tree):
  return {jnp.dtype(x.dtype) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)}


def _shapes_of_one_step(opt, params, batch):
  """(updates, new state) as ShapeDtypeStructs: traced, never compiled."""
  def step(params):
    state = opt.init(params)
    grads = jax.grad(_loss)(params, batch)
    return opt.update(grads, state, params, batch=batch)
  return jax.eval_shape(step, params)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", NAMES)
def test_state_and_updates_follow_param_dtype(name, dtype):
  """No silent upcast (float32 stays float32 with x64 on) and no downcast."""
  opt = _optimizer(name)
  params, batch = _problem(dtype)
  updates, state = _shapes_of_one_step(opt, params, batch)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype
  assert _floating_dtypes(state) <= {jnp.dtype(dtype)}, _floating_dtypes(state)
  assert _floating_dtypes(opt.init(params)) <= {jnp.dtype(dtype)}


def _hessian_free_state(state):
  return [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, curvature.ScaleByHessianFreeState))
          if isinstance(s, curvature.ScaleByHessianFreeState)][0]


# The Hessian-free engine and the natural gradient built on it.
MIXED_PRECISION = ["hessian_free", "natural_gradient"]


@pytest.mark.parametrize("name", MIXED_PRECISION)
def test_bfloat16_params_float32_curvature(name):
  """bfloat16 params: float32 state; the update is bfloat16 and is exactly
  the float32 computation at the same (upcast) parameters, cast back."""
  opt = _optimizer(name)
  params16, batch = _problem(jnp.bfloat16, batch_dtype=jnp.float32)
  params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params16)

  def step(params):
    state = opt.init(params)
    grads = jax.grad(_loss)(params, batch)
    return opt.update(grads, state, params, batch=batch)

  updates16, state16 = jax.jit(step)(params16)
  updates32, _ = jax.jit(step)(params32)
  assert {x.dtype for x in jax.tree.leaves(updates16)} == {jnp.dtype("bfloat16")}
  hf16 = _hessian_free_state(state16)
  assert _floating_dtypes(hf16) == {jnp.dtype(jnp.float32)}
  # The bfloat16 gradient differs from the float32 one only by its rounding,
  # which the solve may amplify a little: compare norm-wise.
  u16 = flat(updates16).astype(np.float32)
  u32 = flat(updates32).astype(np.float32)
  assert np.linalg.norm(u16 - u32) < 0.05 * np.linalg.norm(u32)
  assert np.all(np.isfinite(flat(updates16).astype(np.float32)))


def test_bfloat16_update_is_float32_solve_of_bfloat16_gradient():
  """Exactly the float32 solve: same gradient in, same float32 CG, cast out."""
  opt = _optimizer("gauss_newton")
  params16, batch = _problem(jnp.bfloat16, batch_dtype=jnp.float32)
  params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params16)
  grads16 = jax.grad(_loss)(params16, batch)
  grads32 = jax.tree.map(lambda x: x.astype(jnp.float32), grads16)
  update = jax.jit(lambda p, g: opt.update(g, opt.init(p), p, batch=batch)[0])
  out16 = update(params16, grads16)
  out32 = update(params32, grads32)
  expected = jax.tree.map(lambda x: x.astype(jnp.bfloat16), out32)
  np.testing.assert_array_equal(flat(out16).astype(np.float32),
                                flat(expected).astype(np.float32))


def test_bfloat16_hessian_free_trains():
  """A few bfloat16 Hessian-free steps lower the loss and stay finite."""
  opt = _optimizer("hessian_free")
  params, batch = _problem(jnp.bfloat16, batch_dtype=jnp.float32)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(_loss)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, value

  values = []
  for _ in range(4):
    params, state, value = step(params, state)
    values.append(float(value))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  assert np.all(np.isfinite(flat(params).astype(np.float32)))
  assert values[-1] < 0.8 * values[0], values
  assert int(_hessian_free_state(state).rejected_steps) == 0


@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "kfac",
                                  "scale_by_curvature_diagonal"])
def test_bfloat16_other_transforms(name):
  """Others: bfloat16 updates; first-order state follows params (optax)."""
  opt = _optimizer(name)
  params, batch = _problem(jnp.bfloat16, batch_dtype=jnp.float32)
  updates, _ = _shapes_of_one_step(opt, params, batch)
  assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype("bfloat16")}


def test_bfloat16_kfac_accumulates_in_float32():
  """K-FAC factors, inverses and diagonal live in float32 for bfloat16
  params; the bfloat16 update is the float32 computation cast back."""
  opt = _optimizer("kfac")
  params16, batch = _problem(jnp.bfloat16, batch_dtype=jnp.float32)
  params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params16)
  grads16 = jax.grad(_loss)(params16, batch)
  grads32 = jax.tree.map(lambda x: x.astype(jnp.float32), grads16)
  step = jax.jit(lambda p, g: opt.update(g, opt.init(p), p, batch=batch))
  out16, state16 = step(params16, grads16)
  out32, _ = step(params32, grads32)
  kfac_state = [s for s in jax.tree.leaves(
      state16, is_leaf=lambda x: hasattr(x, "rejected_refreshes"))
      if hasattr(s, "rejected_refreshes")][0]
  statistics = jax.tree.leaves((kfac_state.blocks, kfac_state.diagonal))
  assert statistics and {x.dtype for x in statistics} == {
      jnp.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(out16)} == {jnp.dtype("bfloat16")}
  u16 = flat(out16).astype(np.float32)
  u32 = flat(out32).astype(np.float32)
  assert np.all(np.isfinite(u16))
  # The forward pass itself runs in bfloat16, so compare norm-wise.
  assert np.linalg.norm(u16 - u32) < 0.05 * np.linalg.norm(u32)
