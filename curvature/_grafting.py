r"""Grafting: one transform's direction at another's per-leaf step size.

Agarwal, Anil, Hazan, Koren & Zhang (2020) separate what an optimizer
contributes into a *direction* and a per-layer *magnitude*: grafting runs
two optimizers on the same gradient and, for every parameter leaf, takes the
direction of one at the Frobenius norm of the other,

.. math::
  u_\ell = d_\ell \, \frac{\lVert m_\ell \rVert}{\lVert d_\ell \rVert}.

Shampoo is grafted onto Adam this way in Anil et al. (2020);
:func:`scale_by_graft` does it for any pair of transforms, for instance
K-FAC's direction at Adam's step sizes.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvature import _validation


def rescale(direction: jax.Array, magnitude: jax.Array) -> jax.Array:
  """``direction · ‖magnitude‖ / ‖direction‖`` (zero for a zero direction)."""
  norm = jnp.linalg.norm(direction)
  positive = norm > 0
  scale = jnp.where(positive,
                    jnp.linalg.norm(magnitude) / jnp.where(positive, norm, 1.0),
                    0.0)
  return (direction * scale).astype(magnitude.dtype)


class ScaleByGraftState(NamedTuple):
  """State of :func:`scale_by_graft`.

  Attributes:
    magnitude: the magnitude transform's state.
    direction: the direction transform's state.
    rejected_steps: steps whose gradient or either output was not finite
      (their update is zero and neither inner state moved).
  """

  magnitude: Any
  direction: Any
  rejected_steps: jax.Array


def scale_by_graft(
    magnitude: optax.GradientTransformation,
    direction: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  r"""Each leaf of ``direction``'s update at the norm of ``magnitude``'s.

  .. math::
    u_\ell = d_\ell \, \frac{\lVert m_\ell \rVert_F}{\lVert d_\ell \rVert_F},
    \qquad d = \text{direction}(g), \quad m = \text{magnitude}(g)

  per parameter leaf ``ℓ`` (``u_ℓ = 0`` where ``d_ℓ = 0``). Both transforms
  see the same gradient, parameters and extra arguments (``batch=`` for a
  curvature-aware ``direction``); the output is a descent direction, like
  theirs. A step whose gradient or either output is not finite gives a zero
  update, leaves both inner states as they were and counts in
  ``rejected_steps``.

  Args:
    magnitude: the transform whose per-leaf norms the update takes, e.g.
      ``optax.scale_by_adam(b1=0.0)``.
    direction: the transform whose per-leaf directions the update takes,
      e.g. :func:`curvature.scale_by_kfac`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`ScaleByGraftState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> graft = curvature.scale_by_graft(optax.scale_by_sign(),
    ...                                  optax.identity())
    >>> params = {"w": jnp.zeros(2)}
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> updates, _ = graft.update(grads, graft.init(params), params)
    >>> [round(float(x), 4) for x in updates["w"]]  # direction 3:4, norm √2
    [0.8485, 1.1314]

  References:
    Agarwal, Anil, Hazan, Koren & Zhang, "Disentangling adaptive gradient
    methods from learning rates", arXiv:2002.11803, 2020. Anil, Gupta,
    Koren, Regan & Singer, "Scalable second order optimization for deep
    learning", arXiv:2002.09018, 2020.
  """
  for name, transform in (("magnitude", magnitude), ("direction", direction)):
    if not isinstance(transform, optax.GradientTransformation):
      raise TypeError(
          f"`{name}` must be an optax.GradientTransformation, got"
          f" {transform!r}. Pass e.g. magnitude=optax.scale_by_adam(b1=0.0)"
          " and direction=curvature.scale_by_kfac(...).")
  magnitude = optax.with_extra_args_support(magnitude)
  direction = optax.with_extra_args_support(direction)

  def init_fn(params):
    return ScaleByGraftState(magnitude.init(params), direction.init(params),
                             jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    m, magnitude_state = magnitude.update(updates, state.magnitude, params,
                                          **extra_args)
    d, direction_state = direction.update(updates, state.direction, params,
                                          **extra_args)
    out = jax.tree.map(rescale, d, m)
    ok = (_validation.all_finite(updates) & _validation.all_finite(m)
          & _validation.all_finite(out))
    out = optax.tree.where(ok, out, optax.tree.zeros_like(out))
    return out, ScaleByGraftState(
        optax.tree.where(ok, magnitude_state, state.magnitude),
        optax.tree.where(ok, direction_state, state.direction),
        state.rejected_steps + (~ok).astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
