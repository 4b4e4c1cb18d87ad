"""Polyak averaging of parameters, uniform and exponential."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature

DTYPES = [jnp.float32, jnp.float64]


def _run(opt, x, grads):
  state, iterates = opt.init(x), []
  for g in grads:
    u, state = opt.update(g, state, x)
    x = optax.apply_updates(x, u)
    iterates.append(np.asarray(x, np.float64))
  return x, state, np.stack(iterates)


@pytest.mark.parametrize("dtype", DTYPES)
def test_uniform_average_is_the_mean_of_the_iterates(dtype):
  opt = optax.chain(optax.sgd(0.1, momentum=0.5), curvature.polyak_averaging())
  grads = jnp.asarray(np.random.default_rng(0).normal(size=(12, 3)), dtype)
  x, state, iterates = _run(opt, jnp.ones(3, dtype), grads)
  avg = curvature.averaged_params(state)
  assert avg.dtype == dtype
  np.testing.assert_allclose(avg, iterates.mean(0), rtol=1e-5, atol=1e-6)
  # The updates pass through: the iterates are those of plain SGD.
  plain, _, _ = _run(optax.sgd(0.1, momentum=0.5), jnp.ones(3, dtype), grads)
  np.testing.assert_array_equal(x, plain)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exponential_average_is_the_debiased_ema(dtype):
  beta = 0.7
  opt = optax.chain(optax.sgd(0.1), curvature.polyak_averaging(beta))
  grads = jnp.asarray(np.random.default_rng(1).normal(size=(9, 2)), dtype)
  _, state, iterates = _run(opt, jnp.zeros(2, dtype), grads)
  t = len(iterates)
  weights = (1 - beta) * beta ** np.arange(t - 1, -1, -1)
  want = weights @ iterates / (1 - beta**t)
  np.testing.assert_allclose(curvature.averaged_params(state, beta), want,
                             rtol=1e-5)


def test_averaging_reduces_sgd_noise_on_a_quadratic():
  """Polyak & Juditsky: the averaged iterate is closer to the optimum."""
  x_star = jnp.array([1.0, -1.0], jnp.float64)
  noise = jax.random.normal(jax.random.key(0), (400, 2), jnp.float64)
  opt = optax.chain(optax.sgd(0.2), curvature.polyak_averaging())

  @jax.jit
  def run(x):
    def step(carry, n):
      x, s = carry
      u, s = opt.update(x - x_star + n, s, x)
      return (optax.apply_updates(x, u), s), None
    (x, s), _ = jax.lax.scan(step, (x, opt.init(x)), noise)
    return x, s

  last, state = run(jnp.zeros(2, jnp.float64))
  err_last = float(jnp.linalg.norm(last - x_star))
  err_avg = float(jnp.linalg.norm(curvature.averaged_params(state) - x_star))
  assert err_avg < 0.5 * err_last


def test_averaging_needs_params_and_a_state():
  opt = curvature.polyak_averaging()
  with pytest.raises(ValueError, match="params"):
    opt.update(jnp.ones(2), opt.init(jnp.ones(2)))
  with pytest.raises(ValueError, match="PolyakAveragingState"):
    curvature.averaged_params(optax.sgd(0.1).init(jnp.ones(2)))


@pytest.mark.parametrize("decay", [1.0, -0.5])
def test_bad_decay_raises(decay):
  with pytest.raises(ValueError, match="decay"):
    curvature.polyak_averaging(decay)
