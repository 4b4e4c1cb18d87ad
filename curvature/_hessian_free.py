"""Hessian-free optimization, damped Newton, Gauss-Newton, Levenberg-Marquardt.

All of them are one transform, :func:`scale_by_hessian_free`: solve the damped
curvature system ``(C + λI) p = −g`` with conjugate gradient, where ``C`` is a
curvature matrix from :data:`curvature.CURVATURES`, and adapt ``λ`` from how
well the quadratic model predicted the actual change of the objective. The
aliases fix which matrix and which of Martens' devices are used:

=========================  ==============  ================  ==============
alias                      curvature ``C``  damping ``λ``     CG
=========================  ==============  ================  ==============
:func:`hessian_free`       GGN             LM-adapted        Martens: warm
                                                             start, relative
                                                             progress stop,
                                                             backtracking
:func:`gauss_newton`       GGN             fixed (0)         solved to tol
:func:`levenberg_marquardt`  GGN           LM-adapted        solved to tol
:func:`newton`             Hessian         fixed (0)         solved to tol
:func:`damped_newton`      Hessian         LM-adapted        solved to tol
=========================  ==============  ================  ==============
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from curvature import _block_diagonal
from curvature import _blocks
from curvature import _cg
from curvature import _damping
from curvature import _diagonal
from curvature import _kfac
from curvature import _losses
from curvature import _optax_typed
from curvature import _products
from curvature import _taylor
from curvature import _validation

Array = jax.Array
Params = Any


class HessianFreeInfo(NamedTuple):
  """Statistics of :func:`scale_by_hessian_free`'s last step.

  Attributes:
    rejected_steps: how many steps were rejected because the gradient, the
      loss or a curvature product was not finite (cumulative).
    objective_value: the objective ``f(θ)`` at the last step (not named
      ``value``, which optax's line searches look up in the state).
    reduction_ratio: ``ρ`` of the last step (``−∞`` if it was rejected).
    cg_iterations: CG iterations of the last step.
    cg_status: a :class:`curvature.CGStatus` of the last step.
    step_size: the line-search step ``α`` of the last step (0: no step).
    loss_evaluations: objective evaluations of the last step beyond the
      linearization (backtracking, line search, full-batch value).
    preconditioner_breakdowns: solves in which the preconditioner gave a
      non-finite or non-positive ``rᵀM⁻¹r`` and CG fell back to plain CG
      (cumulative).
  """

  rejected_steps: Array
  objective_value: Array
  reduction_ratio: Array
  cg_iterations: Array
  cg_status: Array
  step_size: Array
  loss_evaluations: Array
  preconditioner_breakdowns: Array


def _info_field(name: str):
  """A read-only ``state.<name>`` for ``state.info.<name>``."""
  return property(lambda state: getattr(state.info, name),
                  doc=f"``info.{name}`` (read-only shorthand).")


class ScaleByHessianFreeState(NamedTuple):
  """State of :func:`scale_by_hessian_free`.

  The statistics of the last step are in ``info``; each of them is also
  readable as ``state.<name>`` (``state.cg_iterations`` is
  ``state.info.cg_iterations``).

  Attributes:
    count: number of ``update`` calls.
    damping: the current Tikhonov damping ``λ``.
    previous_solution: the last step's final, un-backtracked CG iterate,
      the warm start of the next solve.
    key: PRNG key for sampled curvature.
    info: a :class:`HessianFreeInfo`: ``ρ``, CG iterations and status, the
      step size, rejected steps and the other statistics.
    preconditioner_state: the CG preconditioner's statistics:
      a :class:`curvature.ScaleByKfacState` for ``"kfac"``, the dense blocks
      and diagonal for ``"block_diagonal"``, ``()`` otherwise.
  """

  count: Array
  damping: Array
  previous_solution: Params
  key: Array
  info: HessianFreeInfo
  preconditioner_state: Any

  rejected_steps = _info_field("rejected_steps")
  objective_value = _info_field("objective_value")
  reduction_ratio = _info_field("reduction_ratio")
  cg_iterations = _info_field("cg_iterations")
  cg_status = _info_field("cg_status")
  step_size = _info_field("step_size")
  loss_evaluations = _info_field("loss_evaluations")
  preconditioner_breakdowns = _info_field("preconditioner_breakdowns")


def _cast(tree: Params, dtype) -> Params:
  return jax.tree.map(lambda x: jnp.asarray(x).astype(dtype), tree)


def _last_examples(batch, num_examples: int):
  """The last ``num_examples`` examples of ``batch`` (scalars kept)."""
  return _products.map_examples(
      lambda x: x[x.shape[0] - num_examples:], batch)


class _Candidate(NamedTuple):
  step: Params
  value: Array  # f(θ + step)
  model: Array  # q(step) − q(0), damping included
  evaluations: Array


def _backtrack(cg: _cg.CGResult, evaluate: Callable[[Params], Array]):
  """Walks back from the last CG iterate while the objective keeps falling.

  Martens (2010) §4.6: the stored iterates ``x_{⌈1.3ʲ⌉}`` are tried from the
  last one backwards; the walk stops at the first that is no better.
  """
  # Backtracking solves with record_iterates=True, which fills these.
  assert (cg.num_recorded is not None and cg.recorded_iterations is not None
          and cg.recorded_values is not None)
  recorded_values = cg.recorded_values
  last = cg.num_recorded - 1
  last = jnp.where(
      (last >= 0) & (cg.recorded_iterations[jnp.maximum(last, 0)]
                     == cg.iterations),
      last - 1,
      last,
  )
  final_value = evaluate(cg.x)

  def stored(index):
    return jax.tree.map(lambda buf: buf[index], cg.recorded)

  def cond(carry):
    index, _, done = carry
    return (index >= 0) & ~done

  def body(carry):
    index, best, _ = carry
    candidate = _Candidate(
        stored(index), evaluate(stored(index)), recorded_values[index],
        best.evaluations + 1)
    better = candidate.value < best.value
    best = jax.tree.map(
        lambda a, b: jnp.where(better, a, b),
        candidate,
        best._replace(evaluations=candidate.evaluations),
    )
    return index - 1, best, ~better

  init_best = _Candidate(cg.x, final_value, cg.quadratic_value,
                         jnp.ones((), jnp.int32))
  _, best, _ = jax.lax.while_loop(
      cond, body, (last, init_best, jnp.zeros((), bool))
  )
  return best


def _armijo(evaluate, step, value_at_step, value, slope, *, decay, c,
            max_steps):
  """Backtracking line search: the largest ``α = decayᵏ`` that decreases enough.

  Tries ``α = 1`` (already evaluated), then ``α ← decay·α`` while
  ``f(θ + αp) > f(θ) + c·α·gᵀp``, at most ``max_steps`` times; if none
  passes (or ``gᵀp ≥ 0``) it returns ``α = 0``: no step (Martens &
  Sutskever 2012, §8.8).
  """

  def sufficient(alpha, f_alpha):
    return f_alpha <= value + c * alpha * slope

  def cond(carry):
    alpha, f_alpha, tries = carry
    return ~sufficient(alpha, f_alpha) & (tries < max_steps)

  def body(carry):
    alpha, _, tries = carry
    alpha = alpha * decay
    return alpha, evaluate(optax.tree.scale(alpha, step)), tries + 1

  one = jnp.ones((), value.dtype)
  alpha, f_alpha, tries = jax.lax.while_loop(
      cond, body, (one, value_at_step, jnp.zeros((), jnp.int32))
  )
  accepted = sufficient(alpha, f_alpha) & (slope < 0)
  return jnp.where(accepted, alpha, 0.0), tries


def _diagonal_preconditioner(
    predict_fn, loss, params, batch, damping, l2_reg, exponent, targets_fn,
    axis_name
):
  """Martens' (2010) ``M = [diag(1/N Σ gᵢ²) + (λ + η) I]^ξ``: ``r ↦ M⁻¹r``."""
  diagonal = _products.empirical_fisher_diagonal(
      predict_fn, loss, params, batch, targets_fn=targets_fn,
      axis_name=axis_name
  )
  return lambda r: _diagonal.precondition(
      r, diagonal, power=exponent, damping_in_root=damping + l2_reg)


PRECONDITIONERS = (None, "diagonal", "kfac", "block_diagonal")
"""CG preconditioners of :func:`scale_by_hessian_free` (``None``: plain CG)."""


class _Preconditioner(NamedTuple):
  """A CG preconditioner: ``init(params) -> state`` and
  ``update(state, params, batch, damping, key) -> (state, r ↦ M⁻¹r)``."""

  init: Callable[[Params], Any]
  update: Callable[..., Any]


def _no_preconditioner():
  return _Preconditioner(lambda params: (),
                         lambda state, *args: (state, None))


def _martens_diagonal(predict_fn, loss, l2_reg, exponent, targets_fn,
                      axis_name):
  """``"diagonal"``: Martens' ``[diag(Σgᵢ²)/N + λ + η]^ξ``, fresh every step."""

  def update(state, params, batch, damping, key):
    del key
    return state, _diagonal_preconditioner(
        predict_fn, loss, params, batch, damping, l2_reg, exponent,
        targets_fn, axis_name)

  return _Preconditioner(lambda params: (), update)


def _kfac_blocks(predict_fn, loss, l2_reg, every, decay, targets_fn, seed,
                 axis_name):
  """``"kfac"``: K-FAC's factored inverse, factors an EMA, refreshed every k."""
  core = _kfac.kfac_preconditioner(
      predict_fn, loss, decay=decay, l2_reg=l2_reg, inverse_every=every,
      targets_fn=targets_fn, seed=seed, axis_name=axis_name)

  def update(state, params, batch, damping, key):
    del key  # K-FAC keeps its own key in its state.
    return core.update(state, params, batch, damping)

  return _Preconditioner(core.init, update)


class _BlockDiagonalState(NamedTuple):
  count: Array
  statistics_count: Array
  blocks: tuple
  diagonal: Any


def _dense_blocks(predict_fn, loss, l2_reg, every, decay, max_block_size,
                  targets_fn, axis_name):
  """``"block_diagonal"``: a damped dense GGN block per small leaf.

  The leaves of at most ``max_block_size`` entries get their exact GGN
  block (``b`` products each), the others its diagonal, both computed only
  at a refresh (every ``every`` steps, under ``lax.cond``) and averaged as
  an EMA; the dense inverses are re-formed at the current ``λ + η`` then.
  """

  def core(params):
    plan = _block_diagonal._plan(params, max_block_size, "leaf")  # pylint: disable=protected-access
    dense, diagonal = _block_diagonal._core_blocks(plan, params)  # pylint: disable=protected-access
    return plan, dict(dense, diagonal=diagonal)

  def init(params):
    _, blocks = core(params)
    diagonal = blocks.pop("diagonal")
    zero = jnp.zeros((), jnp.int32)
    return _BlockDiagonalState(zero, zero,
                               tuple(b.init() for b in blocks.values()),
                               diagonal.init())

  def update(state, params, batch, damping, key):
    plan, blocks = core(params)
    states = {str(i): s for i, s in enumerate(state.blocks)}
    states["diagonal"] = state.diagonal

    def observe():
      estimate = _block_diagonal.block_diagonal_curvature(
          predict_fn, loss, params, batch, curvature="ggn",
          max_block_size=max_block_size, grouping="leaf", key=key,
          targets_fn=targets_fn, axis_name=axis_name)
      evidence = {str(i): b for i, b in enumerate(estimate.blocks)}
      evidence["diagonal"] = tuple(estimate.diagonal[i]
                                   for i in plan.diagonal)
      out, count, _ = _blocks.accumulate(
          blocks, states, evidence, state.statistics_count, decay, "ema")
      hats = _blocks.estimates(blocks, out, count, decay, "ema")
      out, _ = _blocks.refresh(
          blocks, out, {n: h.statistics for n, h in hats.items()},
          jnp.ones((), bool), damping + l2_reg, count)
      return out, count

    due = _blocks.refresh_due(state.count, every, warmup=False)
    states, count = jax.lax.cond(
        due, observe, lambda: (states, state.statistics_count))
    hats = _blocks.estimates(blocks, states, count, decay, "ema")
    treedef = jax.tree.structure(params)

    def precondition(vectors):
      return treedef.unflatten(_blocks.precondition(
          blocks, hats, jax.tree.leaves(vectors), damping + l2_reg))

    new = _BlockDiagonalState(
        _optax_typed.safe_increment(state.count), count,
        tuple(states[str(i)] for i in range(len(state.blocks))),
        states["diagonal"])
    return new, precondition

  return _Preconditioner(init, update)


def _check_preconditioner(preconditioner, diagonal_preconditioner):
  """The preconditioner's name, with the deprecated flag mapped to it."""
  if diagonal_preconditioner:
    if preconditioner not in (None, "diagonal"):
      raise ValueError(
          "diagonal_preconditioner=True (deprecated) asks for the diagonal"
          f" preconditioner, but preconditioner={preconditioner!r}: pass only"
          " `preconditioner=...`.")
    preconditioner = "diagonal"
  if preconditioner not in PRECONDITIONERS:
    raise ValueError(
        f"Unknown preconditioner {preconditioner!r}: choose one of"
        f" {PRECONDITIONERS} (None: plain CG).")
  return preconditioner


def _steepest_descent_at_first_negative_curvature(
    cg: _cg.CGResult, grad, damped_matvec, preconditioner
) -> _cg.CGResult:
  """Truncated Newton's fallback when CG's very first direction curves down.

  If ``pᵀAp ≤ 0`` already for the first CG direction, CG has no iterate
  beyond its start, and a zero step would stall the optimizer at the
  saddle. As in Newton-CG (Nocedal & Wright 2006, Algorithm 7.1) the
  (preconditioned) steepest-descent direction ``−M⁻¹g`` is taken instead,
  with its quadratic-model value for ``ρ``.
  """
  first = (cg.status == _cg.CGStatus.NEGATIVE_CURVATURE) & (cg.iterations == 0)

  def steepest_descent():
    direction = grad
    if preconditioner is not None:  # M⁻¹g, unless M broke down in CG.
      direction = optax.tree.where(cg.preconditioner_breakdown, grad,
                                   preconditioner(grad))
    step = optax.tree.scale(-1.0, direction)
    model = _taylor.second_order_change(grad, damped_matvec, step)
    return step, model.astype(cg.quadratic_value.dtype)

  step, model = jax.lax.cond(
      first, steepest_descent, lambda: (cg.x, cg.quadratic_value))
  return cg._replace(x=step, quadratic_value=model)


def _use_structural_damping(structural_damping, structural_fn) -> bool:
  """Checks the structural-damping arguments; whether the term is built.

  The term is left out entirely (bit-identical steps) when ``μ`` is a
  concrete 0 or no ``structural_fn`` is given; a traced ``μ`` (injected by
  ``inject_hyperparams``) with a ``structural_fn`` always builds it.
  """
  _validation.check_nonnegative(
      "structural_damping", structural_damping,
      "It is μ of Martens & Sutskever (2011), who use 1/30; 0 turns"
      " structural damping off.")
  if structural_fn is not None and not callable(structural_fn):
    raise TypeError(
        "`structural_fn` must be a function (params, batch) -> hidden"
        " states (a pytree of arrays with a leading example axis).")
  concrete = _validation.concrete_value(structural_damping)
  if structural_fn is None:
    if concrete is not None and float(concrete) > 0:
      raise ValueError(
          f"structural_damping={structural_damping!r} penalizes changes of"
          " the hidden states, but no `structural_fn` says what they are:"
          " pass `structural_fn=lambda params, batch: hidden_states`"
          " (e.g. the RNN's hidden states, [batch, time, hidden]), or"
          " structural_damping=0.")
    return False
  return concrete is None or float(concrete) != 0.0


def _check_hidden_states(hidden, num_examples: int) -> None:
  """Trace-time check of ``structural_fn``'s output against the batch."""
  leaves = jax.tree_util.tree_flatten_with_path(hidden)[0]
  if not leaves:
    raise ValueError(
        "structural_fn(params, batch) returned no arrays: return the hidden"
        " states whose change structural damping penalizes.")
  for path, leaf in leaves:
    name = "hidden" + jax.tree_util.keystr(path)
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise TypeError(
          f"structural_fn(params, batch) returned {name} of dtype"
          f" {jnp.result_type(leaf)}: return floating-point hidden states.")
    if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != num_examples:
      raise ValueError(
          f"structural_fn(params, batch) returned {name} of shape"
          f" {jnp.shape(leaf)} for a batch of {num_examples} examples:"
          " every leaf needs one entry per example along its leading axis"
          " ([batch, ...], e.g. [batch, time, hidden]), computed from the"
          " `batch` it is given (the curvature batch, which may be a prefix"
          " of the update's batch), not from data it closes over.")


def _structural_matvec(structural_fn, params, batch, num_examples, axis_name):
  """``v ↦ (1/N) J_Sᵀ J_S v``: the GGN of ``½ mean‖S(θ + d) − S(θ)‖²``.

  ``J_S`` is the Jacobian of ``structural_fn(·, batch)`` at ``params``,
  linearized once with ``jax.linearize`` and transposed with
  ``jax.linear_transpose`` (Martens & Sutskever 2011, with the squared
  distance ``D``, whose Hessian is ``I``).
  """
  local_params = _products.as_varying(params, axis_name)
  hidden, jvp_fn = jax.linearize(lambda p: structural_fn(p, batch),
                                 local_params)
  _check_hidden_states(hidden, num_examples)
  transpose_fn = jax.linear_transpose(jvp_fn, local_params)

  def matvec(vector):
    tangent = jvp_fn(_products.as_varying(vector, axis_name))
    (product,) = transpose_fn(tangent)
    return _products.batch_mean(
        optax.tree.scale(1.0 / num_examples, product), axis_name)

  return matvec


class _Config(NamedTuple):
  """The checked settings of :func:`scale_by_hessian_free`."""

  predict_fn: Callable[..., Any]
  loss: _losses.Loss
  curvature: str
  initial_damping: Any
  adapt_damping: bool
  damping_increase: float
  damping_decrease: float
  rho_low: float
  rho_high: float
  min_damping: float
  max_damping: float
  l2_reg: float
  structural: bool  # Whether the structural-damping term is built.
  structural_damping: float
  structural_fn: Optional[Callable[..., Any]]
  max_cg_iterations: int
  cg_tol: float
  progress_tol: Optional[float]
  warm_start_decay: float
  backtracking: bool
  line_search: bool
  line_search_decay: float
  line_search_c: float
  max_line_search_steps: int
  reject_uphill: bool
  preconditioner: Optional[str]
  preconditioner_exponent: float
  preconditioner_every: int
  preconditioner_decay: float
  preconditioner_batch_size: Optional[int]
  preconditioner_block_size: int
  cg_budget_growth: Optional[float]
  curvature_batch_size: Optional[int]
  evaluation_batch_size: Optional[int]
  num_samples: int
  targets_fn: Callable[[Any], Any]
  seed: int
  axis_name: _validation.AxisName


def _check_damping_settings(s: dict) -> None:
  """Checks ``λ₀`` and the Levenberg-Marquardt settings."""
  if s["adapt_damping"]:
    _validation.check_not_schedule(
        "initial_damping", s["initial_damping"],
        "The damping is adapted by the Levenberg-Marquardt rule, so only its"
        " start is given: pass a number (Martens starts at 1.0). To follow"
        " a schedule, fix the damping: `adapt_damping=False` (in"
        " scale_by_hessian_free or natural_gradient) or"
        " `gauss_newton(damping=schedule)`.")
  elif callable(s["initial_damping"]):
    _validation.check_nonnegative(
        "initial_damping(0)", s["initial_damping"](0),
        "The schedule must give a damping >= 0.")
  _validation.check_nonnegative(
      "initial_damping", s["initial_damping"],
      "Use a damping >= 0 (Martens starts at 1.0).")
  _validation.check_nonnegative("l2_reg", s["l2_reg"])
  s["structural"] = _use_structural_damping(s["structural_damping"],
                                            s["structural_fn"])
  _validation.check_nonnegative("min_damping", s["min_damping"])
  _validation.check_positive("max_damping", s["max_damping"])
  _validation.check_ordered(
      "min_damping", s["min_damping"], "max_damping", s["max_damping"],
      "Swap them: λ is clipped to [min_damping, max_damping].")
  _validation.check_in_interval(
      "damping_decrease", s["damping_decrease"], 0.0, 1.0, closed_high=True)
  _validation.check_at_least(
      "damping_increase", s["damping_increase"], 1.0,
      "It multiplies λ after a poor step (ρ < rho_low); below 1 the damping"
      " would fall exactly when the model failed. Martens uses 1.5.")
  _validation.check_ordered(
      "rho_low", s["rho_low"], "rho_high", s["rho_high"],
      "λ grows below rho_low and shrinks above rho_high; Martens uses 0.25"
      " and 0.75.")


def _check_solver_settings(s: dict) -> None:
  """Checks the CG, line-search and batch-size settings."""
  _validation.check_nonnegative(
      "cg_tol", s["cg_tol"],
      "It is CG's relative-residual tolerance, e.g. 1e-10.")
  if s["progress_tol"] is not None:
    _validation.check_nonnegative(
        "progress_tol", s["progress_tol"],
        "Martens' relative-progress rule uses 5e-4; None disables it.")
  _validation.check_in_interval(
      "warm_start_decay", s["warm_start_decay"], 0.0, 1.0, closed_high=True)
  _validation.check_in_interval(
      "line_search_decay", s["line_search_decay"], 0, 1)
  _validation.check_in_interval("line_search_c", s["line_search_c"], 0, 1)
  for name in ("curvature_batch_size", "evaluation_batch_size"):
    if s[name] is not None:
      s[name] = _validation.check_static_int(name, s[name], 1)
  s["max_cg_iterations"] = _validation.check_static_int(
      "max_cg_iterations", s["max_cg_iterations"], 1)
  s["max_line_search_steps"] = _validation.check_static_int(
      "max_line_search_steps", s["max_line_search_steps"], 0)
  if s["curvature"] == "sampled_fisher":
    _validation.check_static_int("num_samples", s["num_samples"], 1)
  s["axis_name"] = _validation.check_axis_name(s["axis_name"])


def _check_preconditioner_settings(s: dict) -> None:
  """Checks the preconditioner settings and the CG budget."""
  for name in ("preconditioner_every", "preconditioner_block_size"):
    s[name] = _validation.check_static_int(name, s[name], 1)
  s["preconditioner_batch_size"] = _validation.check_optional_static_int(
      "preconditioner_batch_size", s["preconditioner_batch_size"], 1)
  _validation.check_in_interval(
      "preconditioner_decay", s["preconditioner_decay"], 0.0, 1.0)
  if s["cg_budget_growth"] is not None:
    _validation.check_at_least(
        "cg_budget_growth", s["cg_budget_growth"], 1.0,
        "The budget is this times the previous solve's iterations; use e.g."
        " 1.5, or None for the cap alone.")


def _checked_config(*, diagonal_preconditioner, **settings) -> _Config:
  """:func:`scale_by_hessian_free`'s arguments, checked, as a ``_Config``."""
  _validation.check_choice("curvature", settings["curvature"],
                           _products.CURVATURES)
  _check_damping_settings(settings)
  _check_solver_settings(settings)
  settings["preconditioner"] = _check_preconditioner(
      settings["preconditioner"], diagonal_preconditioner)
  _check_preconditioner_settings(settings)
  _losses.check_model(settings["predict_fn"], settings["loss"])
  return _Config(**settings)


def _preconditioner_stage(config: _Config) -> _Preconditioner:
  """The ``_Preconditioner`` that ``config.preconditioner`` names."""
  c = config
  if c.preconditioner == "diagonal":
    return _martens_diagonal(c.predict_fn, c.loss, c.l2_reg,
                             c.preconditioner_exponent, c.targets_fn,
                             c.axis_name)
  if c.preconditioner == "kfac":
    return _kfac_blocks(c.predict_fn, c.loss, c.l2_reg,
                        c.preconditioner_every, c.preconditioner_decay,
                        c.targets_fn, c.seed, c.axis_name)
  if c.preconditioner == "block_diagonal":
    return _dense_blocks(c.predict_fn, c.loss, c.l2_reg,
                         c.preconditioner_every, c.preconditioner_decay,
                         c.preconditioner_block_size, c.targets_fn,
                         c.axis_name)
  return _no_preconditioner()


# The stages of one step, in order ------------------------------------------


class _Batches(NamedTuple):
  """Stage 1's output: the parts of the batch each computation uses."""

  curvature: Any  # leading examples: curvature products
  evaluation: Any  # trailing examples: f for ρ, backtracking, line search
  statistics: Any  # leading examples of `curvature`: the preconditioner
  num_curvature: int
  whole: bool  # curvature and evaluation are the whole batch


def _split_batch(config: _Config, batch) -> _Batches:
  """Stage 1: the curvature, evaluation and preconditioner batches."""
  num_examples = _products.batch_size(batch, config.targets_fn)
  num_curvature = _products.subset_size(config.curvature_batch_size,
                                        num_examples)
  num_evaluation = _products.subset_size(config.evaluation_batch_size,
                                         num_examples)
  curvature_batch = _products.take_examples(batch, num_curvature)
  num_statistics = _products.subset_size(config.preconditioner_batch_size,
                                         num_curvature)
  return _Batches(
      curvature=curvature_batch,
      evaluation=_last_examples(batch, num_evaluation),
      statistics=_products.take_examples(curvature_batch, num_statistics),
      num_curvature=num_curvature,
      whole=num_curvature == num_evaluation == num_examples)


class _Model(NamedTuple):
  """Stage 2's output: the objective and its damped quadratic model at θ."""

  value: Array  # f(θ) on the evaluation batch
  grad: Params  # g + ηθ
  damped_matvec: Callable[[Params], Params]  # v ↦ (C + λI [+ μλ S]) v
  evaluate: Callable[[Params], Array]  # d ↦ f(θ + d) on the evaluation batch
  extra_evaluations: int  # 1 if f(θ) needed its own evaluation


def _linearize(config: _Config, params, grad, batches: _Batches, damping,
               key) -> _Model:
  """Stage 2: one linearization at ``θ``: ``f(θ)``, ``g + ηθ``, ``C + λI``."""
  c = config

  def evaluate(step):
    return _products.objective(
        c.predict_fn, c.loss, optax.tree.add(params, step),
        batches.evaluation, l2_reg=c.l2_reg, targets_fn=c.targets_fn,
        axis_name=c.axis_name)

  lin = _products.linearize(
      c.predict_fn, c.loss, params, batches.curvature, curvature=c.curvature,
      l2_reg=c.l2_reg, targets_fn=c.targets_fn, key=key,
      num_samples=c.num_samples, axis_name=c.axis_name)
  if batches.whole:
    value, extra_evaluations = lin.value, 0
  else:
    value, extra_evaluations = evaluate(optax.tree.zeros_like(params)), 1
  return _Model(value, optax.tree.add_scale(grad, c.l2_reg, params),
                _damped_matvec(c, lin.matvec, params, batches, damping),
                evaluate, extra_evaluations)


def _damped_matvec(config: _Config, matvec, params, batches: _Batches,
                   damping):
  """``v ↦ Cv + λv``, plus ``μλ (1/N) J_Sᵀ J_S v`` with structural damping."""

  def tikhonov(vector):
    return optax.tree.add_scale(matvec(vector), damping, vector)

  if not config.structural:
    return tikhonov
  structural = _structural_matvec(
      config.structural_fn, params, batches.curvature, batches.num_curvature,
      config.axis_name)
  weight = jnp.asarray(config.structural_damping, damping.dtype) * damping
  return lambda vector: optax.tree.add_scale(
      tikhonov(vector), weight, structural(vector))


def _cg_budget(config: _Config, state: ScaleByHessianFreeState):
  """The adaptive CG budget ``max(10, ⌈growth · i₋₁⌉)``, or ``None``."""
  if config.cg_budget_growth is None:
    return None
  budget = jnp.maximum(10, jnp.ceil(
      config.cg_budget_growth * state.info.cg_iterations).astype(jnp.int32))
  return jnp.where(state.count == 0, config.max_cg_iterations, budget)


def _solve(config: _Config, model: _Model, state: ScaleByHessianFreeState,
           precondition) -> _cg.CGResult:
  """Stage 3: warm-started CG on ``(C + λI) p = −g``, Newton-CG fallback."""
  cg = _cg.conjugate_gradient(
      model.damped_matvec,
      optax.tree.scale(-1.0, model.grad),
      optax.tree.scale(config.warm_start_decay, state.previous_solution),
      max_iterations=config.max_cg_iterations,
      tol=config.cg_tol,
      progress_tol=config.progress_tol,
      preconditioner=precondition,
      record_iterates=config.backtracking,
      budget=_cg_budget(config, state),
  )
  return _steepest_descent_at_first_negative_curvature(
      cg, model.grad, model.damped_matvec, precondition)


def _choose_step(config: _Config, cg: _cg.CGResult, model: _Model):
  """Stage 4: the best stored CG iterate (backtracking), or the last one."""
  if config.backtracking:
    return _backtrack(cg, model.evaluate)
  return _Candidate(cg.x, model.evaluate(cg.x), cg.quadratic_value,
                    jnp.ones((), jnp.int32))


def _line_search(config: _Config, model: _Model, chosen: _Candidate,
                 value_at_step):
  """Stage 5: ``(α, evaluations)``: Armijo, all-or-nothing, or ``α = 1``.

  ``reject_uphill`` takes the full step if ``f(θ + p) ≤ f(θ)`` and none
  otherwise: Armijo with ``c = 0`` and no shrinking.
  """
  if config.reject_uphill:
    decay, c, max_steps = config.line_search_decay, 0.0, 0
  elif config.line_search:
    decay, c, max_steps = (config.line_search_decay, config.line_search_c,
                           config.max_line_search_steps)
  else:
    return jnp.ones((), model.value.dtype), 0
  return _armijo(
      model.evaluate, chosen.step, value_at_step, model.value,
      _optax_typed.vdot(model.grad, chosen.step), decay=decay, c=c,
      max_steps=max_steps)


def _adapt_damping(config: _Config, damping, rho, rejected):
  """Stage 6: Levenberg-Marquardt on ``ρ``; a rejected step raises ``λ``."""
  if not config.adapt_damping:
    return damping
  bounds = (config.min_damping, config.max_damping)
  adapted = _damping.levenberg_marquardt(
      damping, rho, low=config.rho_low, high=config.rho_high,
      increase=config.damping_increase, decrease=config.damping_decrease,
      bounds=bounds)
  return _damping.raise_on_rejection(
      damping, adapted, rejected, increase=config.damping_increase,
      bounds=bounds)


class _Step(NamedTuple):
  """What stages 3-6 decided, for the next state."""

  cg: _cg.CGResult
  chosen: _Candidate
  rho: Array
  alpha: Array
  line_search_evaluations: Any
  rejected: Array
  damping: Array


def _next_state(state: ScaleByHessianFreeState, step: _Step, model: _Model,
                key, preconditioner_state) -> ScaleByHessianFreeState:
  """Stage 7: the new state; a rejected step resets the warm start."""
  dtype = state.info.objective_value.dtype
  rejected = step.rejected
  breakdown = step.cg.preconditioner_breakdown
  assert breakdown is not None  # conjugate_gradient always sets it
  info = HessianFreeInfo(
      rejected_steps=state.info.rejected_steps + rejected.astype(jnp.int32),
      objective_value=model.value.astype(dtype),
      reduction_ratio=jnp.where(rejected, -jnp.inf, step.rho).astype(dtype),
      cg_iterations=step.cg.iterations,
      cg_status=step.cg.status,
      step_size=jnp.where(rejected, 0.0, step.alpha).astype(dtype),
      loss_evaluations=(step.chosen.evaluations
                        + step.line_search_evaluations
                        + model.extra_evaluations).astype(jnp.int32),
      preconditioner_breakdowns=state.info.preconditioner_breakdowns
      + breakdown.astype(jnp.int32),
  )
  zeros = optax.tree.zeros_like(state.previous_solution)
  return ScaleByHessianFreeState(
      count=_optax_typed.safe_increment(state.count),
      damping=step.damping,
      previous_solution=optax.tree.where(rejected, zeros, step.cg.x),
      key=key,
      info=info,
      preconditioner_state=preconditioner_state,
  )


def _init_state(config: _Config, stage: _Preconditioner, params, damping_at):
  """The state before the first step."""
  _validation.check_params(params, "scale_by_hessian_free")
  dtype = _validation.compute_dtype(params)
  zero, int_zero = jnp.zeros((), dtype), jnp.zeros((), jnp.int32)
  return ScaleByHessianFreeState(
      count=int_zero,
      damping=damping_at(int_zero, dtype),
      previous_solution=optax.tree.zeros_like(params, dtype=dtype),
      key=jax.random.key(config.seed),
      info=HessianFreeInfo(
          rejected_steps=int_zero, objective_value=zero,
          reduction_ratio=zero, cg_iterations=int_zero, cg_status=int_zero,
          step_size=zero, loss_evaluations=int_zero,
          preconditioner_breakdowns=int_zero),
      preconditioner_state=stage.init(params),
  )


def scale_by_hessian_free(
    predict_fn: _products.PredictFn,
    loss: _losses.Loss,
    *,
    curvature: str = "ggn",
    initial_damping: float = 1.0,
    adapt_damping: bool = True,
    damping_increase: float = 1.5,
    damping_decrease: float = 2.0 / 3.0,
    rho_low: float = 0.25,
    rho_high: float = 0.75,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
    l2_reg: float = 0.0,
    structural_damping: float = 0.0,
    structural_fn: Optional[Callable[..., Any]] = None,
    max_cg_iterations: int = 250,
    cg_tol: float = 1e-10,
    progress_tol: Optional[float] = 5e-4,
    warm_start_decay: float = 0.95,
    backtracking: bool = True,
    line_search: bool = True,
    line_search_decay: float = 0.8,
    line_search_c: float = 1e-2,
    max_line_search_steps: int = 20,
    reject_uphill: bool = False,
    diagonal_preconditioner: bool = False,
    preconditioner_exponent: float = 0.75,
    preconditioner: Optional[str] = None,
    preconditioner_every: int = 10,
    preconditioner_decay: float = 0.95,
    preconditioner_batch_size: Optional[int] = None,
    preconditioner_block_size: int = 256,
    cg_budget_growth: Optional[float] = None,
    curvature_batch_size: Optional[int] = None,
    evaluation_batch_size: Optional[int] = None,
    num_samples: int = 1,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    seed: int = 0,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Hessian-free (truncated-Newton) direction with LM damping (Martens 2010).

  At each step, with gradient ``g`` (the incoming updates plus ``η θ``) and
  curvature ``C`` (the GGN by default, linearized once):

  .. math::
    p &\approx \arg\min_p\, q(p) = f(\theta) + g^\top p
        + \tfrac12 p^\top (C + \lambda I) p
        \quad\text{(CG from } x_0 = 0.95\, p_{\text{prev}}\text{)} \\
    \rho &= \frac{f(\theta + p) - f(\theta)}{q(p) - q(0)}, \quad
    \lambda \leftarrow \begin{cases} \tfrac32 \lambda & \rho < \tfrac14 \\
        \tfrac23 \lambda & \rho > \tfrac34 \end{cases} \\
    \text{update} &= -\alpha\, p

  ``p`` is the best of the stored CG iterates (backtracking), and ``α`` comes
  from an Armijo backtracking line search (``α = 1, 0.8, 0.8², …``). Like every
  ``scale_by_*`` the output is a descent direction *without* the minus sign:
  chain it with ``optax.scale_by_learning_rate(1.0)`` (as :func:`hessian_free`
  does) to step ``θ + αp``.

  **The contract.** The matrix is fixed by ``predict_fn(params, batch)`` and
  ``loss``; the targets are ``targets_fn(batch)`` (``batch["targets"]`` or
  ``batch[-1]`` by default). ``update(grads, state, params, batch=batch)``
  takes the gradient of the *mean* loss over ``batch`` (without the L2 term,
  which this transform adds) and the batch as an extra argument. Other extra
  arguments (``value``, ``grad``, ``value_fn`` of optax's line searches) are
  accepted and ignored, so the transform chains with
  ``optax.scale_by_zoom_linesearch``.

  **Dtypes.** Everything is computed in the parameters' dtype, but at least
  float32: float32 and float64 parameters keep their dtype throughout, while
  bfloat16 (or float16) parameters and gradients are upcast to float32 for
  the linearization, the curvature products, CG (iterates, residuals, inner
  products), the damping, ``ρ`` and the line search, and only the returned
  update is cast back to the parameters' dtype. The state (``damping``, the
  warm start ``previous_solution``, the statistics) is float32 then. The
  model runs on float32 copies of the parameters during ``update``; a
  ``predict_fn`` that casts its inputs to a fixed compute dtype keeps
  doing so.

  **Structural damping.** For recurrent networks Martens & Sutskever (2011)
  also penalize the change of the hidden states ``S(θ)``
  (``structural_fn(params, batch)``): the damped objective gains
  ``μλ · ½ mean_i ‖S_i(θ + d) − S_i(θ)‖²``, whose Gauss-Newton matrix
  enters the curvature product and the quadratic model (hence ``ρ``) as

  .. math::
    (C + \lambda I + \mu\lambda\, \tfrac1N J_S^\top J_S)\, v,

  with ``J_S`` the Jacobian of ``structural_fn`` at ``θ`` on the curvature
  batch of ``N`` examples (one more linearization per step, no dense
  matrix) and ``λ`` the current, adapted damping: the penalty grows and
  shrinks with the trust region. ``structural_fn`` must return a pytree of
  floating-point arrays with a leading example axis (``[batch, ...]``,
  checked at trace time); the squared change is summed over all other axes
  and averaged over the examples, like the loss. The CG preconditioners
  ignore the term. ``structural_damping=0`` (the default) leaves the
  transform exactly as without it.

  **Negative curvature.** CG stops at the first direction with
  ``pᵀ(C + λI)p ≤ 0`` (possible for the Hessian) and returns the iterate
  before it; if that happens at the very first direction the steepest-descent
  direction ``−M⁻¹g`` is used instead (Newton-CG), so a saddle does not stall
  the optimizer.

  **Preconditioners.** CG is preconditioned by ``M⁻¹`` (``preconditioner``):
  ``"diagonal"`` is Martens' (2010) ``[diag(1/N Σᵢ gᵢ²) + λ + η]^ξ`` from
  per-example gradients of the curvature batch; ``"kfac"`` is K-FAC's
  factored inverse ``(Ā + π√(λ+η) I)⁻¹ ⊗ (G + √(λ+η)/π I)⁻¹`` per layer
  (Martens & Grosse 2015, who suggest it as a CG preconditioner), with the
  factors an EMA kept in this state, taken every step on the curvature
  batch (a fraction of one product's cost) and inverted every
  ``preconditioner_every`` steps under ``lax.cond`` at the current ``λ``;
  ``"block_diagonal"`` is the damped exact GGN block of every small leaf and
  the GGN diagonal of the others, recomputed every ``preconditioner_every``
  steps. With ``M`` positive definite PCG solves the same system; a
  preconditioner that gives a non-finite or non-positive ``rᵀM⁻¹r`` is a
  breakdown: that solve continues as plain CG and
  ``info.preconditioner_breakdowns`` counts it.

  **Non-finite input.** If the gradient, the objective or a curvature product
  is NaN/Inf, the step is rejected: the update is zero, ``λ`` is multiplied by
  ``damping_increase``, the warm start is reset and ``info.rejected_steps``
  counts it. The parameters never see a NaN.

  **State.** ``damping``, ``count``, ``key``, the warm start and the
  preconditioner's statistics are fields of the state; the last step's
  statistics (``ρ``, CG iterations and status, ``α``, objective
  evaluations, rejected steps) are in ``state.info``, a
  :class:`HessianFreeInfo`, and each is also readable as
  ``state.<name>``.

  **Data parallelism.** Under ``jit`` with a sharded batch nothing is needed;
  inside ``jax.shard_map`` pass ``axis_name``: see the README's "Data
  parallelism" and "``shard_map``" sections (how the gradient must be taken
  there, too). ``curvature_batch_size`` and ``evaluation_batch_size`` then
  count examples per shard.

  Args:
    predict_fn: ``(params, batch) -> outputs`` with a leading batch axis.
    loss: a loss from :mod:`curvature.losses`.
    curvature: one of :data:`curvature.CURVATURES`; ``"ggn"`` as in Martens.
    initial_damping: ``λ₀ ≥ 0`` (1.0 in Martens' reference code), a number.
      With ``adapt_damping=False`` it may also be a schedule ``step ↦ λ``,
      and it is read at every step, so a value injected by
      ``curvature.inject_hyperparams`` is followed too; with adaptation only
      its value at ``init`` matters and a schedule is refused.
    adapt_damping: adapt ``λ`` by the Levenberg-Marquardt rule; if ``False``
      it stays at ``initial_damping``.
    damping_increase: the factor ``≥ 1`` for ``ρ < rho_low`` (3/2).
    damping_decrease: the factor in ``(0, 1]`` for ``ρ > rho_high`` (2/3).
    rho_low: see above (1/4); at most ``rho_high``.
    rho_high: see above (3/4).
    min_damping: floor of the adapted ``λ``; at most ``max_damping``.
    max_damping: ceiling of the adapted ``λ``.
    l2_reg: L2 coefficient ``η``: ``½η‖θ‖²`` is added to the objective,
      ``ηθ`` to the gradient and ``ηI`` to the curvature (Martens used 1e-5).
    structural_damping: ``μ ≥ 0`` of structural damping (see *Structural
      damping* above; Martens & Sutskever 2011 use 1/30); 0 (default): off.
    structural_fn: ``(params, batch) -> hidden states``, a pytree of
      arrays ``[batch, ...]``; required when ``structural_damping > 0``.
    max_cg_iterations: CG cap (250); a Python int.
    cg_tol: CG relative-residual tolerance, ``≥ 0``.
    progress_tol: Martens' relative-progress ``ε`` (5e-4); ``None`` disables
      that rule, and CG runs to ``cg_tol`` or the cap.
    warm_start_decay: CG starts from this times the previous solution (0.95);
      0 starts from zero.
    backtracking: choose among the CG iterates stored at ``⌈1.3ʲ⌉`` by the
      objective (Martens 2010 §4.6).
    line_search: run the Armijo line search; with ``False`` the step ``p`` is
      returned as is, e.g. for ``optax.scale_by_zoom_linesearch``.
    line_search_decay: step shrink factor (0.8).
    line_search_c: sufficient-decrease constant (1e-2).
    max_line_search_steps: shrinks before giving up and taking no step (20).
    reject_uphill: instead of the line search, take the full step ``p`` if
      ``f(θ + p) ≤ f(θ)`` and ``gᵀp < 0``, and no step otherwise
      (Levenberg-Marquardt's step rejection; ``ρ`` and ``λ`` as usual).
    diagonal_preconditioner: deprecated synonym of
      ``preconditioner="diagonal"``.
    preconditioner_exponent: ``ξ`` of the ``"diagonal"`` preconditioner
      (0.75).
    preconditioner: the CG preconditioner ``M`` (see *Preconditioners*
      above), one of :data:`PRECONDITIONERS`: ``None`` (plain CG),
      ``"diagonal"``, ``"kfac"`` or ``"block_diagonal"``.
    preconditioner_every: ``k``: ``"kfac"`` re-forms its inverses, and
      ``"block_diagonal"`` its blocks and inverses, every ``k`` steps (10).
    preconditioner_decay: EMA decay of the preconditioner's statistics
      (0.95, K-FAC's).
    preconditioner_batch_size: leading examples of the curvature batch on
      which the preconditioner's statistics are taken (``None``: all).
    preconditioner_block_size: ``"block_diagonal"``: leaves up to this size
      get a dense block, larger ones the GGN diagonal (256).
    cg_budget_growth: adaptive CG budget: each solve may take at most
      ``max(10, ⌈growth · i₋₁⌉)`` iterations, ``i₋₁`` those of the previous
      solve (``≤ max_cg_iterations``); ``None`` (default): only the cap.
    curvature_batch_size: the number of leading examples of each batch used
      for the curvature products, ``None`` for all (the gradient, ``ρ`` and
      the line search use the whole batch). Martens (2010) used a fraction of
      the gradient batch; shuffle the data so the prefix is a random subset.
    evaluation_batch_size: the number of *trailing* examples of each batch on
      which the objective is evaluated for ``ρ``, CG backtracking and the line
      search, ``None`` for all. With ``curvature_batch_size +
      evaluation_batch_size ≤`` the batch size, the two are disjoint, as
      Martens (2010) recommends.
    num_samples: sampled targets per example for ``"sampled_fisher"``.
    targets_fn: finds the targets in a batch.
    seed: seeds the PRNG key kept in the state.
    axis_name: for ``jax.shard_map``: the mesh axis name (a str, or a tuple
      of str) the batch is sharded over; see *Data parallelism* above.
      ``None`` (default): no cross-device reduction (plain ``jit``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> def predict(params, batch):
    ...   hidden = jnp.tanh(batch["inputs"] @ params["w1"])
    ...   return hidden @ params["w2"]
    >>> params = {"w1": 0.5 * jnp.ones((3, 4)), "w2": 0.1 * jnp.ones((4, 1))}
    >>> key = jax.random.key(0)
    >>> inputs = jax.random.normal(key, (32, 3))
    >>> batch = {"inputs": inputs, "targets": jnp.sin(inputs[:, :1])}
    >>> loss = curvature.losses.squared_error
    >>> opt = optax.chain(curvature.scale_by_hessian_free(predict, loss),
    ...                   optax.scale_by_learning_rate(1.0))
    >>> state = opt.init(params)
    >>> grads = jax.grad(lambda p: loss.value(predict(p, batch),
    ...                                       batch["targets"]))(params)
    >>> updates, state = opt.update(grads, state, params, batch=batch)
    >>> int(state[0].info.cg_iterations) > 0
    True

  References:
    Martens, "Deep learning via Hessian-free optimization", ICML 2010.
    Martens & Sutskever, "Learning recurrent neural networks with
    Hessian-free optimization", ICML 2011 (structural damping).
    Martens & Sutskever, "Training deep and recurrent networks with
    Hessian-free optimization", 2012.
    Schraudolph, "Fast curvature matrix-vector products", 2002.
    Goodfellow, Bengio & Courville, *Deep Learning*, MIT Press, 2016, ch. 8
    (Newton, damping as a trust region, Levenberg-Marquardt, CG).
  """
  config = _checked_config(**locals())
  stage = _preconditioner_stage(config)

  def damping_at(count, dtype):
    """The given damping at step ``count`` (a number, an injected value or
    a schedule)."""
    value = initial_damping(count) if callable(initial_damping) else (
        initial_damping)
    return jnp.asarray(value, dtype)

  def init_fn(params):
    return _init_state(config, stage, params, damping_at)

  def update_fn(updates, state, params=None, *, batch=None, **extra_args):
    del extra_args  # value, grad, value_fn: accepted for chaining.
    _validation.check_update_args("scale_by_hessian_free", updates, params,
                                  batch)
    assert params is not None  # check_update_args raised otherwise.
    _validation.check_state(params, state.previous_solution)
    dtype = state.damping.dtype  # params' dtype, at least float32.
    key, sample_key = jax.random.split(state.key)
    theta = _cast(params, dtype)
    batches = _split_batch(config, batch)
    # Adapted λ lives in the state; a fixed one is read from the argument
    # each step, so that a schedule or an injected value is followed.
    damping = state.damping if adapt_damping else damping_at(state.count,
                                                             dtype)
    grad = _products.batch_mean(_cast(updates, dtype), config.axis_name)
    model = _linearize(config, theta, grad, batches, damping, sample_key)
    preconditioner_state, precondition = stage.update(
        state.preconditioner_state, theta, batches.statistics, damping,
        sample_key)
    cg = _solve(config, model, state, precondition)
    chosen = _choose_step(config, cg, model)
    value_at_step = jnp.where(jnp.isnan(chosen.value), jnp.inf, chosen.value)
    rho = _taylor.reduction_ratio(value_at_step, model.value, chosen.model)
    alpha, tries = _line_search(config, model, chosen, value_at_step)
    direction, rejected = _damping.guard_step(
        jnp.isfinite(model.value) & _validation.all_finite(model.grad)
        & (cg.status != _cg.CGStatus.NON_FINITE),
        optax.tree.scale(-alpha, chosen.step))
    step = _Step(cg, chosen, rho, alpha, tries, rejected,
                 _adapt_damping(config, damping, rho, rejected))
    return optax.tree.cast_like(direction, params), _next_state(
        state, step, model, key, preconditioner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _with_learning_rate(transform, learning_rate, linesearch=None):
  _validation.check_learning_rate(learning_rate)
  parts = [transform, optax.scale_by_learning_rate(learning_rate)]
  if linesearch is not None:
    parts.append(linesearch)
  return optax.chain(*parts)


def hessian_free(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    predict_fn: _products.PredictFn,
    loss: _losses.Loss,
    curvature: str = "ggn",
    initial_damping: float = 1.0,
    damping_increase: float = 1.5,
    damping_decrease: float = 2.0 / 3.0,
    l2_reg: float = 0.0,
    structural_damping: float = 0.0,
    structural_fn: Optional[Callable[..., Any]] = None,
    max_cg_iterations: int = 250,
    progress_tol: Optional[float] = 5e-4,
    warm_start_decay: float = 0.95,
    backtracking: bool = True,
    diagonal_preconditioner: bool = False,
    preconditioner: Optional[str] = None,
    preconditioner_every: int = 10,
    preconditioner_batch_size: Optional[int] = None,
    cg_budget_growth: Optional[float] = None,
    curvature_batch_size: Optional[int] = None,
    evaluation_batch_size: Optional[int] = None,
    num_samples: int = 1,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    seed: int = 0,
    linesearch: Optional[optax.GradientTransformation] = None,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Martens' (2010) Hessian-free optimizer: damped Gauss-Newton solved by CG.

  ``θ ← θ − lr · (−α p)`` with ``p ≈ −(G + λI)⁻¹ g`` from warm-started,
  truncated, backtracked CG, ``λ`` adapted by Levenberg-Marquardt and ``α``
  from an Armijo line search; see :func:`scale_by_hessian_free` for the rule
  and every argument. Keep ``learning_rate = 1`` unless you know why: the
  damping and the line search already choose the step.

  Args:
    learning_rate: a finite scalar ``≥ 0`` or a schedule scaling the step
      (1.0).
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    curvature: the curvature matrix, ``"ggn"`` by default.
    initial_damping: ``λ₀``.
    damping_increase: LM factor for ``ρ < 1/4``.
    damping_decrease: LM factor for ``ρ > 3/4``.
    l2_reg: L2 coefficient.
    structural_damping: ``μ`` of structural damping for recurrent networks
      (Martens & Sutskever 2011 use 1/30): adds ``μλ (1/N) J_Sᵀ J_S`` to the
      damped curvature; 0 (default): off.
    structural_fn: ``(params, batch) -> hidden states`` (arrays
      ``[batch, ...]``), required with ``structural_damping > 0``.
    max_cg_iterations: CG cap.
    progress_tol: Martens' CG stopping ``ε``.
    warm_start_decay: CG warm-start factor.
    backtracking: CG-iterate backtracking.
    diagonal_preconditioner: deprecated: ``preconditioner="diagonal"``.
    preconditioner: the CG preconditioner: ``None``, ``"diagonal"``,
      ``"kfac"`` or ``"block_diagonal"``.
    preconditioner_every: steps between refreshes of the ``"kfac"`` and
      ``"block_diagonal"`` preconditioners.
    preconditioner_batch_size: leading examples of the curvature batch for
      the preconditioner's statistics.
    cg_budget_growth: adaptive CG budget (see :func:`scale_by_hessian_free`).
    curvature_batch_size: leading examples of the batch for curvature
      products (``None``: all).
    evaluation_batch_size: trailing examples of the batch on which ``ρ``,
      backtracking and the line search evaluate the objective (``None``:
      all).
    num_samples: samples for ``curvature="sampled_fisher"``.
    targets_fn: finds the targets in a batch.
    seed: PRNG seed.
    linesearch: an optax line search (e.g.
      ``optax.scale_by_zoom_linesearch(15)``) to use instead of the built-in
      Armijo search; it is chained after the learning rate, as in
      ``optax.lbfgs``, and needs ``value``, ``grad`` and ``value_fn`` extra
      arguments at ``update``.
    axis_name: for ``jax.shard_map``: the mesh axis (str or tuple of str)
      the batch is sharded over; objective values, gradient and curvature
      products are ``pmean``-ed over it (see :func:`scale_by_hessian_free`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> def predict(params, batch):
    ...   hidden = jnp.tanh(batch["inputs"] @ params["w1"])
    ...   return hidden @ params["w2"]
    >>> params = {"w1": 0.5 * jnp.ones((3, 4)), "w2": 0.1 * jnp.ones((4, 1))}
    >>> key = jax.random.key(0)
    >>> inputs = jax.random.normal(key, (32, 3))
    >>> batch = {"inputs": inputs, "targets": jnp.sin(inputs[:, :1])}
    >>> loss = curvature.losses.squared_error
    >>> opt = curvature.hessian_free(predict_fn=predict, loss=loss,
    ...                              l2_reg=1e-5)
    >>> state = opt.init(params)
    >>> loss_fn = lambda p: loss.value(predict(p, batch), batch["targets"])
    >>> step = jax.jit(lambda p, s: opt.update(jax.grad(loss_fn)(p), s, p,
    ...                                        batch=batch))
    >>> before = loss_fn(params)
    >>> for _ in range(3):
    ...   updates, state = step(params, state)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss_fn(params) < before)
    True

  References:
    Martens, "Deep learning via Hessian-free optimization", ICML 2010.
    Martens & Sutskever, "Learning recurrent neural networks with
    Hessian-free optimization", ICML 2011 (structural damping).
    Goodfellow, Bengio & Courville, *Deep Learning*, MIT Press, 2016, ch. 8
    (damping as a trust region).
  """
  transform = scale_by_hessian_free(
      predict_fn, loss, curvature=curvature, initial_damping=initial_damping,
      damping_increase=damping_increase, damping_decrease=damping_decrease,
      l2_reg=l2_reg, structural_damping=structural_damping,
      structural_fn=structural_fn, max_cg_iterations=max_cg_iterations,
      progress_tol=progress_tol, warm_start_decay=warm_start_decay,
      backtracking=backtracking, line_search=linesearch is None,
      diagonal_preconditioner=diagonal_preconditioner,
      preconditioner=preconditioner,
      preconditioner_every=preconditioner_every,
      preconditioner_batch_size=preconditioner_batch_size,
      cg_budget_growth=cg_budget_growth,
      curvature_batch_size=curvature_batch_size,
      evaluation_batch_size=evaluation_batch_size,
      num_samples=num_samples, targets_fn=targets_fn, seed=seed,
      axis_name=axis_name)
  return _with_learning_rate(transform, learning_rate, linesearch)


def _full_solve(predict_fn, loss, *, curvature, damping, adapt, l2_reg,
                max_cg_iterations, cg_tol, line_search, targets_fn,
                axis_name, reject_uphill=False):
  """A damped Newton-type step, CG solved to tolerance (no Martens devices)."""
  return scale_by_hessian_free(
      predict_fn, loss, curvature=curvature, initial_damping=damping,
      adapt_damping=adapt, l2_reg=l2_reg,
      max_cg_iterations=max_cg_iterations, cg_tol=cg_tol, progress_tol=None,
      warm_start_decay=0.0, backtracking=False, line_search=line_search,
      reject_uphill=reject_uphill, targets_fn=targets_fn,
      axis_name=axis_name)


def newton(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    predict_fn: _products.PredictFn,
    loss: _losses.Loss,
    l2_reg: float = 0.0,
    max_cg_iterations: int = 100,
    cg_tol: float = 1e-8,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Newton's method, ``θ ← θ − lr · H⁻¹ g``, with ``H⁻¹g`` solved by CG.

  Undamped, with no line search: the textbook method (Goodfellow, Bengio &
  Courville, *Deep Learning*, 2016, ch. 8). CG stops cleanly at a direction of
  non-positive curvature (a saddle or a maximum), returning the truncated
  Newton step built so far, or the steepest-descent direction if the very
  first direction curves down (Newton-CG); use :func:`damped_newton` where
  ``H`` may be indefinite.

  Args:
    learning_rate: step scale (1.0 for the pure Newton step).
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    l2_reg: L2 coefficient.
    max_cg_iterations: CG cap.
    cg_tol: CG relative-residual tolerance.
    targets_fn: finds the targets in a batch.
    axis_name: for ``jax.shard_map``: the mesh axis the batch is sharded
      over (see :func:`scale_by_hessian_free`); ``None``: no reduction.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Nocedal & Wright, "Numerical Optimization", 2006, ch. 7 (Newton-CG).
  """
  return _with_learning_rate(
      _full_solve(predict_fn, loss, curvature="hessian", damping=0.0,
                  adapt=False, l2_reg=l2_reg,
                  max_cg_iterations=max_cg_iterations, cg_tol=cg_tol,
                  line_search=False, targets_fn=targets_fn,
                  axis_name=axis_name),
      learning_rate)


def damped_newton(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    predict_fn: _products.PredictFn,
    loss: _losses.Loss,
    damping: float = 1.0,
    adapt_damping: bool = True,
    l2_reg: float = 0.0,
    max_cg_iterations: int = 100,
    cg_tol: float = 1e-8,
    line_search: bool = True,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Damped (regularized) Newton: ``θ ← θ − lr · α (H + λI)⁻¹ g``.

  ``(H + λI)⁻¹ g`` is solved by CG; ``λ`` follows the Levenberg-Marquardt
  rule on ``ρ``, so it behaves as a trust region (Goodfellow, Bengio &
  Courville, *Deep Learning*, 2016, ch. 8), and CG stops at non-positive
  curvature when ``H + λI`` is indefinite.

  Args:
    learning_rate: step scale.
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    damping: the initial ``λ``.
    adapt_damping: adapt ``λ`` by the LM rule; ``False`` keeps it fixed.
    l2_reg: L2 coefficient.
    max_cg_iterations: CG cap.
    cg_tol: CG relative-residual tolerance.
    line_search: Armijo line search on the objective.
    targets_fn: finds the targets in a batch.
    axis_name: for ``jax.shard_map``: the mesh axis the batch is sharded
      over (see :func:`scale_by_hessian_free`); ``None``: no reduction.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Levenberg, "A method for the solution of certain non-linear problems in
    least squares", 1944. Marquardt, "An algorithm for least-squares
    estimation of nonlinear parameters", 1963. Goodfellow, Bengio &
    Courville, *Deep Learning*, MIT Press, 2016, ch. 8 (regularized Newton).
  """
  return _with_learning_rate(
      _full_solve(predict_fn, loss, curvature="hessian", damping=damping,
                  adapt=adapt_damping, l2_reg=l2_reg,
                  max_cg_iterations=max_cg_iterations, cg_tol=cg_tol,
                  line_search=line_search, targets_fn=targets_fn,
                  axis_name=axis_name),
      learning_rate)


def gauss_newton(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    predict_fn: _products.PredictFn,
    loss: _losses.Loss,
    damping: float = 0.0,
    l2_reg: float = 0.0,
    max_cg_iterations: int = 100,
    cg_tol: float = 1e-8,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The (generalized) Gauss-Newton method: ``θ ← θ − lr · (G + λI)⁻¹ g``.

  ``G = Jᵀ ∇²_z L J`` is positive semi-definite for convex losses, so the
  step is a descent direction; ``λ`` is fixed (0 for the classic method). CG
  solves the system to ``cg_tol``.

  Args:
    learning_rate: step scale.
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    damping: a fixed Tikhonov ``λ``.
    l2_reg: L2 coefficient.
    max_cg_iterations: CG cap.
    cg_tol: CG relative-residual tolerance.
    targets_fn: finds the targets in a batch.
    axis_name: for ``jax.shard_map``: the mesh axis the batch is sharded
      over (see :func:`scale_by_hessian_free`); ``None``: no reduction.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Schraudolph, "Fast curvature matrix-vector products for second-order
    gradient descent", Neural Computation 2002 (the GGN). Goodfellow, Bengio
    & Courville, *Deep Learning*, MIT Press, 2016, ch. 8 (Gauss-Newton).
  """
  return _with_learning_rate(
      _full_solve(predict_fn, loss, curvature="ggn", damping=damping,
                  adapt=False, l2_reg=l2_reg,
                  max_cg_iterations=max_cg_iterations, cg_tol=cg_tol,
                  line_search=False, targets_fn=targets_fn,
                  axis_name=axis_name),
      learning_rate)


def levenberg_marquardt(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    predict_fn: _products.PredictFn,
    loss: _losses.Loss,
    damping: float = 1.0,
    l2_reg: float = 0.0,
    max_cg_iterations: int = 100,
    cg_tol: float = 1e-8,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Levenberg-Marquardt: Gauss-Newton with adapted damping and step rejection.

  ``p = −(G + λI)⁻¹ g`` solved by CG; the step is taken only if
  ``f(θ + p) ≤ f(θ)`` (otherwise no step), and ``λ`` is multiplied by 3/2
  when ``ρ < 1/4`` and by 2/3 when ``ρ > 3/4``.

  Args:
    learning_rate: step scale.
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    damping: the initial ``λ``.
    l2_reg: L2 coefficient.
    max_cg_iterations: CG cap.
    cg_tol: CG relative-residual tolerance.
    targets_fn: finds the targets in a batch.
    axis_name: for ``jax.shard_map``: the mesh axis the batch is sharded
      over (see :func:`scale_by_hessian_free`); ``None``: no reduction.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Levenberg, "A method for the solution of certain non-linear problems in
    least squares", 1944. Marquardt, "An algorithm for least-squares
    estimation of nonlinear parameters", 1963. Goodfellow, Bengio &
    Courville, *Deep Learning*, MIT Press, 2016, ch. 8.
  """
  return _with_learning_rate(
      _full_solve(predict_fn, loss, curvature="ggn", damping=damping,
                  adapt=True, l2_reg=l2_reg,
                  max_cg_iterations=max_cg_iterations, cg_tol=cg_tol,
                  line_search=False, reject_uphill=True, targets_fn=targets_fn,
                  axis_name=axis_name),
      learning_rate)
