"""Conjugate gradient against jnp.linalg.solve and jax.scipy.sparse.linalg.cg."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvature
from curvature._cg import backtracking_schedule

CG = curvature.CGStatus


def _spd(n, condition, seed=0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  eigs = np.geomspace(1.0, condition, n)
  return (q * eigs) @ q.T, rng.normal(size=n)


def _split(v):
  return {"a": v[:3], "b": v[3:].reshape(-1, 1)}


def _join(tree):
  return jnp.concatenate([tree["a"], tree["b"].ravel()])


def _tree_matvec(a):
  return lambda t: _split(jnp.asarray(a) @ _join(t))


def test_solves_spd_pytree_system():
  a, b = _spd(12, 100.0)
  result = jax.jit(lambda b: curvature.conjugate_gradient(
      _tree_matvec(a), _split(b), tol=1e-12, progress_tol=None))(b)
  x = np.asarray(_join(result.x))
  np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-9)
  assert result.status == CG.CONVERGED
  np.testing.assert_allclose(result.residual_norm, np.linalg.norm(b - a @ x),
                             atol=1e-10)
  np.testing.assert_allclose(result.quadratic_value, 0.5 * x @ a @ x - b @ x,
                             rtol=1e-12)


@pytest.mark.parametrize("iterations", [1, 3, 6])
def test_iterates_match_jax_scipy_cg(iterations):
  a, b = _spd(10, 50.0, seed=1)
  ours = curvature.conjugate_gradient(
      lambda v: jnp.asarray(a) @ v, jnp.asarray(b), max_iterations=iterations,
      tol=0.0, progress_tol=None)
  theirs, _ = jax.scipy.sparse.linalg.cg(
      lambda v: jnp.asarray(a) @ v, jnp.asarray(b), tol=0.0, atol=0.0,
      maxiter=iterations)
  assert ours.iterations == iterations and ours.status == CG.MAX_ITERATIONS
  np.testing.assert_allclose(ours.x, theirs, rtol=1e-10)


def test_preconditioner_keeps_the_solution_and_saves_iterations():
  rng = np.random.default_rng(2)
  scales = np.geomspace(1, 1e4, 20)
  a = np.diag(scales) + 0.01 * (lambda m: m @ m.T)(rng.normal(size=(20, 20)))
  b = rng.normal(size=20)
  matvec = lambda v: jnp.asarray(a) @ v
  plain = curvature.conjugate_gradient(matvec, jnp.asarray(b), tol=1e-10,
                                       progress_tol=None)
  jacobi = curvature.conjugate_gradient(
      matvec, jnp.asarray(b), tol=1e-10, progress_tol=None,
      preconditioner=lambda r: r / jnp.diag(jnp.asarray(a)))
  np.testing.assert_allclose(jacobi.x, np.linalg.solve(a, b), rtol=1e-7)
  assert jacobi.iterations < plain.iterations


def test_warm_start_at_the_solution_needs_no_iteration():
  a, b = _spd(8, 10.0)
  x_star = np.linalg.solve(a, b)
  result = curvature.conjugate_gradient(
      lambda v: jnp.asarray(a) @ v, jnp.asarray(b), jnp.asarray(x_star),
      tol=1e-8)
  assert result.iterations == 0 and result.status == CG.CONVERGED


def test_warm_start_changes_only_the_start():
  a, b = _spd(8, 10.0)
  x0 = jnp.ones(8)
  result = curvature.conjugate_gradient(
      lambda v: jnp.asarray(a) @ v, jnp.asarray(b), x0, tol=1e-12,
      progress_tol=None)
  np.testing.assert_allclose(result.x, np.linalg.solve(a, b), rtol=1e-9)


def test_martens_rule_stops_where_the_rule_first_holds():
  a, b = _spd(300, 1e6, seed=3)
  eps = 1e-2  # Larger than Martens' 5e-4 so that it fires well before 250.
  matvec = lambda v: jnp.asarray(a) @ v

  def phi_after(i):
    return float(curvature.conjugate_gradient(
        matvec, jnp.asarray(b), max_iterations=i, tol=0.0,
        progress_tol=None).quadratic_value) if i else 0.0

  result = curvature.conjugate_gradient(matvec, jnp.asarray(b), tol=0.0,
                                        progress_tol=eps, max_iterations=250)
  assert result.status == CG.STALLED
  i = int(result.iterations)

  def rule_holds(i):
    k = max(10, int(np.ceil(0.1 * i)))
    phi_i, phi_k = phi_after(i), phi_after(i - k)
    return i > k and phi_i < 0 and (phi_i - phi_k) / phi_i < k * eps

  assert rule_holds(i)
  assert not rule_holds(i - 1)
  np.testing.assert_allclose(result.quadratic_value, phi_after(i), rtol=1e-9)


def test_negative_curvature_stops_cleanly():
  a = np.diag([3.0, 2.0, -1.0, 1.0])
  b = np.ones(4)
  result = curvature.conjugate_gradient(lambda v: jnp.asarray(a) @ v,
                                        jnp.asarray(b), tol=1e-12)
  assert result.status == CG.NEGATIVE_CURVATURE
  assert np.all(np.isfinite(result.x))
  x = np.asarray(result.x)
  assert result.quadratic_value <= 0
  np.testing.assert_allclose(result.quadratic_value, 0.5 * x @ a @ x - b @ x)


def test_nan_product_is_flagged_and_last_finite_iterate_kept():
  nan_everywhere = curvature.conjugate_gradient(
      lambda v: v * jnp.nan, jnp.ones(3), tol=1e-12)
  assert nan_everywhere.status == CG.NON_FINITE
  np.testing.assert_array_equal(nan_everywhere.x, np.zeros(3))
  assert nan_everywhere.iterations == 0

  # Products turn NaN once the search directions get small, i.e. after a few
  # finite steps, as a curvature product that overflows midway would.
  a, b = _spd(30, 1e3, seed=5)
  threshold = 1e-2 * np.linalg.norm(b)
  poisoned = lambda v: jnp.where(
      jnp.linalg.norm(v) < threshold, jnp.nan, 1.0) * (jnp.asarray(a) @ v)
  result = curvature.conjugate_gradient(poisoned, jnp.asarray(b), tol=1e-12,
                                        progress_tol=None)
  assert result.status == CG.NON_FINITE and result.iterations > 0
  clean = curvature.conjugate_gradient(
      lambda v: jnp.asarray(a) @ v, jnp.asarray(b), tol=0.0,
      progress_tol=None, max_iterations=int(result.iterations))
  np.testing.assert_allclose(result.x, clean.x, rtol=1e-10)
  assert np.isfinite(result.quadratic_value)


def test_recorded_iterates_are_the_iterates_at_the_schedule():
  a, b = _spd(40, 1e3, seed=4)
  matvec = lambda v: jnp.asarray(a) @ v
  result = curvature.conjugate_gradient(
      matvec, jnp.asarray(b), max_iterations=30, tol=0.0, progress_tol=None,
      record_iterates=True)
  schedule = backtracking_schedule(30)
  np.testing.assert_array_equal(result.recorded_iterations, schedule)
  assert int(result.num_recorded) == len(schedule)
  for slot, i in enumerate(schedule):
    direct = curvature.conjugate_gradient(
        matvec, jnp.asarray(b), max_iterations=int(i), tol=0.0,
        progress_tol=None)
    np.testing.assert_allclose(result.recorded[slot], direct.x, rtol=1e-10)
    np.testing.assert_allclose(result.recorded_values[slot],
                               direct.quadratic_value, rtol=1e-10)


def test_martens_backtracking_schedule():
  np.testing.assert_array_equal(
      backtracking_schedule(250),
      [2, 3, 4, 5, 7, 9, 11, 14, 18, 24, 31, 40, 52, 67, 87, 113, 147, 191,
       248])


def test_zero_right_hand_side_converges_immediately():
  result = curvature.conjugate_gradient(lambda v: 2 * v, jnp.zeros(4))
  assert result.status == CG.CONVERGED and result.iterations == 0


def test_no_recompilation_for_new_data():
  traces = []

  @jax.jit
  def solve(a, b):
    traces.append(1)
    return curvature.conjugate_gradient(lambda v: a @ v, b).x

  for seed in range(3):
    a, b = _spd(5, 10.0, seed)
    np.testing.assert_allclose(solve(a, b), np.linalg.solve(a, b), rtol=1e-6)
  assert len(traces) == 1


def test_bad_arguments_raise():
  matvec = lambda v: v
  with pytest.raises(ValueError, match="max_iterations"):
    curvature.conjugate_gradient(matvec, jnp.ones(2), max_iterations=0)
  with pytest.raises(TypeError, match="static_args"):
    curvature.conjugate_gradient(matvec, jnp.ones(2), max_iterations=2.0)
  with pytest.raises(ValueError, match="same structure"):
    curvature.conjugate_gradient(matvec, {"a": jnp.ones(2)}, jnp.ones(2))
  with pytest.raises(ValueError, match="empty"):
    curvature.conjugate_gradient(matvec, {})
  with pytest.raises(ValueError, match="tol"):
    curvature.conjugate_gradient(matvec, jnp.ones(2), tol=-1.0)
  with pytest.raises(TypeError, match="floating"):
    curvature.conjugate_gradient(matvec, jnp.ones(2, int))


def test_pcg_with_spd_preconditioner_solves_the_damped_system():
  """(C + λI) p = −g with a dense SPD M, float64, against jnp.linalg.solve."""
  rng = np.random.default_rng(7)
  c, g = _spd(15, 1e4, seed=7)
  damping = 0.1
  a = c + damping * np.eye(15)
  m_half = rng.normal(size=(15, 15))
  m = m_half @ m_half.T + 0.5 * np.eye(15)  # SPD, unrelated to C.
  m_inv = np.linalg.inv(m)
  result = curvature.conjugate_gradient(
      lambda v: jnp.asarray(a) @ v, -jnp.asarray(g), tol=1e-12,
      progress_tol=None, preconditioner=lambda r: jnp.asarray(m_inv) @ r)
  assert result.status == CG.CONVERGED
  assert not result.preconditioner_breakdown
  np.testing.assert_allclose(result.x, np.linalg.solve(a, -g), rtol=1e-8)


@pytest.mark.parametrize("bad", ["nan", "negative"])
def test_preconditioner_breakdown_falls_back_to_plain_cg(bad):
  a, b = _spd(10, 30.0, seed=3)
  calls = {"n": 0}

  def preconditioner(r):
    calls["n"] += 1
    return r * (jnp.nan if bad == "nan" else -1.0)

  result = curvature.conjugate_gradient(
      lambda v: jnp.asarray(a) @ v, jnp.asarray(b), tol=1e-12,
      progress_tol=None, preconditioner=preconditioner)
  assert calls["n"] >= 1
  assert bool(result.preconditioner_breakdown)
  assert result.status == CG.CONVERGED
  np.testing.assert_allclose(result.x, np.linalg.solve(a, b), rtol=1e-8)


def test_breakdown_mid_solve_restarts_unpreconditioned():
  """M⁻¹ turns indefinite after the first residual: CG still converges."""
  a, b = _spd(10, 30.0, seed=4)
  sign = jnp.where(jnp.arange(10) < 5, 1.0, -1.0)

  def preconditioner(r):
    # rᵀz = Σ± r² : positive for b (chosen below), negative later.
    return sign * r

  b = np.abs(b) * np.where(np.arange(10) < 5, 3.0, 0.1)
  result = curvature.conjugate_gradient(
      lambda v: jnp.asarray(a) @ v, jnp.asarray(b), tol=1e-12,
      progress_tol=None, preconditioner=preconditioner, max_iterations=60)
  assert float(b @ (sign * b)) > 0  # The first residual is fine.
  assert bool(result.preconditioner_breakdown)
  np.testing.assert_allclose(result.x, np.linalg.solve(a, b), rtol=1e-7)
  assert result.status == CG.CONVERGED


def test_no_breakdown_without_a_preconditioner():
  a, b = _spd(6, 10.0, seed=5)
  result = curvature.conjugate_gradient(lambda v: jnp.asarray(a) @ v,
                                        jnp.asarray(b), progress_tol=None)
  assert not result.preconditioner_breakdown


def test_traced_budget_stops_early_without_recompiling():
  a, b = _spd(12, 1e3, seed=6)
  solve = jax.jit(lambda b, budget: curvature.conjugate_gradient(
      lambda v: jnp.asarray(a) @ v, b, tol=0.0, progress_tol=None,
      max_iterations=10, budget=budget))
  for budget, status in ((3, CG.BUDGET), (10, CG.MAX_ITERATIONS)):
    result = solve(jnp.asarray(b), budget)
    assert int(result.iterations) == budget and result.status == status
  assert solve._cache_size() == 1
