"""Preconditioned conjugate gradient on pytrees, inside ``lax.while_loop``."""

import enum
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvature import _optax_typed
from curvature import _validation

Array = jax.Array
Params = Any

_RUNNING = -1


class CGStatus(enum.IntEnum):
  """Why :func:`conjugate_gradient` stopped (``CGResult.status``)."""

  CONVERGED = 0
  """The residual met the tolerance: ``‖b − Ax‖ ≤ tol · ‖b‖``."""
  STALLED = 1
  """Martens' relative-progress rule on the quadratic model fired."""
  MAX_ITERATIONS = 2
  """The iteration cap was reached."""
  NEGATIVE_CURVATURE = 3
  """A search direction had ``pᵀAp ≤ 0``; the last iterate is returned."""
  NON_FINITE = 4
  """A product or step was NaN/Inf; the last finite iterate is returned."""
  BUDGET = 5
  """The per-solve iteration budget (``budget`` below the cap) was reached."""


class CGResult(NamedTuple):
  """The result of :func:`conjugate_gradient`.

  Attributes:
    x: the solution (the last finite iterate).
    iterations: the number of CG steps taken.
    residual_norm: ``‖b − A x‖``.
    quadratic_value: ``φ(x) = ½ xᵀAx − bᵀx``.
    status: a :class:`CGStatus` value (int32).
    recorded: iterates stored at iterations ``recorded_iterations`` (a pytree
      whose leaves have a leading axis), or ``None`` if not recording.
    recorded_values: ``φ`` at each recorded iterate.
    recorded_iterations: the (static) iteration numbers of the slots.
    num_recorded: how many slots hold an iterate.
    preconditioner_breakdown: whether the preconditioner gave a non-finite
      or non-positive ``rᵀM⁻¹r`` for a nonzero ``r`` during the solve, after
      which CG continued unpreconditioned (always ``False`` without one).
  """

  x: Params
  iterations: Array
  residual_norm: Array
  quadratic_value: Array
  status: Array
  recorded: Optional[Params] = None
  recorded_values: Optional[Array] = None
  recorded_iterations: Optional[Array] = None
  num_recorded: Optional[Array] = None
  preconditioner_breakdown: Optional[Array] = None


def backtracking_schedule(max_iterations: int, base: float = 1.3) -> np.ndarray:
  """Iterations ``⌈baseʲ⌉`` (distinct, ``≤ max_iterations``) to store iterates.

  With ``base = 1.3`` this is Martens' (2010) schedule 2, 3, 4, 5, 7, 9, 11,
  14, 18, 24, 31, 40, 52, 67, 87, 113, 147, 191, 248.
  """
  schedule = []
  j = 1
  while True:
    i = math.ceil(base**j - 1e-9)
    if i > max_iterations:
      break
    if not schedule or i != schedule[-1]:
      schedule.append(i)
    j += 1
  return np.asarray(schedule, dtype=np.int32)


class _Records(NamedTuple):
  """The iterates stored so far (one extra scratch row at the end)."""

  iterates: Params  # leaves [num_slots + 1, ...]
  values: Array  # φ at each stored iterate, [num_slots + 1]
  count: Array  # how many slots hold an iterate


class _Recorder(NamedTuple):
  """Stores ``xᵢ`` at ``i = ⌈baseʲ⌉`` for backtracking (Martens 2010 §4.6).

  ``init`` / ``write`` / ``finish``; with ``schedule=None`` it records
  nothing and its records are ``None``.
  """

  schedule: Optional[np.ndarray]

  def init(self, x: Params, dtype) -> Optional[_Records]:
    if self.schedule is None:
      return None
    num_slots = len(self.schedule)
    # The last row takes the writes of unscheduled iterations. The buffers
    # are broadcast from the iterate, so they carry its sharding (and mesh)
    # and the in-place writes type-check under explicit sharding.
    iterates = jax.tree.map(
        lambda leaf: jnp.broadcast_to(
            jnp.zeros_like(leaf), (num_slots + 1,) + leaf.shape), x)
    return _Records(iterates, jnp.zeros(num_slots + 1, dtype),
                    jnp.zeros((), jnp.int32))

  def write(self, records: Optional[_Records], accept, iteration, x: Params,
            value) -> Optional[_Records]:
    """Stores ``x`` if ``accept`` and ``iteration`` is the next scheduled."""
    if records is None:
      return None
    assert self.schedule is not None  # records exist only with a schedule
    num_slots = len(self.schedule)
    due = jnp.asarray(self.schedule)[jnp.minimum(records.count,
                                                 num_slots - 1)]
    write = accept & (records.count < num_slots) & (iteration == due)
    row = jnp.where(write, records.count, num_slots)
    iterates = jax.tree.map(
        lambda buf, leaf: jax.lax.dynamic_update_index_in_dim(
            buf, leaf, row, 0), records.iterates, x)
    return _Records(iterates, records.values.at[row].set(value),
                    records.count + write.astype(jnp.int32))

  def finish(self, records: Optional[_Records]) -> dict[str, Any]:
    """The ``recorded*`` fields of :class:`CGResult` (none if not recording)."""
    if records is None:
      return {}
    assert self.schedule is not None  # records exist only with a schedule
    num_slots = len(self.schedule)
    return dict(
        recorded=jax.tree.map(lambda buf: buf[:num_slots], records.iterates),
        recorded_values=records.values[:num_slots],
        recorded_iterations=jnp.asarray(self.schedule),
        num_recorded=records.count)


class _LoopState(NamedTuple):
  x: Params
  r: Params
  p: Params
  rz: Array
  iteration: Array
  status: Array
  values: Array  # φ after each iteration, [max_iterations + 1].
  records: Optional[_Records]
  preconditioned: Array  # False after a breakdown of the preconditioner.


class _Solve(NamedTuple):
  """What stays fixed during one solve."""

  matvec: Callable[[Params], Params]
  precondition: Callable[[Params], Params]
  b: Params
  b_norm: Array
  tol: Any
  progress_tol: Optional[float]
  min_progress_window: int
  max_iterations: int
  limit: Any  # max_iterations, or the traced budget below it
  recorder: _Recorder


def _quadratic_value(x: Params, b: Params, r: Params) -> Array:
  # φ(x) = ½xᵀAx − bᵀx and Ax = b − r, so φ(x) = −½ xᵀ(b + r).
  return -0.5 * _optax_typed.vdot(x, optax.tree.add(b, r))


# How this differs from jax.scipy.sparse.linalg.cg (same PCG recurrence,
# same M ≈ A⁻¹ convention, same ‖r‖ ≤ tol·‖b‖ test with atol = 0):
#  1. It stops at pᵀAp ≤ 0 (NEGATIVE_CURVATURE) and at a non-finite product,
#     step or φ (NON_FINITE), returning the last accepted, finite iterate;
#     jax's divides by pᵀAp regardless and runs on with NaNs.
#  2. It has Martens' (2010) relative-progress stop on φ (STALLED) and a
#     traced per-solve `budget` (BUDGET) besides the cap.
#  3. It returns a CGResult: iterations, ‖r‖, φ(x), a CGStatus, the
#     recorded iterates for backtracking and the preconditioner breakdown
#     flag; jax's returns (x, None).
#  4. A preconditioner breakdown (rᵀM⁻¹r non-finite or ≤ 0 for r ≠ 0)
#     restarts along r and finishes unpreconditioned; jax's has no check.
#  5. With x0=None it skips the product A·0; jax's always forms b − A x0.
#  6. The cap is required (250 by default); jax's defaults to 10·size.
#  7. It is not wrapped in lax.custom_linear_solve, so it has no implicit
#     (adjoint-solve) derivative; jax's has. It also takes real floating
#     vectors only (jax's accepts complex), and checks at trace time that
#     matvec and the preconditioner keep b's tree and shapes.


def _stop_status(solve: _Solve, state: _LoopState, iteration, pap, r,
                 value, finite) -> Array:
  """Why the solve stops after ``iteration``, or ``_RUNNING``."""
  return jnp.select(
      [
          ~jnp.isfinite(pap),
          pap <= 0,
          ~finite,
          optax.tree.norm(r) <= solve.tol * solve.b_norm,
          _stalled(state.values, iteration, value, solve.progress_tol,
                   solve.min_progress_window),
          iteration >= solve.max_iterations,
          iteration >= solve.limit,
      ],
      [
          CGStatus.NON_FINITE,
          CGStatus.NEGATIVE_CURVATURE,
          CGStatus.NON_FINITE,
          CGStatus.CONVERGED,
          CGStatus.STALLED,
          CGStatus.MAX_ITERATIONS,
          CGStatus.BUDGET,
      ],
      _RUNNING,
  ).astype(jnp.int32)


def _iterate(solve: _Solve, state: _LoopState) -> _LoopState:
  """One PCG iteration; a rejected step keeps the last iterate."""
  ap = solve.matvec(state.p)
  pap = _optax_typed.vdot(state.p, ap)
  alpha = state.rz / pap
  x = optax.tree.add_scale(state.x, alpha, state.p)
  r = optax.tree.add_scale(state.r, -alpha, ap)
  z, rz, broke = _preconditioned(solve.precondition, r, state.preconditioned)
  # After a breakdown CG restarts along the plain residual (β = 0).
  beta = jnp.where(broke, 0.0, rz / state.rz)
  p = optax.tree.add_scale(z, beta, state.p)
  iteration = state.iteration + 1
  value = _quadratic_value(x, solve.b, r)
  finite = jnp.isfinite(pap) & jnp.isfinite(rz) & jnp.isfinite(value)
  accept = finite & ~(pap <= 0)
  status = _stop_status(solve, state, iteration, pap, r, value, finite)
  x = optax.tree.where(accept, x, state.x)
  r = optax.tree.where(accept, r, state.r)
  taken = jnp.where(accept, iteration, state.iteration)
  value = jnp.where(accept, value, state.values[state.iteration])
  return _LoopState(
      x=x, r=r, p=p, rz=rz, iteration=taken, status=status,
      values=state.values.at[taken].set(value),
      records=solve.recorder.write(state.records, accept, iteration, x,
                                   value),
      preconditioned=state.preconditioned & ~broke)


def conjugate_gradient(
    matvec: Callable[[Params], Params],
    b: Params,
    x0: Optional[Params] = None,
    *,
    max_iterations: int = 250,
    tol: float = 1e-5,
    progress_tol: Optional[float] = 5e-4,
    min_progress_window: int = 10,
    preconditioner: Optional[Callable[[Params], Params]] = None,
    record_iterates: bool = False,
    record_base: float = 1.3,
    budget: Optional[Array] = None,
) -> CGResult:
  r"""Solves ``A x = b`` by preconditioned conjugate gradient.

  Minimizes the quadratic model ``φ(x) = ½ xᵀAx − bᵀx``. Each iteration

  .. math::
    \alpha_i = \frac{r_i^\top z_i}{p_i^\top A p_i},\;
    x_{i+1} = x_i + \alpha_i p_i,\;
    r_{i+1} = r_i - \alpha_i A p_i,\;
    z_{i+1} = M^{-1} r_{i+1},\;
    p_{i+1} = z_{i+1} + \frac{r_{i+1}^\top z_{i+1}}{r_i^\top z_i} p_i .

  It stops at the first of:

  * ``‖r‖ ≤ tol · ‖b‖`` (``CONVERGED``);
  * Martens' relative-progress rule (``STALLED``): at iteration ``i`` with
    ``k = max(min_progress_window, ⌈0.1 i⌉)``, stop if ``i > k``,
    ``φ(xᵢ) < 0`` and ``(φ(xᵢ) − φ(x_{i−k})) / φ(xᵢ) < k · progress_tol``;
  * ``pᵀAp ≤ 0`` (``NEGATIVE_CURVATURE``): the iterate before that step is
    returned, so an indefinite ``A`` (a Hessian) gives a clean stop;
  * a non-finite product or step (``NON_FINITE``): the last finite iterate is
    returned;
  * ``max_iterations`` (``MAX_ITERATIONS``), or a smaller traced
    ``budget`` (``BUDGET``).

  **Preconditioner breakdown.** PCG needs ``rᵀM⁻¹r > 0`` for every nonzero
  residual (``M`` positive definite). If the preconditioner gives a
  non-finite or non-positive ``rᵀz``, CG restarts from the current iterate
  with the unpreconditioned residual as its direction and runs the rest of
  the solve with ``M = I``; ``CGResult.preconditioner_breakdown`` records it.

  The loop is a ``lax.while_loop``: it jits, and the iteration count is data
  dependent without recompiling.

  Args:
    matvec: ``v ↦ A v`` for a symmetric ``A`` (positive definite for a full
      solve).
    b: the right-hand side, a pytree.
    x0: the starting point (a warm start); zeros if ``None``.
    max_iterations: the cap on CG steps (a Python int).
    tol: relative residual tolerance; ``0`` disables it.
    progress_tol: Martens' ε (5e-4 in Martens 2010); ``None`` disables the
      rule.
    min_progress_window: the minimum ``k`` of the rule (10 in Martens 2010).
    preconditioner: ``r ↦ M⁻¹ r``, or ``None`` for ``M = I``.
    record_iterates: store ``xᵢ`` at ``i = ⌈record_baseʲ⌉`` for CG
      backtracking (Martens 2010 §4.6).
    record_base: the growth factor of the recording schedule.
    budget: a traced iteration limit ``≤ max_iterations`` for this solve
      (an adaptive budget), or ``None``.

  Returns:
    A :class:`CGResult`.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
    >>> b = jnp.array([1.0, 2.0])
    >>> result = curvature.conjugate_gradient(lambda v: A @ v, b)
    >>> [round(float(v), 4) for v in result.x], int(result.iterations)
    ([0.0909, 0.6364], 2)

  References:
    Hestenes & Stiefel, "Methods of conjugate gradients for solving linear
    systems", 1952. Martens, "Deep learning via Hessian-free optimization",
    ICML 2010 (stopping rule, warm start and backtracking).
    Goodfellow, Bengio & Courville, *Deep Learning*, MIT Press, 2016,
    ch. 8 (conjugate gradients).
  """
  max_iterations = _validation.check_static_int(
      "max_iterations", max_iterations, 1
  )
  _validation.check_nonnegative("tol", tol)
  if progress_tol is not None:
    _validation.check_nonnegative("progress_tol", progress_tol)
  x = optax.tree.zeros_like(b) if x0 is None else x0
  matvec, precondition, dtype = _checked_operators(matvec, preconditioner, b,
                                                   x)
  solve = _Solve(
      matvec, precondition, b, optax.tree.norm(b), tol, progress_tol,
      min_progress_window, max_iterations,
      max_iterations if budget is None else jnp.minimum(budget,
                                                        max_iterations),
      _Recorder(backtracking_schedule(max_iterations, record_base)
                if record_iterates else None))
  r = optax.tree.sub(b, matvec(x)) if x0 is not None else b
  preconditioned = jnp.asarray(preconditioner is not None)
  z, rz, broke = _preconditioned(precondition, r, preconditioned)
  converged = optax.tree.norm(r) <= tol * solve.b_norm
  init = _LoopState(
      x=x, r=r, p=z, rz=rz, iteration=jnp.zeros((), jnp.int32),
      status=jnp.where(converged, CGStatus.CONVERGED, _RUNNING).astype(
          jnp.int32),
      values=jnp.zeros(max_iterations + 1, dtype).at[0].set(
          _quadratic_value(x, b, r)),
      records=solve.recorder.init(x, dtype),
      preconditioned=preconditioned & ~broke)
  final = jax.lax.while_loop(lambda state: state.status == _RUNNING,
                             functools.partial(_iterate, solve), init)
  return CGResult(
      x=final.x,
      iterations=final.iteration,
      residual_norm=optax.tree.norm(final.r),
      quadratic_value=final.values[final.iteration],
      status=final.status,
      preconditioner_breakdown=jnp.asarray(preconditioner is not None)
      & ~final.preconditioned,
      **solve.recorder.finish(final.records))


def _preconditioned(precondition, r, use):
  """``(z, rᵀz, breakdown)`` with ``z = M⁻¹r`` while ``use``, else ``z = r``.

  A non-finite or non-positive ``rᵀM⁻¹r`` for a nonzero ``r`` is a
  breakdown: ``z = r`` is returned instead.
  """
  rr = _optax_typed.vdot(r, r)
  z = precondition(r)
  rz = _optax_typed.vdot(r, z)
  breakdown = use & (rr > 0) & ~(jnp.isfinite(rz) & (rz > 0))
  keep = use & ~breakdown
  return optax.tree.where(keep, z, r), jnp.where(keep, rz, rr), breakdown


def _stalled(values, iteration, value, progress_tol, min_window) -> Array:
  """Martens' (2010) relative-progress test at ``iteration``, ``φ = value``."""
  if progress_tol is None:
    return jnp.zeros((), bool)
  window = jnp.maximum(
      min_window, jnp.ceil(0.1 * iteration).astype(jnp.int32)
  )
  previous = values[jnp.maximum(iteration - window, 0)]
  progress = (value - previous) / value
  return (iteration > window) & (value < 0) & (progress < window * progress_tol)


def _checked_operators(matvec, preconditioner, b: Params, x: Params):
  """``(matvec, r ↦ M⁻¹r, dtype)``, checked against ``b`` at trace time."""
  if jax.tree.structure(b).num_leaves == 0:
    raise ValueError("`b` is an empty pytree: there is nothing to solve.")
  _check_same_structure(x, b)
  matvec = _checked(matvec, b, "matvec(v)")
  precondition = (lambda r: r) if preconditioner is None else _checked(
      preconditioner, b, "preconditioner(r)")
  dtype = jnp.result_type(*jax.tree.leaves(b))
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"CG needs floating-point vectors, got {dtype}.")
  return matvec, precondition, dtype


def _check_same_structure(x: Params, b: Params) -> None:
  if jax.tree.structure(x) != jax.tree.structure(b):
    raise ValueError(
        "`x0` and `b` must be pytrees of the same structure; got"
        f" {jax.tree.structure(x)} and {jax.tree.structure(b)}."
    )
  _validation.check_same_tree(
      b, x, "`x0`", "Start from a pytree like `b` (or pass x0=None).",
      reference="`b`")


def _checked(fn: Callable[[Params], Params], b: Params, what: str):
  """``fn`` whose output is checked against ``b`` at trace time."""

  def apply(vector):
    out = fn(vector)
    _validation.check_same_tree(
        b, out, what, "The operator must map pytrees like `b` to pytrees"
        " like `b`.", reference="`b`")
    return out

  return apply
