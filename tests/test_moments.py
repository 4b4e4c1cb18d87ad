"""EMA with bias correction of arbitrary statistics; running sums."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature

DTYPES = [jnp.float32, jnp.float64]
TOL = {jnp.float32: 1e-6, jnp.float64: 1e-13}


@pytest.mark.parametrize("dtype", DTYPES)
def test_debiased_ema_is_the_normalised_weighted_average(dtype):
  beta, t = 0.8, 7
  stats = np.random.default_rng(0).normal(size=(t, 3))
  moment = jnp.zeros(3, dtype)
  for s in stats:
    moment = curvature.ema_update(moment, jnp.asarray(s, dtype), beta)
  weights = (1 - beta) * beta ** np.arange(t - 1, -1, -1)
  want = weights @ stats / (1 - beta**t)
  got = curvature.debias(moment, beta, t)
  assert got.dtype == dtype
  np.testing.assert_allclose(got, want, rtol=10 * TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_debias_recovers_a_constant_statistic_at_every_step(dtype):
  beta = 0.999
  moment = jnp.zeros((), dtype)
  for t in range(1, 6):
    moment = curvature.ema_update(moment, jnp.asarray(2.5, dtype), beta)
    np.testing.assert_allclose(
        curvature.debias(moment, beta, t), 2.5, rtol=1e3 * TOL[dtype]
    )


def test_ema_functions_accept_pytrees_unrelated_to_params():
  """Kronecker-factor-like statistics: matrices of other shapes, jitted."""
  factors = {"A": jnp.zeros((3, 3)), "G": [jnp.zeros((2, 2)), jnp.zeros(())]}
  stat = jax.tree.map(jnp.ones_like, factors)

  @jax.jit
  def step(moment, count):
    moment = curvature.ema_update(moment, stat, 0.5)
    return moment, curvature.debias(moment, 0.5, count)

  moment, debiased = step(factors, 1)
  for m, d in zip(jax.tree.leaves(moment), jax.tree.leaves(debiased)):
    np.testing.assert_allclose(m, 0.5)
    np.testing.assert_allclose(d, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_by_ema_equals_optax_ema(dtype):
  params = {"w": jnp.zeros((2, 3), dtype), "b": jnp.zeros(3, dtype)}
  ours, ref = curvature.scale_by_ema(0.9), optax.ema(0.9, debias=True)
  s_ours, s_ref = ours.init(params), ref.init(params)
  for k in range(5):
    g = jax.tree.map(lambda p: jnp.full_like(p, (-1.0) ** k * (k + 1)), params)
    u_ours, s_ours = ours.update(g, s_ours, params)
    u_ref, s_ref = ref.update(g, s_ref, params)
    for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_ref)):
      assert a.dtype == dtype
      np.testing.assert_array_equal(a, b)
  assert int(s_ours.count) == 5


def test_scale_by_ema_of_squares_is_the_empirical_fisher_diagonal():
  """Without bias correction and with an initial value (RMSProp's nu)."""
  opt = curvature.scale_by_ema(
      0.5, statistic=jnp.square, bias_correction=False, initial_value=1.0
  )
  state = opt.init(jnp.zeros(2, jnp.float64))
  out, state = opt.update(jnp.array([2.0, -4.0]), state)
  np.testing.assert_allclose(out, [0.5 + 0.5 * 4.0, 0.5 + 0.5 * 16.0])


def test_scale_by_ema_accumulator_dtype():
  opt = curvature.scale_by_ema(0.9, accumulator_dtype=jnp.float32)
  state = opt.init(jnp.zeros(3, jnp.float64))
  assert state.ema.dtype == jnp.float32
  _, state = opt.update(jnp.ones(3, jnp.float64), state)
  assert state.ema.dtype == jnp.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_running_sum_is_adagrads_accumulator(dtype):
  opt = curvature.scale_by_running_sum(initial_value=0.1)
  state = opt.init(jnp.zeros(2, dtype))
  grads = [jnp.array([1.0, 2.0], dtype), jnp.array([-3.0, 0.5], dtype)]
  for g in grads:
    out, state = opt.update(g, state)
  assert out.dtype == dtype
  np.testing.assert_allclose(out, [0.1 + 1 + 9, 0.1 + 4 + 0.25], rtol=1e-6)


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5, float("nan")])
def test_bad_decay_raises(decay):
  with pytest.raises(ValueError, match=r"decay.*\[0.0, 1.0\)"):
    curvature.scale_by_ema(decay)


def test_negative_initial_sum_raises():
  with pytest.raises(ValueError, match="initial_value"):
    curvature.scale_by_running_sum(initial_value=-1.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_initial_value_raises(value):
  """Found by tests/test_contract_fuzz.py: it reached the updates."""
  with pytest.raises(ValueError, match="initial_value.*finite"):
    curvature.scale_by_ema(0.9, initial_value=value)
