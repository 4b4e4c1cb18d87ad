"""Natural gradient: CG on the Fisher against a dense solve."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature
from curvature import losses
from helpers import classification_problem
from helpers import dense_empirical_fisher
from helpers import dense_softmax_fisher
from helpers import flat
from helpers import mlp_params
from helpers import mlp_predict

LOSS = losses.softmax_cross_entropy


def _direction(fisher, damping, params, batch):
  opt = curvature.scale_by_natural_gradient(
      mlp_predict, LOSS, fisher=fisher, initial_damping=damping,
      adapt_damping=False, max_cg_iterations=200, cg_tol=1e-12,
      warm_start_decay=0.0, line_search=False)  # The direction itself.
  grads = jax.grad(
      lambda p: LOSS.value(mlp_predict(p, batch), batch["targets"]))(params)
  updates, state = opt.update(grads, opt.init(params), params, batch=batch)
  return flat(updates), flat(grads), state


@pytest.mark.parametrize("fisher", ["fisher", "empirical_fisher"])
def test_direction_matches_dense_solve(fisher):
  params, batch = classification_problem(n=9, sizes=(3, 4, 3))
  damping = 1e-2
  if fisher == "fisher":
    matrix = dense_softmax_fisher(mlp_predict, params, batch)
  else:
    matrix = dense_empirical_fisher(mlp_predict, LOSS, params, batch)
  update, grad, state = _direction(fisher, damping, params, batch)
  expected = np.linalg.solve(matrix + damping * np.eye(len(grad)), grad)
  # The engine returns -step; step = -(F + λI)⁻¹ g.
  np.testing.assert_allclose(update, expected, rtol=1e-6, atol=1e-9)
  assert int(state.rejected_steps) == 0


def test_sampled_fisher_is_unbiased_on_average():
  params, batch = classification_problem(n=9, sizes=(3, 4, 3))
  matrix = dense_softmax_fisher(mlp_predict, params, batch)
  v = jnp.asarray(np.random.default_rng(0).normal(size=matrix.shape[0]))
  from jax.flatten_util import ravel_pytree
  _, unravel = ravel_pytree(params)
  products = [flat(curvature.sampled_fisher_vector_product(
      mlp_predict, LOSS, params, batch, unravel(v), key=jax.random.key(k),
      num_samples=64)) for k in range(8)]
  np.testing.assert_allclose(np.mean(products, 0), matrix @ np.asarray(v),
                             rtol=0.15, atol=0.02)


def test_natural_gradient_trains_and_rejects_non_finite():
  params, batch = classification_problem(n=16, sizes=(3, 5, 3))
  opt = curvature.natural_gradient(0.5, predict_fn=mlp_predict, loss=LOSS,
                                   max_cg_iterations=20)
  state = opt.init(params)
  loss_fn = lambda p: LOSS.value(mlp_predict(p, batch), batch["targets"])

  @jax.jit
  def step(p, s, g):
    u, s = opt.update(g, s, p, batch=batch)
    return optax.apply_updates(p, u), s

  start = loss_fn(params)
  for _ in range(5):
    params, state = step(params, state, jax.grad(loss_fn)(params))
  assert loss_fn(params) < 0.9 * start
  bad = jax.tree.map(lambda g: g * jnp.nan, jax.grad(loss_fn)(params))
  new_params, new_state = step(params, state, bad)
  np.testing.assert_array_equal(flat(new_params), flat(params))
  assert int(new_state[0].rejected_steps) == 1


def test_rejects_non_fisher_curvature():
  with pytest.raises(ValueError, match="fisher"):
    curvature.natural_gradient(predict_fn=mlp_predict, loss=LOSS,
                               fisher="ggn")


def _digits_run(line_search, steps=40, seed=0):
  """Full-data loss of natural_gradient (defaults) on digits mini-batches."""
  data = curvature.datasets.load_digits(num_test=0)
  inputs = jnp.asarray(data.train_inputs, jnp.float64)
  labels = jnp.asarray(data.train_labels)
  full = {"inputs": inputs, "targets": labels}
  params = mlp_params(jax.random.key(seed), (64, 32, 10))
  opt = curvature.natural_gradient(predict_fn=mlp_predict, loss=LOSS,
                                   line_search=line_search)
  loss_fn = lambda p, b: LOSS.value(mlp_predict(p, b), b["targets"])

  @jax.jit
  def step(p, s, b):
    u, s = opt.update(jax.grad(loss_fn)(p, b), s, p, batch=b)
    p = optax.apply_updates(p, u)
    return p, s, loss_fn(p, full)

  state = opt.init(params)
  rng = np.random.default_rng(seed)
  history = [float(loss_fn(params, full))]
  for _ in range(steps):
    rows = rng.choice(inputs.shape[0], 128, replace=False)
    params, state, value = step(
        params, state, {"inputs": inputs[rows], "targets": labels[rows]})
    history.append(float(value))
  return history


def test_default_natural_gradient_trains_on_digits_mini_batches():
  """Issue 11: with its defaults natural_gradient diverged on mini-batches
  (λ fell while ρ was measured on the same batch, and steps that raised the
  loss were applied). Now every step is line-searched as in Hessian-free:
  an MLP 64-32-10 on scikit-learn's digits, batches of 128, trains and the
  full-data loss never rises above its start. Without the line search the
  same run explodes (the control)."""
  history = _digits_run(line_search=True)
  assert np.all(np.isfinite(history))
  assert max(history[1:]) < history[0], history
  assert history[-1] < 0.25 * history[0], history
  control = _digits_run(line_search=False)
  assert max(control) > 10 * history[0], control


@pytest.mark.parametrize("preconditioner", ["diagonal", "kfac"])
def test_preconditioned_direction_matches_dense_solve(preconditioner):
  """PCG with a preconditioner still solves (F + λI) d = g."""
  params, batch = classification_problem(n=9, sizes=(3, 4, 3))
  damping = 1e-2
  matrix = dense_softmax_fisher(mlp_predict, params, batch)
  opt = curvature.scale_by_natural_gradient(
      mlp_predict, LOSS, initial_damping=damping, adapt_damping=False,
      max_cg_iterations=200, cg_tol=1e-12, warm_start_decay=0.0,
      line_search=False, preconditioner=preconditioner)
  grads = jax.grad(
      lambda p: LOSS.value(mlp_predict(p, batch), batch["targets"]))(params)
  updates, state = opt.update(grads, opt.init(params), params, batch=batch)
  expected = np.linalg.solve(matrix + damping * np.eye(len(flat(grads))),
                             flat(grads))
  np.testing.assert_allclose(flat(updates), expected, rtol=1e-6, atol=1e-9)
  assert int(state.preconditioner_breakdowns) == 0
