"""AdaDelta (two forms) and Jacobs' delta-bar-delta.

Both are diagonal preconditioners whose scale comes from running averages:
AdaDelta divides the RMS of past *steps* (or of the weights) by the RMS of
the gradients, so the update has the units of the parameters; delta-bar-delta
adapts one learning rate per parameter from the sign agreement of successive
gradients.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvature import _moments
from curvature import _validation

ADADELTA_FORMS = ("updates", "weights")


class ScaleByAdaDeltaState(NamedTuple):
  """State of :func:`scale_by_adadelta`.

  Attributes:
    grad_sq: EMA of squared gradients, :math:`E[g^2]`.
    scale_sq: EMA of squared steps :math:`E[\\Delta\\theta^2]` (form
      ``"updates"``) or of squared weights :math:`E[w^2]` (form
      ``"weights"``).
  """

  grad_sq: Any
  scale_sq: Any


def scale_by_adadelta(
    rho: Any = 0.9,
    eps: Any = 1e-6,
    *,
    form: str = "updates",
) -> optax.GradientTransformation:
  r"""AdaDelta's unit-correcting diagonal rescaling.

  Form ``"updates"`` (Zeiler 2012; identical to ``optax.scale_by_adadelta``):

  .. math::
    E[g^2]_t = \rho E[g^2]_{t-1} + (1-\rho) g_t^2, \quad
    u_t = \frac{\sqrt{E[\Delta\theta^2]_{t-1} + \epsilon}}
               {\sqrt{E[g^2]_t + \epsilon}}\, g_t, \quad
    E[\Delta\theta^2]_t = \rho E[\Delta\theta^2]_{t-1} + (1-\rho) u_t^2.

  Form ``"weights"`` (a variant, with :math:`\gamma = 1 - \rho` the weight of
  the newest term): the scale of the parameters is estimated from the
  weights themselves,

  .. math::
    S^w_t = \rho S^w_{t-1} + (1-\rho) w_t^2, \quad
    u_t = \sqrt{\frac{S^w_t + \epsilon}{S^g_t + \epsilon}}\, g_t,

  which needs ``params`` in ``update``. In both forms the output is a descent
  direction (the step is :math:`-\eta u_t`); Zeiler's original has
  :math:`\eta = 1`.

  Args:
    rho: decay :math:`\rho \in [0, 1)` of the running averages.
    eps: damping :math:`\epsilon \geq 0` inside both roots. Where a
      denominator is 0 (``eps = 0`` and a gradient that has been 0 so far)
      the update is 0, not 0/0.
    form: ``"updates"`` (Zeiler) or ``"weights"`` (running average of squared
      weights).

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`ScaleByAdaDeltaState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> opt = optax.chain(curvature.scale_by_adadelta(0.9, 1e-6),
    ...                   optax.scale_by_learning_rate(1.0))
    >>> params = jnp.array([1.0, -2.0])
    >>> state = opt.init(params)
    >>> updates, state = opt.update(jnp.array([0.5, -0.5]), state, params)
    >>> print([round(float(u), 5) for u in updates])  # -sqrt(eps/0.1) sign(g)
    [-0.00316, 0.00316]

  References:
    Zeiler, "ADADELTA: an adaptive learning rate method", arXiv:1212.5701,
    2012.
  """
  _moments.check_decay("rho", rho)
  _validation.check_nonnegative("eps", eps, "Use a small damping, e.g. 1e-6.")
  _validation.check_choice("form", form, ADADELTA_FORMS)

  def init_fn(params):
    zeros = optax.tree.zeros_like(params)
    return ScaleByAdaDeltaState(grad_sq=zeros, scale_sq=zeros)

  def ratio(num, den, g):
    # den + eps = 0 only where g = 0 (and eps = 0): the limit 0, not 0/0.
    den = den + eps
    return jnp.where(den == 0, 0, jnp.sqrt(num + eps) / jnp.sqrt(den) * g)

  def update_fn(updates, state, params=None):
    grad_sq = _moments.ema_update(
        state.grad_sq, jax.tree.map(jnp.square, updates), rho
    )
    if form == "updates":
      new = jax.tree.map(ratio, state.scale_sq, grad_sq, updates)
      scale_sq = _moments.ema_update(
          state.scale_sq, jax.tree.map(jnp.square, new), rho
      )
    else:
      if params is None:
        raise ValueError(
            "scale_by_adadelta(form='weights') needs `params`: call"
            " update(grads, state, params)."
        )
      scale_sq = _moments.ema_update(
          state.scale_sq, jax.tree.map(jnp.square, params), rho
      )
      new = jax.tree.map(ratio, scale_sq, grad_sq, updates)
    return new, ScaleByAdaDeltaState(grad_sq=grad_sq, scale_sq=scale_sq)

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByDeltaBarDeltaState(NamedTuple):
  """State of :func:`scale_by_delta_bar_delta`.

  Attributes:
    rates: per-parameter gains :math:`\\epsilon_i` (multiplying the global
      learning rate).
    bar_delta: EMA of past gradients :math:`\\bar\\delta`.
  """

  rates: Any
  bar_delta: Any


def scale_by_delta_bar_delta(
    kappa: Any = 0.01,
    phi: Any = 0.1,
    theta: Any = 0.7,
    *,
    initial_rate: Any = 1.0,
) -> optax.GradientTransformation:
  r"""Jacobs' delta-bar-delta: one adaptive gain per parameter (full batch).

  With :math:`\delta_t = g_t` and :math:`\bar\delta` an EMA of past gradients,

  .. math::
    \epsilon_{t} = \begin{cases}
      \epsilon_{t-1} + \kappa & \bar\delta_{t-1}\delta_t > 0 \\
      (1 - \phi)\,\epsilon_{t-1} & \bar\delta_{t-1}\delta_t < 0 \\
      \epsilon_{t-1} & \text{otherwise}
    \end{cases}, \quad
    u_t = \epsilon_t\, \delta_t, \quad
    \bar\delta_t = (1-\theta)\delta_t + \theta\bar\delta_{t-1}.

  The gains grow additively while the gradient keeps its sign and shrink
  geometrically when it flips. Meant for full-batch gradients: minibatch
  noise flips signs at random (Goodfellow, Bengio & Courville 2016, §8.5).

  Args:
    kappa: additive increase :math:`\kappa \geq 0`.
    phi: multiplicative decrease :math:`\phi \in [0, 1)`.
    theta: decay :math:`\theta \in [0, 1)` of :math:`\bar\delta`.
    initial_rate: :math:`\epsilon_0 > 0` (relative to the learning rate).

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`ScaleByDeltaBarDeltaState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> opt = optax.chain(curvature.scale_by_delta_bar_delta(kappa=0.5),
    ...                   optax.scale_by_learning_rate(0.1))
    >>> params = jnp.array([1.0, 1.0])
    >>> state = opt.init(params)
    >>> for g in ([1.0, 1.0], [1.0, -1.0]):  # second entry flips its sign
    ...   updates, state = opt.update(jnp.array(g), state, params)
    >>> print([round(float(r), 4) for r in state[0].rates])
    [1.5, 0.9]

  References:
    Jacobs, "Increased rates of convergence through learning rate
    adaptation", Neural Networks, 1988.

    Goodfellow, Bengio & Courville, "Deep Learning", MIT Press, 2016, ch. 8.
  """
  _validation.check_nonnegative("kappa", kappa, "Use e.g. kappa=0.01.")
  _validation.check_in_interval("phi", phi, 0.0, 1.0)
  _moments.check_decay("theta", theta)
  _validation.check_positive("initial_rate", initial_rate, "Use e.g. 1.0.")

  def init_fn(params):
    return ScaleByDeltaBarDeltaState(
        rates=optax.tree.full_like(params, initial_rate),
        bar_delta=optax.tree.zeros_like(params),
    )

  def adapt(rate, bar, g):
    agreement = bar * g
    return jnp.where(
        agreement > 0,
        rate + kappa,
        jnp.where(agreement < 0, (1 - phi) * rate, rate),
    ).astype(rate.dtype)

  def update_fn(updates, state, params=None):
    del params
    rates = jax.tree.map(adapt, state.rates, state.bar_delta, updates)
    new = jax.tree.map(lambda r, g: r * g, rates, updates)
    bar_delta = _moments.ema_update(state.bar_delta, updates, theta)
    return new, ScaleByDeltaBarDeltaState(rates=rates, bar_delta=bar_delta)

  return optax.GradientTransformation(init_fn, update_fn)
