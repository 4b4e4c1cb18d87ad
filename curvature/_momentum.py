"""Heavy-ball and Nesterov momentum, on top of any (preconditioned) direction.

The transform only accumulates whatever direction reaches it, so it composes
after a diagonal preconditioner (RMSProp with momentum), after
``scale_by_hessian_free`` (Hessian-free with momentum), or directly on the
gradient (SGD with momentum).
"""

from typing import Any, Literal, NamedTuple, Optional
import warnings

import jax
import optax

from curvature import _moments
from curvature import _validation

NesterovForm = Literal["change_of_variables", "lookahead"]
NESTEROV_FORMS = ("change_of_variables", "lookahead")


class ScaleByMomentumState(NamedTuple):
  """State of :func:`scale_by_momentum`.

  Attributes:
    velocity: the accumulated direction :math:`v_t`.
  """

  velocity: Any


def scale_by_momentum(
    decay: Any = 0.9,
    *,
    nesterov: bool = False,
    form: NesterovForm = "change_of_variables",
    accumulator_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Heavy-ball or Nesterov momentum on the incoming direction :math:`g_t`.

  Heavy ball (Polyak 1964), and Nesterov's look-ahead form (the gradient fed
  in must have been evaluated at :func:`lookahead_params`):

  .. math::
    v_t = \alpha v_{t-1} + g_t, \qquad \text{output } v_t.

  Nesterov in the change-of-variables form (no gradient at
  :math:`\theta + \alpha v` is needed; the iterate is
  :math:`\tilde\theta = \theta + \alpha v`):

  .. math::
    v_t = \alpha v_{t-1} + g_t, \qquad
    \text{output } v_t + \alpha (v_t - v_{t-1}) = g_t + \alpha v_t.

  Placed before ``scale_by_learning_rate(eps)`` (as in ``optax.sgd``) the
  velocity is in gradient units: the parameter step is :math:`-\epsilon v`.
  Placed after it (as in RMSProp with momentum, Goodfellow, Bengio &
  Courville 2016, Algorithm 8.6: ``v <- a v - eps g / sqrt(r)``) the velocity
  is the parameter step itself, which is what :func:`lookahead_params` needs.

  Args:
    decay: :math:`\alpha \in [0, 1)`.
    nesterov: ``False`` (heavy ball) or ``True`` (Nesterov), as in
      ``optax.trace``.
    form: which Nesterov form, when ``nesterov=True``:
      ``"change_of_variables"`` (no look-ahead gradient; this is
      ``optax.trace``'s ``nesterov=True``) or ``"lookahead"`` (the gradient
      is taken at :math:`\theta + \alpha v`; the update is heavy ball, the
      difference is where the caller evaluates the gradient). The string
      values once accepted by ``nesterov`` still work, with a
      ``DeprecationWarning``.
    accumulator_dtype: dtype of the stored velocity (default: the updates').

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`ScaleByMomentumState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> momentum = curvature.scale_by_momentum(0.5, nesterov=True)
    >>> state = momentum.init(jnp.zeros(1))
    >>> for g in (1.0, 1.0):  # velocities 1 and 1.5; outputs g + 0.5 v
    ...   out, state = momentum.update(jnp.array([g]), state)
    >>> print(float(out[0]), float(state.velocity[0]))
    1.75 1.5
    >>> reference = optax.trace(0.5, nesterov=True)
    >>> reference_state = reference.init(jnp.zeros(1))
    >>> for g in (1.0, 1.0):
    ...   expected, reference_state = reference.update(jnp.array([g]),
    ...                                                reference_state)
    >>> bool(jnp.allclose(out, expected))
    True

  References:
    Polyak, "Some methods of speeding up the convergence of iteration
    methods", USSR Computational Mathematics and Mathematical Physics, 1964.

    Nesterov, "A method for solving the convex programming problem with
    convergence rate O(1/k²)", Soviet Mathematics Doklady, 1983.

    Sutskever, Martens, Dahl & Hinton, "On the importance of initialization
    and momentum in deep learning", ICML 2013.

    Goodfellow, Bengio & Courville, "Deep Learning", MIT Press, 2016, ch. 8.
  """
  _moments.check_decay("decay", decay)
  nesterov, form = _nesterov_flag_and_form(nesterov, form)
  change_of_variables = nesterov and form == "change_of_variables"

  def init_fn(params):
    return ScaleByMomentumState(
        velocity=optax.tree.zeros_like(params, dtype=accumulator_dtype)
    )

  def update_fn(updates, state, params=None):
    del params
    step = lambda g, v: g + decay * v
    velocity = jax.tree.map(step, updates, state.velocity)
    if change_of_variables:
      updates = jax.tree.map(step, updates, velocity)
    else:
      updates = velocity
    if accumulator_dtype is not None:
      velocity = optax.tree.cast(velocity, accumulator_dtype)
    return updates, ScaleByMomentumState(velocity=velocity)

  return optax.GradientTransformation(init_fn, update_fn)


def _nesterov_flag_and_form(nesterov: Any,
                            form: Any) -> tuple[bool, NesterovForm]:
  """``(nesterov, form)`` checked; the old string ``nesterov`` values mapped."""
  if isinstance(nesterov, str) and nesterov in NESTEROV_FORMS:
    warnings.warn(
        f"`nesterov={nesterov!r}` is deprecated: pass `nesterov=True,"
        f" form={nesterov!r}`.", DeprecationWarning, stacklevel=3)
    nesterov, form = True, nesterov
  if not isinstance(nesterov, bool):
    raise TypeError(
        f"`nesterov` must be True or False, got {nesterov!r}; choose the"
        " Nesterov form with `form=` (one of "
        f"{', '.join(map(repr, NESTEROV_FORMS))}).")
  _validation.check_choice("form", form, NESTEROV_FORMS)
  return nesterov, form


def lookahead_params(params: Any, opt_state: Any, decay: Any) -> Any:
  r"""The look-ahead point :math:`\theta + \alpha v` of Nesterov momentum.

  Finds the single :class:`ScaleByMomentumState` inside ``opt_state`` (which
  may be a chain's nested state) and returns ``params + decay * velocity``.
  Meaningful when the momentum sits after the learning rate, so that the
  velocity is the parameter step (as in :func:`curvature.nesterov` with
  ``form="lookahead"``).

  Args:
    params: current parameters :math:`\theta`.
    opt_state: the optimizer state (any nesting).
    decay: the momentum :math:`\alpha`.

  Returns:
    The pytree :math:`\theta + \alpha v`, where the gradient is evaluated.

  Raises:
    ValueError: if ``opt_state`` holds no momentum state.
    KeyError: if it holds several (pass the momentum's own state instead).

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> value_fn = lambda p: 0.5 * jnp.sum(p ** 2)
    >>> opt = curvature.nesterov(0.1, 0.9, form="lookahead")
    >>> params = jnp.ones(2)
    >>> state = opt.init(params)
    >>> for _ in range(2):
    ...   ahead = curvature.lookahead_params(params, state, 0.9)
    ...   updates, state = opt.update(jax.grad(value_fn)(ahead), state)
    ...   params = optax.apply_updates(params, updates)
    >>> print([round(float(p), 4) for p in ahead])  # 0.9 + 0.9 * (-0.1)
    [0.81, 0.81]

  References:
    Sutskever, Martens, Dahl & Hinton, "On the importance of initialization
    and momentum in deep learning", ICML 2013.
  """
  state = optax.tree.get(opt_state, "ScaleByMomentumState")
  if state is None:
    raise ValueError("No ScaleByMomentumState found in opt_state.")
  return jax.tree.map(
      lambda p, v: p + (decay * v).astype(p.dtype), params, state.velocity
  )
