"""Exponential moving averages with bias correction, of any statistic.

This is the "bias-corrected moments" primitive shared by every optimizer in
``curvature``: Adam's first and second moments, RMSProp's and AdaDelta's
running averages, Polyak's exponential averaging of parameters, and (later)
running estimates of curvature diagonals and Kronecker factors.

Two layers are exposed:

* plain functions on arbitrary pytrees, :func:`ema_update` and :func:`debias`,
  which any estimator (e.g. K-FAC's factor statistics, whose shapes do not
  match the parameters) can call directly;
* transforms, :func:`scale_by_ema` (EMA of ``statistic(updates)``) and
  :func:`scale_by_running_sum` (AdaGrad's accumulator), which apply them to
  the incoming updates.
"""

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from curvature import _optax_typed
from curvature import _validation

Statistic = Optional[Union[str, Callable[[jax.Array], jax.Array]]]
_NAMED_STATISTICS = {"square": jnp.square}


def ema_update(moment: Any, statistic: Any, decay: Any) -> Any:
  r"""One step of an exponential moving average of an arbitrary pytree.

  .. math::
    m_t = \beta\, m_{t-1} + (1 - \beta)\, s_t

  The operation order is exactly that of ``optax.tree.update_moment`` (which
  this calls), so moments computed here match optax's bit for bit.

  Args:
    moment: the previous average :math:`m_{t-1}` (any pytree).
    statistic: the new observation :math:`s_t`, same structure as ``moment``
      (gradients, squared gradients, a curvature diagonal, a Kronecker
      factor...).
    decay: :math:`\beta \in [0, 1)`.

  Returns:
    The new average :math:`m_t`, same structure as ``moment``.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> m = curvature.ema_update(jnp.zeros(2), jnp.ones(2), 0.9)
    >>> print([round(float(x), 4) for x in m])
    [0.1, 0.1]

  References:
    Kingma & Ba, "Adam: a method for stochastic optimization", ICLR 2015.

    Goodfellow, Bengio & Courville, "Deep Learning", MIT Press, 2016, ch. 8.
  """
  return optax.tree.update_moment(statistic, moment, decay, 1)


def debias(moment: Any, decay: Any, count: Any) -> Any:
  r"""Bias correction of an EMA started at zero: :math:`m_t / (1 - \beta^t)`.

  An EMA initialised at zero underestimates its statistic by the factor
  :math:`1 - \beta^t` after ``t`` updates; dividing by it gives an unbiased
  (weighted-average) estimate. It becomes a no-op as ``t`` grows.

  Args:
    moment: the raw average :math:`m_t` (any pytree).
    decay: the :math:`\beta` used to build it.
    count: number of :func:`ema_update` calls ``t >= 1`` (integer scalar).

  Returns:
    The debiased average :math:`\hat m_t`, same structure and dtypes.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> m = curvature.ema_update(jnp.zeros(2), jnp.ones(2), 0.5)
    >>> print([round(float(x), 4) for x in curvature.debias(m, 0.5, 1)])
    [1.0, 1.0]

  References:
    Kingma & Ba, "Adam: a method for stochastic optimization", ICLR 2015,
    §3.
  """
  return optax.tree.bias_correction(moment, decay, count)


def check_decay(name: str, decay: Any) -> None:
  """Raises ``ValueError`` unless a concrete ``decay`` lies in ``[0, 1)``."""
  _validation.check_in_interval(name, decay, 0.0, 1.0)


def _statistic_fn(statistic: Statistic):
  """``None``, a name in ``_NAMED_STATISTICS``, or an elementwise callable."""
  if statistic is None or callable(statistic):
    return statistic
  _validation.check_choice("statistic", statistic, tuple(_NAMED_STATISTICS))
  return _NAMED_STATISTICS[statistic]


def _apply_statistic(statistic, updates: Any) -> Any:
  if statistic is None:
    return updates
  return jax.tree.map(statistic, updates)


class ScaleByEmaState(NamedTuple):
  """State of :func:`scale_by_ema`.

  Attributes:
    count: number of updates so far (int32 scalar), for :func:`debias`.
    ema: the raw (not debiased) moving average.
  """

  count: jax.Array
  ema: Any


def scale_by_ema(
    decay: Any = 0.9,
    *,
    bias_correction: bool = True,
    statistic: Statistic = None,
    initial_value: Any = 0.0,
    accumulator_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Replaces the updates by a (bias-corrected) EMA of a statistic of them.

  .. math::
    m_t = \beta\, m_{t-1} + (1 - \beta)\, s(g_t), \qquad
    \text{output} = m_t / (1 - \beta^t) \ \text{(if bias\_correction)}, \ m_t
    \ \text{otherwise.}

  With ``statistic=None`` this is Adam's first moment (momentum in EMA form);
  with ``statistic="square"`` it is the second moment of RMSProp and Adam,
  i.e. a running estimate of the diagonal of the empirical Fisher, ready to be
  used as the ``curvature`` of :func:`curvature.scale_by_diagonal`.

  Args:
    decay: :math:`\beta \in [0, 1)`.
    bias_correction: divide by :math:`1 - \beta^t` (Adam's bias correction).
      Only meaningful with ``initial_value=0``.
    statistic: elementwise function applied to each update leaf before
      averaging: ``None`` (identity), ``"square"``, or a callable. A callable
      must be listed in ``static_args`` under ``optax.inject_hyperparams``
      (which would take it for a schedule); ``curvature.inject_hyperparams``
      does that for you.
    initial_value: value of :math:`m_0` (RMSProp's ``initial_scale``), finite.
    accumulator_dtype: dtype of the stored average (default: the updates').

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByEmaState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> second_moment = curvature.scale_by_ema(0.9, statistic="square")
    >>> state = second_moment.init({"w": jnp.zeros(2)})
    >>> out, state = second_moment.update({"w": jnp.array([3.0, -2.0])}, state)
    >>> print([round(float(x), 3) for x in out["w"]])  # debiased: g ** 2
    [9.0, 4.0]

  References:
    Kingma & Ba, "Adam: a method for stochastic optimization", ICLR 2015.

    Goodfellow, Bengio & Courville, "Deep Learning", MIT Press, 2016, ch. 8.
  """
  check_decay("decay", decay)
  _validation.check_finite(
      "initial_value", initial_value, "It is the average's value m_0, e.g. 0."
  )
  statistic = _statistic_fn(statistic)

  def init_fn(params):
    return ScaleByEmaState(
        count=jnp.zeros([], jnp.int32),
        ema=optax.tree.full_like(
            params, initial_value, dtype=accumulator_dtype
        ),
    )

  def update_fn(updates, state, params=None):
    del params
    new_ema = ema_update(state.ema, _apply_statistic(statistic, updates), decay)
    count = _optax_typed.safe_increment(state.count)
    out = debias(new_ema, decay, count) if bias_correction else new_ema
    if accumulator_dtype is not None:
      new_ema = optax.tree.cast(new_ema, accumulator_dtype)
    return out, ScaleByEmaState(count=count, ema=new_ema)

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByRunningSumState(NamedTuple):
  """State of :func:`scale_by_running_sum`.

  Attributes:
    total: the running sum :math:`a_t`.
  """

  total: Any


def scale_by_running_sum(
    *,
    statistic: Statistic = "square",
    initial_value: Any = 0.0,
) -> optax.GradientTransformation:
  r"""Replaces the updates by a running sum of a statistic of them.

  .. math::
    a_t = a_{t-1} + s(g_t), \qquad a_0 = \text{initial\_value}.

  With the default ``statistic="square"`` this is AdaGrad's accumulator, the
  (unnormalised) empirical-Fisher diagonal summed over all steps.

  Args:
    statistic: ``"square"``, ``None`` (identity) or an elementwise callable
      (see :func:`scale_by_ema`).
    initial_value: :math:`a_0 \geq 0` (optax's ``initial_accumulator_value``).

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`ScaleByRunningSumState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> accumulator = curvature.scale_by_running_sum(initial_value=0.1)
    >>> state = accumulator.init(jnp.zeros(2))
    >>> for g in ([1.0, 2.0], [3.0, -1.0]):
    ...   total, state = accumulator.update(jnp.array(g), state)
    >>> print([round(float(x), 4) for x in total])
    [10.1, 5.1]

  References:
    Duchi, Hazan & Singer, "Adaptive subgradient methods for online learning
    and stochastic optimization", JMLR 2011.
  """
  _validation.check_nonnegative(
      "initial_value", initial_value, "Use 0 (Duchi et al.) or 0.1 (optax)."
  )
  statistic = _statistic_fn(statistic)

  def init_fn(params):
    return ScaleByRunningSumState(
        total=optax.tree.full_like(params, initial_value)
    )

  def update_fn(updates, state, params=None):
    del params
    total = jax.tree.map(
        lambda s, t: s + t, _apply_statistic(statistic, updates), state.total
    )
    return total, ScaleByRunningSumState(total=total)

  return optax.GradientTransformation(init_fn, update_fn)
