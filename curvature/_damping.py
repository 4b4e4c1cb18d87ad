"""Damping of the second-order transforms: one home for its three rules.

* :func:`levenberg_marquardt`: adapt ``λ`` from the reduction ratio ``ρ``;
* :func:`raise_on_rejection`: a rejected step raises ``λ`` instead;
* :func:`guard_step`: a non-finite step never reaches the parameters.

Hessian-free (and the aliases built on it: natural gradient, Newton,
Gauss-Newton, Levenberg-Marquardt) and K-FAC share them. ``ρ`` always
comes from :func:`curvature._taylor.reduction_ratio`.
"""

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from curvature import _validation

Array = jax.Array
Params = Any
Bounds = Optional[Tuple[Any, Any]]


def _clip(damping: Array, bounds: Bounds) -> Array:
  if bounds is None:
    return damping
  low, high = bounds
  return jnp.clip(damping, low, high)


def levenberg_marquardt(
    damping: Array,
    rho: Array,
    *,
    low: float = 0.25,
    high: float = 0.75,
    increase: float = 1.5,
    decrease: float = 2.0 / 3.0,
    bounds: Bounds = None,
) -> Array:
  r"""The Levenberg-Marquardt rule: ``λ`` from how well the model predicted.

  .. math::
    \lambda \leftarrow \operatorname{clip}\Big(\lambda \cdot
    \begin{cases} \text{increase} & \rho < \text{low} \\
                  \text{decrease} & \rho > \text{high} \\
                  1 & \text{otherwise}\end{cases},\;
    \text{bounds}\Big)

  A NaN ``ρ`` leaves ``λ`` unchanged (use
  :func:`curvature.reduction_ratio`, which maps a failed step to
  ``ρ = −∞``, so that it raises ``λ``).

  **Two parametrizations.** Martens (2010) multiplies by ``increase = 3/2``
  and ``decrease = 2/3``. Martens & Grosse (2015, K-FAC §6.5) write the
  rule with one factor ``ω₁ = (19/20)^{T₁}``: ``ρ > ¾ → λω₁``,
  ``ρ < ¼ → λ/ω₁``; that is this function with ``increase = 1/ω₁``,
  ``decrease = ω₁`` (and the default ``low = 1/4``, ``high = 3/4``).

  Args:
    damping: the current ``λ`` (a scalar).
    rho: the reduction ratio ``ρ`` of the last step.
    low: below it ``λ`` grows (1/4); at most ``high``.
    high: above it ``λ`` shrinks (3/4).
    increase: the factor ``≥ 1`` for ``ρ < low`` (3/2).
    decrease: the factor in ``(0, 1]`` for ``ρ > high`` (2/3).
    bounds: ``(min_damping, max_damping)`` to clip the result to, or
      ``None`` for no clipping.

  Returns:
    The new ``λ``, in ``damping``'s dtype.

  Example:
    >>> import curvature._damping as damping
    >>> float(damping.levenberg_marquardt(1.0, 0.1))  # A poor step.
    1.5
    >>> omega = 0.95  # The K-FAC form: increase=1/ω, decrease=ω.
    >>> round(float(damping.levenberg_marquardt(
    ...     1.0, 0.9, increase=1 / omega, decrease=omega)), 4)
    0.95

  References:
    Moré, "The Levenberg-Marquardt algorithm: implementation and theory",
    Numerical Analysis, Lecture Notes in Mathematics 630, Springer, 1978.
    Martens, "Deep learning via Hessian-free optimization", ICML 2010, §4.1.
    Martens & Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML 2015, §6.5.
  """
  factor = jnp.where(rho < low, increase, jnp.where(rho > high, decrease, 1.0))
  new = _clip(damping * factor, bounds)
  return new.astype(jnp.result_type(damping))


def raise_on_rejection(
    damping: Array,
    adapted: Array,
    rejected: Array,
    *,
    increase: float = 1.5,
    bounds: Bounds = None,
) -> Array:
  r"""``λ · increase`` (clipped) after a rejected step, else ``adapted``.

  A step rejected because a value was not finite says nothing about ``ρ``;
  the damping is raised from its value *before* the step, as after a poor
  step, so the next, shorter step is safer. With the K-FAC form pass
  ``increase = 1/ω₁`` (see :func:`levenberg_marquardt`).

  Args:
    damping: ``λ`` before the step.
    adapted: ``λ`` after the step had it been accepted (e.g. from
      :func:`levenberg_marquardt`).
    rejected: a boolean scalar, ``True`` if the step was rejected.
    increase: the factor ``≥ 1`` (3/2).
    bounds: ``(min_damping, max_damping)``, or ``None``.

  Returns:
    The new ``λ``, in ``adapted``'s dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature._damping as damping
    >>> float(damping.raise_on_rejection(2.0, 1.0, jnp.array(True)))
    3.0
  """
  raised = _clip(damping * increase, bounds)
  return jnp.where(rejected, raised, adapted).astype(jnp.result_type(adapted))


def guard_step(ok: Array, direction: Params) -> Tuple[Params, Array]:
  r"""Zeroes a step that is not ``ok`` or not finite: ``(direction, rejected)``.

  ``rejected = ¬ok ∨ (some entry of direction is NaN/Inf)``; the returned
  direction is zero then, so the parameters never see a NaN. Pass as ``ok``
  everything else that must be finite (the objective, the gradient, a
  solver's status).

  Args:
    ok: a boolean scalar.
    direction: the step, a pytree.

  Returns:
    ``(direction or zeros, rejected)``.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature._damping as damping
    >>> step, rejected = damping.guard_step(jnp.array(True),
    ...                                     jnp.array([1.0, jnp.nan]))
    >>> step.tolist(), bool(rejected)
    ([0.0, 0.0], True)
  """
  ok = ok & _validation.all_finite(direction)
  zeros = optax.tree.zeros_like(direction)
  return optax.tree.where(ok, direction, zeros), ~ok
