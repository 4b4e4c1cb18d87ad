"""Shampoo and SOAP against independent NumPy float64 oracles.

Oracles (top of file, plain NumPy, no jax):

* ``np_shampoo_algorithm1``: Gupta, Koren & Singer (ICML 2018), Algorithm 1,
  transcribed: ``L_t = L_{t-1} + G Gᵀ``, ``R_t = R_{t-1} + Gᵀ G`` from
  ``L_0 = εI``, ``R_0 = εI``; ``W ← W − η L_t^{-1/4} G R_t^{-1/4}``.
* ``np_shampoo``: the general transform (statistics decay, roots refreshed
  every ``inverse_every`` steps, diagonal fallback, Adam grafting as in Anil
  et al. 2020).
* ``np_soap``: Vyas et al. (2024), Algorithm 3, in the step order of the
  specification (statistics, basis refresh, moments, bias correction).

The ``test_oracle_self_*`` tests check the oracles against hand-derived facts
and against optax only; they do not call the transforms under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature

jax.config.update("jax_enable_x64", True)

RTOL = 1e-6  # Iterates and directions vs the oracles, over 100 steps.
# Entries near zero: |got − want| ≤ RTOL·|want| + FLOOR·max|want| per leaf.
# SOAP's step 0 divides rounding-level entries of the (diagonal) rotated
# gradient by eps, which leaves ~1e-8·max|W| of noise in the iterates.
FLOOR = 1e-7
EXACT = 1e-12  # Identities that hold up to rounding.
ADAM_GRAFT = dict(b1=0.0, b2=0.999, eps=1e-8)


# --------------------------------------------------------------- oracles ----


def np_sym_power(a, p):
  """``a^p`` for a symmetric positive definite ``a``, via ``eigh``."""
  lam, u = np.linalg.eigh(a)
  return (u * lam**p) @ u.T


def np_shampoo_algorithm1(w, grad_fn, lr, eps, steps):
  """Gupta et al. (2018), Algorithm 1, for one matrix; returns the iterates."""
  m, n = w.shape
  l, r = eps * np.eye(m), eps * np.eye(n)
  iterates = []
  for t in range(steps):
    g = grad_fn(w, t)
    l = l + g @ g.T
    r = r + g.T @ g
    w = w - lr * np_sym_power(l, -0.25) @ g @ np_sym_power(r, -0.25)
    iterates.append(w)
  return iterates


def _ema(old, new, decay):
  """Running sum (``decay=None``) or ``decay·old + (1−decay)·new``."""
  return old + new if decay is None else decay * old + (1 - decay) * new


def np_shampoo_leaf(st, g, t, *, power, damping, decay, inverse_every):
  """Shampoo on a matrix ``g`` [m, n]: statistics, periodic roots, PL g PR."""
  m, n = g.shape
  st["l"] = _ema(st.get("l", np.zeros((m, m))), g @ g.T, decay)
  st["r"] = _ema(st.get("r", np.zeros((n, n))), g.T @ g, decay)
  if t % inverse_every == 0:
    st["pl"] = np_sym_power(st["l"] + damping * np.eye(m), power)
    st["pr"] = np_sym_power(st["r"] + damping * np.eye(n), power)
  return st["pl"] @ g @ st["pr"]


def np_diagonal_leaf(st, g, *, power, damping, decay):
  """Diagonal fallback: ``d ← d + g²`` (or EMA); ``(d + damping)^(2p) g``."""
  st["d"] = _ema(st.get("d", np.zeros_like(g)), g**2, decay)
  return (st["d"] + damping) ** (2 * power) * g


def np_adam_leaf(st, g, t, *, b1, b2, eps):
  """Adam with bias correction (``optax.scale_by_adam``); ``t`` is 0-based."""
  st["m"] = b1 * st.get("m", np.zeros_like(g)) + (1 - b1) * g
  st["v"] = b2 * st.get("v", np.zeros_like(g)) + (1 - b2) * g**2
  m_hat = st["m"] / (1 - b1 ** (t + 1))
  v_hat = st["v"] / (1 - b2 ** (t + 1))
  return m_hat / (np.sqrt(v_hat) + eps)


def np_graft(s, a):
  """``s`` rescaled to ``a``'s Frobenius norm (0 where ``s`` is 0)."""
  norm_s = np.linalg.norm(s)
  return s * (np.linalg.norm(a) / norm_s) if norm_s > 0 else np.zeros_like(s)


def _as_matrix(g, max_factor_dim):
  """``g`` as an [m, n] matrix, or None where it falls back."""
  if g.ndim < 2:
    return None
  mat = g.reshape(-1, g.shape[-1])
  return None if max(mat.shape) > max_factor_dim else mat


def np_shampoo(*, power=-0.25, damping=1e-6, decay=None, inverse_every=10,
               graft=None, max_factor_dim=4096):
  """Shampoo on a dict of leaves; ``graft`` is None or NumPy-Adam kwargs.

  Returns ``step(grads, t) -> directions``; the state lives in the closure.
  """
  state = {}

  def step(grads, t):
    out = {}
    for name, g in grads.items():
      a = (np_adam_leaf(state.setdefault(("graft", name), {}), g, t, **graft)
           if graft is not None else None)
      mat = _as_matrix(g, max_factor_dim)
      st = state.setdefault(name, {})
      if mat is None:
        out[name] = a if graft is not None else np_diagonal_leaf(
            st, g, power=power, damping=damping, decay=decay)
        continue
      s = np_shampoo_leaf(st, mat, t, power=power, damping=damping,
                          decay=decay, inverse_every=inverse_every)
      s = s.reshape(g.shape)
      out[name] = np_graft(s, a) if graft is not None else s
    return out

  return step


def np_eigenbasis(a):
  """Eigenvectors of a symmetric matrix, ascending eigenvalues (``eigh``)."""
  return np.linalg.eigh(a)[1]


def np_soap_leaf(st, g, t, *, b1, b2, eps, decay, inverse_every,
                 basis=np_eigenbasis):
  """SOAP (Vyas et al. 2024, Algorithm 3) on a matrix ``g`` [m, n]."""
  m, n = g.shape
  beta = b2 if decay is None else decay
  st["l"] = _ema(st.get("l", np.zeros((m, m))), g @ g.T, beta)
  st["r"] = _ema(st.get("r", np.zeros((n, n))), g.T @ g, beta)
  if t % inverse_every == 0:
    st["ql"], st["qr"] = basis(st["l"]), basis(st["r"])
  ql, qr = st["ql"], st["qr"]
  st["m"] = b1 * st.get("m", np.zeros_like(g)) + (1 - b1) * g  # Original space.
  g_rot = ql.T @ g @ qr
  st["v"] = b2 * st.get("v", np.zeros_like(g)) + (1 - b2) * g_rot**2  # Rotated.
  m_hat = st["m"] / (1 - b1 ** (t + 1))
  v_hat = st["v"] / (1 - b2 ** (t + 1))
  n_rot = (ql.T @ m_hat @ qr) / (np.sqrt(v_hat) + eps)
  return ql @ n_rot @ qr.T


def np_soap(*, b1=0.95, b2=0.95, eps=1e-8, decay=None, inverse_every=10,
            max_factor_dim=4096, basis=np_eigenbasis):
  """SOAP on a dict of leaves; fallback leaves get Adam (b1, b2, eps)."""
  state = {}

  def step(grads, t):
    out = {}
    for name, g in grads.items():
      st = state.setdefault(name, {})
      mat = _as_matrix(g, max_factor_dim)
      if mat is None:
        out[name] = np_adam_leaf(st, g, t, b1=b1, b2=b2, eps=eps)
      else:
        out[name] = np_soap_leaf(
            st, mat, t, b1=b1, b2=b2, eps=eps, decay=decay,
            inverse_every=inverse_every, basis=basis).reshape(g.shape)
    return out

  return step


# -------------------------------------------------------------- problems ----


def _matrix_shape(shape):
  """The [m, n] matrix a leaf is viewed as ([d] as [d, 1] for the loss)."""
  if len(shape) < 2:
    return int(np.prod(shape)), 1
  return int(np.prod(shape[:-1])), shape[-1]


def _problem(shapes, steps, seed=0, k=8):
  """Stochastic least squares ``½‖X W − Y‖²/k`` per leaf, fresh X, Y a step."""
  rng = np.random.default_rng(seed)
  params = {name: 0.5 * rng.standard_normal(shape)
            for name, shape in shapes.items()}
  w_star = {name: rng.standard_normal(_matrix_shape(shape))
            for name, shape in shapes.items()}
  batches = []
  for _ in range(steps):
    batch = {}
    for name, shape in shapes.items():
      m, n = _matrix_shape(shape)
      x = rng.standard_normal((k, m))
      batch[name] = (x, x @ w_star[name] + 0.1 * rng.standard_normal((k, n)))
    batches.append(batch)
  return params, batches


def _np_leaf_grad(p, x, y):
  """Analytic gradient of ``½‖X W − Y‖²/k``, in the leaf's shape."""
  w = p.reshape(x.shape[1], y.shape[1])
  return (x.T @ (x @ w - y) / x.shape[0]).reshape(p.shape)


def np_grads(params, batch):
  return {name: _np_leaf_grad(p, *batch[name]) for name, p in params.items()}


def _loss(params, batch):
  total = 0.0
  for name, p in params.items():
    x, y = batch[name]
    r = x @ p.reshape(x.shape[1], y.shape[1]) - y
    total = total + 0.5 * jnp.sum(r**2) / x.shape[0]
  return total


_grad = jax.jit(jax.grad(_loss))


def _fixed_grads(shapes, steps, seed=1):
  """A fixed random gradient sequence (independent of any iterate)."""
  rng = np.random.default_rng(seed)
  return [{name: rng.standard_normal(shape) for name, shape in shapes.items()}
          for _ in range(steps)]


def run_ours(tx, params, batches, lr):
  """Jitted ``tx`` + ``scale_by_learning_rate(lr)``; iterates as NumPy."""
  tx = optax.chain(tx, optax.scale_by_learning_rate(lr))
  update = jax.jit(tx.update)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  iterates = []
  for batch in batches:
    u, state = update(_grad(p, batch), state, p)
    p = optax.apply_updates(p, u)
    iterates.append(jax.tree.map(np.asarray, p))
  return iterates


def run_oracle(step, params, batches, lr):
  """``p ← p − lr · step(grads, t)``; iterates as NumPy."""
  p = {name: np.array(v) for name, v in params.items()}
  iterates = []
  for t, batch in enumerate(batches):
    d = step(np_grads(p, batch), t)
    p = {name: p[name] - lr * d[name] for name in p}
    iterates.append(p)
  return iterates


def directions_ours(tx, grads_seq, params=None):
  """Jitted ``tx`` directions for a fixed gradient sequence, as NumPy."""
  params = params or jax.tree.map(jnp.zeros_like, grads_seq[0])
  update = jax.jit(tx.update)
  state = tx.init(params)
  out = []
  for g in grads_seq:
    u, state = update(g, state, params)
    out.append(jax.tree.map(np.asarray, u))
  return out


def directions_oracle(step, grads_seq):
  return [step(g, t) for t, g in enumerate(grads_seq)]


def assert_trees_close(got, want, rtol=RTOL, floor=FLOOR, where=""):
  """Leafwise allclose; the absolute tolerance is ``floor·max|want|``."""
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_allclose(
        np.asarray(got[name]), want[name], rtol=rtol,
        atol=floor * np.abs(want[name]).max(),
        err_msg=f"{where} leaf {name!r}")


def assert_sequences_close(got, want, rtol=RTOL, floor=FLOOR):
  assert len(got) == len(want)
  for t, (a, b) in enumerate(zip(got, want)):
    assert_trees_close(a, b, rtol, floor, where=f"step {t}")


def rejected_steps(state):
  """The ``rejected_steps`` field of the one NamedTuple in ``state`` with it."""
  found = []

  def visit(node):
    if hasattr(node, "_fields"):
      if "rejected_steps" in node._fields:
        found.append(int(node.rejected_steps))
      for field in node._fields:
        if field != "rejected_steps":
          visit(getattr(node, field))
    elif isinstance(node, (tuple, list)):
      for item in node:
        visit(item)
    elif isinstance(node, dict):
      for item in node.values():
        visit(item)

  visit(state)
  assert len(found) == 1, f"{len(found)} rejected_steps fields in the state"
  return found[0]


def _polar(g):
  """``U Vᵀ`` from the thin SVD ``g = U S Vᵀ``."""
  u, _, vt = np.linalg.svd(g, full_matrices=False)
  return u @ vt


def _orthogonal(n, rng):
  q, r = np.linalg.qr(rng.standard_normal((n, n)))
  return q * np.sign(np.diag(r))


def _optax_directions(tx, grads_seq):
  """Directions of an optax transform on NumPy gradients, as NumPy."""
  state = tx.init(grads_seq[0])
  out = []
  for g in grads_seq:
    u, state = tx.update(g, state)
    out.append(jax.tree.map(np.asarray, u))
  return out


# ------------------------------------------------- oracle self-checks ------


def test_oracle_self_shampoo_1x1_is_adagrad():
  """A 1×1 matrix: L^{-1/4} g R^{-1/4} = g / (ε + Σg²)^{1/2}, i.e. AdaGrad."""
  eps = 1e-6
  seq = _fixed_grads({"w": (1, 1)}, 30)
  total = eps
  generic = np_shampoo(damping=eps, inverse_every=1)
  rss = _optax_directions(optax.scale_by_rss(initial_accumulator_value=eps,
                                             eps=0.0), seq)
  w = np.zeros((1, 1))
  alg1 = np_shampoo_algorithm1(w, lambda _, t: seq[t]["w"], 1.0, eps, 30)
  for t, g in enumerate(seq):
    total += float(g["w"][0, 0]) ** 2
    want = g["w"] / np.sqrt(total)
    np.testing.assert_allclose(generic(g, t)["w"], want, rtol=EXACT)
    np.testing.assert_allclose(rss[t]["w"], want, rtol=EXACT)
    np.testing.assert_allclose(-(alg1[t] - (alg1[t - 1] if t else w)), want,
                               rtol=1e-10)


def test_oracle_self_shampoo_diagonal_gradients_are_adagrad():
  """Diagonal square gradients keep L, R diagonal: Shampoo is AdaGrad."""
  eps = 1e-6
  rng = np.random.default_rng(2)
  seq = [{"w": np.diag(rng.standard_normal(4))} for _ in range(20)]
  shampoo = np_shampoo(damping=eps, inverse_every=1)
  total = eps + np.zeros(4)
  for t, g in enumerate(seq):
    total += np.diag(g["w"]) ** 2
    np.testing.assert_allclose(shampoo(g, t)["w"],
                               np.diag(np.diag(g["w"]) / np.sqrt(total)),
                               rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (5, 3)])
def test_oracle_self_shampoo_first_step_is_polar_factor(shape):
  """One step, tiny damping: L^{-1/4} G R^{-1/4} = U Vᵀ (G = U S Vᵀ)."""
  g = _fixed_grads({"w": shape}, 1)[0]
  d = np_shampoo(damping=1e-14, inverse_every=1)(g, 0)["w"]
  np.testing.assert_allclose(d, _polar(g["w"]), atol=1e-8)


def test_oracle_self_shampoo_ema_of_a_constant_gradient():
  """Constant G, decay β: L_t = (1−β^t) G Gᵀ, so S = (1−β^t)^{-1/2} U Vᵀ."""
  beta = 0.9
  g = _fixed_grads({"w": (3, 5)}, 1)[0]
  shampoo = np_shampoo(damping=1e-14, decay=beta, inverse_every=1)
  for t in range(6):
    np.testing.assert_allclose(shampoo(g, t)["w"],
                               _polar(g["w"]) / np.sqrt(1 - beta ** (t + 1)),
                               atol=1e-8)


def test_oracle_self_shampoo_algorithm1_equals_generic_oracle():
  """The general oracle with no decay, inverse_every=1 is Algorithm 1."""
  shapes = {"w": (4, 4), "v": (3, 5), "u": (5, 3)}
  params, batches = _problem(shapes, 100)
  generic = run_oracle(np_shampoo(damping=1e-6, inverse_every=1), params,
                       batches, 0.1)
  for name in shapes:
    alg1 = np_shampoo_algorithm1(
        params[name], lambda w, t, n=name: _np_leaf_grad(w, *batches[t][n]),
        0.1, 1e-6, 100)
    np.testing.assert_allclose([it[name] for it in generic], alg1,
                               rtol=1e-10, atol=1e-12)


def test_oracle_self_shampoo_periodic_roots_closed_form():
  """Roots frozen between refreshes, from L_t = Σ_s (1−β) β^{t−s} G_s G_sᵀ."""
  beta, every, eps, p = 0.9, 5, 1e-6, -0.25
  seq = _fixed_grads({"v": (3, 5)}, 23)
  got = directions_oracle(
      np_shampoo(damping=eps, decay=beta, inverse_every=every), seq)
  for t, g in enumerate(seq):
    t0 = t - t % every  # Last refresh.
    gs = [seq[s]["v"] for s in range(t0 + 1)]
    l = sum((1 - beta) * beta ** (t0 - s) * x @ x.T for s, x in enumerate(gs))
    r = sum((1 - beta) * beta ** (t0 - s) * x.T @ x for s, x in enumerate(gs))
    want = (np_sym_power(l + eps * np.eye(3), p) @ g["v"]
            @ np_sym_power(r + eps * np.eye(5), p))
    np.testing.assert_allclose(got[t]["v"], want, rtol=1e-9)


@pytest.mark.parametrize("decay", [None, 0.9])
def test_oracle_self_diagonal_fallback(decay):
  """Rank-1 fallback, power −1/4: AdaGrad (optax.scale_by_rss) or RMSProp."""
  eps = 1e-6
  seq = _fixed_grads({"b": (5,)}, 20)
  got = directions_oracle(np_shampoo(damping=eps, decay=decay), seq)
  if decay is None:
    want = _optax_directions(optax.scale_by_rss(0.0, eps), seq)
  else:
    want = _optax_directions(
        optax.scale_by_rms(decay=decay, eps=eps, eps_in_sqrt=True), seq)
  assert_sequences_close(got, want, rtol=EXACT, floor=0)


@pytest.mark.parametrize("b1,b2,eps", [(0.0, 0.999, 1e-8), (0.95, 0.95, 1e-8),
                                       (0.9, 0.99, 1e-3)])
def test_oracle_self_adam_equals_optax(b1, b2, eps):
  seq = _fixed_grads({"w": (3, 4), "b": (4,)}, 25)
  state = {}
  got = [{n: np_adam_leaf(state.setdefault(n, {}), x, t, b1=b1, b2=b2, eps=eps)
          for n, x in g.items()} for t, g in enumerate(seq)]
  want = _optax_directions(optax.scale_by_adam(b1, b2, eps), seq)
  assert_sequences_close(got, want, rtol=EXACT, floor=0)


def test_oracle_self_graft_takes_adams_norm():
  """Grafted: Shampoo's direction with Adam's norm; rank-1 leaves get Adam."""
  seq = _fixed_grads({"w": (4, 4), "v": (3, 5), "b": (5,)}, 15)
  grafted = directions_oracle(
      np_shampoo(decay=0.95, inverse_every=3, graft=ADAM_GRAFT), seq)
  plain = directions_oracle(np_shampoo(decay=0.95, inverse_every=3), seq)
  adam = _optax_directions(optax.scale_by_adam(**ADAM_GRAFT), seq)
  for t in range(len(seq)):
    np.testing.assert_allclose(grafted[t]["b"], adam[t]["b"], rtol=EXACT)
    for name in ("w", "v"):
      s, got = plain[t][name], grafted[t][name]
      np.testing.assert_allclose(np.linalg.norm(got),
                                 np.linalg.norm(adam[t][name]), rtol=EXACT)
      np.testing.assert_allclose(got / np.linalg.norm(got),
                                 s / np.linalg.norm(s), rtol=1e-10, atol=1e-14)
  assert np.all(np_graft(np.zeros((2, 2)), np.ones((2, 2))) == 0)


@pytest.mark.parametrize("every", [1, 3])
def test_oracle_self_soap_identity_basis_is_adam(every):
  """With Q = I, SOAP is Adam with the same b1, b2, eps."""
  seq = _fixed_grads({"w": (4, 4), "v": (3, 5)}, 25)
  got = directions_oracle(
      np_soap(b1=0.9, b2=0.99, inverse_every=every,
              basis=lambda a: np.eye(len(a))), seq)
  want = _optax_directions(optax.scale_by_adam(0.9, 0.99, 1e-8), seq)
  assert_sequences_close(got, want, rtol=EXACT, floor=0)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("every", [1, 4])
def test_oracle_self_soap_invariant_to_eigenvector_signs(every, reverse):
  """Random column signs at each refresh leave the direction unchanged; so
  does descending instead of ascending order, if used at every refresh."""
  rng = np.random.default_rng(3)

  def flipped(a):
    q = np_eigenbasis(a) * rng.choice([-1.0, 1.0], size=len(a))
    return q[:, ::-1] if reverse else q

  seq = _fixed_grads({"w": (4, 4), "s": (3, 3)}, 30)
  got = directions_oracle(np_soap(inverse_every=every, basis=flipped), seq)
  want = directions_oracle(np_soap(inverse_every=every), seq)
  assert_sequences_close(got, want, rtol=1e-10, floor=1e-12)


def test_oracle_self_soap_first_step_is_polar_factor():
  """Step 0: G' = Q_Lᵀ G Q_R = ±S is diagonal, N' = sign(G'), out = U Vᵀ."""
  for shape in [(4, 4), (3, 3)]:
    g = _fixed_grads({"w": shape}, 1, seed=5)[0]
    d = np_soap()(g, 0)["w"]
    np.testing.assert_allclose(d, _polar(g["w"]), atol=1e-6)


def test_oracle_self_rotation_equivariance():
  """G_t → A G_t B (A, B orthogonal) maps both directions D_t → A D_t B."""
  rng = np.random.default_rng(4)
  shapes = {"w": (4, 4), "v": (3, 5)}
  seq = _fixed_grads(shapes, 20)
  rot = {n: (_orthogonal(s[0], rng), _orthogonal(s[1], rng))
         for n, s in shapes.items()}
  seq_rot = [{n: rot[n][0] @ g[n] @ rot[n][1] for n in g} for g in seq]
  # SOAP's step 0 divides rounding-level entries of the (diagonal) rotated
  # gradient by eps; eps=1e-4 keeps that noise below the tolerance.
  cases = [(lambda: np_shampoo(decay=0.9, inverse_every=3), shapes),
           (lambda: np_soap(eps=1e-4, inverse_every=3), {"w": (4, 4)})]
  for make, names in cases:
    sub = [{n: g[n] for n in names} for g in seq]
    sub_rot = [{n: g[n] for n in names} for g in seq_rot]
    plain = directions_oracle(make(), sub)
    rotated = directions_oracle(make(), sub_rot)
    for t in range(len(seq)):
      for n in names:
        np.testing.assert_allclose(rotated[t][n],
                                   rot[n][0] @ plain[t][n] @ rot[n][1],
                                   rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- Shampoo ---


def test_shampoo_is_algorithm1():
  """graft=None, no decay, inverse_every=1, lr η: Gupta et al. Algorithm 1."""
  shapes = {"w": (4, 4), "v": (3, 5), "u": (5, 3)}
  params, batches = _problem(shapes, 100)
  lr, eps = 0.1, 1e-6
  ours = run_ours(curvature.scale_by_shampoo(
      damping=eps, statistics_decay=None, inverse_every=1, graft=None),
      params, batches, lr)
  for name in shapes:
    want = np_shampoo_algorithm1(
        params[name], lambda w, t, n=name: _np_leaf_grad(w, *batches[t][n]),
        lr, eps, 100)
    np.testing.assert_allclose([it[name] for it in ours], want, rtol=RTOL,
                               atol=FLOOR * np.abs(want).max(), err_msg=name)


# The roots of step 0 are reused up to step 4, and for a rectangular leaf one
# Gram matrix of step 0 has a null space where the root is damping^power;
# later gradients reach that space, so with a tiny damping steps 1-4 blow the
# iterate up (to ~6e3 at power −1/4, damping 1e-6; to NaN at −1/2). The
# dampings below keep the trajectory O(1), so the comparison means something.
@pytest.mark.parametrize("power,damping", [(-0.25, 1e-3), (-0.5, 1e-1)])
def test_shampoo_periodic_roots_with_decay(power, damping):
  shapes = {"w": (4, 4), "v": (3, 5), "u": (5, 3)}
  params, batches = _problem(shapes, 100, seed=6)
  cfg = dict(power=power, damping=damping, inverse_every=5)
  ours = run_ours(curvature.scale_by_shampoo(statistics_decay=0.9, **cfg),
                  params, batches, 0.05)
  want = run_oracle(np_shampoo(decay=0.9, **cfg), params, batches, 0.05)
  assert_sequences_close(ours, want)


def test_shampoo_adam_graft():
  shapes = {"w": (4, 4), "v": (3, 5), "b": (5,)}
  params, batches = _problem(shapes, 100, seed=7)
  cfg = dict(damping=1e-6, inverse_every=3)
  ours = run_ours(curvature.scale_by_shampoo(
      statistics_decay=0.95, graft=optax.scale_by_adam(**ADAM_GRAFT), **cfg),
      params, batches, 0.02)
  want = run_oracle(np_shampoo(decay=0.95, graft=ADAM_GRAFT, **cfg), params,
                    batches, 0.02)
  assert_sequences_close(ours, want)


def test_shampoo_graft_direction_against_optax():
  """Rank-1 leaf: exactly optax Adam's direction; matrices: Adam's norm."""
  seq = _fixed_grads({"w": (4, 4), "v": (3, 5), "b": (5,)}, 5)
  ours = directions_ours(curvature.scale_by_shampoo(
      graft=optax.scale_by_adam(**ADAM_GRAFT)), seq)
  adam = _optax_directions(optax.scale_by_adam(**ADAM_GRAFT), seq)
  for got, want in zip(ours, adam):
    np.testing.assert_allclose(got["b"], want["b"], rtol=EXACT)
    for name in ("w", "v"):
      np.testing.assert_allclose(np.linalg.norm(got[name]),
                                 np.linalg.norm(want[name]), rtol=1e-10)


@pytest.mark.parametrize("decay", [None, 0.9])
@pytest.mark.parametrize("power", [-0.25, -0.5])
def test_shampoo_rank1_fallback_is_diagonal(decay, power):
  seq = _fixed_grads({"b": (5,), "w": (3, 4)}, 30)
  cfg = dict(power=power, damping=1e-6)
  ours = directions_ours(
      curvature.scale_by_shampoo(statistics_decay=decay, **cfg), seq)
  want = directions_oracle(np_shampoo(decay=decay, **cfg), seq)
  assert_sequences_close(ours, want)
  if decay is None and power == -0.25:  # AdaGrad, straight from optax.
    rss = _optax_directions(optax.scale_by_rss(0.0, 1e-6), seq)
    for got, ref in zip(ours, rss):
      np.testing.assert_allclose(got["b"], ref["b"], rtol=EXACT)


@pytest.mark.parametrize("graft", [None, "adam"])
def test_shampoo_max_factor_dim_fallback(graft):
  """max_factor_dim=3: [4,4] and [2,5] fall back, [3,3] stays Shampoo."""
  shapes = {"w": (4, 4), "r": (2, 5), "s": (3, 3)}
  params, batches = _problem(shapes, 100, seed=8)
  np_graft_cfg = ADAM_GRAFT if graft else None
  tx_graft = optax.scale_by_adam(**ADAM_GRAFT) if graft else None
  cfg = dict(damping=1e-6, inverse_every=2)
  ours = run_ours(curvature.scale_by_shampoo(
      statistics_decay=0.95, graft=tx_graft, max_factor_dim=3, **cfg),
      params, batches, 0.02)
  want = run_oracle(np_shampoo(decay=0.95, graft=np_graft_cfg,
                               max_factor_dim=3, **cfg), params, batches, 0.02)
  assert_sequences_close(ours, want)


def test_shampoo_rank3_leaf_is_the_reshaped_matrix():
  """A [2, 3, 4] leaf is preconditioned as the [6, 4] matrix."""
  params, batches = _problem({"t": (2, 3, 4)}, 100, seed=9)
  cfg = dict(damping=1e-6, inverse_every=1)
  ours = run_ours(curvature.scale_by_shampoo(statistics_decay=None, **cfg),
                  params, batches, 0.1)
  want = run_oracle(np_shampoo(**cfg), params, batches, 0.1)
  assert_sequences_close(ours, want)
  seq = _fixed_grads({"t": (2, 3, 4)}, 3)
  flat_seq = [{"t": g["t"].reshape(6, 4)} for g in seq]
  tx = curvature.scale_by_shampoo(inverse_every=1)
  for a, b in zip(directions_ours(tx, seq), directions_ours(tx, flat_seq)):
    assert a["t"].shape == (2, 3, 4)
    np.testing.assert_allclose(a["t"].reshape(6, 4), b["t"], rtol=EXACT)


# ------------------------------------------------------------------- SOAP ---

# Square leaves only: for an m×n gradient with m ≠ n one Gram matrix (GGᵀ or
# GᵀG) is rank-deficient at the first step, its null-space eigenbasis is
# arbitrary (LAPACK-dependent), and since V is kept in the rotated space that
# arbitrary choice changes later steps; an oracle comparison would be
# meaningless there.


@pytest.mark.parametrize("every,decay", [(1, None), (10, None), (10, 0.99)])
def test_soap_matches_oracle(every, decay):
  shapes = {"w": (4, 4), "s": (3, 3)}
  params, batches = _problem(shapes, 100, seed=10)
  ours = run_ours(curvature.scale_by_soap(
      b1=0.95, b2=0.95, eps=1e-8, statistics_decay=decay,
      inverse_every=every), params, batches, 0.02)
  want = run_oracle(np_soap(b1=0.95, b2=0.95, eps=1e-8, decay=decay,
                            inverse_every=every), params, batches, 0.02)
  assert_sequences_close(ours, want)


@pytest.mark.parametrize("max_factor_dim", [4096, 3])
def test_soap_fallback_is_optax_adam(max_factor_dim):
  """Rank-1 leaves (and, at max_factor_dim=3, the [4,4] one) get Adam."""
  seq = _fixed_grads({"b": (5,), "w": (4, 4)}, 20)
  ours = directions_ours(curvature.scale_by_soap(
      b1=0.9, b2=0.99, eps=1e-7, inverse_every=3,
      max_factor_dim=max_factor_dim), seq)
  adam = _optax_directions(optax.scale_by_adam(0.9, 0.99, 1e-7), seq)
  fallback = ["b"] if max_factor_dim > 4 else ["b", "w"]
  for got, want in zip(ours, adam):
    for name in fallback:
      np.testing.assert_allclose(got[name], want[name], rtol=EXACT, atol=0)


# ---------------------------------------------------------------- aliases ---


def _steps(tx, shapes, steps=3, seed=11):
  """``steps`` jitted updates of ``tx`` on the least-squares problem."""
  params, batches = _problem(shapes, steps, seed=seed)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  update = jax.jit(tx.update)
  out = []
  for batch in batches:
    u, state = update(_grad(p, batch), state, p)
    p = optax.apply_updates(p, u)
    out.append(jax.tree.map(np.asarray, u))
  return out


ALIAS_SHAPES = {"w": (4, 4), "v": (3, 5), "b": (5,)}


@pytest.mark.parametrize("kwargs", [
    {},
    dict(b1=0.5, b2=0.99, eps=1e-6, power=-0.5, damping=1e-4,
         statistics_decay=0.9, inverse_every=2, max_factor_dim=4),
    dict(b1=0.0, inverse_every=1),
    dict(graft=optax.scale_by_rms()),
], ids=["defaults", "custom", "no_momentum", "explicit_graft"])
def test_shampoo_alias_is_the_chain(kwargs):
  lr = 0.05
  full = dict(b1=0.9, b2=0.999, eps=1e-8, power=-0.25, damping=1e-6,
              statistics_decay=0.999, inverse_every=10, graft=None,
              max_factor_dim=4096)
  full.update(kwargs)
  graft = full["graft"] or optax.scale_by_adam(b1=0.0, b2=full["b2"],
                                               eps=full["eps"])
  by_hand = optax.chain(
      curvature.scale_by_shampoo(
          power=full["power"], damping=full["damping"],
          statistics_decay=full["statistics_decay"],
          inverse_every=full["inverse_every"], graft=graft,
          max_factor_dim=full["max_factor_dim"]),
      curvature.scale_by_momentum(full["b1"]),
      optax.scale_by_learning_rate(lr))
  got = _steps(curvature.shampoo(lr, **kwargs), ALIAS_SHAPES)
  want = _steps(by_hand, ALIAS_SHAPES)
  assert_sequences_close(got, want, rtol=EXACT, floor=1e-14)


@pytest.mark.parametrize("kwargs", [
    {},
    dict(b1=0.9, b2=0.99, eps=1e-7, weight_decay=0.1, statistics_decay=0.9,
         inverse_every=2, max_factor_dim=4),
], ids=["defaults", "custom"])
def test_soap_alias_is_the_chain(kwargs):
  lr = 0.02
  full = dict(b1=0.95, b2=0.95, eps=1e-8, weight_decay=0.0,
              statistics_decay=None, inverse_every=10, max_factor_dim=4096)
  full.update(kwargs)
  by_hand = optax.chain(
      curvature.scale_by_soap(
          b1=full["b1"], b2=full["b2"], eps=full["eps"],
          statistics_decay=full["statistics_decay"],
          inverse_every=full["inverse_every"],
          max_factor_dim=full["max_factor_dim"]),
      optax.add_decayed_weights(full["weight_decay"]),
      optax.scale_by_learning_rate(lr))
  got = _steps(curvature.soap(lr, **kwargs), ALIAS_SHAPES)
  want = _steps(by_hand, ALIAS_SHAPES)
  assert_sequences_close(got, want, rtol=EXACT, floor=1e-14)


# -------------------------------------------------------------------- jit ---


@pytest.mark.parametrize("make", [
    lambda: curvature.scale_by_shampoo(inverse_every=2),
    lambda: curvature.scale_by_shampoo(
        inverse_every=2, statistics_decay=0.9,
        graft=optax.scale_by_adam(**ADAM_GRAFT)),
    lambda: curvature.scale_by_soap(inverse_every=2),
    lambda: curvature.shampoo(0.1, inverse_every=2),
    lambda: curvature.soap(0.1, inverse_every=2, weight_decay=0.01),
], ids=["shampoo", "shampoo_graft", "soap", "shampoo_alias", "soap_alias"])
def test_jit_compiles_once(make):
  """Refresh and non-refresh steps share one compiled update."""
  tx = make()
  params, batches = _problem({"w": (4, 4), "v": (3, 5), "b": (5,)}, 5)
  p = jax.tree.map(jnp.asarray, params)
  update = jax.jit(tx.update)
  state = tx.init(p)
  for batch in batches:
    u, state = update(_grad(p, batch), state, p)
    p = optax.apply_updates(p, u)
    assert update._cache_size() == 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(p))


# -------------------------------------------------------------- bad input ---


@pytest.mark.parametrize("kwargs,match", [
    (dict(power=0.25), "power"),
    (dict(power=-1.5), "power"),
    (dict(power=0.0), "power"),
    (dict(power=-1.0), "power"),
    (dict(inverse_every=0), "inverse_every"),
    (dict(inverse_every=-3), "inverse_every"),
    (dict(damping=-1e-3), "damping"),
    (dict(statistics_decay=1.0), "statistics_decay"),
    (dict(statistics_decay=-0.1), "statistics_decay"),
    (dict(max_factor_dim=0), "max_factor_dim"),
])
def test_shampoo_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    curvature.scale_by_shampoo(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(b1=1.0), "b1"),
    (dict(b1=-0.1), "b1"),
    (dict(b2=1.0), "b2"),
    (dict(b2=-0.1), "b2"),
    (dict(eps=-1e-8), "eps"),
    (dict(inverse_every=0), "inverse_every"),
    (dict(statistics_decay=1.0), "statistics_decay"),
    (dict(statistics_decay=-0.5), "statistics_decay"),
    (dict(max_factor_dim=0), "max_factor_dim"),
])
def test_soap_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    curvature.scale_by_soap(**kwargs)


def test_shampoo_alias_rejects_eps_zero_for_its_adam_graft():
  """eps=0 made the default Adam graft 0/0 at a zero gradient (NaN
  parameters, found by the fuzz suite): refused, and the message names the
  fix. With a graft of one's own, eps is not used and not checked."""
  for eps in (0.0, -1e-8):
    with pytest.raises(ValueError, match=r"eps > 0 .*graft="):
      curvature.shampoo(1e-2, eps=eps)
  curvature.shampoo(1e-2, eps=0.0, graft=optax.scale_by_rss())
  params = {"w": jnp.ones((3, 2), jnp.float64)}
  grads = {"w": jnp.zeros((3, 2), jnp.float64).at[0, 0].set(1.0)}
  opt = curvature.shampoo(1e-2)
  updates, _ = opt.update(grads, opt.init(params), params)
  assert np.all(np.isfinite(updates["w"]))
  assert np.all(updates["w"][1:] == 0)


def test_bad_graft_and_aliases():
  with pytest.raises(TypeError, match="graft"):
    curvature.scale_by_shampoo(graft="adam")
  with pytest.raises(TypeError, match="graft"):
    curvature.shampoo(0.1, graft="adam")
  with pytest.raises(ValueError, match="power"):
    curvature.shampoo(0.1, power=0.5)
  with pytest.raises(ValueError, match="b2"):
    curvature.soap(0.1, b2=1.5)


# ---------------------------------------------------------- non-finite ------


NONFINITE_CASES = {
    "shampoo": (
        lambda: curvature.scale_by_shampoo(
            statistics_decay=0.9, inverse_every=2,
            graft=optax.scale_by_adam(**ADAM_GRAFT)),
        lambda: np_shampoo(decay=0.9, inverse_every=2, graft=ADAM_GRAFT)),
    "shampoo_no_graft": (
        lambda: curvature.scale_by_shampoo(inverse_every=2),
        lambda: np_shampoo(inverse_every=2)),
    "soap": (
        lambda: curvature.scale_by_soap(inverse_every=2),
        lambda: np_soap(inverse_every=2)),
}


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
@pytest.mark.parametrize("name", sorted(NONFINITE_CASES))
def test_nonfinite_gradient_is_rejected(name, bad_value):
  """Zero output, params unchanged, state as if the bad step never happened."""
  make_ours, make_oracle = NONFINITE_CASES[name]
  shapes = {"w": (4, 4), "s": (3, 3), "b": (5,)}
  params, batches = _problem(shapes, 6, seed=12)
  lr, bad_at = 0.02, 3
  tx = optax.chain(make_ours(), optax.scale_by_learning_rate(lr))
  update = jax.jit(tx.update)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  iterates = []
  for t, batch in enumerate(batches):
    if t == bad_at:
      g = _grad(p, batch)
      g = dict(g, w=g["w"].at[1, 2].set(bad_value))
      u, state = update(g, state, p)
      for leaf in jax.tree.leaves(u):
        assert np.all(np.asarray(leaf) == 0)
      p_new = optax.apply_updates(p, u)
      for a, b in zip(jax.tree.leaves(p_new), jax.tree.leaves(p)):
        np.testing.assert_array_equal(a, b)
      assert rejected_steps(state) == 1
    else:
      assert rejected_steps(state) == int(t > bad_at)
    u, state = update(_grad(p, batch), state, p)
    p = optax.apply_updates(p, u)
    iterates.append(jax.tree.map(np.asarray, p))
  assert rejected_steps(state) == 1
  want = run_oracle(make_oracle(), params, batches, lr)
  assert_sequences_close(iterates, want)


@pytest.mark.parametrize("make", [
    lambda axis: curvature.scale_by_shampoo(inverse_every=1, axis_name=axis),
    lambda axis: curvature.scale_by_soap(inverse_every=1, axis_name=axis),
], ids=["shampoo", "soap"])
def test_axis_name_averages_the_per_device_gradients(make):
  # Two "devices" (vmap with an axis name) with their own gradients take the
  # step of their mean gradient, and keep identical states.
  params = {"w": jnp.ones((3, 3), jnp.float64), "b": jnp.zeros(3, jnp.float64)}
  local = {"w": jax.random.normal(jax.random.key(0), (2, 3, 3), jnp.float64),
           "b": jax.random.normal(jax.random.key(1), (2, 3), jnp.float64)}
  sharded = make("devices")
  state = jax.vmap(lambda _: sharded.init(params))(jnp.arange(2))
  out, new = jax.vmap(lambda g, s: sharded.update(g, s, params),
                      axis_name="devices")(local, state)
  single = make(None)
  mean = jax.tree.map(lambda g: g.mean(0), local)
  expected, _ = single.update(mean, single.init(params), params)
  for k in ("w", "b"):
    np.testing.assert_allclose(out[k][0], expected[k], rtol=1e-10)
    np.testing.assert_allclose(out[k][1], expected[k], rtol=1e-10)
  with pytest.raises(TypeError, match="axis_name"):
    make(["devices"])
