"""Diagonal preconditioning: divide a direction by (d + damping)^p.

AdaGrad, RMSProp and Adam are all the same operation: an estimate ``d`` of
the diagonal of a curvature matrix (here the empirical Fisher, i.e. squared
gradients, summed or averaged), raised to a power ``p`` and damped. The
``eps`` of those optimizers is damping, and where it sits (inside or outside
the root) is a modelling choice, so both places are explicit arguments.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from curvature import _validation


class ScaleByDiagonalState(NamedTuple):
  """State of :func:`scale_by_diagonal`.

  Attributes:
    curvature: state of the transform producing the diagonal estimate.
    direction: state of the transform producing the preconditioned vector.
  """

  curvature: Any
  direction: Any


def _is_concrete(value, target) -> bool:
  return isinstance(value, (int, float)) and value == target


def precondition(
    direction: Any,
    diagonal: Any,
    *,
    power: Any = 0.5,
    damping: Any = 0.0,
    damping_in_root: Any = 0.0,
) -> Any:
  r"""Divides ``direction`` by the damped diagonal, leaf by leaf.

  .. math::
    u = \frac{x}{(d + \lambda_{\mathrm{in}})^{p} + \lambda_{\mathrm{out}}}

  For ``p = 1/2`` this uses the same floating-point operations as optax:
  ``x / (sqrt(d + in) + out)`` (Adam, RMSProp with ``eps_in_sqrt=False``)
  and, when ``damping`` is the Python number 0, ``x * rsqrt(d + in)`` (RMSProp
  and AdaGrad with eps in the root). Where the denominator is 0 (no damping
  and a diagonal entry that is still 0: a coordinate whose gradient has been
  0 so far, e.g. a dead ReLU) the update is 0, its limit, instead of
  ``0/0 = NaN``.

  Args:
    direction: the pytree :math:`x` to precondition.
    diagonal: the diagonal estimate :math:`d \geq 0`, same structure.
    power: :math:`p` (``0.5``: Adam-like, ``1``: natural-gradient-like).
    damping: :math:`\lambda_{\mathrm{out}}`, added after the power.
    damping_in_root: :math:`\lambda_{\mathrm{in}}`, added before the power.

  Returns:
    The preconditioned pytree, same structure as ``direction``.
  """
  if _is_concrete(power, 0.5):
    if _is_concrete(damping, 0.0):
      root = lambda d: d + damping_in_root
      fn = lambda x, d: _zero_where(root(d) == 0,
                                    x * jax.lax.rsqrt(root(d)))
    else:
      fn = lambda x, d: _safe_divide(x, jnp.sqrt(d + damping_in_root)
                                     + damping)
  elif _is_concrete(power, 1.0):
    fn = lambda x, d: _safe_divide(x, d + damping_in_root + damping)
  else:
    fn = lambda x, d: _safe_divide(x, (d + damping_in_root) ** power
                                   + damping)
  return jax.tree.map(fn, direction, diagonal)


def _zero_where(condition, value):
  return jnp.where(condition, jnp.zeros_like(value), value)


def _safe_divide(x, denominator):
  """``x / denominator``, 0 where ``denominator`` is 0 (0/0 = NaN else)."""
  return _zero_where(denominator == 0, x / denominator)


def scale_by_diagonal(
    curvature: optax.GradientTransformation,
    *,
    power: Any = 0.5,
    damping: Any = 1e-8,
    damping_in_root: Any = 0.0,
    direction: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Diagonal preconditioner ``x / ((d + damping_in_root)**p + damping)``.

  Both ``curvature`` and ``direction`` see the same incoming gradient
  :math:`g_t`:

  .. math::
    d_t = \mathrm{curvature}(g_t), \quad x_t = \mathrm{direction}(g_t),
    \quad u_t = \frac{x_t}{(d_t + \lambda_{\mathrm{in}})^{p}
                          + \lambda_{\mathrm{out}}}.

  Plugging in shared primitives gives the canon (lr and sign come after):

  ========== ====================================== ================= ===
  optimizer  curvature ``d``                        direction ``x``   p
  ========== ====================================== ================= ===
  AdaGrad    ``scale_by_running_sum()`` (sum g^2)   identity          1/2
  RMSProp    ``scale_by_ema(b, statistic=square,``  identity          1/2
             ``bias_correction=False)``
  Adam       ``scale_by_ema(b2, statistic=square)`` ``scale_by_ema``  1/2
                                                    ``(b1)``
  ========== ====================================== ================= ===

  So Adam is a diagonal, square-rooted empirical-Fisher preconditioner applied
  to a momentum (EMA) direction, and its ``eps`` is damping. The direction is
  an argument rather than an earlier element of ``optax.chain`` because the
  curvature statistic must see the raw gradient, not the momentum. Exact
  diagonals (Fisher, GGN, Hessian) fit the ``curvature`` slot with ``p = 1``.

  Args:
    curvature: transform mapping the incoming updates (and params, extra
      args) to a nonnegative diagonal estimate with the same structure.
    power: :math:`p > 0`; ``0.5`` (Adam-like) or ``1`` (Newton-like).
    damping: :math:`\lambda_{\mathrm{out}} \geq 0`, outside the root (optax
      Adam's ``eps``).
    damping_in_root: :math:`\lambda_{\mathrm{in}} \geq 0`, inside the root
      (optax Adam's ``eps_root``, RMSProp's ``eps`` with ``eps_in_sqrt``).
    direction: transform producing the vector to precondition (default: the
      incoming updates themselves).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`ScaleByDiagonalState`. Extra keyword arguments are forwarded to
    ``curvature`` and ``direction``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> adam_like = optax.chain(
    ...     curvature.scale_by_diagonal(
    ...         curvature.scale_by_ema(0.999, statistic="square"),
    ...         direction=curvature.scale_by_ema(0.9), damping=1e-8),
    ...     optax.scale_by_learning_rate(1e-3))
    >>> adam = optax.adam(1e-3)
    >>> params = jnp.array([1.0, -2.0])
    >>> state, adam_state = adam_like.init(params), adam.init(params)
    >>> for g in ([0.5, -1.0], [0.25, 2.0]):
    ...   updates, state = adam_like.update(jnp.array(g), state)
    ...   expected, adam_state = adam.update(jnp.array(g), adam_state)
    >>> bool(jnp.allclose(updates, expected))
    True

  References:
    Duchi, Hazan & Singer, "Adaptive subgradient methods for online learning
    and stochastic optimization", JMLR 2011.

    Tieleman & Hinton, "Lecture 6.5 - RMSProp: divide the gradient by a
    running average of its recent magnitude", COURSERA: Neural Networks for
    Machine Learning, 2012.

    Kingma & Ba, "Adam: a method for stochastic optimization", ICLR 2015.

    Martens, "New insights and perspectives on the natural gradient method",
    JMLR 2020 (eps as damping).

    Goodfellow, Bengio & Courville, "Deep Learning", MIT Press, 2016, ch. 8.
  """
  _validation.check_positive("power", power, "Use 0.5 (Adam-like) or 1.")
  _validation.check_nonnegative(
      "damping", damping, "Damping (eps) must be >= 0, e.g. 1e-8."
  )
  _validation.check_nonnegative(
      "damping_in_root", damping_in_root, "Damping (eps) must be >= 0."
  )
  curvature = optax.with_extra_args_support(curvature)
  direction = optax.with_extra_args_support(
      optax.identity() if direction is None else direction
  )

  def init_fn(params):
    return ScaleByDiagonalState(
        curvature=curvature.init(params), direction=direction.init(params)
    )

  def update_fn(updates, state, params=None, **extra_args):
    diagonal, curvature_state = curvature.update(
        updates, state.curvature, params, **extra_args
    )
    vector, direction_state = direction.update(
        updates, state.direction, params, **extra_args
    )
    new_updates = precondition(
        vector,
        diagonal,
        power=power,
        damping=damping,
        damping_in_root=damping_in_root,
    )
    return new_updates, ScaleByDiagonalState(curvature_state, direction_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
