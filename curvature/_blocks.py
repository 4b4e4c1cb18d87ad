r"""One preconditioner core: curvature blocks and the stages that run them.

Every optimizer in the library preconditions a direction with a curvature
matrix, a point in *statistic* × *structure* × *power*. This module is the
*structure* axis for the methods that keep state per layer or per group of
parameters. A :class:`Block` covers some parameter leaves and is a
NamedTuple of pure functions:

========== ============================================================
stage      what it does
========== ============================================================
init       zero statistics and an identity preconditioner
statistics one batch's statistic, from the evidence the optimizer gathered
           (a layer's recorded inputs and output gradients, a leaf's
           gradient, a dense curvature block, a diagonal estimate)
refresh    the preconditioner from the averaged statistic: a damped inverse,
           an inverse root, or an eigenbasis (every ``k`` steps, under
           ``lax.cond``)
refit      eigenbasis blocks only: the diagonal re-fitted in the current
           eigenbasis (EKFAC, SOAP)
apply      the block's leaves of the direction, preconditioned
========== ============================================================

Four kinds of block cover the library's second-order methods:

* :func:`kronecker_block`: ``Ā ⊗ G`` (K-FAC) or ``L ⊗ R`` (Shampoo); the
  refresh forms a function of each factor: the π-damped inverse of K-FAC
  (Cholesky), the ε-damped inverse fourth root of Shampoo (``eigh``);
* :func:`eigen_kronecker_block`: the eigenbasis of both factors and a
  diagonal re-fitted in it (EKFAC, SOAP);
* :func:`dense_block`: a full block over a small group of leaves (TONGA);
* :func:`diagonal_block`: a diagonal estimate over any leaves.

The stages shared by every optimizer built on blocks are functions here too:
:func:`accumulate` (average with rejection of non-finite statistics),
:func:`refresh_due` and :func:`refresh` (periodic refreshes that keep the
previous preconditioner when a new one is not finite, and never refresh from
statistics that hold no accepted sample), :func:`refit` and
:func:`precondition`.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from curvature import _diagonal
from curvature import _sharding
from curvature import _validation

Array = jax.Array

AVERAGING = ("ema", "schedule", "sum", "uncorrected_ema")
"""How statistics are averaged over steps (see :func:`average`)."""


class BlockState(NamedTuple):
  """The state of one block.

  Attributes:
    statistics: the running average of the block's statistic, raw (see
      :func:`estimate` for the bias-corrected value).
    preconditioner: what the last refresh computed (a damped inverse, inverse
      roots, an eigenbasis).
    refit: eigenbasis blocks: the running average of the diagonal re-fitted
      in the eigenbasis; ``()`` for the other kinds.
  """

  statistics: Any
  preconditioner: Any
  refit: Any = ()


class Block(NamedTuple):
  """A curvature block: the leaves it covers and its pure functions.

  Attributes:
    kind: ``"kronecker"``, ``"eigen_kronecker"``, ``"dense"`` or
      ``"diagonal"``.
    leaves: indices (in ``jax.tree.leaves`` order) of the leaves it
      preconditions.
    init: ``() -> BlockState``.
    statistics: ``evidence -> statistic`` for one batch.
    refresh: ``(statistic estimate, damping) -> preconditioner``, or ``None``
      when the block uses its statistic directly.
    apply: ``(BlockState of estimates, vectors, damping) -> vectors``, with
      ``vectors`` the block's leaves of the direction.
    refit: ``(evidence, preconditioner) -> re-fitted diagonal``, or ``None``.
  """

  kind: str
  leaves: tuple
  init: Callable[[], BlockState]
  statistics: Callable[[Any], Any]
  refresh: Optional[Callable[[Any, Any], Any]]
  apply: Callable[[BlockState, tuple, Any], tuple]
  refit: Optional[Callable[[Any, Any], Any]] = None


# Shared numerical helpers -----------------------------------------------------


def accumulation_dtype(dtype):
  """Statistics, inverses and preconditioning run in at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def symmetric_eigh(matrix: Array):
  """``(eigenvectors, eigenvalues)`` of the symmetric part, ascending."""
  sym = 0.5 * (matrix + matrix.T)
  eigenvalues, eigenvectors = jnp.linalg.eigh(sym)
  return eigenvectors, eigenvalues


def spectral_function(eigenvectors: Array, values: Array) -> Array:
  """``Q diag(values) Qᵀ``."""
  return (eigenvectors * values) @ eigenvectors.T


def damped_inverse(matrix: Array, damping: Any) -> Array:
  """``(M + λI)⁻¹`` of a symmetric PSD ``M`` from its Cholesky factor.

  ``(M + λI)⁻¹ = L⁻ᵀ L⁻¹`` with ``L`` the Cholesky factor: one
  factorization, one triangular inverse and one product. On a CPU this is
  about 4× faster than ``cho_solve`` against the identity (two triangular
  solves with ``n`` right-hand sides) at ``n = 785`` and about 15× faster
  than ``eigh``.
  """
  if matrix.ndim == 1:  # A factor kept diagonal (see kronecker_block).
    return 1.0 / (matrix + damping)
  eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
  sym = 0.5 * (matrix + matrix.T) + damping * eye
  factor = jnp.linalg.cholesky(sym)
  inverse_factor = jax.scipy.linalg.solve_triangular(factor, eye, lower=True)
  return inverse_factor.T @ inverse_factor


def factor_trace(factor: Array) -> Array:
  """The trace of a factor, a matrix or the diagonal of one (a vector)."""
  return jnp.sum(factor) if factor.ndim == 1 else jnp.trace(factor)


def factor_product(left: Array, matrix: Array, right: Array) -> Array:
  """``left · matrix · right``; a 1-D factor is a diagonal matrix."""
  out = left[:, None] * matrix if left.ndim == 1 else left @ matrix
  return out * right[None, :] if right.ndim == 1 else out @ right


def trace_ratio(a: Array, g: Array, a_dim: int) -> Array:
  r"""π = sqrt((tr Ā / dim Ā) / (tr G / dim G)), 1 where undefined.

  ``a_dim`` is the used size of ``Ā`` (a layer without a bias leaves the
  homogeneous coordinate of the reserved factor unused).
  """
  ta = factor_trace(a) / a_dim
  tg = factor_trace(g) / g.shape[0]
  ok = (ta > 0) & (tg > 0) & jnp.isfinite(ta) & jnp.isfinite(tg)
  return jnp.where(ok, jnp.sqrt(jnp.where(ok, ta / tg, 1.0)), 1.0)


# Averaging ------------------------------------------------------------------


def average(old: Any, new: Any, count: Array, decay: Any, mode: str) -> Any:
  r"""One step of the running average of a statistic.

  ``count`` is the number of samples in the average *after* this one.

  * ``"ema"``: ``m ← β m + (1 − β) s``, read through :func:`estimate`'s
    bias correction ``m / (1 − βᵏ)``;
  * ``"schedule"``: ``m ← ε m + (1 − ε) s`` with ``ε = min(1 − 1/k, β)``
    (Martens & Grosse 2015, §5): an equal-weight mean of the first
    ``1/(1 − β)`` samples, an EMA after; no correction needed;
  * ``"sum"``: ``m ← m + s`` (AdaGrad, Shampoo's Algorithm 1);
  * ``"uncorrected_ema"``: the EMA without bias correction (Shampoo and
    SOAP statistics).
  """
  if mode == "sum":
    return jax.tree.map(lambda m, s: m + s.astype(m.dtype), old, new)

  def mix(m, s):
    weight = jnp.asarray(decay, m.dtype)
    if mode == "schedule":
      k = jnp.maximum(count, 1).astype(m.dtype)
      weight = jnp.minimum(1.0 - 1.0 / k, weight)
    return weight * m + (1.0 - weight) * s.astype(m.dtype)

  return jax.tree.map(mix, old, new)


def estimate(statistics: Any, count: Array, decay: Any, mode: str) -> Any:
  """The statistic's estimate: bias-corrected for ``"ema"``, else as is."""
  if mode != "ema":
    return statistics
  k = jnp.maximum(count, 1)

  def debias(m):
    return m / (1.0 - jnp.asarray(decay, m.dtype) ** k.astype(m.dtype))

  return jax.tree.map(debias, statistics)


def check_averaging(averaging: str, decay: Any) -> None:
  """Validates an ``averaging`` mode and its decay at construction."""
  _validation.check_choice("averaging", averaging, AVERAGING)
  if averaging != "sum":
    _validation.check_in_interval("decay", decay, 0.0, 1.0)


# The stages -------------------------------------------------------------------


def accumulate(blocks, states, evidence, count, decay, mode, accept=True):
  """Statistics of every block from one batch, averaged, all or none.

  Args:
    blocks: ``{name: Block}``.
    states: ``{name: BlockState}`` (may hold more names than ``blocks``).
    evidence: ``{name: evidence}`` for every block.
    count: accepted statistics before this batch.
    decay: the average's decay.
    mode: one of :data:`AVERAGING`.
    accept: a traced bool that can veto the batch (e.g. a non-finite value
      elsewhere in the step).

  Returns:
    ``(states, count, finite)``: a batch whose statistics are not all finite
    is discarded whole (``finite`` is False and nothing moves).
  """
  new = {name: block.statistics(evidence[name])
         for name, block in blocks.items()}
  finite = _validation.all_finite(new) & accept
  next_count = count + finite.astype(count.dtype)
  out = dict(states)
  for name, statistic in new.items():
    old = states[name].statistics
    mixed = average(old, statistic, next_count, decay, mode)
    kept = jax.tree.map(lambda m, o: jnp.where(finite, m, o), mixed, old)
    out[name] = states[name]._replace(statistics=kept)
  return out, next_count, finite


def refresh_due(count: Array, every: int, warmup: bool = True) -> Array:
  """Whether step ``count`` (0-based) refreshes: ``count % every == 0``.

  With ``warmup`` the first ``every`` steps also refresh at steps 1, 2, 4,
  8, … (a geometric warm-up), so the early steps do not precondition with
  the statistics of one batch for ``every`` steps.
  """
  periodic = count % every == 0
  if not warmup:
    return periodic
  power_of_two = (count & (count - 1)) == 0
  return periodic | ((count < every) & power_of_two)


def refresh(blocks, states, estimates, due, damping, statistics_count,
            axis_name: _validation.AxisName = None):
  """Refreshes every block's preconditioner under one ``lax.cond``.

  A block whose new preconditioner is not finite keeps its previous one
  (counted in the returned ``rejected``). Nothing is refreshed while the
  statistics hold no accepted sample (``statistics_count`` 0): the
  preconditioner stays the identity of ``init`` rather than being built
  from empty statistics. The step that brings the first accepted sample
  always refreshes, whatever the schedule, so a rejected first batch does
  not leave the identity in place for a whole period.

  With ``axis_name`` (inside ``jax.shard_map``) the refreshes are spread
  over the devices of that axis instead of every device computing all of
  them: :func:`assign_devices` gives each block to one device, greedily by
  cost; every device computes its own blocks and zeros for the others, and
  one ``psum`` gives every device all of them. The estimates must be the
  same on every device (they are, being ``pmean``-ed batch statistics).

  Returns:
    ``(states, rejected)``.
  """
  due = (due | (statistics_count == 1)) & (statistics_count > 0)
  names = [n for n, b in blocks.items() if b.refresh is not None]
  previous = {n: states[n].preconditioner for n in names}
  if axis_name is None:
    new_for = lambda: {n: blocks[n].refresh(estimates[n], damping)
                       for n in names}
  else:
    new_for = lambda: _distributed_refresh(
        {n: blocks[n].refresh for n in names}, estimates, damping,
        previous, axis_name)

  def compute():
    out, rejected = {}, jnp.zeros((), jnp.int32)
    for name, new in new_for().items():
      ok = _validation.all_finite(new)
      out[name] = jax.tree.map(
          lambda x, y, ok=ok: jnp.where(ok, x, y), new, previous[name])
      rejected = rejected + (~ok).astype(jnp.int32)
    return out, rejected

  def keep():
    return previous, jnp.zeros((), jnp.int32)

  if not names:
    return states, jnp.zeros((), jnp.int32)
  fresh, rejected = jax.lax.cond(due, compute, keep)
  out = dict(states)
  for name in names:
    out[name] = states[name]._replace(preconditioner=fresh[name])
  return out, rejected


def refresh_cost(estimate) -> int:
  """Flops-like cost of refreshing from ``estimate``: ``d³`` per square
  matrix (a Cholesky factor or an ``eigh``, times a stack's size), ``d``
  per vector (a factor kept diagonal)."""
  cost = 0
  for leaf in jax.tree.leaves(estimate):
    shape = np.shape(leaf)
    if len(shape) >= 2:
      cost += int(np.prod(shape[:-2], dtype=np.int64)) * int(shape[-1]) ** 3
    else:
      cost += int(np.prod(shape, dtype=np.int64))
  return cost


def assign_devices(costs: dict, num_devices: int) -> dict:
  """``{name: device}``: longest-processing-time-first greedy assignment.

  Blocks are taken by decreasing cost (ties by name) and each goes to the
  device with the least total cost so far (the lowest index on ties); the
  busiest device then has at most ``4/3`` of the optimal load (Graham,
  "Bounds on multiprocessing timing anomalies", 1969).

  Example:
    >>> from curvature import _blocks
    >>> _blocks.assign_devices({"a": 8, "b": 5, "c": 4, "d": 3}, 2)
    {'a': 0, 'b': 1, 'c': 1, 'd': 0}
  """
  loads = [0] * num_devices
  out = {}
  for name in sorted(costs, key=lambda n: (-costs[n], str(n))):
    device = min(range(num_devices), key=lambda d: (loads[d], d))
    out[name] = device
    loads[device] += costs[name]
  return {name: out[name] for name in costs}


def _distributed_refresh(refreshes, estimates, damping, previous, axis_name):
  """Every device refreshes its own blocks; one ``psum`` shares them.

  A device's blocks are computed under ``lax.cond`` on its index along
  ``axis_name`` (the others are zeros of the preconditioner's shape), so
  each device factorizes only what :func:`assign_devices` gave it.
  """
  num_devices = jax.lax.axis_size(axis_name)
  owner = assign_devices(
      {n: refresh_cost(estimates[n]) for n in refreshes}, num_devices)
  index = jax.lax.axis_index(axis_name)
  out = {}
  for name, fn in refreshes.items():
    zeros = jax.tree.map(jnp.zeros_like, previous[name])
    mine = jax.lax.cond(
        index == owner[name],
        lambda fn=fn, name=name, zeros=zeros: jax.tree.map(
            lambda x, z: x.astype(z.dtype),
            fn(estimates[name], damping), zeros),
        lambda zeros=zeros: zeros)
    out[name] = jax.lax.psum(mine, axis_name)
  return out


def refit(blocks, states, evidence, count, decay, mode, finite):
  """Re-fits the diagonal of every eigenbasis block in its current basis.

  Args:
    blocks: ``{name: Block}``.
    states: ``{name: BlockState}`` after the refresh.
    evidence: ``{name: evidence}``.
    count: accepted samples in the average after this one.
    decay: the re-fit average's decay.
    mode: its averaging mode (:data:`AVERAGING`).
    finite: whether this batch's statistics were accepted.

  Returns:
    The states with their ``refit`` averages moved.
  """
  out = dict(states)
  for name, block in blocks.items():
    if block.refit is None:
      continue
    state = states[name]
    new = block.refit(evidence[name], state.preconditioner)
    ok = finite & _validation.all_finite(new)
    mixed = average(state.refit, new, count, decay, mode)
    out[name] = state._replace(refit=jnp.where(ok, mixed, state.refit))
  return out


def estimates(blocks, states, count, decay, mode, refit_decay=None,
              refit_mode=None):
  """``{name: BlockState}`` with the statistics' (and refits') estimates.

  The re-fitted diagonals use ``refit_decay`` and ``refit_mode`` when given
  (SOAP's second moment has its own decay), else the statistics' own.
  """
  refit_decay = decay if refit_decay is None else refit_decay
  refit_mode = mode if refit_mode is None else refit_mode
  return {
      name: states[name]._replace(
          statistics=estimate(states[name].statistics, count, decay, mode),
          refit=estimate(states[name].refit, count, refit_decay, refit_mode))
      for name in blocks}


def precondition(blocks, states, vectors, damping):
  """The direction with every block's leaves preconditioned.

  Args:
    blocks: ``{name: Block}``.
    states: ``{name: BlockState}`` of estimates (see :func:`estimates`).
    vectors: the direction's leaves, a list in ``jax.tree.leaves`` order.
    damping: passed to each block's ``apply``.

  Returns:
    The list of leaves, preconditioned where a block covers them.
  """
  out = list(vectors)
  for name, block in blocks.items():
    parts = block.apply(states[name], tuple(vectors[i] for i in block.leaves),
                        damping)
    for i, part in zip(block.leaves, parts):
      # The leaf keeps the gradient's sharding (FSDP): a Kronecker product
      # over a split axis may come back split otherwise, and the direction
      # is used as a tangent of the parameters.
      out[i] = _sharding.shard_like(part.astype(vectors[i].dtype),
                                    vectors[i])
  return out


# Matrix views of leaves -------------------------------------------------------


class MatrixView(NamedTuple):
  """How a block's leaves map to one ``[rows, cols]`` matrix and back.

  Attributes:
    to_matrix: ``leaves -> [rows, cols]`` (a kernel, with its bias as an
      extra row when the layer has one).
    from_matrix: ``([rows, cols], leaves) -> leaves`` (the second argument
      gives the shapes).
  """

  to_matrix: Callable[[tuple], Array]
  from_matrix: Callable[[Array, tuple], tuple]


def reshape_view() -> MatrixView:
  """One leaf of rank ≥ 2 viewed as ``[prod(shape[:-1]), shape[-1]]``."""

  def to_matrix(leaves):
    (x,) = leaves
    return x.reshape(-1, x.shape[-1])

  def from_matrix(matrix, leaves):
    return (matrix.reshape(leaves[0].shape),)

  return MatrixView(to_matrix, from_matrix)


def matrix_shape(shape) -> Optional[tuple]:
  """``(rows, cols)`` of :func:`reshape_view`, or ``None`` below rank 2."""
  if len(shape) < 2:
    return None
  return int(np.prod(shape[:-1])), int(shape[-1])


# Kronecker blocks -------------------------------------------------------------


class KroneckerFactors(NamedTuple):
  """The two factors of a Kronecker block: ``a`` (rows), ``g`` (columns)."""

  a: Array
  g: Array


class KroneckerPreconditioner(NamedTuple):
  """A refreshed Kronecker block: ``U = left · M · right``.

  Attributes:
    left: the function of ``Ā`` applied on the left (``(Ā + πγI)⁻¹`` for
      K-FAC, ``(L + εI)^p`` for Shampoo).
    right: the function of ``G`` applied on the right.
  """

  left: Array
  right: Array


def _zeros_factors(a_dim, g_dim, dtype, diagonal=(False, False)):
  shape = lambda d, diag: (d,) if diag else (d, d)
  return KroneckerFactors(jnp.zeros(shape(a_dim, diagonal[0]), dtype),
                          jnp.zeros(shape(g_dim, diagonal[1]), dtype))


def _identity(dim, dtype, diag):
  return jnp.ones((dim,), dtype) if diag else jnp.eye(dim, dtype=dtype)


def eigen_factors(factors: KroneckerFactors):
  """``(Q_A, Λ_A, Q_G, Λ_G)`` of a pair of factors."""
  basis_a, eig_a = symmetric_eigh(factors.a)
  basis_g, eig_g = symmetric_eigh(factors.g)
  return basis_a, eig_a, basis_g, eig_g


def kronecker_block(
    leaves: tuple,
    a_dim: int,
    g_dim: int,
    dtype,
    *,
    statistics: Callable[[Any], KroneckerFactors],
    inverse: Callable[[KroneckerFactors, Any], KroneckerPreconditioner],
    view: MatrixView,
    diagonal: tuple = (False, False),
) -> Block:
  r"""A Kronecker block ``Ā ⊗ G``: ``U = f_A(Ā) · M · f_G(G)``.

  Args:
    leaves: the leaves covered (kernel, then bias if any).
    a_dim: side of ``Ā`` (rows of the matrix view).
    g_dim: side of ``G`` (columns).
    dtype: dtype of the factors.
    statistics: ``evidence -> KroneckerFactors`` of one batch.
    inverse: ``(factors, damping) -> KroneckerPreconditioner``, the refresh
      (:func:`factored_damped_inverse` for K-FAC, :func:`factor_roots` for
      Shampoo).
    view: the leaves as one matrix.
    diagonal: ``(Ā diagonal, G diagonal)``: a factor too large to keep
      whole (a vocabulary-sized side) is kept as its diagonal, a vector;
      ``inverse`` and ``apply`` treat it as a diagonal matrix.

  Returns:
    A :class:`Block` of kind ``"kronecker"``.
  """

  def init():
    return BlockState(
        _zeros_factors(a_dim, g_dim, dtype, diagonal),
        KroneckerPreconditioner(_identity(a_dim, dtype, diagonal[0]),
                                _identity(g_dim, dtype, diagonal[1])))

  def apply(state, vectors, damping):
    del damping
    pre = state.preconditioner
    matrix = view.to_matrix(vectors)
    dtype = jnp.promote_types(matrix.dtype, pre.left.dtype)
    product = factor_product(pre.left.astype(dtype), matrix.astype(dtype),
                             pre.right.astype(dtype))
    return view.from_matrix(product, vectors)

  return Block("kronecker", tuple(leaves), init, statistics, inverse, apply)


def factored_damped_inverse(a_used: int):
  r"""K-FAC's π-adjusted factored Tikhonov damping (Martens & Grosse, §6.3).

  ``(Ā + πγI)⁻¹ ⊗ (G + γ/π I)⁻¹`` with ``π² = (tr Ā/dim Ā)/(tr G/dim G)``,
  each inverse by one Cholesky factorization (:func:`damped_inverse`;
  several times cheaper than an ``eigh`` on a CPU). ``dim Ā`` is
  ``a_used``: a bias-less layer leaves the reserved homogeneous row of
  ``Ā`` zero, and the damping makes that row's inverse a harmless
  ``1/(πγ)`` that multiplies a zero row.
  """

  def inverse(factors, gamma):
    pi = trace_ratio(factors.a, factors.g, a_used)
    gamma = jnp.asarray(gamma, factors.a.dtype)
    return KroneckerPreconditioner(damped_inverse(factors.a, pi * gamma),
                                   damped_inverse(factors.g, gamma / pi))

  return inverse


def factor_roots(power: float):
  """Shampoo's ``(L + εI)^p`` and ``(R + εI)^p`` (``p = −1/4``), by ``eigh``."""

  def inverse(factors, epsilon):
    basis_a, eig_a, basis_g, eig_g = eigen_factors(factors)
    epsilon = jnp.asarray(epsilon, eig_a.dtype)
    root = lambda e: jnp.power(jnp.maximum(e, 0.0) + epsilon, power)
    return KroneckerPreconditioner(spectral_function(basis_a, root(eig_a)),
                                   spectral_function(basis_g, root(eig_g)))

  return inverse


# Eigenbasis blocks ------------------------------------------------------------


class Eigenbasis(NamedTuple):
  """A refreshed eigenbasis block: ``Q_A`` and ``Q_G`` (columns)."""

  basis_a: Array
  basis_g: Array


def rotate(basis: Eigenbasis, matrix: Array) -> Array:
  """``Q_Aᵀ M Q_G``: a matrix in the eigenbasis."""
  return basis.basis_a.T @ matrix @ basis.basis_g


def rotate_back(basis: Eigenbasis, matrix: Array) -> Array:
  """``Q_A M Q_Gᵀ``."""
  return basis.basis_a @ matrix @ basis.basis_g.T


def eigen_kronecker_block(
    leaves: tuple,
    a_dim: int,
    g_dim: int,
    dtype,
    *,
    statistics: Callable[[Any], KroneckerFactors],
    refit: Callable[[Any, Eigenbasis], Array],
    view: MatrixView,
    power: Any = 1.0,
    damping_in_root: bool = True,
) -> Block:
  r"""Kronecker eigenbasis with a re-fitted diagonal (EKFAC, SOAP).

  .. math::
    U = Q_A\,\Big[\frac{Q_A^\top M Q_G}{(s + \lambda_{in})^{p} +
        \lambda_{out}}\Big]\,Q_G^\top

  with ``Q_A, Q_G`` the eigenvectors of ``Ā`` and ``G`` (refreshed every
  ``k`` steps) and ``s`` the running average of the diagonal re-fitted in
  that basis every step (EKFAC: per-example projected gradients squared;
  SOAP: the projected batch gradient squared, Adam's second moment). The
  re-fitted average is carried unchanged across refreshes of the basis, as
  both papers do.

  Args:
    leaves: the leaves covered.
    a_dim: side of ``Ā``.
    g_dim: side of ``G``.
    dtype: dtype of the statistics.
    statistics: ``evidence -> KroneckerFactors``.
    refit: ``(evidence, Eigenbasis) -> [a_dim, g_dim]`` diagonal statistic.
    view: the leaves as one matrix.
    power: ``p`` (1: EKFAC; 1/2: SOAP).
    damping_in_root: where the damping goes: ``λ_in`` (EKFAC) or
      ``λ_out`` (SOAP, Adam's ε).

  Returns:
    A :class:`Block` of kind ``"eigen_kronecker"``.
  """

  def init():
    eye = Eigenbasis(jnp.eye(a_dim, dtype=dtype), jnp.eye(g_dim, dtype=dtype))
    return BlockState(_zeros_factors(a_dim, g_dim, dtype), eye,
                      jnp.zeros((a_dim, g_dim), dtype))

  def refresh_fn(factors, damping):
    del damping
    basis_a, _, basis_g, _ = eigen_factors(factors)
    return Eigenbasis(basis_a, basis_g)

  def apply(state, vectors, damping):
    basis = state.preconditioner
    matrix = view.to_matrix(vectors)
    dtype = jnp.promote_types(matrix.dtype, basis.basis_a.dtype)
    rotated = rotate(basis, matrix.astype(dtype))
    damping = jnp.asarray(damping, dtype)
    scaled = _diagonal.precondition(
        rotated, jnp.maximum(state.refit.astype(dtype), 0.0), power=power,
        damping=0.0 if damping_in_root else damping,
        damping_in_root=damping if damping_in_root else 0.0)
    return view.from_matrix(rotate_back(basis, scaled), vectors)

  return Block("eigen_kronecker", tuple(leaves), init, statistics, refresh_fn,
               apply, refit)


def stacked_block(block: Block, size: int, evidence_axes=0) -> Block:
  """``size`` independent copies of ``block``, one per slice of its leaves.

  The block of a layer inside a ``scan`` stack (Flax ``nn.scan``,
  ``nnx.scan``): its leaves have the stack as leading axis, and every stage
  is ``jax.vmap``-ed over it, so each layer of the stack has its own
  statistics and preconditioner.

  Args:
    block: the block of one slice.
    size: the number of slices (the leaves' leading axis).
    evidence_axes: ``in_axes`` of the evidence for ``jax.vmap`` (0, or a
      pytree prefix with ``None`` for static entries).

  Returns:
    A :class:`Block` of the same kind over the stacked leaves.
  """

  def init():
    return jax.tree.map(
        lambda x: jnp.broadcast_to(x, (size,) + x.shape).copy(), block.init())

  def statistics(evidence):
    return jax.vmap(block.statistics, in_axes=(evidence_axes,))(evidence)

  refresh = None
  if block.refresh is not None:
    slice_refresh = block.refresh

    def refresh(estimate, damping):
      # One slice at a time (lax.map), not vmap: a vmap-ed Cholesky or eigh
      # is one batched LAPACK call, which XLA:CPU (jax 0.10) splits over its
      # thread pool; two of them running at once deadlock that pool (the
      # K-FAC step of a scan-stacked transformer never returned). Refreshes
      # are rare, and each factorization is parallel inside LAPACK anyway.
      return jax.lax.map(lambda e: slice_refresh(e, damping), estimate)

  def apply(state, vectors, damping):
    return jax.vmap(block.apply, in_axes=(0, 0, None))(state, vectors,
                                                       damping)

  refit = None
  if block.refit is not None:
    def refit(evidence, preconditioner):
      return jax.vmap(block.refit, in_axes=(evidence_axes, 0))(
          evidence, preconditioner)

  return Block(block.kind, block.leaves, init, statistics, refresh, apply,
               refit)


# Dense and diagonal blocks ----------------------------------------------------


def split_flat(flat: Array, vectors: tuple) -> tuple:
  """A flat vector split and reshaped like ``vectors`` (C order)."""
  offsets = np.cumsum([v.size for v in vectors])[:-1]
  return tuple(part.reshape(v.shape)
               for part, v in zip(jnp.split(flat, offsets), vectors))


def dense_block(leaves: tuple, size: int, dtype) -> Block:
  r"""A full block ``(Ĉ_b + λI)⁻¹ g_b`` over a small group of leaves.

  The evidence is the group's ``[b, b]`` curvature block itself; the
  refresh is its damped inverse by Cholesky (:func:`damped_inverse`).
  """

  def init():
    return BlockState(jnp.zeros((size, size), dtype),
                      jnp.eye(size, dtype=dtype))

  def refresh_fn(block, damping):
    return damped_inverse(block, jnp.asarray(damping, block.dtype))

  def apply(state, vectors, damping):
    del damping
    # A dense block is small: FSDP-sharded leaves are gathered to flatten
    # them, and the solved leaves go back to their shardings.
    flat = jnp.concatenate([_sharding.replicate(v).reshape(-1)
                            for v in vectors])
    solved = state.preconditioner.astype(flat.dtype) @ flat
    return tuple(_sharding.shard_like(x, v)
                 for x, v in zip(split_flat(solved, vectors), vectors))

  return Block("dense", tuple(leaves), init, lambda block: block, refresh_fn,
               apply)


def diagonal_block(leaves: tuple, shapes: tuple, dtypes: tuple, *,
                   power: Any = 1.0, damping_in_root: bool = True,
                   like: Optional[tuple] = None) -> Block:
  r"""A diagonal block ``x / ((d̂ + λ_in)^p + λ_out)``, ``d̂`` the average.

  The evidence is the tuple of the leaves' diagonal estimates; there is no
  refresh (the current estimate is used every step). ``p = 1`` with the
  damping inside is a diagonal natural gradient; ``p = 1/2`` with it outside
  is Adam's denominator (:func:`curvature.precondition`). ``like``: the
  parameter leaves themselves, when known, so that ``init``'s statistics
  take their sharding (FSDP parameters keep sharded diagonals); an entry
  ``None`` there takes ``shapes`` instead.
  """

  def init():
    like_or_none = (None,) * len(shapes) if like is None else like
    return BlockState(tuple(
        jnp.zeros(s, d) if x is None else jnp.zeros_like(x, dtype=d)
        for x, s, d in zip(like_or_none, shapes, dtypes)), ())

  def apply(state, vectors, damping):
    out = []
    for v, d in zip(vectors, state.statistics):
      dtype = accumulation_dtype(v.dtype)
      damp = jnp.asarray(damping, dtype)
      out.append(_diagonal.precondition(
          v.astype(dtype), jnp.maximum(d.astype(dtype), 0.0), power=power,
          damping=0.0 if damping_in_root else damp,
          damping_in_root=damp if damping_in_root else 0.0))
    return tuple(out)

  return Block("diagonal", tuple(leaves), init, lambda d: tuple(d), None,
               apply)


# Summaries -------------------------------------------------------------------


def leaf_paths(params: Any) -> list:
  """``"a/b/0/kernel"``-style names of the leaves of ``params``."""
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  return ["/".join(_key_name(k) for k in path) for path, _ in paths]


def _key_name(key) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


class BlockRow(NamedTuple):
  """One row of a block summary: the block a parameter leaf gets, and why.

  Shared by :func:`kfac_blocks` and :func:`curvature.block_diagonal_blocks`.

  Attributes:
    path: the leaf's path, e.g. ``"params/Dense_0/kernel"``.
    shape: the leaf's shape.
    block: ``"dense"``, ``"conv"``, ``"bias of <kernel path>"`` (K-FAC) or
      ``"dense"`` (a full block), or ``"diagonal"``.
    factors: ``(dim A, dim G)`` for a Kronecker kernel, else ``None``.
    reason: why the leaf got this block.
    index: position of a full dense block (block-diagonal), else ``None``.
    size: side of the full dense block, or the leaf's size.
    members: paths of the leaves sharing the block, in block order.
  """

  path: str
  shape: tuple
  block: str
  factors: Optional[tuple]
  reason: str
  index: Optional[int] = None
  size: int = 0
  members: tuple = ()
