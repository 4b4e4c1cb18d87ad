"""AdaDelta in both seed forms, and delta-bar-delta."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature

DTYPES = [jnp.float32, jnp.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_zeiler_form_is_optax_scale_by_adadelta(dtype):
  ours = curvature.scale_by_adadelta(0.95, 1e-6)
  ref = optax.scale_by_adadelta(0.95, 1e-6)
  params = jnp.zeros(5, dtype)
  s_ours, s_ref = ours.init(params), ref.init(params)
  for k in range(30):
    g = jnp.sin(jnp.arange(5, dtype=dtype) * 0.7 + k)
    u_ours, s_ours = ours.update(g, s_ours)
    u_ref, s_ref = ref.update(g, s_ref)
    assert u_ours.dtype == dtype
    np.testing.assert_array_equal(u_ours, u_ref)


def test_weights_form_update_is_invariant_to_gradient_scale():
  """seeds/003: rescaling the gradients leaves the AdaDelta update unchanged."""
  opt = curvature.scale_by_adadelta(0.9, 0.0, form="weights")
  params = jnp.array([1.0, -2.0, 0.5], jnp.float64)
  g = jnp.array([0.3, 0.1, -2.0], jnp.float64)
  u1, _ = opt.update(g, opt.init(params), params)
  u2, _ = opt.update(1e3 * g, opt.init(params), params)
  np.testing.assert_allclose(u1, u2, rtol=1e-12)


def test_weights_form_update_has_the_units_of_the_weights():
  """Reparametrising w -> c w (so g -> g / c) scales the step by c."""
  opt = curvature.scale_by_adadelta(0.9, 0.0, form="weights")
  params = jnp.array([1.0, -2.0, 0.5], jnp.float64)
  g = jnp.array([0.3, 0.1, -2.0], jnp.float64)
  c = 7.0
  u1, _ = opt.update(g, opt.init(params), params)
  u2, _ = opt.update(g / c, opt.init(params), c * params)
  np.testing.assert_allclose(u2, c * u1, rtol=1e-12)


@pytest.mark.parametrize("form", ["updates", "weights"])
def test_zero_eps_at_a_zero_gradient_gives_a_zero_update(form):
  """Found by tests/test_contract_fuzz.py: eps=0 gave 0/0 = NaN there."""
  opt = curvature.scale_by_adadelta(0.9, 0.0, form=form)
  params = jnp.array([1.0, 0.0], jnp.float64)
  state = opt.init(params)
  for _ in range(2):
    updates, state = opt.update(jnp.array([0.0, 0.0]), state, params)
    np.testing.assert_array_equal(updates, [0.0, 0.0])


def test_weights_form_needs_params():
  opt = curvature.scale_by_adadelta(form="weights")
  with pytest.raises(ValueError, match="params"):
    opt.update(jnp.ones(2), opt.init(jnp.ones(2)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_bar_delta_gains_follow_sign_agreement(dtype):
  kappa, phi, theta = 0.5, 0.25, 0.0  # theta=0: bar_delta is the last grad.
  opt = curvature.scale_by_delta_bar_delta(kappa, phi, theta)
  state = opt.init(jnp.zeros(2, dtype))
  u, state = opt.update(jnp.array([1.0, 1.0], dtype), state)
  np.testing.assert_allclose(state.rates, [1.0, 1.0])  # No history yet.
  u, state = opt.update(jnp.array([2.0, -2.0], dtype), state)
  np.testing.assert_allclose(state.rates, [1.5, 0.75])
  np.testing.assert_allclose(u, [3.0, -1.5])
  assert state.rates.dtype == dtype


def test_delta_bar_delta_beats_gradient_descent_on_full_batch_quadratic():
  h = jnp.array([1.0, 0.01], jnp.float64)
  loss = lambda x: 0.5 * jnp.sum(h * x**2)

  def run(opt):
    x = jnp.ones(2, jnp.float64)
    state = opt.init(x)
    for _ in range(100):
      u, state = opt.update(jax.grad(loss)(x), state, x)
      x = optax.apply_updates(x, u)
    return float(loss(x))

  assert run(curvature.delta_bar_delta(0.5, kappa=0.05)) < 0.1 * run(
      curvature.sgd(0.5))


@pytest.mark.parametrize("make, match", [
    (lambda: curvature.scale_by_adadelta(rho=1.0), "rho"),
    (lambda: curvature.scale_by_adadelta(eps=-1.0), "eps"),
    (lambda: curvature.scale_by_adadelta(form="zeiler"), "form"),
    (lambda: curvature.scale_by_delta_bar_delta(kappa=-0.1), "kappa"),
    (lambda: curvature.scale_by_delta_bar_delta(phi=1.0), "phi"),
    (lambda: curvature.scale_by_delta_bar_delta(theta=1.0), "theta"),
    (lambda: curvature.scale_by_delta_bar_delta(initial_rate=0.0),
     "initial_rate"),
])
def test_bad_arguments_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()
