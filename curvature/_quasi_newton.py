"""Quasi-Newton methods (BFGS, L-BFGS) under the library's contract.

optax's ``lbfgs`` and line searches need three extra arguments at every
``update``: ``value``, ``grad`` and a ``value_fn`` to evaluate the objective
at trial points. Wrappers that forward only the gradient (Flax's
``nnx.Optimizer``, most training loops) cannot supply ``value_fn``.
:func:`with_objective` builds it from ``predict_fn``, ``loss`` and the
``batch=`` extra argument, like every curvature transform of this library,
and rejects non-finite steps. :func:`lbfgs` is ``optax.lbfgs`` wrapped so;
:func:`bfgs` is the dense method, with the inverse-Hessian update written out
in :func:`scale_by_bfgs`, under the same line search.

Each example fits linear least squares, built from a model
``predict(params, batch)``, its ``params``, a ``batch`` and
``loss_fn(params, batch)``::

  predict = lambda params, batch: batch["inputs"] @ params["w"]
  batch = {"inputs": jnp.asarray([[1., 0.], [1., 1.], [1., 2.]]),
           "targets": jnp.asarray([[1.], [3.], [5.]])}
  params = {"w": jnp.zeros((2, 1))}
  loss_fn = lambda params, batch: curvature.losses.squared_error.value(
      predict(params, batch), batch["targets"])
  grads = jax.grad(loss_fn)(params, batch)
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from curvature import _losses
from curvature import _optax_typed
from curvature import _products
from curvature import _sharding
from curvature import _validation

Array = jax.Array
Params = Any

def zoom_linesearch(curv_rtol: float = 0.9,
                    initial_guess_strategy: str = "one"):
  """``optax.scale_by_zoom_linesearch`` with optax's L-BFGS settings.

  20 steps at most; strong-Wolfe constant ``curv_rtol`` (0.9 for
  quasi-Newton, 0.1 for nonlinear CG: Nocedal & Wright 2006, §3.1).
  """
  return optax.scale_by_zoom_linesearch(
      max_linesearch_steps=20, curv_rtol=curv_rtol,
      initial_guess_strategy=initial_guess_strategy)


class WithObjectiveState(NamedTuple):
  """State of :func:`with_objective`.

  Attributes:
    inner: the wrapped transform's state.
    rejected_steps: steps rejected because the gradient, the objective or
      the line search's value or step was not finite.
    objective_value: the objective ``f(θ)`` at the last step.
  """

  inner: optax.OptState
  rejected_steps: Array
  objective_value: Array


def _line_search_finite(inner_state) -> Array:
  """Whether the line search ended at a finite value.

  It looks for the ``value`` fields of the inner state (the objective where
  optax's line searches stopped) and the zoom search's ``decrease_error``,
  which is infinite when every trial value was NaN or Inf (the search then
  returns a zero step).
  """
  finite = jnp.asarray(True)
  for name in ("value", "decrease_error"):
    for _, leaf in optax.tree.get_all_with_path(inner_state, name):
      finite &= jnp.all(jnp.isfinite(leaf))
  return finite


def with_objective(
    inner: optax.GradientTransformationExtraArgs,
    predict_fn: _products.PredictFn,
    loss: _losses.Loss,
    *,
    l2_reg: float = 0.0,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Gives a line-searched transform its ``value``, ``grad`` and ``value_fn``.

  With ``f(θ) = loss.value(predict_fn(θ, batch), y) + ½ η ‖θ‖²`` on the
  ``batch=`` extra argument of ``update``, the wrapped transform is called as

  .. math::
    u, s_{\text{inner}} = \text{inner.update}(g, s_{\text{inner}}, \theta;\;
        \text{value}=f(\theta),\ \text{grad}=g,\ \text{value\_fn}=f)

  so ``optax.scale_by_zoom_linesearch`` (or any transform that reads those
  three names) runs under ``update(grads, state, params, batch=batch)``. A
  ``value`` or ``grad`` given to ``update`` is used instead of recomputing it
  (``grad`` defaults to the incoming updates plus ``η θ``); ``value_fn`` is
  always built here.

  **Non-finite input.** If ``g`` or ``f(θ)`` is NaN/Inf, the inner transform
  is not run (its state, e.g. the L-BFGS memory, is kept) and the update is
  zero; if the line search ends at a non-finite value or step, its result is
  discarded the same way. ``rejected_steps`` counts both.

  Args:
    inner: a transform whose ``update`` takes ``value``, ``grad`` and
      ``value_fn``, e.g. ``optax.chain(optax.scale_by_lbfgs(),
      optax.scale(-1.0), optax.scale_by_zoom_linesearch(20))``.
    predict_fn: ``(params, batch) -> outputs`` with a leading batch axis.
    loss: a loss from :mod:`curvature.losses`.
    l2_reg: L2 coefficient ``η`` added to the objective and the gradient.
    targets_fn: finds the targets in a batch.
    axis_name: for ``jax.shard_map``: the mesh axis the batch is sharded
      over; the objective and the gradient are ``pmean``-ed over it.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

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
    >>> opt = curvature.with_objective(
    ...     optax.chain(optax.sgd(1.0), optax.scale_by_zoom_linesearch(15)),
    ...     predict, curvature.losses.squared_error)
    >>> state = opt.init(params)
    >>> updates, state = opt.update(grads, state, params, batch=batch)
    >>> bool(loss_fn(optax.apply_updates(params, updates), batch)
    ...      < loss_fn(params, batch))
    True

  References:
    Nocedal & Wright, "Numerical Optimization", 2nd ed., 2006, ch. 3
    (line searches).
  """
  _losses.check_model(predict_fn, loss)
  _validation.check_nonnegative("l2_reg", l2_reg)
  axis_name = _validation.check_axis_name(axis_name)

  def init_fn(params):
    _validation.check_params(params, "with_objective")
    dtype = jnp.promote_types(
        jnp.result_type(*jax.tree.leaves(params)), jnp.float32)
    return WithObjectiveState(
        inner=_cast_floating(inner.init(_cast_floating(params, dtype)),
                             dtype),
        rejected_steps=jnp.zeros((), jnp.int32),
        objective_value=jnp.zeros((), dtype))

  def update_fn(updates, state, params=None, *, batch=None, value=None,
                grad=None, **extra_args):
    del extra_args  # value_fn and the rest: the objective is built here.
    _validation.check_update_args("with_objective", updates, params, batch,
                                  data_for="to evaluate the objective")
    assert params is not None  # check_update_args raised otherwise.
    _products.batch_size(batch, targets_fn)  # A clear error for bad batches.
    original_params = params
    compute_dtype = state.objective_value.dtype  # At least float32.
    params, updates = _cast_floating((params, updates), compute_dtype)

    def objective(p):
      return _products.objective(
          predict_fn, loss, p, batch, l2_reg=l2_reg, targets_fn=targets_fn,
          axis_name=axis_name)

    updates = optax.tree.add_scale(
        _products.batch_mean(updates, axis_name), l2_reg, params)
    value = objective(params) if value is None else _products.batch_mean(
        jnp.asarray(value) + _products._l2_value(params, l2_reg), axis_name)
    grad = updates if grad is None else optax.tree.add_scale(
        _products.batch_mean(_cast_floating(grad, compute_dtype), axis_name),
        l2_reg, params)
    finite_input = (jnp.isfinite(value) & _validation.all_finite(updates)
                    & _validation.all_finite(grad))

    def step():
      return inner.update(updates, state.inner, params, value=value,
                          grad=grad, value_fn=objective)

    def skip():
      return optax.tree.zeros_like(params), state.inner

    new_updates, new_inner = jax.lax.cond(finite_input, step, skip)
    accepted = (finite_input & _validation.all_finite(new_updates)
                & _line_search_finite(new_inner))
    new_updates = optax.tree.cast_like(optax.tree.where(
        accepted, new_updates, optax.tree.zeros_like(new_updates)),
                                       original_params)
    new_inner = optax.tree.where(accepted, new_inner, state.inner)
    return new_updates, WithObjectiveState(
        inner=new_inner,
        rejected_steps=state.rejected_steps + (~accepted).astype(jnp.int32),
        objective_value=jnp.asarray(value).astype(
            state.objective_value.dtype))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _cast_floating(tree, dtype):
  """``tree`` with its floating leaves in ``dtype``.

  The objective, the direction and the line search run in the parameters'
  dtype, but at least float32 (bfloat16 parameters are upcast and only the
  update is cast back). optax's zoom search keeps its ``info`` errors as
  Python-float arrays (float64 under x64); cast once at ``init``, they stay
  in that dtype, as the search casts its new state like the old one.
  """
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(
          jnp.result_type(x), jnp.floating) else x, tree)


def line_searched(direction, learning_rate, linesearch, predict_fn, loss,
                  **objective_kwargs):
  """``direction`` → sign → line search, on the objective, then ``lr``.

  The learning rate scales the line-searched step (1.0: the step the line
  search chose), so it scales the update exactly, also when injected.
  """
  _validation.check_learning_rate(learning_rate)
  searched = optax.chain(
      direction, optax.scale(-1.0),
      optax.identity() if linesearch is None else linesearch)
  return optax.chain(
      with_objective(searched, predict_fn, loss, **objective_kwargs),
      optax.scale_by_learning_rate(learning_rate, flip_sign=False))


def lbfgs(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    predict_fn: _products.PredictFn,
    loss: _losses.Loss,
    memory_size: int = 10,
    scale_init_precond: bool = True,
    linesearch: Optional[optax.GradientTransformation] = None,
    l2_reg: float = 0.0,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""L-BFGS (Liu & Nocedal 1989): ``optax.lbfgs`` under the ``batch=`` API.

  The direction is ``optax.scale_by_lbfgs``'s two-loop recursion with the
  last ``m`` pairs ``sᵢ = θᵢ₊₁ − θᵢ``, ``yᵢ = gᵢ₊₁ − gᵢ``:

  .. math::
    H_k = V_{k-1}^\top \cdots V_{k-m}^\top \gamma_k I\, V_{k-m} \cdots
      V_{k-1} + \sum \ldots, \quad V_i = I - \rho_i y_i s_i^\top,\quad
    \rho_i = 1 / y_i^\top s_i,\quad
    \gamma_k = \frac{s_{k-1}^\top y_{k-1}}{y_{k-1}^\top y_{k-1}} \\
    \theta_{k+1} = \theta_k - \text{lr} \cdot \alpha_k H_k g_k

  with ``α_k`` from ``optax.scale_by_zoom_linesearch`` (strong Wolfe, at most
  20 steps, first guess 1), exactly as ``optax.lbfgs``; with
  ``learning_rate=1`` the iterates are ``optax.lbfgs()``'s. The objective
  the line search evaluates is built from ``predict_fn`` and ``loss`` on the
  ``batch=`` of ``update`` (:func:`with_objective`), so no ``value=``,
  ``grad=`` or ``value_fn=`` is needed, and the optimizer works inside
  ``nnx.Optimizer`` or any loop that forwards keyword arguments. A non-finite
  gradient, objective or line-search value gives a zero update, keeps the
  memory and is counted in ``rejected_steps``.

  L-BFGS needs full-batch (or very large batch) gradients: the pairs
  ``(s, y)`` must describe one function.

  Args:
    learning_rate: scales the line-searched step (1.0); a number or a
      schedule.
    predict_fn: ``(params, batch) -> outputs`` with a leading batch axis.
    loss: a loss from :mod:`curvature.losses`.
    memory_size: ``m``, the number of stored pairs (10), a Python int >= 1.
    scale_init_precond: ``H₀ = γ_k I`` (``True``) or ``I``.
    linesearch: a line search reading ``value``, ``grad`` and ``value_fn``;
      ``None`` for optax's default zoom search.
    l2_reg: L2 coefficient ``η``: ``½η‖θ‖²`` is added to the objective.
    targets_fn: finds the targets in a batch.
    axis_name: for ``jax.shard_map``: the mesh axis the batch is sharded
      over; the objective and the gradient are ``pmean``-ed over it.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

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
    >>> opt = curvature.lbfgs(predict_fn=predict,
    ...                       loss=curvature.losses.squared_error)
    >>> state = opt.init(params)
    >>> update = jax.jit(opt.update)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss_fn)(params, batch)
    ...   updates, state = update(grads, state, params, batch=batch)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss_fn(params, batch) < 1e-8)
    True

  References:
    Liu & Nocedal, "On the limited memory BFGS method for large scale
    optimization", Mathematical Programming 45, 1989.
    Nocedal & Wright, "Numerical Optimization", 2nd ed., 2006, Algorithms
    7.4 and 7.5.
  """
  memory_size = _validation.check_static_int("memory_size", memory_size, 1)
  return line_searched(
      optax.scale_by_lbfgs(memory_size=memory_size,
                           scale_init_precond=scale_init_precond),
      learning_rate, zoom_linesearch() if linesearch is None else linesearch,
      predict_fn, loss, l2_reg=l2_reg, targets_fn=targets_fn,
      axis_name=axis_name)


class ScaleByBfgsState(NamedTuple):
  """State of :func:`scale_by_bfgs`.

  Attributes:
    count: number of ``update`` calls.
    params: the previous parameters, raveled.
    updates: the previous gradient, raveled.
    inverse_hessian: ``H``, the ``n × n`` inverse-Hessian approximation.
    skipped_updates: pairs with ``yᵀs ≤ ε‖y‖‖s‖`` (no positive curvature),
      for which ``H`` was left unchanged.
  """

  count: Array
  params: Array
  updates: Array
  inverse_hessian: Array
  skipped_updates: Array


def bfgs_update(inverse_hessian: Array, s: Array, y: Array) -> Array:
  r"""The BFGS inverse-Hessian update (Nocedal & Wright 2006, eq. 6.17).

  .. math::
    H^+ = (I - \rho s y^\top) H (I - \rho y s^\top) + \rho s s^\top,
    \quad \rho = 1 / y^\top s

  expanded to ``O(n²)`` outer products; ``H⁺ y = s`` (the secant equation).
  """
  rho = 1.0 / jnp.vdot(y, s)
  hy = inverse_hessian @ y
  return (inverse_hessian - rho * (jnp.outer(s, hy) + jnp.outer(hy, s))
          + (rho * rho * jnp.vdot(y, hy) + rho) * jnp.outer(s, s))


def scale_by_bfgs(
    scale_init_precond: bool = True,
) -> optax.GradientTransformation:
  r"""The dense BFGS direction ``H_k g_k``, with ``H`` an ``n × n`` matrix.

  With ``s = θ_k − θ_{k−1}`` and ``y = g_k − g_{k−1}``:

  .. math::
    H_k = (I - \rho s y^\top) H_{k-1} (I - \rho y s^\top) + \rho s s^\top,
    \quad \rho = 1 / y^\top s

  from ``H₀ = I``; with ``scale_init_precond`` ``H₀`` is replaced by
  ``(yᵀs / yᵀy) I`` just before the first update (Nocedal & Wright 2006,
  eq. 6.20). The first direction is ``g₀ · min(1, 1/‖g₀‖)``, as in
  ``optax.scale_by_lbfgs``. A pair with ``yᵀs ≤ ε ‖y‖ ‖s‖`` (no positive
  curvature, possible without a Wolfe line search) is skipped, so ``H``
  stays positive definite. Like every ``scale_by_*`` the output has no
  minus sign; chain with ``optax.scale(-1.0)`` and a line search, as
  :func:`bfgs` does. ``O(n²)`` memory: for small problems only.

  Args:
    scale_init_precond: rescale ``H₀`` by ``yᵀs / yᵀy`` at the first pair.

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``.

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
    >>> direction = curvature.scale_by_bfgs()
    >>> state = direction.init(params)
    >>> u, state = direction.update(grads, state, params)  # g / max(1, ‖g‖)
    >>> state.inverse_hessian.shape  # n × n, n = 2 parameters
    (2, 2)

  References:
    Broyden 1970; Fletcher 1970; Goldfarb 1970; Shanno 1970.
    Nocedal & Wright, "Numerical Optimization", 2nd ed., 2006, §6.1,
    Algorithm 6.1.
  """

  def init_fn(params):
    _validation.check_params(params, "scale_by_bfgs")
    # Shapes only: raveling would copy (and on a mesh, gather) the model.
    leaves = jax.tree.leaves(params)
    dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
    n = sum(int(x.size) for x in leaves)
    return ScaleByBfgsState(
        count=jnp.zeros((), jnp.int32),
        params=jnp.zeros((n,), dtype),
        updates=jnp.zeros((n,), dtype),
        inverse_hessian=jnp.eye(n, dtype=dtype),
        skipped_updates=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          "scale_by_bfgs needs the parameters: call"
          " `update(grads, state, params)`.")
    _validation.check_same_tree(params, updates, "The gradient",
                                _validation.GRADIENT_FIX)
    dtype = state.params.dtype
    flat_params = _sharding.ravel(params)[0].astype(dtype)
    flat_grad, unravel = _sharding.ravel(updates)
    grad = flat_grad.astype(dtype)
    if flat_params.shape != state.params.shape:
      raise ValueError(
          f"The state holds {state.params.shape[0]} parameters, but `params`"
          f" has {flat_params.shape[0]}: call `opt.init(params)` with the"
          " parameters given to `update`.")
    s = flat_params - state.params
    y = grad - state.updates
    ys = jnp.vdot(y, s)
    inverse_hessian = state.inverse_hessian
    if scale_init_precond:
      gamma = ys / jnp.vdot(y, y)
      inverse_hessian = jnp.where(
          (state.count == 1) & (ys > 0),
          gamma * jnp.eye(s.shape[0], dtype=dtype), inverse_hessian)
    eps = jnp.finfo(dtype).eps
    curved = ys > eps * jnp.linalg.norm(y) * jnp.linalg.norm(s)
    use_pair = (state.count > 0) & curved
    inverse_hessian = jax.lax.cond(
        use_pair, lambda: bfgs_update(inverse_hessian, s, y),
        lambda: inverse_hessian)
    first = grad * jnp.minimum(1.0, 1.0 / jnp.linalg.norm(grad))
    direction = jnp.where(state.count == 0, first, inverse_hessian @ grad)
    new_state = ScaleByBfgsState(
        count=_optax_typed.safe_increment(state.count),
        params=flat_params,
        updates=grad,
        inverse_hessian=inverse_hessian,
        skipped_updates=state.skipped_updates
        + ((state.count > 0) & ~curved).astype(jnp.int32))
    return unravel(direction.astype(flat_grad.dtype)), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def bfgs(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    predict_fn: _products.PredictFn,
    loss: _losses.Loss,
    scale_init_precond: bool = True,
    linesearch: Optional[optax.GradientTransformation] = None,
    l2_reg: float = 0.0,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Dense BFGS with a zoom line search: ``θ ← θ − lr · α H g``.

  ``H`` is the ``n × n`` inverse-Hessian approximation of
  :func:`scale_by_bfgs`,

  .. math::
    H_k = (I - \rho s y^\top) H_{k-1} (I - \rho y s^\top) + \rho s s^\top,
    \quad \rho = 1 / y^\top s,\quad s = \theta_k - \theta_{k-1},\quad
    y = g_k - g_{k-1}

  and ``α`` comes from the same ``optax.scale_by_zoom_linesearch`` as
  :func:`lbfgs` (strong Wolfe conditions, which keep ``yᵀs > 0``). On a
  strictly convex quadratic with exact line searches it reaches the minimum
  in at most ``n`` steps (Nocedal & Wright 2006, Theorem 6.4). The objective
  comes from ``predict_fn``, ``loss`` and ``batch=``; a non-finite gradient,
  objective or line-search value gives a zero update, counted in
  ``rejected_steps``. ``O(n²)`` memory and work per step: for problems with
  at most a few thousand parameters; use :func:`lbfgs` beyond.

  Args:
    learning_rate: scales the line-searched step (1.0).
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    scale_init_precond: ``H₀ = (yᵀs / yᵀy) I`` at the first pair.
    linesearch: a line search reading ``value``, ``grad`` and ``value_fn``;
      ``None`` for the zoom search of :func:`lbfgs`.
    l2_reg: L2 coefficient.
    targets_fn: finds the targets in a batch.
    axis_name: for ``jax.shard_map``: the mesh axis the batch is sharded
      over.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

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
    >>> opt = curvature.bfgs(predict_fn=predict,
    ...                      loss=curvature.losses.squared_error)
    >>> state = opt.init(params)
    >>> updates, state = opt.update(grads, state, params, batch=batch)
    >>> int(state[0].rejected_steps)
    0

  References:
    Nocedal & Wright, "Numerical Optimization", 2nd ed., 2006, ch. 6
    (Algorithm 6.1).
  """
  return line_searched(
      scale_by_bfgs(scale_init_precond), learning_rate,
      zoom_linesearch() if linesearch is None else linesearch,
      predict_fn, loss, l2_reg=l2_reg, targets_fn=targets_fn,
      axis_name=axis_name)
