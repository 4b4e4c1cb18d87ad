"""Nonlinear conjugate gradients.

Fletcher-Reeves, Polak-Ribière and Hestenes-Stiefel.

Each direction adds back a multiple of the previous one, ``d_k = −g_k +
β_k d_{k−1}``, so that successive directions are conjugate and steepest
descent's zigzag is undone. The step length comes from
``optax.scale_by_zoom_linesearch``; the objective it evaluates is built from
``predict_fn``, ``loss`` and ``batch=`` (:func:`curvature.with_objective`).
The examples fit a two-parameter linear least-squares model.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from curvature import _lanczos
from curvature import _losses
from curvature import _optax_typed
from curvature import _products
from curvature import _quasi_newton
from curvature import _validation

Array = jax.Array
Params = Any

BETAS = ("fletcher_reeves", "polak_ribiere", "hestenes_stiefel")
"""The choices of ``β`` of :func:`scale_by_nonlinear_cg`."""


class ScaleByNonlinearCGState(NamedTuple):
  """State of :func:`scale_by_nonlinear_cg`.

  Attributes:
    count: number of ``update`` calls.
    previous_grad: ``g_{k−1}``.
    previous_direction: ``u_{k−1}``, the last direction (without the sign).
    restarts: steps taken along the plain gradient (``β = 0``): the first,
      the scheduled restarts, and those where ``u`` was not a descent
      direction.
  """

  count: Array
  previous_grad: Params
  previous_direction: Params
  restarts: Array


def _safe_divide(numerator, denominator):
  nonzero = denominator != 0
  return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0),
                   0.0)


def conjugacy_coefficient(beta: str, grad, previous_grad, previous_direction):
  r"""``β_k`` for ``u_k = g_k + β_k u_{k−1}`` (``u = −d``, the direction
  without the sign); ``y = g_k − g_{k−1}``:

  * ``"fletcher_reeves"``: ``β = g_kᵀg_k / g_{k−1}ᵀg_{k−1}``;
  * ``"polak_ribiere"``: ``β = max(0, g_kᵀy / g_{k−1}ᵀg_{k−1})`` (PR⁺);
  * ``"hestenes_stiefel"``: ``β = g_kᵀy / d_{k−1}ᵀy`` with ``d = −u``.

  A zero denominator gives ``β = 0`` (a restart).
  """
  y = optax.tree.sub(grad, previous_grad)
  previous_norm = _optax_typed.vdot(previous_grad, previous_grad)
  if beta == "fletcher_reeves":
    return _safe_divide(_optax_typed.vdot(grad, grad), previous_norm)
  if beta == "polak_ribiere":
    return jnp.maximum(
        0.0, _safe_divide(_optax_typed.vdot(grad, y), previous_norm))
  return _safe_divide(_optax_typed.vdot(grad, y),
                      -_optax_typed.vdot(previous_direction, y))


def scale_by_nonlinear_cg(
    beta: str = "polak_ribiere",
    restart_every: Optional[int] = None,
) -> optax.GradientTransformation:
  r"""The nonlinear conjugate-gradient direction (without the minus sign).

  .. math::
    u_k = g_k + \beta_k u_{k-1}, \qquad
    \beta^{FR} = \frac{g_k^\top g_k}{g_{k-1}^\top g_{k-1}}, \quad
    \beta^{PR+} = \max\Big(0, \frac{g_k^\top (g_k - g_{k-1})}
        {g_{k-1}^\top g_{k-1}}\Big), \quad
    \beta^{HS} = \frac{g_k^\top (g_k - g_{k-1})}{-u_{k-1}^\top
        (g_k - g_{k-1})}

  The update is ``−α u_k`` with ``α`` from a line search (see
  :func:`nonlinear_cg`). ``β = 0`` (a restart along the gradient) at the
  first step, every ``restart_every`` steps, and whenever ``u_k`` is not a
  descent direction (``g_kᵀu_k ≤ 0``, possible with an inexact line search).
  On a strictly convex quadratic with exact line searches the three ``β``
  coincide and the iterates are linear CG's.

  Args:
    beta: ``"fletcher_reeves"``, ``"polak_ribiere"`` (PR⁺, clipped at 0; the
      default) or ``"hestenes_stiefel"``.
    restart_every: restart every this many steps (a Python int >= 1);
      ``None``: every ``n`` steps, ``n`` the number of parameters (Nocedal &
      Wright 2006, §5.2).

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    ValueError: for another ``beta`` (the message names the choices) or a
      ``restart_every`` below 1.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> direction = curvature.scale_by_nonlinear_cg("fletcher_reeves")
    >>> state = direction.init(jnp.zeros(2))
    >>> u, state = direction.update(jnp.asarray([1., 0.]), state)  # β = 0
    >>> u, state = direction.update(jnp.asarray([0., 1.]), state)  # β = 1
    >>> u.tolist()
    [1.0, 1.0]

  References:
    Fletcher & Reeves, "Function minimization by conjugate gradients", The
    Computer Journal 7, 1964.
    Polak & Ribière, "Note sur la convergence de méthodes de directions
    conjuguées", Revue française d'informatique et de recherche
    opérationnelle 3(16), 1969.
    Hestenes & Stiefel, "Methods of conjugate gradients for solving linear
    systems", J. Res. NBS 49, 1952.
    Nocedal & Wright, "Numerical Optimization", 2nd ed., 2006, §5.2.
  """
  _validation.check_choice("beta", beta, BETAS)
  restart_every = _validation.check_optional_static_int(
      "restart_every", restart_every, 1)

  def init_fn(params):
    _validation.check_params(params, "scale_by_nonlinear_cg")
    return ScaleByNonlinearCGState(
        count=jnp.zeros((), jnp.int32),
        previous_grad=optax.tree.zeros_like(params),
        previous_direction=optax.tree.zeros_like(params),
        restarts=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    _validation.check_same_tree(
        state.previous_grad, updates, "The gradient",
        "The state was made by `init` for other parameters, or the gradient"
        " is not of the parameters.", reference="the state")
    period = restart_every or max(1, _lanczos.dimension(updates))
    coefficient = conjugacy_coefficient(
        beta, updates, state.previous_grad, state.previous_direction)
    direction = optax.tree.add_scale(
        updates, coefficient, state.previous_direction)
    descent = _optax_typed.vdot(updates, direction) > 0
    restart = (state.count % period == 0) | ~descent
    direction = optax.tree.where(restart, updates, direction)
    return direction, ScaleByNonlinearCGState(
        count=_optax_typed.safe_increment(state.count),
        previous_grad=updates,
        previous_direction=direction,
        restarts=state.restarts + restart.astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


def nonlinear_cg(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    predict_fn: _products.PredictFn,
    loss: _losses.Loss,
    beta: str = "polak_ribiere",
    restart_every: Optional[int] = None,
    linesearch: Optional[optax.GradientTransformation] = None,
    l2_reg: float = 0.0,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Nonlinear conjugate gradients with a zoom line search.

  .. math::
    u_k = g_k + \beta_k u_{k-1}, \qquad
    \theta_{k+1} = \theta_k - \text{lr} \cdot \alpha_k u_k

  ``β_k`` by Fletcher-Reeves, Polak-Ribière (PR⁺, clipped at 0) or
  Hestenes-Stiefel, with restarts (see :func:`scale_by_nonlinear_cg`), and
  ``α_k`` from ``optax.scale_by_zoom_linesearch`` with the strong-Wolfe
  constant ``c₂ = 0.1`` that nonlinear CG needs (Nocedal & Wright 2006,
  §5.2) and the previous step as first guess. The objective is built from
  ``predict_fn`` and ``loss`` on ``batch=`` (:func:`curvature.with_objective`):
  call ``update(grads, state, params, batch=batch)``. A non-finite gradient,
  objective or line-search value gives a zero update and is counted in
  ``rejected_steps``; the CG state is kept.

  Args:
    learning_rate: scales the line-searched step (1.0).
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    beta: ``"fletcher_reeves"``, ``"polak_ribiere"`` or
      ``"hestenes_stiefel"``.
    restart_every: restart period (``None``: the number of parameters).
    linesearch: a line search reading ``value``, ``grad`` and ``value_fn``;
      ``None`` for the zoom search described above.
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
    >>> opt = curvature.nonlinear_cg(
    ...     predict_fn=predict, loss=curvature.losses.squared_error,
    ...     beta="fletcher_reeves", restart_every=50)
    >>> state = opt.init(params)
    >>> update = jax.jit(opt.update)
    >>> for _ in range(4):
    ...   grads = jax.grad(loss_fn)(params, batch)
    ...   updates, state = update(grads, state, params, batch=batch)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss_fn(params, batch) < 1e-6)
    True

  References:
    Fletcher & Reeves 1964; Polak & Ribière 1969; Hestenes & Stiefel 1952.
    Nocedal & Wright, "Numerical Optimization", 2nd ed., 2006, ch. 5.
  """
  direction = scale_by_nonlinear_cg(beta, restart_every)
  if linesearch is None:
    linesearch = _quasi_newton.zoom_linesearch(
        curv_rtol=0.1, initial_guess_strategy="keep")
  return _quasi_newton.line_searched(
      direction, learning_rate, linesearch, predict_fn, loss, l2_reg=l2_reg,
      targets_fn=targets_fn, axis_name=axis_name)
