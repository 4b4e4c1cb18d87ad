"""Tests for curvature._preconditioner_quality against dense oracles."""

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import optax
import pytest
import scipy.linalg

import curvature
from curvature import losses
import helpers


def _dense(fn, params):
  """The dense matrix of a linear ``fn`` in the ravel of ``params``."""
  flat, unravel = ravel_pytree(params)
  columns = jax.jit(jax.vmap(lambda e: ravel_pytree(fn(unravel(e)))[0]))(
      jnp.eye(flat.size, dtype=flat.dtype))
  return np.asarray(columns).T


def _mlp():
  """A float64 4-5-3 tanh MLP on 7 examples, squared error, its GGN + 0.1 I."""
  params, batch = helpers.regression_problem(key=0, n=7, sizes=(4, 5, 3))
  lin = curvature.linearize(helpers.mlp_predict, losses.squared_error,
                            params, batch, l2_reg=0.1)
  return params, batch, lin


def _random_diagonal(params, seed=0):
  flat, unravel = ravel_pytree(params)
  d = np.random.default_rng(seed).uniform(0.5, 5.0, flat.size)
  return unravel(jnp.asarray(d, flat.dtype))


def _probe(key, n, dtype, index=0, num_probes=1):
  """The Rademacher probe ``preconditioned_spectrum`` draws for ``index``."""
  probe_key, _ = jax.random.split(jax.random.split(key, num_probes)[index])
  return np.asarray(jax.random.rademacher(probe_key, (n,), dtype))


def test_matches_the_dense_generalized_eigenproblem_and_newton_cosine():
  params, _, lin = _mlp()
  precondition = curvature.diagonal_preconditioner(_random_diagonal(params))
  damping = 0.05
  n = ravel_pytree(params)[0].size
  key = jax.random.key(3)
  result = curvature.preconditioned_spectrum(
      lin.matvec, precondition, params, damping=damping, grad=lin.grad,
      num_iterations=n, key=key, cg_tol=1e-13)
  a = _dense(lin.matvec, params) + damping * np.eye(n)
  p_inverse = _dense(precondition, params)
  exact = scipy.linalg.eigh(a, np.linalg.inv(p_inverse), eigvals_only=True)
  np.testing.assert_allclose(float(result.largest), exact[-1], rtol=1e-8)
  np.testing.assert_allclose(float(result.smallest), exact[0], rtol=1e-8)
  np.testing.assert_allclose(float(result.condition_number),
                             exact[-1] / exact[0], rtol=1e-8)
  g = ravel_pytree(lin.grad)[0]
  step, newton = p_inverse @ g, np.linalg.solve(a, g)
  cosine = step @ newton / np.linalg.norm(step) / np.linalg.norm(newton)
  np.testing.assert_allclose(float(result.cosine), cosine, rtol=1e-8)
  assert float(result.cg_residual) < 1e-10 and bool(result.finite)
  # The SLQ weights reproduce zᵀ(P⁻¹A)ᵖz / zᵀz for the probe, p < m.
  z = _probe(key, n, np.float64)
  nodes = np.asarray(result.density.nodes[0])
  weights = np.asarray(result.density.weights[0])
  m = p_inverse @ a
  for power in range(4):
    moment = z @ np.linalg.matrix_power(m, power) @ z / (z @ z)
    np.testing.assert_allclose(weights @ nodes ** power, moment, rtol=1e-8)


def test_slq_moments_are_exact_below_the_iteration_count():
  params, _, lin = _mlp()
  precondition = curvature.diagonal_preconditioner(_random_diagonal(params, 1))
  n = ravel_pytree(params)[0].size
  key = jax.random.key(5)
  result = curvature.preconditioned_spectrum(
      lin.matvec, precondition, params, num_iterations=8, num_probes=2,
      key=key)
  m = _dense(precondition, params) @ _dense(lin.matvec, params)
  for index in range(2):
    z = _probe(key, n, np.float64, index, 2)
    nodes = np.asarray(result.density.nodes[index])
    weights = np.asarray(result.density.weights[index])
    for power in range(8):
      moment = z @ np.linalg.matrix_power(m, power) @ z / (z @ z)
      np.testing.assert_allclose(weights @ nodes ** power, moment, rtol=1e-7)


def test_a_diagonal_curvature_with_its_own_diagonal_gives_kappa_one():
  d = {"a": jnp.linspace(0.1, 100.0, 30), "b": jnp.array([3.0, 7.0])}
  matvec = lambda v: jax.tree.map(jnp.multiply, d, v)
  result = curvature.preconditioned_spectrum(
      matvec, curvature.diagonal_preconditioner(d), d, grad=d)
  np.testing.assert_allclose(float(result.condition_number), 1.0, atol=1e-12)
  np.testing.assert_allclose(float(result.cosine), 1.0, atol=1e-12)
  np.testing.assert_allclose(np.asarray(result.density.nodes), 1.0,
                             atol=1e-12)
  plain = curvature.preconditioned_spectrum(
      matvec, curvature.identity_preconditioner(), d, num_iterations=32)
  np.testing.assert_allclose(float(plain.condition_number), 1000.0,
                             rtol=1e-10)


def _one_dense_layer():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 1))),
            "b": jnp.asarray(rng.normal(size=1))}
  inputs = jnp.asarray(rng.normal(size=(32, 3)))
  targets = jnp.asarray(rng.normal(size=(32, 1)))
  predict = lambda p, batch: batch[0] @ p["w"] + p["b"]
  return params, (inputs, targets), predict


@pytest.mark.parametrize("structure", ["kronecker", "eigen_kronecker"])
def test_kfac_is_exact_on_one_dense_layer_with_squared_error(structure):
  # The GGN of x ↦ Wᵀx + b under squared error is E[ã ãᵀ] ⊗ H with H the
  # output Hessian, a constant scalar for one output, so the Fisher is
  # exactly Kronecker: Ā ⊗ H. With curvature-propagation probes g = √H z,
  # z = ±1, every g² is exactly H, so K-FAC's G and EKFAC's re-fitted
  # diagonal E[(u_iᵀã)² g²] = H λ_i(Ā) carry no sampling noise (sampled
  # targets would make them exact only in expectation), and κ = 1 once the
  # damping is negligible.
  params, batch, predict = _one_dense_layer()
  opt = curvature.scale_by_kfac(
      predict, losses.squared_error, structure=structure,
      statistics="curvature_propagation", initial_damping=1e-24)
  state = opt.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, state = opt.update(grads, state, params, batch=batch)
  precondition = curvature.kfac_preconditioner(state, predict, params, batch)
  lin = curvature.linearize(predict, losses.squared_error, params, batch)
  result = curvature.preconditioned_spectrum(lin.matvec, precondition,
                                             params, grad=lin.grad)
  np.testing.assert_allclose(float(result.condition_number), 1.0, atol=1e-8)
  np.testing.assert_allclose(float(result.cosine), 1.0, atol=1e-8)
  identity = curvature.preconditioned_spectrum(
      lin.matvec, curvature.identity_preconditioner(), params)
  assert float(identity.condition_number) > 1.5


def _same_direction(precondition, direction, vector):
  np.testing.assert_allclose(ravel_pytree(precondition(vector))[0],
                             ravel_pytree(direction)[0], rtol=1e-9,
                             atol=1e-12)


def _two_steps(opt, params, extra=None):
  """The state after two updates, and the output of the second."""
  state = opt.init(params)
  extra = extra or {}
  for seed in (1, 2):
    grads = helpers.random_like(params, seed)
    out, state = opt.update(grads, state, params, **extra)
  return state, out, grads


def test_helpers_reproduce_each_optimizers_own_direction():
  params, batch = helpers.regression_problem(key=0, n=7, sizes=(4, 5, 3))
  predict = helpers.mlp_predict
  for opt, build in [
      (curvature.scale_by_shampoo(),
       lambda s: curvature.shampoo_preconditioner(s, params)),
      (curvature.scale_by_soap(b1=0.0),
       lambda s: curvature.soap_preconditioner(s, params)),
  ]:
    state, out, grads = _two_steps(opt, params)
    _same_direction(build(state), out, grads)
  for structure in ("kronecker", "eigen_kronecker"):
    opt = curvature.scale_by_kfac(predict, losses.squared_error,
                                  structure=structure, inverse_every=1)
    state, out, grads = _two_steps(opt, params, {"batch": batch})
    _same_direction(curvature.kfac_preconditioner(state, predict, params,
                                                  batch), out, grads)
  opt = curvature.scale_by_block_diagonal(predict, losses.squared_error,
                                          max_block_size=10)
  state, out, grads = _two_steps(opt, params, {"batch": batch})
  _same_direction(curvature.block_diagonal_preconditioner(
      state, params, max_block_size=10), out, grads)


def test_adam_preconditioner_is_the_bias_corrected_second_moment():
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  opt = optax.chain(optax.adam(1e-3), optax.scale(1.0))
  state = opt.init(params)
  gs = [jnp.array([0.5, -1.0, 2.0]), jnp.array([0.25, 2.0, -1.0])]
  for g in gs:
    _, state = opt.update({"w": g}, state)
  nu = 0.001 * (0.999 * gs[0] ** 2 + gs[1] ** 2) / (1 - 0.999 ** 2)
  vector = {"w": jnp.array([1.0, 2.0, 3.0])}
  np.testing.assert_allclose(
      curvature.adam_preconditioner(state)(vector)["w"],
      vector["w"] / (jnp.sqrt(nu) + 1e-8), rtol=1e-12)
  with pytest.raises(ValueError, match="Adam state"):
    curvature.adam_preconditioner(optax.sgd(0.1).init(params))


def test_diagonal_preconditioner_reads_a_curvature_diagonal_state():
  params, batch = helpers.regression_problem(key=0, n=7, sizes=(4, 5, 3))
  estimator = curvature.ema_curvature_diagonal(
      helpers.mlp_predict, losses.squared_error, estimator="ggn")
  state = estimator.init(params)
  _, state = estimator.update(params, state, params, batch=batch)
  exact = curvature.ggn_diagonal(helpers.mlp_predict, losses.squared_error,
                                 params, batch)
  vector = helpers.random_like(params, 0)
  _same_direction(curvature.diagonal_preconditioner(state, damping=0.1),
                  curvature.diagonal_preconditioner(exact, damping=0.1)(
                      vector), vector)


def test_a_non_finite_preconditioner_gives_finite_false_not_nan():
  params, _, lin = _mlp()
  bad = lambda v: jax.tree.map(lambda x: x * jnp.nan, v)
  result = curvature.preconditioned_spectrum(lin.matvec, bad, params,
                                             grad=lin.grad)
  assert not bool(result.finite)
  assert float(result.condition_number) == np.inf
  negative = lambda v: jax.tree.map(jnp.negative, v)
  result = curvature.preconditioned_spectrum(lin.matvec, negative, params)
  assert not bool(result.finite)
  assert not np.isnan(float(result.condition_number))


def test_bad_arguments_name_the_fix():
  params, _, lin = _mlp()
  with pytest.raises(TypeError, match="precondition"):
    curvature.preconditioned_spectrum(lin.matvec, None, params)
  with pytest.raises(ValueError, match="damping"):
    curvature.preconditioned_spectrum(
        lin.matvec, curvature.identity_preconditioner(), params, damping=-1.0)
  with pytest.raises(ValueError, match="precondition"):
    curvature.preconditioned_spectrum(
        lin.matvec, lambda v: jax.tree.leaves(v)[0], params)
