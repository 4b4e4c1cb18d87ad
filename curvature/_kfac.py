r"""K-FAC: Kronecker-factored approximate curvature (Martens & Grosse 2015).

For a dense layer ``s = a W + b`` (``W`` of shape ``[in, out]``) the Fisher
block of ``[W; b]`` is approximated by a Kronecker product

.. math::
  F_\ell \approx \bar A \otimes G, \qquad
  \bar A = \tfrac1N \textstyle\sum_i \bar a_i \bar a_i^\top, \quad
  G = \tfrac1N \textstyle\sum_i g_i g_i^\top,

with ``ā = [a, 1]`` (the bias is the homogeneous coordinate) and
``g = ∂ℓᵢ/∂s`` back-propagated from targets *sampled from the model* (the
true Fisher) or, optionally, from the data's labels (the empirical Fisher).
``gᵢ`` is the gradient of example ``i``'s own loss ``ℓᵢ``, so ``Ā ⊗ G`` is the
Fisher of the mean loss ``(1/N) Σ ℓᵢ`` and matches the GGN of
:func:`curvature.linearize`. (kfac-jax builds ``G`` from gradients of the mean
loss, ``gᵢ / N``, and so its ``G`` is ours divided by ``N``.)
So ``F_ℓ⁻¹ vec(∇W̄) = vec(Ā⁻¹ ∇W̄ G⁻¹)``. A convolution is the same with
``ā`` the image patches, summed over the ``T`` output locations in ``Ā`` and
averaged over them in ``G`` (KFC, Grosse & Martens 2016).

Layers are found automatically (:mod:`curvature._layers`); every other
parameter gets a diagonal block (Monte-Carlo Fisher diagonal). Use
:func:`kfac_summary` to see which parameter got which block and why.

Dtypes: the factors, their inverses, the diagonal blocks and the
preconditioning run in at least float32; for bfloat16 parameters only the
forward pass is bfloat16 and the update is cast back to the parameters'
dtype.
"""

from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvature import _curvature_diagonals
from curvature import _layers
from curvature import _losses
from curvature import _moments
from curvature import _momentum
from curvature import _products
from curvature import _validation

Array = jax.Array
Params = Any

LAYER_KINDS = ("dense", "conv", "diagonal")
"""Kinds accepted by ``layer_overrides``."""

STATISTICS = ("true_fisher", "empirical_fisher")
"""Targets used for the statistics: sampled from the model, or the labels."""


class KfacBlock(NamedTuple):
  """One row of :func:`kfac_blocks`: the block a parameter leaf gets.

  Attributes:
    path: the leaf's path, e.g. ``"params/Dense_0/kernel"``.
    shape: the leaf's shape.
    block: ``"dense"``, ``"conv"``, ``"bias of <kernel path>"`` or
      ``"diagonal"``.
    factors: ``(dim A, dim G)`` for a kernel, else ``None``.
    reason: why a ``"diagonal"`` leaf is not part of a Kronecker block.
  """

  path: str
  shape: tuple
  block: str
  factors: Optional[tuple]
  reason: str


class ScaleByKfacState(NamedTuple):
  """State of :func:`scale_by_kfac`.

  Attributes:
    count: number of ``update`` calls.
    statistics_count: accepted (finite) statistics, for the bias correction.
    key: PRNG key for the sampled targets.
    factors_a: per parameter leaf, the raw EMA of ``Ā`` (``None`` if the
      leaf has no Kronecker factors).
    factors_g: per leaf, the raw EMA of ``G``.
    inverses_a: per leaf, ``(Ā + πγI)⁻¹`` from the last refresh.
    inverses_g: per leaf, ``(G + γ/π I)⁻¹`` from the last refresh.
    diagonal: raw EMA of the Fisher diagonal of the diagonal-block leaves.
    damping: the Levenberg-Marquardt ``λ``.
    velocity: the previous step ``δ`` (adaptive mode), else zeros.
    rejected_steps: steps rejected because a value was not finite.
    rejected_statistics: statistics discarded because they were not finite.
    learning_rate: the ``α`` of the last step (1 in fixed mode).
    momentum: the ``μ`` of the last step (0 in fixed mode).
    reduction_ratio: ``ρ`` at the last damping adaptation.
  """

  count: Array
  statistics_count: Array
  key: Array
  factors_a: tuple
  factors_g: tuple
  inverses_a: tuple
  inverses_g: tuple
  diagonal: Params
  damping: Array
  velocity: Params
  rejected_steps: Array
  rejected_statistics: Array
  learning_rate: Array
  momentum: Array
  reduction_ratio: Array


def leaf_paths(params: Params) -> list:
  """``"a/b/0/kernel"``-style names of the leaves of ``params``."""
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  return ["/".join(_key_name(k) for k in path) for path, _ in paths]


def _key_name(key) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _allocated_dims(shape, max_factor_dim):
  """Factor sizes reserved at ``init`` (no batch yet): ``[..., out]`` kernels.

  Dense ``[in, out]`` and HWIO convolution kernels (Flax, plain JAX) get
  ``Ā`` of size ``prod(shape[:-1]) + 1`` and ``G`` of size ``shape[-1]``.
  """
  if len(shape) < 2:
    return None
  dims = (int(np.prod(shape[:-1])) + 1, int(shape[-1]))
  return dims if max(dims) <= max_factor_dim else None


def _check_overrides(overrides, paths):
  unknown = sorted(set(overrides) - set(paths))
  if unknown:
    raise ValueError(
        f"layer_overrides names parameters that do not exist: {unknown}."
        f" Valid paths are: {paths}.")


def _plan(predict_fn, params, batch, overrides, max_factor_dim):
  """The usable layers and, for every diagonal leaf, the reason."""
  paths = leaf_paths(params)
  _check_overrides(overrides, paths)
  leaves = jax.tree.leaves(params)
  found = _layers.discover_layers(predict_fn, params, batch)
  reasons = dict(found.reasons)
  layers = []
  for layer in found.layers:
    kpath = paths[layer.kernel]
    wanted = overrides.get(kpath)
    dims = (layer.input_dim + 1, layer.output_dim)
    allocated = _allocated_dims(leaves[layer.kernel].shape, max_factor_dim)
    reason = None
    if wanted == "diagonal":
      reason = "layer_overrides asks for a diagonal block"
    elif wanted is not None and wanted != layer.kind:
      raise ValueError(
          f"layer_overrides says {kpath!r} is a {wanted} layer, but it is"
          f" used as a {layer.kind} kernel. Use kind {layer.kind!r} or"
          " 'diagonal'.")
    elif max(dims) > max_factor_dim:
      reason = (f"factor sizes {dims} exceed max_factor_dim="
                f"{max_factor_dim}")
    elif allocated != dims:
      reason = (f"{layer.kind} kernel in a layout other than [..., out]"
                f" (factors {dims}, reserved at init {allocated}); transpose"
                " the kernel to [in, out] (or HWIO) to get a Kronecker block")
    if reason is not None:
      reasons[layer.kernel] = reason
      if layer.bias is not None:
        reasons[layer.bias] = "bias of a layer with a diagonal kernel block"
      continue
    if layer.bias is not None and overrides.get(paths[layer.bias]) == (
        "diagonal"):
      reasons[layer.bias] = "layer_overrides asks for a diagonal block"
      layer = layer._replace(bias=None)
    layers.append(layer)
  for path, kind in overrides.items():
    index = paths.index(path)
    if kind in ("dense", "conv") and not any(
        l.kernel == index for l in found.layers):
      raise ValueError(
          f"layer_overrides says {path!r} is a {kind} layer, but it is not"
          f" used as one: {reasons.get(index, 'bias of a layer')}. Only"
          " 'diagonal' can be forced.")
  return tuple(layers), reasons


def kfac_blocks(
    predict_fn: Callable[[Params, Any], Any],
    params: Params,
    batch: Any,
    *,
    layer_overrides: Optional[Mapping[str, str]] = None,
    max_factor_dim: int = 4096,
) -> tuple:
  """Which curvature block every parameter leaf gets, and why.

  Args:
    predict_fn: ``(params, batch) -> outputs``, as given to
      :func:`scale_by_kfac`.
    params: the parameters.
    batch: a batch (only its shapes matter).
    layer_overrides: as in :func:`scale_by_kfac`.
    max_factor_dim: as in :func:`scale_by_kfac`.

  Returns:
    A tuple of :class:`KfacBlock`, one per leaf, in ``jax.tree.leaves``
    order.
  """
  layers, reasons = _plan(predict_fn, params, batch,
                          dict(layer_overrides or {}), max_factor_dim)
  paths = leaf_paths(params)
  rows = {}
  for layer in layers:
    rows[layer.kernel] = (layer.kind, (layer.input_dim + 1,
                                       layer.output_dim), "")
    if layer.bias is not None:
      rows[layer.bias] = (f"bias of {paths[layer.kernel]}", None, "")
  out = []
  for i, leaf in enumerate(jax.tree.leaves(params)):
    block, factors, reason = rows.get(
        i, ("diagonal", None, reasons.get(i, "not a layer parameter")))
    out.append(KfacBlock(paths[i], tuple(leaf.shape), block, factors, reason))
  return tuple(out)


def kfac_summary(
    predict_fn: Callable[[Params, Any], Any],
    params: Params,
    batch: Any,
    *,
    layer_overrides: Optional[Mapping[str, str]] = None,
    max_factor_dim: int = 4096,
) -> str:
  """A printable table of :func:`kfac_blocks`.

  Example:
    >>> print(curvature.kfac_summary(model.apply, variables, batch))
    params/Dense_0/bias    (5,)    bias of params/Dense_0/kernel
    params/Dense_0/kernel  (4, 5)  dense  A 5x5, G 5x5
    ...
  """
  rows = kfac_blocks(predict_fn, params, batch,
                     layer_overrides=layer_overrides,
                     max_factor_dim=max_factor_dim)
  width = max(len(r.path) for r in rows)
  lines = []
  for r in rows:
    detail = (f"A {r.factors[0]}x{r.factors[0]}, G {r.factors[1]}x"
              f"{r.factors[1]}" if r.factors else r.reason)
    lines.append(f"{r.path:<{width}}  {str(r.shape):<14}  {r.block:<10}"
                 f"  {detail}".rstrip())
  return "\n".join(lines)


# Kernel <-> matrix ----------------------------------------------------------


def _to_matrix(layer, kernel):
  """The kernel (or its gradient) as ``[input_dim, output_dim]``."""
  if layer.kind == "conv":
    rhs_spec = layer.conv[5]
    moved = jnp.transpose(kernel, (rhs_spec[1], *rhs_spec[2:], rhs_spec[0]))
    return moved.reshape(layer.input_dim, layer.output_dim)
  return kernel if layer.in_axis == 0 else kernel.T


def _from_matrix(layer, matrix, shape):
  if layer.kind == "conv":
    rhs_spec = layer.conv[5]
    order = (rhs_spec[1], *rhs_spec[2:], rhs_spec[0])
    moved = matrix.reshape(tuple(shape[d] for d in order))
    return jnp.transpose(moved, np.argsort(order))
  return matrix if layer.in_axis == 0 else matrix.T


# Statistics -----------------------------------------------------------------


def _accumulation_dtype(dtype):
  """Statistics, inverses and preconditioning run in at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def _factors(layer, inputs, output_grads, num_examples):
  """``(Ā, G)`` of one layer from its inputs and ``[S, ...]`` output gradients."""
  rows = _layers.layer_inputs(layer, inputs)
  rows = rows.astype(_accumulation_dtype(rows.dtype))
  rows = jnp.concatenate([rows, jnp.ones_like(rows[:, :1])], axis=1)
  a = rows.T @ rows / num_examples
  grads = jax.vmap(lambda g: _layers.layer_output_grads(layer, g))(
      output_grads)
  grads = grads.reshape(-1, grads.shape[-1])
  grads = grads.astype(_accumulation_dtype(grads.dtype))
  g = grads.T @ grads / grads.shape[0]
  return a, g


def _statistics(predict_fn, loss, layers, diag_leaves, params, batch, key,
                statistics, num_samples, targets_fn, axis_name):
  """Per-layer ``(Ā, G)`` and the diagonal of the other leaves, one batch.

  With ``axis_name`` the per-shard statistics are ``pmean``-ed (global
  batch) and ``key`` is folded with the device index (independent targets).
  """
  num_examples = jax.tree.leaves(batch)[0].shape[0]
  params = _products.as_varying(params, axis_name)
  key = _products.shard_key(key, axis_name)
  fn, zeros = _layers.tapped_forward(predict_fn, layers, params, batch)
  zeros = _products.as_varying(zeros, axis_name)
  outputs, vjp_fn, inputs = jax.vjp(fn, zeros, has_aux=True)
  outputs = jax.lax.stop_gradient(outputs)
  if statistics == "empirical_fisher":
    cots = _losses.output_gradients(loss, outputs, targets_fn(batch))[None]
  else:
    keys = jax.random.split(key, num_samples)
    cots = jax.vmap(lambda k: _losses.output_gradients(
        loss, outputs, loss.sample(k, outputs)))(keys)
  output_grads = jax.vmap(lambda c: vjp_fn(c)[0])(cots)
  factors = [_factors(layer, inputs[k], output_grads[k], num_examples)
             for k, layer in enumerate(layers)]
  diagonal = None
  if diag_leaves:
    leaves, treedef = jax.tree.flatten(params)

    def sub_predict(sub, b):
      full = list(leaves)
      for i, x in zip(diag_leaves, sub):
        full[i] = x
      return predict_fn(treedef.unflatten(full), b)

    sub = [leaves[i] for i in diag_leaves]
    per_sample = jax.lax.map(
        lambda c: _curvature_diagonals.squared_vjp_mean(
            sub_predict, sub, batch, c), cots)
    diagonal = [jnp.mean(x, axis=0) for x in per_sample]
  return _products.batch_mean((factors, diagonal), axis_name)


# Damping and inverses -------------------------------------------------------


def _damped_inverse(matrix, damping):
  eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
  sym = 0.5 * (matrix + matrix.T) + damping * eye
  factor = jax.scipy.linalg.cho_factor(sym)
  return jax.scipy.linalg.cho_solve(factor, eye)


def _pi(a, g):
  """π = sqrt((tr Ā / dim Ā) / (tr G / dim G)), 1 where undefined."""
  ta = jnp.trace(a) / a.shape[0]
  tg = jnp.trace(g) / g.shape[0]
  ok = (ta > 0) & (tg > 0) & jnp.isfinite(ta) & jnp.isfinite(tg)
  return jnp.where(ok, jnp.sqrt(jnp.where(ok, ta / tg, 1.0)), 1.0)


def _layer_inverses(layer, a, g, gamma):
  """π-adjusted factored Tikhonov damping: (Ā + πγI)⁻¹, (G + γ/π I)⁻¹."""
  size = a.shape[0] if layer.bias is not None else a.shape[0] - 1
  used = a[:size, :size]
  pi = _pi(used, g)
  inv_a = _damped_inverse(used, pi * gamma)
  inv_a = jnp.zeros_like(a).at[:size, :size].set(inv_a)
  return inv_a, _damped_inverse(g, gamma / pi)


def _precondition(layers, diag_leaves, grads, inv_a, inv_g, diagonal,
                  diag_damping):
  """``Ā⁻¹ ∇W̄ G⁻¹`` for each layer, ``g / (d + λ + η)`` for the rest."""
  leaves, treedef = jax.tree.flatten(grads)
  out = list(leaves)
  for layer in layers:
    k = layer.kernel
    matrix = _to_matrix(layer, leaves[k])
    size = matrix.shape[0]
    if layer.bias is not None:
      matrix = jnp.concatenate(
          [matrix, leaves[layer.bias].reshape(1, -1)], axis=0)
      size += 1
    dtype = jnp.promote_types(matrix.dtype, inv_a[k].dtype)
    product = (inv_a[k][:size, :size].astype(dtype) @ matrix.astype(dtype)
               @ inv_g[k].astype(dtype))
    out[k] = _from_matrix(layer, product[:layer.input_dim], leaves[k].shape
                          ).astype(leaves[k].dtype)
    if layer.bias is not None:
      out[layer.bias] = product[-1].reshape(leaves[layer.bias].shape).astype(
          leaves[layer.bias].dtype)
  for i in diag_leaves:
    dtype = _accumulation_dtype(leaves[i].dtype)
    out[i] = (leaves[i].astype(dtype)
              / (diagonal[i].astype(dtype) + diag_damping.astype(dtype))
              ).astype(leaves[i].dtype)
  return treedef.unflatten(out)


# Exact quadratic model ------------------------------------------------------


def _quadratic_forms(predict_fn, loss, params, batch, vectors, l2_reg,
                     targets_fn, axis_name):
  """``vᵢᵀ C vⱼ`` (C the GGN + ηI) and ``f(θ)`` from one linearization.

  Only Jacobian-vector products are needed: ``vᵢᵀ Jᵀ H J vⱼ = (J vᵢ)ᵀ H (J
  vⱼ)`` with the loss's closed-form output Hessian ``H``. With
  ``axis_name`` the batch means are ``pmean``-ed over it.
  """
  targets = targets_fn(batch)
  outputs, jvp_fn = jax.linearize(
      lambda p: predict_fn(p, batch), _products.as_varying(params, axis_name))
  tangents = [jvp_fn(_products.as_varying(v, axis_name)) for v in vectors]
  h_tangents = [loss.hvp(outputs, targets, t) for t in tangents]
  n = len(vectors)
  rows, value = _products.batch_mean(
      (jnp.asarray([[jnp.vdot(tangents[i], h_tangents[j]) for j in range(n)]
                    for i in range(n)]), loss.value(outputs, targets)),
      axis_name)
  rows = rows + l2_reg * jnp.asarray(
      [[optax.tree.vdot(vectors[i], vectors[j]) for j in range(n)]
       for i in range(n)])
  value = value + 0.5 * l2_reg * optax.tree.norm(params, squared=True)
  return rows, value


def _solve_step(quad, linear):
  """``(α, μ)`` minimising ``½ xᵀ Q x + bᵀ x`` (μ = 0 if Q is singular)."""
  q11, q12, q22 = quad[0, 0], quad[0, 1], quad[1, 1]
  b1, b2 = linear
  det = q11 * q22 - q12 * q12
  two = det > 1e-12 * jnp.maximum(q11 * q22, 1e-30)
  safe_det = jnp.where(two, det, 1.0)
  alpha2 = (-b1 * q22 + b2 * q12) / safe_det
  mu2 = (-b2 * q11 + b1 * q12) / safe_det
  alpha1 = -b1 / jnp.where(q11 > 0, q11, 1.0)
  alpha = jnp.where(two, alpha2, alpha1)
  mu = jnp.where(two, mu2, 0.0)
  model = 0.5 * (alpha * b1 + mu * b2)
  return alpha, mu, model


def scale_by_kfac(
    predict_fn: Callable[[Params, Any], Any],
    loss: _losses.Loss,
    *,
    statistics: str = "true_fisher",
    num_samples: int = 1,
    statistics_batch_size: Optional[int] = None,
    decay: float = 0.95,
    initial_damping: float = 150.0,
    l2_reg: float = 0.0,
    inverse_every: int = 20,
    adaptive: bool = False,
    adapt_damping: Optional[bool] = None,
    damping_every: int = 5,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
    quadratic_batch_size: Optional[int] = None,
    layer_overrides: Optional[Mapping[str, str]] = None,
    max_factor_dim: int = 4096,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    seed: int = 0,
    axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""K-FAC direction (Martens & Grosse 2015), layers found automatically.

  With ``γ = √(λ + η)`` and ``π`` the trace ratio of the two factors, each
  discovered dense or convolution layer gets

  .. math::
    \Delta_\ell = (\bar A_\ell + \pi_\ell\gamma I)^{-1}\,
        \nabla_{\bar W_\ell} h\,(G_\ell + \tfrac{\gamma}{\pi_\ell} I)^{-1},
    \qquad \pi_\ell = \sqrt{\frac{\operatorname{tr}\bar A_\ell/\dim\bar A_\ell}
        {\operatorname{tr} G_\ell/\dim G_\ell}}

  and every other leaf ``Δ = ∇h / (d + λ + η)`` with ``d`` its Monte-Carlo
  Fisher diagonal. ``Ā, G, d`` are EMAs (``decay``, 0.95) with the shared
  bias correction (:func:`curvature.debias`), from the first
  ``statistics_batch_size`` examples of each batch; the damped inverses are
  refreshed every ``inverse_every`` steps under ``lax.cond``.

  * ``adaptive=False`` (default): the output is ``Δ``; chain a learning rate
    and momentum (:func:`kfac` does).
  * ``adaptive=True`` (M&G §7): the step is ``δ = −αΔ + μδ₋₁`` with ``(α, μ)``
    minimising the exact quadratic model
    ``M(δ) = ½δᵀ(C + λI)δ + ∇hᵀδ`` (``C`` the GGN + ηI, which equals the
    Fisher for the losses of :mod:`curvature.losses`) from two exact
    GGN-vector products; the output is ``−δ``, so chain
    ``scale_by_learning_rate(1.0)``. ``λ`` is adapted every
    ``damping_every`` steps by Levenberg-Marquardt on
    ``ρ = (h(θ+δ) − h(θ)) / M(δ)``: ``ρ > ¾ → λ ← ω λ``, ``ρ < ¼ → λ ← λ/ω``,
    ``ω = (19/20)^damping_every``.

  **Layers** are discovered by tracing ``predict_fn`` (see
  :mod:`curvature._layers`): Flax linen ``model.apply``, Flax nnx (with
  ``nnx.merge`` inside ``predict_fn``) and plain-JAX functions all work as
  they are. ``layer_overrides`` maps a leaf path (see :func:`kfac_summary`)
  to ``"diagonal"`` (force a diagonal block) or ``"dense"``/``"conv"``
  (assert the discovery). Factor buffers are reserved at ``init(params)``
  for kernels laid out ``[..., out]`` (Flax, ``x @ w``, HWIO convolutions);
  a kernel in another layout falls back to a diagonal block, as reported by
  the summary.

  **Non-finite values.** Non-finite statistics are discarded (the EMAs keep
  their value, ``rejected_statistics`` counts them). A non-finite gradient or
  direction gives a zero update, raises ``λ`` (when adapted) and counts in
  ``rejected_steps``.

  **Data parallelism.** Under ``jit`` with a sharded batch the statistics
  are already global. Inside ``jax.shard_map`` pass ``axis_name``, the mesh
  axis the batch is sharded over (parameters and state replicated): the
  ``Ā``/``G`` factors, the diagonal blocks, the quadratic model of the
  adaptive mode and the objective behind ``ρ`` are ``jax.lax.pmean``-ed over
  it, and so is the incoming gradient (pass the local or the global one; see
  :func:`curvature.scale_by_hessian_free`). Targets sampled for the true
  Fisher are drawn independently on every device. The ``*_batch_size``
  arguments then count examples per shard.

  Args:
    predict_fn: ``(params, batch) -> outputs`` with a leading batch axis.
    loss: a loss from :mod:`curvature.losses`.
    statistics: ``"true_fisher"`` (targets sampled from the model) or
      ``"empirical_fisher"`` (the batch's targets).
    num_samples: sampled targets per example for the true Fisher (1).
    statistics_batch_size: leading examples of each batch for the
      statistics (``None``: all; the MNIST benchmark uses 1/8 of the batch).
    decay: EMA decay of the factors (0.95).
    initial_damping: ``λ₀`` (150 in M&G's autoencoder runs).
    l2_reg: L2 coefficient ``η`` added to the objective and the curvature.
    inverse_every: ``T₃``, steps between refreshes of the inverses (20).
    adaptive: automatic learning rate and momentum (M&G §7).
    adapt_damping: Levenberg-Marquardt ``λ``; defaults to ``adaptive`` and
      needs it (the transform must know the step it takes).
    damping_every: ``T₁`` (5).
    min_damping: floor of ``λ``.
    max_damping: ceiling of ``λ``.
    quadratic_batch_size: leading examples used by the exact quadratic model
      (``None``: all).
    layer_overrides: ``{path: "dense" | "conv" | "diagonal"}``.
    max_factor_dim: layers with a larger factor get a diagonal block.
    targets_fn: finds the targets in a batch.
    seed: PRNG seed (kept in the state).
    axis_name: for ``jax.shard_map``: the mesh axis name (str or tuple of
      str) the batch is sharded over; see *Data parallelism*. ``None``: no
      cross-device reduction.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`ScaleByKfacState`.

  Example:
    >>> model = MLP()  # a flax.linen module
    >>> opt = optax.chain(
    ...     curvature.scale_by_kfac(model.apply, losses.softmax_cross_entropy),
    ...     optax.trace(0.9), optax.scale_by_learning_rate(1e-3))

  References:
    Martens & Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML 2015. Grosse & Martens, "A Kronecker-factored
    approximate Fisher matrix for convolution layers", ICML 2016. Amari 1998.
    Kunstner et al. 2019 (empirical Fisher). ``shared/seeds/000_*`` and
    ``002_*`` (K-FAC, (A ⊗ G)⁻¹ = A⁻¹ ⊗ G⁻¹).
  """
  _validation.check_choice("statistics", statistics, STATISTICS)
  _moments.check_decay("decay", decay)
  _validation.check_nonnegative("initial_damping", initial_damping,
                                "K-FAC uses 150 on the autoencoders.")
  _validation.check_nonnegative("l2_reg", l2_reg)
  _validation.check_positive("max_damping", max_damping)
  _validation.check_nonnegative("min_damping", min_damping)
  num_samples = _validation.check_static_int("num_samples", num_samples, 1)
  inverse_every = _validation.check_static_int(
      "inverse_every", inverse_every, 1)
  damping_every = _validation.check_static_int(
      "damping_every", damping_every, 1)
  max_factor_dim = _validation.check_static_int(
      "max_factor_dim", max_factor_dim, 1)
  for name, value in (("statistics_batch_size", statistics_batch_size),
                      ("quadratic_batch_size", quadratic_batch_size)):
    if value is not None:
      _validation.check_static_int(name, value, 1)
  _curvature_diagonals.check_model(predict_fn, loss)
  axis_name = _validation.check_axis_name(axis_name)
  overrides = dict(layer_overrides or {})
  for path, kind in overrides.items():
    _validation.check_choice(f"layer_overrides[{path!r}]", kind, LAYER_KINDS)
  if adapt_damping is None:
    adapt_damping = adaptive
  if adapt_damping and not adaptive:
    raise ValueError(
        "adapt_damping=True needs adaptive=True: the Levenberg-Marquardt rule"
        " compares the step taken with its quadratic model, and with"
        " adaptive=False the step is set by the learning rate outside this"
        " transform. Use adaptive=True, or keep the damping fixed.")
  omega = (19.0 / 20.0) ** damping_every

  def init_fn(params):
    _validation.check_params(params, "scale_by_kfac")
    leaves = jax.tree.leaves(params)
    _check_overrides(overrides, leaf_paths(params))
    a, g = [], []
    for leaf in leaves:
      dims = _allocated_dims(leaf.shape, max_factor_dim)
      factor_dtype = _accumulation_dtype(leaf.dtype)
      a.append(None if dims is None else jnp.zeros((dims[0],) * 2,
                                                   factor_dtype))
      g.append(None if dims is None else jnp.zeros((dims[1],) * 2,
                                                   factor_dtype))
    dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
    zero = jnp.zeros((), dtype)
    return ScaleByKfacState(
        count=jnp.zeros((), jnp.int32),
        statistics_count=jnp.zeros((), jnp.int32),
        key=jax.random.key(seed),
        factors_a=tuple(a), factors_g=tuple(g),
        inverses_a=tuple(a), inverses_g=tuple(g),
        diagonal=jax.tree.map(
            lambda x: jnp.zeros(x.shape, _accumulation_dtype(x.dtype)),
            params),
        damping=jnp.asarray(initial_damping, dtype),
        velocity=optax.tree.zeros_like(params),
        rejected_steps=jnp.zeros((), jnp.int32),
        rejected_statistics=jnp.zeros((), jnp.int32),
        learning_rate=jnp.ones((), dtype), momentum=zero,
        reduction_ratio=zero)

  def update_fn(updates, state, params=None, *, batch=None, **extra_args):
    del extra_args
    _curvature_diagonals.check_update_args("scale_by_kfac", params, batch)
    if jax.tree.structure(updates) != jax.tree.structure(params):
      raise ValueError(
          "The gradients do not match the parameter tree: pass the gradient"
          " of the loss with respect to exactly the `params` given to"
          " `update`.")
    num_examples = jax.tree.leaves(batch)[0].shape[0]
    stats_batch = _products.take_examples(
        batch, min(statistics_batch_size or num_examples, num_examples))
    layers, _ = _plan(predict_fn, params, stats_batch, overrides,
                      max_factor_dim)
    in_layer = {l.kernel for l in layers} | {
        l.bias for l in layers if l.bias is not None}
    num_leaves = len(jax.tree.leaves(params))
    diag_leaves = [i for i in range(num_leaves) if i not in in_layer]
    key, sample_key = jax.random.split(state.key)

    # Statistics, EMA with bias correction, non-finite rejection.
    factors, diagonal = _statistics(
        predict_fn, loss, layers, diag_leaves, params, stats_batch,
        sample_key, statistics, num_samples, targets_fn, axis_name)
    new_a, new_g = list(state.factors_a), list(state.factors_g)
    for layer, (a, g) in zip(layers, factors):
      new_a[layer.kernel] = a.astype(new_a[layer.kernel].dtype)
      new_g[layer.kernel] = g.astype(new_g[layer.kernel].dtype)
    diag_leaves_state = jax.tree.leaves(state.diagonal)
    new_d = list(diag_leaves_state)
    for i, d in zip(diag_leaves, diagonal or ()):
      new_d[i] = d.astype(new_d[i].dtype)
    observed = [(i, new_a[i], new_g[i]) for i in {l.kernel for l in layers}]
    finite = _validation.all_finite(
        (observed, [new_d[i] for i in diag_leaves]))
    old = (state.factors_a, state.factors_g, diag_leaves_state)
    new = (tuple(new_a), tuple(new_g), new_d)
    used = [l.kernel for l in layers]
    mixed = _moments.ema_update(old, new, decay)
    # Only the observed blocks move; the others keep their (unused) values.
    mixed = (
        tuple(mixed[0][i] if i in used else old[0][i]
              for i in range(num_leaves)),
        tuple(mixed[1][i] if i in used else old[1][i]
              for i in range(num_leaves)),
        [mixed[2][i] if i in diag_leaves else old[2][i]
         for i in range(num_leaves)])
    ema_a, ema_g, ema_d = optax.tree.where(finite, mixed, old)
    statistics_count = state.statistics_count + finite.astype(jnp.int32)
    debias_count = jnp.maximum(statistics_count, 1)
    a_hat, g_hat, d_hat = _moments.debias(
        (ema_a, ema_g, ema_d), decay, debias_count)

    # Damped inverses, refreshed every `inverse_every` steps.
    damping = state.damping
    gamma = jnp.sqrt(damping + l2_reg)

    def refresh():
      inv_a, inv_g = list(state.inverses_a), list(state.inverses_g)
      for layer in layers:
        k = layer.kernel
        ia, ig = _layer_inverses(layer, a_hat[k], g_hat[k],
                                 gamma.astype(a_hat[k].dtype))
        ok = jnp.all(jnp.isfinite(ia)) & jnp.all(jnp.isfinite(ig))
        inv_a[k] = jnp.where(ok, ia, state.inverses_a[k])
        inv_g[k] = jnp.where(ok, ig, state.inverses_g[k])
      return tuple(inv_a), tuple(inv_g)

    inverses_a, inverses_g = jax.lax.cond(
        state.count % inverse_every == 0, refresh,
        lambda: (state.inverses_a, state.inverses_g))

    # Preconditioned gradient.
    grad = optax.tree.add_scale(
        _products.batch_mean(updates, axis_name), l2_reg, params)
    direction = _precondition(
        layers, diag_leaves, grad, inverses_a, inverses_g, d_hat,
        damping + l2_reg)
    dtype = state.learning_rate.dtype
    if adaptive:
      q_batch = _products.take_examples(
          batch, min(quadratic_batch_size or num_examples, num_examples))
      step_dir = optax.tree.scale(-1.0, direction)
      quad, value = _quadratic_forms(
          predict_fn, loss, params, q_batch, [step_dir, state.velocity],
          l2_reg, targets_fn, axis_name)
      quad = quad + damping * jnp.asarray(
          [[optax.tree.vdot(x, y) for y in (step_dir, state.velocity)]
           for x in (step_dir, state.velocity)])
      linear = (optax.tree.vdot(grad, step_dir),
                optax.tree.vdot(grad, state.velocity))
      alpha, mu, model = _solve_step(quad, linear)
      step = optax.tree.add_scale(optax.tree.scale(alpha, step_dir), mu,
                                  state.velocity)

      def adapt():
        new_value = _products.objective(
            predict_fn, loss, optax.tree.add(params, step), q_batch,
            l2_reg=l2_reg, targets_fn=targets_fn, axis_name=axis_name)
        rho = (new_value - value) / jnp.where(model < 0, model, -1.0)
        rho = jnp.where(jnp.isfinite(rho) & (model < 0), rho, -jnp.inf)
        factor = jnp.where(rho > 0.75, omega,
                           jnp.where(rho < 0.25, 1.0 / omega, 1.0))
        return (jnp.clip(damping * factor, min_damping, max_damping),
                rho.astype(dtype))

      if adapt_damping:
        new_damping, rho = jax.lax.cond(
            state.count % damping_every == 0, adapt,
            lambda: (damping, state.reduction_ratio))
      else:
        new_damping, rho = damping, state.reduction_ratio
      output = optax.tree.scale(-1.0, step)
    else:
      alpha, mu = jnp.ones((), dtype), jnp.zeros((), dtype)
      new_damping, rho = damping, state.reduction_ratio
      output = direction
      step = state.velocity

    ok = (_validation.all_finite(grad)
          & _validation.all_finite(output))
    zeros = optax.tree.zeros_like(params)
    output = optax.tree.cast_like(optax.tree.where(ok, output, zeros), params)
    raised = jnp.clip(damping / omega, min_damping, max_damping)
    new_damping = jnp.where(
        ok, new_damping, raised if adapt_damping else damping)
    new_state = ScaleByKfacState(
        count=optax.safe_increment(state.count),
        statistics_count=statistics_count,
        key=key,
        factors_a=ema_a, factors_g=ema_g,
        inverses_a=inverses_a, inverses_g=inverses_g,
        diagonal=jax.tree.unflatten(jax.tree.structure(params), ema_d),
        damping=new_damping.astype(damping.dtype),
        velocity=optax.tree.cast_like(
            optax.tree.where(ok, step, zeros), params),
        rejected_steps=state.rejected_steps + (~ok).astype(jnp.int32),
        rejected_statistics=state.rejected_statistics
        + (~finite).astype(jnp.int32),
        learning_rate=jnp.where(ok, alpha, 0.0).astype(dtype),
        momentum=jnp.where(ok, mu, 0.0).astype(dtype),
        reduction_ratio=jnp.asarray(rho, dtype))
    return output, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def kfac(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    *,
    predict_fn: Callable[[Params, Any], Any],
    loss: _losses.Loss,
    momentum: float = 0.9,
    adaptive: bool = False,
    statistics: str = "true_fisher",
    num_samples: int = 1,
    statistics_batch_size: Optional[int] = None,
    decay: float = 0.95,
    initial_damping: Optional[float] = None,
    l2_reg: float = 0.0,
    inverse_every: int = 20,
    damping_every: int = 5,
    quadratic_batch_size: Optional[int] = None,
    layer_overrides: Optional[Mapping[str, str]] = None,
    max_factor_dim: int = 4096,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    seed: int = 0,
    axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""K-FAC optimizer (Martens & Grosse 2015) as an ``optax.chain``.

  * ``adaptive=False``: ``θ ← θ − lr · v``, ``v ← momentum·v + Δ``, with
    ``Δ`` the K-FAC direction of :func:`scale_by_kfac` at fixed damping
    ``λ = initial_damping``.
  * ``adaptive=True``: the step ``δ = −αΔ + μδ₋₁`` with ``α, μ`` from the
    exact quadratic model and Levenberg-Marquardt damping (M&G §7); then
    ``learning_rate`` multiplies that step (keep it 1; ``momentum`` is not
    used) and ``initial_damping`` is ``λ₀`` (use ~150 as M&G).

  See :func:`scale_by_kfac` for every argument.

  Args:
    learning_rate: a scalar or schedule.
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    momentum: heavy-ball momentum of the fixed mode (0 disables it).
    adaptive: automatic learning rate and momentum.
    statistics: ``"true_fisher"`` or ``"empirical_fisher"``.
    num_samples: sampled targets per example.
    statistics_batch_size: leading examples used for the statistics.
    decay: factor EMA decay.
    initial_damping: ``λ`` (fixed mode, default 1e-3) or ``λ₀`` (adaptive,
      default 150).
    l2_reg: L2 coefficient.
    inverse_every: steps between inverse refreshes.
    damping_every: steps between damping adaptations.
    quadratic_batch_size: examples for the exact quadratic model.
    layer_overrides: ``{path: kind}``.
    max_factor_dim: larger factors fall back to diagonal blocks.
    targets_fn: finds the targets in a batch.
    seed: PRNG seed.
    axis_name: for ``jax.shard_map``: the mesh axis the batch is sharded
      over (see :func:`scale_by_kfac`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> opt = curvature.kfac(1e-2, predict_fn=model.apply,
    ...                      loss=curvature.losses.softmax_cross_entropy)
    >>> state = opt.init(variables)
    >>> updates, state = opt.update(grads, state, variables, batch=batch)

  References:
    Martens & Grosse 2015; Grosse & Martens 2016; ``shared/seeds/000_*``,
    ``002_*``.
  """
  if initial_damping is None:
    initial_damping = 150.0 if adaptive else 1e-3
  parts = [scale_by_kfac(
      predict_fn, loss, statistics=statistics, num_samples=num_samples,
      statistics_batch_size=statistics_batch_size, decay=decay,
      initial_damping=initial_damping, l2_reg=l2_reg,
      inverse_every=inverse_every, adaptive=adaptive,
      damping_every=damping_every, quadratic_batch_size=quadratic_batch_size,
      layer_overrides=layer_overrides, max_factor_dim=max_factor_dim,
      targets_fn=targets_fn, seed=seed, axis_name=axis_name)]
  if not adaptive and not (isinstance(momentum, (int, float))
                           and momentum == 0):
    parts.append(_momentum.scale_by_momentum(momentum))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)
