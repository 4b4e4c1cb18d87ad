"""Polyak averaging of the parameters, uniform or exponential.

A pass-through transform: the updates are not changed, but the state keeps
an average of the iterates, to be read with :func:`averaged_params` for
evaluation. Put it last in the chain (after the learning rate) so that it
sees the step actually applied.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from curvature import _moments
from curvature import _optax_typed


class PolyakAveragingState(NamedTuple):
  """State of :func:`polyak_averaging`.

  Attributes:
    count: number of iterates averaged so far (int32 scalar).
    average: uniform mean of the iterates, or the raw (not debiased)
      exponential average; read it with :func:`averaged_params`.
  """

  count: jax.Array
  average: Any


def polyak_averaging(
    decay: Optional[Any] = None,
    *,
    accumulator_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Keeps a running average of the iterates :math:`\theta_t`.

  The updates pass through unchanged. With :math:`\theta_t = \theta_{t-1} +
  u_t` the parameters after step :math:`t` (computed inside from ``params``
  and the incoming ``updates``):

  * uniform (``decay=None``, Polyak & Juditsky 1992):
    :math:`\bar\theta_t = \bar\theta_{t-1} + (\theta_t - \bar\theta_{t-1})/t`,
    the mean of :math:`\theta_1, \dots, \theta_t`;
  * exponential (``decay=beta``, Goodfellow, Bengio & Courville 2016,
    §8.7.3): :math:`m_t = \beta m_{t-1} + (1-\beta)\theta_t` with
    :math:`m_0 = 0`, read out debiased, :math:`\bar\theta_t = m_t / (1 -
    \beta^t)`, which forgets the starting point faster than the uniform
    mean.

  Args:
    decay: ``None`` for the uniform average, else :math:`\beta \in [0, 1)`.
    accumulator_dtype: dtype of the stored average (default: the params').
      Use ``jnp.float32`` when training in low precision.

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`PolyakAveragingState`; ``update`` requires ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> opt = optax.chain(optax.sgd(0.5), curvature.polyak_averaging())
    >>> params = jnp.array([4.0])
    >>> state = opt.init(params)
    >>> for _ in range(2):  # f(x) = x**2 / 2: each step halves x
    ...   updates, state = opt.update(params, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(float(params[0]), float(curvature.averaged_params(state)[0]))
    1.0 1.5

  References:
    Polyak & Juditsky, "Acceleration of stochastic approximation by
    averaging", SIAM Journal on Control and Optimization, 1992.

    Goodfellow, Bengio & Courville, "Deep Learning", MIT Press, 2016, ch. 8.
  """
  if decay is not None:
    _moments.check_decay("decay", decay)

  def init_fn(params):
    return PolyakAveragingState(
        count=jnp.zeros([], jnp.int32),
        average=optax.tree.zeros_like(params, dtype=accumulator_dtype),
    )

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          "polyak_averaging needs `params`: call update(grads, state, params)."
      )
    new_params = optax.apply_updates(params, updates)
    count = _optax_typed.safe_increment(state.count)
    if decay is None:
      average = jax.tree.map(
          lambda a, p: a + (p.astype(a.dtype) - a) / count.astype(a.dtype),
          state.average,
          new_params,
      )
    else:
      average = _moments.ema_update(
          state.average, optax.tree.cast_like(new_params, state.average), decay
      )
    return updates, PolyakAveragingState(count=count, average=average)

  return optax.GradientTransformation(init_fn, update_fn)


def averaged_params(opt_state: Any, decay: Optional[Any] = None) -> Any:
  """The averaged parameters held by ``opt_state``'s :func:`polyak_averaging`.

  Args:
    opt_state: the optimizer state (any nesting) holding exactly one
      :class:`PolyakAveragingState`, or that state itself.
    decay: the ``decay`` given to :func:`polyak_averaging` (``None``:
      uniform); the exponential average is debiased with it.

  Returns:
    The averaged parameters (before the first step: zeros).

  Raises:
    ValueError: if ``opt_state`` holds no averaging state.
    KeyError: if it holds several.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> opt = optax.chain(optax.sgd(0.1), curvature.polyak_averaging(0.9))
    >>> params = jnp.ones(2)
    >>> state = opt.init(params)
    >>> updates, state = opt.update(jnp.ones(2), state, params)
    >>> average = curvature.averaged_params(state, decay=0.9)
    >>> print([round(float(a), 4) for a in average])
    [0.9, 0.9]

  References:
    Polyak & Juditsky, "Acceleration of stochastic approximation by
    averaging", SIAM Journal on Control and Optimization, 1992.
  """
  state = optax.tree.get(opt_state, "PolyakAveragingState")
  if state is None:
    raise ValueError("No PolyakAveragingState found in opt_state.")
  if decay is None:
    return state.average
  safe_count = jnp.maximum(state.count, 1)
  return _moments.debias(state.average, decay, safe_count)
