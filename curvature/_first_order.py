"""The first-order canon, as chains of the shared primitives.

Every alias takes ``learning_rate`` first (a float or an ``optax.schedules``
schedule) and is an ``optax.chain`` of :func:`curvature.scale_by_momentum`,
:func:`curvature.scale_by_ema`, :func:`curvature.scale_by_running_sum`,
:func:`curvature.scale_by_diagonal`, :func:`curvature.scale_by_adadelta`,
:func:`curvature.scale_by_delta_bar_delta` and
``optax.scale_by_learning_rate``. The defaults reproduce the optax optimizer
of the same name; the docstrings say which arguments give the textbook
variants (Goodfellow, Bengio & Courville, "Deep Learning", MIT Press, 2016,
ch. 8).

Non-finite gradients (one policy, the core's step rejection): by default a
NaN/Inf gradient propagates, as in optax. Pass ``max_consecutive_errors=N``
to reject such steps instead: the update is zero, the optimizer state is left
unchanged and the rejection is counted (``optax.apply_if_finite``); after
``N`` consecutive rejections the step is applied anyway.
"""

from typing import Any, Optional

import optax

from curvature import _adadelta
from curvature import _diagonal
from curvature import _moments
from curvature import _momentum
from curvature import _validation


def _learning_rate(learning_rate: Any) -> optax.GradientTransformation:
  _validation.check_nonnegative(
      "learning_rate",
      learning_rate,
      "Pass the step size as a positive number; the sign is applied for you.",
  )
  return optax.scale_by_learning_rate(learning_rate)


def _finish(
    *transforms: optax.GradientTransformation,
    max_consecutive_errors: Optional[int],
) -> optax.GradientTransformationExtraArgs:
  opt = optax.chain(*transforms)
  if max_consecutive_errors is None:
    return opt
  max_consecutive_errors = _validation.check_static_int(
      "max_consecutive_errors", max_consecutive_errors, 0
  )
  return optax.with_extra_args_support(
      optax.apply_if_finite(opt, max_consecutive_errors)
  )


def _damping(eps: Any, eps_in_root: bool) -> dict:
  """``eps`` as damping, inside or outside the square root."""
  if eps_in_root:
    return {"damping": 0.0, "damping_in_root": eps}
  return {"damping": eps, "damping_in_root": 0.0}


def sgd(
    learning_rate: Any,
    momentum: Optional[Any] = None,
    nesterov: bool = False,
    *,
    max_consecutive_errors: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Stochastic gradient descent, optionally with momentum (as ``optax.sgd``).

  .. math::
    \theta \leftarrow \theta - \epsilon g; \qquad \text{with momentum: }
    v \leftarrow \alpha v + g,\ \theta \leftarrow \theta - \epsilon v.

  Args:
    learning_rate: :math:`\epsilon \geq 0` or a schedule.
    momentum: :math:`\alpha \in [0, 1)` or ``None`` (plain SGD).
    nesterov: see :func:`curvature.scale_by_momentum` (``True`` is the
      change-of-variables form, as in ``optax.sgd``).
    max_consecutive_errors: non-finite policy (module docstring).

  Returns:
    An ``optax.GradientTransformationExtraArgs``. With the same arguments it
    reproduces ``optax.sgd``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> opt, reference = curvature.sgd(0.1, 0.9), optax.sgd(0.1, 0.9)
    >>> params = jnp.array([1.0, -2.0])
    >>> state, reference_state = opt.init(params), reference.init(params)
    >>> for _ in range(3):  # f(x) = |x|**2 / 2: the gradient is x
    ...   updates, state = opt.update(params, state)
    ...   expected, reference_state = reference.update(params, reference_state)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(jnp.allclose(updates, expected))
    True

  References:
    Robbins & Monro, "A stochastic approximation method", Annals of
    Mathematical Statistics, 1951.

    Polyak, "Some methods of speeding up the convergence of iteration
    methods", USSR Computational Mathematics and Mathematical Physics, 1964.

    Sutskever, Martens, Dahl & Hinton, "On the importance of initialization
    and momentum in deep learning", ICML 2013.

    Goodfellow, Bengio & Courville, "Deep Learning", MIT Press, 2016, ch. 8.
  """
  if momentum is None:
    first = optax.identity()
  else:
    _moments.check_decay("momentum", momentum)
    first = _momentum.scale_by_momentum(momentum, nesterov=nesterov)
  return _finish(
      first,
      _learning_rate(learning_rate),
      max_consecutive_errors=max_consecutive_errors,
  )


def heavy_ball(
    learning_rate: Any,
    momentum: Any = 0.9,
    *,
    max_consecutive_errors: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SGD with Polyak's heavy-ball momentum.

  .. math::
    v \leftarrow \alpha v - \epsilon g, \qquad \theta \leftarrow \theta + v

  (Goodfellow, Bengio & Courville 2016, Algorithm 8.2). Implemented with the
  velocity in gradient units (:math:`v \leftarrow \alpha v + g`, step
  :math:`-\epsilon v`), identical for a constant :math:`\epsilon` and equal
  to ``optax.sgd(lr, momentum)``.

  Args:
    learning_rate: :math:`\epsilon \geq 0` or a schedule.
    momentum: :math:`\alpha \in [0, 1)`, typically 0.9 or 0.99.
    max_consecutive_errors: non-finite policy (module docstring).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> opt = curvature.heavy_ball(0.1, momentum=0.9)
    >>> params = jnp.array([1.0])
    >>> state = opt.init(params)
    >>> for _ in range(2):  # f(x) = x**2 / 2: the gradient is x
    ...   updates, state = opt.update(params, state)
    ...   params = optax.apply_updates(params, updates)
    >>> print(round(float(params[0]), 4))  # 0.9, then 0.9 - 0.1 (0.9 + 0.9)
    0.72

  References:
    Polyak, "Some methods of speeding up the convergence of iteration
    methods", USSR Computational Mathematics and Mathematical Physics, 1964.

    Goodfellow, Bengio & Courville, "Deep Learning", MIT Press, 2016, ch. 8.
  """
  return sgd(
      learning_rate, momentum, max_consecutive_errors=max_consecutive_errors
  )


def nesterov(
    learning_rate: Any,
    momentum: Any = 0.9,
    *,
    form: _momentum.NesterovForm = "change_of_variables",
    max_consecutive_errors: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SGD with Nesterov momentum, in its look-ahead or change-of-variables form.

  ``form="lookahead"`` (Sutskever et al. 2013; Goodfellow, Bengio & Courville
  2016, Algorithm 8.3): the caller evaluates the gradient at
  :func:`curvature.lookahead_params` (:math:`\theta + \alpha v`), and

  .. math::
    v \leftarrow \alpha v - \epsilon \nabla J(\theta + \alpha v), \qquad
    \theta \leftarrow \theta + v.

  ``form="change_of_variables"`` (the gradient is taken at the iterate
  :math:`\tilde\theta = \theta + \alpha v` itself):

  .. math::
    v_{\text{new}} = \alpha v_{\text{old}} - \epsilon \nabla J(\tilde\theta),
    \qquad \tilde\theta \leftarrow \tilde\theta + v_{\text{new}} +
    \alpha (v_{\text{new}} - v_{\text{old}}).

  The change-of-variables form equals ``optax.sgd(lr, momentum,
  nesterov=True)``. In the look-ahead form the learning rate comes before the
  momentum, so ``v`` is the parameter step, as in the equation above.

  Args:
    learning_rate: :math:`\epsilon \geq 0` or a schedule.
    momentum: :math:`\alpha \in [0, 1)`.
    form: ``"change_of_variables"`` or ``"lookahead"``.
    max_consecutive_errors: non-finite policy (module docstring).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> opt = curvature.nesterov(0.1, 0.9)
    >>> reference = optax.sgd(0.1, 0.9, nesterov=True)
    >>> params = jnp.array([1.0, -2.0])
    >>> state, reference_state = opt.init(params), reference.init(params)
    >>> updates, state = opt.update(params, state)
    >>> expected, reference_state = reference.update(params, reference_state)
    >>> bool(jnp.allclose(updates, expected))
    True

  References:
    Nesterov, "A method for solving the convex programming problem with
    convergence rate O(1/k²)", Soviet Mathematics Doklady, 1983.

    Sutskever, Martens, Dahl & Hinton, "On the importance of initialization
    and momentum in deep learning", ICML 2013.

    Goodfellow, Bengio & Courville, "Deep Learning", MIT Press, 2016, ch. 8.
  """
  _validation.check_choice("form", form, _momentum.NESTEROV_FORMS)
  _moments.check_decay("momentum", momentum)
  if form == "lookahead":
    return _finish(
        _learning_rate(learning_rate),
        _momentum.scale_by_momentum(momentum, nesterov=True, form="lookahead"),
        max_consecutive_errors=max_consecutive_errors,
    )
  return sgd(
      learning_rate,
      momentum,
      nesterov=True,
      max_consecutive_errors=max_consecutive_errors,
  )


def adagrad(
    learning_rate: Any,
    initial_accumulator_value: Any = 0.1,
    eps: Any = 1e-7,
    *,
    eps_in_root: bool = True,
    max_consecutive_errors: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaGrad: precondition by the root of the summed squared gradients.

  .. math::
    a \leftarrow a + g \odot g, \qquad
    \theta \leftarrow \theta - \frac{\epsilon}{\sqrt{a + \nu}} \odot g
    \quad \left(\text{or } \frac{\epsilon}{\sqrt{a} + \nu}\right).

  ``scale_by_diagonal(scale_by_running_sum(), power=1/2)``: the running sum
  of the empirical-Fisher diagonal, square-rooted, with damping :math:`\nu`.
  Defaults reproduce ``optax.adagrad`` (:math:`a_0 = 0.1`, :math:`\nu` in the
  root). Duchi, Hazan & Singer (2011) and Goodfellow, Bengio & Courville
  (2016, Algorithm 8.4) start at :math:`a_0 = 0` with :math:`\nu` outside the
  root: ``initial_accumulator_value=0, eps_in_root=False``.

  Args:
    learning_rate: :math:`\epsilon \geq 0` or a schedule.
    initial_accumulator_value: :math:`a_0 \geq 0`.
    eps: damping :math:`\nu \geq 0`.
    eps_in_root: add :math:`\nu` inside (optax) or outside (Duchi et al.) the
      root.
    max_consecutive_errors: non-finite policy (module docstring).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> opt, reference = curvature.adagrad(0.1), optax.adagrad(0.1)
    >>> params = jnp.array([1.0, -2.0])
    >>> state, reference_state = opt.init(params), reference.init(params)
    >>> for g in ([0.5, -1.0], [0.25, 2.0]):
    ...   updates, state = opt.update(jnp.array(g), state)
    ...   expected, reference_state = reference.update(jnp.array(g),
    ...                                                reference_state)
    >>> bool(jnp.allclose(updates, expected))
    True

  References:
    Duchi, Hazan & Singer, "Adaptive subgradient methods for online learning
    and stochastic optimization", JMLR 2011.

    Goodfellow, Bengio & Courville, "Deep Learning", MIT Press, 2016, ch. 8.
  """
  return _finish(
      _diagonal.scale_by_diagonal(
          _moments.scale_by_running_sum(
              initial_value=initial_accumulator_value
          ),
          power=0.5,
          **_damping(eps, eps_in_root),
      ),
      _learning_rate(learning_rate),
      max_consecutive_errors=max_consecutive_errors,
  )


def rmsprop(
    learning_rate: Any,
    decay: Any = 0.9,
    eps: Any = 1e-8,
    initial_scale: Any = 0.0,
    eps_in_root: bool = True,
    momentum: Optional[Any] = None,
    nesterov: bool = False,
    *,
    max_consecutive_errors: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""RMSProp, optionally with (Nesterov) momentum on the preconditioned step.

  .. math::
    a \leftarrow \beta a + (1 - \beta) g \odot g, \qquad
    v \leftarrow \alpha v - \frac{\epsilon}{\sqrt{a + \nu}} \odot g, \qquad
    \theta \leftarrow \theta + v

  (without momentum :math:`\alpha = 0`). A diagonal, square-rooted EMA of
  the empirical Fisher, with damping :math:`\nu`; the momentum acts on the
  step after the learning rate, as in Graves (2013) and Goodfellow, Bengio &
  Courville (2016, Algorithm 8.6). Defaults reproduce ``optax.rmsprop``
  (:math:`\beta = 0.9`, :math:`\nu = 10^{-8}` in the root, :math:`a_0 = 0`);
  Goodfellow et al. (Algorithm 8.5) put :math:`\nu = 10^{-6}` in the root,
  PyTorch puts it outside (``eps_in_root=False``). Some implementations start
  at :math:`a_0 = 1` (``initial_scale=1``).

  Args:
    learning_rate: :math:`\epsilon \geq 0` or a schedule.
    decay: :math:`\beta \in [0, 1)`.
    eps: damping :math:`\nu \geq 0`.
    initial_scale: :math:`a_0 \geq 0`.
    eps_in_root: :math:`\nu` inside (optax, Goodfellow et al.) or outside
      (PyTorch) the root.
    momentum: :math:`\alpha \in [0, 1)` or ``None``.
    nesterov: momentum form, see :func:`curvature.scale_by_momentum`.
    max_consecutive_errors: non-finite policy (module docstring).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> opt, reference = curvature.rmsprop(1e-3), optax.rmsprop(1e-3)
    >>> params = jnp.array([1.0, -2.0])
    >>> state, reference_state = opt.init(params), reference.init(params)
    >>> for g in ([0.5, -1.0], [0.25, 2.0]):
    ...   updates, state = opt.update(jnp.array(g), state)
    ...   expected, reference_state = reference.update(jnp.array(g),
    ...                                                reference_state)
    >>> bool(jnp.allclose(updates, expected))
    True

  References:
    Tieleman & Hinton, "Lecture 6.5 - RMSProp: divide the gradient by a
    running average of its recent magnitude", COURSERA: Neural Networks for
    Machine Learning, 2012.

    Graves, "Generating sequences with recurrent neural networks",
    arXiv:1308.0850, 2013 (RMSProp with momentum).

    Goodfellow, Bengio & Courville, "Deep Learning", MIT Press, 2016, ch. 8.
  """
  _validation.check_nonnegative(
      "initial_scale",
      initial_scale,
      "It starts the running mean of squared gradients: use 0 (optax) or 1.",
  )
  second_moment = _moments.scale_by_ema(
      decay,
      statistic="square",
      bias_correction=False,
      initial_value=initial_scale,
  )
  transforms = [
      _diagonal.scale_by_diagonal(
          second_moment, power=0.5, **_damping(eps, eps_in_root)
      ),
      _learning_rate(learning_rate),
  ]
  if momentum is not None:
    _moments.check_decay("momentum", momentum)
    transforms.append(_momentum.scale_by_momentum(momentum, nesterov=nesterov))
  return _finish(*transforms, max_consecutive_errors=max_consecutive_errors)


def adam(
    learning_rate: Any,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    *,
    bias_correction: bool = True,
    max_consecutive_errors: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam: a square-rooted diagonal empirical-Fisher preconditioner, momentum.

  .. math::
    v \leftarrow \beta_1 v + (1-\beta_1) g, \quad
    a \leftarrow \beta_2 a + (1-\beta_2) g \odot g, \quad
    \tilde v = \frac{v}{1-\beta_1^t}, \quad \tilde a = \frac{a}{1-\beta_2^t},
    \quad
    \theta \leftarrow \theta - \epsilon\,
    \frac{\tilde v}{\sqrt{\tilde a + \nu_{\text{root}}} + \nu}.

  Built as ``scale_by_diagonal(curvature=scale_by_ema(b2, statistic=square),
  direction=scale_by_ema(b1), power=1/2, damping=eps,
  damping_in_root=eps_root)``: ``eps`` is damping of the curvature estimate.
  With ``bias_correction=False`` both moments are used raw: RMSProp on an
  EMA of the gradient, whose first steps are too small (Kingma & Ba 2015,
  §3); to put the damping inside the root only, use ``eps=0, eps_root=nu``.
  Defaults reproduce ``optax.adam``.

  Args:
    learning_rate: :math:`\epsilon \geq 0` or a schedule.
    b1: :math:`\beta_1 \in [0, 1)`, first-moment decay.
    b2: :math:`\beta_2 \in [0, 1)`, second-moment decay.
    eps: damping :math:`\nu \geq 0` outside the root.
    eps_root: damping :math:`\nu_{\text{root}} \geq 0` inside the root.
    bias_correction: divide both moments by :math:`1 - \beta^t`.
    max_consecutive_errors: non-finite policy (module docstring).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> opt, reference = curvature.adam(1e-3), optax.adam(1e-3)
    >>> params = jnp.array([1.0, -2.0])
    >>> state, reference_state = opt.init(params), reference.init(params)
    >>> for g in ([0.5, -1.0], [0.25, 2.0]):
    ...   updates, state = opt.update(jnp.array(g), state)
    ...   expected, reference_state = reference.update(jnp.array(g),
    ...                                                reference_state)
    >>> bool(jnp.allclose(updates, expected))
    True

  References:
    Kingma & Ba, "Adam: a method for stochastic optimization", ICLR 2015.

    Goodfellow, Bengio & Courville, "Deep Learning", MIT Press, 2016, ch. 8.
  """
  _moments.check_decay("b1", b1)
  _moments.check_decay("b2", b2)
  return _finish(
      _diagonal.scale_by_diagonal(
          _moments.scale_by_ema(
              b2, statistic="square", bias_correction=bias_correction
          ),
          direction=_moments.scale_by_ema(b1, bias_correction=bias_correction),
          power=0.5,
          damping=eps,
          damping_in_root=eps_root,
      ),
      _learning_rate(learning_rate),
      max_consecutive_errors=max_consecutive_errors,
  )


def adadelta(
    learning_rate: Any = 1.0,
    rho: Any = 0.9,
    eps: Any = 1e-6,
    *,
    form: str = "updates",
    max_consecutive_errors: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaDelta, in Zeiler's form (default) or the squared-weights form.

  .. math::
    \Delta\theta = -\epsilon\,
    \frac{\sqrt{E[\Delta\theta^2] + \nu}}{\sqrt{E[g^2] + \nu}}\, g
    \quad \text{or} \quad
    -\epsilon \sqrt{\frac{E[w^2] + \nu}{E[g^2] + \nu}}\, g,

  see :func:`curvature.scale_by_adadelta`. Zeiler's form with the same
  arguments reproduces ``optax.adadelta`` (which tracks :math:`E[\Delta
  \theta^2]` of the step before the learning rate, as here); Zeiler used
  :math:`\epsilon = 1`.

  Args:
    learning_rate: :math:`\epsilon \geq 0` or a schedule (default 1).
    rho: decay :math:`\rho \in [0, 1)`.
    eps: damping :math:`\nu \geq 0`.
    form: ``"updates"`` (Zeiler) or ``"weights"`` (running average of squared
      weights); see :func:`curvature.scale_by_adadelta`.
    max_consecutive_errors: non-finite policy (module docstring).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> opt = curvature.adadelta(1.0, rho=0.95)
    >>> reference = optax.adadelta(1.0, rho=0.95)
    >>> params = jnp.array([1.0, -2.0])
    >>> state, reference_state = opt.init(params), reference.init(params)
    >>> for g in ([0.5, -1.0], [0.25, 2.0]):
    ...   updates, state = opt.update(jnp.array(g), state, params)
    ...   expected, reference_state = reference.update(
    ...       jnp.array(g), reference_state, params)
    >>> bool(jnp.allclose(updates, expected))
    True

  References:
    Zeiler, "ADADELTA: an adaptive learning rate method", arXiv:1212.5701,
    2012.
  """
  return _finish(
      _adadelta.scale_by_adadelta(rho, eps, form=form),
      _learning_rate(learning_rate),
      max_consecutive_errors=max_consecutive_errors,
  )


def delta_bar_delta(
    learning_rate: Any,
    kappa: Any = 0.01,
    phi: Any = 0.1,
    theta: Any = 0.7,
    *,
    max_consecutive_errors: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Jacobs' delta-bar-delta: per-parameter learning rates (full batch).

  :math:`\theta \leftarrow \theta - \epsilon\, r \odot g`, with gains
  :math:`r` (starting at 1) raised by :math:`\kappa` while the gradient
  agrees in sign with its running average, and multiplied by
  :math:`1 - \phi` when it flips; see
  :func:`curvature.scale_by_delta_bar_delta`.

  Args:
    learning_rate: :math:`\epsilon \geq 0` or a schedule.
    kappa: additive gain increase.
    phi: multiplicative gain decrease, in ``[0, 1)``.
    theta: decay of the gradient average, in ``[0, 1)``.
    max_consecutive_errors: non-finite policy (module docstring).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> opt = curvature.delta_bar_delta(0.1)
    >>> params = jnp.array([1.0, -2.0])
    >>> state = opt.init(params)
    >>> for _ in range(20):  # f(x) = |x|**2 / 2: the gradient is x
    ...   updates, state = opt.update(params, state)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(jnp.linalg.norm(params) < 0.5)
    True

  References:
    Jacobs, "Increased rates of convergence through learning rate
    adaptation", Neural Networks, 1988.

    Goodfellow, Bengio & Courville, "Deep Learning", MIT Press, 2016, ch. 8.
  """
  return _finish(
      _adadelta.scale_by_delta_bar_delta(kappa, phi, theta),
      _learning_rate(learning_rate),
      max_consecutive_errors=max_consecutive_errors,
  )
