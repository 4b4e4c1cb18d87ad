"""Heavy-ball and Nesterov momentum (both forms), also on preconditioned steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature

DTYPES = [jnp.float32, jnp.float64]


def _quadratic(dtype):
  a = jnp.diag(jnp.array([10.0, 1.0, 0.1], dtype))
  b = jnp.array([1.0, -2.0, 0.5], dtype)
  loss = lambda x: 0.5 * x @ a @ x - b @ x
  return loss, jnp.linalg.solve(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_heavy_ball_unrolls_like_the_seed(dtype):
  """v_4 = a^3 g1 + a^2 g2 + a g3 + g4 (seeds/001, "Momentum")."""
  alpha = 0.5
  opt = curvature.scale_by_momentum(alpha)
  state = opt.init(jnp.zeros(2, dtype))
  gs = [jnp.array([1.0, 2.0], dtype) * (k + 1) for k in range(4)]
  for g in gs:
    v, state = opt.update(g, state)
  want = alpha**3 * gs[0] + alpha**2 * gs[1] + alpha * gs[2] + gs[3]
  assert v.dtype == dtype
  np.testing.assert_allclose(v, want, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_change_of_variables_nesterov_equals_optax_trace(dtype):
  ours = curvature.scale_by_momentum(0.9, nesterov=True,
                                     form="change_of_variables")
  ref = optax.trace(0.9, nesterov=True)
  params = jnp.zeros(4, dtype)
  s_ours, s_ref = ours.init(params), ref.init(params)
  for k in range(10):
    g = jnp.sin(jnp.arange(4, dtype=dtype) + k)
    u_ours, s_ours = ours.update(g, s_ours)
    u_ref, s_ref = ref.update(g, s_ref)
    np.testing.assert_array_equal(u_ours, u_ref)


def test_lookahead_and_change_of_variables_forms_agree():
  """seeds/001: theta_tilde = theta + alpha v along the whole trajectory."""
  loss, _ = _quadratic(jnp.float64)
  lr, alpha = 0.05, 0.9
  look = curvature.nesterov(lr, alpha, form="lookahead")
  cov = curvature.nesterov(lr, alpha, form="change_of_variables")
  theta = tilde = jnp.array([1.0, 1.0, 1.0])
  s_look, s_cov = look.init(theta), cov.init(tilde)
  for _ in range(50):
    g = jax.grad(loss)(curvature.lookahead_params(theta, s_look, alpha))
    u, s_look = look.update(g, s_look, theta)
    theta = optax.apply_updates(theta, u)
    u, s_cov = cov.update(jax.grad(loss)(tilde), s_cov, tilde)
    tilde = optax.apply_updates(tilde, u)
  np.testing.assert_allclose(
      curvature.lookahead_params(theta, s_look, alpha), tilde, rtol=1e-12
  )
  assert float(jnp.abs(theta - tilde).max()) > 1e-6  # The forms differ.


@pytest.mark.parametrize("dtype", DTYPES)
def test_momentum_speeds_up_an_ill_conditioned_quadratic(dtype):
  loss, x_star = _quadratic(dtype)

  def run(opt):
    x = jnp.zeros(3, dtype)
    state = opt.init(x)
    for _ in range(60):
      u, state = opt.update(jax.grad(loss)(x), state, x)
      x = optax.apply_updates(x, u)
    return float(jnp.linalg.norm(x - x_star))

  plain = run(curvature.sgd(0.09))
  heavy = run(curvature.heavy_ball(0.09, 0.8))
  nest = run(curvature.nesterov(0.09, 0.8))
  assert heavy < 0.5 * plain and nest < 0.5 * plain


def test_momentum_on_top_of_a_diagonal_preconditioner():
  """RMSProp + momentum as a chain: momentum accumulates preconditioned steps."""
  precond = curvature.scale_by_diagonal(
      curvature.scale_by_ema(0.9, statistic="square", bias_correction=False),
      damping=0.0,
      damping_in_root=1e-14,
  )
  opt = optax.chain(precond, curvature.scale_by_momentum(0.5))
  state = opt.init(jnp.zeros(2, jnp.float64))
  g = jnp.array([3.0, -0.01])
  u1, state = opt.update(g, state)
  u2, state = opt.update(g, state)
  # Preconditioned direction is sign(g)/sqrt(1-0.9) then sign(g)/sqrt(1-0.81).
  p1 = jnp.sign(g) / np.sqrt(0.1)
  p2 = jnp.sign(g) / np.sqrt(0.19)
  np.testing.assert_allclose(u1, p1, rtol=1e-6)
  np.testing.assert_allclose(u2, p2 + 0.5 * p1, rtol=1e-6)


def test_momentum_after_hessian_free_on_least_squares():
  """Momentum chains after the core's Hessian-free direction."""
  kx, kw = jax.random.split(jax.random.key(0))
  inputs = jax.random.normal(kx, (20, 3), jnp.float64)
  targets = inputs @ jax.random.normal(kw, (3, 1), jnp.float64)
  batch = {"inputs": inputs, "targets": targets}
  predict = lambda p, b: b["inputs"] @ p["w"]
  loss_fn = lambda p: 0.5 * jnp.mean(
      jnp.sum((predict(p, batch) - targets) ** 2, -1))
  opt = optax.chain(
      curvature.scale_by_hessian_free(
          predict, curvature.losses.squared_error, max_cg_iterations=3,
          line_search=False, backtracking=False),
      curvature.scale_by_momentum(0.3),
      optax.scale_by_learning_rate(1.0),
  )
  params = {"w": jnp.zeros((3, 1), jnp.float64)}
  state = opt.init(params)
  initial = float(loss_fn(params))
  step = jax.jit(lambda p, s: opt.update(jax.grad(loss_fn)(p), s, p,
                                         batch=batch))
  for _ in range(15):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert float(loss_fn(params)) < 1e-6 * initial
  velocity = optax.tree.get(state, "velocity")
  assert float(optax.tree.norm(velocity)) > 0.0


def test_lookahead_params_needs_exactly_one_momentum_state():
  with pytest.raises(ValueError, match="ScaleByMomentumState"):
    curvature.lookahead_params(jnp.zeros(2), optax.sgd(0.1).init(jnp.zeros(2)),
                               0.9)
  two = optax.chain(curvature.scale_by_momentum(0.9),
                    curvature.scale_by_momentum(0.9))
  with pytest.raises(KeyError):
    curvature.lookahead_params(jnp.zeros(2), two.init(jnp.zeros(2)), 0.9)


@pytest.mark.parametrize("bad", [{"decay": 1.0}, {"decay": -0.2},
                                 {"nesterov": True, "form": "sutskever"}])
def test_bad_momentum_arguments_raise(bad):
  with pytest.raises(ValueError):
    curvature.scale_by_momentum(**{"decay": 0.9, **bad})


@pytest.mark.parametrize("old", ["change_of_variables", "lookahead"])
def test_string_nesterov_is_deprecated_but_still_works(old):
  with pytest.warns(DeprecationWarning, match="form="):
    legacy = curvature.scale_by_momentum(0.9, nesterov=old)
  current = curvature.scale_by_momentum(0.9, nesterov=True, form=old)
  g = jnp.arange(3.0)
  s_legacy, s_current = legacy.init(g), current.init(g)
  for _ in range(3):
    u_legacy, s_legacy = legacy.update(g, s_legacy)
    u_current, s_current = current.update(g, s_current)
  np.testing.assert_array_equal(u_legacy, u_current)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_nesterov_takes_a_bool(bad):
  with pytest.raises(TypeError, match="form="):
    curvature.scale_by_momentum(0.9, nesterov=bad)


def test_unknown_form_names_the_options():
  with pytest.raises(ValueError, match="lookahead"):
    curvature.scale_by_momentum(0.9, nesterov=True, form="polyak")
