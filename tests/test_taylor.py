"""Tests for curvature._taylor: Taylor models and the reduction ratio."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvature


def _quadratic():
  rng = np.random.default_rng(0)
  b_half = rng.normal(size=(5, 5))
  a = jnp.asarray(b_half @ b_half.T + np.eye(5), jnp.float64)
  b = jnp.asarray(rng.normal(size=5), jnp.float64)

  def f(params):
    x = params["x"]
    return 0.5 * x @ a @ x + b @ x + 3.0

  point = {"x": jnp.asarray(rng.normal(size=5), jnp.float64)}
  step = {"x": jnp.asarray(rng.normal(size=5), jnp.float64)}
  return f, a, point, step


def _hessian_matvec(f, point):
  return lambda v: curvature.hessian_vector_product(f, point, v)


def test_second_order_model_is_exact_on_a_quadratic():
  f, _, point, step = _quadratic()
  grad = jax.grad(f)(point)
  actual = f({"x": point["x"] + step["x"]}) - f(point)
  predicted = curvature.second_order_change(
      grad, _hessian_matvec(f, point), step)
  np.testing.assert_allclose(predicted, actual, rtol=1e-12)


def test_taylor_models_match_hand_computation():
  f, a, point, step = _quadratic()
  grad = jax.grad(f)(point)
  models = curvature.taylor_models(grad, _hessian_matvec(f, point), step)
  d = step["x"]
  np.testing.assert_allclose(models.first_order, grad["x"] @ d, rtol=1e-12)
  np.testing.assert_allclose(models.curvature, d @ a @ d, rtol=1e-12)
  np.testing.assert_allclose(
      models.second_order, grad["x"] @ d + 0.5 * d @ a @ d, rtol=1e-12)
  np.testing.assert_allclose(
      models.first_order, curvature.first_order_change(grad, step))


def test_reduction_ratio_is_one_for_an_exact_model():
  f, _, point, step = _quadratic()
  grad = jax.grad(f)(point)
  descent = {"x": -jnp.linalg.solve(jax.hessian(f)(point)["x"]["x"],
                                    grad["x"])}
  predicted = curvature.second_order_change(
      grad, _hessian_matvec(f, point), descent)
  after = f({"x": point["x"] + descent["x"]})
  rho = curvature.reduction_ratio(after, f(point), predicted)
  np.testing.assert_allclose(rho, 1.0, rtol=1e-10)


@pytest.mark.parametrize(
    "after, predicted", [(jnp.nan, -1.0), (0.5, 0.0), (0.5, 2.0)])
def test_reduction_ratio_flags_failed_steps(after, predicted):
  rho = curvature.reduction_ratio(
      jnp.asarray(after, jnp.float64), jnp.asarray(1.0, jnp.float64),
      jnp.asarray(predicted, jnp.float64))
  assert rho == -jnp.inf


def test_second_order_error_is_cubic_on_a_nonquadratic():
  def f(params):
    return jnp.sum(jnp.cos(params["x"]) * params["x"] ** 2)

  point = {"x": jnp.asarray([0.3, -0.7, 1.1], jnp.float64)}
  direction = jnp.asarray([1.0, 0.5, -2.0], jnp.float64)
  grad = jax.grad(f)(point)
  errors = []
  for scale in (1e-2, 5e-3):
    step = {"x": scale * direction}
    models = curvature.taylor_models(grad, _hessian_matvec(f, point), step)
    actual = f({"x": point["x"] + step["x"]}) - f(point)
    errors.append((abs(actual - models.first_order),
                   abs(actual - models.second_order)))
  first_ratio = errors[0][0] / errors[1][0]
  second_ratio = errors[0][1] / errors[1][1]
  assert 3.5 < first_ratio < 4.5  # O(ε²) error of the linear model.
  assert 7.0 < second_ratio < 9.0  # O(ε³) error of the quadratic model.
