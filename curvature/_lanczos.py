"""Lanczos tridiagonalization, Ritz pairs and power iteration on pytrees.

Every routine takes a symmetric linear operator as a ``matvec`` closure on
parameter pytrees, e.g. ``curvature.linearize(...).matvec`` for the Hessian,
the GGN or a Fisher, and runs in a ``lax.scan`` / ``lax.while_loop``: it jits,
and the operator is applied exactly once per iteration. Vectors are raveled
with ``jax.flatten_util.ravel_pytree`` inside (``_sharding.ravel``, which
also takes leaves sharded over Explicit mesh axes); results come back as
pytrees.
"""

import collections
import fnmatch
import functools
from typing import Any, Callable, Literal, Mapping, NamedTuple, Optional, Union
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from curvature import _blocks
from curvature import _layers
from curvature import _sharding
from curvature import _validation

Array = jax.Array
Params = Any
Matvec = Callable[[Params], Params]


class LanczosResult(NamedTuple):
  """The Lanczos tridiagonalization ``Vᵀ A V = T`` of :func:`lanczos`.

  Attributes:
    alphas: the diagonal of ``T``, ``[m]``.
    betas: ``betas[:-1]`` is the off-diagonal of ``T`` (0 where the Krylov
      space was exhausted and the iteration restarted); ``betas[-1]`` is the
      norm of the last residual, used in the Ritz error bounds.
    basis: the Lanczos vectors as rows ``[m, n]`` of raveled parameters, or
      ``None`` without reorthogonalization.
    finite: ``False`` if the operator produced a NaN or an Inf.
    num_reorthogonalizations: with ``reorthogonalize="partial"``, how many of
      the ``m`` new Lanczos vectors were reorthogonalized against the basis
      (an int32 scalar); ``None`` in the other modes (``"full"`` does all of
      them, ``"none"`` none).
    valid_start: ``False`` if the (traced) start vector was zero or not
      finite; the run then started from a random vector instead, so
      ``finite`` still describes the operator alone. A concrete bad start
      raises a ``ValueError`` instead.
  """

  alphas: Array
  betas: Array
  basis: Optional[Array]
  finite: Array
  num_reorthogonalizations: Optional[Array] = None
  valid_start: Optional[Array] = None


class Eigenpairs(NamedTuple):
  """Ritz pairs from :func:`top_eigenpairs` or :func:`bottom_eigenpairs`.

  Attributes:
    eigenvalues: ``[k]``, largest first for the top, smallest first for the
      bottom.
    eigenvectors: a pytree like the parameters whose leaves have a leading
      axis ``k``; unit norm.
    residual_bounds: ``‖A y − θ y‖ = |β_m s_{m,i}|`` for each pair, an
      a-posteriori error bound on each eigenvalue.
    finite: ``False`` if the operator produced a NaN or an Inf.
  """

  eigenvalues: Array
  eigenvectors: Params
  residual_bounds: Array
  finite: Array


class PowerIterationResult(NamedTuple):
  """The result of :func:`power_iteration`.

  Attributes:
    eigenvalue: the Rayleigh quotient ``vᵀAv`` of the last iterate, an
      estimate of the eigenvalue of largest magnitude.
    eigenvector: the last iterate, a unit-norm pytree.
    iterations: the number of operator products.
    converged: whether the relative-change test passed *and* the iterate is
      an eigenvector, ``‖Av − λv‖ ≤ √rtol · ‖Av‖`` (or ``Av = 0``).
    finite: ``False`` if the operator produced a NaN or an Inf.
  """

  eigenvalue: Array
  eigenvector: Params
  iterations: Array
  converged: Array
  finite: Array


def dimension(params: Params) -> int:
  """The number of scalars in a pytree: the size ``n`` of the operator."""
  return sum(int(jnp.size(leaf)) for leaf in jax.tree.leaves(params))


def check_num_iterations(num_iterations: Any, params: Params) -> int:
  """``num_iterations`` as an int in ``[1, n]``, else a ``ValueError``."""
  n = dimension(params)
  if n == 0:
    raise ValueError("The parameter pytree is empty: there is no operator.")
  if isinstance(num_iterations, bool) or not isinstance(num_iterations, int):
    raise TypeError(
        "`num_iterations` must be a Python int (it fixes the shape of the"
        f" Lanczos basis), got {type(num_iterations).__name__}."
    )
  if num_iterations < 1:
    raise ValueError(
        f"`num_iterations` must be >= 1, got {num_iterations}: pass a positive"
        " number of operator products (PyHessian uses 100)."
    )
  if num_iterations > n:
    raise ValueError(
        f"`num_iterations`={num_iterations} exceeds the dimension n={n} of the"
        " operator; Lanczos builds at most n orthogonal vectors. Pass"
        f" num_iterations <= {n}."
    )
  return num_iterations


def _check_k(k: Any, num_iterations: int, params: Params) -> int:
  n = dimension(params)
  k = _validation.check_static_int("k", k, 1)
  if k > n:
    raise ValueError(
        f"k={k} eigenpairs were requested of an operator of dimension n={n}."
        f" Ask for k <= {n}."
    )
  if k > num_iterations:
    raise ValueError(
        f"k={k} exceeds num_iterations={num_iterations}: Lanczos gives at most"
        f" num_iterations Ritz pairs. Pass num_iterations >= {k}."
    )
  return k


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype of the recurrences: ``dtype``, but at least float32.

  bfloat16 and float16 have too few bits for the Lanczos and power
  recurrences, and ``jnp.linalg.eigh`` does not run in them; the operator
  itself is still applied to vectors of the parameters' dtype.
  """
  return jnp.promote_types(dtype, jnp.float32)


MATVEC_FIX = ("`matvec` must return a pytree of the same structure and leaf"
              " shapes as its input (the parameters' pytree), e.g."
              " `curvature.linearize(...).matvec` for the same `params`.")
"""How to fix a ``matvec`` whose output does not match its input."""


def checked_matvec(matvec: Matvec, params: Params) -> Matvec:
  """``matvec`` whose output is checked against ``params`` at trace time.

  A product of another structure or shape raises a ``ValueError`` naming
  the first differing leaf, instead of a shape error inside XLA.
  """

  def apply(vector):
    product = matvec(vector)
    _validation.check_same_tree(params, product, "matvec(v)", MATVEC_FIX)
    return product

  return apply


def _flat_operator(matvec: Matvec, params: Params):
  """``matvec`` on raveled vectors, in at least float32.

  Returns:
    The ravel of ``params`` (cast to :func:`compute_dtype`), the unravel
    function (which casts back to the parameters' dtype) and the operator on
    raveled vectors.
  """
  flat, unravel_params = _sharding.ravel(params)
  dtype = compute_dtype(flat.dtype)
  matvec = checked_matvec(matvec, params)

  def unravel(vector):
    return unravel_params(vector.astype(flat.dtype))

  def apply(vector):
    product, _ = _sharding.ravel(matvec(unravel(vector)))
    return product.astype(dtype)

  return flat.astype(dtype), unravel, apply


def _concrete_start_norm(initial_vector: Params) -> Optional[float]:
  """The norm of a concrete start vector, or ``None`` if it is traced."""
  leaves = jax.tree.leaves(initial_vector)
  if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
    return None
  return float(np.sqrt(sum(
      np.sum(np.square(np.asarray(leaf, np.float64))) for leaf in leaves)))


def _orthogonalize(vector: Array, basis: Array) -> Array:
  """Classical Gram-Schmidt against the rows of ``basis``, applied twice."""
  for _ in range(2):
    vector = vector - basis.T @ (basis @ vector)
  return vector


def _reorthogonalize(vector: Array, basis: Array) -> Array:
  """One Gram-Schmidt pass against ``basis``, and a second only if needed.

  The second pass runs when the first removed more than ``1 − 1/√2`` of the
  norm (the DGKS criterion of Daniel, Gragg, Kaufman & Stewart 1976); after
  the three-term recurrence this is rare, so reorthogonalization reads the
  basis about twice per iteration instead of four times.
  """
  once = vector - basis.T @ (basis @ vector)
  needs_second = jnp.linalg.norm(once) < jnp.sqrt(0.5) * jnp.linalg.norm(
      vector)
  return jax.lax.cond(
      needs_second, lambda: once - basis.T @ (basis @ once), lambda: once)


Reorthogonalization = Literal["full", "partial", "none"]
_MODES = ("full", "partial", "none")


def reorthogonalization_mode(reorthogonalize: Any) -> Optional[str]:
  """``reorthogonalize`` as ``"full"``, ``"partial"`` or ``None`` (none).

  The booleans and ``None`` once accepted still work (``True`` is
  ``"full"``; ``False`` and ``None`` are ``"none"``), with a
  ``DeprecationWarning``; anything else is a ``ValueError`` naming the
  options.
  """
  if reorthogonalize is True or reorthogonalize is False or (
      reorthogonalize is None):
    replacement = "full" if reorthogonalize else "none"
    warnings.warn(
        f"`reorthogonalize={reorthogonalize!r}` is deprecated: pass"
        f" `reorthogonalize={replacement!r}`.", DeprecationWarning,
        stacklevel=3)
    reorthogonalize = replacement
  if isinstance(reorthogonalize, str) and reorthogonalize in _MODES:
    return None if reorthogonalize == "none" else reorthogonalize
  raise ValueError(
      "`reorthogonalize` must be 'full' (full reorthogonalization),"
      " 'partial' (Simon's partial reorthogonalization) or 'none',"
      f" got {reorthogonalize!r}."
  )


class _Omega(NamedTuple):
  """Simon's estimates of the loss of orthogonality, for ``"partial"``.

  ``current[k] ≈ v_jᵀ v_k`` and ``previous[k] ≈ v_{j−1}ᵀ v_k`` (``1`` on the
  diagonal, ``0`` past it); ``alphas``/``betas`` are the recorded entries of
  ``T`` so far; ``anorm`` is the running estimate ``max |αᵢ| + βᵢ + βᵢ₋₁``
  of ``‖A‖``; ``force`` asks for the second reorthogonalization of a pair;
  ``count`` is the number of reorthogonalized vectors.
  """

  previous: Array
  current: Array
  alphas: Array
  betas: Array
  anorm: Array
  force: Array
  count: Array


def _initial_omega(m: int, dtype) -> _Omega:
  zeros = jnp.zeros((m,), dtype)
  return _Omega(zeros, zeros.at[0].set(1.0), zeros, zeros,
                jnp.zeros((), dtype), jnp.zeros((), bool),
                jnp.zeros((), jnp.int32))


def _next_omega(omega: _Omega, j: Array, alpha: Array, beta: Array,
                noise: Array) -> Array:
  r"""Simon's ω-recurrence: the estimate of ``v_{j+1}ᵀ v_k`` for all ``k``.

  With ``ωⱼₖ ≈ v_jᵀ v_k`` (0-based, ``β₋₁ = 0``, ``ω_{j,−1} = 0``), for
  ``k < j``

  .. math::
    \beta_j \omega_{j+1,k} = \beta_k \omega_{j,k+1}
      + (\alpha_k - \alpha_j)\,\omega_{j,k} + \beta_{k-1}\omega_{j,k-1}
      - \beta_{j-1}\omega_{j-1,k} \pm \epsilon\|A\|,

  where the rounding term takes the sign of the rest (the worst case),
  ``ω_{j+1,j} = ε‖A‖/βⱼ`` (the local loss after the three-term recurrence,
  Paige 1976) and ``ω_{j+1,j+1} = 1``. ``noise`` is ``ε‖A‖`` with ``‖A‖``
  estimated from ``T``, as in Simon's model; SLEPc's ``√n ε/2 · ‖A‖``, a rule
  of thumb for dense matrix products, would trigger at once in float32 at
  ``n`` in the millions (``√n ε/2 ≈ √ε``) and is not used. ``alpha`` and
  ``beta`` are ``αⱼ`` and ``βⱼ`` before any reorthogonalization. Costs
  ``O(m)``, against ``O(m n)`` for a reorthogonalization.
  """
  m = omega.current.shape[0]
  k = jnp.arange(m)
  zero = jnp.zeros((1,), omega.current.dtype)
  up = jnp.concatenate([omega.current[1:], zero])  # ω_{j,k+1}
  down = jnp.concatenate([zero, omega.current[:-1]])  # ω_{j,k−1}
  betas_down = jnp.concatenate([zero, omega.betas[:-1]])  # β_{k−1}
  beta_previous = jnp.where(j > 0, omega.betas[jnp.maximum(j - 1, 0)], 0.0)
  raw = (omega.betas * up + (omega.alphas - alpha) * omega.current
         + betas_down * down - beta_previous * omega.previous)
  safe_beta = jnp.where(beta > 0, beta, 1.0)
  estimate = (raw + jnp.where(raw >= 0, noise, -noise)) / safe_beta
  estimate = jnp.where(k < j, estimate, 0.0)
  estimate = jnp.where(k == j, noise / safe_beta, estimate)
  return jnp.where(k == j + 1, 1.0, estimate)


def _partial_step(omega: _Omega, j, alpha, beta_previous, residual, basis,
                  eps) -> tuple[Array, Array, _Omega, Array]:
  r"""One step of partial reorthogonalization (Simon 1984).

  Updates the ω estimates of ``v_{j+1} = residual / β``; if ``max_{k≤j}
  |ω_{j+1,k}| > √ε``, or the previous step asked for it, reorthogonalizes
  ``residual`` against the whole basis (rows past ``j`` are zero) and resets
  those ω to ``ε``. A threshold crossing also forces the *next* vector to be
  reorthogonalized (``ω_{j+1}`` and ``ω_j`` both feed ``ω_{j+2}``, so one
  reset alone does not stop the growth); a forced one does not chain.

  Returns:
    The residual, its norm ``βⱼ``, the :class:`_Omega` with ``αⱼ``, ``‖A‖``,
    ``force`` and ``count`` updated, and the estimate ``ω_{j+1,·}`` (for
    :func:`_shift_omega`).
  """
  beta = jnp.linalg.norm(residual)
  anorm = jnp.maximum(omega.anorm, jnp.abs(alpha) + beta + beta_previous)
  omega = omega._replace(alphas=omega.alphas.at[j].set(alpha), anorm=anorm)
  estimate = _next_omega(omega, j, alpha, beta, eps * anorm)
  k = jnp.arange(estimate.shape[0])
  worst = jnp.max(jnp.where(k <= j, jnp.abs(estimate), 0.0))
  triggered = worst > jnp.sqrt(eps)
  reorthogonalize = triggered | omega.force
  residual, beta = jax.lax.cond(
      reorthogonalize,
      lambda: _with_norm(_reorthogonalize(residual, basis)),
      lambda: (residual, beta),
  )
  estimate = jnp.where(reorthogonalize & (k <= j), eps, estimate)
  omega = omega._replace(
      force=triggered & ~omega.force,
      count=omega.count + reorthogonalize.astype(jnp.int32),
  )
  return residual, beta, omega, estimate


def _with_norm(vector: Array) -> tuple[Array, Array]:
  return vector, jnp.linalg.norm(vector)


def _shift_omega(omega: _Omega, estimate, j, off_diagonal, restarted,
                 eps) -> _Omega:
  """Records ``βⱼ`` and shifts ``(ω_{j−1}, ω_j) ← (ω_j, ω_{j+1} = estimate)``.

  A restart vector is fully orthogonalized, so its ω are reset to ``ε``.
  """
  k = jnp.arange(omega.current.shape[0])
  following = jnp.where(restarted & (k <= j), eps, estimate)
  return omega._replace(
      previous=omega.current, current=following,
      betas=omega.betas.at[j].set(off_diagonal))


def _normalize(vector: Array) -> Array:
  return vector / jnp.linalg.norm(vector)


class _Carry(NamedTuple):
  previous: Array
  current: Array
  beta: Array
  basis: Optional[Array]
  omega: Optional[_Omega]


def lanczos(
    matvec: Matvec,
    initial_vector: Params,
    num_iterations: int,
    *,
    reorthogonalize: Reorthogonalization = "full",
    key: Optional[Array] = None,
) -> LanczosResult:
  r"""Lanczos tridiagonalization of a symmetric operator (Lanczos 1950).

  From ``v₁ = v / ‖v‖`` and ``β₀ v₀ = 0``, each of the ``m`` iterations applies
  the operator once:

  .. math::
    w = A v_j - \beta_{j-1} v_{j-1}, \quad \alpha_j = v_j^\top A v_j, \quad
    w \leftarrow w - \alpha_j v_j, \quad \beta_j = \|w\|, \quad
    v_{j+1} = w / \beta_j

  so that ``Vᵀ A V = T = tridiag(β, α, β)``. The eigenvalues of ``T`` (Ritz
  values) approximate the extreme eigenvalues of ``A`` after a few dozen
  iterations, and ``(e₁ᵀ sᵢ)²`` are the Gauss quadrature weights of the
  spectral measure of ``v`` (Golub & Meurant). In finite precision the
  ``vⱼ`` lose orthogonality as soon as a Ritz value converges (Paige 1976),
  and spurious ("ghost") copies of converged eigenvalues appear in ``T``.
  ``reorthogonalize`` picks the remedy:

  * ``"full"`` (the default, as in PyHessian): each ``w`` is
    Gram-Schmidt orthogonalized against all previous vectors (a second pass
    when the first removes much of the norm), ``O(m n)`` memory traffic per
    iteration; ``VᵀV = I`` to working precision, so Ritz vectors are
    orthonormal and exactly unit.
  * ``"partial"``: Simon's partial reorthogonalization. An ``O(m)``
    recurrence estimates ``ωⱼₖ ≈ vⱼᵀvₖ`` from ``α`` and ``β`` (see
    :func:`_next_omega`); only when ``max |ω| > √ε`` is the new vector, and
    the one after it, orthogonalized against *all* previous vectors (not
    only those with ``|ω| > ε^{3/4}``: with a dense ``[m, n]`` basis the
    product reads every row anyway, so selecting rows saves nothing and
    all rows leave the smallest error). This keeps the basis
    semi-orthogonal, ``|vⱼᵀvₖ| ≲ √ε``, which by Simon's theorem makes ``T``
    the projection of ``A`` onto an orthonormal basis up to ``O(ε‖A‖)``:
    Ritz values and quadrature weights are as accurate as with ``"full"``,
    with no ghosts; Ritz vectors are unit only to ``O(√ε)``. Benign runs
    (nothing converged yet, e.g. 20 iterations on a large network) do no
    reorthogonalization at all; ``num_reorthogonalizations`` in the
    result counts them.
  * ``"none"``: none; ``O(n)`` memory, no basis kept, ghosts
    appear once Ritz values converge (extreme values stay right).

  When the Krylov space is exhausted (``βⱼ ≈ 0``, e.g. a low-rank ``A``) the
  iteration restarts from a random vector orthogonal to the basis and
  records ``βⱼ = 0``, so ``T`` stays block diagonal and exact.

  Args:
    matvec: ``v ↦ A v`` on pytrees, for a symmetric ``A``.
    initial_vector: the starting pytree ``v`` (any nonzero, finite norm);
      its ravel fixes ``n`` and the dtype, at least float32 for the
      recurrence (bfloat16 and float16 vectors are upcast, and the operator
      is applied to vectors cast back to their dtype). A concrete zero start
      raises a ``ValueError``; a traced one is flagged by ``valid_start``.
    num_iterations: ``m``, the number of operator products, ``1 ≤ m ≤ n``.
    reorthogonalize: ``"full"``, ``"partial"`` or ``"none"``, as above.
      ``"full"`` and ``"partial"`` keep the basis for Ritz vectors.
    key: PRNG key for restart vectors; ``jax.random.key(0)`` if ``None``.

  Returns:
    A :class:`LanczosResult`.

  Raises:
    ValueError: for any other ``reorthogonalize``, a concrete start vector
      that is zero or not finite, or a ``matvec`` whose output does not
      match ``initial_vector``'s pytree (at trace time).

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> A = jnp.diag(jnp.asarray([1., 2., 3., 4., 10.]))
    >>> params = jnp.zeros(5)  # the shapes A acts on
    >>> matvec = lambda v: A @ v
    >>> result = curvature.lanczos(matvec, jnp.ones(5), 5)
    >>> result.alphas.shape, result.betas.shape
    ((5,), (5,))
    >>> T = curvature.tridiagonal(result)  # n steps: T has A's eigenvalues
    >>> [round(float(t), 4) for t in jnp.linalg.eigvalsh(T)]
    [1.0, 2.0, 3.0, 4.0, 10.0]
    >>> fast = curvature.lanczos(matvec, jnp.ones(5), 5,
    ...                          reorthogonalize="partial")
    >>> [round(float(t), 4) for t in curvature.ritz_values(fast)]
    [1.0, 2.0, 3.0, 4.0, 10.0]

  References:
    Lanczos, "An iteration method for the solution of the eigenvalue problem
    of linear differential and integral operators", J. Res. Natl. Bur.
    Stand. 45, 1950.
    Paige, "Error analysis of the Lanczos algorithm for tridiagonalizing a
    symmetric matrix", IMA J. Appl. Math. 18, 1976.
    Simon, "The Lanczos algorithm with partial reorthogonalization", Math.
    Comp. 42, 1984. Larsen, "Lanczos bidiagonalization with partial
    reorthogonalization" (PROPACK), DAIMI PB-357, Aarhus University, 1998.
    Golub & Meurant, "Matrices, Moments and Quadrature with Applications",
    Princeton University Press, 2010. Martens, "New insights and
    perspectives on the natural gradient method", JMLR 2020 (Hessian
    spectra).
  """
  mode = reorthogonalization_mode(reorthogonalize)
  num_iterations = check_num_iterations(num_iterations, initial_vector)
  start_norm = _concrete_start_norm(initial_vector)
  if start_norm is not None and not (np.isfinite(start_norm)
                                     and start_norm > 0):
    raise ValueError(
        f"The Lanczos start vector has norm {start_norm}: it must be nonzero"
        " and finite. Pass a random pytree, e.g. `jax.tree.map(lambda x:"
        " jax.random.normal(key, x.shape, x.dtype), params)`, or the"
        " parameters themselves.")
  key = jax.random.key(0) if key is None else key
  flat, _, apply = _flat_operator(matvec, initial_vector)
  n = flat.shape[0]
  eps = jnp.asarray(jnp.finfo(flat.dtype).eps, flat.dtype)
  tolerance = jnp.sqrt(eps)
  norm = jnp.linalg.norm(flat)
  valid_start = jnp.isfinite(norm) & (norm > 0)
  # A traced zero (or NaN) start: start from a random vector instead and
  # say so in `valid_start`, rather than a NaN run that blames the operator.
  first = jnp.where(
      valid_start, flat / jnp.where(valid_start, norm, 1.0),
      _normalize(jax.random.normal(
          jax.random.fold_in(key, num_iterations), (n,), flat.dtype)))
  basis = None
  if mode is not None:
    basis = jnp.zeros((num_iterations, n), flat.dtype).at[0].set(first)
  omega = _initial_omega(num_iterations, flat.dtype) if (
      mode == "partial") else None

  def restart_vector(j, carry):
    random = jax.random.normal(jax.random.fold_in(key, j), (n,), flat.dtype)
    if mode is not None:
      random = _orthogonalize(random, carry.basis)
    else:
      local = jnp.stack([carry.previous, carry.current])
      random = _orthogonalize(random, local)
    return _normalize(random)

  def step(carry: _Carry, j):
    product = apply(carry.current)
    alpha = jnp.vdot(carry.current, product)
    residual = product - alpha * carry.current - carry.beta * carry.previous
    new_omega, estimate = carry.omega, None
    if mode == "full":
      assert carry.basis is not None  # Kept whenever mode is not None.
      residual = _reorthogonalize(residual, carry.basis)
      beta = jnp.linalg.norm(residual)
    elif mode == "partial":
      assert carry.basis is not None and carry.omega is not None
      residual, beta, new_omega, estimate = _partial_step(
          carry.omega, j, alpha, carry.beta, residual, carry.basis, eps)
    else:
      beta = jnp.linalg.norm(residual)
    has_next = j + 1 < num_iterations
    exhausted = has_next & (beta <= tolerance * jnp.linalg.norm(product))
    following = jax.lax.cond(
        exhausted,
        lambda: restart_vector(j, carry),
        lambda: residual / jnp.where(beta > 0, beta, 1.0),
    )
    off_diagonal = jnp.where(exhausted, 0.0, beta).astype(flat.dtype)
    new_basis = carry.basis
    if mode is not None:
      assert carry.basis is not None
      row = jnp.minimum(j + 1, num_iterations - 1)
      kept = jnp.where(has_next, following, carry.current)
      new_basis = carry.basis.at[row].set(kept)
    if mode == "partial":
      assert new_omega is not None  # Set by _partial_step above.
      new_omega = _shift_omega(
          new_omega, estimate, j, off_diagonal, exhausted, eps)
    new_carry = _Carry(carry.current, following, off_diagonal, new_basis,
                       new_omega)
    return new_carry, (alpha, off_diagonal)

  init = _Carry(jnp.zeros_like(first), first, jnp.zeros((), flat.dtype), basis,
                omega)
  final, (alphas, betas) = jax.lax.scan(
      step, init, jnp.arange(num_iterations)
  )
  finite = jnp.all(jnp.isfinite(alphas)) & jnp.all(jnp.isfinite(betas))
  count = None
  if mode == "partial":
    assert final.omega is not None  # Carried in "partial" mode.
    count = final.omega.count
  return LanczosResult(alphas, betas, final.basis, finite, count,
                       valid_start)


def _batch_project(basis: Array, vectors: Array) -> Array:
  """``vectors − Vᵀ(V vectors)`` for each probe: ``basis [P, m, n]``."""
  coefficients = jnp.einsum("pmn,pn->pm", basis, vectors)
  return vectors - jnp.einsum("pmn,pm->pn", basis, coefficients)


def lanczos_probes(
    matvec: Matvec, params: Params, starts: Array, num_iterations: int, *,
    reorthogonalize: Reorthogonalization = "full", key: Optional[Array] = None,
) -> LanczosResult:
  """:func:`lanczos` from ``P`` raveled starts ``[P, n]`` at once.

  The operator is applied to all ``P`` vectors in one ``vmap``-ed product
  per step and the Gram-Schmidt passes read each probe's basis once;
  unlike ``vmap(lanczos)``, whose ``lax.cond`` branches would all run under
  ``vmap``, the second Gram-Schmidt pass and the restarts run (for every
  probe) only when some probe needs them. ``reorthogonalize`` is ``"full"``
  or ``"none"``; the ``"partial"`` recurrence is per probe, use
  :func:`lanczos` for it.

  Returns:
    A :class:`LanczosResult` whose fields have a leading probe axis
    (``basis`` is ``None``).
  """
  mode = reorthogonalization_mode(reorthogonalize)
  if mode == "partial":
    raise ValueError("lanczos_probes runs 'full' or no reorthogonalization;"
                     " use lanczos for 'partial'.")
  key = jax.random.key(0) if key is None else key
  flat, _, apply = _flat_operator(matvec, params)
  apply_all = jax.vmap(apply)
  num_probes, n = starts.shape
  dtype = flat.dtype
  eps = jnp.asarray(jnp.finfo(dtype).eps, dtype)
  starts = starts.astype(dtype)
  first = starts / jnp.linalg.norm(starts, axis=1, keepdims=True)
  basis = None
  if mode is not None:
    basis = jnp.zeros((num_probes, num_iterations, n), dtype).at[:, 0].set(
        first)

  def restart_vectors(j, carry):
    random = jax.random.normal(jax.random.fold_in(key, j), (num_probes, n),
                               dtype)
    if mode is not None:
      random = _batch_project(carry.basis, _batch_project(carry.basis,
                                                          random))
    else:
      local = jnp.stack([carry.previous, carry.current], axis=1)
      random = _batch_project(local, _batch_project(local, random))
    return random / jnp.linalg.norm(random, axis=1, keepdims=True)

  def step(carry: _Carry, j):
    product = apply_all(carry.current)
    alpha = jnp.sum(carry.current * product, axis=1)
    residual = (product - alpha[:, None] * carry.current
                - carry.beta[:, None] * carry.previous)
    if mode == "full":
      assert carry.basis is not None  # Kept whenever mode is not None.
      full_basis = carry.basis
      once = _batch_project(full_basis, residual)
      again = jnp.any(jnp.linalg.norm(once, axis=1)
                      < jnp.sqrt(0.5) * jnp.linalg.norm(residual, axis=1))
      residual = jax.lax.cond(
          again, lambda: _batch_project(full_basis, once), lambda: once)
    beta = jnp.linalg.norm(residual, axis=1)
    has_next = j + 1 < num_iterations
    exhausted = has_next & (
        beta <= jnp.sqrt(eps) * jnp.linalg.norm(product, axis=1))
    normalized = residual / jnp.where(beta > 0, beta, 1.0)[:, None]
    following = jax.lax.cond(
        jnp.any(exhausted),
        lambda: jnp.where(exhausted[:, None], restart_vectors(j, carry),
                          normalized),
        lambda: normalized)
    off_diagonal = jnp.where(exhausted, 0.0, beta).astype(dtype)
    new_basis = carry.basis
    if mode is not None:
      assert carry.basis is not None
      row = jnp.minimum(j + 1, num_iterations - 1)
      kept = jnp.where(has_next, following, carry.basis[:, row])
      new_basis = carry.basis.at[:, row].set(kept)
    return (_Carry(carry.current, following, off_diagonal, new_basis, None),
            (alpha, off_diagonal))

  init = _Carry(jnp.zeros_like(first), first,
                jnp.zeros((num_probes,), dtype), basis, None)
  _, (alphas, betas) = jax.lax.scan(step, init, jnp.arange(num_iterations))
  alphas, betas = alphas.T, betas.T
  finite = jnp.all(jnp.isfinite(alphas), axis=1) & jnp.all(
      jnp.isfinite(betas), axis=1)
  return LanczosResult(alphas, betas, None, finite)


def tridiagonal(result: LanczosResult) -> Array:
  """The dense ``m × m`` tridiagonal ``T`` of a :class:`LanczosResult`."""
  off = result.betas[:-1]
  return jnp.diag(result.alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)


def ritz_values(result: LanczosResult) -> Array:
  """The eigenvalues of ``T``, ascending: estimates of ``A``'s eigenvalues."""
  matrix = tridiagonal(result)
  return jnp.linalg.eigvalsh(matrix.astype(compute_dtype(matrix.dtype)))


def eigh_tridiagonal(result: LanczosResult) -> tuple[Array, Array]:
  """``T = S Θ Sᵀ`` by ``jnp.linalg.eigh``, in at least float32."""
  matrix = tridiagonal(result)
  return jnp.linalg.eigh(matrix.astype(compute_dtype(matrix.dtype)))


def _random_start(params: Params, key: Array) -> Params:
  flat, unravel = _sharding.ravel(params)
  return unravel(jax.random.normal(key, flat.shape, flat.dtype))


class RitzDecomposition(NamedTuple):
  """``T = S Θ Sᵀ`` of one Lanczos run, with the basis to map ``S`` back."""

  values: Array  # Θ, ascending, [m].
  vectors: Array  # S, [m, m].
  lanczos: LanczosResult


def ritz_decomposition(
    matvec: Matvec, params: Params, num_iterations: int, key: Optional[Array],
    reorthogonalize: Reorthogonalization = "full",
) -> RitzDecomposition:
  """Lanczos from a Gaussian start, then ``eigh(T)``.

  ``reorthogonalize`` is ``True``/``"full"`` (the default) or ``"partial"``;
  both keep the basis that maps ``S`` back to Ritz vectors.
  """
  if reorthogonalization_mode(reorthogonalize) is None:
    raise ValueError(
        "Ritz vectors need the Lanczos basis: pass reorthogonalize='full',"
        f" 'full' or 'partial', got {reorthogonalize!r}.")
  num_iterations = check_num_iterations(num_iterations, params)
  key = jax.random.key(0) if key is None else key
  start_key, restart_key = jax.random.split(key)
  result = lanczos(
      matvec, _random_start(params, start_key), num_iterations,
      reorthogonalize=reorthogonalize, key=restart_key)
  values, vectors = eigh_tridiagonal(result)
  return RitzDecomposition(values, vectors, result)


def select_pairs(
    ritz: RitzDecomposition, params: Params, order: Array
) -> Eigenpairs:
  """The Ritz pairs at positions ``order`` of the ascending Ritz values."""
  chosen = ritz.vectors[:, order]  # [m, k]
  flat, unravel = _sharding.ravel(params)
  basis = ritz.lanczos.basis
  assert basis is not None  # ritz_decomposition always keeps it.
  vectors = (chosen.T @ basis).astype(flat.dtype)
  return Eigenpairs(
      eigenvalues=ritz.values[order],
      eigenvectors=jax.vmap(unravel)(vectors),
      residual_bounds=jnp.abs(ritz.lanczos.betas[-1] * chosen[-1]),
      finite=ritz.lanczos.finite,
  )


# Blocks of the operator -------------------------------------------------------

Blocks = Union[None, str, Mapping[str, str]]
"""``blocks=`` of the diagnostics: ``None``, ``"leaves"``, ``"layers"`` or a
mapping from path patterns to block names."""

BLOCKS = ("leaves", "layers")
"""The named partitions of the parameters a diagnostic accepts."""

NamedBlocks = tuple  # ((block name, (leaf index, ...)), ...), hashable.


def _layer_names(paths: list, groups: list) -> list:
  """A layer's block name: its kernel's parent path (``Dense_0``), if unique."""
  names = []
  for members in groups:
    kernel = paths[members[0]]
    names.append(kernel.rsplit("/", 1)[0] if "/" in kernel else kernel)
  counts = collections.Counter(names)
  return [name if counts[name] == 1 else paths[members[0]]
          for name, members in zip(names, groups)]


def _layer_blocks(params, predict_fn, batch) -> NamedBlocks:
  if predict_fn is None or batch is None:
    raise ValueError(
        "blocks='layers' finds the layers by tracing the model: pass"
        " `predict_fn=` and `batch=` too, or use blocks='leaves' or a mapping"
        " {path pattern: block name}.")
  paths = _blocks.leaf_paths(params)
  found = _layers.discover_layers(predict_fn, params, batch)
  groups, covered = [], set()
  for layer in found.layers:
    members = (layer.kernel,) + (() if layer.bias is None else (layer.bias,))
    covered.update(members)
    groups.append(members)
  groups += [(i,) for i in range(len(paths)) if i not in covered]
  groups.sort(key=min)
  names = _layer_names(paths, groups)
  return tuple((name, tuple(sorted(members)))
               for name, members in zip(names, groups))


def _matches(pattern: str, path: str) -> bool:
  """A path matches itself, a glob (``fnmatch``) or a parent path."""
  return (path == pattern or fnmatch.fnmatchcase(path, pattern)
          or path.startswith(pattern.rstrip("/") + "/"))


def _mapped_blocks(mapping: Mapping, paths: list) -> NamedBlocks:
  assigned, unknown, conflicts = {}, [], []
  for pattern, name in mapping.items():
    if not isinstance(pattern, str) or not isinstance(name, str):
      raise TypeError(
          "A blocks= mapping goes from path patterns (str) to block names"
          f" (str), got {pattern!r}: {name!r}.")
    hits = [i for i, path in enumerate(paths) if _matches(pattern, path)]
    if not hits:
      unknown.append(pattern)
    for i in hits:
      if assigned.setdefault(i, name) != name:
        conflicts.append(f"{paths[i]} ({assigned[i]!r} and {name!r})")
  missing = [path for i, path in enumerate(paths) if i not in assigned]
  problems = []
  if unknown:
    problems.append(f"patterns that match no parameter: {unknown}")
  if missing:
    problems.append(f"parameters assigned to no block: {missing}")
  if conflicts:
    problems.append(f"parameters assigned to two blocks: {conflicts}")
  if problems:
    raise ValueError(
        "Bad blocks= mapping: " + "; ".join(problems) + f". The parameter"
        f" paths are {paths}; map each (a path, a parent path or an fnmatch"
        " glob such as 'Dense_0/*') to exactly one block name.")
  order = {}
  for i in sorted(assigned):
    order.setdefault(assigned[i], []).append(i)
  return tuple((name, tuple(members)) for name, members in order.items())


def resolve_blocks(
    blocks: Blocks, params: Params, predict_fn=None, batch=None
) -> NamedBlocks:
  """``blocks=`` as ``((name, leaf indices), ...)``, or a clear error.

  ``"leaves"``: one block per leaf, named by its path. ``"layers"``: the
  layers found by K-FAC's discovery (:func:`curvature.kfac_blocks`), a
  kernel with its bias, named by the kernel's parent path; every other leaf
  is a block of its own. A mapping ``{pattern: name}``: each parameter path
  matching the pattern (the path itself, a parent path or an ``fnmatch``
  glob) goes to block ``name``; every path must be matched by exactly one
  block name and every pattern must match something.
  """
  if isinstance(blocks, str):
    _validation.check_choice("blocks", blocks, BLOCKS)
    if blocks == "leaves":
      return tuple((path, (i,))
                   for i, path in enumerate(_blocks.leaf_paths(params)))
    return _layer_blocks(params, predict_fn, batch)
  if isinstance(blocks, Mapping):
    return _mapped_blocks(blocks, _blocks.leaf_paths(params))
  raise TypeError(
      f"`blocks` must be None, 'leaves', 'layers' or a mapping {{path"
      f" pattern: block name}}, got {type(blocks).__name__}.")


def diagnostic_blocks(
    params: Params,
    blocks: Blocks = "leaves",
    *,
    predict_fn: Optional[Callable[[Params, Any], Any]] = None,
    batch: Any = None,
) -> dict:
  """The parameter paths of each block a diagnostic's ``blocks=`` gives.

  Args:
    params: the parameters.
    blocks: ``"leaves"``, ``"layers"`` or a mapping ``{path pattern: block
      name}`` (see :func:`curvature.top_eigenpairs`).
    predict_fn: ``(params, batch) -> outputs``, for ``"layers"``.
    batch: a batch, for ``"layers"`` (only its shapes matter).

  Returns:
    ``{block name: (parameter path, ...)}`` in parameter order.

  Example:
    >>> import jax.numpy as jnp, curvature
    >>> params = {"b": jnp.zeros(3), "w": jnp.ones((4, 3))}
    >>> batch = jnp.ones((5, 4))
    >>> curvature.diagnostic_blocks(params, "layers",
    ...     predict_fn=lambda p, x: x @ p["w"] + p["b"], batch=batch)
    {'w': ('b', 'w')}
  """
  paths = _blocks.leaf_paths(params)
  return {name: tuple(paths[i] for i in members)
          for name, members in resolve_blocks(blocks, params, predict_fn,
                                              batch)}


def _flat_indices(named: NamedBlocks, params: Params) -> list:
  """Each block's positions in the ravel of ``params``."""
  sizes = [int(np.size(leaf)) for leaf in jax.tree.leaves(params)]
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  out = []
  for name, members in named:
    idx = np.concatenate([np.arange(offsets[i], offsets[i + 1])
                          for i in members]).astype(np.int32)
    if idx.size == 0:
      raise ValueError(f"Block {name!r} holds no parameters (empty leaves).")
    out.append(idx)
  return out


def block_operator(matvec: Matvec, params: Params, indices: Array) -> Matvec:
  """``P_b C P_b`` on the block's raveled coordinates ``v_b``.

  The tangent is ``v_b`` at ``indices`` and zero elsewhere; the cotangent
  keeps the same positions of the product. The model is not rebuilt.
  """
  flat, unravel = _sharding.ravel(params)
  matvec = checked_matvec(matvec, params)

  def apply(vector):
    full = jnp.zeros(flat.shape, flat.dtype).at[indices].set(
        vector.astype(flat.dtype))
    product, _ = _sharding.ravel(matvec(unravel(full)))
    return product[indices].astype(vector.dtype)

  return apply


def map_blocks(core: Callable, matvec: Matvec, params: Params,
               named: NamedBlocks, key: Array) -> list:
  """``core(operator_b, zeros [n_b], key_b)`` for every block, in order.

  Blocks of the same size share one compiled body under ``lax.map`` (one
  Lanczos basis in memory at a time); the others are traced one by one, in
  the same jitted call.

  Returns:
    ``[(flat indices, core's output), ...]`` in block order.
  """
  flat, _ = _sharding.ravel(params)
  indices = _flat_indices(named, params)
  keys = jax.random.split(key, len(named))
  groups = collections.defaultdict(list)
  for b, idx in enumerate(indices):
    groups[idx.size].append(b)
  out = [None] * len(named)
  for size, members in groups.items():
    zeros = jnp.zeros((size,), flat.dtype)

    def one(args, zeros=zeros):
      idx, block_key = args
      return core(block_operator(matvec, params, idx), zeros, block_key)

    if len(members) == 1:
      (b,) = members
      out[b] = one((jnp.asarray(indices[b]), keys[b]))
      continue
    stacked = jax.lax.map(one, (jnp.asarray(np.stack(
        [indices[b] for b in members])), keys[np.asarray(members)]))
    for j, b in enumerate(members):
      out[b] = jax.tree.map(lambda x, j=j: x[j], stacked)
  return list(zip(indices, out))


def on_blocks(core: Callable, matvec: Matvec, params: Params, key: Array,
              named: Optional[NamedBlocks], num_iterations: Optional[int], *,
              k: int = 1, default: Optional[int] = None,
              finish: Optional[Callable] = None) -> Any:
  """``core(operator, params, key, num_iterations)`` on the whole operator,
  or ``{block name: result}`` for each block of ``named``.

  A block runs ``block_iterations(num_iterations, n_b, k, default)`` steps;
  ``finish(result, flat indices)`` maps a block's result back to the
  parameters (e.g. its Ritz vectors).
  """
  if named is None:
    return core(matvec, params, key, num_iterations)
  outs = map_blocks(
      lambda op, zeros, block_key: core(
          op, zeros, block_key,
          block_iterations(num_iterations, zeros.size, k, default)),
      matvec, params, named, key)
  finish = finish or (lambda out, indices: out)
  return {name: finish(out, indices)
          for (name, _), (indices, out) in zip(named, outs)}


def embed_vectors(vectors: Array, indices: np.ndarray, params: Params):
  """Block coordinates ``[k, n_b]`` as ``k`` parameter pytrees (0 elsewhere)."""
  flat, unravel = _sharding.ravel(params)
  full = jnp.zeros((vectors.shape[0], flat.size), flat.dtype).at[
      :, indices].set(vectors.astype(flat.dtype))
  return jax.vmap(unravel)(full)


# Compiling outside jit --------------------------------------------------------


def _under_transformation(*trees) -> bool:
  """Whether we are being traced (an argument is a tracer, or a trace is on)."""
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees)):
    return True
  try:
    from jax._src import core as jax_core  # pylint: disable=g-import-not-at-top
    return not jax_core.trace_state_clean()
  except (ImportError, AttributeError):  # pragma: no cover
    return False


@functools.lru_cache(maxsize=16)
def _compiled(impl, matvec, static):
  return jax.jit(functools.partial(impl, matvec, **dict(static)))


def jit_call(impl: Callable, matvec: Matvec, params: Params, key: Array,
             **static) -> Any:
  """``impl(matvec, params, key, **static)``, compiled when called eagerly.

  Outside ``jit`` the diagnostic compiles itself once per ``matvec`` object
  (kept in a small cache of the 16 most recent), so a second call with the
  same ``matvec`` runs at the speed of a jitted call; the arrays ``matvec``
  closes over (the linearization) become constants of that program. Inside
  ``jit``, ``vmap`` or ``grad`` it runs as part of the caller's trace.
  """
  if _under_transformation(params, key):
    return impl(matvec, params, key, **static)
  try:
    compiled = _compiled(impl, matvec, tuple(sorted(static.items())))
  except TypeError:  # An unhashable matvec or argument: run as is.
    return impl(matvec, params, key, **static)
  return compiled(params, key)


def default_num_iterations(params: Params, k: int = 1) -> int:
  """``min(n, max(30, 3k))`` Lanczos steps for ``k`` extreme eigenpairs."""
  k = _validation.check_static_int("k", k, 1)
  return min(dimension(params), max(30, 3 * k))


def _whole_eigenpairs(matvec, params, key, *, k, num_iterations,
                      reorthogonalize, largest) -> Eigenpairs:
  ritz = ritz_decomposition(
      matvec, params, num_iterations, key, reorthogonalize)
  order = jnp.arange(num_iterations - 1, num_iterations - 1 - k, -1) if (
      largest) else jnp.arange(k)
  return select_pairs(ritz, params, order)


def block_iterations(num_iterations: Optional[int], size: int,
                     k: int = 1, default: Optional[int] = None) -> int:
  """A block's Lanczos steps: the request (or default), at most its size."""
  if num_iterations is None:
    num_iterations = max(30, 3 * k) if default is None else default
  return max(min(num_iterations, size), min(k, size))


def _per_block_eigenpairs(matvec, params, key, *, named, k, num_iterations,
                          reorthogonalize, largest) -> dict:
  def core(operator, zeros, block_key, steps):
    return _whole_eigenpairs(
        operator, zeros, block_key, k=min(k, zeros.size),
        num_iterations=steps, reorthogonalize=reorthogonalize,
        largest=largest)

  def finish(pairs, indices):
    return pairs._replace(
        eigenvectors=embed_vectors(pairs.eigenvectors, indices, params))

  return on_blocks(core, matvec, params, key, named, num_iterations, k=k,
                   finish=finish)


def check_block_iterations(num_iterations: Any) -> Optional[int]:
  """``None`` or a Python int ``≥ 1`` (clipped to each block's size later)."""
  if num_iterations is None:
    return None
  if isinstance(num_iterations, bool) or not isinstance(num_iterations, int):
    raise TypeError(
        "`num_iterations` must be a Python int (it fixes the shape of the"
        f" Lanczos basis), got {type(num_iterations).__name__}.")
  if num_iterations < 1:
    raise ValueError(
        f"`num_iterations` must be >= 1, got {num_iterations}: pass a positive"
        " number of operator products (PyHessian uses 100).")
  return num_iterations


def _eigenpairs(matvec, params, k, num_iterations, key, reorthogonalize,
                largest: bool, blocks, predict_fn, batch):
  if reorthogonalization_mode(reorthogonalize) is None:
    raise ValueError(
        "Ritz vectors need the Lanczos basis: pass reorthogonalize='full',"
        f" 'full' or 'partial', got {reorthogonalize!r}.")
  key = jax.random.key(0) if key is None else key
  if blocks is not None:
    named = resolve_blocks(blocks, params, predict_fn, batch)
    return jit_call(
        _per_block_eigenpairs, matvec, params, key, named=named,
        k=_validation.check_static_int("k", k, 1),
        num_iterations=check_block_iterations(num_iterations),
        reorthogonalize=reorthogonalize, largest=largest)
  if num_iterations is None:
    num_iterations = default_num_iterations(params, k)
  num_iterations = check_num_iterations(num_iterations, params)
  k = _check_k(k, num_iterations, params)
  return jit_call(_whole_eigenpairs, matvec, params, key, k=k,
                  num_iterations=num_iterations,
                  reorthogonalize=reorthogonalize, largest=largest)


def top_eigenpairs(
    matvec: Matvec,
    params: Params,
    k: int = 1,
    *,
    num_iterations: Optional[int] = None,
    key: Optional[Array] = None,
    reorthogonalize: Reorthogonalization = "full",
    blocks: Blocks = None,
    predict_fn: Optional[Callable[[Params, Any], Any]] = None,
    batch: Any = None,
) -> Union[Eigenpairs, dict]:
  r"""The ``k`` largest eigenvalues and their Ritz vectors, by Lanczos.

  Runs :func:`lanczos` with full reorthogonalization from a random Gaussian
  start, diagonalizes ``T = S Θ Sᵀ`` with ``jnp.linalg.eigh`` and returns the
  Ritz pairs ``(θᵢ, V sᵢ)`` with the error bounds ``|β_m s_{m,i}|``.

  Full reorthogonalization stays the default because the Ritz vectors
  ``V sᵢ`` are then orthonormal to working precision, which is what a
  PyHessian user gets. ``reorthogonalize="partial"`` gives eigenvalues as
  accurate (semi-orthogonality, ``|vⱼᵀvₖ| ≲ √ε``, keeps ``T`` exact to
  ``O(ε‖A‖)``; Simon 1984) for less memory traffic, but Ritz vectors that
  are unit and orthogonal only to ``O(√ε)``: use it when the eigenvalues
  are what matters or the basis is large.

  Args:
    matvec: ``v ↦ A v`` on pytrees, symmetric ``A``.
    params: a pytree with the shapes and dtypes ``A`` acts on (the
      parameters).
    k: how many eigenpairs, ``k ≤ num_iterations ≤ n``.
    num_iterations: Lanczos steps; ``min(n, max(30, 3k))`` if ``None``.
    key: PRNG key of the start vector; ``jax.random.key(0)`` if ``None``.
    reorthogonalize: ``"full"`` or ``"partial"`` (see :func:`lanczos`);
      ``"none"`` is refused, Ritz vectors need the basis.
    blocks: ``None`` (the whole operator), ``"leaves"``, ``"layers"`` or a
      mapping ``{path pattern: block name}``: the eigenpairs of each
      diagonal block ``P_b C P_b`` instead (see *Per-block diagnostics*).
    predict_fn: ``(params, batch) -> outputs``, for ``blocks="layers"``.
    batch: a batch, for ``blocks="layers"`` (only its shapes matter).

  Returns:
    :class:`Eigenpairs`, largest eigenvalue first; with ``blocks``, a dict
    ``{block name: Eigenpairs}`` whose eigenvectors are parameter pytrees,
    zero outside the block.

  **Per-block diagnostics.** With ``blocks``, the operator is restricted to
  each block ``b`` of parameters by masking: the tangent is zero outside
  ``b`` and only ``b``'s entries of the product are kept, which is the
  diagonal block ``C_bb`` (the model is not rebuilt). ``"leaves"`` gives one
  block per parameter leaf, ``"layers"`` a kernel with its bias, as found by
  K-FAC's layer discovery (:func:`curvature.kfac_blocks`; other leaves get a
  block each), and a mapping assigns each parameter path (matched as a
  path, a parent path or an ``fnmatch`` glob) to a named block; a mapping
  that leaves a parameter out or names a path that does not exist raises a
  ``ValueError`` listing them. :func:`curvature.diagnostic_blocks` shows
  the partition. A block smaller than ``num_iterations`` (or ``k``) is run
  with its size. All blocks run in one compiled call; blocks of the same
  size share one body under ``lax.map``.

  Outside ``jit`` the call compiles itself, once per ``matvec`` object (see
  :func:`curvature.hutchinson_trace`).

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> A = jnp.diag(jnp.asarray([1., 2., 3., 4., 10.]))
    >>> params = jnp.zeros(5)  # the shapes A acts on
    >>> matvec = lambda v: A @ v
    >>> top = curvature.top_eigenpairs(matvec, params, k=2)
    >>> [round(float(t), 4) for t in top.eigenvalues]  # largest first
    [10.0, 4.0]
    >>> top.eigenvectors.shape  # [k, *params.shape]
    (2, 5)

  References:
    Lanczos 1950; Golub & Meurant 2010. Yao et al., "PyHessian: Neural
    networks through the lens of the Hessian", IEEE Big Data 2020.
  """
  return _eigenpairs(matvec, params, k, num_iterations, key,
                     reorthogonalize, True, blocks, predict_fn, batch)


def bottom_eigenpairs(
    matvec: Matvec,
    params: Params,
    k: int = 1,
    *,
    num_iterations: Optional[int] = None,
    key: Optional[Array] = None,
    reorthogonalize: Reorthogonalization = "full",
    blocks: Blocks = None,
    predict_fn: Optional[Callable[[Params, Any], Any]] = None,
    batch: Any = None,
) -> Union[Eigenpairs, dict]:
  r"""The ``k`` smallest (most negative) eigenvalues and their Ritz vectors.

  As :func:`top_eigenpairs`, from the other end of the Ritz spectrum. The
  smallest eigenvalues of a network's Hessian sit next to a large bulk near
  zero and converge more slowly than the outliers: use more iterations and
  check ``residual_bounds``.

  Args:
    matvec: ``v ↦ A v`` on pytrees, symmetric ``A``.
    params: a pytree with the shapes and dtypes ``A`` acts on.
    k: how many eigenpairs, ``k ≤ num_iterations ≤ n``.
    num_iterations: Lanczos steps; ``min(n, max(30, 3k))`` if ``None``.
    key: PRNG key of the start vector.
    reorthogonalize: ``"full"`` or ``"partial"``, as in
      :func:`top_eigenpairs`.
    blocks: per-block eigenpairs, as in :func:`top_eigenpairs`.
    predict_fn: for ``blocks="layers"``.
    batch: for ``blocks="layers"``.

  Returns:
    :class:`Eigenpairs`, smallest eigenvalue first; with ``blocks``, a dict
    ``{block name: Eigenpairs}``.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> A = jnp.diag(jnp.asarray([1., 2., 3., 4., 10.]))
    >>> params = jnp.zeros(5)  # the shapes A acts on
    >>> matvec = lambda v: A @ v
    >>> bottom = curvature.bottom_eigenpairs(matvec, params, k=2)
    >>> [round(float(t), 4) for t in bottom.eigenvalues]  # smallest first
    [1.0, 2.0]

  References:
    Lanczos 1950; Golub & Meurant 2010.
  """
  return _eigenpairs(matvec, params, k, num_iterations, key,
                     reorthogonalize, False, blocks, predict_fn, batch)


class _PowerCarry(NamedTuple):
  vector: Array
  eigenvalue: Array
  iteration: Array
  converged: Array
  halted: Array


def power_iteration(
    matvec: Matvec,
    params: Params,
    *,
    max_iterations: int = 100,
    rtol: float = 1e-3,
    key: Optional[Array] = None,
) -> PowerIterationResult:
  r"""The eigenvalue of largest magnitude by power iteration.

  .. math::
    v_{i+1} = \frac{A v_i}{\|A v_i\|}, \qquad \lambda_i = v_i^\top A v_i,

  stopping when ``|λᵢ − λᵢ₋₁| ≤ rtol · |λᵢ|`` or after ``max_iterations``
  products (PyHessian's defaults: 100 and 1e-3), inside ``lax.while_loop``.
  It converges at the rate ``|λ₂/λ₁|``; :func:`top_eigenpairs` is usually
  faster for the same number of products.

  A settled Rayleigh quotient alone does not mean convergence: when the two
  eigenvalues of largest magnitude are ``±λ`` (a tie, e.g. a saddle's
  Hessian) the iterate flips between two vectors forever while ``vᵀAv``
  stays put. The iteration therefore also asks for a small residual,
  ``‖Av − λv‖ ≤ √rtol · ‖Av‖`` (the eigenvalue error of a Rayleigh quotient
  is about the square of the vector's), and reports ``converged=False``
  otherwise; use :func:`top_eigenpairs` and :func:`bottom_eigenpairs` for
  both ends of such a spectrum.

  Args:
    matvec: ``v ↦ A v`` on pytrees, symmetric ``A``.
    params: a pytree with the shapes and dtypes ``A`` acts on.
    max_iterations: the product cap, a Python int ``≥ 1``.
    rtol: relative change of ``λ`` that counts as converged.
    key: PRNG key of the Gaussian start; ``jax.random.key(0)`` if ``None``.

  Returns:
    A :class:`PowerIterationResult`.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> A = jnp.diag(jnp.asarray([1., 2., 3., 4., 10.]))
    >>> params = jnp.zeros(5)  # the shapes A acts on
    >>> matvec = lambda v: A @ v
    >>> result = curvature.power_iteration(matvec, params)
    >>> round(float(result.eigenvalue), 2), bool(result.converged)
    (10.0, True)

  References:
    Yao et al., "PyHessian", IEEE Big Data 2020 (defaults). Golub & Van
    Loan, "Matrix Computations", 4th ed., Johns Hopkins University Press,
    2013, §8.2 (the power method).
  """
  if isinstance(max_iterations, int) and max_iterations < 1:
    raise ValueError(
        f"`max_iterations` must be >= 1, got {max_iterations}: pass a positive"
        " number of products (PyHessian uses 100)."
    )
  max_iterations = _validation.check_static_int(
      "max_iterations", max_iterations, 1)
  _validation.check_nonnegative("rtol", rtol)
  if dimension(params) == 0:
    raise ValueError("The parameter pytree is empty: there is no operator.")
  key = jax.random.key(0) if key is None else key
  flat, unravel, apply = _flat_operator(matvec, params)
  start = _normalize(jax.random.normal(key, flat.shape, flat.dtype))

  def cond(carry: _PowerCarry):
    return (carry.iteration < max_iterations) & ~carry.halted

  def body(carry: _PowerCarry) -> _PowerCarry:
    product = apply(carry.vector)
    eigenvalue = jnp.vdot(carry.vector, product)
    norm = jnp.linalg.norm(product)
    change = jnp.abs(eigenvalue - carry.eigenvalue)
    residual = jnp.linalg.norm(product - eigenvalue * carry.vector)
    finite = jnp.isfinite(eigenvalue) & jnp.isfinite(norm)
    settled = (carry.iteration > 0) & (change <= rtol * jnp.abs(eigenvalue))
    eigenvector = residual <= jnp.sqrt(rtol) * norm  # Not a ±λ oscillation.
    converged = ((settled & eigenvector) | (norm == 0)) & finite
    vector = jnp.where(norm > 0, product / jnp.where(norm > 0, norm, 1.0),
                       carry.vector)
    return _PowerCarry(vector, eigenvalue, carry.iteration + 1, converged,
                       converged | ~finite)

  false = jnp.zeros((), bool)
  init = _PowerCarry(start, jnp.zeros((), flat.dtype),
                     jnp.zeros((), jnp.int32), false, false)
  final = jax.lax.while_loop(cond, body, init)
  finite = jnp.isfinite(final.eigenvalue) & jnp.all(
      jnp.isfinite(final.vector))
  return PowerIterationResult(
      eigenvalue=final.eigenvalue,
      eigenvector=unravel(final.vector),
      iterations=final.iteration,
      converged=final.converged,
      finite=finite,
  )
