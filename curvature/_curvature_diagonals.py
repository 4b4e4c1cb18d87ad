r"""Diagonal curvature estimators: empirical and sampled Fisher, GGN, Hessian.

Each estimator is a function returning a pytree like ``params`` and is also
available as a transform (:func:`ema_curvature_diagonal`) that keeps a
bias-corrected EMA of it, ready for the ``curvature`` slot of
:func:`curvature.scale_by_diagonal`; :func:`scale_by_curvature_diagonal`
plugs it in with a power ``p`` and damping:

.. math::
  u = \frac{g}{(\hat d_t)^{p} + \lambda}, \qquad
  \hat d_t = \frac{\text{EMA}_\beta(d)}{1 - \beta^t}

The per-example squared gradients behind the Fisher-type estimators are
``(J_iᵀ c_i)²`` for an output-space cotangent ``c_i``: the data's output
gradient (empirical Fisher), a sampled one (Monte-Carlo Fisher), or the
columns of a square root of the output Hessian (exact GGN). They are computed
chunk by chunk by :func:`curvature.empirical_fisher_diagonal` applied to a
*linear* loss whose output gradient is ``c_i``.
"""

from typing import Any, Callable, NamedTuple, Optional, cast

import jax
import jax.numpy as jnp
import optax

from curvature import _diagonal
from curvature import _losses
from curvature import _moments
from curvature import _products
from curvature import _sharding
from curvature import _validation

Array = jax.Array
Params = Any

ESTIMATORS = ("empirical_fisher", "sampled_fisher", "ggn", "hutchinson")
"""Names of the diagonal estimators of :func:`ema_curvature_diagonal`."""


def _no_targets(batch):
  """The targets of an estimator that does not use them: none."""
  del batch
  return None


def _linear_per_example(outputs, cotangents):
  return jnp.sum(outputs * cotangents, axis=tuple(range(1, outputs.ndim)))


def _no_output_curvature(*args):
  """``_LINEAR``'s curvature and sampler: it has none, and none is used."""
  del args
  raise NotImplementedError("the linear pairing has no output curvature")


_LINEAR = _losses.Loss(
    name="linear", per_example=_linear_per_example, hvp=_no_output_curvature,
    fisher_vp=_no_output_curvature, sample=_no_output_curvature)


def squared_vjp_mean(
    predict_fn: Callable[[Params, Any], Array],
    params: Params,
    batch: Any,
    cotangents: Array,
    *,
    chunk_size: int = 32,
) -> Params:
  r"""``(1/N) Σᵢ (Jᵢᵀ cᵢ)²``: mean squared per-example vector-Jacobian products.

  Args:
    predict_fn: ``(params, batch) -> outputs``.
    params: the point.
    batch: the data, leading example axis on every leaf.
    cotangents: ``cᵢ``, shaped like the outputs.
    chunk_size: examples per vectorized chunk.

  Returns:
    A pytree like ``params``.
  """
  return _products.empirical_fisher_diagonal(
      lambda p, b: predict_fn(p, b[0]), _LINEAR, params, (batch, cotangents),
      targets_fn=lambda b: b[1], chunk_size=chunk_size)


def sampled_fisher_diagonal(
    predict_fn: Callable[[Params, Any], Array],
    loss: _losses.Loss,
    params: Params,
    batch: Any,
    *,
    key: Array,
    num_samples: int = 1,
    chunk_size: int = 32,
    axis_name: _validation.AxisName = None,
) -> Params:
  r"""Monte-Carlo diagonal of the true Fisher (= GGN for canonical losses).

  .. math::
    \hat d = \frac{1}{NS}\sum_{i,s} (\nabla_\theta \ell_i(\tilde y_{is}))^2,
    \quad \tilde y_{is} \sim p(y \mid x_i, \theta),
    \qquad \mathbb{E}[\hat d] = \mathrm{diag}(F)

  Args:
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    params: the point.
    batch: the data (its targets are not used).
    key: PRNG key for the sampled targets.
    num_samples: ``S``, targets per example.
    chunk_size: examples per vectorized chunk.
    axis_name: inside ``jax.shard_map``, the mesh axis (str or tuple of
      str) the batch is sharded over: the per-shard estimate is
      ``pmean``-ed into the global-batch one, and every device draws its own
      targets (the device index is folded into ``key``). ``None``: no
      reduction.

  Returns:
    A pytree like ``params``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> def predict(params, batch):
    ...   return batch["inputs"] @ params["w"] + params["b"]
    >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    >>> batch = {"inputs": jax.random.normal(jax.random.key(0), (8, 4)),
    ...          "targets": jnp.arange(8) % 3}
    >>> loss = curvature.losses.softmax_cross_entropy
    >>> d = curvature.sampled_fisher_diagonal(
    ...     predict, loss, params, batch, key=jax.random.key(1),
    ...     num_samples=4)
    >>> d["w"].shape, bool(jnp.all(d["w"] >= 0))
    ((4, 3), True)

  References:
    Martens, "New insights and perspectives on the natural gradient method",
    JMLR 2020.

    Kunstner, Hennig & Balles, "Limitations of the empirical Fisher
    approximation for natural gradient descent", NeurIPS 2019.
  """
  num_samples = _validation.check_static_int("num_samples", num_samples, 1)
  axis_name = _validation.check_axis_name(axis_name)
  _products.batch_size(batch, _no_targets)
  params = _products.as_varying(params, axis_name)
  key = _products.shard_key(key, axis_name)
  outputs = jax.lax.stop_gradient(predict_fn(params, batch))

  def one(sample_key):
    targets = loss.sample(sample_key, outputs)
    cot = _losses.output_gradients(loss, outputs, targets)
    return squared_vjp_mean(predict_fn, params, batch, cot,
                            chunk_size=chunk_size)

  total = jax.lax.map(one, jax.random.split(key, num_samples))
  return _products.batch_mean(
      jax.tree.map(lambda x: jnp.mean(x, axis=0), total), axis_name)


def ggn_diagonal(
    predict_fn: Callable[[Params, Any], Array],
    loss: _losses.Loss,
    params: Params,
    batch: Any,
    *,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    max_output_dim: int = 64,
    chunk_size: int = 32,
    axis_name: _validation.AxisName = None,
) -> Params:
  r"""The exact GGN diagonal ``diag(Σᵢ Jᵢᵀ Hᵢ Jᵢ)`` for few outputs per example.

  Each example's output Hessian ``Hᵢ`` (``K × K``, ``K`` the number of
  outputs per example) is factored as ``Lᵢ Lᵢᵀ`` by an eigendecomposition,
  so ``diag(G) = Σ_c Σᵢ (Jᵢᵀ Lᵢ[:, c])²``: ``K`` passes of per-example
  vector-Jacobian products.

  Args:
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    params: the point.
    batch: the data.
    targets_fn: finds the targets in ``batch``.
    max_output_dim: refuse ``K`` above this (a Python int).
    chunk_size: examples per vectorized chunk.
    axis_name: inside ``jax.shard_map``, the mesh axis (str or tuple of
      str) the batch is sharded over: the per-shard estimate is
      ``pmean``-ed into the global-batch one. ``None``: no reduction.

  Returns:
    A pytree like ``params``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> def predict(params, batch):
    ...   return batch["inputs"] @ params["w"] + params["b"]
    >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    >>> batch = {"inputs": jax.random.normal(jax.random.key(0), (8, 4)),
    ...          "targets": jnp.arange(8) % 3}
    >>> loss = curvature.losses.softmax_cross_entropy
    >>> d = curvature.ggn_diagonal(predict, loss, params, batch)
    >>> # At zero logits every class has p = 1/3: diag(G)_b = 1/3 - 1/9.
    >>> print([round(float(x), 4) for x in d["b"]])
    [0.2222, 0.2222, 0.2222]

  References:
    Schraudolph, "Fast curvature matrix-vector products for second-order
    gradient descent", Neural Computation, 2002.

    Martens, "New insights and perspectives on the natural gradient method",
    JMLR 2020, §9.
  """
  max_output_dim = _validation.check_static_int(
      "max_output_dim", max_output_dim, 1)
  axis_name = _validation.check_axis_name(axis_name)
  _products.batch_size(batch, targets_fn)
  params = _products.as_varying(params, axis_name)
  outputs = jax.lax.stop_gradient(predict_fn(params, batch))
  targets = targets_fn(batch)
  n = outputs.shape[0]
  k = outputs.size // n
  if k > max_output_dim:
    raise ValueError(
        f"ggn_diagonal needs {k} passes (outputs per example) but"
        f" max_output_dim={max_output_dim}. Use sampled_fisher_diagonal (an"
        " unbiased estimate) or raise max_output_dim.")
  basis = jnp.eye(k, dtype=outputs.dtype)

  def hessian_column(e):
    tangent = jnp.broadcast_to(e.reshape(outputs.shape[1:]), outputs.shape)
    return loss.hvp(outputs, targets, tangent).reshape(n, k)

  hessians = jnp.moveaxis(jax.vmap(hessian_column)(basis), 0, -1)  # [n,k,k]
  hessians = 0.5 * (hessians + jnp.swapaxes(hessians, 1, 2))
  w, v = jnp.linalg.eigh(hessians)
  roots = v * jnp.sqrt(jnp.maximum(w, 0.0))[:, None, :]  # L_i, [n, k, k]

  def column(c):
    cot = roots[:, :, c].reshape(outputs.shape)
    return squared_vjp_mean(predict_fn, params, batch, cot,
                            chunk_size=chunk_size)

  total = jax.lax.map(column, jnp.arange(k))
  return _products.batch_mean(
      jax.tree.map(lambda x: n * jnp.sum(x, axis=0), total), axis_name)


def hutchinson_hessian_diagonal(
    predict_fn: Callable[[Params, Any], Array],
    loss: _losses.Loss,
    params: Params,
    batch: Any,
    *,
    key: Array,
    num_samples: int = 100,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    axis_name: _validation.AxisName = None,
) -> Params:
  r"""Hutchinson's estimate of the Hessian diagonal with Rademacher probes.

  .. math::
    \hat d = \frac1S \sum_s v_s \odot H v_s, \quad
    v_s \in \{-1, +1\}^P, \qquad \mathbb{E}[\hat d] = \mathrm{diag}(H)

  One linearization of the gradient is shared by all probes.

  Args:
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    params: the point.
    batch: the data.
    key: PRNG key for the probes.
    num_samples: ``S`` (100, as PyHessian).
    targets_fn: finds the targets in ``batch``.
    axis_name: inside ``jax.shard_map``, the mesh axis (str or tuple of
      str) the batch is sharded over: the Hessian products are
      ``pmean``-ed (global batch) and the probes, drawn from ``key``, are
      the same on every device. ``None``: no reduction.

  Returns:
    A pytree like ``params`` (it can be negative: the Hessian is indefinite).

  References:
    Hutchinson, "A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines", Communications in Statistics -
    Simulation and Computation, 1990.

    Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix",
    Applied Numerical Mathematics, 2007.

    Yao, Gholami, Keutzer & Mahoney, "PyHessian: neural networks through the
    lens of the Hessian", IEEE BigData 2020.
  """
  num_samples = _validation.check_static_int("num_samples", num_samples, 1)
  _products.batch_size(batch, targets_fn)
  lin = _products.linearize(predict_fn, loss, params, batch,
                            curvature="hessian", targets_fn=targets_fn,
                            axis_name=axis_name)
  leaves, treedef = jax.tree.flatten(params)

  def one(probe_key):
    keys = jax.random.split(probe_key, len(leaves))
    probe = treedef.unflatten([
        _sharding.shard_like(jax.random.rademacher(k, x.shape, x.dtype), x)
        for k, x in zip(keys, leaves)])
    return jax.tree.map(jnp.multiply, probe, lin.matvec(probe))

  total = jax.lax.map(one, jax.random.split(key, num_samples))
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), total)


class CurvatureDiagonalState(NamedTuple):
  """State of :func:`ema_curvature_diagonal`.

  Attributes:
    count: accepted (finite) estimates so far, for the bias correction.
    ema: the raw EMA of the diagonal estimates.
    key: PRNG key for the stochastic estimators.
    rejected_statistics: estimates discarded because they were not finite.
    clipped_statistics: steps whose output had negative entries clipped to
      0 (``clip_negative=True``; a Hutchinson estimate of an indefinite
      Hessian).
    rejected_steps: updates of :func:`scale_by_curvature_diagonal` replaced
      by zeros because they were not finite (0 for this transform alone).
  """

  count: Array
  ema: Params
  key: Array
  rejected_statistics: Array
  clipped_statistics: Array
  rejected_steps: Array


def _estimate(estimator, predict_fn, loss, params, batch, key, num_samples,
              targets_fn, axis_name):
  if estimator == "empirical_fisher":
    return _products.empirical_fisher_diagonal(
        predict_fn, loss, params, batch, targets_fn=targets_fn,
        axis_name=axis_name)
  if estimator == "sampled_fisher":
    return sampled_fisher_diagonal(predict_fn, loss, params, batch, key=key,
                                   num_samples=num_samples,
                                   axis_name=axis_name)
  if estimator == "ggn":
    return ggn_diagonal(predict_fn, loss, params, batch,
                        targets_fn=targets_fn, axis_name=axis_name)
  return hutchinson_hessian_diagonal(predict_fn, loss, params, batch,
                                     key=key, num_samples=num_samples,
                                     targets_fn=targets_fn,
                                     axis_name=axis_name)


def ema_curvature_diagonal(
    predict_fn: Callable[[Params, Any], Array],
    loss: _losses.Loss,
    *,
    estimator: str = "sampled_fisher",
    decay: float = 0.95,
    num_samples: int = 1,
    statistics_batch_size: Optional[int] = None,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    seed: int = 0,
    axis_name: _validation.AxisName = None,
    clip_negative: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Replaces the updates by a bias-corrected EMA of a curvature diagonal.

  .. math::
    m_t = \beta m_{t-1} + (1-\beta)\, d(\theta_t), \qquad
    \text{output } m_t / (1 - \beta^t)

  with ``d`` one of :data:`ESTIMATORS`: ``"empirical_fisher"`` (exact,
  per-example squared gradients with the data's labels),
  ``"sampled_fisher"`` (Monte-Carlo true Fisher / GGN diagonal with
  ``num_samples`` sampled targets), ``"ggn"`` (exact GGN diagonal, small
  output dimension) or ``"hutchinson"`` (Hessian diagonal from
  ``num_samples`` Rademacher probes). A non-finite estimate is discarded (the
  EMA is not poisoned) and counted. Use it as the ``curvature`` of
  :func:`curvature.scale_by_diagonal`.

  Args:
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    estimator: one of :data:`ESTIMATORS`.
    decay: EMA decay ``β`` (0.95, as K-FAC).
    num_samples: samples (targets or probes) per estimate.
    statistics_batch_size: leading examples of the batch used (``None``:
      all).
    targets_fn: finds the targets in a batch.
    seed: PRNG seed (kept in the state).
    axis_name: inside ``jax.shard_map``, the mesh axis (str or tuple of
      str) the batch is sharded over: each estimate is ``pmean``-ed into the
      global-batch one (sampled targets are drawn independently per device,
      Hutchinson probes are shared). ``None``: no reduction (plain ``jit``).
      ``statistics_batch_size`` then counts examples per shard.
    clip_negative: clip negative entries of the output at 0 (the EMA itself
      is kept unclipped, so it stays an unbiased average); the steps where
      this happened are counted in ``clipped_statistics``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`CurvatureDiagonalState`.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> def predict(params, batch):
    ...   return batch["inputs"] @ params["w"] + params["b"]
    >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    >>> batch = {"inputs": jax.random.normal(jax.random.key(0), (8, 4)),
    ...          "targets": jnp.arange(8) % 3}
    >>> ema = curvature.ema_curvature_diagonal(
    ...     predict, curvature.losses.softmax_cross_entropy, estimator="ggn")
    >>> state = ema.init(params)
    >>> d, state = jax.jit(ema.update)(params, state, params, batch=batch)
    >>> print([round(float(x), 4) for x in d["b"]])  # debiased: no 1 - beta
    [0.2222, 0.2222, 0.2222]

  References:
    Martens, "New insights and perspectives on the natural gradient method",
    JMLR 2020.

    Kunstner, Hennig & Balles, "Limitations of the empirical Fisher
    approximation for natural gradient descent", NeurIPS 2019.
  """
  _validation.check_choice("estimator", estimator, ESTIMATORS)
  _moments.check_decay("decay", decay)
  num_samples = _validation.check_static_int("num_samples", num_samples, 1)
  statistics_batch_size = _validation.check_optional_static_int(
      "statistics_batch_size", statistics_batch_size, 1)
  _losses.check_model(predict_fn, loss)
  axis_name = _validation.check_axis_name(axis_name)

  def init_fn(params):
    _validation.check_params(params, "scale_by_curvature_diagonal")
    zero = jnp.zeros([], jnp.int32)
    return CurvatureDiagonalState(
        count=zero, ema=optax.tree.zeros_like(params),
        key=jax.random.key(seed), rejected_statistics=zero,
        clipped_statistics=zero, rejected_steps=zero)

  def update_fn(updates, state, params=None, *, batch=None, **extra_args):
    del updates, extra_args
    _validation.check_update_args("ema_curvature_diagonal", None, params,
                                  batch)
    _validation.check_state(params, state.ema)
    _products.batch_size(
        batch, _no_targets if estimator == "sampled_fisher" else targets_fn)
    if statistics_batch_size is not None:
      batch = _products.take_examples(batch, statistics_batch_size)
    key, sample_key = jax.random.split(state.key)
    estimate = _estimate(estimator, predict_fn, loss, params, batch,
                         sample_key, num_samples, targets_fn, axis_name)
    finite = _validation.all_finite(estimate)
    ema = optax.tree.where(
        finite, _moments.ema_update(state.ema, estimate, decay), state.ema)
    count = state.count + finite.astype(jnp.int32)
    out = _moments.debias(ema, decay, jnp.maximum(count, 1))
    clipped = jnp.zeros((), bool)
    if clip_negative:
      clipped = jnp.any(jnp.asarray(
          [jnp.any(x < 0) for x in jax.tree.leaves(out)]))
      out = jax.tree.map(lambda x: jnp.maximum(x, 0), out)
    return out, state._replace(
        count=count, ema=ema, key=key,
        rejected_statistics=state.rejected_statistics
        + (~finite).astype(jnp.int32),
        clipped_statistics=state.clipped_statistics
        + clipped.astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_curvature_diagonal(
    predict_fn: Callable[[Params, Any], Array],
    loss: _losses.Loss,
    *,
    estimator: str = "sampled_fisher",
    decay: float = 0.95,
    power: float = 1.0,
    damping: float = 1e-3,
    num_samples: int = 1,
    statistics_batch_size: Optional[int] = None,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    seed: int = 0,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Diagonal natural-gradient / Newton direction ``g / (d̂ᵖ + λ)``.

  :func:`curvature.scale_by_diagonal` with :func:`ema_curvature_diagonal` in
  its curvature slot. ``p = 1`` is the diagonal natural gradient (Fisher) or
  diagonal Gauss-Newton. With ``estimator="hutchinson"`` the diagonal of an
  indefinite Hessian may be negative: for ``p ≠ 1`` it is clipped at 0 before
  the power (a negative number has no real fractional power) and the steps
  where that happened are counted in ``clipped_statistics``; with ``p = 1``
  it is used as is, so use ``p = 1`` with care there.

  **Non-finite values.** ``λ`` must be ``> 0``: a parameter the loss does
  not use (or a dead unit) has a zero diagonal, and ``0 / 0`` is NaN. An
  update that is still not finite (a NaN gradient, an injected ``λ = 0``,
  ``d̂ + λ = 0`` with ``p = 1``) is replaced by zeros and counted in the
  ``rejected_steps`` field of the :class:`CurvatureDiagonalState` (in
  ``state.curvature``); the parameters never see it.

  Args:
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    estimator: one of :data:`ESTIMATORS`.
    decay: EMA decay of the diagonal.
    power: ``p > 0``, a number.
    damping: ``λ > 0``, added after the power; a number. For a schedule,
      inject it: ``curvature.inject_hyperparams(
      curvature.scale_by_curvature_diagonal)(damping=schedule, ...)``.
    num_samples: samples per estimate.
    statistics_batch_size: leading examples used for the estimate.
    targets_fn: finds the targets in a batch.
    seed: PRNG seed.
    axis_name: inside ``jax.shard_map``, the mesh axis the batch is sharded
      over: the diagonal estimate and the incoming gradient (local or
      global) are ``pmean``-ed over it (see :func:`ema_curvature_diagonal`
      and :func:`curvature.scale_by_hessian_free`). ``None``: no reduction.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state
    :class:`curvature.ScaleByDiagonalState` whose ``curvature`` is a
    :class:`CurvatureDiagonalState`).

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> def predict(params, batch):
    ...   return batch["inputs"] @ params["w"] + params["b"]
    >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    >>> batch = {"inputs": jax.random.normal(jax.random.key(0), (8, 4)),
    ...          "targets": jnp.arange(8) % 3}
    >>> import optax
    >>> loss = curvature.losses.softmax_cross_entropy
    >>> opt = optax.chain(
    ...     curvature.scale_by_curvature_diagonal(predict, loss,
    ...                                           estimator="ggn"),
    ...     optax.scale_by_learning_rate(0.1))
    >>> state = opt.init(params)
    >>> grads = jax.grad(
    ...     lambda p: loss.value(predict(p, batch), batch["targets"]))(params)
    >>> updates, state = jax.jit(opt.update)(grads, state, params,
    ...                                      batch=batch)
    >>> updates["w"].shape, int(state[0].curvature.rejected_steps)
    ((4, 3), 0)

  References:
    Amari, "Natural gradient works efficiently in learning", Neural
    Computation, 1998.

    Martens, "New insights and perspectives on the natural gradient method",
    JMLR 2020.

    Kunstner, Hennig & Balles, "Limitations of the empirical Fisher
    approximation for natural gradient descent", NeurIPS 2019.
  """
  schedule_fix = (
      "For a schedule, inject it: `curvature.inject_hyperparams("
      "curvature.scale_by_curvature_diagonal)(damping=schedule, ...)`.")
  _validation.check_not_schedule("damping", damping, schedule_fix)
  _validation.check_not_schedule("power", power, "Use 0.5 or 1.")
  _validation.check_positive(
      "damping", damping,
      "A parameter the loss does not use has a zero curvature diagonal, and"
      " its update would be 0/0 = NaN: use a small damping such as 1e-3 (the"
      " default).")
  clip_negative = not (isinstance(power, (int, float)) and power == 1)
  transform = _diagonal.scale_by_diagonal(
      ema_curvature_diagonal(
          predict_fn, loss, estimator=estimator, decay=decay,
          num_samples=num_samples,
          statistics_batch_size=statistics_batch_size,
          targets_fn=targets_fn, seed=seed, axis_name=axis_name,
          clip_negative=clip_negative),
      power=power, damping=damping)

  def update_fn(updates, state, params=None, **extra_args):
    updates = _products.batch_mean(updates, axis_name)
    new_updates, new_state = transform.update(updates, state, params,
                                              **extra_args)
    # optax types states as any pytree; scale_by_diagonal's is this one.
    new_state = cast(_diagonal.ScaleByDiagonalState, new_state)
    finite = _validation.all_finite(new_updates)
    new_updates = optax.tree.where(
        finite, new_updates, optax.tree.zeros_like(new_updates))
    curvature_state = new_state.curvature
    curvature_state = curvature_state._replace(
        rejected_steps=curvature_state.rejected_steps
        + (~finite).astype(jnp.int32))
    return new_updates, new_state._replace(curvature=curvature_state)

  return optax.GradientTransformationExtraArgs(transform.init, update_fn)
