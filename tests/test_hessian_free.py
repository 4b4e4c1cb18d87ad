"""Hessian-free, damped Newton, Gauss-Newton and Levenberg-Marquardt."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import optax
import pytest

import curvature
from curvature import losses
from helpers import PROBLEMS
from helpers import dense_ggn
from helpers import dense_hessian
from helpers import flat
from helpers import mlp_predict
from helpers import random_like

L2 = 0.01


def _grad(loss, params, batch):
  return jax.grad(lambda p: loss.value(mlp_predict(p, batch),
                                       batch["targets"]))(params)


def _objective(loss, params, batch, l2=L2):
  return curvature.objective(mlp_predict, loss, params, batch, l2_reg=l2)


def _one_step(transform, params, batch, loss):
  state = transform.init(params)
  updates, state = jax.jit(transform.update)(
      _grad(loss, params, batch), state, params, batch=batch)
  return updates, state


def _hf_state(state):
  for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
      x, curvature.ScaleByHessianFreeState)):
    if isinstance(s, curvature.ScaleByHessianFreeState):
      return s
  raise AssertionError("no HF state")


@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_gauss_newton_step_is_the_dense_damped_solve(damping):
  loss, make = PROBLEMS["softmax_cross_entropy"]
  params, batch = make()
  opt = curvature.gauss_newton(predict_fn=mlp_predict, loss=loss,
                               damping=damping, l2_reg=L2, cg_tol=1e-13,
                               max_cg_iterations=200)
  updates, _ = _one_step(opt, params, batch, loss)
  g = flat(_grad(loss, params, batch)) + L2 * flat(params)
  g_matrix = dense_ggn(mlp_predict, loss, params, batch, L2)
  expected = -np.linalg.solve(g_matrix + damping * np.eye(len(g)), g)
  np.testing.assert_allclose(flat(updates), expected, rtol=1e-7, atol=1e-10)


def test_damped_newton_step_is_the_dense_damped_solve():
  loss, make = PROBLEMS["squared_error"]
  params, batch = make()
  damping = 5.0  # Makes H + λI positive definite here.
  h = dense_hessian(mlp_predict, loss, params, batch, L2)
  assert np.linalg.eigvalsh(h + damping * np.eye(len(h))).min() > 0
  opt = curvature.damped_newton(predict_fn=mlp_predict, loss=loss,
                                damping=damping, l2_reg=L2, cg_tol=1e-13,
                                line_search=False, max_cg_iterations=200)
  updates, state = _one_step(opt, params, batch, loss)
  g = flat(_grad(loss, params, batch)) + L2 * flat(params)
  expected = -np.linalg.solve(h + damping * np.eye(len(g)), g)
  np.testing.assert_allclose(flat(updates), expected, rtol=1e-7, atol=1e-10)
  assert _hf_state(state).cg_status == curvature.CGStatus.CONVERGED


def test_newton_stops_at_negative_curvature_without_nan():
  loss, make = PROBLEMS["softmax_cross_entropy"]
  params, batch = make(n=3)
  h = dense_hessian(mlp_predict, loss, params, batch, 0.0)
  assert np.linalg.eigvalsh(h).min() < 0  # An indefinite Hessian.
  opt = curvature.newton(predict_fn=mlp_predict, loss=loss)
  updates, state = _one_step(opt, params, batch, loss)
  assert np.all(np.isfinite(flat(updates)))
  assert _hf_state(state).cg_status == curvature.CGStatus.NEGATIVE_CURVATURE


def test_reduction_ratio_and_levenberg_marquardt_rule():
  loss, make = PROBLEMS["sigmoid_binary_cross_entropy"]
  params, batch = make()
  lam = 0.3
  opt = curvature.scale_by_hessian_free(
      mlp_predict, loss, initial_damping=lam, l2_reg=L2, line_search=False,
      backtracking=False, progress_tol=None, cg_tol=1e-12)
  updates, state = _one_step(opt, params, batch, loss)
  p = -flat(updates)  # scale_by_* returns the direction without the minus.
  g = flat(_grad(loss, params, batch)) + L2 * flat(params)
  model = g @ p + 0.5 * p @ (dense_ggn(mlp_predict, loss, params, batch, L2)
                             + lam * np.eye(len(p))) @ p
  new_params = jax.tree.map(lambda a, u: a - u, params, updates)
  actual = _objective(loss, new_params, batch) - _objective(loss, params, batch)
  rho = actual / model
  np.testing.assert_allclose(state.reduction_ratio, rho, rtol=1e-6)
  factor = 1.5 if rho < 0.25 else (2 / 3 if rho > 0.75 else 1.0)
  np.testing.assert_allclose(state.damping, lam * factor, rtol=1e-12)


def test_warm_start_uses_the_previous_unbacktracked_solution():
  loss, make = PROBLEMS["softmax_cross_entropy"]
  params, batch = make()
  opt = curvature.scale_by_hessian_free(mlp_predict, loss, l2_reg=L2,
                                        max_cg_iterations=3,
                                        progress_tol=None, line_search=False)
  grads = _grad(loss, params, batch)
  state = opt.init(params)
  _, state1 = opt.update(grads, state, params, batch=batch)
  # The stored warm start is CG's final iterate from x0 = 0.
  direct = curvature.conjugate_gradient(
      lambda v: optax.tree.add_scale(
          curvature.linearize(mlp_predict, loss, params, batch,
                              l2_reg=L2).matvec(v), 1.0, v),
      optax.tree.scale(-1.0, optax.tree.add_scale(grads, L2, params)),
      max_iterations=3, tol=1e-10, progress_tol=None)
  np.testing.assert_allclose(flat(state1.previous_solution), flat(direct.x),
                             rtol=1e-9)
  # The next solve starts from 0.95 times it: with 0 iterations allowed it
  # would return exactly that, and with 1 it is one CG step from there.
  lin = curvature.linearize(mlp_predict, loss, params, batch, l2_reg=L2)
  damped = lambda v: optax.tree.add_scale(lin.matvec(v), state1.damping, v)
  warm = curvature.conjugate_gradient(
      damped, optax.tree.scale(-1.0, optax.tree.add_scale(grads, L2, params)),
      optax.tree.scale(0.95, direct.x), max_iterations=3, tol=1e-10,
      progress_tol=None)
  _, state2 = opt.update(grads, state1, params, batch=batch)
  np.testing.assert_allclose(flat(state2.previous_solution), flat(warm.x),
                             rtol=1e-8)


def test_backtracking_picks_an_iterate_no_worse_than_the_last():
  loss, make = PROBLEMS["softmax_cross_entropy"]
  params, batch = make(n=12, sizes=(4, 16, 3))
  params = jax.tree.map(lambda x: 3 * x, params)  # Far from quadratic.
  opt = curvature.scale_by_hessian_free(mlp_predict, loss, initial_damping=1e-4,
                                        adapt_damping=False, l2_reg=L2,
                                        line_search=False)
  updates, state = _one_step(opt, params, batch, loss)
  chosen = jax.tree.map(lambda a, u: a - u, params, updates)
  last = optax.tree.add(params, state.previous_solution)
  assert _objective(loss, chosen, batch) <= _objective(loss, last, batch)


def test_line_search_step_satisfies_armijo():
  loss, make = PROBLEMS["softmax_cross_entropy"]
  params, batch = make(n=12, sizes=(4, 16, 3))
  params = jax.tree.map(lambda x: 3 * x, params)
  opt = curvature.scale_by_hessian_free(mlp_predict, loss, initial_damping=1e-4,
                                        adapt_damping=False, l2_reg=L2)
  updates, state = _one_step(opt, params, batch, loss)
  g = optax.tree.add_scale(_grad(loss, params, batch), L2, params)
  step = optax.tree.scale(-1.0, updates)
  after = _objective(loss, optax.tree.add(params, step), batch)
  before = _objective(loss, params, batch)
  assert 0 < state.step_size <= 1
  assert after <= before + 1e-2 * optax.tree.vdot(g, step)


@pytest.mark.parametrize("preconditioner", [
    dict(diagonal_preconditioner=True), dict(preconditioner="diagonal"),
    dict(preconditioner="kfac"), dict(preconditioner="block_diagonal",
                                      preconditioner_block_size=6)])
def test_preconditioner_does_not_change_the_full_solve(preconditioner):
  """PCG with every preconditioner solves (C + λI)p = −g (dense oracle)."""
  loss, make = PROBLEMS["squared_error"]
  params, batch = make()
  kwargs = dict(l2_reg=L2, progress_tol=None, cg_tol=1e-13, line_search=False,
                backtracking=False, adapt_damping=False, initial_damping=0.1)
  updates, state = _one_step(
      curvature.scale_by_hessian_free(mlp_predict, loss, **preconditioner,
                                      **kwargs), params, batch, loss)
  g = flat(_grad(loss, params, batch)) + L2 * flat(params)
  matrix = dense_ggn(mlp_predict, loss, params, batch, L2) + 0.1 * np.eye(
      len(g))
  np.testing.assert_allclose(flat(updates), np.linalg.solve(matrix, g),
                             rtol=1e-7, atol=1e-10)
  assert int(state.preconditioner_breakdowns) == 0


def _kfac_operator(params, batch, damping, decay_steps=3):
  """The dense matrix of the "kfac" preconditioner ``M⁻¹`` after a few steps."""
  loss = losses.squared_error
  opt = curvature.scale_by_hessian_free(mlp_predict, loss,
                                        preconditioner="kfac", l2_reg=L2,
                                        preconditioner_every=1)
  stage = curvature._hessian_free._kfac_blocks(  # pylint: disable=protected-access
      mlp_predict, loss, L2, 1, 0.95, curvature.default_targets, 0, None)
  state = opt.init(params).preconditioner_state
  update = jax.jit(lambda s: stage.update(s, params, batch, damping, None)[0])
  for _ in range(decay_steps - 1):
    state = update(state)
  flat_params, unravel = ravel_pytree(params)

  @jax.jit
  def operator(state):
    state, precondition = stage.update(state, params, batch, damping, None)
    columns = jax.vmap(lambda e: ravel_pytree(
        precondition(unravel(e)))[0])(jnp.eye(flat_params.size))
    return columns.T, state

  matrix, state = operator(state)
  return np.asarray(matrix), state


@pytest.mark.parametrize("damping", [1e-3, 1.0])
def test_kfac_preconditioner_is_spd(damping):
  """PSD factors and damping > 0 give a symmetric positive definite M⁻¹."""
  loss, make = PROBLEMS["squared_error"]
  params, batch = make(n=3)  # Fewer examples than inputs: singular factors.
  matrix, state = _kfac_operator(params, batch, damping)
  for block in state.blocks.values():
    for factor in block.statistics:
      assert np.linalg.eigvalsh(np.asarray(factor)).min() > -1e-12
  np.testing.assert_allclose(matrix, matrix.T, rtol=1e-9, atol=1e-12)
  assert np.linalg.eigvalsh(0.5 * (matrix + matrix.T)).min() > 0


def test_unknown_preconditioner_lists_the_choices():
  with pytest.raises(ValueError, match="kfac.*block_diagonal"):
    curvature.hessian_free(predict_fn=mlp_predict, loss=losses.squared_error,
                           preconditioner="cholesky")
  with pytest.raises(ValueError, match="block_diagonal"):
    curvature.natural_gradient(predict_fn=mlp_predict,
                               loss=losses.squared_error,
                               preconditioner="nope")
  with pytest.raises(ValueError, match="only `preconditioner"):
    curvature.hessian_free(predict_fn=mlp_predict, loss=losses.squared_error,
                           preconditioner="kfac", diagonal_preconditioner=True)


def test_preconditioner_breakdown_falls_back_and_is_counted(monkeypatch):
  """A preconditioner giving rᵀM⁻¹r ≤ 0 (here −I): plain CG, counted."""
  loss, make = PROBLEMS["squared_error"]
  params, batch = make()
  hf = curvature._hessian_free  # pylint: disable=protected-access
  negative = hf._Preconditioner(  # pylint: disable=protected-access
      lambda p: (), lambda state, *a: (
          state, lambda r: optax.tree.scale(-1.0, r)))
  monkeypatch.setattr(hf, "_martens_diagonal", lambda *a: negative)
  kwargs = dict(l2_reg=L2, progress_tol=None, cg_tol=1e-13, line_search=False,
                backtracking=False, adapt_damping=False, initial_damping=0.1)
  updates, state = _one_step(curvature.scale_by_hessian_free(
      mlp_predict, loss, preconditioner="diagonal", **kwargs), params, batch,
                             loss)
  assert int(state.preconditioner_breakdowns) == 1
  g = flat(_grad(loss, params, batch)) + L2 * flat(params)
  matrix = dense_ggn(mlp_predict, loss, params, batch, L2) + 0.1 * np.eye(
      len(g))
  np.testing.assert_allclose(flat(updates), np.linalg.solve(matrix, g),
                             rtol=1e-7, atol=1e-10)


def test_kfac_preconditioner_refreshes_every_k_steps_inside_jit():
  loss, make = PROBLEMS["softmax_cross_entropy"]
  params, batch = make()
  opt = curvature.hessian_free(predict_fn=mlp_predict, loss=loss,
                               preconditioner="kfac", preconditioner_every=3,
                               l2_reg=L2)
  state = opt.init(params)
  step = jax.jit(opt.update)
  grads = _grad(loss, params, batch)
  inverses = []
  for _ in range(5):
    _, state = step(grads, state, params, batch=batch)
    kfac_state = _hf_state(state).preconditioner_state
    inverses.append(np.asarray(
        next(iter(kfac_state.blocks.values())).preconditioner.left))
  assert step._cache_size() == 1
  # Refreshed at steps 0, 1, 2 (warm-up) and 3; kept at step 4.
  assert not np.allclose(inverses[2], inverses[3])
  np.testing.assert_array_equal(inverses[3], inverses[4])
  assert int(kfac_state.statistics_count) == 5


def test_adaptive_cg_budget_caps_the_next_solve():
  loss, make = PROBLEMS["softmax_cross_entropy"]
  params, batch = make()
  opt = curvature.scale_by_hessian_free(
      mlp_predict, loss, l2_reg=L2, progress_tol=None, cg_tol=1e-14,
      cg_budget_growth=1.0, line_search=False, warm_start_decay=0.0)
  state = opt.init(params)
  state = state._replace(count=jnp.ones((), jnp.int32),
                         info=state.info._replace(
                             cg_iterations=jnp.asarray(3, jnp.int32)))
  _, state = jax.jit(opt.update)(_grad(loss, params, batch), state, params,
                                 batch=batch)
  assert int(state.cg_iterations) == 10  # max(10, ⌈1.0 · 3⌉)
  assert int(state.cg_status) == curvature.CGStatus.BUDGET


def test_curvature_batch_uses_the_leading_examples():
  loss, make = PROBLEMS["softmax_cross_entropy"]
  params, batch = make(n=10)
  opt = curvature.scale_by_hessian_free(
      mlp_predict, loss, curvature_batch_size=4, l2_reg=L2, progress_tol=None,
      cg_tol=1e-13, line_search=False, backtracking=False,
      adapt_damping=False, initial_damping=0.1)
  updates, state = _one_step(opt, params, batch, loss)
  head = curvature.take_examples(batch, 4)
  g = flat(_grad(loss, params, batch)) + L2 * flat(params)
  matrix = dense_ggn(mlp_predict, loss, params, head, L2) + 0.1 * np.eye(len(g))
  np.testing.assert_allclose(flat(updates), np.linalg.solve(matrix, g),
                             rtol=1e-7)
  np.testing.assert_allclose(state.objective_value, _objective(loss, params, batch),
                             rtol=1e-12)


def test_evaluation_batch_uses_the_trailing_examples():
  loss, make = PROBLEMS["softmax_cross_entropy"]
  params, batch = make(n=10)
  opt = curvature.scale_by_hessian_free(
      mlp_predict, loss, evaluation_batch_size=3, curvature_batch_size=7,
      l2_reg=L2, line_search=False, backtracking=False)
  updates, state = _one_step(opt, params, batch, loss)
  tail = jax.tree.map(lambda x: x[-3:], batch)
  np.testing.assert_allclose(state.objective_value, _objective(loss, params, tail),
                             rtol=1e-12)
  after = _objective(loss, optax.tree.sub(params, updates), tail)
  p = optax.tree.scale(-1.0, updates)
  g = optax.tree.add_scale(_grad(loss, params, batch), L2, params)
  head = curvature.take_examples(batch, 7)
  lin = curvature.linearize(mlp_predict, loss, params, head, l2_reg=L2)
  model = curvature.second_order_change(
      g, lambda v: optax.tree.add_scale(lin.matvec(v), 1.0, v), p)
  np.testing.assert_allclose(state.reduction_ratio,
                             (after - state.objective_value) / model, rtol=1e-6)


@pytest.mark.parametrize("name", ["fisher", "sampled_fisher", "empirical_fisher",
                                  "hessian"])
def test_every_curvature_makes_progress(name):
  loss, make = PROBLEMS["softmax_cross_entropy"]
  params, batch = make(n=20, sizes=(4, 8, 3))
  opt = curvature.hessian_free(predict_fn=mlp_predict, loss=loss,
                               curvature=name, l2_reg=L2, num_samples=4)
  state = opt.init(params)
  step = jax.jit(lambda p, s: opt.update(_grad(loss, p, batch), s, p,
                                         batch=batch))
  start = _objective(loss, params, batch)
  for _ in range(5):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert _objective(loss, params, batch) < 0.9 * start


def _least_squares(condition, n=20, seed=0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  a = (q * np.sqrt(np.geomspace(1, condition, n))) @ q.T  # AᵀA has κ.
  target = rng.normal(size=(n, 1))
  batch = {"inputs": jnp.asarray(a), "targets": jnp.asarray(target)}
  predict = lambda params, batch: batch["inputs"] @ params["x"]
  return predict, batch, {"x": jnp.zeros((n, 1))}


def _steps_to_tolerance(opt, predict, batch, params, tol, max_steps):
  loss = losses.squared_error
  f = lambda p: loss.value(predict(p, batch), batch["targets"])
  x_star = np.linalg.lstsq(np.asarray(batch["inputs"]),
                           np.asarray(batch["targets"]), rcond=None)[0]
  f_star = float(f({"x": jnp.asarray(x_star)}))
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(jax.grad(f)(params), state, params,
                                batch=batch)
    return optax.apply_updates(params, updates), state

  for k in range(max_steps):
    if f(params) - f_star <= tol * max(1.0, abs(f_star)):
      return k
    params, state = step(params, state)
  return max_steps


def test_gauss_newton_beats_sgd_on_ill_conditioned_least_squares():
  predict, batch, params = _least_squares(1e4)
  loss = losses.squared_error
  hf_steps = _steps_to_tolerance(
      curvature.hessian_free(predict_fn=predict, loss=loss), predict, batch,
      params, 1e-8, 50)
  gn_steps = _steps_to_tolerance(
      curvature.gauss_newton(predict_fn=predict, loss=loss), predict, batch,
      params, 1e-8, 50)
  # The best fixed step for GD on a quadratic is 2/(L + μ).
  eigs = np.linalg.eigvalsh(np.asarray(batch["inputs"].T @ batch["inputs"])
                            / 20)
  sgd_steps = _steps_to_tolerance(
      optax.sgd(2 / (eigs.max() + eigs.min())), predict, batch, params, 1e-8,
      3000)
  assert gn_steps <= 2
  assert hf_steps <= 20  # λ₀ = 1 is large here; LM shrinks it by 2/3 a step.
  assert sgd_steps >= 100 * max(hf_steps, 1)


# Bad input -------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(initial_damping=-1.0), "initial_damping"),
    (dict(max_cg_iterations=0), "max_cg_iterations"),
    (dict(curvature="newton"), "Unknown `curvature`"),
    (dict(l2_reg=-1e-5), "l2_reg"),
    (dict(damping_decrease=1.5), "damping_decrease"),
    (dict(warm_start_decay=2.0), "warm_start_decay"),
    (dict(curvature_batch_size=0), "curvature_batch_size"),
    (dict(evaluation_batch_size=0), "evaluation_batch_size"),
])
def test_invalid_hyperparameters_raise_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    curvature.scale_by_hessian_free(mlp_predict, losses.squared_error, **kwargs)


def test_invalid_types_raise():
  with pytest.raises(TypeError, match="curvature.losses"):
    curvature.scale_by_hessian_free(mlp_predict, optax.losses.l2_loss)
  with pytest.raises(TypeError, match="static_args"):
    curvature.scale_by_hessian_free(mlp_predict, losses.squared_error,
                                    max_cg_iterations=10.0)


def test_mismatched_gradients_and_missing_batch_raise():
  loss, make = PROBLEMS["squared_error"]
  params, batch = make()
  opt = curvature.hessian_free(predict_fn=mlp_predict, loss=loss)
  state = opt.init(params)
  grads = _grad(loss, params, batch)
  with pytest.raises(ValueError, match="does not match the parameters"):
    opt.update(grads[:1], state, params, batch=batch)
  bad = jax.tree.map(lambda g: g, grads)
  bad[0]["w"] = bad[0]["w"][:, :2]
  with pytest.raises(ValueError, match="shape"):
    opt.update(bad, state, params, batch=batch)
  with pytest.raises(ValueError, match="batch=batch"):
    opt.update(grads, state, params)
  with pytest.raises(ValueError, match="params"):
    opt.update(grads, state, None, batch=batch)
  with pytest.raises(TypeError, match="floating"):
    opt.init({"w": jnp.ones(3, int)})
  with pytest.raises(ValueError, match="empty"):
    opt.init({})


def _rejected(updates, state, params):
  hf = _hf_state(state)
  assert np.all(flat(updates) == 0)
  assert hf.rejected_steps == 1
  new_params = optax.apply_updates(params, updates)
  assert np.all(np.isfinite(flat(new_params)))
  return hf


@pytest.mark.parametrize("where", ["gradient", "batch", "curvature"])
def test_non_finite_input_rejects_the_step(where):
  loss, make = PROBLEMS["softmax_cross_entropy"]
  params, batch = make()
  grads = _grad(loss, params, batch)
  if where == "gradient":
    grads[0]["w"] = grads[0]["w"].at[0, 0].set(jnp.nan)
  elif where == "batch":
    batch = dict(batch, inputs=batch["inputs"].at[0, 0].set(jnp.inf))
  else:
    loss = loss._replace(hvp=lambda z, y, t: t * jnp.nan)
  opt = curvature.hessian_free(predict_fn=mlp_predict, loss=loss,
                               initial_damping=2.0)
  state = opt.init(params)
  updates, state = jax.jit(opt.update)(grads, state, params, batch=batch)
  hf = _rejected(updates, state, params)
  assert hf.damping > 2.0
  np.testing.assert_array_equal(flat(hf.previous_solution), 0.0)


def _load_digits_example():
  import importlib.util
  import pathlib
  path = (pathlib.Path(__file__).parents[1] / "examples"
          / "digits_autoencoder.py")
  spec = importlib.util.spec_from_file_location("digits_autoencoder", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_hessian_free_beats_full_batch_adam_per_data_pass_on_digits():
  """Martens' (2010) claim on a small deep autoencoder, like for like.

  Both use the full-batch gradient and are charged in data passes (each GGN
  product is one pass over HF's curvature batch); Adam gets the best learning
  rate of a grid. Fixed seeds make this deterministic; the margin is 5%.
  (Mini-batch Adam is faster per pass on this small data set: see the
  example's table.)
  """
  example = _load_digits_example()
  data = example.load_data()
  passes = 100
  hf = example.train_hessian_free(data, passes)
  adam = min(example.loss_at(example.train_adam(data, passes, lr, None),
                             passes) for lr in (1e-2, 3e-2, 1e-1))
  assert example.loss_at(hf, passes) < 0.95 * adam


def test_chains_with_optax_zoom_linesearch():
  loss, make = PROBLEMS["softmax_cross_entropy"]
  params, batch = make(n=20, sizes=(4, 8, 3))
  # optax's line search passes the other extra arguments (here `batch`) on
  # to `value_fn`, so it takes the batch as a keyword argument.
  objective = lambda p, batch: _objective(loss, p, batch, l2=0.0)
  opt = curvature.hessian_free(
      predict_fn=mlp_predict, loss=loss,
      linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=15))
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    value, grads = optax.value_and_grad_from_state(objective)(
        params, batch=batch, state=state)
    updates, state = opt.update(grads, state, params, batch=batch,
                                value=value, grad=grads, value_fn=objective)
    return optax.apply_updates(params, updates), state, value

  values = []
  for _ in range(4):
    params, state, value = step(params, state)
    values.append(float(value))
  assert values[-1] < 0.8 * values[0]
  assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))
  # The built-in Armijo search is off: HF returns the plain backtracked step.
  assert _hf_state(state).step_size == 1.0


def test_newton_takes_steepest_descent_when_the_first_direction_curves_down():
  # f(a, b) = ½(ab − 1)²; at (0.3, 0.2) the gradient direction has gᵀHg < 0.
  predict = lambda p, batch: (p["a"] * p["b"])[None, None] * batch["inputs"]
  batch = {"inputs": jnp.ones((1, 1)), "targets": jnp.ones((1, 1))}
  params = {"a": jnp.asarray(0.3), "b": jnp.asarray(0.2)}
  loss = losses.squared_error
  f = lambda p: loss.value(predict(p, batch), batch["targets"])
  grads = jax.grad(f)(params)
  g = flat(grads)
  h = np.asarray(jax.hessian(lambda v: f({"a": v[0], "b": v[1]}))(
      jnp.asarray([0.3, 0.2])))
  assert g @ h @ g < 0
  opt = curvature.newton(predict_fn=predict, loss=loss)
  state = opt.init(params)
  updates, state = opt.update(grads, state, params, batch=batch)
  hf = _hf_state(state)
  assert hf.cg_status == curvature.CGStatus.NEGATIVE_CURVATURE
  assert hf.cg_iterations == 0
  np.testing.assert_allclose(flat(updates), -g, rtol=1e-12)
  assert f(optax.apply_updates(params, updates)) < f(params)


# Structural damping (Martens & Sutskever 2011) on a tiny tanh RNN.

MU = 0.3


def _rnn_problem(n=5, steps=4, d_in=2, hidden=3, key=0):
  k = jax.random.split(jax.random.key(key), 6)
  params = {
      "w_in": 0.7 * jax.random.normal(k[0], (d_in, hidden)),
      "w_h": 0.5 * jax.random.normal(k[1], (hidden, hidden)),
      "b": 0.1 * jax.random.normal(k[2], (hidden,)),
      "w_out": jax.random.normal(k[3], (hidden, 1)),
      "b_out": jnp.zeros((1,)),
  }
  batch = {"inputs": jax.random.normal(k[4], (n, steps, d_in)),
           "targets": jax.random.normal(k[5], (n, 1))}
  return params, batch


def _load_example(name):
  path = pathlib.Path(__file__).parents[1] / "examples" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# The example's tanh RNN: hidden states [batch, time, hidden], linear read-out.
_RNN = _load_example("rnn_structural_damping")
_rnn_hidden = _RNN.hidden_states
_rnn_predict = _RNN.predict


def _dense_structural(params, batch):
  """(1/N) J_Sᵀ J_S with J_S from jax.jacfwd."""
  vec, unravel = ravel_pytree(params)
  jac = jax.jacfwd(lambda v: _rnn_hidden(unravel(v), batch))(vec)
  jac = np.asarray(jac.reshape(-1, len(vec)))
  return jac.T @ jac / batch["inputs"].shape[0]


def _dense_damped(params, batch, lam, mu=MU):
  loss = losses.squared_error
  g_matrix = dense_ggn(_rnn_predict, loss, params, batch, L2)
  return (g_matrix + lam * np.eye(len(g_matrix))
          + mu * lam * _dense_structural(params, batch))


def _rnn_grad(params, batch):
  return jax.grad(lambda p: losses.squared_error.value(
      _rnn_predict(p, batch), batch["targets"]))(params)


def test_structural_matvec_is_the_dense_damped_curvature(monkeypatch):
  """CG's matvec is (G + λI + μλ (1/N) J_Sᵀ J_S) v, dense from jax.jacfwd."""
  params, batch = _rnn_problem()
  hf = curvature._hessian_free  # pylint: disable=protected-access
  vector = random_like(params, 3)
  products = []
  solve = hf._cg.conjugate_gradient  # pylint: disable=protected-access

  def capture(matvec, *args, **kwargs):
    jax.debug.callback(lambda x: products.append(np.asarray(x)),
                       ravel_pytree(matvec(vector))[0])
    return solve(matvec, *args, **kwargs)

  monkeypatch.setattr(hf._cg, "conjugate_gradient", capture)  # pylint: disable=protected-access
  lam = 0.7
  opt = curvature.scale_by_hessian_free(
      _rnn_predict, losses.squared_error, initial_damping=lam, l2_reg=L2,
      structural_damping=MU, structural_fn=_rnn_hidden, max_cg_iterations=1,
      line_search=False, backtracking=False)
  jax.block_until_ready(jax.jit(opt.update)(
      _rnn_grad(params, batch), opt.init(params), params, batch=batch))
  expected = _dense_damped(params, batch, lam) @ flat(vector)
  np.testing.assert_allclose(products[0], expected, rtol=1e-10, atol=1e-10)


def test_structural_damping_step_and_rho_are_the_dense_solve():
  """Converged CG gives (G + λI + μλ J_SᵀJ_S/N)⁻¹g; ρ uses that model."""
  params, batch = _rnn_problem()
  lam = 0.4
  opt = curvature.scale_by_hessian_free(
      _rnn_predict, losses.squared_error, initial_damping=lam, l2_reg=L2,
      structural_damping=MU, structural_fn=_rnn_hidden, line_search=False,
      backtracking=False, progress_tol=None, cg_tol=1e-14,
      warm_start_decay=0.0, max_cg_iterations=200)
  state = opt.init(params)
  updates, state = jax.jit(opt.update)(_rnn_grad(params, batch), state,
                                       params, batch=batch)
  g = flat(_rnn_grad(params, batch)) + L2 * flat(params)
  matrix = _dense_damped(params, batch, lam)
  np.testing.assert_allclose(flat(updates), np.linalg.solve(matrix, g),
                             rtol=1e-10, atol=1e-12)
  p = -flat(updates)
  model = g @ p + 0.5 * p @ matrix @ p
  new_params = jax.tree.map(lambda a, u: a - u, params, updates)
  objective = lambda q: curvature.objective(
      _rnn_predict, losses.squared_error, q, batch, l2_reg=L2)
  rho = (objective(new_params) - objective(params)) / model
  np.testing.assert_allclose(state.reduction_ratio, rho, rtol=1e-8)
  factor = 1.5 if rho < 0.25 else (2 / 3 if rho > 0.75 else 1.0)
  np.testing.assert_allclose(state.damping, lam * factor, rtol=1e-12)


def test_injected_structural_damping_matches_and_shrinks_the_hidden_change():
  """μ injected (traced, one compile) gives the fixed-μ step; a larger μ
  moves the hidden states less (‖J_S p‖ falls)."""
  params, batch = _rnn_problem()
  grads = _rnn_grad(params, batch)
  kwargs = dict(initial_damping=0.5, line_search=False, backtracking=False,
                progress_tol=None, cg_tol=1e-12, structural_fn=_rnn_hidden)
  injected = curvature.inject_hyperparams(curvature.scale_by_hessian_free)(
      _rnn_predict, losses.squared_error, structural_damping=MU, **kwargs)
  state = injected.init(params)
  assert "structural_fn" not in state.hyperparams
  update = jax.jit(injected.update)
  vec, unravel = ravel_pytree(params)
  jac = jax.jacfwd(lambda v: _rnn_hidden(unravel(v), batch))(vec)
  jac = np.asarray(jac.reshape(-1, len(vec)))
  steps, changes = {}, []
  for mu in (0.0, MU, 10.0):
    state.hyperparams["structural_damping"] = jnp.asarray(mu)
    steps[mu], _ = update(grads, state, params, batch=batch)
    changes.append(np.linalg.norm(jac @ flat(steps[mu])))
  assert changes[0] > changes[1] > changes[2]
  fixed = curvature.scale_by_hessian_free(
      _rnn_predict, losses.squared_error, structural_damping=MU, **kwargs)
  expected, _ = jax.jit(fixed.update)(grads, fixed.init(params), params,
                                      batch=batch)
  np.testing.assert_allclose(flat(steps[MU]), flat(expected), rtol=1e-9,
                             atol=1e-12)


def test_zero_structural_damping_is_bit_identical():
  """μ = 0 (the default) builds no structural term: the same program."""
  params, batch = _rnn_problem()
  grads = _rnn_grad(params, batch)

  def program(**kwargs):
    opt = curvature.hessian_free(predict_fn=_rnn_predict,
                                 loss=losses.squared_error, l2_reg=L2,
                                 **kwargs)
    return str(jax.make_jaxpr(
        lambda s: opt.update(grads, s, params, batch=batch))(
            opt.init(params)))

  reference = program()
  assert program(structural_damping=0.0, structural_fn=_rnn_hidden) == (
      reference)
  assert program(structural_fn=_rnn_hidden) == reference
  assert program(structural_damping=MU, structural_fn=_rnn_hidden) != (
      reference)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(structural_damping=-0.1, structural_fn=_rnn_hidden), ValueError,
     "structural_damping.*>= 0"),
    (dict(structural_damping=float("nan"), structural_fn=_rnn_hidden),
     ValueError, "structural_damping"),
    (dict(structural_damping=float("inf"), structural_fn=_rnn_hidden),
     ValueError, "structural_damping"),
    (dict(structural_damping=0.1), ValueError,
     "structural_fn=lambda params, batch"),
    (dict(structural_damping=0.1, structural_fn="hidden"), TypeError,
     "structural_fn"),
])
@pytest.mark.parametrize("factory", ["hessian_free", "scale_by_hessian_free"])
def test_invalid_structural_damping_raises_at_construction(
    factory, kwargs, error, match):
  with pytest.raises(error, match=match):
    getattr(curvature, factory)(predict_fn=_rnn_predict,
                                loss=losses.squared_error, **kwargs)


def test_structural_fn_output_is_checked_at_trace_time():
  params, batch = _rnn_problem()
  grads = _rnn_grad(params, batch)

  def trace(structural_fn, batch=batch, **kwargs):
    opt = curvature.hessian_free(
        predict_fn=_rnn_predict, loss=losses.squared_error,
        structural_damping=MU, structural_fn=structural_fn, **kwargs)
    return jax.eval_shape(
        lambda s: opt.update(grads, s, params, batch=batch), opt.init(params))

  time_major = lambda p, b: jnp.swapaxes(_rnn_hidden(p, b), 0, 1)
  with pytest.raises(ValueError, match=r"shape \(4, 5, 3\).*5 examples"):
    trace(time_major)
  with pytest.raises(TypeError, match="floating-point"):
    trace(lambda p, b: (_rnn_hidden(p, b), jnp.ones((5,), jnp.int32)))
  with pytest.raises(ValueError, match="no arrays"):
    trace(lambda p, b: {})
  # Hidden states of fixed data, not of the batch given: fine for that
  # batch, a clear error as soon as the (curvature) batch changes size.
  fixed = lambda p, b: _rnn_hidden(p, batch)
  trace(fixed)
  with pytest.raises(ValueError, match=r"shape \(5, 4, 3\).*3 examples"):
    trace(fixed, curvature_batch_size=3)
  small = jax.tree.map(lambda x: x[:2], batch)
  with pytest.raises(ValueError, match="2 examples"):
    trace(fixed, batch=small)


def test_structural_matvec_reduces_over_mapped_shards():
  """With ``axis_name`` the per-shard (1/N_s) J_SᵀJ_S v are ``pmean``-ed
  into the global-batch product (vmap over 2 shards of the batch)."""
  params, batch = _rnn_problem(n=6)
  vector = random_like(params, 4)
  hf = curvature._hessian_free  # pylint: disable=protected-access

  def product(batch, axis_name=None):
    return hf._structural_matvec(  # pylint: disable=protected-access
        _rnn_hidden, params, batch, batch["inputs"].shape[0],
        axis_name)(vector)

  expected = _dense_structural(params, batch) @ flat(vector)
  np.testing.assert_allclose(flat(product(batch)), expected, rtol=1e-10,
                             atol=1e-12)
  shards = jax.tree.map(lambda x: x.reshape(2, 3, *x.shape[1:]), batch)
  got = jax.vmap(lambda b: product(b, "shards"), axis_name="shards")(shards)
  np.testing.assert_allclose(flat(jax.tree.map(lambda x: x[0], got)),
                             expected, rtol=1e-10, atol=1e-12)


# The named stages of one step ------------------------------------------------

_HF = curvature._hessian_free  # pylint: disable=protected-access


def _config(**overrides):
  """scale_by_hessian_free's checked settings: its defaults, MLP, L2."""
  import inspect  # pylint: disable=import-outside-toplevel
  parameters = inspect.signature(curvature.scale_by_hessian_free).parameters
  settings = {name: p.default for name, p in parameters.items()
              if p.default is not inspect.Parameter.empty}
  loss, _ = PROBLEMS["squared_error"]
  settings.update(predict_fn=mlp_predict, loss=loss, l2_reg=L2)
  settings.update(overrides)
  return _HF._checked_config(**settings)  # pylint: disable=protected-access


def test_stage_split_batch_takes_leading_and_trailing_examples():
  _, batch = PROBLEMS["squared_error"][1](n=7)
  parts = _HF._split_batch(  # pylint: disable=protected-access
      _config(curvature_batch_size=3, evaluation_batch_size=2,
              preconditioner_batch_size=2), batch)
  for name, part in batch.items():
    np.testing.assert_array_equal(parts.curvature[name], part[:3])
    np.testing.assert_array_equal(parts.evaluation[name], part[-2:])
    np.testing.assert_array_equal(parts.statistics[name], part[:2])
  assert parts.num_curvature == 3 and not parts.whole
  whole = _HF._split_batch(_config(), batch)  # pylint: disable=protected-access
  assert whole.whole and whole.num_curvature == 7


@pytest.mark.parametrize("evaluation_batch_size", [None, 4])
def test_stage_linearize_matches_dense_oracles(evaluation_batch_size):
  loss, make = PROBLEMS["squared_error"]
  params, batch = make()
  config = _config(curvature_batch_size=5,
                   evaluation_batch_size=evaluation_batch_size)
  parts = _HF._split_batch(config, batch)  # pylint: disable=protected-access
  grad = _grad(loss, params, batch)
  model = _HF._linearize(  # pylint: disable=protected-access
      config, params, grad, parts, jnp.asarray(0.3, jnp.float64),
      jax.random.key(0))
  evaluation = jax.tree.map(lambda x: x[-(evaluation_batch_size or 7):],
                            batch)
  np.testing.assert_allclose(model.value, _objective(loss, params,
                                                     evaluation), rtol=1e-12)
  assert model.extra_evaluations == 1  # The curvature batch is a prefix.
  np.testing.assert_allclose(flat(model.grad),
                             flat(grad) + L2 * flat(params), rtol=1e-12)
  curvature_batch = jax.tree.map(lambda x: x[:5], batch)
  damped = (dense_ggn(mlp_predict, loss, params, curvature_batch, L2)
            + 0.3 * np.eye(flat(params).size))
  vector = random_like(params, 1)
  np.testing.assert_allclose(flat(model.damped_matvec(vector)),
                             damped @ flat(vector), rtol=1e-10)
  shifted = jax.tree.map(lambda p, v: p + v, params, vector)
  np.testing.assert_allclose(model.evaluate(vector),
                             _objective(loss, shifted, evaluation),
                             rtol=1e-12)


def _model(problem="squared_error", damping=0.3, **overrides):
  loss, make = PROBLEMS[problem]
  params, batch = make()
  config = _config(loss=loss, **overrides)
  parts = _HF._split_batch(config, batch)  # pylint: disable=protected-access
  model = _HF._linearize(  # pylint: disable=protected-access
      config, params, _grad(loss, params, batch), parts,
      jnp.asarray(damping, jnp.float64), jax.random.key(0))
  return config, params, batch, model


def test_stage_solve_is_the_dense_damped_solve_from_the_warm_start():
  config, params, batch, model = _model(cg_tol=1e-13, progress_tol=None,
                                        max_cg_iterations=200)
  state = curvature.scale_by_hessian_free(mlp_predict, config.loss).init(
      params)
  state = state._replace(previous_solution=random_like(params, 2))
  cg = _HF._solve(config, model, state, None)  # pylint: disable=protected-access
  damped = (dense_ggn(mlp_predict, config.loss, params, batch, L2)
            + 0.3 * np.eye(flat(params).size))
  np.testing.assert_allclose(flat(cg.x),
                             -np.linalg.solve(damped, flat(model.grad)),
                             rtol=1e-7, atol=1e-10)
  assert cg.status == curvature.CGStatus.CONVERGED


def test_stage_solve_falls_back_to_steepest_descent():
  config, params, _, model = _model()
  model = model._replace(damped_matvec=lambda v: optax.tree.scale(-1.0, v))
  state = curvature.scale_by_hessian_free(mlp_predict, config.loss).init(
      params)
  cg = _HF._solve(config, model, state, None)  # pylint: disable=protected-access
  np.testing.assert_allclose(flat(cg.x), -flat(model.grad), rtol=1e-15)
  g = flat(model.grad)
  np.testing.assert_allclose(cg.quadratic_value, -g @ g - 0.5 * g @ g,
                             rtol=1e-12)  # gᵀd + ½ dᵀ(−I)d at d = −g.


@pytest.mark.parametrize("backtracking", [False, True])
def test_stage_choose_step_is_no_worse_than_the_last_iterate(backtracking):
  config, params, _, model = _model(
      "softmax_cross_entropy", damping=1e-4, backtracking=backtracking,
      progress_tol=None, max_cg_iterations=30)
  state = curvature.scale_by_hessian_free(mlp_predict, config.loss).init(
      params)
  cg = _HF._solve(config, model, state, None)  # pylint: disable=protected-access
  chosen = _HF._choose_step(config, cg, model)  # pylint: disable=protected-access
  np.testing.assert_allclose(chosen.value, model.evaluate(chosen.step),
                             rtol=1e-12)
  assert float(chosen.value) <= float(model.evaluate(cg.x))
  if not backtracking:
    assert int(chosen.evaluations) == 1
    np.testing.assert_array_equal(flat(chosen.step), flat(cg.x))


def _armijo_oracle(f, value, slope, c, decay, max_steps):
  alpha = 1.0
  for _ in range(max_steps + 1):
    if f(alpha) <= value + c * alpha * slope:
      return alpha if slope < 0 else 0.0
    alpha *= decay
  return 0.0


@pytest.mark.parametrize("settings", [
    dict(), dict(line_search_c=0.4, line_search_decay=0.5),
    dict(line_search_c=0.9, max_line_search_steps=3),
    dict(reject_uphill=True), dict(line_search=False)])
@pytest.mark.parametrize("length", [0.5, 3.0, 30.0])
def test_stage_line_search_matches_armijo_written_out(settings, length):
  config, _, _, model = _model(**settings)
  step = optax.tree.scale(-length, model.grad)
  chosen = _HF._Candidate(  # pylint: disable=protected-access
      step, model.evaluate(step), jnp.asarray(-1.0), jnp.asarray(1))
  alpha, _ = _HF._line_search(  # pylint: disable=protected-access
      config, model, chosen, chosen.value)
  f = lambda a: float(model.evaluate(optax.tree.scale(a, step)))
  slope = float(optax.tree.vdot(model.grad, step))
  if config.reject_uphill:
    want = _armijo_oracle(f, float(model.value), slope, 0.0, 0.8, 0)
  elif config.line_search:
    want = _armijo_oracle(f, float(model.value), slope, config.line_search_c,
                          config.line_search_decay,
                          config.max_line_search_steps)
  else:
    want = 1.0
  np.testing.assert_allclose(float(alpha), want, rtol=1e-12)


@pytest.mark.parametrize("rho, rejected, want", [
    (0.1, False, 1.5), (0.5, False, 1.0), (0.9, False, 2 / 3),
    (0.9, True, 1.5), (-np.inf, False, 1.5)])
def test_stage_adapt_damping_is_martens_rule(rho, rejected, want):
  config = _config(min_damping=0.0, max_damping=10.0)
  got = _HF._adapt_damping(  # pylint: disable=protected-access
      config, jnp.asarray(2.0, jnp.float64), jnp.asarray(rho, jnp.float64),
      jnp.asarray(rejected))
  np.testing.assert_allclose(float(got), 2.0 * want, rtol=1e-15)
  fixed = _HF._adapt_damping(  # pylint: disable=protected-access
      config._replace(adapt_damping=False), jnp.asarray(2.0, jnp.float64),
      jnp.asarray(rho, jnp.float64), jnp.asarray(rejected))
  assert float(fixed) == 2.0


@pytest.mark.parametrize("rejected", [False, True])
def test_stage_next_state_records_the_step(rejected):
  config, params, _, model = _model()
  state = curvature.scale_by_hessian_free(mlp_predict, config.loss).init(
      params)
  cg = _HF._solve(config, model, state, None)  # pylint: disable=protected-access
  chosen = _HF._choose_step(config, cg, model)  # pylint: disable=protected-access
  step = _HF._Step(  # pylint: disable=protected-access
      cg, chosen, jnp.asarray(0.5), jnp.asarray(0.8), 3,
      jnp.asarray(rejected), jnp.asarray(0.2, jnp.float64))
  new = _HF._next_state(  # pylint: disable=protected-access
      state, step, model, jax.random.key(5), ())
  assert int(new.count) == 1 and float(new.damping) == 0.2
  assert int(new.info.rejected_steps) == int(rejected)
  assert int(new.info.loss_evaluations) == int(chosen.evaluations) + 3
  assert int(new.info.cg_iterations) == int(cg.iterations)
  np.testing.assert_allclose(new.info.objective_value, model.value)
  if rejected:
    assert float(new.info.reduction_ratio) == -np.inf
    assert float(new.info.step_size) == 0.0
    assert np.all(flat(new.previous_solution) == 0)
  else:
    assert float(new.info.reduction_ratio) == 0.5
    np.testing.assert_allclose(float(new.info.step_size), 0.8)
    np.testing.assert_array_equal(flat(new.previous_solution), flat(cg.x))
  # The statistics stay readable at the top level.
  assert new.cg_iterations is new.info.cg_iterations
  assert new.reduction_ratio is new.info.reduction_ratio


def test_levenberg_marquardt_alias_takes_the_full_step_or_none():
  loss, make = PROBLEMS["softmax_cross_entropy"]
  params, batch = make()
  for damping in (1e-3, 1.0):
    opt = curvature.levenberg_marquardt(predict_fn=mlp_predict, loss=loss,
                                        damping=damping, l2_reg=L2)
    updates, state = _one_step(opt, params, batch, loss)
    step_size = float(_hf_state(state).info.step_size)
    assert step_size in (0.0, 1.0)
    after = _objective(loss, optax.apply_updates(params, updates), batch)
    assert float(after) <= float(_objective(loss, params, batch))
