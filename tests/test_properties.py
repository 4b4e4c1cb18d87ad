"""Property-based tests (hypothesis): CG, symmetry and PSD of curvature
products, and the invariances claimed by the seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import curvature
from helpers import mlp_params
from helpers import mlp_predict
from helpers import random_like

SETTINGS = settings(max_examples=8, deadline=None, derandomize=True)
SEEDS = st.integers(0, 2**16)


def _spd(rng, n):
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  return (q * rng.uniform(0.1, 10.0, n)) @ q.T


@SETTINGS
@given(seed=SEEDS, n=st.integers(1, 6), split=st.integers(0, 6))
def test_cg_solves_random_spd_pytree_systems(seed, n, split):
  """A random SPD system, its vector split into a two-leaf pytree."""
  rng = np.random.default_rng(seed)
  a, b = _spd(rng, n), rng.standard_normal(n)
  split = min(split, n)
  to_tree = lambda v: {"head": v[:split], "tail": v[split:]}
  to_vec = lambda t: jnp.concatenate([t["head"], t["tail"]])
  matvec = lambda t: to_tree(jnp.asarray(a) @ to_vec(t))
  result = curvature.conjugate_gradient(
      matvec, to_tree(jnp.asarray(b)), max_iterations=4 * n, tol=1e-12,
      progress_tol=None)
  np.testing.assert_allclose(to_vec(result.x), np.linalg.solve(a, b),
                             rtol=1e-7, atol=1e-9)
  assert int(result.status) == curvature.CGStatus.CONVERGED


NETWORKS = st.tuples(SEEDS, st.integers(1, 4), st.integers(1, 5),
                     st.integers(1, 3), st.integers(2, 6))
LOSSES = st.sampled_from(["squared_error", "softmax_cross_entropy",
                          "sigmoid_binary_cross_entropy"])


def _network(seed, d_in, hidden, d_out, n, loss_name):
  key = jax.random.key(seed)
  params = mlp_params(key, (d_in, hidden, d_out + 1))
  inputs = jax.random.normal(jax.random.fold_in(key, 1), (n, d_in))
  if loss_name == "softmax_cross_entropy":
    targets = jax.random.randint(jax.random.fold_in(key, 2), (n,), 0,
                                 d_out + 1)
  else:
    targets = jax.random.uniform(jax.random.fold_in(key, 2), (n, d_out + 1))
  return params, {"inputs": inputs, "targets": targets}


@SETTINGS
@given(network=NETWORKS, loss_name=LOSSES,
       matrix=st.sampled_from(["ggn", "fisher", "empirical_fisher"]))
def test_curvature_products_symmetric_and_psd(network, loss_name, matrix):
  """⟨u, Cv⟩ = ⟨Cu, v⟩ and ⟨v, Cv⟩ ≥ 0 for the GGN and Fishers."""
  params, batch = _network(*network, loss_name)
  loss = getattr(curvature.losses, loss_name)
  lin = curvature.linearize(mlp_predict, loss, params, batch,
                            curvature=matrix)
  u, v = random_like(params, 1), random_like(params, 2)
  uv, vu = optax.tree.vdot(u, lin.matvec(v)), optax.tree.vdot(lin.matvec(u), v)
  np.testing.assert_allclose(uv, vu, rtol=1e-9, atol=1e-12)
  for w in (u, v):
    scale = optax.tree.norm(w, squared=True)
    assert optax.tree.vdot(w, lin.matvec(w)) >= -1e-12 * scale


def _logistic_problem(seed, d=3, n=12):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d))
  w = rng.standard_normal(d)
  y = (x @ w + 0.5 * rng.standard_normal(n) > 0).astype(np.float64)
  batch = {"inputs": jnp.asarray(x), "targets": jnp.asarray(y[:, None])}
  predict = lambda theta, b: b["inputs"] @ theta[:d, None] + theta[d]
  return predict, batch, 0.3 * rng.standard_normal(d + 1)


def _direction(opt, predict, loss, theta, batch):
  grads = jax.grad(lambda p: loss.value(predict(p, batch),
                                        batch["targets"]))(theta)
  updates, _ = opt.update(grads, opt.init(theta), theta, batch=batch)
  return updates


@SETTINGS
@given(seed=SEEDS)
def test_newton_is_affine_invariant(seed):
  """θ = Aφ + c: the Newton step in φ, mapped back by A, is the θ step."""
  predict, batch, theta = _logistic_problem(seed)
  rng = np.random.default_rng(seed + 1)
  a = np.eye(theta.size) + 0.5 * rng.standard_normal((theta.size,) * 2)
  c = rng.standard_normal(theta.size)
  phi = np.linalg.solve(a, theta - c)
  predict_phi = lambda p, b: predict(jnp.asarray(a) @ p + c, b)
  loss = curvature.losses.sigmoid_binary_cross_entropy
  newton = lambda f: curvature.newton(predict_fn=f, loss=loss, cg_tol=1e-13,
                                      max_cg_iterations=40)
  step_theta = _direction(newton(predict), predict, loss, jnp.asarray(theta),
                          batch)
  step_phi = _direction(newton(predict_phi), predict_phi, loss,
                        jnp.asarray(phi), batch)
  np.testing.assert_allclose(a @ np.asarray(step_phi), step_theta,
                             rtol=1e-6, atol=1e-9)


def _natural_gradient(predict, loss):
  return curvature.scale_by_natural_gradient(
      predict, loss, fisher="fisher", initial_damping=1e-10,
      adapt_damping=False, max_cg_iterations=40, cg_tol=1e-13,
      warm_start_decay=0.0)


@SETTINGS
@given(seed=SEEDS)
def test_natural_gradient_invariant_in_small_step_limit(seed):
  """Seed 000: under a nonlinear θ = φ + φ³/2 the natural-gradient steps
  agree to first order: ‖θ(φ + ηΔφ) − θ − ηΔθ‖ = O(η²)."""
  predict, batch, theta = _logistic_problem(seed)
  reparam = lambda p: p + 0.5 * p**3
  # Solve θ = φ + φ³/2 for φ by Newton's method (monotone, unique root).
  phi = np.array(theta)
  for _ in range(50):
    phi = phi - (reparam(phi) - theta) / (1 + 1.5 * phi**2)
  predict_phi = lambda p, b: predict(reparam(p), b)
  loss = curvature.losses.sigmoid_binary_cross_entropy
  d_theta = np.asarray(_direction(_natural_gradient(predict, loss), predict,
                                  loss, jnp.asarray(theta), batch))
  d_phi = np.asarray(_direction(_natural_gradient(predict_phi, loss),
                                predict_phi, loss, jnp.asarray(phi), batch))
  # Exactly invariant at first order: J Δφ = Δθ.
  np.testing.assert_allclose((1 + 1.5 * phi**2) * d_phi, d_theta, rtol=1e-6,
                             atol=1e-9)
  errors = [np.linalg.norm(reparam(phi + eta * d_phi) - theta - eta * d_theta)
            for eta in (1e-2, 1e-3)]
  assert errors[1] < 0.02 * errors[0] + 1e-12  # O(η²): 100x smaller.


@SETTINGS
@given(seed=SEEDS)
def test_adam_is_not_rotation_invariant(seed):
  """Seed 003: θ = Rφ with R a rotation; SGD's step maps back exactly,
  Adam's (a per-coordinate normalization) does not."""
  rng = np.random.default_rng(seed)
  r, _ = np.linalg.qr(rng.standard_normal((4, 4)))
  g_theta = rng.standard_normal(4)
  g_phi = r.T @ g_theta  # ∇_φ f = Rᵀ ∇_θ f.
  step = lambda opt, g: np.asarray(
      opt.update(jnp.asarray(g), opt.init(jnp.zeros(4)))[0])
  sgd, adam = curvature.sgd(0.1), curvature.adam(0.1)
  np.testing.assert_allclose(r @ step(sgd, g_phi), step(sgd, g_theta),
                             rtol=1e-12)
  adam_theta, adam_phi = step(adam, g_theta), step(adam, g_phi)
  assert np.linalg.norm(r @ adam_phi - adam_theta) > 1e-2 * np.linalg.norm(
      adam_theta)
