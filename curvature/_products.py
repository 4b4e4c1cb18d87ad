"""Curvature-vector products on parameter pytrees.

Every product here is matrix-free and built from ``jax.jvp``, ``jax.vjp`` and
``jax.linearize``:

* Hessian ``H v``: forward-over-reverse (Pearlmutter 1994).
* Generalized Gauss-Newton ``G v = Jᵀ (∇²_z L) J v``: a Jacobian-vector product
  through the model, the loss's closed-form output-space Hessian, then a
  vector-Jacobian product (Schraudolph 2002; Martens 2010).
* True Fisher ``F v = Jᵀ F_z J v``, exactly (closed-form output Fisher) or by
  Monte Carlo with targets sampled from the model.
* Empirical Fisher ``(1/N) Σᵢ gᵢ gᵢᵀ v``: the per-example gradients are
  ``gᵢ = Jᵢᵀ ∇_z ℓᵢ``, so ``gᵢᵀ v = ⟨∇_z ℓᵢ, Jᵢ v⟩`` is one JVP and the sum
  one VJP; per-example gradients are never materialized.

:func:`linearize` linearizes the model once at ``params`` and returns the
objective's value, its gradient and a ``matvec`` closure that reuses the
linearization, so that the 10–250 products a CG solve needs do not re-run the
forward pass. The one-shot ``*_vector_product`` functions are that closure
applied once.

The objective throughout is ``f(θ) = loss.value(predict_fn(θ, batch), y) +
½ l2_reg ‖θ‖²``; every curvature matrix includes ``l2_reg · I`` (Martens 2010
used this L2 term, 1e-5 in his autoencoder experiments).
"""

from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Optional, overload

import jax
import jax.numpy as jnp
import optax

from curvature import _losses
from curvature import _validation

Array = jax.Array
Params = Any
Batch = Any
PredictFn = Callable[[Params, Batch], Array]

CURVATURES = (
    "ggn",
    "hessian",
    "fisher",
    "sampled_fisher",
    "empirical_fisher",
)
"""Names of the curvature matrices :func:`linearize` can multiply by.

* ``"ggn"``: generalized Gauss-Newton ``Jᵀ ∇²_z L J``.
* ``"hessian"``: the full Hessian of the objective.
* ``"fisher"``: the exact true Fisher ``Jᵀ F_z J`` (equals the GGN for the
  canonical-link losses in :mod:`curvature.losses`).
* ``"sampled_fisher"``: Monte-Carlo true Fisher with ``num_samples`` targets
  per example drawn from the model.
* ``"empirical_fisher"``: ``(1/N) Σ gᵢ gᵢᵀ`` with the data's targets.
"""


class Linearization(NamedTuple):
  """The objective linearized once at ``params``.

  Attributes:
    value: the objective ``f(θ)`` (mean loss plus the L2 term).
    grad: ``∇f(θ)``, a pytree like ``params``.
    matvec: ``v ↦ C v``, with ``C`` the chosen curvature matrix plus
      ``l2_reg · I``. Each call reuses the linearization.
    outputs: the model outputs ``predict_fn(θ, batch)``.
  """

  value: Array
  grad: Params
  matvec: Callable[[Params], Params]
  outputs: Array


def default_targets(batch: Batch) -> Any:
  """Finds the targets in a batch: ``batch["targets"]`` or ``batch[-1]``.

  A mapping must hold a ``"targets"`` entry; a tuple or list holds the targets
  last, as in ``(inputs, targets)``. For anything else pass ``targets_fn``.

  Args:
    batch: the batch given to ``update(..., batch=batch)``.

  Returns:
    The targets the loss scores the model's outputs against.
  """
  if isinstance(batch, Mapping):
    if "targets" not in batch:
      raise ValueError(
          "The batch is a mapping without a 'targets' entry (keys:"
          f" {sorted(batch)}). Add batch['targets'], or pass"
          " `targets_fn=lambda batch: ...` to say where the targets are."
      )
    return batch["targets"]
  if isinstance(batch, (tuple, list)) and batch:
    return batch[-1]
  raise ValueError(
      f"Cannot find targets in a batch of type {type(batch).__name__}. Use a"
      " dict with a 'targets' entry, an (inputs, targets) tuple, or pass"
      " `targets_fn=lambda batch: ...`."
  )


def has_batch_axis(leaf: Any) -> bool:
  """Whether a batch leaf has a leading (example) axis, i.e. ``ndim >= 1``.

  Scalars (a dropout rate, a step count) and typed PRNG keys made by
  ``jax.random.key`` have ``ndim == 0`` and are shared by every example.
  """
  return jnp.ndim(leaf) >= 1


def map_examples(fn: Callable[[Array], Array], batch: Batch) -> Batch:
  """Applies ``fn`` to the leaves of ``batch`` that have a leading axis.

  The other leaves (scalars, typed PRNG keys) are returned unchanged.
  """
  return jax.tree.map(lambda x: fn(x) if has_batch_axis(x) else x, batch)


def _leading_sizes(tree: Any) -> list[tuple[str, int]]:
  """``(path, leading size)`` of every leaf of ``tree`` with a leading axis."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(path), jnp.shape(leaf)[0])
          for path, leaf in flat if has_batch_axis(leaf)]


def batch_size(
    batch: Batch, targets_fn: Callable[[Batch], Any] = default_targets
) -> int:
  """The number of examples in ``batch``, checked at trace time.

  It is the leading size of the targets (``targets_fn(batch)``) when they
  have a leading axis, else the common leading size of the batch's leaves
  that have one. Leaves without a leading axis (``ndim == 0``: a dropout
  rate, a typed key from ``jax.random.key``) are per-batch constants and
  are ignored here and by :func:`take_examples`. Every other leaf must hold
  one entry per example along its leading axis.

  Args:
    batch: the batch given to ``update(..., batch=batch)``.
    targets_fn: finds the targets in ``batch``; see :func:`default_targets`.

  Returns:
    The batch size, a Python int ``>= 1``.

  Raises:
    ValueError: if the batch is empty, has no leaf with a leading axis, or
      its leaves (or the targets) disagree on the number of examples.
  """
  targets = _leading_sizes(targets_fn(batch))
  if targets and any(size != targets[0][1] for _, size in targets):
    raise ValueError(
        "The targets disagree on the number of examples: leading sizes"
        f" {dict(targets)}. Give every target leaf one entry per example"
        " along its leading axis.")
  leaves = _leading_sizes(batch)
  if targets:
    num_examples, source = targets[0][1], "the targets"
  elif leaves:
    num_examples, source = leaves[0][1], f"batch{leaves[0][0]}"
  else:
    raise ValueError(
        "No leaf of the batch has a leading (example) axis, so its size is"
        " unknown. Give the inputs and targets a leading batch axis, e.g."
        " shape [batch, features] and [batch].")
  for path, size in leaves:
    if size != num_examples:
      raise ValueError(
          f"batch{path} has {size} entries along its leading axis, but"
          f" {source} hold {num_examples} examples. Every batch leaf with an"
          " axis needs one entry per example along its leading axis; pass"
          " per-batch constants (a dropout rate, a PRNG key made by"
          " `jax.random.key`) as scalars, or close over them in"
          " `predict_fn`.")
  if num_examples == 0:
    raise ValueError(
        "The batch is empty (0 examples): curvature and losses are means"
        " over the examples. Skip empty batches, e.g. drop the last partial"
        " batch of an epoch when it is empty.")
  return num_examples


def restrict_to_leaves(predict_fn: PredictFn, params: Params,
                       indices) -> tuple[PredictFn, list]:
  """``predict_fn`` as a function of the leaves ``indices`` of ``params``.

  Returns ``(sub_predict, sub_leaves)``: ``sub_predict(sub, batch)`` is
  ``predict_fn`` with those leaves (in ``jax.tree.leaves`` order) replaced
  by ``sub`` and every other leaf held at its value in ``params``; a
  curvature of ``sub_predict`` at ``sub_leaves`` is the diagonal block of
  those leaves.
  """
  leaves, treedef = jax.tree.flatten(params)

  def sub_predict(sub, batch):
    full = list(leaves)
    for i, x in zip(indices, sub):
      full[i] = x
    return predict_fn(treedef.unflatten(full), batch)

  return sub_predict, [leaves[i] for i in indices]


def subset_size(requested: Optional[int], num_examples: int) -> int:
  """How many leading examples a sub-batch takes: all when ``None``, else at
  most ``num_examples`` (a ``*_batch_size`` option larger than the batch
  means the whole batch)."""
  return min(requested or num_examples, num_examples)


def take_examples(batch: Batch, num_examples: int) -> Batch:
  """The first ``num_examples`` examples of ``batch``.

  Only the leaves with a leading axis are sliced; scalars and typed PRNG
  keys (``ndim == 0``) are per-batch constants and are kept as they are.
  Call :func:`batch_size` first to check that the batch is consistent.
  """
  return map_examples(lambda x: x[:num_examples], batch)


def objective(
    predict_fn: PredictFn,
    loss: _losses.Loss,
    params: Params,
    batch: Batch,
    *,
    l2_reg: float = 0.0,
    targets_fn: Callable[[Batch], Any] = default_targets,
    axis_name: _validation.AxisName = None,
) -> Array:
  """The objective ``loss.value(predict_fn(θ, batch), y) + ½ l2_reg ‖θ‖²``.

  With ``axis_name`` (inside ``jax.shard_map``, the batch split over that
  mesh axis) the mean loss is ``pmean``-ed into the global batch mean.
  """
  axis_name = _validation.check_axis_name(axis_name)
  outputs = predict_fn(params, batch)
  value = batch_mean(loss.value(outputs, targets_fn(batch)), axis_name)
  return value + _l2_value(params, l2_reg)


def batch_mean(tree: Any, axis_name) -> Any:
  """The mean over the devices of ``axis_name`` of per-shard batch means.

  Inside ``jax.shard_map`` with the batch split evenly over ``axis_name``,
  the mean of the per-shard means is the global batch mean. ``None`` (plain
  ``jit``, where GSPMD already reduces over the global batch) returns
  ``tree`` unchanged.
  """
  if axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name)


def _to_varying():
  """``(x, axes) -> x`` marked varying over ``axes``, or ``None``."""
  if hasattr(jax.lax, "pcast"):
    return lambda x, axes: jax.lax.pcast(x, axes, to="varying")
  return getattr(jax.lax, "pvary", None)


def as_varying(tree: Any, axis_name) -> Any:
  """Marks the leaves of ``tree`` as varying over ``axis_name``.

  Under ``jax.shard_map`` (with its default ``check_vma=True``) the
  derivative of a per-shard quantity with respect to a replicated value is
  summed over the devices. Differentiating with respect to a varying copy
  instead keeps derivatives per shard (per-example gradients, the model's
  Jacobian), so they can be reduced explicitly by :func:`batch_mean`. A
  no-op for ``None``, outside ``shard_map`` (``vmap`` axes) and with
  ``check_vma=False``. jax releases with ``jax.lax.pvary`` but no
  ``jax.lax.pcast`` get ``pvary``; on releases with neither, ``tree`` is
  returned unchanged (not tested there).
  """
  to_varying = _to_varying()
  if axis_name is None or to_varying is None:
    return tree
  axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)

  def one(x):
    vma = getattr(jax.typeof(x), "vma", frozenset())
    missing = tuple(a for a in axes if a not in vma)
    if not missing:
      return x
    try:
      return to_varying(x, missing)
    except (ValueError, NameError):  # Not a shard_map axis: nothing to mark.
      return x

  return jax.tree.map(one, tree)


@overload
def shard_key(key: Array, axis_name) -> Array: ...


@overload
def shard_key(key: None, axis_name) -> None: ...


def shard_key(key: Optional[Array], axis_name) -> Optional[Array]:
  """``key`` folded with the device's index along ``axis_name``.

  Sampled quantities (targets drawn from the model) need independent draws
  on every shard; the estimates then agree with a single-device run in
  expectation.
  """
  if axis_name is None or key is None:
    return key
  return jax.random.fold_in(key, jax.lax.axis_index(axis_name))


def _l2_value(params: Params, l2_reg) -> Array:
  return 0.5 * l2_reg * optax.tree.norm(params, squared=True)


def _per_example_inner(a: Array, b: Array) -> Array:
  """⟨aᵢ, bᵢ⟩ for each example i, broadcast back to a's shape."""
  inner = jnp.sum(a * b, axis=tuple(range(1, a.ndim)), keepdims=True)
  return inner


def _outer_product_factor(output_grads: Array, num_terms: int):
  """``u ↦ (1/(N·S)) Σ gᵢ ⟨gᵢ, uᵢ⟩`` for ``output_grads`` ``[S, N, ...]``."""
  scale = 1.0 / (num_terms * output_grads.shape[1])

  def apply(tangent):
    inner = jax.vmap(lambda g: _per_example_inner(g, tangent))(output_grads)
    return scale * jnp.sum(output_grads * inner, axis=0)

  return apply


def _output_curvature(
    curvature: str,
    loss: _losses.Loss,
    outputs: Array,
    targets: Any,
    key: Optional[Array],
    num_samples: int,
):
  """The middle factor ``u ↦ M u`` in output space for ``Jᵀ M J``."""
  if curvature == "ggn":
    return lambda u: loss.hvp(outputs, targets, u)
  if curvature == "fisher":
    return lambda u: loss.fisher_vp(outputs, u)
  if curvature == "empirical_fisher":
    grads = _losses.output_gradients(loss, outputs, targets)
    return _outer_product_factor(grads[None], 1)
  # sampled_fisher
  assert key is not None  # _check_curvature_args requires it
  keys = jax.random.split(key, num_samples)
  outputs = jax.lax.stop_gradient(outputs)
  sampled = jax.vmap(lambda k: loss.sample(k, outputs))(keys)
  grads = jax.vmap(lambda y: _losses.output_gradients(loss, outputs, y))(
      sampled
  )
  return _outer_product_factor(grads, num_samples)


def _check_curvature_args(curvature, key, num_samples):
  _validation.check_choice("curvature", curvature, CURVATURES)
  if curvature == "sampled_fisher":
    _validation.check_static_int("num_samples", num_samples, 1)
    if key is None:
      raise ValueError(
          "curvature='sampled_fisher' draws targets from the model: pass"
          " `key=jax.random.key(...)`."
      )


def linearize(
    predict_fn: PredictFn,
    loss: _losses.Loss,
    params: Params,
    batch: Batch,
    *,
    curvature: str = "ggn",
    l2_reg: float = 0.0,
    targets_fn: Callable[[Batch], Any] = default_targets,
    key: Optional[Array] = None,
    num_samples: int = 1,
    axis_name: _validation.AxisName = None,
) -> Linearization:
  r"""Linearizes the objective once, for many curvature-vector products.

  For the Gauss-Newton family the model is linearized with
  ``jax.linearize`` and transposed with ``jax.linear_transpose``:

  .. math::
    C v = J^\top M J v + \eta v, \qquad
    M \in \{\nabla_z^2 L,\; F_z,\; \tfrac1N\textstyle\sum_i \nabla_z\ell_i
    \nabla_z\ell_i^\top\}

  and the gradient ``Jᵀ ∇_z L + η θ`` comes from the same linearization. For
  ``"hessian"`` the gradient map is linearized (forward-over-reverse), so
  ``matvec`` is ``H v``.

  Args:
    predict_fn: ``(params, batch) -> outputs`` with a leading batch axis.
    loss: a loss from :mod:`curvature.losses`.
    params: the parameters to linearize at.
    batch: the data; ``targets_fn(batch)`` gives the targets.
    curvature: one of :data:`CURVATURES`.
    l2_reg: the L2 coefficient η; adds ``½η‖θ‖²`` to the objective and
      ``η I`` to every curvature matrix.
    targets_fn: finds the targets in ``batch``; see :func:`default_targets`.
    key: PRNG key, required for ``"sampled_fisher"``.
    num_samples: targets sampled per example for ``"sampled_fisher"``.
    axis_name: for ``jax.shard_map`` users: the mesh axis name (a str, or a
      tuple of str) the batch is sharded over. ``value``, ``grad`` and every
      ``matvec`` product are then ``jax.lax.pmean``-ed over it, so they are
      the global-batch quantities (shards of equal size), identical on every
      device; ``outputs`` stay the local shard's. ``"sampled_fisher"`` folds
      the device index into ``key``, so every shard draws its own targets.
      ``None`` (the default; right under plain ``jit`` with sharded inputs,
      where the means are already global) reduces nothing. A ``vmap``
      ``axis_name`` over batch shards works the same way.

  Returns:
    A :class:`Linearization` with ``value``, ``grad``, ``matvec`` and
    ``outputs``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> def predict(params, batch):
    ...   return jnp.tanh(batch["inputs"] @ params["w"])
    >>> params = {"w": jnp.array([[0.5], [-0.3], [0.2]])}
    >>> batch = {"inputs": jax.random.normal(jax.random.key(0), (8, 3)),
    ...          "targets": jnp.zeros((8, 1))}
    >>> loss = curvature.losses.squared_error
    >>> lin = curvature.linearize(predict, loss, params, batch)
    >>> v = {"w": jnp.array([[1.0], [0.0], [-1.0]])}
    >>> gv = lin.matvec(v)  # reuses the linearization
    >>> def value_fn(p):
    ...   return loss.value(predict(p, batch), batch["targets"])
    >>> bool(jnp.allclose(lin.grad["w"], jax.grad(value_fn)(params)["w"]))
    True
    >>> jac = jax.jacfwd(lambda w: predict({"w": w}, batch))(params["w"])
    >>> jac = jac.reshape(8, 3)  # one row per example; output Hessian I / 8
    >>> bool(jnp.allclose(gv["w"][:, 0], jac.T @ jac @ v["w"][:, 0] / 8,
    ...                   atol=1e-5))
    True

  References:
    Schraudolph, "Fast curvature matrix-vector products for second-order
    gradient descent", Neural Computation, 2002.

    Pearlmutter, "Fast exact multiplication by the Hessian", Neural
    Computation, 1994.

    Martens, "Deep learning via Hessian-free optimization", ICML 2010.

    Martens, "New insights and perspectives on the natural gradient method",
    JMLR 2020 (the GGN, the Fisher and the empirical Fisher).
  """
  _check_curvature_args(curvature, key, num_samples)
  axis_name = _validation.check_axis_name(axis_name)
  targets = targets_fn(batch)
  # Per-shard derivatives (see `as_varying`), reduced by `batch_mean`; the
  # L2 terms are added after the reduction.
  local_params = as_varying(params, axis_name)

  if curvature == "hessian":

    def loss_at(p):
      return loss.value(predict_fn(p, batch), targets)

    (value, grad), linear = jax.linearize(
        jax.value_and_grad(loss_at), local_params
    )
    value, grad = batch_mean((value, grad), axis_name)
    outputs = predict_fn(params, batch)  # Dead code under jit unless used.

    def hessian_matvec(vector):
      product = batch_mean(linear(as_varying(vector, axis_name))[1], axis_name)
      return optax.tree.add_scale(product, l2_reg, vector)

    return Linearization(
        value + _l2_value(params, l2_reg),
        optax.tree.add_scale(grad, l2_reg, params), hessian_matvec, outputs)

  outputs, jvp_fn = jax.linearize(lambda p: predict_fn(p, batch), local_params)
  transpose_fn = jax.linear_transpose(jvp_fn, local_params)
  value, output_grad = jax.value_and_grad(loss.value)(outputs, targets)
  (grad,) = transpose_fn(output_grad)
  value, grad = batch_mean((value, grad), axis_name)
  grad = optax.tree.add_scale(grad, l2_reg, params)
  value = value + _l2_value(params, l2_reg)
  middle = _output_curvature(
      curvature, loss, outputs, targets, shard_key(key, axis_name),
      num_samples
  )

  def matvec(vector):
    (product,) = transpose_fn(middle(jvp_fn(as_varying(vector, axis_name))))
    return optax.tree.add_scale(batch_mean(product, axis_name), l2_reg, vector)

  return Linearization(value, grad, matvec, outputs)


def hessian_vector_product(
    fn: Callable[[Params], Array], params: Params, vector: Params
) -> Params:
  """``∇²f(θ) v`` by forward-over-reverse differentiation of a scalar ``fn``.

  Args:
    fn: a scalar function of ``params``.
    params: the point.
    vector: a pytree like ``params``.

  Returns:
    ``H v``, a pytree like ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> hv = curvature.hessian_vector_product(
    ...     lambda x: jnp.sum(x ** 3), jnp.array([1.0, 2.0]),
    ...     jnp.array([1.0, 1.0]))
    >>> print([round(float(x), 4) for x in hv])  # diag(6 x) v
    [6.0, 12.0]

  References:
    Pearlmutter, "Fast exact multiplication by the Hessian", Neural
    Computation, 1994.
  """
  return jax.jvp(jax.grad(fn), (params,), (vector,))[1]


def _one_product(curvature: str):
  def product(predict_fn, loss, params, batch, vector, **kwargs):
    lin = linearize(
        predict_fn, loss, params, batch, curvature=curvature, **kwargs
    )
    return lin.matvec(vector)

  return product


def ggn_vector_product(predict_fn, loss, params, batch, vector, **kwargs):
  """``G v = Jᵀ ∇²_z L J v`` (+ ``l2_reg v``) without a shared linearization.

  Takes the keyword arguments of :func:`linearize`. To multiply by the same
  matrix many times, call :func:`linearize` once and use its ``matvec``.
  """
  return _one_product("ggn")(
      predict_fn, loss, params, batch, vector, **kwargs
  )


def fisher_vector_product(predict_fn, loss, params, batch, vector, **kwargs):
  """The exact true Fisher product ``Jᵀ F_z J v`` (+ ``l2_reg v``).

  Takes the keyword arguments of :func:`linearize`.
  """
  return _one_product("fisher")(
      predict_fn, loss, params, batch, vector, **kwargs
  )


def sampled_fisher_vector_product(
    predict_fn, loss, params, batch, vector, *, key, num_samples=1, **kwargs
):
  """Monte-Carlo true Fisher product with ``num_samples`` sampled targets.

  ``F̂ v = 1/(N S) Σᵢ Σₛ gᵢₛ gᵢₛᵀ v`` with ``gᵢₛ = ∇θ ℓ(z_i, ỹᵢₛ)`` and
  ``ỹᵢₛ ~ p(y | zᵢ)``. It is unbiased: ``E[F̂ v] = F v``.
  """
  return _one_product("sampled_fisher")(
      predict_fn,
      loss,
      params,
      batch,
      vector,
      key=key,
      num_samples=num_samples,
      **kwargs,
  )


def empirical_fisher_vector_product(
    predict_fn, loss, params, batch, vector, **kwargs
):
  """``(1/N) Σᵢ gᵢ gᵢᵀ v`` with the data's targets, as one JVP and one VJP."""
  return _one_product("empirical_fisher")(
      predict_fn, loss, params, batch, vector, **kwargs
  )


def empirical_fisher_diagonal(
    predict_fn: PredictFn,
    loss: _losses.Loss,
    params: Params,
    batch: Batch,
    *,
    targets_fn: Callable[[Batch], Any] = default_targets,
    chunk_size: int = 32,
    axis_name: _validation.AxisName = None,
) -> Params:
  r"""The exact empirical-Fisher diagonal ``(1/N) Σᵢ gᵢ ⊙ gᵢ``.

  Per-example gradients are computed ``chunk_size`` at a time with ``vmap``
  inside ``lax.scan``, squared and summed, so memory holds ``chunk_size``
  gradients, never ``N``. This is the statistic of Martens' (2010) CG
  preconditioner, built from *per-example* gradients, not from the square of
  the mean gradient.

  Args:
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    params: the point.
    batch: the data, with a leading example axis on every leaf but
      per-batch scalars (see :func:`batch_size`).
    targets_fn: finds the targets in ``batch``.
    chunk_size: examples per vectorized chunk (rounded up to a multiple of
      the devices of an explicitly sharded batch axis).
    axis_name: inside ``jax.shard_map``, the mesh axis (or tuple of axes)
      the batch is sharded over: the per-shard means are ``pmean``-ed into
      the global one. ``None`` reduces nothing.

  Returns:
    A pytree like ``params``.
  """
  chunk_size = _validation.check_static_int("chunk_size", chunk_size, 1)
  axis_name = _validation.check_axis_name(axis_name)
  params = as_varying(params, axis_name)
  num_examples = batch_size(batch, targets_fn)
  leaves, treedef = jax.tree.flatten(batch)
  batched = [has_batch_axis(x) for x in leaves]
  examples = [x for x, b in zip(leaves, batched) if b]
  num_chunks = -(-num_examples // chunk_size)
  # Round the chunk up to a multiple of the devices an explicitly sharded
  # batch axis is split over, so that each chunk stays sharded the same way.
  shards = max(_explicit_shards(x) for x in examples)
  if shards > 1:
    reference = next(jax.typeof(x).sharding for x in examples
                     if _explicit_shards(x) == shards)
    examples = [_reshard_like(x, reference) for x in examples]
  chunk = -(-num_examples // num_chunks)
  chunk = -(-chunk // shards) * shards
  padded = num_chunks * chunk

  def to_chunks(x):
    # Example i·num_chunks + j is row i of chunk j: the reshape splits the
    # (sharded) example axis into rows, so every chunk spans all devices.
    x = _pad_examples(x, padded - num_examples)
    x = x.reshape((chunk, num_chunks) + x.shape[1:])
    return jnp.moveaxis(x, 1, 0)

  chunks = [to_chunks(x) for x in examples]
  weights = (jnp.arange(padded) < num_examples).reshape(chunk, num_chunks).T

  def example_grad(example):
    rows = iter(example)
    single = treedef.unflatten(
        [next(rows)[None] if b else x for x, b in zip(leaves, batched)])
    return jax.grad(
        lambda p: loss.per_example(
            predict_fn(p, single), targets_fn(single)
        )[0]
    )(params)

  def accumulate(total, chunk_and_weight):
    examples, weight = chunk_and_weight
    grads = jax.vmap(example_grad)(examples)
    squares = jax.tree.map(
        lambda g: jnp.sum(jnp.where(
            weight.reshape((-1,) + (1,) * (g.ndim - 1)), g * g, 0.0), axis=0),
        grads)
    return optax.tree.add(total, squares), None

  total, _ = jax.lax.scan(
      accumulate, optax.tree.zeros_like(params), (chunks, weights)
  )
  return batch_mean(optax.tree.scale(1.0 / num_examples, total), axis_name)


def _explicit_shards(x: Array) -> int:
  """How many devices the leading axis of ``x`` is explicitly sharded over.

  Under a mesh with ``Explicit`` axes (``jax.make_mesh``'s default) the
  sharding is part of the type; ``Auto`` axes and unsharded arrays give 1.
  """
  typeof = getattr(jax, "typeof", None)  # jax releases without explicit
  if typeof is None:  # sharding have no jax.typeof either.
    return 1
  sharding = getattr(typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  mesh = getattr(sharding, "mesh", None)
  if not spec or spec[0] is None or mesh is None:
    return 1
  axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  count = 1
  for axis in axes:
    count *= mesh.shape[axis]
  return count


def _pad_examples(x: Array, amount: int) -> Array:
  """``x`` with ``amount`` zero examples appended (padding).

  ``jnp.pad`` with zeros keeps an explicitly sharded example axis sharded
  (slicing out a real example to repeat would not); the padded examples'
  gradients are masked out with ``jnp.where``, so even a non-finite value
  there does not reach the sum.
  """
  if amount == 0:
    return x
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = _pad_examples(jax.random.key_data(x), amount)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  return jnp.pad(x, [(0, amount)] + [(0, 0)] * (x.ndim - 1))


def _reshard_like(x: Array, reference) -> Array:
  """``x`` with its example axis sharded like ``reference``'s (a sharding).

  ``vmap`` under explicit sharding needs every mapped axis sharded the same
  way; inputs made inside the step (cotangents, sampled targets) may not be.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = tuple(getattr(sharding, "spec", ()) or ())
  spec = spec + (None,) * (x.ndim - len(spec))
  if spec[0] == reference.spec[0]:
    return x
  target = jax.sharding.NamedSharding(
      reference.mesh, jax.sharding.PartitionSpec(reference.spec[0], *spec[1:]))
  return jax.sharding.reshard(x, target)
