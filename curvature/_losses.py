"""Output-space losses with their curvature.

A :class:`Loss` scores a model's outputs ``z = predict_fn(params, batch)``
against targets and carries the two output-space matrices that the
curvature-vector products need:

* ``hvp``: the Hessian of the loss value with respect to the outputs,
  ``∇²_z L(z, y)``, in closed form. It is the middle factor of the generalized
  Gauss-Newton matrix ``G = Jᵀ (∇²_z L) J`` (Schraudolph 2002).
* ``fisher_vp``: the output-space Fisher ``E_{y ~ p(y|z)}[∇_z ℓ ∇_z ℓᵀ]`` of
  the model's predictive distribution, in closed form. It is the middle factor
  of the true Fisher ``F = Jᵀ F_z J``.

and a sampler of targets from the predictive distribution ``p(y | z)``, for the
Monte-Carlo true Fisher.

Conventions:

* The leading axis of ``outputs`` indexes examples. An example's loss is the
  sum of the elementwise losses over every other axis (pixels, classes,
  time steps); :meth:`Loss.value` is the *mean* of the per-example losses over
  the leading axis. All curvature matrices are those of that mean.
* Every loss here is the negative log-likelihood of an exponential family in
  its natural parameters (softmax for categorical, sigmoid for Bernoulli,
  identity for a unit-variance Gaussian), i.e. the output layer uses the
  *canonical link*. For such losses ``∇²_z L`` does not depend on the targets
  and equals the output-space Fisher, so **the GGN equals the true Fisher**
  (Martens, "New insights and perspectives on the natural gradient method",
  JMLR 2020, §9.2). The two differ only for soft targets that do not sum to
  one (the Hessian is then scaled by the targets' sum) and for non-canonical
  losses. The *empirical* Fisher, built from the data labels instead of
  sampled ones, is a different matrix for every loss (Kunstner, Hennig &
  Balles, "Limitations of the empirical Fisher approximation for natural
  gradient descent", NeurIPS 2019; Martens 2020).
* Integer labels of :data:`softmax_cross_entropy` must lie in
  ``[0, num_classes)``. Concrete labels outside that range raise a
  ``ValueError``; traced ones (inside ``jit``) give that example a NaN loss
  and a NaN gradient, never a silently wrong class (−1 is not the last
  class), so the non-finite guards of the transforms reject the step and
  count it (``rejected_steps``), as ``optax.apply_if_finite`` does for the
  first-order ones.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array


class Loss(NamedTuple):
  """An output-space loss with its value, curvature and sampler.

  Attributes:
    name: a short name, used in summaries and error messages.
    per_example: ``(outputs, targets) -> [batch]`` loss of each example (the
      sum over all non-leading axes).
    hvp: ``(outputs, targets, tangent) -> tangent``: the Hessian of
      :meth:`value` with respect to ``outputs``, applied to ``tangent``.
    fisher_vp: ``(outputs, tangent) -> tangent``: the exact output-space
      Fisher of :meth:`value`, applied to ``tangent``.
    sample: ``(key, outputs) -> targets``: one target per example drawn from
      the model's predictive distribution ``p(y | outputs)``.
    fisher_factor: ``(key, outputs) -> cotangents``: per example a random
      ``cᵢ = Bᵢ vᵢ`` with Rademacher ``vᵢ`` and ``BᵢBᵢᵀ`` the example's
      output Fisher (not divided by the batch size), so ``E[cᵢcᵢᵀ] = Fᵢ``:
      curvature propagation (Martens, Sutskever & Swersky 2012), a
      lower-variance probe than a sampled target's gradient. ``None`` for a
      loss that has no such factor.
  """

  name: str
  per_example: Callable[[Array, Any], Array]
  hvp: Callable[[Array, Any, Array], Array]
  fisher_vp: Callable[[Array, Array], Array]
  sample: Callable[[Array, Array], Any]
  fisher_factor: Optional[Callable[[Array, Array], Array]] = None

  def value(self, outputs: Array, targets: Any) -> Array:
    """The mean of the per-example losses over the leading (batch) axis."""
    return jnp.mean(self.per_example(outputs, targets))


def _sum_non_batch(x: Array) -> Array:
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _batch_size(outputs: Array) -> int:
  if outputs.ndim == 0:
    raise ValueError(
        "Model outputs must have a leading batch axis; got a scalar. Make"
        " `predict_fn(params, batch)` return an array of shape [batch, ...]."
    )
  return outputs.shape[0]


# Softmax cross-entropy ------------------------------------------------------


def _is_integer_labels(targets: Any) -> bool:
  return jnp.issubdtype(jnp.asarray(targets).dtype, jnp.integer)


def _check_labels(labels: Array, num_classes: int) -> Array:
  """``0 <= labels < num_classes`` elementwise; raises if labels are concrete.

  Concrete labels (outside ``jit``) that fall outside the range raise a
  ``ValueError`` at once. Traced labels, and global arrays that span other
  processes' devices, cannot be read at trace time: the returned mask makes
  the loss NaN for the invalid ones instead.
  """
  readable = not isinstance(labels, jax.core.Tracer) and (
      not isinstance(labels, jax.Array) or labels.is_fully_addressable)
  if readable:
    concrete = np.asarray(labels)
    bad = (concrete < 0) | (concrete >= num_classes)
    if np.any(bad):
      raise ValueError(
          f"Integer labels must lie in [0, {num_classes}) for {num_classes}"
          f" classes, got {concrete[bad].ravel()[:5].tolist()} (negative"
          " labels are not wrapped to the last class). Fix the labels, or"
          " mask ignored examples out of the batch.")
  return (labels >= 0) & (labels < num_classes)


def _softmax_ce_per_example(logits: Array, targets: Array) -> Array:
  if _is_integer_labels(targets):
    if targets.shape != logits.shape[:-1]:
      raise ValueError(
          f"Integer labels of shape {targets.shape} do not fit logits of shape"
          f" {logits.shape}: labels need the logits' shape without its last"
          " (class) axis."
      )
    valid = _check_labels(targets, logits.shape[-1])
    elementwise = optax.losses.softmax_cross_entropy_with_integer_labels(
        logits, jnp.where(valid, targets, 0)
    )
    # An invalid label scores NaN (and so does its gradient), so every
    # non-finite guard downstream rejects the step instead of training on
    # the wrong class.
    elementwise = elementwise * jnp.where(valid, 1.0, jnp.nan).astype(
        elementwise.dtype)
  else:
    if targets.shape != logits.shape:
      raise ValueError(
          f"Soft or one-hot targets of shape {targets.shape} do not fit logits"
          f" of shape {logits.shape}: they need the same shape. Pass integer"
          " labels to use class indices."
      )
    elementwise = optax.losses.softmax_cross_entropy(logits, targets)
  return _sum_non_batch(elementwise)


def _softmax_fisher_vp(logits: Array, tangent: Array) -> Array:
  probs = jax.nn.softmax(logits, axis=-1)
  inner = jnp.sum(probs * tangent, axis=-1, keepdims=True)
  return probs * (tangent - inner) / _batch_size(logits)


def _softmax_ce_hvp(logits: Array, targets: Array, tangent: Array) -> Array:
  fisher_part = _softmax_fisher_vp(logits, tangent)
  if _is_integer_labels(targets):
    return fisher_part
  # ∇²_z [-Σ t log softmax(z)] = (Σ t)(diag p - p pᵀ).
  return fisher_part * jnp.sum(targets, axis=-1, keepdims=True)


def _softmax_sample(key: Array, logits: Array) -> Array:
  return jax.random.categorical(key, logits, axis=-1)


def _rademacher(key: Array, like: Array) -> Array:
  return jax.random.rademacher(key, like.shape, like.dtype)


def _softmax_fisher_factor(key: Array, logits: Array) -> Array:
  """``(diag(√p) − p√pᵀ) v``: ``BBᵀ = diag(p) − ppᵀ`` since ``Σp = 1``."""
  probs = jax.nn.softmax(logits, axis=-1)
  root = jnp.sqrt(probs)
  v = _rademacher(key, logits)
  return root * v - probs * jnp.sum(root * v, axis=-1, keepdims=True)


softmax_cross_entropy = Loss(
    name="softmax_cross_entropy",
    per_example=_softmax_ce_per_example,
    hvp=_softmax_ce_hvp,
    fisher_vp=_softmax_fisher_vp,
    sample=_softmax_sample,
    fisher_factor=_softmax_fisher_factor,
)


# Sigmoid binary cross-entropy ----------------------------------------------


def _sigmoid_bce_per_example(logits: Array, targets: Array) -> Array:
  targets = jnp.asarray(targets, logits.dtype)
  if targets.shape != logits.shape:
    raise ValueError(
        f"Binary targets of shape {targets.shape} do not fit logits of shape"
        f" {logits.shape}: they need the same shape."
    )
  return _sum_non_batch(
      optax.losses.sigmoid_binary_cross_entropy(logits, targets)
  )


def _sigmoid_fisher_vp(logits: Array, tangent: Array) -> Array:
  probs = jax.nn.sigmoid(logits)
  return probs * (1 - probs) * tangent / _batch_size(logits)


def _sigmoid_bce_hvp(logits: Array, targets: Array, tangent: Array) -> Array:
  del targets  # Canonical link: the Hessian does not depend on the targets.
  return _sigmoid_fisher_vp(logits, tangent)


def _sigmoid_sample(key: Array, logits: Array) -> Array:
  return jax.random.bernoulli(key, jax.nn.sigmoid(logits)).astype(logits.dtype)


def _sigmoid_fisher_factor(key: Array, logits: Array) -> Array:
  probs = jax.nn.sigmoid(logits)
  return jnp.sqrt(probs * (1 - probs)) * _rademacher(key, logits)


sigmoid_binary_cross_entropy = Loss(
    name="sigmoid_binary_cross_entropy",
    per_example=_sigmoid_bce_per_example,
    hvp=_sigmoid_bce_hvp,
    fisher_vp=_sigmoid_fisher_vp,
    sample=_sigmoid_sample,
    fisher_factor=_sigmoid_fisher_factor,
)


# Squared error (unit-variance Gaussian) -------------------------------------


def _squared_error_per_example(predictions: Array, targets: Array) -> Array:
  targets = jnp.asarray(targets, predictions.dtype)
  if targets.shape != predictions.shape:
    raise ValueError(
        f"Targets of shape {targets.shape} do not fit predictions of shape"
        f" {predictions.shape}: they need the same shape."
    )
  return 0.5 * _sum_non_batch(optax.losses.squared_error(predictions, targets))


def _squared_error_fisher_vp(predictions: Array, tangent: Array) -> Array:
  return tangent / _batch_size(predictions)


def _squared_error_hvp(predictions, targets, tangent):
  del targets
  return _squared_error_fisher_vp(predictions, tangent)


def _gaussian_sample(key: Array, predictions: Array) -> Array:
  noise = jax.random.normal(key, predictions.shape, predictions.dtype)
  return predictions + noise


squared_error = Loss(
    name="squared_error",
    per_example=_squared_error_per_example,
    hvp=_squared_error_hvp,
    fisher_vp=_squared_error_fisher_vp,
    sample=_gaussian_sample,
    fisher_factor=_rademacher,
)


def check_model(predict_fn: Any, loss: Any) -> None:
  """Raises ``TypeError`` unless ``predict_fn`` is callable, ``loss`` a Loss."""
  if not callable(predict_fn):
    raise TypeError(
        "`predict_fn` must be a function (params, batch) -> outputs.")
  if not isinstance(loss, Loss):
    raise TypeError(
        "`loss` must be a curvature.losses.Loss, e.g."
        " curvature.losses.softmax_cross_entropy.")


def output_gradients(loss: Loss, outputs: Array, targets: Any) -> Array:
  """Per-example gradients ``∇_z ℓ_i`` of the loss with respect to outputs.

  Row ``i`` of the result is the gradient of example ``i``'s loss (not divided
  by the batch size) with respect to its own outputs.

  Args:
    loss: a :class:`Loss`.
    outputs: model outputs, ``[batch, ...]``.
    targets: targets accepted by ``loss``.

  Returns:
    An array shaped like ``outputs``.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> grads = curvature.losses.output_gradients(
    ...     curvature.losses.squared_error, jnp.array([[1.0], [3.0]]),
    ...     jnp.array([[0.0], [1.0]]))
    >>> print([round(float(g), 4) for g in grads[:, 0]])  # z - y, not / 2
    [1.0, 2.0]
  """
  return jax.grad(lambda z: jnp.sum(loss.per_example(z, targets)))(outputs)
