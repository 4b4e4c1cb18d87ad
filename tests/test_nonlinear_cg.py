"""Nonlinear CG: linear CG's iterates on a quadratic for every β, PR⁺'s
clipping, restarts, the zoom line search and non-finite steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvature
from curvature import _nonlinear_cg
from curvature import losses
from helpers import flat
from helpers import mlp_predict
from helpers import regression_problem
from test_quasi_newton import _run
from test_quasi_newton import check_monotone_descent
from test_quasi_newton import exact_linesearch
from test_quasi_newton import quadratic_problem

LOSS = losses.squared_error


def numpy_linear_cg(hessian, b, x0, steps):
  """Textbook linear CG for ``Hx = b`` (Hestenes & Stiefel 1952)."""
  x = x0.copy()
  r = b - hessian @ x
  p = r.copy()
  iterates = [x.copy()]
  for _ in range(steps):
    alpha = (r @ r) / (p @ hessian @ p)
    x = x + alpha * p
    new_r = r - alpha * hessian @ p
    p = new_r + (new_r @ new_r) / (r @ r) * p
    r = new_r
    iterates.append(x.copy())
  return iterates


@pytest.mark.parametrize("beta", _nonlinear_cg.BETAS)
def test_exact_line_search_gives_linear_cg_iterates(beta):
  n = 6
  predict, x0, batch = quadratic_problem(n=n)
  opt = curvature.nonlinear_cg(predict_fn=predict, loss=LOSS, beta=beta,
                               linesearch=exact_linesearch())
  iterates, state = _run(opt, predict, x0, batch, n)
  matrix = np.asarray(batch["inputs"][0])
  hessian = matrix.T @ matrix
  b = matrix.T @ np.asarray(batch["targets"][0])
  expected = numpy_linear_cg(hessian, b, np.asarray(x0), n)
  for k, (got, want) in enumerate(zip(iterates, expected)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-10,
                               err_msg=f"iterate {k}")
  np.testing.assert_allclose(expected[-1], np.linalg.solve(hessian, b),
                             atol=1e-10)
  cg_state = state[0].inner[0]
  assert int(cg_state.restarts) == 1  # Only the first step.


def test_zoom_line_search_converges():
  check_monotone_descent(
      lambda predict: curvature.nonlinear_cg(predict_fn=predict, loss=LOSS),
      12, 1e-6)


def test_polak_ribiere_is_clipped_at_zero():
  grad = jnp.asarray([1.0, 0.0])
  previous = jnp.asarray([2.0, 0.0])  # gᵀ(g − g_prev) = −1 < 0.
  direction = jnp.asarray([5.0, 5.0])
  beta = lambda name: float(_nonlinear_cg.conjugacy_coefficient(
      name, grad, previous, direction))
  assert beta("polak_ribiere") == 0.0
  assert beta("fletcher_reeves") == pytest.approx(0.25)
  # d = −u: β^HS = gᵀy / (−uᵀy) = −1 / 5.
  assert beta("hestenes_stiefel") == pytest.approx(-0.2)


def test_zero_denominator_gives_beta_zero():
  zero = jnp.zeros(2)
  for name in _nonlinear_cg.BETAS:
    assert float(_nonlinear_cg.conjugacy_coefficient(
        name, jnp.ones(2), zero, zero)) == 0.0


def test_restart_every_step_is_the_gradient():
  opt = curvature.scale_by_nonlinear_cg("fletcher_reeves", restart_every=1)
  state = opt.init(jnp.zeros(3))
  for k in range(3):
    grad = jnp.asarray([1.0, -2.0, 0.5]) * (k + 1)
    direction, state = opt.update(grad, state)
    np.testing.assert_array_equal(direction, grad)
  assert int(state.restarts) == 3


def test_restart_when_not_a_descent_direction():
  """FR with β = 4 and an opposing old direction: gᵀu < 0, so restart."""
  opt = curvature.scale_by_nonlinear_cg("fletcher_reeves", restart_every=10)
  state = opt.init(jnp.zeros(2))
  _, state = opt.update(jnp.asarray([1.0, 0.0]), state)
  direction, state = opt.update(jnp.asarray([-2.0, 0.0]), state)
  np.testing.assert_array_equal(direction, [-2.0, 0.0])
  assert int(state.restarts) == 2
  _, state = opt.update(jnp.asarray([-1.0, 1.0]), state)
  assert int(state.restarts) == 2  # β = 1/2: a descent direction, kept.


def test_default_restart_period_is_the_dimension():
  opt = curvature.scale_by_nonlinear_cg("fletcher_reeves")
  state = opt.init(jnp.zeros(2))
  for k in range(5):
    _, state = opt.update(jnp.asarray([1.0, 1.0 + k]), state)
  assert int(state.restarts) == 3  # Steps 0, 2 and 4.


def test_non_finite_input_is_rejected_and_counted():
  params, batch = regression_problem(n=8, sizes=(3, 2))
  opt = curvature.nonlinear_cg(predict_fn=mlp_predict, loss=LOSS)
  state = opt.init(params)
  loss = lambda p: LOSS.value(mlp_predict(p, batch), batch["targets"])
  grads = jax.grad(loss)(params)
  update = jax.jit(lambda g, s: opt.update(g, s, params, batch=batch))
  _, state = update(grads, state)
  kept = state[0].inner
  bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf), grads)
  updates, state = update(bad, state)
  assert np.all(flat(updates) == 0)
  assert int(state[0].rejected_steps) == 1
  for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(state[0].inner)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta="dai_yuan"), "beta.*'fletcher_reeves', 'polak_ribiere',"
     " 'hestenes_stiefel'"),
    (dict(restart_every=0), "restart_every.*>= 1"),
    (dict(restart_every=2.0), "restart_every.*Python int"),
    (dict(learning_rate=float("nan")), "learning_rate"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    curvature.nonlinear_cg(predict_fn=mlp_predict, loss=LOSS, **kwargs)


def test_mismatched_state_raises():
  opt = curvature.scale_by_nonlinear_cg()
  state = opt.init(jnp.zeros(3))
  with pytest.raises(ValueError, match="gradient does not match the state"):
    opt.update(jnp.zeros(4), state)

