"""The block core: averages, refresh schedule and rejection, and each block
kind against dense float64 oracles (numpy/scipy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from curvature import _blocks


def _psd(key, n, rank=None):
  x = np.asarray(jax.random.normal(jax.random.key(key), (n, rank or 2 * n),
                                   jnp.float64))
  return x @ x.T / x.shape[1]


def _matrix(key, m, n):
  return np.asarray(jax.random.normal(jax.random.key(key), (m, n),
                                      jnp.float64))


VIEW = _blocks.reshape_view()


@pytest.mark.parametrize("mode", ["ema", "schedule", "sum",
                                  "uncorrected_ema"])
def test_average_modes_match_their_formulas(mode):
  decay = 0.8
  samples = [float(k) ** 2 + 1.0 for k in range(1, 9)]
  m = jnp.zeros((), jnp.float64)
  expected = 0.0
  for k, s in enumerate(samples, start=1):
    m = _blocks.average(m, jnp.asarray(s), jnp.asarray(k), decay, mode)
    if mode == "sum":
      expected += s
    elif mode == "schedule":
      w = min(1 - 1 / k, decay)
      expected = w * expected + (1 - w) * s
    else:
      expected = decay * expected + (1 - decay) * s
  got = _blocks.estimate(m, jnp.asarray(len(samples)), decay, mode)
  if mode == "ema":
    expected /= 1 - decay ** len(samples)
  np.testing.assert_allclose(float(got), expected, rtol=1e-13)


def test_schedule_is_an_equal_weight_mean_until_the_decay_takes_over():
  decay = 0.9  # 1 − 1/k < 0.9 for k < 10: the first 10 samples, equally.
  samples = np.arange(1.0, 11.0)
  m = jnp.zeros((), jnp.float64)
  for k, s in enumerate(samples, start=1):
    m = _blocks.average(m, jnp.asarray(s), jnp.asarray(k), decay, "schedule")
  np.testing.assert_allclose(float(m), samples.mean(), rtol=1e-13)


def test_refresh_schedule_with_geometric_warmup():
  due = [int(k) for k in range(45)
         if _blocks.refresh_due(jnp.asarray(k), 20, True)]
  assert due == [0, 1, 2, 4, 8, 16, 20, 40]
  plain = [int(k) for k in range(45)
           if _blocks.refresh_due(jnp.asarray(k), 20, False)]
  assert plain == [0, 20, 40]


def _kfac_block(a_dim=4, g_dim=3, a_used=None):
  return _blocks.kronecker_block(
      (0,), a_dim, g_dim, jnp.float64,
      statistics=lambda f: f,
      inverse=_blocks.factored_damped_inverse(a_used or a_dim),
      view=VIEW)


def test_kronecker_block_is_the_pi_damped_kronecker_inverse():
  a, g, m = _psd(0, 4), _psd(1, 3), _matrix(2, 4, 3)
  gamma = 0.3
  block = _kfac_block()
  pre = block.refresh(_blocks.KroneckerFactors(jnp.asarray(a),
                                               jnp.asarray(g)), gamma)
  state = _blocks.BlockState((), pre)
  (got,) = block.apply(state, (jnp.asarray(m),), None)
  pi = np.sqrt((np.trace(a) / 4) / (np.trace(g) / 3))
  dense = np.kron(a + pi * gamma * np.eye(4), g + gamma / pi * np.eye(3))
  expected = np.linalg.solve(dense, m.reshape(-1)).reshape(4, 3)
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_bias_less_layer_uses_the_used_dimension_for_pi():
  a_used = _psd(5, 3)
  a = np.zeros((4, 4))
  a[:3, :3] = a_used  # The homogeneous coordinate is unused.
  g, m = _psd(6, 2), np.array(_matrix(7, 4, 2))
  m[-1] = 0.0
  gamma = 0.2
  block = _kfac_block(4, 2, a_used=3)
  pre = block.refresh(_blocks.KroneckerFactors(jnp.asarray(a),
                                               jnp.asarray(g)), gamma)
  (got,) = block.apply(_blocks.BlockState((), pre), (jnp.asarray(m),), None)
  pi = np.sqrt((np.trace(a_used) / 3) / (np.trace(g) / 2))
  expected = (np.linalg.inv(a_used + pi * gamma * np.eye(3)) @ m[:3]
              @ np.linalg.inv(g + gamma / pi * np.eye(2)))
  np.testing.assert_allclose(np.asarray(got)[:3], expected, rtol=1e-10)


def test_factor_roots_are_the_fractional_matrix_power():
  l, r, m = _psd(8, 4, rank=2), _psd(9, 3, rank=5), _matrix(10, 4, 3)
  eps = 1e-3
  block = _blocks.kronecker_block(
      (0,), 4, 3, jnp.float64, statistics=lambda f: f,
      inverse=_blocks.factor_roots(-0.25), view=VIEW)
  pre = block.refresh(_blocks.KroneckerFactors(jnp.asarray(l),
                                               jnp.asarray(r)), eps)
  (got,) = block.apply(_blocks.BlockState((), pre), (jnp.asarray(m),), None)
  expected = (np.real(scipy.linalg.fractional_matrix_power(
      l + eps * np.eye(4), -0.25)) @ m @ np.real(
          scipy.linalg.fractional_matrix_power(r + eps * np.eye(3), -0.25)))
  np.testing.assert_allclose(got, expected, rtol=1e-9)


@pytest.mark.parametrize("power,in_root", [(1.0, True), (0.5, False)])
def test_eigen_kronecker_block_is_a_diagonal_in_the_kronecker_eigenbasis(
    power, in_root):
  a, g, m = _psd(11, 4), _psd(12, 3), _matrix(13, 4, 3)
  s = np.abs(_matrix(14, 4, 3)) + 0.1
  damping = 0.05
  block = _blocks.eigen_kronecker_block(
      (0,), 4, 3, jnp.float64, statistics=lambda f: f,
      refit=lambda e, b: e, view=VIEW, power=power, damping_in_root=in_root)
  basis = block.refresh(_blocks.KroneckerFactors(jnp.asarray(a),
                                                 jnp.asarray(g)), None)
  state = _blocks.BlockState((), basis, jnp.asarray(s))
  (got,) = block.apply(state, (jnp.asarray(m),), damping)
  _, qa = np.linalg.eigh(a)
  _, qg = np.linalg.eigh(g)
  q = np.kron(qa, qg)  # Eigenvectors of A ⊗ G, in row-major vec order.
  scale = ((s + damping) ** power if in_root else s ** power + damping)
  dense = q @ np.diag(1.0 / scale.reshape(-1)) @ q.T
  np.testing.assert_allclose(np.asarray(got).reshape(-1),
                             dense @ m.reshape(-1), rtol=1e-9)


def test_dense_block_is_the_damped_inverse():
  c, v = _psd(15, 6), _matrix(16, 2, 3)
  block = _blocks.dense_block((0,), 6, jnp.float64)
  inverse = block.refresh(jnp.asarray(c), 0.1)
  np.testing.assert_allclose(inverse, np.linalg.inv(c + 0.1 * np.eye(6)),
                             rtol=1e-10)
  (got,) = block.apply(_blocks.BlockState((), inverse), (jnp.asarray(v),),
                       None)
  np.testing.assert_allclose(
      np.asarray(got).reshape(-1),
      np.linalg.solve(c + 0.1 * np.eye(6), v.reshape(-1)), rtol=1e-10)


def test_accumulate_discards_the_whole_batch_when_one_block_is_not_finite():
  blocks = {"x": _blocks.dense_block((0,), 2, jnp.float64),
            "y": _blocks.dense_block((1,), 2, jnp.float64)}
  states = {n: b.init() for n, b in blocks.items()}
  good = {"x": jnp.eye(2), "y": 2 * jnp.eye(2)}
  states, count, finite = _blocks.accumulate(
      blocks, states, good, jnp.asarray(0), 0.5, "ema")
  assert bool(finite) and int(count) == 1
  bad = {"x": jnp.eye(2), "y": jnp.full((2, 2), jnp.nan)}
  new, count2, finite = _blocks.accumulate(
      blocks, states, bad, count, 0.5, "ema")
  assert not bool(finite) and int(count2) == 1
  for name in blocks:
    np.testing.assert_array_equal(new[name].statistics,
                                  states[name].statistics)


def test_refresh_keeps_the_previous_preconditioner_when_not_finite():
  blocks = {"x": _blocks.dense_block((0,), 2, jnp.float64)}
  states = {"x": blocks["x"].init()}
  nan = {"x": jnp.full((2, 2), jnp.nan)}
  new, rejected = _blocks.refresh(blocks, states, nan, jnp.asarray(True),
                                  0.1, jnp.asarray(3))
  assert int(rejected) == 1
  np.testing.assert_array_equal(new["x"].preconditioner, np.eye(2))


def test_refresh_waits_for_an_accepted_sample_then_refreshes_at_once():
  blocks = {"x": _blocks.dense_block((0,), 2, jnp.float64)}
  states = {"x": blocks["x"].init()}
  stats = {"x": 4.0 * jnp.eye(2)}
  # No accepted sample yet: the identity of init stays, even when due.
  kept, _ = _blocks.refresh(blocks, states, stats, jnp.asarray(True), 0.0,
                            jnp.asarray(0))
  np.testing.assert_array_equal(kept["x"].preconditioner, np.eye(2))
  # The first accepted sample refreshes even off the schedule.
  fresh, _ = _blocks.refresh(blocks, states, stats, jnp.asarray(False), 0.0,
                             jnp.asarray(1))
  np.testing.assert_allclose(fresh["x"].preconditioner, np.eye(2) / 4)
  later, _ = _blocks.refresh(blocks, states, stats, jnp.asarray(False), 0.0,
                             jnp.asarray(2))
  np.testing.assert_array_equal(later["x"].preconditioner, np.eye(2))


def test_refresh_runs_under_jit_without_recompiling():
  blocks = {"x": _kfac_block(3, 2)}
  states = {"x": blocks["x"].init()}

  @jax.jit
  def step(states, factors, count):
    return _blocks.refresh(blocks, states, {"x": factors},
                           _blocks.refresh_due(count, 5), 0.1, count + 1)

  factors = _blocks.KroneckerFactors(jnp.asarray(_psd(17, 3)),
                                     jnp.asarray(_psd(18, 2)))
  for k in range(7):
    states, _ = step(states, factors, jnp.asarray(k))
  assert step._cache_size() == 1


def test_block_rows_are_shared_by_kfac_and_block_diagonal():
  import curvature
  assert curvature.KfacBlock is curvature.CurvatureBlock is curvature.BlockRow


def test_devices_are_assigned_greedily_by_refresh_cost():
  # Longest first, each to the least-loaded device (lowest index on ties).
  costs = {"a": 8, "b": 5, "c": 4, "d": 3, "e": 3}
  assert _blocks.assign_devices(costs, 2) == {
      "a": 0, "b": 1, "c": 1, "d": 0, "e": 1}
  assert _blocks.assign_devices(costs, 8) == {
      "a": 0, "b": 1, "c": 2, "d": 3, "e": 4}
  assert set(_blocks.assign_devices(costs, 1).values()) == {0}
  # d³ per (stacked) square matrix, d per diagonal factor.
  factors = _blocks.KroneckerFactors(jnp.zeros((2, 5, 5)), jnp.zeros(7))
  assert _blocks.refresh_cost(factors) == 2 * 125 + 7
