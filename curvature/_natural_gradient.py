"""Natural gradient descent, ``(F + λI) d = g`` solved by conjugate gradient.

A thin, documented configuration of the Hessian-free engine
(:func:`curvature.scale_by_hessian_free`): the curvature is a Fisher matrix
instead of the Gauss-Newton matrix, everything else (one linearization per
step, warm-started CG, Levenberg-Marquardt damping, non-finite step
rejection, all state in the optax state) is shared.
"""

from typing import Any, Callable, Optional

import optax

from curvature import _hessian_free
from curvature import _losses
from curvature import _products
from curvature import _validation

FISHERS = ("fisher", "sampled_fisher", "empirical_fisher")
"""The Fisher matrices the natural gradient can use.

See :data:`curvature.CURVATURES`.
"""


def scale_by_natural_gradient(
    predict_fn: Callable[[Any, Any], Any],
    loss: _losses.Loss,
    *,
    fisher: str = "fisher",
    initial_damping: float = 1.0,
    adapt_damping: bool = True,
    l2_reg: float = 0.0,
    max_cg_iterations: int = 50,
    cg_tol: float = 1e-6,
    warm_start_decay: float = 0.95,
    line_search: bool = True,
    curvature_batch_size: Optional[int] = None,
    num_samples: int = 1,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    seed: int = 0,
    axis_name: _validation.AxisName = None,
    preconditioner: Optional[str] = None,
    preconditioner_every: int = 10,
) -> optax.GradientTransformationExtraArgs:
  r"""Natural-gradient direction ``(F + λI)⁻¹ g`` by CG (Amari 1998).

  .. math::
    d = (F + (\lambda + \eta) I)^{-1} (g + \eta\theta), \qquad
    F = \frac1N \sum_i \mathbb{E}_{\tilde y \sim p(y|x_i, \theta)}
        [\nabla_\theta \ell_i(\tilde y) \nabla_\theta \ell_i(\tilde y)^\top]

  with ``F`` one of

  * ``"fisher"``: the exact true Fisher ``Jᵀ F_z J`` (closed-form output
    Fisher; equal to the GGN for the canonical-link losses of
    :mod:`curvature.losses`, Martens 2014 §9.2);
  * ``"sampled_fisher"``: the Monte-Carlo true Fisher with ``num_samples``
    targets per example drawn from the model (unbiased);
  * ``"empirical_fisher"``: ``1/N Σ gᵢ gᵢᵀ`` with the data's labels. It is
    *not* the Fisher away from the optimum and can give poor directions
    (Kunstner et al. 2019); offered for comparison.

  ``λ`` is adapted by the Levenberg-Marquardt rule on the reduction ratio of
  the quadratic model ``q(d) = gᵀd + ½ dᵀ(F + λI)d``; set
  ``adapt_damping=False`` to keep ``λ`` fixed. Like every ``scale_by_*`` the
  output has no minus sign. This is :func:`curvature.scale_by_hessian_free`
  with a Fisher curvature and no CG backtracking; see it for the contract
  (``update(grads, state, params, batch=batch)``) and the handling of
  non-finite values (step rejected, zero update, ``λ`` raised,
  ``info.rejected_steps`` counted).

  **Line search (on by default).** On mini-batches ``ρ`` is measured on the
  batch the step was solved on, and ``λ`` can fall so far that the full
  step overshoots: on scikit-learn's digits (an MLP 64-32-10, batches of
  128) plain full steps took the loss from below 0.3 to hundreds within
  a few steps. As in Hessian-free, the engine's Armijo backtracking line search
  therefore scales the step by ``α = 1, 0.8, 0.8², …`` until the objective
  decreases sufficiently, and takes no step (``α = 0``, recorded as
  ``info.step_size``; ``λ`` then grows since ``ρ < 1/4``) when none does. A
  step that would increase the loss (``ρ < 0``) is therefore never taken in
  full. ``line_search=False`` gives the plain natural-gradient step, with
  the learning rate alone setting its length (then keep ``λ`` large or
  fixed).

  Args:
    predict_fn: ``(params, batch) -> outputs`` with a leading batch axis.
    loss: a loss from :mod:`curvature.losses`.
    fisher: one of :data:`FISHERS`.
    initial_damping: ``λ₀``.
    adapt_damping: adapt ``λ`` by Levenberg-Marquardt.
    l2_reg: L2 coefficient ``η``.
    max_cg_iterations: CG cap.
    cg_tol: CG relative-residual tolerance.
    warm_start_decay: CG starts from this times the previous solution.
    line_search: run the engine's Armijo line search (default ``True``).
    curvature_batch_size: leading examples used for Fisher products.
    num_samples: sampled targets per example for ``"sampled_fisher"``.
    targets_fn: finds the targets in a batch.
    seed: PRNG seed (kept in the state).
    axis_name: for ``jax.shard_map``: the mesh axis (str or tuple of str)
      the batch is sharded over. The gradient (local or global), the
      objective values and the Fisher products are ``pmean``-ed over it; a
      sampled Fisher draws independent targets on every device. ``None``:
      no reduction (plain ``jit``). See
      :func:`curvature.scale_by_hessian_free`, *Data parallelism*.
    preconditioner: the CG preconditioner, one of
      :data:`curvature.PRECONDITIONERS` (``None``, ``"diagonal"``,
      ``"kfac"``, ``"block_diagonal"``); see
      :func:`curvature.scale_by_hessian_free`, *Preconditioners*. K-FAC's
      factors approximate the Fisher itself, so ``"kfac"`` fits here best.
    preconditioner_every: steps between refreshes of ``"kfac"`` and
      ``"block_diagonal"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`curvature.ScaleByHessianFreeState` (statistics in its
    ``info``).

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> def predict(params, batch):
    ...   return batch["inputs"] @ params["w"] + params["b"]
    >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    >>> batch = {"inputs": jax.random.normal(jax.random.key(0), (16, 4)),
    ...          "targets": jnp.arange(16) % 3}
    >>> loss = curvature.losses.softmax_cross_entropy
    >>> opt = optax.chain(
    ...     curvature.scale_by_natural_gradient(predict, loss, fisher="fisher"),
    ...     optax.scale_by_learning_rate(1.0))
    >>> state = opt.init(params)
    >>> grads = jax.grad(lambda p: loss.value(predict(p, batch),
    ...                                       batch["targets"]))(params)
    >>> updates, state = opt.update(grads, state, params, batch=batch)
    >>> jax.tree.map(jnp.shape, updates)
    {'b': (3,), 'w': (4, 3)}

  References:
    Amari, "Natural gradient works efficiently in learning", Neural
    Computation 1998. Martens, "New insights and perspectives on the natural
    gradient method", JMLR 2020 (arXiv 2014). Kunstner, Balles & Hennig,
    "Limitations of the empirical Fisher approximation for natural gradient
    descent", NeurIPS 2019.
  """
  _validation.check_choice("fisher", fisher, FISHERS)
  return _hessian_free.scale_by_hessian_free(
      predict_fn, loss, curvature=fisher, initial_damping=initial_damping,
      adapt_damping=adapt_damping, l2_reg=l2_reg,
      max_cg_iterations=max_cg_iterations, cg_tol=cg_tol, progress_tol=None,
      warm_start_decay=warm_start_decay, backtracking=False,
      line_search=line_search, curvature_batch_size=curvature_batch_size,
      num_samples=num_samples, targets_fn=targets_fn, seed=seed,
      axis_name=axis_name, preconditioner=preconditioner,
      preconditioner_every=preconditioner_every)


def natural_gradient(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    predict_fn: Callable[[Any, Any], Any],
    loss: _losses.Loss,
    fisher: str = "fisher",
    initial_damping: float = 1.0,
    adapt_damping: bool = True,
    l2_reg: float = 0.0,
    max_cg_iterations: int = 50,
    cg_tol: float = 1e-6,
    line_search: bool = True,
    curvature_batch_size: Optional[int] = None,
    num_samples: int = 1,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    seed: int = 0,
    axis_name: _validation.AxisName = None,
    preconditioner: Optional[str] = None,
    preconditioner_every: int = 10,
) -> optax.GradientTransformationExtraArgs:
  r"""Natural gradient descent: ``θ ← θ − lr · (F + λI)⁻¹ g`` (Amari 1998).

  ``optax.chain(scale_by_natural_gradient(...), scale_by_learning_rate(lr))``;
  see :func:`scale_by_natural_gradient` for the rule and the arguments. The
  defaults train on mini-batches: each step is line-searched as in
  Hessian-free, so a step that would raise the loss is shortened or not
  taken.

  Args:
    learning_rate: a finite scalar ``≥ 0`` or a schedule; it scales the
      line-searched step (keep 1 unless ``line_search=False``).
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    fisher: ``"fisher"``, ``"sampled_fisher"`` or ``"empirical_fisher"``.
    initial_damping: ``λ₀``.
    adapt_damping: adapt ``λ`` by Levenberg-Marquardt.
    l2_reg: L2 coefficient.
    max_cg_iterations: CG cap.
    cg_tol: CG tolerance.
    line_search: the Armijo line search of
      :func:`scale_by_natural_gradient` (default ``True``).
    curvature_batch_size: leading examples used for Fisher products.
    num_samples: samples for ``"sampled_fisher"``.
    targets_fn: finds the targets in a batch.
    seed: PRNG seed.
    axis_name: for ``jax.shard_map``: the mesh axis the batch is sharded
      over (see :func:`scale_by_natural_gradient`).
    preconditioner: the CG preconditioner (see
      :func:`scale_by_natural_gradient`).
    preconditioner_every: steps between its refreshes.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> def predict(params, batch):
    ...   return batch["inputs"] @ params["w"] + params["b"]
    >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    >>> batch = {"inputs": jax.random.normal(jax.random.key(0), (16, 4)),
    ...          "targets": jnp.arange(16) % 3}
    >>> loss = curvature.losses.softmax_cross_entropy
    >>> opt = curvature.natural_gradient(predict_fn=predict, loss=loss)
    >>> state = opt.init(params)
    >>> value_fn = lambda p: loss.value(predict(p, batch), batch["targets"])
    >>> before = value_fn(params)
    >>> grads = jax.grad(value_fn)(params)
    >>> updates, state = opt.update(grads, state, params, batch=batch)
    >>> bool(value_fn(optax.apply_updates(params, updates)) < before)
    True

  References:
    Amari, "Natural gradient works efficiently in learning", Neural
    Computation 1998. Martens, "New insights and perspectives on the natural
    gradient method", JMLR 2020. Kunstner, Balles & Hennig, "Limitations of
    the empirical Fisher approximation for natural gradient descent",
    NeurIPS 2019.
  """
  _validation.check_learning_rate(learning_rate)
  return optax.chain(
      scale_by_natural_gradient(
          predict_fn, loss, fisher=fisher, initial_damping=initial_damping,
          adapt_damping=adapt_damping, l2_reg=l2_reg,
          max_cg_iterations=max_cg_iterations, cg_tol=cg_tol,
          line_search=line_search,
          curvature_batch_size=curvature_batch_size,
          num_samples=num_samples, targets_fn=targets_fn, seed=seed,
          axis_name=axis_name, preconditioner=preconditioner,
          preconditioner_every=preconditioner_every),
      optax.scale_by_learning_rate(learning_rate))
