"""Taylor models of the objective and the reduction ratio ρ.

Shared by the damping adaptation of the second-order transforms and by the
diagnostics.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

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
    ``shared/seeds/002_*`` (Taylor approximations in JAX).
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
    ``shared/seeds/000_*`` and ``002_*`` (second-order Taylor models).
  """
  return first_order_change(grad, step) + 0.5 * optax.tree.vdot(
      step, matvec(step)
  )


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
