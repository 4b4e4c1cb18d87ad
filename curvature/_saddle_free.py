"""Saddle-free Newton (Dauphin et al. 2014) in a Lanczos subspace.

Newton's step ``−H⁻¹g`` moves *towards* a saddle along directions of
negative curvature: it rescales each eigen-component of the gradient by
``1/λᵢ``, which flips the sign where ``λᵢ < 0``. Saddle-free Newton rescales
by ``1/|λᵢ|`` instead, so it descends along every direction, and moves away
from a saddle along the negative-curvature ones. ``|H|`` is only formed in
the Krylov subspace that Lanczos builds from Hessian-vector products.
The examples fit a two-parameter linear least-squares model.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvature import _lanczos
from curvature import _losses
from curvature import _optax_typed
from curvature import _products
from curvature import _sharding
from curvature import _validation

Array = jax.Array
Params = Any

STARTS = ("gradient", "random")
"""The Lanczos start vectors of :func:`scale_by_saddle_free_newton`."""


class ScaleBySaddleFreeNewtonState(NamedTuple):
  """State of :func:`scale_by_saddle_free_newton`.

  Attributes:
    count: number of ``update`` calls.
    key: PRNG key for Lanczos restarts and random start vectors.
    rejected_steps: steps rejected because the gradient, the objective or a
      Hessian-vector product was not finite.
    objective_value: the objective ``f(θ)`` at the last step.
    ritz_values: the last step's Ritz values ``Λ`` (ascending); negative
      ones are directions of negative curvature.
  """

  count: Array
  key: Array
  rejected_steps: Array
  objective_value: Array
  ritz_values: Array


def _num_iterations(num_iterations: int, params: Params) -> int:
  """``num_iterations`` clipped to the dimension ``n`` of the parameters."""
  return min(num_iterations, _lanczos.dimension(params))


def _start_vector(lanczos_start: str, grad: Params, key: Array) -> Params:
  """``g`` (or a Gaussian vector), and a Gaussian one where ``g`` is zero or
  not finite, so that Lanczos always starts from a valid vector."""
  random = jax.tree.map(lambda x: _sharding.shard_like(
      jax.random.normal(key, x.shape, x.dtype), x), grad)
  if lanczos_start == "random":
    return random
  norm = optax.tree.norm(grad)
  return optax.tree.where(jnp.isfinite(norm) & (norm > 0), grad, random)


def saddle_free_direction(grad: Array, basis: Array, ritz_values: Array,
                          ritz_vectors: Array, damping) -> Array:
  r"""``V Q (|Λ| + λ)⁻¹ Qᵀ Vᵀ g + (g − V Vᵀ g) / (max|Λ| + λ)``, raveled.

  Args:
    grad: ``g``, ``[n]``.
    basis: ``Vᵀ``, the orthonormal Lanczos vectors as rows, ``[k, n]``.
    ritz_values: ``Λ``, ``[k]``, from ``T = Q Λ Qᵀ``.
    ritz_vectors: ``Q``, ``[k, k]``.
    damping: ``λ ≥ 0``.

  Returns:
    The direction (without the minus sign), ``[n]``.
  """
  magnitudes = jnp.abs(ritz_values) + damping
  coefficients = basis @ grad
  inside = basis.T @ (ritz_vectors @ ((ritz_vectors.T @ coefficients)
                                      / magnitudes))
  outside = grad - basis.T @ coefficients
  return inside + outside / jnp.max(magnitudes)


def scale_by_saddle_free_newton(
    predict_fn: _products.PredictFn,
    loss: _losses.Loss,
    *,
    num_iterations: int = 20,
    damping: float = 1.0,
    lanczos_start: str = "gradient",
    l2_reg: float = 0.0,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    seed: int = 0,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The saddle-free Newton direction ``(|H| + λI)⁻¹ g`` in a Krylov subspace.

  ``k`` Lanczos iterations on the Hessian (Hessian-vector products,
  forward-over-reverse) give an orthonormal basis ``V`` (``n × k``) with
  ``VᵀHV = T = Q Λ Qᵀ``. With ``|Λ|`` the absolute Ritz values:

  .. math::
    u = V Q (|\Lambda| + \lambda I)^{-1} Q^\top V^\top g
      + \frac{(I - V V^\top) g}{\max_i |\Lambda_i| + \lambda}

  The first term is Dauphin et al.'s ``(|H| + λI)⁻¹ g`` restricted to the
  subspace; the second a damped gradient step on the part of ``g`` outside
  it (zero for the default start from ``g``, whose Krylov space contains
  ``g``), scaled by the largest curvature seen. With ``k = n`` the subspace
  is everything and ``u = (|H| + λI)⁻¹ g`` exactly. Like every ``scale_by_*``
  the output has no minus sign: chain it with
  ``optax.scale_by_learning_rate`` (as :func:`saddle_free_newton` does).

  ``update(grads, state, params, batch=batch)`` takes the gradient of the
  mean loss over ``batch`` (the L2 term is added here); the Hessian comes
  from ``predict_fn`` and ``loss`` on the same batch. A non-finite gradient,
  objective, Hessian product or step gives a zero update, counted in
  ``rejected_steps``.

  Args:
    predict_fn: ``(params, batch) -> outputs`` with a leading batch axis.
    loss: a loss from :mod:`curvature.losses`.
    num_iterations: ``k``, the Lanczos iterations (Hessian-vector products)
      per step, a Python int >= 1 (20); clipped to the number of parameters.
    damping: ``λ ≥ 0`` added to ``|Λ|`` (1.0). Dauphin et al. choose ``λ``
      per step by a line search over a grid; here it is fixed, or scheduled
      with :func:`curvature.inject_hyperparams`. ``λ = 0`` divides by ``|Λᵢ|``
      and is rejected as non-finite wherever a Ritz value is 0.
    lanczos_start: ``"gradient"`` (the Krylov space ``K_k(H, g)``, the
      default) or ``"random"`` (a Gaussian start: ``V`` approximates the
      Hessian's extreme eigenvectors, and the gradient step outside ``V``
      matters).
    l2_reg: L2 coefficient ``η``: ``½η‖θ‖²`` is added to the objective,
      ``ηθ`` to the gradient and ``ηI`` to ``H``.
    targets_fn: finds the targets in a batch.
    seed: seeds the PRNG key kept in the state.
    axis_name: for ``jax.shard_map``: the mesh axis the batch is sharded
      over; the objective, the gradient and the Hessian products are
      ``pmean``-ed over it.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    ValueError: for another ``lanczos_start`` (the message names the
      choices), a negative ``damping`` or ``num_iterations < 1``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> def predict(params, batch):
    ...   return batch["inputs"] @ params["w"]
    >>> batch = {"inputs": jnp.asarray([[1., 0.], [1., 1.], [1., 2.]]),
    ...          "targets": jnp.asarray([[1.], [3.], [5.]])}
    >>> params = {"w": jnp.zeros((2, 1))}
    >>> def loss_fn(params, batch):
    ...   return curvature.losses.squared_error.value(
    ...       predict(params, batch), batch["targets"])
    >>> grads = jax.grad(loss_fn)(params, batch)
    >>> opt = optax.chain(
    ...     curvature.scale_by_saddle_free_newton(
    ...         predict, curvature.losses.squared_error, num_iterations=10),
    ...     optax.scale_by_learning_rate(1.0))
    >>> state = opt.init(params)
    >>> updates, state = opt.update(grads, state, params, batch=batch)
    >>> state[0].ritz_values.shape  # num_iterations clipped to n = 2
    (2,)

  References:
    Dauphin, Pascanu, Gulcehre, Cho, Ganguli & Bengio, "Identifying and
    attacking the saddle point problem in high-dimensional non-convex
    optimization", NeurIPS 2014.
    Lanczos, "An iteration method for the solution of the eigenvalue problem
    of linear differential and integral operators", J. Res. Natl. Bur.
    Stand. 45, 1950.
  """
  _losses.check_model(predict_fn, loss)
  num_iterations = _validation.check_static_int(
      "num_iterations", num_iterations, 1)
  _validation.check_choice("lanczos_start", lanczos_start, STARTS)
  _validation.check_not_schedule(
      "damping", damping,
      "To schedule it, wrap the factory in `curvature.inject_hyperparams`.")
  _validation.check_nonnegative(
      "damping", damping, "It is added to |Λ|; Dauphin et al. search it"
      " over a grid, e.g. 1.0.")
  _validation.check_nonnegative("l2_reg", l2_reg)
  axis_name = _validation.check_axis_name(axis_name)

  def init_fn(params):
    _validation.check_params(params, "scale_by_saddle_free_newton")
    dtype = _lanczos.compute_dtype(jnp.result_type(*jax.tree.leaves(params)))
    return ScaleBySaddleFreeNewtonState(
        count=jnp.zeros((), jnp.int32),
        key=jax.random.key(seed),
        rejected_steps=jnp.zeros((), jnp.int32),
        objective_value=jnp.zeros((), dtype),
        ritz_values=jnp.zeros((_num_iterations(num_iterations, params),),
                              dtype))

  def update_fn(updates, state, params=None, *, batch=None, **extra_args):
    del extra_args  # value, grad, value_fn: accepted for chaining.
    _validation.check_update_args(
        "scale_by_saddle_free_newton", updates, params, batch)
    _products.batch_size(batch, targets_fn)
    key, start_key, restart_key = jax.random.split(state.key, 3)
    lin = _products.linearize(
        predict_fn, loss, params, batch, curvature="hessian", l2_reg=l2_reg,
        targets_fn=targets_fn, axis_name=axis_name)
    grad = optax.tree.add_scale(
        _products.batch_mean(updates, axis_name), l2_reg, params)
    start = _start_vector(lanczos_start, grad, start_key)
    result = _lanczos.lanczos(
        lin.matvec, start, _num_iterations(num_iterations, params),
        reorthogonalize="full", key=restart_key)
    ritz_values, ritz_vectors = _lanczos.eigh_tridiagonal(result)
    assert result.basis is not None  # "full" reorthogonalization keeps it.
    flat_grad, unravel = _sharding.ravel(grad)
    dtype = ritz_values.dtype
    direction = saddle_free_direction(
        flat_grad.astype(dtype), result.basis.astype(dtype), ritz_values,
        ritz_vectors, jnp.asarray(damping, dtype))
    finite = (jnp.isfinite(lin.value) & _validation.all_finite(grad)
              & result.finite & jnp.all(jnp.isfinite(direction)))
    direction = jnp.where(finite, direction, 0.0)
    new_state = ScaleBySaddleFreeNewtonState(
        count=_optax_typed.safe_increment(state.count),
        key=key,
        rejected_steps=state.rejected_steps + (~finite).astype(jnp.int32),
        objective_value=lin.value.astype(state.objective_value.dtype),
        ritz_values=ritz_values.astype(state.ritz_values.dtype))
    return unravel(direction.astype(flat_grad.dtype)), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def saddle_free_newton(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    predict_fn: _products.PredictFn,
    loss: _losses.Loss,
    num_iterations: int = 20,
    damping: float = 1.0,
    lanczos_start: str = "gradient",
    l2_reg: float = 0.0,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    seed: int = 0,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Saddle-free Newton: ``θ ← θ − lr · (|H| + λI)⁻¹ g`` in a Lanczos subspace.

  ``|H|`` is ``H`` with its eigenvalues replaced by their absolute values, so
  the step descends along every eigendirection and is repelled by saddle
  points, where Newton's ``−H⁻¹g`` is attracted to them. ``|H|`` is formed
  in the ``k``-dimensional Krylov subspace of ``k`` Lanczos iterations (see
  :func:`scale_by_saddle_free_newton` for the rule, the part of ``g``
  outside the subspace and every argument).

  Args:
    learning_rate: a number or schedule scaling the step (1.0).
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    num_iterations: ``k``, Hessian-vector products per step (20).
    damping: ``λ`` added to ``|Λ|`` (1.0).
    lanczos_start: ``"gradient"`` or ``"random"``.
    l2_reg: L2 coefficient.
    targets_fn: finds the targets in a batch.
    seed: PRNG seed.
    axis_name: for ``jax.shard_map``: the mesh axis the batch is sharded
      over.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> def predict(params, batch):
    ...   return batch["inputs"] @ params["w"]
    >>> batch = {"inputs": jnp.asarray([[1., 0.], [1., 1.], [1., 2.]]),
    ...          "targets": jnp.asarray([[1.], [3.], [5.]])}
    >>> params = {"w": jnp.zeros((2, 1))}
    >>> def loss_fn(params, batch):
    ...   return curvature.losses.squared_error.value(
    ...       predict(params, batch), batch["targets"])
    >>> grads = jax.grad(loss_fn)(params, batch)
    >>> opt = curvature.saddle_free_newton(
    ...     predict_fn=predict, loss=curvature.losses.squared_error,
    ...     num_iterations=10, damping=1e-6)
    >>> state = opt.init(params)
    >>> updates, state = opt.update(grads, state, params, batch=batch)
    >>> params = optax.apply_updates(params, updates)
    >>> bool(loss_fn(params, batch) < 1e-8)  # H ≻ 0 here: a Newton step
    True

  References:
    Dauphin et al., "Identifying and attacking the saddle point problem in
    high-dimensional non-convex optimization", NeurIPS 2014.
  """
  _validation.check_learning_rate(learning_rate)
  return optax.chain(
      scale_by_saddle_free_newton(
          predict_fn, loss, num_iterations=num_iterations, damping=damping,
          lanczos_start=lanczos_start, l2_reg=l2_reg, targets_fn=targets_fn,
          seed=seed, axis_name=axis_name),
      optax.scale_by_learning_rate(learning_rate))
