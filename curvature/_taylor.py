"""Taylor models of the objective and the reduction ratio ρ.

Shared by the damping adaptation of the second-order transforms and by the
diagnostics.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvature import _validation

Array = jax.Array
Params = Any


def first_order_change(grad: Params, step: Params) -> Array:
  r"""The first-order Taylor prediction of ``f(θ + d) − f(θ)``: ``gᵀd``.

  Args:
    grad: ``∇f(θ)``.
    step: the direction ``d``.

  Returns:
    A scalar.

  References:
    Martens, "New insights and perspectives on the natural gradient method", 2020 (Taylor approximations in JAX).
  """
  return optax.tree.vdot(grad, step)


def second_order_change(
    grad: Params, matvec: Callable[[Params], Params], step: Params
) -> Array:
  r"""The quadratic-model prediction ``q(d) − q(0) = gᵀd + ½ dᵀ C d``.

  Args:
    grad: ``∇f(θ)``.
    matvec: ``v ↦ C v`` for the model's curvature (include any damping).
    step: the direction ``d``.

  Returns:
    A scalar.

  References:
    Goodfellow, Bengio & Courville, *Deep Learning*, 2016, ch. 8 and Martens, "New insights and perspectives on the natural gradient method", 2020 (second-order Taylor models).
  """
  return taylor_models(grad, matvec, step).second_order


def reduction_ratio(
    value_after: Array, value_before: Array, predicted_change: Array
) -> Array:
  r"""``ρ = (f(θ + d) − f(θ)) / (q(d) − q(0))``: how well the model predicted.

  ``ρ ≈ 1`` means the model is trustworthy; ``ρ < 0`` means the objective
  went up. A NaN value after the step counts as ``+∞`` and a model that
  predicts no decrease (``q(d) − q(0) ≥ 0``) gives ``ρ = −∞``, so either
  case reads as a failed step and raises Levenberg-Marquardt damping.

  Args:
    value_after: ``f(θ + d)``.
    value_before: ``f(θ)``.
    predicted_change: ``q(d) − q(0)``.

  Returns:
    A scalar ``ρ``.

  References:
    Moré, "The Levenberg-Marquardt algorithm", 1978; Martens 2010 §4.1.
  """
  value_after = jnp.where(jnp.isnan(value_after), jnp.inf, value_after)
  return jnp.where(
      predicted_change < 0,
      (value_after - value_before) / predicted_change,
      -jnp.inf,
  )


class TaylorModels(NamedTuple):
  """First- and second-order predictions of ``f(θ + d) − f(θ)``.

  Attributes:
    first_order: ``gᵀd``.
    second_order: ``gᵀd + ½ dᵀCd``.
    curvature: ``dᵀCd``, the curvature along ``d``.
    finite: ``False`` if the gradient, the step or the product ``Cd`` held
      a NaN or an Inf (the predictions are then meaningless).
  """

  first_order: Array
  second_order: Array
  curvature: Array
  finite: Array


def taylor_models(
    grad: Params, matvec: Callable[[Params], Params], step: Params
) -> TaylorModels:
  r"""Both Taylor predictions of the change along ``d``, for one product ``C d``.

  .. math::
    f(\theta + d) - f(\theta) \approx g^\top d
    \quad\text{and}\quad
    \approx g^\top d + \tfrac12 d^\top C d .

  Compare them with the actual change to see how far each model can be
  trusted; :func:`reduction_ratio` turns the second into ``ρ``.

  Args:
    grad: ``∇f(θ)``.
    matvec: ``v ↦ C v`` (Hessian, GGN or Fisher, with any damping).
    step: the direction ``d``.

  Returns:
    :class:`TaylorModels`.

  Raises:
    ValueError: at trace time, if ``step`` or ``matvec(step)`` does not
      match ``grad``'s pytree (naming the first differing leaf).

  Example:
    >>> lin = curvature.linearize(predict, loss, params, batch,
    ...                           curvature="hessian")
    >>> models = curvature.taylor_models(lin.grad, lin.matvec, step)

  References:
    Martens, "New insights and perspectives on the natural gradient method", 2020 (first- and second-order Taylor approximations in
    JAX); Nocedal & Wright, "Numerical Optimization", 2006, §2.2.
  """
  fix = ("`grad`, `step` and `matvec(step)` must be pytrees like the"
         " parameters.")
  _validation.check_same_tree(grad, step, "The step", fix)
  product = matvec(step)
  _validation.check_same_tree(grad, product, "matvec(step)", fix)
  first = first_order_change(grad, step)
  along = optax.tree.vdot(step, product)
  return TaylorModels(first, first + 0.5 * along, along,
                      jnp.isfinite(first) & jnp.isfinite(along))
