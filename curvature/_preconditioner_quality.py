r"""How well does a preconditioner fit the curvature?

Every optimizer of the library multiplies the gradient by the inverse of a
curvature model ``P`` (``P = I`` for gradient descent, a diagonal for Adam,
Kronecker factors for K-FAC and Shampoo...). How good ``P`` is for the damped
curvature ``A = C + λI`` is measured by the spectrum of

.. math::
  S = P^{-1/2} A P^{-1/2},

whose condition number governs preconditioned gradient descent and CG, and by
the angle between ``P⁻¹g`` and the Newton-like step ``A⁻¹g``.
:func:`preconditioned_spectrum` computes both with one ``A`` product and one
``P⁻¹`` application per Lanczos step, never a square root; the helpers below
build the ``precondition`` function ``v ↦ P⁻¹v`` from optimizer states.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from curvature import _block_diagonal
from curvature import _blocks
from curvature import _cg
from curvature import _diagnostics
from curvature import _kfac
from curvature import _kronecker_family
from curvature import _lanczos
from curvature import _optax_typed
from curvature import _sharding
from curvature import _validation

Array = jax.Array
Params = Any
Matvec = Callable[[Params], Params]


class PreconditionedSpectrum(NamedTuple):
  """The spectrum of ``S = P^{-1/2}(C + λI)P^{-1/2}`` and the step's angle.

  Attributes:
    largest: the largest Ritz value of ``S`` over the probes (a lower bound
      on ``λmax(S)``).
    smallest: the smallest Ritz value (an upper bound on ``λmin(S)``).
    condition_number: ``largest / smallest``; ``+∞`` unless ``smallest > 0``
      and everything was finite (never NaN).
    density: the SLQ estimate of the eigenvalue density of ``S``, a
      :class:`curvature.SpectralDensity` (nodes ``[P, m]``; each probe's
      weights sum to one, see :func:`preconditioned_spectrum`).
    cosine: ``cos∠(P⁻¹g, d)`` with ``d`` the CG solution of
      ``(C + λI) d = g``; ``None`` without ``grad``.
    cg_residual: ``‖g − (C + λI)d‖ / ‖g‖`` of that solution; ``None``
      without ``grad``.
    finite: ``False`` if the operator or the preconditioner produced a NaN
      or an Inf, or ``P⁻¹`` was not positive definite on a Lanczos vector.
  """

  largest: Array
  smallest: Array
  condition_number: Array
  density: _diagnostics.SpectralDensity
  cosine: Optional[Array]
  cg_residual: Optional[Array]
  finite: Array


class _Carry(NamedTuple):
  q_prev: Array  # q_{j−1}, P-orthonormal Lanczos vectors
  r_prev: Array  # r_{j−1} = P q_{j−1}
  q: Array
  r: Array
  beta: Array
  basis_q: Array  # [m, n]
  basis_r: Array  # [m, n]


def _p_orthogonalize(w_q, w_r, basis_q, basis_r):
  """Classical Gram-Schmidt in the P-inner product, twice.

  ``⟨q_k, w⟩_P = r_kᵀ w_q``, so the coefficients need no product with
  ``P``; ``w_r = P w_q`` is updated with the same coefficients.
  """
  for _ in range(2):
    coefficients = basis_r @ w_q
    w_q = w_q - basis_q.T @ coefficients
    w_r = w_r - basis_r.T @ coefficients
  return w_q, w_r


def _p_lanczos(apply_a, apply_inverse, probe, num_iterations, key):
  r"""Lanczos on ``M = P⁻¹A`` in the P-inner product, from ``q₀ ∝ P⁻¹z``.

  Keeps ``q_j`` (P-orthonormal) and ``r_j = P q_j``:

  .. math::
    \alpha_j = q_j^\top A q_j, \quad
    w_r = A q_j - \alpha_j r_j - \beta_{j-1} r_{j-1}, \quad
    w_q = P^{-1} w_r, \quad \beta_j = \sqrt{w_r^\top w_q},

  with full P-reorthogonalization. ``T`` is the Lanczos matrix of the
  symmetric ``S`` for the start ``P^{1/2} q₀``.

  Returns:
    ``(alphas, betas, basis_r, start_norm, finite)`` with ``start_norm² =
    zᵀP⁻¹z``.
  """
  n = probe.shape[0]
  dtype = probe.dtype
  eps = jnp.finfo(dtype).eps
  pz = apply_inverse(probe)
  start_sq = jnp.vdot(probe, pz)
  start_ok = jnp.isfinite(start_sq) & (start_sq > 0)
  start_norm = jnp.sqrt(jnp.where(start_ok, start_sq, 1.0))
  q0, r0 = pz / start_norm, probe / start_norm
  basis_q = jnp.zeros((num_iterations, n), dtype).at[0].set(q0)
  basis_r = jnp.zeros((num_iterations, n), dtype).at[0].set(r0)

  def restart(j, carry):
    random = jax.random.normal(jax.random.fold_in(key, j), (n,), dtype)
    w_q, w_r = _p_orthogonalize(apply_inverse(random), random,
                                carry.basis_q, carry.basis_r)
    norm = jnp.sqrt(jnp.maximum(jnp.vdot(w_r, w_q), 0.0))
    norm = jnp.where(norm > 0, norm, 1.0)
    return w_q / norm, w_r / norm

  def step(carry: _Carry, j):
    product = apply_a(carry.q)
    alpha = jnp.vdot(carry.q, product)
    w_r = product - alpha * carry.r - carry.beta * carry.r_prev
    w_q = apply_inverse(w_r)
    w_q, w_r = _p_orthogonalize(w_q, w_r, carry.basis_q, carry.basis_r)
    beta_sq = jnp.vdot(w_r, w_q)
    beta = jnp.sqrt(jnp.maximum(beta_sq, 0.0))
    scale = jnp.abs(alpha) + carry.beta
    has_next = j + 1 < num_iterations
    exhausted = has_next & (beta <= jnp.sqrt(eps) * scale)
    safe = jnp.where(beta > 0, beta, 1.0)
    q, r = jax.lax.cond(exhausted, lambda: restart(j, carry),
                        lambda: (w_q / safe, w_r / safe))
    off = jnp.where(exhausted, 0.0, beta).astype(dtype)
    row = jnp.minimum(j + 1, num_iterations - 1)
    basis_q = carry.basis_q.at[row].set(
        jnp.where(has_next, q, carry.basis_q[row]))
    basis_r = carry.basis_r.at[row].set(
        jnp.where(has_next, r, carry.basis_r[row]))
    positive = beta_sq >= -jnp.sqrt(eps) * scale ** 2
    return (_Carry(carry.q, carry.r, q, r, off, basis_q, basis_r),
            (alpha, off, positive))

  zeros = jnp.zeros_like(q0)
  init = _Carry(zeros, zeros, q0, r0, jnp.zeros((), dtype), basis_q, basis_r)
  final, (alphas, betas, positive) = jax.lax.scan(
      step, init, jnp.arange(num_iterations))
  finite = (start_ok & jnp.all(jnp.isfinite(alphas))
            & jnp.all(jnp.isfinite(betas)) & jnp.all(positive))
  return alphas, betas, final.basis_r, start_norm, finite


def _probe_spectrum(apply_a, apply_inverse, probe, num_iterations, key):
  """Ritz values and the SLQ weights of ``S`` for one Rademacher probe.

  ``zᵀ f(P⁻¹A) z = ‖z‖_{P⁻¹} (Rz)ᵀ f(T) e₁`` (``R`` the rows ``r_k = P q_k``),
  exact for polynomials of degree ``< m``; its expectation over ``z`` is
  ``tr f(S)``. So the weights ``‖z‖_{P⁻¹} (e₁ᵀ s_k)(s_kᵀ R z) / zᵀz`` sum to
  one and are unbiased, although one probe's weights may be negative when
  ``P`` is far from a multiple of the identity.
  """
  alphas, betas, basis_r, start_norm, finite = _p_lanczos(
      apply_a, apply_inverse, probe, num_iterations, key)
  result = _lanczos.LanczosResult(alphas, betas, None, finite)
  tridiagonal = jnp.where(finite, _lanczos.tridiagonal(result), 0.0)
  nodes, vectors = jnp.linalg.eigh(tridiagonal)
  projected = vectors.T @ (basis_r @ probe)
  weights = start_norm * vectors[0] * projected / jnp.vdot(probe, probe)
  return nodes, weights, finite


def _flat(fn, params, what):
  """``fn`` on raveled vectors (in at least float32), checked at trace time."""
  flat, unravel = _sharding.ravel(params)
  dtype = _lanczos.compute_dtype(flat.dtype)

  def apply(vector):
    out = fn(unravel(vector.astype(flat.dtype)))
    _validation.check_same_tree(params, out, what, _lanczos.MATVEC_FIX)
    return _sharding.ravel(out)[0].astype(dtype)

  return flat.astype(dtype), apply


def _cosine(matvec, precondition, grad, damping, max_iterations, tol):
  """``cos∠(P⁻¹g, d)`` and the relative residual of the CG solution ``d``."""
  damped = lambda v: optax.tree.add_scale(matvec(v), damping, v)
  solved = _cg.conjugate_gradient(damped, grad, max_iterations=max_iterations,
                                  tol=tol, progress_tol=None)
  step = precondition(grad)
  norms = optax.tree.norm(step) * optax.tree.norm(solved.x)
  cosine = _optax_typed.vdot(step, solved.x) / jnp.where(norms > 0, norms, 1.0)
  gnorm = optax.tree.norm(grad)
  residual = optax.tree.norm(optax.tree.sub(grad, damped(solved.x))) / (
      jnp.where(gnorm > 0, gnorm, 1.0))
  return cosine, residual


def _spectrum(matvec, arrays, key, *, precondition, num_iterations,
              num_probes, cg_max_iterations, cg_tol):
  params, grad, damping = arrays
  flat, apply_c = _flat(matvec, params, "matvec(v)")
  _, apply_inverse = _flat(precondition, params, "precondition(v)")
  damping = damping.astype(flat.dtype)
  apply_a = lambda v: apply_c(v) + damping * v

  def one_probe(probe_key):
    probe_key, restart_key = jax.random.split(probe_key)
    probe = jax.random.rademacher(probe_key, flat.shape, flat.dtype)
    return _probe_spectrum(apply_a, apply_inverse, probe, num_iterations,
                           restart_key)

  nodes, weights, finite = jax.lax.map(one_probe,
                                       jax.random.split(key, num_probes))
  finite = jnp.all(finite)
  largest, smallest = jnp.max(nodes), jnp.min(nodes)
  kappa = jnp.where(finite & (smallest > 0),
                    largest / jnp.where(smallest > 0, smallest, 1.0), jnp.inf)
  cosine = residual = None
  if grad is not None:
    cosine, residual = _cosine(matvec, precondition, grad, damping,
                               cg_max_iterations, cg_tol)
    finite = finite & jnp.isfinite(cosine)
  return PreconditionedSpectrum(
      largest=jnp.where(finite, largest, jnp.nan),
      smallest=jnp.where(finite, smallest, jnp.nan),
      condition_number=kappa.astype(nodes.dtype),
      density=_diagnostics.SpectralDensity(nodes, weights, finite),
      cosine=cosine, cg_residual=residual, finite=finite)


def preconditioned_spectrum(
    matvec: Matvec,
    precondition: Callable[[Params], Params],
    params: Params,
    *,
    damping: Any = 0.0,
    grad: Optional[Params] = None,
    num_iterations: Optional[int] = None,
    num_probes: int = 1,
    key: Optional[Array] = None,
    cg_max_iterations: int = 250,
    cg_tol: float = 1e-8,
) -> PreconditionedSpectrum:
  r"""The spectrum of ``P^{-1/2}(C + λI)P^{-1/2}``: how well ``P`` fits ``C``.

  With ``A = C + λI`` and the preconditioner ``P`` given by its action
  ``precondition(v) = P⁻¹v``, Lanczos runs on ``M = P⁻¹A``, which is
  self-adjoint in the inner product ``⟨x, y⟩_P = xᵀPy``. Keeping each
  Lanczos vector ``q_j`` together with ``r_j = P q_j`` (updated by the same
  recurrence) makes every P-inner product computable from ``P⁻¹`` alone:

  .. math::
    \alpha_j = q_j^\top A q_j, \quad
    w_r = A q_j - \alpha_j r_j - \beta_{j-1} r_{j-1}, \quad
    w_q = P^{-1} w_r, \quad \beta_j = \sqrt{w_r^\top w_q},

  so ``T`` is the Lanczos matrix of ``S = P^{-1/2} A P^{-1/2}`` (same
  eigenvalues as ``M``) and no square root of ``P`` is ever formed. One
  product with ``C`` and one ``P⁻¹`` per step; the vectors are fully
  reorthogonalized in the P-inner product.

  * ``largest``, ``smallest`` and ``κ = largest/smallest`` bound the
    extreme eigenvalues of ``S`` from inside; ``κ(S)`` sets the rate
    ``(√κ − 1)/(√κ + 1)`` of preconditioned CG and ``(κ − 1)/(κ + 1)`` of
    preconditioned gradient descent on the quadratic model. ``κ = 1``: ``P``
    is ``A`` up to a scale.
  * ``density``: SLQ over Rademacher probes ``z`` through the identity
    ``tr f(S) = E zᵀ f(P⁻¹A) z = E ‖z‖_{P⁻¹}(Rz)ᵀ f(T) e₁``: each probe's
    weights sum to one, and their average is unbiased (exact for
    polynomials of degree ``< m``); a single probe's weights can be
    negative when ``P`` is far from a multiple of ``A``.
  * ``cosine``: with ``grad=g``, ``cos∠(P⁻¹g, d)`` for ``d`` the CG solution
    of ``(C + λI) d = g``: 1 when the preconditioned step points along the
    damped Newton step.

  A preconditioner (or operator) that gives NaN or Inf, or a ``P⁻¹`` that
  is not positive definite, gives ``finite=False``, ``κ = +∞`` and NaN
  extremes, never a NaN ``κ``.

  Args:
    matvec: ``v ↦ C v`` on pytrees, symmetric positive semi-definite ``C``
      (e.g. ``curvature.linearize(...).matvec`` for the GGN or a Fisher).
    precondition: ``v ↦ P⁻¹ v`` on pytrees, symmetric positive definite;
      see :func:`identity_preconditioner`, :func:`adam_preconditioner`,
      :func:`diagonal_preconditioner`, :func:`kfac_preconditioner`,
      :func:`shampoo_preconditioner`, :func:`soap_preconditioner` and
      :func:`block_diagonal_preconditioner`.
    params: a pytree with the shapes and dtypes the operators act on.
    damping: ``λ ≥ 0`` added to ``C``.
    grad: the gradient ``g`` for the cosine, or ``None``.
    num_iterations: Lanczos steps per probe; ``min(n, 30)`` if ``None``.
    num_probes: Rademacher probes for the density (run with ``lax.map``).
    key: PRNG key; ``jax.random.key(0)`` if ``None``.
    cg_max_iterations: CG steps for ``d``.
    cg_tol: CG's relative residual tolerance.

  Returns:
    A :class:`PreconditionedSpectrum`. Outside ``jit`` the call compiles
    itself, once per ``(matvec, precondition)`` pair.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> def predict(params, batch):
    ...   return batch["inputs"] @ params["w"]
    >>> batch = {"inputs": jnp.asarray([[1., 0.], [1., 1.], [1., 2.]]),
    ...          "targets": jnp.asarray([[1.], [3.], [5.]])}
    >>> params = {"w": jnp.zeros((2, 1))}
    >>> def loss_fn(params, batch):
    ...   return curvature.losses.squared_error.value(
    ...       predict(params, batch), batch["targets"])
    >>> grads = jax.grad(loss_fn)(params, batch)
    >>> lin = curvature.linearize(predict, curvature.losses.squared_error,
    ...                           params, batch)
    >>> plain = curvature.preconditioned_spectrum(
    ...     lin.matvec, curvature.identity_preconditioner(), params,
    ...     grad=lin.grad)
    >>> diagonal = curvature.ggn_diagonal(
    ...     predict, curvature.losses.squared_error, params, batch)
    >>> jacobi = curvature.preconditioned_spectrum(  # P = diag(C)
    ...     lin.matvec, curvature.diagonal_preconditioner(diagonal), params,
    ...     grad=lin.grad)
    >>> round(float(plain.condition_number), 2)
    8.55
    >>> round(float(jacobi.condition_number), 2)
    7.87
    >>> round(float(plain.cosine), 2), round(float(jacobi.cosine), 2)
    (0.99, 0.92)

  References:
    Lanczos 1950; Golub & Van Loan, *Matrix Computations*, 4th ed., 2013,
    §10.3 (preconditioned CG and Lanczos in the ``P``-inner product).
    Golub & Meurant, "Matrices, Moments and Quadrature with Applications",
    Princeton University Press, 2010 (SLQ).
    Martens & Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML 2015. Martens, "New insights and
    perspectives on the natural gradient method", JMLR 2020.
  """
  if not callable(precondition):
    raise TypeError(
        "`precondition` must be a function v -> P⁻¹v on parameter pytrees,"
        f" got {type(precondition).__name__}; build one with"
        " curvature.kfac_preconditioner(...) or another helper.")
  if num_iterations is None:
    num_iterations = _lanczos.default_num_iterations(params)
  num_iterations = _lanczos.check_num_iterations(num_iterations, params)
  num_probes = _validation.check_static_int("num_probes", num_probes, 1)
  cg_max_iterations = _validation.check_static_int(
      "cg_max_iterations", cg_max_iterations, 1)
  _validation.check_nonnegative("damping", damping)
  if grad is not None:
    _validation.check_same_tree(params, grad, "grad",
                                "Pass the gradient with respect to params.")
  dtype = _lanczos.compute_dtype(jnp.result_type(*jax.tree.leaves(params)))
  arrays = (params, grad, jnp.asarray(damping, dtype))
  return _lanczos.jit_call(
      _spectrum, matvec, arrays, jax.random.key(0) if key is None else key,
      precondition=precondition, num_iterations=num_iterations,
      num_probes=num_probes, cg_max_iterations=cg_max_iterations,
      cg_tol=cg_tol)


# Preconditioners from optimizer states ----------------------------------------


def identity_preconditioner() -> Callable[[Params], Params]:
  """``P = I``: plain gradient descent.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> precondition = curvature.identity_preconditioner()
    >>> precondition({"w": jnp.asarray([1., -2.])})["w"].tolist()
    [1.0, -2.0]
  """
  return _identity


def _identity(vector):
  return vector


def _search(state: Any, fields: tuple) -> Optional[Any]:
  """The first NamedTuple in ``state`` with all of ``fields``, or ``None``."""
  if isinstance(state, tuple) and hasattr(state, "_fields"):
    if all(f in state._fields for f in fields):
      return state
  parts = state.values() if isinstance(state, dict) else (
      state if isinstance(state, (tuple, list)) else ())
  for part in parts:
    found = _search(part, fields)
    if found is not None:
      return found
  return None


def _find(state: Any, fields: tuple, what: str) -> Any:
  """:func:`_search`, raising a ``ValueError`` that names ``what``."""
  found = _search(state, fields)
  if found is None:
    raise ValueError(f"No {what} in this optimizer state (looked for a"
                     f" NamedTuple with fields {fields}).")
  return found


def adam_preconditioner(state: Any, *, b2: float = 0.999, eps: float = 1e-8,
                        eps_root: float = 0.0) -> Callable[[Params], Params]:
  r"""Adam's ``P = diag(√(ν̂ + ε_root) + ε)`` from an ``optax.adam`` state.

  ``ν̂ = ν / (1 − β₂ᵗ)`` is the bias-corrected second moment of the
  ``ScaleByAdamState`` found anywhere in ``state`` (a chain included); the
  momentum is not part of ``P``. Pass the optimizer's own ``b2``, ``eps``
  and ``eps_root``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> params = {"w": jnp.zeros(3)}
    >>> opt = optax.adam(1e-3)
    >>> state = opt.init(params)
    >>> grads = {"w": jnp.asarray([0.5, -2., 4.])}
    >>> _, state = opt.update(grads, state, params)  # ν̂ = g² after one step
    >>> precondition = curvature.adam_preconditioner(state)
    >>> [round(float(x), 4) for x in precondition(grads)["w"]]  # g / |g|
    [1.0, -1.0, 1.0]

  References:
    Kingma & Ba, "Adam: a method for stochastic optimization", ICLR 2015.
  """
  adam = _find(state, ("count", "mu", "nu"), "Adam state (optax.adam)")
  count = jnp.maximum(adam.count, 1)
  second = jax.tree.map(
      lambda v: v / (1.0 - jnp.asarray(b2, v.dtype) ** count.astype(v.dtype)),
      adam.nu)

  def precondition(vector):
    return jax.tree.map(
        lambda x, v: x / (jnp.sqrt(v + eps_root) + eps).astype(x.dtype),
        vector, second)

  return precondition


def diagonal_preconditioner(diagonal: Any, *, power: float = 1.0,
                            damping: float = 0.0, decay: float = 0.95
                            ) -> Callable[[Params], Params]:
  r"""``P = diag((d + λ)^p)`` from a curvature diagonal or its EMA state.

  ``diagonal`` is a pytree like the parameters (the output of
  :func:`curvature.ggn_diagonal`, :func:`curvature.sampled_fisher_diagonal`
  or :func:`curvature.hutchinson_hessian_diagonal`), or an optimizer state
  holding a :class:`curvature.CurvatureDiagonalState`, whose EMA is
  bias-corrected with ``decay``. Negative entries are clipped to 0.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> def predict(params, batch):
    ...   return batch["inputs"] @ params["w"]
    >>> batch = {"inputs": jnp.asarray([[1., 0.], [1., 1.], [1., 2.]]),
    ...          "targets": jnp.asarray([[1.], [3.], [5.]])}
    >>> params = {"w": jnp.zeros((2, 1))}
    >>> def loss_fn(params, batch):
    ...   return curvature.losses.squared_error.value(
    ...       predict(params, batch), batch["targets"])
    >>> grads = jax.grad(loss_fn)(params, batch)
    >>> d = curvature.ggn_diagonal(predict, curvature.losses.squared_error,
    ...                            params, batch)
    >>> [round(float(x), 4) for x in d["w"][:, 0]]  # diag(XᵀX) / 3
    [1.0, 1.6667]
    >>> precondition = curvature.diagonal_preconditioner(d, damping=1e-3)
    >>> v = precondition({"w": jnp.ones((2, 1))})
    >>> [round(float(x), 3) for x in v["w"][:, 0]]  # 1 / (d + λ)
    [0.999, 0.6]

  References:
    LeCun, Bottou, Orr & Müller, "Efficient BackProp", in *Neural Networks:
    Tricks of the Trade*, Springer, 1998 (diagonal
    Gauss-Newton). Martens, "New insights and perspectives on the natural
    gradient method", JMLR 2020.
  """
  ema = _search(diagonal, ("count", "ema"))
  if ema is not None:
    count = jnp.maximum(ema.count, 1)
    diagonal = jax.tree.map(
        lambda m: m / (1.0 - jnp.asarray(decay, m.dtype)
                       ** count.astype(m.dtype)), ema.ema)

  def precondition(vector):
    return jax.tree.map(
        lambda x, d: x / ((jnp.maximum(d, 0.0) + damping) ** power).astype(
            x.dtype), vector, diagonal)

  return precondition


def _block_precondition(blocks, states, treedef, damping):
  def precondition(vector):
    return treedef.unflatten(_blocks.precondition(
        blocks, states, jax.tree.leaves(vector), damping))

  return precondition


def kfac_preconditioner(
    state: Any,
    predict_fn: Callable[[Params, Any], Any],
    params: Params,
    batch: Any,
    *,
    decay: float = 0.95,
    averaging: str = "ema",
    layer_overrides: Optional[dict] = None,
    max_factor_dim: int = 4096,
    example_batch: Any = None,
) -> Callable[[Params], Params]:
  r"""K-FAC's or EKFAC's ``P⁻¹`` from a :class:`curvature.ScaleByKfacState`.

  K-FAC: ``(Ā + πγI)⁻¹ ⊗ (G + γ/π I)⁻¹`` per layer, from the inverses of
  the last refresh; EKFAC: the eigenbasis with the re-fitted diagonal damped
  by ``γ²``; the other leaves: their Fisher diagonal plus ``γ²``. ``γ`` is
  the state's. The layers are discovered again from ``predict_fn`` and
  ``batch`` (only its shapes matter); pass the optimizer's ``decay``,
  ``averaging``, ``layer_overrides``, ``max_factor_dim`` and
  ``example_batch``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> def predict(params, batch):  # one dense layer
    ...   return batch[0] @ params["w"] + params["b"]
    >>> k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
    >>> params = {"w": jax.random.normal(k0, (3, 1)), "b": jnp.zeros(1)}
    >>> batch = (jax.random.normal(k1, (16, 3)), jax.random.normal(k2, (16, 1)))
    >>> opt = curvature.scale_by_kfac(predict, curvature.losses.squared_error,
    ...                               inverse_every=1)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> direction, state = opt.update(grads, opt.init(params), params,
    ...                               batch=batch)
    >>> precondition = curvature.kfac_preconditioner(state, predict, params,
    ...                                              batch)
    >>> bool(jnp.allclose(precondition(grads)["w"], direction["w"], atol=1e-5))
    True

  References:
    Martens & Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML 2015. George et al., "Fast approximate
    natural gradient descent in a Kronecker-factored eigenbasis", NeurIPS
    2018.
  """
  kfac = _find(state, _kfac.ScaleByKfacState._fields, "K-FAC state")
  eigen = any(isinstance(s.preconditioner, _blocks.Eigenbasis)
              for s in kfac.blocks.values())
  structure = "eigen_kronecker" if eigen else "kronecker"
  layers, _ = _kfac._plan(predict_fn, params, batch,  # pylint: disable=protected-access
                          dict(layer_overrides or {}), max_factor_dim,
                          example_batch, structure)
  blocks = _kfac._blocks_for(layers, params, max_factor_dim, structure, None)  # pylint: disable=protected-access
  diag = _kfac._outside_layers(layers, len(jax.tree.leaves(params)))  # pylint: disable=protected-access
  slots = _kfac._reserved_slots(kfac.diagonal, params)  # pylint: disable=protected-access
  _kfac._check_diagonal_slots(diag, slots, params)  # pylint: disable=protected-access
  blocks["diagonal"] = _kfac._diagonal_block(params, diag, None, slots)  # pylint: disable=protected-access
  states = {name: kfac.blocks[name] for name in blocks if name != "diagonal"}
  states["diagonal"] = kfac.diagonal
  hats = _blocks.estimates(blocks, states, kfac.statistics_count, decay,
                           averaging)
  return _block_precondition(blocks, hats, jax.tree.structure(params),
                             kfac.gamma ** 2)


def _family_blocks(params, max_factor_dim, block_fn, diagonal_power,
                   in_root, **block_kwargs):
  """Shampoo's or SOAP's blocks: ``block_fn`` on each matrix leaf."""

  def matrix_block(i, rows, cols, dtype):
    view = _blocks.reshape_view()
    return block_fn((i,), rows, cols, dtype,
                    statistics=_kronecker_family.gradient_factors(view),
                    view=view, **block_kwargs)

  return _kronecker_family._plan(  # pylint: disable=protected-access
      params, max_factor_dim, matrix_block, diagonal_power, in_root)


def shampoo_preconditioner(
    state: Any, params: Params, *, power: float = -0.25,
    damping: float = 1e-6, max_factor_dim: int = 4096,
) -> Callable[[Params], Params]:
  r"""Shampoo's ``P⁻¹ = (L + εI)^p ⊗ (R + εI)^p`` from its state.

  From the roots of the last refresh in a
  :class:`curvature.ScaleByShampooState`; leaves without a matrix block use
  their ``(d + ε)^{2p}`` diagonal. Grafting (a per-leaf rescaling, not a
  linear map) is left out. Pass the optimizer's ``power``, ``damping`` and
  ``max_factor_dim``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> params = {"w": jnp.zeros((3, 2))}
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (3, 2))}
    >>> opt = curvature.scale_by_shampoo()
    >>> direction, state = opt.update(grads, opt.init(params))
    >>> precondition = curvature.shampoo_preconditioner(state, params)
    >>> bool(jnp.allclose(precondition(grads)["w"], direction["w"], atol=1e-5))
    True

  References:
    Gupta, Koren & Singer, "Shampoo: Preconditioned stochastic tensor
    optimization", ICML 2018.
  """
  shampoo = _find(state, _kronecker_family.ScaleByShampooState._fields,
                  "Shampoo state")

  blocks = _family_blocks(params, max_factor_dim, _blocks.kronecker_block,
                          -2.0 * power, True,
                          inverse=_blocks.factor_roots(power))
  states = dict(shampoo.blocks, diagonal=shampoo.diagonal)
  return _block_precondition(blocks, states, jax.tree.structure(params),
                             damping)


def soap_preconditioner(
    state: Any, params: Params, *, b2: float = 0.95, eps: float = 1e-8,
    max_factor_dim: int = 4096,
) -> Callable[[Params], Params]:
  r"""SOAP's ``P⁻¹``: Adam's denominator in Shampoo's eigenbasis.

  ``Q_L [ (Q_Lᵀ V Q_R) / (√ŝ + ε) ] Q_Rᵀ`` with ``ŝ`` the bias-corrected
  second moment in the rotated basis of a :class:`curvature.ScaleBySoapState`
  (the momentum is not part of ``P``); other leaves get Adam's diagonal.
  Pass the optimizer's ``b2``, ``eps`` and ``max_factor_dim``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> params = {"w": jnp.zeros((3, 2))}
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (3, 2))}
    >>> opt = curvature.scale_by_soap(b1=0.0)  # no momentum: P⁻¹g exactly
    >>> direction, state = opt.update(grads, opt.init(params))
    >>> precondition = curvature.soap_preconditioner(state, params)
    >>> bool(jnp.allclose(precondition(grads)["w"], direction["w"], atol=1e-5))
    True

  References:
    Vyas et al., "SOAP: Improving and stabilizing Shampoo using Adam",
    arXiv:2409.11321, 2024.
  """
  soap = _find(state, _kronecker_family.ScaleBySoapState._fields,
               "SOAP state")

  blocks = _family_blocks(params, max_factor_dim,
                          _blocks.eigen_kronecker_block, 0.5, False,
                          refit=None, power=0.5, damping_in_root=False)
  states = dict(soap.blocks, diagonal=soap.diagonal)
  hats = {name: s._replace(
      statistics=_blocks.estimate(s.statistics, soap.count, b2, "ema")
      if name == "diagonal" else s.statistics,
      refit=_blocks.estimate(s.refit, soap.count, b2, "ema"))
          for name, s in states.items()}
  return _block_precondition(blocks, hats, jax.tree.structure(params), eps)


def block_diagonal_preconditioner(
    state: Any, params: Params, *, damping: float = 1e-3,
    decay: float = 0.95, max_block_size: int = 1024, grouping: str = "leaf",
) -> Callable[[Params], Params]:
  r"""The block-diagonal ``P⁻¹ = ⊕_b (Ĉ_b + λI)⁻¹`` from its state.

  The dense blocks' damped inverses of the last refresh and the fallback
  leaves' bias-corrected diagonal plus ``λ``, from a
  :class:`curvature.ScaleByBlockDiagonalState`. Pass the optimizer's
  ``damping``, ``decay``, ``max_block_size`` and ``grouping``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> def predict(params, batch):
    ...   return batch["inputs"] @ params["w"]
    >>> batch = {"inputs": jnp.asarray([[1., 0.], [1., 1.], [1., 2.]]),
    ...          "targets": jnp.asarray([[1.], [3.], [5.]])}
    >>> params = {"w": jnp.zeros((2, 1))}
    >>> def loss_fn(params, batch):
    ...   return curvature.losses.squared_error.value(
    ...       predict(params, batch), batch["targets"])
    >>> grads = jax.grad(loss_fn)(params, batch)
    >>> opt = curvature.scale_by_block_diagonal(predict,
    ...                                         curvature.losses.squared_error)
    >>> direction, state = opt.update(grads, opt.init(params), params,
    ...                               batch=batch)
    >>> precondition = curvature.block_diagonal_preconditioner(state, params)
    >>> bool(jnp.allclose(precondition(grads)["w"], direction["w"], atol=1e-5))
    True

  References:
    Le Roux, Manzagol & Bengio, "Topmoumoute online natural gradient
    algorithm", NIPS 2008. Martens & Grosse 2015, §4.
  """
  found = _find(state, _block_diagonal.ScaleByBlockDiagonalState._fields,
                "block-diagonal state")
  plan = _block_diagonal._plan(params, max_block_size, grouping)  # pylint: disable=protected-access
  dense, diagonal = _block_diagonal._core_blocks(plan, params)  # pylint: disable=protected-access
  blocks = dict(dense, diagonal=diagonal)
  states = {name: s for name, s in zip(dense, found.blocks)}
  states["diagonal"] = found.diagonal
  hats = _blocks.estimates(blocks, states, found.statistics_count, decay,
                           "ema")
  return _block_precondition(blocks, hats, jax.tree.structure(params),
                             damping)
