"""Saddle-free Newton: the dense ``(|H| + λI)⁻¹g`` oracle, escaping a saddle
where Newton is attracted, and non-finite steps."""

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature
from curvature import _saddle_free
from curvature import losses
from helpers import flat
from helpers import mlp_predict
from helpers import regression_problem

LOSS = losses.squared_error


def _dense_saddle_free(params, batch, damping):
  """``−(|H| + λI)⁻¹ g`` from ``jax.hessian`` and ``eigh``."""
  vector, unravel = ravel_pytree(params)
  loss = lambda v: LOSS.value(mlp_predict(unravel(v), batch),
                              batch["targets"])
  grad = np.asarray(jax.grad(loss)(vector))
  hessian = np.asarray(jax.hessian(loss)(vector))
  eigenvalues, eigenvectors = np.linalg.eigh(hessian)
  absolute = (eigenvectors * np.abs(eigenvalues)) @ eigenvectors.T
  return -np.linalg.solve(absolute + damping * np.eye(len(grad)), grad), (
      eigenvalues)


@pytest.mark.parametrize("lanczos_start", _saddle_free.STARTS)
def test_full_subspace_equals_the_dense_step(lanczos_start):
  params, batch = regression_problem(n=6, sizes=(3, 4, 2))
  n = ravel_pytree(params)[0].size
  damping = 0.1
  expected, eigenvalues = _dense_saddle_free(params, batch, damping)
  assert eigenvalues.min() < -1e-3  # An indefinite Hessian: |H| ≠ H.
  opt = curvature.saddle_free_newton(
      predict_fn=mlp_predict, loss=LOSS, num_iterations=n, damping=damping,
      lanczos_start=lanczos_start)
  grads = jax.grad(lambda p: LOSS.value(mlp_predict(p, batch),
                                        batch["targets"]))(params)
  updates, state = jax.jit(lambda s: opt.update(grads, s, params,
                                                batch=batch))(
                                                    opt.init(params))
  np.testing.assert_allclose(flat(updates), expected, rtol=1e-8,
                             atol=1e-10 * np.abs(expected).max())
  np.testing.assert_allclose(np.sort(state[0].ritz_values), eigenvalues,
                             atol=1e-8)
  assert int(state[0].rejected_steps) == 0


def test_subspace_step_is_a_descent_direction_and_projects_exactly():
  """k < n: the step is ``−V Q (|Λ|+λ)⁻¹ Qᵀ Vᵀ g`` of the Lanczos basis."""
  params, batch = regression_problem(n=6, sizes=(3, 4, 2))
  grads = jax.grad(lambda p: LOSS.value(mlp_predict(p, batch),
                                        batch["targets"]))(params)
  opt = curvature.scale_by_saddle_free_newton(
      mlp_predict, LOSS, num_iterations=5, damping=0.1)
  direction, _ = opt.update(grads, opt.init(params), params, batch=batch)
  g = flat(grads)
  assert g @ flat(direction) > 0
  # The same from the dense Hessian and the Krylov basis K_5(H, g).
  vector, unravel = ravel_pytree(params)
  hessian = np.asarray(jax.hessian(lambda v: LOSS.value(
      mlp_predict(unravel(v), batch), batch["targets"]))(vector))
  krylov = np.stack([np.linalg.matrix_power(hessian, j) @ g
                     for j in range(5)], axis=1)
  basis, _ = np.linalg.qr(krylov)
  values, vectors = np.linalg.eigh(basis.T @ hessian @ basis)
  expected = basis @ vectors @ ((vectors.T @ basis.T @ g)
                                / (np.abs(values) + 0.1))
  np.testing.assert_allclose(flat(direction), expected, rtol=1e-6,
                             atol=1e-9)


def test_direction_function_with_a_random_basis():
  """The part of g outside V takes the step 1 / (max|Λ| + λ)."""
  rng = np.random.default_rng(0)
  basis, _ = np.linalg.qr(rng.standard_normal((6, 2)))
  values = np.asarray([-2.0, 0.5])
  vectors, _ = np.linalg.qr(rng.standard_normal((2, 2)))
  g = rng.standard_normal(6)
  got = _saddle_free.saddle_free_direction(
      jnp.asarray(g), jnp.asarray(basis.T), jnp.asarray(values),
      jnp.asarray(vectors), 0.5)
  inside = basis @ vectors @ ((vectors.T @ basis.T @ g) / (np.abs(values)
                                                           + 0.5))
  outside = (g - basis @ basis.T @ g) / 2.5
  np.testing.assert_allclose(got, inside + outside, rtol=1e-12)


def _saddle_model(offset=10.0):
  """``f(x, y) = x² − y² + c``: ½‖√(2(x² − y² + c))‖² with a zero target."""

  def predict(params, batch):
    del batch
    x, y = params[0], params[1]
    return jnp.sqrt(2 * (x * x - y * y + offset))[None, None]

  batch = {"inputs": jnp.zeros((1, 1)), "targets": jnp.zeros((1, 1))}
  return predict, batch


def test_escapes_the_saddle_where_newton_is_attracted():
  predict, batch = _saddle_model()
  loss = lambda p: LOSS.value(predict(p, batch), batch["targets"])
  start = jnp.asarray([0.3, 0.01])
  hessian = np.asarray(jax.hessian(loss)(start))
  np.testing.assert_allclose(hessian, np.diag([2.0, -2.0]), atol=1e-12)
  # Newton: θ − H⁻¹g lands on the saddle (0, 0) in one step.
  newton = np.asarray(start) - np.linalg.solve(
      hessian, np.asarray(jax.grad(loss)(start)))
  np.testing.assert_allclose(newton, [0.0, 0.0], atol=1e-12)
  opt = curvature.saddle_free_newton(predict_fn=predict, loss=LOSS,
                                     num_iterations=2, damping=0.0)
  step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p,
                                         batch=batch))
  params, state = start, opt.init(start)
  path = [np.asarray(params)]
  for _ in range(4):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    path.append(np.asarray(params))
  path = np.stack(path)
  # |H| = 2I: x ← x − x = 0, y ← y + y: away from the saddle along y.
  np.testing.assert_allclose(path[1], [0.0, 0.02], atol=1e-12)
  np.testing.assert_allclose(path[:, 1], 0.01 * 2.0 ** np.arange(5),
                             rtol=1e-10)
  assert loss(params) < loss(start) - 0.01


def test_non_finite_input_is_rejected_and_counted():
  params, batch = regression_problem(n=8, sizes=(3, 2))
  opt = curvature.saddle_free_newton(predict_fn=mlp_predict, loss=LOSS,
                                     num_iterations=4)
  grads = jax.grad(lambda p: LOSS.value(mlp_predict(p, batch),
                                        batch["targets"]))(params)
  update = jax.jit(lambda g, s, b: opt.update(g, s, params, batch=b))
  state = opt.init(params)
  bad_grads = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), grads)
  bad_batch = dict(batch, inputs=batch["inputs"].at[0, 0].set(jnp.inf))
  for k, (g, b) in enumerate([(bad_grads, batch), (grads, bad_batch)]):
    updates, state = update(g, state, b)
    assert np.all(flat(updates) == 0)
    assert int(state[0].rejected_steps) == k + 1
  updates, state = update(grads, state, batch)
  assert np.all(np.isfinite(flat(updates))) and np.any(flat(updates) != 0)
  assert int(state[0].rejected_steps) == 2


def test_zero_gradient_eagerly_is_a_zero_step():
  params, batch = regression_problem(n=8, sizes=(3, 2))
  opt = curvature.scale_by_saddle_free_newton(mlp_predict, LOSS,
                                              num_iterations=3)
  zeros = optax.tree.zeros_like(params)
  updates, state = opt.update(zeros, opt.init(params), params, batch=batch)
  assert np.all(flat(updates) == 0)
  assert int(state.rejected_steps) == 0


def test_num_iterations_is_clipped_to_the_dimension():
  params, batch = regression_problem(n=8, sizes=(2, 1))  # n = 3.
  opt = curvature.scale_by_saddle_free_newton(mlp_predict, LOSS,
                                              num_iterations=20)
  state = opt.init(params)
  assert state.ritz_values.shape == (3,)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lanczos_start="ones"), "lanczos_start.*'gradient', 'random'"),
    (dict(damping=-1.0), "damping.*>= 0"),
    (dict(damping=optax.constant_schedule(0.1)), "damping.*inject_hyperparams"),
    (dict(num_iterations=0), "num_iterations.*>= 1"),
    (dict(learning_rate=-1.0), "learning_rate"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    curvature.saddle_free_newton(predict_fn=mlp_predict, loss=LOSS, **kwargs)

