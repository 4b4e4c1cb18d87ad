"""Taylor models of the objective and the reduction ratio ρ.

Shared by the damping adaptation of the second-order transforms and by the
diagnostics.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from curvature import _optax_typed
from curvature import _validation

Array = jax.Array
Params = Any


def first_order_change(grad: Params, step: Params) -> Array:
  r"""The first-order Taylor prediction of ``f(θ + d) − f(θ)``, ``gᵀd``.

  Args:
    grad: ``∇f(θ)``.
    step: the direction ``d``.

  Returns:
    A scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> change = curvature.first_order_change(jnp.array([1.0, 2.0]),
    ...                                       jnp.array([-1.0, -0.5]))
    >>> print(round(float(change), 4))
    -2.0
  """
  return _optax_typed.vdot(grad, step)


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

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> change = curvature.second_order_change(
    ...     jnp.array([1.0, 2.0]), lambda v: 2.0 * v, jnp.array([-1.0, 0.5]))
    >>> print(round(float(change), 4))  # 0 + 0.5 * 2 * 1.25
    1.25

  References:
    Goodfellow, Bengio & Courville, "Deep Learning", MIT Press, 2016, ch. 8.

    Martens, "New insights and perspectives on the natural gradient method",
    JMLR 2020.
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

  Example:
    >>> import curvature
    >>> rho = curvature.reduction_ratio(0.5, 1.0, -0.25)  # fell twice as much
    >>> print(round(float(rho), 4))
    2.0

  References:
    Moré, "The Levenberg-Marquardt algorithm: implementation and theory",
    Numerical Analysis, Lecture Notes in Mathematics 630, Springer, 1978.

    Martens, "Deep learning via Hessian-free optimization", ICML 2010, §4.1.
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
  r"""Both Taylor predictions of the change along ``d``, from one ``C d``.

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
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> def predict(params, batch):
    ...   return jnp.tanh(batch["inputs"] @ params)
    >>> batch = {"inputs": jnp.array([[1.0, 0.5], [-0.5, 1.0]]),
    ...          "targets": jnp.array([[0.5], [-0.5]])}
    >>> params = jnp.zeros((2, 1))
    >>> loss = curvature.losses.squared_error
    >>> lin = curvature.linearize(predict, loss, params, batch,
    ...                           curvature="hessian")
    >>> step = -0.1 * lin.grad
    >>> models = curvature.taylor_models(lin.grad, lin.matvec, step)
    >>> actual = loss.value(predict(params + step, batch), batch["targets"])
    >>> error = abs(float(actual - lin.value - models.second_order))
    >>> bool(error < abs(float(actual - lin.value - models.first_order)))
    True

  References:
    Martens, "New insights and perspectives on the natural gradient method",
    JMLR 2020.

    Nocedal & Wright, "Numerical Optimization", Springer, 2nd ed., 2006,
    §2.2.
  """
  fix = ("`grad`, `step` and `matvec(step)` must be pytrees like the"
         " parameters.")
  _validation.check_same_tree(grad, step, "The step", fix)
  product = matvec(step)
  _validation.check_same_tree(grad, product, "matvec(step)", fix)
  first = first_order_change(grad, step)
  along = _optax_typed.vdot(step, product)
  return TaylorModels(first, first + 0.5 * along, along,
                      jnp.isfinite(first) & jnp.isfinite(along))
