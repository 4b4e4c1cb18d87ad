"""Diagonal curvature estimators against the diagonals of dense matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature
from curvature import losses
from helpers import classification_problem
from helpers import dense_ggn
from helpers import dense_hessian
from helpers import dense_softmax_fisher
from helpers import flat
from helpers import mlp_predict
from helpers import regression_problem

CE = losses.softmax_cross_entropy


def test_ggn_diagonal_is_exact():
  params, batch = classification_problem(n=6, sizes=(3, 4, 3))
  diag = curvature.ggn_diagonal(mlp_predict, CE, params, batch)
  expected = np.diag(dense_ggn(mlp_predict, CE, params, batch))
  np.testing.assert_allclose(flat(diag), expected, rtol=1e-10, atol=1e-14)


def test_ggn_diagonal_squared_error():
  params, batch = regression_problem(n=5, sizes=(3, 4, 2))
  loss = losses.squared_error
  diag = curvature.ggn_diagonal(mlp_predict, loss, params, batch)
  expected = np.diag(dense_ggn(mlp_predict, loss, params, batch))
  np.testing.assert_allclose(flat(diag), expected, rtol=1e-10, atol=1e-14)


def test_sampled_fisher_diagonal_in_expectation():
  # Tolerance: 4000 sampled targets per example; relative error ~ 1/sqrt(4000).
  params, batch = classification_problem(n=6, sizes=(3, 4, 3))
  diag = curvature.sampled_fisher_diagonal(
      mlp_predict, CE, params, batch, key=jax.random.key(0),
      num_samples=4000)
  expected = np.diag(dense_softmax_fisher(mlp_predict, params, batch))
  np.testing.assert_allclose(flat(diag), expected, rtol=0.1,
                             atol=0.02 * expected.max())


def test_hutchinson_hessian_diagonal_in_expectation():
  # Rademacher probes: the error of probe s is Σ_{j≠i} H_ij v_i v_j, so the
  # tolerance is a few times ‖offdiag row‖ / sqrt(S) with S = 3000.
  params, batch = regression_problem(n=6, sizes=(3, 4, 2))
  loss = losses.squared_error
  diag = curvature.hutchinson_hessian_diagonal(
      mlp_predict, loss, params, batch, key=jax.random.key(1),
      num_samples=3000)
  hessian = dense_hessian(mlp_predict, loss, params, batch)
  off = np.sqrt(np.sum((hessian - np.diag(np.diag(hessian))) ** 2, axis=1))
  np.testing.assert_array_less(np.abs(flat(diag) - np.diag(hessian)),
                               5 * off / np.sqrt(3000) + 1e-9)


def test_empirical_fisher_estimator_and_ema_transform():
  params, batch = classification_problem(n=6, sizes=(3, 4, 3))
  transform = curvature.ema_curvature_diagonal(
      mlp_predict, CE, estimator="empirical_fisher", decay=0.5)
  state = transform.init(params)
  out, state = transform.update(params, state, params, batch=batch)
  expected = curvature.empirical_fisher_diagonal(mlp_predict, CE, params,
                                                 batch)
  np.testing.assert_allclose(flat(out), flat(expected), rtol=1e-12)
  poisoned = dict(batch, inputs=batch["inputs"] * jnp.nan)
  out2, state2 = transform.update(params, state, params, batch=poisoned)
  np.testing.assert_allclose(flat(out2), flat(expected), rtol=1e-12)
  assert int(state2.rejected_statistics) == 1 and int(state2.count) == 1


def test_scale_by_curvature_diagonal_divides_by_damped_diagonal():
  params, batch = classification_problem(n=6, sizes=(3, 4, 3))
  opt = curvature.scale_by_curvature_diagonal(
      mlp_predict, CE, estimator="ggn", damping=0.1)
  grads = jax.grad(lambda p: CE.value(mlp_predict(p, batch),
                                      batch["targets"]))(params)
  updates, _ = jax.jit(opt.update)(grads, opt.init(params), params,
                                   batch=batch)
  diag = np.diag(dense_ggn(mlp_predict, CE, params, batch))
  np.testing.assert_allclose(flat(updates), flat(grads) / (diag + 0.1),
                             rtol=1e-9)


def test_bad_input():
  with pytest.raises(ValueError, match="estimator"):
    curvature.ema_curvature_diagonal(mlp_predict, CE, estimator="adam")
  with pytest.raises(TypeError, match="Loss"):
    curvature.scale_by_curvature_diagonal(mlp_predict, "mse")
  params, batch = regression_problem(n=4, sizes=(3, 4, 70))
  with pytest.raises(ValueError, match="max_output_dim"):
    curvature.ggn_diagonal(mlp_predict, losses.squared_error, params, batch)
  opt = curvature.ema_curvature_diagonal(mlp_predict, CE)
  with pytest.raises(ValueError, match="batch=batch"):
    opt.update(params, opt.init(params), params)
