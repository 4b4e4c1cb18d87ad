r"""K-FAC and EKFAC: Kronecker-factored curvature, configurations of the core.

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
averaged over them in ``G`` (KFC, Grosse & Martens 2016). The same rule
holds for any kernel shared over positions (a sequence, heads) and is
K-FAC-expand; ``weight_sharing="reduce"`` is K-FAC-reduce (Eschenhagen et
al. 2023): kernels reused several times (tied embeddings), embedding
lookups and the layers of ``scan`` stacks get Kronecker blocks too (see
:func:`scale_by_kfac`).

Layers are found automatically (:mod:`curvature._layers`); every other
parameter gets a diagonal block (Monte-Carlo Fisher diagonal). Use
:func:`kfac_summary` to see which parameter got which block and why.

The optimizer is a sequence of named stages over the blocks of
:mod:`curvature._blocks`: observe (record layer inputs and output
gradients) → accumulate → refresh → refit (EKFAC) → γ search → precondition
→ adaptive step → guard.

Dtypes: the factors, their inverses, the diagonal blocks and the
preconditioning run in at least float32; for bfloat16 parameters only the
forward pass is bfloat16 and the update is cast back to the parameters'
dtype.
"""

import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvature import _blocks
from curvature import _curvature_diagonals
from curvature import _damping
from curvature import _grafting
from curvature import _layers
from curvature import _losses
from curvature import _momentum
from curvature import _optax_typed
from curvature import _products
from curvature import _sharding
from curvature import _taylor
from curvature import _validation

Array = jax.Array
Params = Any

LAYER_KINDS = ("dense", "conv", "lookup", "diagonal")
"""Kinds accepted by ``layer_overrides``."""

WEIGHT_SHARING = ("expand", "reduce")
"""How a kernel shared over positions (sequence, image locations, uses) is
factored: K-FAC-expand or K-FAC-reduce (Eschenhagen et al. 2023)."""

STATISTICS = ("true_fisher", "curvature_propagation", "empirical_fisher")
"""Output-gradient probes for the statistics: targets sampled from the model,
Rademacher probes through the output Fisher's factor, or the labels."""

DIAGONAL_ESTIMATORS = ("per_example", "square_of_sum")
"""How the leaves outside every layer get their Fisher diagonal: the mean of
squared per-example gradients, or the square of the summed gradient."""

STRUCTURES = ("kronecker", "eigen_kronecker")
"""K-FAC's ``Ā⁻¹ ⊗ G⁻¹``, or EKFAC's eigenbasis with a re-fitted diagonal."""


BlockRow = _blocks.BlockRow
KfacBlock = _blocks.BlockRow


class ScaleByKfacState(NamedTuple):
  """State of :func:`scale_by_kfac`.

  Attributes:
    count: number of ``update`` calls.
    statistics_count: accepted (finite) statistics, for the averages.
    key: PRNG key for the sampled targets.
    blocks: ``{kernel path: BlockState}``: one entry per leaf that can hold
      a Kronecker block (a kernel of rank ≥ 2 within ``max_factor_dim``),
      reserved at ``init``; its ``statistics`` are the raw averages
      :class:`curvature._blocks.KroneckerFactors` ``(Ā, G)``.
    diagonal: the diagonal block of the leaves not in a layer: raw average
      of their Fisher diagonal, one array per leaf. With ``example_batch``
      the leaves of a Kronecker block hold an empty placeholder instead
      (without it, which leaves end up diagonal is known only once a batch
      is traced, and every leaf gets a parameter-sized slot).
    damping: the Levenberg-Marquardt ``λ``.
    gamma: the preconditioner's damping ``γ`` (``√(λ + η)`` unless the γ
      search is on).
    velocity: the previous step ``δ`` (adaptive mode); ``()`` in fixed
      mode, whose momentum is the chain's ``scale_by_momentum``.
    rejected_steps: steps rejected because a value was not finite.
    rejected_statistics: statistics discarded because they were not finite.
    rejected_refreshes: inverses or eigenbases discarded because they were
      not finite (the previous ones were kept).
    learning_rate: the ``α`` of the last step (1 in fixed mode).
    momentum: the ``μ`` of the last step (0 in fixed mode).
    reduction_ratio: ``ρ`` at the last damping adaptation.
  """

  count: Array
  statistics_count: Array
  key: Array
  blocks: dict
  diagonal: _blocks.BlockState
  damping: Array
  gamma: Array
  velocity: Params
  rejected_steps: Array
  rejected_statistics: Array
  rejected_refreshes: Array
  learning_rate: Array
  momentum: Array
  reduction_ratio: Array


leaf_paths = _blocks.leaf_paths


def _layer_dims(layer):
  """``(stack, dim Ā, dim G)`` of a layer's block (stack 0: not stacked)."""
  return (layer.stack, layer.input_dim + 1, layer.output_dim)


def _reserved(dims, max_factor_dim):
  """``(stack, dim Ā, dim G, Ā diagonal, G diagonal)``, or ``None``.

  A side larger than ``max_factor_dim`` (a vocabulary) is kept diagonal
  when the other side fits; when neither fits the leaf is not reserved.
  """
  stack, a, g = dims
  if min(a, g) > max_factor_dim:
    return None
  return (stack, a, g, a > max_factor_dim, g > max_factor_dim)


def _diagonal_sides(reserved):
  return tuple(reserved[3:5])


def _check_overrides(overrides, paths):
  unknown = sorted(set(overrides) - set(paths))
  if unknown:
    raise ValueError(
        f"layer_overrides names parameters that do not exist: {unknown}."
        f" Valid paths are: {paths}.")


def _use_kinds(layer):
  return tuple(dict.fromkeys(u.kind for u in _layers.layer_uses(layer)))


def _layer_label(layer):
  """The summary's name of a layer's block: its uses' kinds."""
  uses = _layers.layer_uses(layer)
  parts = [u.kind + (".T" if _layers.is_transposed(layer, u) else "")
           for u in uses]
  label = "+".join(dict.fromkeys(parts))
  if len(uses) > 1:
    label += f" x{len(uses)}"
  return label


def _allocation(predict_fn, params, example_batch, max_factor_dim,
                structure="kronecker", found=None):
  """``{kernel path: (stack, dim Ā, dim G)}`` reserved at ``init``.

  Without ``example_batch`` (``init(params)`` sees no batch), every leaf of
  rank ≥ 2 within ``max_factor_dim`` is reserved as an unstacked
  ``[..., out]`` kernel; with it, exactly the discovered layers are
  (``found``: their discovery, when the caller already traced that batch).
  """
  paths = leaf_paths(params)
  out = {}
  if example_batch is None:
    for path, leaf in zip(paths, jax.tree.leaves(params)):
      if leaf.ndim >= 2:
        dims = (0, int(np.prod(leaf.shape[:-1])) + 1, int(leaf.shape[-1]))
        out[path] = _reserved(dims, max_factor_dim)
  else:
    if found is None:
      found = _layers.discover_layers(predict_fn, params, example_batch)
    out = {paths[layer.kernel]: _reserved(_layer_dims(layer), max_factor_dim)
           for layer in found.layers}
  eigen = structure == "eigen_kronecker"
  return {p: r for p, r in out.items()
          if r is not None and not (eigen and any(_diagonal_sides(r)))}


def _fallback_reason(layer, wanted, allocated, max_factor_dim,
                     reserved_from_batch, structure="kronecker"):
  """Why a discovered layer gets a diagonal block, or ``None``."""
  kinds = _use_kinds(layer)
  dims = _reserved(_layer_dims(layer), max_factor_dim)
  if wanted == "diagonal":
    return "layer_overrides asks for a diagonal block"
  if wanted is not None and wanted not in kinds:
    allowed = ", ".join(repr(k) for k in kinds + ("diagonal",))
    raise ValueError(
        f"layer_overrides asks for a {wanted!r} block, but this kernel is"
        f" used as a {'+'.join(kinds)} kernel. Allowed kinds here:"
        f" {allowed}.")
  if dims is None:
    return (f"factor sizes {_layer_dims(layer)[1:]} both exceed"
            f" max_factor_dim={max_factor_dim}: raise max_factor_dim to get a"
            " Kronecker block")
  if structure == "eigen_kronecker" and any(_diagonal_sides(dims)):
    return (f"factor sizes {dims[1:3]}: one exceeds max_factor_dim="
            f"{max_factor_dim}, and EKFAC needs the eigenbasis of both")
  if allocated != dims:
    if reserved_from_batch:
      return (f"its factors {dims} differ from those reserved at init"
              f" {allocated} from example_batch: the batch changed the"
              " layer's shapes")
    what = ("a kernel of a scan stack of " + str(layer.stack) + " layers"
            if layer.stack else f"a {layer.kind} kernel in a layout other"
            " than [..., out]")
    return (f"{what} (factors {dims[1:3]}, reserved at init"
            f" {None if allocated is None else allocated[1:3]}): pass"
            " example_batch= to reserve its factors at init (or transpose"
            " the kernel to [in, out])")
  return None


def _plan(predict_fn, params, batch, overrides, max_factor_dim,
          example_batch=None, structure="kronecker"):
  """The usable layers and, for every diagonal leaf, the reason."""
  paths = leaf_paths(params)
  _check_overrides(overrides, paths)
  found = _layers.discover_layers(predict_fn, params, batch)
  same = example_batch is not None and (
      _layers._abstract(example_batch) == _layers._abstract(batch))  # pylint: disable=protected-access
  allocation = _allocation(predict_fn, params, example_batch, max_factor_dim,
                           structure, found if same else None)
  reasons = dict(found.reasons)
  layers = []
  for layer in found.layers:
    kpath = paths[layer.kernel]
    reason = _fallback_reason(layer, overrides.get(kpath),
                              allocation.get(kpath), max_factor_dim,
                              example_batch is not None, structure)
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
    if kind != "diagonal" and not any(
        layer.kernel == index for layer in found.layers):
      raise ValueError(
          f"layer_overrides says {path!r} is a {kind} layer, but it is not"
          f" used as one: {reasons.get(index, 'bias of a layer')}. Allowed"
          " kinds here: 'diagonal' (the only one that can be forced).")
  return tuple(layers), reasons


def kfac_blocks(
    predict_fn: Callable[[Params, Any], Any],
    params: Params,
    batch: Any,
    *,
    layer_overrides: Optional[Mapping[str, str]] = None,
    max_factor_dim: int = 4096,
    example_batch: Any = None,
) -> tuple:
  """Which curvature block every parameter leaf gets, and why.

  Args:
    predict_fn: ``(params, batch) -> outputs``, as given to
      :func:`scale_by_kfac`.
    params: the parameters.
    batch: a batch (only its shapes matter).
    layer_overrides: as in :func:`scale_by_kfac`.
    max_factor_dim: as in :func:`scale_by_kfac`.
    example_batch: as in :func:`scale_by_kfac` (what ``init`` reserves).

  Returns:
    A tuple of :class:`BlockRow`, one per leaf, in ``jax.tree.leaves``
    order. ``factors`` is ``(dim Ā, dim G)`` for a Kronecker kernel (per
    layer of a stack).
  """
  layers, reasons = _plan(predict_fn, params, batch,
                          dict(layer_overrides or {}), max_factor_dim,
                          example_batch)
  paths = leaf_paths(params)
  # leaf index -> (block, factors, reason, members), as in BlockRow.
  rows: dict[int, tuple[str, Optional[tuple], str, tuple]] = {}
  for layer in layers:
    members = (paths[layer.kernel],) + (
        () if layer.bias is None else (paths[layer.bias],))
    notes = [f"{layer.stack} stacked layers"] if layer.stack else []
    for side, diag in zip("AG", _diagonal_sides(
        _reserved(_layer_dims(layer), max_factor_dim))):
      if diag:
        notes.append(f"{side} kept diagonal: larger than max_factor_dim="
                     f"{max_factor_dim}")
    stack = "; ".join(notes)
    rows[layer.kernel] = (_layer_label(layer), (layer.input_dim + 1,
                                                layer.output_dim), stack,
                          members)
    if layer.bias is not None:
      rows[layer.bias] = (f"bias of {paths[layer.kernel]}", None, stack,
                          members)
  out = []
  for i, leaf in enumerate(jax.tree.leaves(params)):
    block, factors, reason, members = rows.get(
        i, ("diagonal", None, reasons.get(i, "not a layer parameter"),
            (paths[i],)))
    out.append(BlockRow(paths[i], tuple(leaf.shape), block, factors, reason,
                        size=int(np.size(leaf)), members=members))
  return tuple(out)


def kfac_summary(
    predict_fn: Callable[[Params, Any], Any],
    params: Params,
    batch: Any,
    *,
    layer_overrides: Optional[Mapping[str, str]] = None,
    max_factor_dim: int = 4096,
    example_batch: Any = None,
) -> str:
  """A printable table of :func:`kfac_blocks`.

  A Kronecker kernel shows its factors (per layer of a ``scan`` stack); a
  diagonal leaf shows why it is not part of a Kronecker block. The last
  line is the share of parameters, by count, in Kronecker blocks.

  Example:
    >>> import jax.numpy as jnp, curvature
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    >>> batch = {"inputs": jnp.ones((5, 4)), "targets": jnp.zeros(5, int)}
    >>> predict = lambda p, b: b["inputs"] @ p["w"] + p["b"]
    >>> print(curvature.kfac_summary(predict, params, batch))
    b  (3,)            bias of w
    w  (4, 3)          dense       A 5x5, G 3x3
    Kronecker blocks hold 15 of 15 parameters (100.0%).
  """
  rows = kfac_blocks(predict_fn, params, batch,
                     layer_overrides=layer_overrides,
                     max_factor_dim=max_factor_dim,
                     example_batch=example_batch)
  width = max(len(r.path) for r in rows)
  lines = []
  for r in rows:
    detail = (f"A {r.factors[0]}x{r.factors[0]}, G {r.factors[1]}x"
              f"{r.factors[1]}" if r.factors else r.reason)
    if r.factors and r.reason:
      detail += f" ({r.reason})"
    lines.append(f"{r.path:<{width}}  {str(r.shape):<14}  {r.block:<10}"
                 f"  {detail}".rstrip())
  covered = kronecker_share(rows)
  total = sum(r.size for r in rows)
  lines.append(f"Kronecker blocks hold {covered} of {total} parameters"
               f" ({100.0 * covered / max(total, 1):.1f}%).")
  return "\n".join(lines)


def kronecker_share(rows) -> int:
  """Parameters (by count) of the rows of :func:`kfac_blocks` that are in a
  Kronecker block (kernels and their biases)."""
  return sum(r.size for r in rows if r.block != "diagonal")


# Kernel <-> matrix ----------------------------------------------------------


def _layer_view(layer):
  """The kernel (and bias) as the ``[in + 1, out]`` matrix ``[W; b]``.

  The last row is the bias (zeros for a layer without one), the homogeneous
  coordinate reserved in ``Ā``.
  """

  def to_matrix(leaves):
    kernel = leaves[0]
    if layer.kernel_axes:  # Contracted axes first, then the others.
      order = layer.kernel_axes[0] + layer.kernel_axes[1]
      matrix = jnp.transpose(kernel, order).reshape(layer.input_dim,
                                                    layer.output_dim)
    elif layer.kind == "conv":
      rhs_spec = layer.conv[5]
      moved = jnp.transpose(kernel,
                            (rhs_spec[1], *rhs_spec[2:], rhs_spec[0]))
      matrix = moved.reshape(layer.input_dim, layer.output_dim)
    else:
      matrix = kernel if layer.in_axis == 0 else kernel.T
    last = (leaves[1].reshape(1, -1) if layer.bias is not None
            else jnp.zeros((1, layer.output_dim), matrix.dtype))
    return jnp.concatenate([matrix, last.astype(matrix.dtype)], axis=0)

  def from_matrix(matrix, leaves):
    kernel = matrix[:layer.input_dim]
    shape = leaves[0].shape
    if layer.kernel_axes:
      order = layer.kernel_axes[0] + layer.kernel_axes[1]
      moved = kernel.reshape(tuple(shape[d] for d in order))
      kernel = jnp.transpose(moved, np.argsort(order).tolist())
    elif layer.kind == "conv":
      rhs_spec = layer.conv[5]
      order = (rhs_spec[1], *rhs_spec[2:], rhs_spec[0])
      moved = kernel.reshape(tuple(shape[d] for d in order))
      kernel = jnp.transpose(moved, np.argsort(order).tolist())
    elif layer.in_axis != 0:
      kernel = kernel.T
    if layer.bias is None:
      return (kernel,)
    return kernel, matrix[layer.input_dim].reshape(leaves[1].shape)

  return _blocks.MatrixView(to_matrix, from_matrix)


# Observe: layer inputs, output gradients, diagonal statistics ---------------


class LayerEvidence(NamedTuple):
  """What one batch says about one layer.

  Attributes:
    inputs: one ``[examples, positions, in]`` array per use of the kernel
      (:func:`curvature._layers.use_inputs`: the activations, the image
      patches of a convolution, one-hot rows of a lookup).
    output_grads: one ``[samples, examples, positions, out]`` array per use:
      back-propagated output gradients, one set per sampled target.
    num_examples: the batch size ``N``.

  A layer of a ``scan`` stack has the stack as leading axis of every array.
  """

  inputs: tuple
  output_grads: tuple
  num_examples: int


# An axes prefix, not evidence: its fields are axis specs, whatever the
# field annotations say, so it is built from a plain tuple.
STACKED_EVIDENCE = LayerEvidence._make((0, 0, None))
"""``jax.vmap`` axes of a stacked layer's evidence."""


class _Group(NamedTuple):
  """The uses of a kernel that see it in one orientation, as one set of rows.

  ``left``/``right`` are the vectors on the block's ``Ā`` and ``G`` sides:
  ``(ā, g)`` for uses in the block's orientation, ``(g, a)`` for transposed
  uses (a tied output layer ``h @ E.T`` of a lookup ``E[tokens]``).
  ``left`` has a sample axis when it holds output gradients.
  """

  transposed: bool
  lookup: bool
  activations: Array  # [N, P, in side]
  grads: Array  # [S, N, P, out side]


def _groups(layer, evidence, dtype):
  """Same-orientation uses concatenated along their positions.

  The homogeneous coordinate (``1`` with a bias, ``0`` without) is appended
  on the block's ``Ā`` side: to the activations of uses in the block's
  orientation, as a zero to the output gradients of transposed uses.
  """
  grouped = {}
  for use, x, g in zip(_layers.layer_uses(layer), evidence.inputs,
                       evidence.output_grads):
    key = (_layers.is_transposed(layer, use), use.kind == "lookup")
    grouped.setdefault(key, []).append(
        (_sharding.gather_last_axis(x.astype(dtype)),
         _sharding.gather_last_axis(g.astype(dtype))))
  out = []
  for (transposed, lookup), items in grouped.items():
    x = jnp.concatenate([x for x, _ in items], axis=1)
    g = jnp.concatenate([g for _, g in items], axis=2)
    if transposed:
      g = jnp.concatenate([g, jnp.zeros_like(g[..., :1])], axis=-1)
    else:
      ones = jnp.ones_like(x[..., :1])
      x = jnp.concatenate(
          [x, ones if layer.bias is not None else jnp.zeros_like(ones)],
          axis=-1)
    out.append(_Group(transposed, lookup, x, g))
  return out


def _moments(activations, grads, num_examples, mode, diagonal=(False, False)):
  r"""``(Ā, G)`` of one group, K-FAC-expand or K-FAC-reduce.

  * expand: every position is a row: ``Ā = (1/N) Σ_{n,p} ā ā^\top``,
    ``G = (1/(SNP)) Σ_{s,n,p} g g^\top``;
  * reduce: ``â_n = (1/P) Σ_p ā_{np}``, ``ĝ_{sn} = Σ_p g_{snp}``,
    ``Ā = (1/N) Σ_n â â^\top``, ``G = (1/(SN)) Σ_{s,n} ĝ ĝ^\top``.
  """
  if mode == "reduce":
    activations = jnp.mean(activations, axis=1, keepdims=True)
    grads = jnp.sum(grads, axis=2, keepdims=True)
  rows = activations.reshape(-1, activations.shape[-1])
  grads = grads.reshape(-1, grads.shape[-1])
  # A side kept diagonal (``diagonal``) is never formed as a matrix.
  a = jnp.sum(rows ** 2, axis=0) if diagonal[0] else _sharding.gram(rows)
  g = jnp.sum(grads ** 2, axis=0) if diagonal[1] else _sharding.gram(grads)
  return a / num_examples, g / grads.shape[0]


def _balanced_sum(pairs: list[tuple[Array, Array]]) -> tuple[Array, Array]:
  r"""One Kronecker product for ``Σ_k L_k ⊗ R_k`` (uses in two orientations).

  Each term is first balanced, ``L_k ⊗ R_k = (s_k L_k) ⊗ (R_k / s_k)`` with
  ``s_k`` making both factors' mean eigenvalues equal; then
  ``L = Σ_k s_k L_k`` and ``R = (1/K) Σ_k R_k / s_k``, whose product is the
  sum exactly when the balanced terms agree (and is the K-FAC-expand rule
  for uses that are copies of each other).
  """
  if len(pairs) == 1:
    return pairs[0]
  lefts, rights = [], []
  for left, right in pairs:
    tl = _blocks.factor_trace(left) / left.shape[0]
    tr = _blocks.factor_trace(right) / right.shape[0]
    ok = (tl > 0) & (tr > 0)
    s = jnp.where(ok, jnp.sqrt(jnp.where(ok, tr / tl, 1.0)), 1.0)
    lefts.append(s * left)
    rights.append(right / s)
  # sum() of a nonempty list of arrays is an array (typeshed allows its 0).
  return cast(Array, sum(lefts)), cast(Array, sum(rights)) / len(pairs)


def _evidence_dtype(evidence):
  return _blocks.accumulation_dtype(jnp.result_type(
      *evidence.output_grads, *evidence.inputs))


def _layer_factors(layer, axis_name, weight_sharing="expand", dtype=None,
                   diagonal=(False, False)):
  """``evidence -> (Ā, G)``: the statistics of a K-FAC Kronecker block.

  Uses in the block's orientation are rows of one group (the uses are one
  more shared axis, expanded or reduced like the positions); lookups are
  always expanded (their ``Ā`` stays the diagonal of token counts); a
  group of transposed uses contributes its ``G`` on the ``Ā`` side and its
  ``Ā`` on the ``G`` side, combined by :func:`_balanced_sum`.
  """

  def statistics(evidence):
    acc = dtype or _evidence_dtype(evidence)
    pairs = []
    for group in _groups(layer, evidence, acc):
      mode = "expand" if group.lookup else weight_sharing
      if group.transposed:
        # Rows of the G side (activations) and of the Ā side (gradients).
        right, left = _moments(group.activations, group.grads,
                               evidence.num_examples, mode, diagonal[::-1])
      else:
        left, right = _moments(group.activations, group.grads,
                               evidence.num_examples, mode, diagonal)
      pairs.append((left, right))
    a, g = _balanced_sum(pairs)
    return _products.batch_mean(_blocks.KroneckerFactors(a, g), axis_name)

  return statistics


def _per_example_projection(layer, axis_name, dtype=None):
  r"""EKFAC's re-fit: ``(1/NS) Σ_{i,s} (Q_Aᵀ ∇W̄_{is} Q_G)²`` (George et al.).

  ``∇W̄_{is} = Σ_u Σ_t ā_{iut} g_{iust}ᵀ`` is example ``i``'s gradient
  (sample ``s``), summed over the rows it has (positions of every use; the
  factors of a transposed use swapped). With one row per example the square
  of the rank-one projection is the outer product of the squared
  projections, a single matmul.
  """

  def refit(evidence, basis):
    acc = dtype or _evidence_dtype(evidence)
    groups = _groups(layer, evidence, acc)
    n = evidence.num_examples
    samples = groups[0].grads.shape[0]
    if (len(groups) == 1 and not groups[0].transposed
        and groups[0].activations.shape[1] == 1):
      pa = groups[0].activations[:, 0] @ basis.basis_a  # [N, a]
      pg = groups[0].grads[:, :, 0] @ basis.basis_g  # [S, N, g]
      out = _sharding.gram(pa ** 2, jnp.sum(pg ** 2, axis=0)) / (n * samples)
      return _products.batch_mean(out, axis_name)
    projected = []
    for group in groups:
      if group.transposed:
        left = jnp.moveaxis(group.grads @ basis.basis_a, 1, 0)  # [N,S,P,a]
        right = group.activations @ basis.basis_g  # [N, P, g]
        projected.append((True, left, right))
      else:
        left = group.activations @ basis.basis_a  # [N, P, a]
        right = jnp.moveaxis(group.grads @ basis.basis_g, 1, 0)  # [N,S,P,g]
        projected.append((False, left, right))

    def one_example(args):
      total = 0.0
      for (transposed, _, _), (left, right) in zip(projected, args):
        spec = "spa,pg->sag" if transposed else "pa,spg->sag"
        total = total + jnp.einsum(spec, left, right)
      return jnp.sum(total ** 2, axis=0)

    per_example = jax.lax.map(one_example,
                              [(left, right) for _, left, right in projected])
    out = jnp.sum(per_example, axis=0) / (n * samples)
    return _products.batch_mean(out, axis_name)

  return refit


def _check_outputs(outputs, num_examples):
  if not isinstance(outputs, jax.Array):
    raise TypeError(
        "predict_fn must return one array of outputs with a leading batch"
        f" axis, got {type(outputs).__name__}. If your model returns"
        " (outputs, aux), pass `predict_fn=lambda p, b: model(p, b)[0]`.")
  if outputs.ndim == 0 or outputs.shape[0] != num_examples:
    raise ValueError(
        f"predict_fn returned outputs of shape {outputs.shape} for a batch"
        f" of {num_examples} examples: the outputs need a leading batch axis"
        " of that size (one row per example). Do not reduce over the batch"
        " inside predict_fn.")


def _layer_evidence(layers, inputs, output_grads, num_examples):
  """Every layer's :class:`LayerEvidence` from the taps of its uses.

  Args:
    layers: the layers.
    inputs: one recorded input per use (:func:`_layers.tapped_forward`).
    output_grads: one ``[samples, ...]`` output gradient per use.
    num_examples: the batch size.
  """
  per_layer = [([], []) for _ in layers]
  for j, (k, use) in enumerate(_layers._all_uses(layers)):  # pylint: disable=protected-access
    rows = lambda x, u=use: _layers.use_inputs(u, x, num_examples)
    grads = jax.vmap(
        lambda g, u=use: _layers.use_output_grads(u, g, num_examples))
    x, g = inputs[j], output_grads[j]
    if use.batch_axis is not None:  # A vmap-ed stack: its axis first.
      x = jnp.moveaxis(x, use.batch_axis, 0)
    if layers[k].stack:  # [L, ...] and [S, L, ...]: one slice per layer.
      rows, grads = jax.vmap(rows), jax.vmap(grads)
      g = jnp.moveaxis(g, 1, 0)
    per_layer[k][0].append(rows(x))
    per_layer[k][1].append(grads(g))
  return [LayerEvidence(tuple(x), tuple(g), num_examples)
          for x, g in per_layer]


def _observe(predict_fn, loss, layers, diag_leaves, params, batch, key,
             statistics, num_samples, targets_fn, axis_name,
             diagonal_estimator="per_example", diagonal_batch_size=None,
             linearize=False):
  """One forward and one vectorized backward pass: the evidence per block.

  The diagonal leaves' estimates come from a second, per-example pass over
  the first ``diagonal_batch_size`` examples (``diagonal_estimator=
  "per_example"``) or from the same backward pass (``"square_of_sum"``,
  :func:`_square_of_sum`).

  With ``linearize`` the forward pass is a ``jax.linearize`` in both the
  perturbations and the parameters, and the backward pass its transpose
  (what ``jax.vjp`` does inside): the same pass then also gives the
  Jacobian-vector products of the adaptive mode's quadratic model, which
  otherwise needs a forward pass of its own (:func:`_quadratic_model`).

  Returns:
    ``(layer evidence list, diagonal estimates of diag_leaves, model)``,
    ``model`` the ``(outputs, v ↦ J v)`` of :func:`_quadratic_model` with
    ``linearize``, else ``None``.
  """
  num_examples = _products.batch_size(batch, targets_fn)
  params = _products.as_varying(params, axis_name)
  key = _products.shard_key(key, axis_name)
  fn, zeros = _layers.tapped_forward(predict_fn, layers, params, batch)
  zeros = _products.as_varying(zeros, axis_name)
  summed = bool(diag_leaves) and diagonal_estimator == "square_of_sum"
  model = None
  if linearize:
    outputs, vjp_fn, model, inputs = _linearized_tapped(
        fn, zeros, params, diag_leaves, summed)
  else:
    outputs, vjp_fn, inputs = _tapped_vjp(fn, zeros, params, diag_leaves,
                                          summed)
  _check_outputs(outputs, num_examples)
  outputs = jax.lax.stop_gradient(outputs)
  if statistics == "empirical_fisher":
    cots = _losses.output_gradients(loss, outputs, targets_fn(batch))[None]
  elif statistics == "curvature_propagation":
    keys = jax.random.split(key, num_samples)
    cots = jax.vmap(lambda k: loss.fisher_factor(k, outputs))(keys)
  else:
    keys = jax.random.split(key, num_samples)
    cots = jax.vmap(lambda k: _losses.output_gradients(
        loss, outputs, loss.sample(k, outputs)))(keys)
  output_grads, sums = jax.vmap(vjp_fn)(cots)
  evidence = _layer_evidence(layers, inputs, output_grads, num_examples)
  diagonal = ()
  if summed:
    diagonal = _square_of_sum(sums, num_examples)
  elif diag_leaves:
    sub_predict, sub = _products.restrict_to_leaves(predict_fn, params,
                                                    diag_leaves)
    k = _products.subset_size(diagonal_batch_size, num_examples)
    per_sample = jax.lax.map(
        lambda c: _curvature_diagonals.squared_vjp_mean(
            sub_predict, sub, _products.take_examples(batch, k), c[:k]), cots)
    diagonal = tuple(jnp.mean(x, axis=0) for x in per_sample)
  return evidence, diagonal, model


def _tapped_vjp(fn, zeros, params, diag_leaves, summed):
  """``jax.vjp`` of ``fn`` (of :func:`_layers.tapped_forward`) in the
  perturbations and, if ``summed``, the diagonal leaves only.

  Returns:
    ``(outputs, vjp_fn, inputs)``, ``vjp_fn`` as in
    :func:`_linearized_tapped`.
  """
  leaves, treedef = jax.tree.flatten(params)

  def tapped(perturbations, sub):
    full = list(leaves)
    for i, x in zip(diag_leaves, sub):
      full[i] = x
    return fn(perturbations, treedef.unflatten(full))

  sub = tuple(leaves[i] for i in diag_leaves) if summed else ()
  return jax.vjp(tapped, zeros, sub, has_aux=True)


def _linearized_tapped(fn, zeros, params, diag_leaves, summed):
  """``fn`` (of :func:`_layers.tapped_forward`) linearized in the
  perturbations and all the parameters.

  Returns:
    ``(outputs, vjp_fn, (outputs, jvp_fn), inputs)``: ``vjp_fn`` maps an
    output cotangent to the perturbations' cotangents and, if ``summed``,
    the diagonal leaves' (as :func:`_tapped_vjp`'s; the other parameters'
    cotangents are never used, so XLA drops them), ``jvp_fn`` a parameter
    tangent to ``J v``.
  """
  outputs, lin_fn, inputs = jax.linearize(fn, zeros, params, has_aux=True)
  transpose = jax.linear_transpose(lin_fn, zeros, params)

  def vjp_fn(cotangent):
    d_perturbations, d_params = transpose(cotangent)
    flat = jax.tree.leaves(d_params)
    return d_perturbations, (tuple(flat[i] for i in diag_leaves) if summed
                             else ())

  zero_perturbations = jax.tree.map(jnp.zeros_like, zeros)
  return outputs, vjp_fn, (outputs, lambda v: lin_fn(zero_perturbations, v)
                           ), inputs


def _square_of_sum(sums, num_examples):
  r"""``(1/NS) Σ_s (Σᵢ gᵢₛ)²``: the Fisher diagonal from summed gradients.

  ``gᵢₛ = Jᵢᵀ cᵢₛ`` is example ``i``'s gradient for the sampled cotangent
  ``cᵢₛ``. The cotangents of the true Fisher (sampled targets) and of
  curvature propagation have mean zero and are drawn independently per
  example, so the cross terms ``gᵢₛ gⱼₛ`` (``i ≠ j``) vanish in expectation
  and ``E[(Σᵢ gᵢₛ)²] = Σᵢ E[gᵢₛ²]``: the estimate is unbiased, with a
  variance about ``N`` times the per-example one (the "square the sum"
  estimator of the TensorFlow K-FAC library's ``NaiveDiagonalFactor``). It
  needs no per-example pass.
  """
  return tuple(jnp.mean(s.astype(_blocks.accumulation_dtype(s.dtype)) ** 2,
                        axis=0) / num_examples for s in sums)


# Blocks -----------------------------------------------------------------------


def _layer_block(layer, a_dim, g_dim, dtype, structure, axis_name,
                 weight_sharing="expand", diagonal=(False, False)):
  leaves = (layer.kernel,) + (() if layer.bias is None else (layer.bias,))
  view = _layer_view(layer)
  statistics = _layer_factors(layer, axis_name, weight_sharing, dtype,
                              diagonal)
  if structure == "eigen_kronecker":
    block = _blocks.eigen_kronecker_block(
        leaves, a_dim, g_dim, dtype, statistics=statistics,
        refit=_per_example_projection(layer, axis_name, dtype), view=view,
        power=1.0, damping_in_root=True)
  else:
    a_used = a_dim if layer.bias is not None else a_dim - 1
    block = _blocks.kronecker_block(
        leaves, a_dim, g_dim, dtype, statistics=statistics,
        inverse=_blocks.factored_damped_inverse(a_used), view=view,
        diagonal=diagonal)
  if layer.stack:
    return _blocks.stacked_block(block, layer.stack, STACKED_EVIDENCE)
  return block


def _blocks_for(layers, params, max_factor_dim, structure, axis_name,
                weight_sharing="expand"):
  """``{kernel path: Block}`` for the discovered layers."""
  paths = leaf_paths(params)
  leaves = jax.tree.leaves(params)
  out = {}
  for layer in layers:
    reserved = _reserved(_layer_dims(layer), max_factor_dim)
    assert reserved is not None  # _plan keeps only layers that fit.
    dtype = _blocks.accumulation_dtype(leaves[layer.kernel].dtype)
    out[paths[layer.kernel]] = _layer_block(
        layer, reserved[1], reserved[2], dtype, structure, axis_name,
        weight_sharing, _diagonal_sides(reserved))
  return out


def _outside_layers(layers, num_leaves):
  """The leaves in no layer of ``layers``: those of the diagonal block."""
  in_layer = {i for layer in layers
              for i in (layer.kernel, layer.bias) if i is not None}
  return tuple(i for i in range(num_leaves) if i not in in_layer)


def _diagonal_slots(config, params):
  """The leaves whose diagonal statistics ``init`` reserves.

  Without ``example_batch`` every leaf (which leaves end up diagonal is
  known only once a batch is traced); with it, exactly those the plan on
  its shapes leaves outside every layer.
  """
  num_leaves = len(jax.tree.leaves(params))
  if config.example_batch is None:
    return tuple(range(num_leaves))
  layers, _ = _plan(config.predict_fn, params, config.example_batch,
                    config.overrides, config.max_factor_dim,
                    config.example_batch, config.structure)
  return _outside_layers(layers, num_leaves)


def _reserved_slots(diagonal_state, params):
  """The slots ``init`` reserved (:func:`_diagonal_slots`), read from the
  diagonal block's state: the entries of the leaf's own shape."""
  return tuple(i for i, (x, d) in enumerate(zip(jax.tree.leaves(params),
                                                diagonal_state.statistics))
               if d.shape == x.shape)


def _check_diagonal_slots(diag_leaves, slots, params):
  """A diagonal leaf needs the statistics slot ``init`` reserved for it."""
  missing = [leaf_paths(params)[i] for i in diag_leaves if i not in slots]
  if missing:
    raise ValueError(
        f"{missing} get a diagonal block for this batch, but not for"
        " example_batch, so init reserved no diagonal statistics for them:"
        " pass an example_batch with the structure of the training batches,"
        " or none (init then reserves a diagonal slot for every leaf).")


def _diagonal_block(params, diag_leaves, axis_name, slots=None):
  """The diagonal block of ``diag_leaves``; its state spans ``slots``.

  ``slots`` (default: every leaf) are the leaves whose statistics ``init``
  reserves at full size (see :func:`_diagonal_slots`); the others hold an
  empty placeholder. Reserved entries of leaves outside ``diag_leaves``
  stay zero.
  """
  leaves = jax.tree.leaves(params)
  slots = range(len(leaves)) if slots is None else slots
  shapes = tuple(x.shape if i in slots else (0,)
                 for i, x in enumerate(leaves))
  dtypes = tuple(_blocks.accumulation_dtype(x.dtype) for x in leaves)
  block = _blocks.diagonal_block(
      tuple(diag_leaves), shapes, dtypes,
      like=tuple(x if i in slots else None for i, x in enumerate(leaves)))

  def statistics(estimates):
    full = [jnp.zeros(s, d) for s, d in zip(shapes, dtypes)]
    for i, d in zip(diag_leaves, estimates):
      full[i] = d.astype(dtypes[i])
    return _products.batch_mean(tuple(full), axis_name)

  def apply(state, vectors, damping):
    used = state._replace(statistics=tuple(state.statistics[i]
                                           for i in diag_leaves))
    return block.apply(used, vectors, damping)

  return block._replace(statistics=statistics, apply=apply)


# Exact quadratic model ------------------------------------------------------


def _quadratic_model(predict_fn, loss, params, batch, l2_reg, targets_fn,
                     axis_name, linearized=None):
  """``vectors ↦ [vᵢᵀ C vⱼ]`` (C the GGN + ηI) and ``f(θ)``, one linearization.

  Only Jacobian-vector products are needed: ``vᵢᵀ Jᵀ H J vⱼ = (J vᵢ)ᵀ H (J
  vⱼ)`` with the loss's closed-form output Hessian ``H``. With
  ``axis_name`` the batch means are ``pmean``-ed over it. ``linearized``,
  ``(outputs, v ↦ J v)`` at ``params`` on ``batch`` (the statistics pass's,
  :func:`_observe`), saves the forward pass of ``jax.linearize``.
  """
  targets = targets_fn(batch)
  outputs, jvp_fn = linearized or jax.linearize(
      lambda p: predict_fn(p, batch), _products.as_varying(params, axis_name))
  value = _products.batch_mean(loss.value(outputs, targets), axis_name)
  value = value + 0.5 * l2_reg * optax.tree.norm(params, squared=True)

  def forms(vectors):
    tangents = [jvp_fn(_products.as_varying(v, axis_name)) for v in vectors]
    h_tangents = [loss.hvp(outputs, targets, t) for t in tangents]
    n = len(vectors)
    rows = _products.batch_mean(
        jnp.asarray([[_optax_typed.vdot(tangents[i], h_tangents[j])
                      for j in range(n)] for i in range(n)]), axis_name)
    return rows + l2_reg * _gram(vectors)

  return forms, value


def _gram(vectors):
  return jnp.asarray([[_optax_typed.vdot(x, y) for y in vectors]
                      for x in vectors])


def _solve_step(quad, linear, max_momentum=None):
  """``(α, μ, M)`` minimising ``M = ½ xᵀ Q x + bᵀ x``, ``x = (α, μ)``.

  ``μ = 0`` if ``Q`` is singular. With ``max_momentum``, ``μ`` is kept in
  ``[0, max_momentum]``: the reduced model ``min_α M(α, μ)`` is a convex
  parabola in ``μ``, so a ``μ`` outside is clipped to the nearest bound and
  ``α = −(b₁ + μ Q₁₂)/Q₁₁`` re-fitted, the exact constrained minimiser.
  """
  q11, q12, q22 = quad[0, 0], quad[0, 1], quad[1, 1]
  b1, b2 = linear
  det = q11 * q22 - q12 * q12
  two = det > 1e-12 * jnp.maximum(q11 * q22, 1e-30)
  safe_det = jnp.where(two, det, 1.0)
  safe_q11 = jnp.where(q11 > 0, q11, 1.0)
  alpha2 = (-b1 * q22 + b2 * q12) / safe_det
  mu2 = (-b2 * q11 + b1 * q12) / safe_det
  alpha = jnp.where(two, alpha2, -b1 / safe_q11)
  mu = jnp.where(two, mu2, 0.0)
  if max_momentum is not None:
    clipped = jnp.clip(mu, 0.0, max_momentum).astype(mu.dtype)
    alpha = jnp.where(clipped == mu, alpha,
                      -(b1 + clipped * q12) / safe_q11)
    mu = clipped
  model = (0.5 * (alpha * alpha * q11 + mu * mu * q22) + alpha * mu * q12
           + alpha * b1 + mu * b2)
  return alpha, mu, model


class _Step(NamedTuple):
  step: Params  # δ = αΔ_neg + μ δ₋₁ (the parameter change)
  alpha: Array
  mu: Array
  model: Array  # M(δ) − M(0)
  curvature: Array  # δᵀCδ / ‖δ‖², the curvature (GGN + η) along δ


def _adaptive_step(forms, grad, direction, velocity, damping,
                   max_momentum=None):
  """δ = −αΔ + μδ₋₁ minimising the exact damped quadratic model (M&G §7)."""
  step_dir = optax.tree.scale(-1.0, direction)
  vectors = [step_dir, velocity]
  curvature, gram = forms(vectors), _gram(vectors)
  quad = curvature + damping * gram
  linear = (_optax_typed.vdot(grad, step_dir),
            _optax_typed.vdot(grad, velocity))
  alpha, mu, model = _solve_step(quad, linear, max_momentum)
  step = optax.tree.add_scale(optax.tree.scale(alpha, step_dir), mu, velocity)
  x = jnp.stack([alpha, mu]).astype(curvature.dtype)
  return _Step(step, alpha, mu, model,
               _rayleigh_quotient(curvature, gram, x))


def _rayleigh_quotient(curvature, gram, x):
  """``δᵀCδ / δᵀδ`` for ``δ = Σ xᵢvᵢ``, from ``[vᵢᵀCvⱼ]`` and ``[vᵢᵀvⱼ]``;
  ``inf`` for a zero step (no evidence of over-damping)."""
  num = x @ curvature @ x
  den = x @ gram @ x
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.inf)


# The transform --------------------------------------------------------------


def _check_damping_arg(name, value):
  if callable(value):
    raise TypeError(
        f"`{name}` must be a number, got a callable. K-FAC adapts its own"
        " damping (adaptive=True) or keeps it fixed; for a schedule use"
        " `curvature.inject_hyperparams(curvature.kfac)(..., "
        f"{name}=schedule)`, which re-creates the transform each step.")


def scale_by_kfac(
    predict_fn: Callable[[Params, Any], Any],
    loss: _losses.Loss,
    *,
    statistics: str = "true_fisher",
    structure: str = "kronecker",
    num_samples: int = 1,
    statistics_batch_size: Optional[int] = None,
    decay: float = 0.95,
    averaging: str = "ema",
    initial_damping: float = 150.0,
    l2_reg: float = 0.0,
    inverse_every: int = 20,
    inverse_warmup: bool = True,
    adaptive: bool = False,
    adapt_damping: Optional[bool] = None,
    damping_every: int = 5,
    damping_adaptation_decay: float = 19.0 / 20.0,
    calibrate_damping: bool = True,
    max_momentum: Optional[float] = 0.99,
    gamma_search: Optional[bool] = None,
    gamma_every: int = 20,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
    quadratic_batch_size: Optional[int] = None,
    layer_overrides: Optional[Mapping[str, str]] = None,
    max_factor_dim: int = 4096,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    seed: int = 0,
    axis_name: _validation.AxisName = None,
    weight_sharing: str = "expand",
    example_batch: Any = None,
    distribute_inverses: bool = False,
    diagonal_estimator: str = "per_example",
    diagonal_batch_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""K-FAC direction (Martens & Grosse 2015), layers found automatically.

  Each discovered dense or convolution layer gets

  .. math::
    \Delta_\ell = (\bar A_\ell + \pi_\ell\gamma I)^{-1}\,
        \nabla_{\bar W_\ell} h\,(G_\ell + \tfrac{\gamma}{\pi_\ell} I)^{-1},
    \qquad \pi_\ell = \sqrt{\frac{\operatorname{tr}\bar A_\ell/\dim\bar A_\ell}
        {\operatorname{tr} G_\ell/\dim G_\ell}}

  and every other leaf ``Δ = ∇h / (d + γ²)`` with ``d`` its Monte-Carlo
  Fisher diagonal: by default the mean of squared per-example gradients
  over the first ``diagonal_batch_size`` examples (a second, per-example
  pass through the model), or with ``diagonal_estimator="square_of_sum"``
  the square of the batch's summed gradient divided by ``N``, which the
  statistics' backward pass gives at no extra cost (unbiased for sampled
  targets and curvature propagation, with about ``N`` times the variance;
  :func:`_square_of_sum`).

  With ``structure="eigen_kronecker"`` (EKFAC, George et al. 2018) a layer
  gets instead

  .. math::
    \Delta_\ell = Q_A\Big[\frac{Q_A^\top \nabla_{\bar W} h\, Q_G}
        {s + \gamma^2}\Big] Q_G^\top, \qquad
    s = \tfrac{1}{NS}\textstyle\sum_{i,s}
        \big(Q_A^\top \nabla_{\bar W} \ell_{is}\, Q_G\big)^{2}

  with ``Q_A, Q_G`` the eigenvectors of ``Ā`` and ``G`` (refreshed with the
  inverses) and ``s`` the diagonal re-fitted every step from per-example
  gradients projected into that basis (averaged like the factors, carried
  across refreshes).

  ``Ā, G, d`` (and ``s``) are averaged over steps (``averaging``): a
  bias-corrected EMA with ``decay`` (0.95, kfac-jax's constant), or
  ``"schedule"``, the paper's ``ε = min(1 − 1/k, decay)``. The statistics
  come from the first ``statistics_batch_size`` examples of each batch. The
  damped inverses are refreshed every ``inverse_every`` steps under
  ``lax.cond`` (``T₃``), and with ``inverse_warmup`` also at steps 1, 2, 4,
  8, … before the first period ends, so the early steps do not precondition
  with one batch's factors for ``T₃`` steps. A refresh is one Cholesky
  factorization per factor.

  * ``adaptive=False`` (default): the output is ``Δ`` with ``γ = √(λ + η)``
    and ``λ = initial_damping`` fixed; chain a learning rate and momentum
    (:func:`kfac` does).
  * ``adaptive=True`` (M&G §7): the step is ``δ = −αΔ + μδ₋₁`` with ``(α, μ)``
    minimising the exact quadratic model
    ``M(δ) = ½δᵀ(C + λI)δ + ∇hᵀδ`` (``C`` the GGN + ηI, which equals the
    Fisher for the losses of :mod:`curvature.losses`) from two exact
    GGN-vector products; the output is ``−δ``, so chain
    ``scale_by_learning_rate(1.0)``. ``λ`` is adapted every
    ``damping_every`` steps (``T₁``) by Levenberg-Marquardt on
    ``ρ = (h(θ+δ) − h(θ)) / M(δ)``: ``ρ > ¾ → λ ← ω₁ min(λ, q)``,
    ``ρ < ¼ → λ ← λ/ω₁``, ``ω₁ = d^T₁`` (``d`` is
    ``damping_adaptation_decay``, 19/20 in M&G), where
    ``q = δᵀCδ / δᵀδ`` is the exact curvature along the step just taken
    (from the same two products). When the quadratic model's batch is the
    statistics' (the default), one linearization of the model serves both:
    the statistics' backward pass is its transpose and the two products
    are its Jacobian-vector products, so the step costs one forward pass
    fewer than two separate passes. The cap ``min(λ, q)`` is ours; without
    it this is M&G's rule (§6.5). Why: with the optimal ``(α, μ)``,
    ``M(δ) = −½δᵀ(C + λI)δ``, so where ``h`` follows its undamped quadratic
    ``ρ = (q + 2λ)/(q + λ)``, between 1 and 2; ``ρ ≈ 2`` says the damping,
    not the curvature, set the step. The paper's rule then lowers ``λ`` by
    only ``ω₁ = 0.77`` every 5 steps, which from ``λ₀ = 150`` takes
    hundreds of steps on a model whose curvature is of order 1 (a 64-32-10
    MLP on the digits, softmax cross-entropy, batch 128: ×1.4 loss
    reduction in 60 steps; ×41 with the cap, ×165 for fixed K-FAC at its
    best learning rate of a grid). A model trusted over the step
    (``ρ > ¾``) with ``λ > q`` lets ``λ`` fall to the curvature it damps at
    once; the cap never raises ``λ``, and while ``λ ≤ q`` the rule is the
    paper's. It acts at the first adaptation (step 0), which calibrates
    ``λ₀`` to the model.

    Two more departures from the paper, both on by default, make the
    README's ``λ₀ = 150`` work on small models too (the 64-32-10 digits MLP
    above: loss 0.058 after 60 steps with the cap alone, 0.0126 with both,
    against 0.0145 for fixed K-FAC at the best rate of a grid; on the
    CURVES-like autoencoder, 273 steps to Adam's loss on average over three
    seeds, against 320 with the cap alone):

    - ``calibrate_damping``: ``ρ = (q + 2λ)/(q + λ)`` inverts to
      ``λ/q = (ρ − 1)/(2 − ρ)``. When that exceeds 1 (``ρ > 3/2``), the
      damping, not the curvature, set the step, and ``λ`` is divided by it
      (at most 10³) on top of the rule's ``ω₁``: the curvature cap with
      ``q`` measured by the objective instead of the GGN. ``ρ`` between ¾
      and 3/2 leaves M&G's rule as is.
    - ``max_momentum``: the mini-batch model's ``μ`` is noisy (on the
      digits, −1.7 to 3.3 at ``λ₀ = 10⁻³``); ``μ`` is kept in
      ``[0, max_momentum]`` and ``α`` re-fitted for a clipped ``μ``, the
      exact minimiser of the model under that bound. M&G's ``(α, μ)`` are
      unconstrained (``max_momentum=None``).
  * ``gamma_search=True`` (adaptive mode only; M&G §6.6): ``γ`` is its
    own hyperparameter, ``γ₀ = √(λ₀ + η)``; every ``gamma_every`` steps
    (``T₂``) the step is computed for ``γ ∈ {ω₂γ, γ, γ/ω₂}``,
    ``ω₂ = (√(19/20))^T₂``, each with its own optimal ``(α, μ)``, and the
    ``γ`` whose step has the lowest quadratic model ``M(δ)`` is kept; the
    Kronecker inverses are re-formed at each candidate from the current
    factors (with ``T₂ = T₃`` these steps refresh anyway). ``γ`` is
    kept in ``[√(min_damping + η), √(max_damping + η)]``. Off (the
    default), ``γ = √(λ + η)`` follows ``λ``. It is off by default because
    it failed where it was measured: on the CURVES-like autoencoder (20k
    images, batch 1000, λ₀ = 150) the quadratic model preferred the larger
    γ at every search, so γ rose from 12 to 2·10³ in 200 steps while λ fell
    to 5·10⁻³; K-FAC became gradient descent and stalled at a loss of 124,
    where the tied γ reaches Adam's best loss (63) in about 300 steps. The
    same happened when the candidates were ranked by the undamped model.

  **Layers** are discovered by tracing ``predict_fn`` (see
  :mod:`curvature._layers`): Flax linen ``model.apply``, Flax nnx (with
  ``nnx.merge`` inside ``predict_fn``) and plain-JAX functions all work as
  they are. ``layer_overrides`` maps a leaf path (see :func:`kfac_summary`)
  to ``"diagonal"`` (force a diagonal block) or to the kind of its use,
  ``"dense"``/``"conv"``/``"lookup"`` (assert the discovery). Factor
  buffers are reserved at ``init(params)`` for kernels laid out
  ``[..., out]`` (Flax, ``x @ w``, HWIO convolutions); a kernel in another
  layout (``x @ w.T`` with ``w`` not square, a kernel of a ``scan`` stack)
  falls back to a diagonal block, as reported by the summary, unless
  ``example_batch`` is given: ``init`` then traces the model on its shapes
  and reserves exactly the discovered layers' factors (one pair per layer
  of a stack).

  **Weight sharing** (Eschenhagen et al. 2023). A kernel applied at ``P``
  positions of each example (a sequence, image locations, attention heads,
  the ``K`` uses of a reused kernel) has the gradient
  ``∇W̄ = Σ_p ā_p g_pᵀ``. ``weight_sharing="expand"`` treats positions as
  examples (the shared axis folded into the batch; for convolutions this
  is KFC):

  .. math::
    \bar A = \tfrac1N \textstyle\sum_{n,p} \bar a_{np} \bar a_{np}^\top,
    \qquad G = \tfrac{1}{NP} \textstyle\sum_{n,p} g_{np} g_{np}^\top,

  exact for deep linear networks when every position has its own loss
  term. ``"reduce"`` reduces the shared axis first,
  ``â_n = (1/P) Σ_p ā_{np}`` and ``ĝ_n = Σ_p g_{np}``:

  .. math::
    \bar A = \tfrac1N \textstyle\sum_n \hat a_n \hat a_n^\top, \qquad
    G = \tfrac1N \textstyle\sum_n \hat g_n \hat g_n^\top,

  exact for deep linear networks when the shared axis is pooled before the
  loss, with factors ``P`` times smaller to accumulate (their paper's
  Propositions; the product ``Ā ⊗ G`` is the same as theirs, with ``G``
  averaged over examples like the rest of this module).

  **Reused kernels** get one block. Uses that see the kernel in the same
  orientation are one more shared axis: their rows are concatenated along
  the positions and expanded or reduced with them (K-FAC-reduce is then
  exact for ``f(W, x) + f(W, x)``). A use that sees it transposed (a tied
  output layer ``h @ E.T`` of an embedding ``E``) puts its ``G`` on the
  block's ``Ā`` side and its ``Ā`` on the ``G`` side; the two orientations'
  terms ``L_k ⊗ R_k`` are balanced (``s_k L_k ⊗ R_k / s_k`` with equal mean
  eigenvalues) and summed into ``(Σ s_k L_k) ⊗ (Σ R_k / s_k) / K``, which is
  their sum when the balanced terms agree. An **embedding lookup**
  (``E[tokens]``, Flax ``Embed``) is the dense layer on one-hot inputs: its
  ``Ā`` is the diagonal of token frequencies (always expanded) and its
  ``G`` is dense. Kernels of a ``scan`` stack (Flax ``nn.scan``,
  ``nnx.scan``, ``lax.scan`` over stacked parameters, or ``vmap``) get one
  block per layer of the stack (pass ``example_batch``). A kernel of rank
  ≥ 3 contracted over some of its axes (Flax ``DenseGeneral``, the
  projections of ``MultiHeadAttention``) is the dense layer of the matrix
  ``[contracted axes, other axes]`` (pass ``example_batch`` to reserve it).

  **Non-finite values.** Non-finite statistics are discarded (the averages
  keep their value, ``rejected_statistics`` counts them); an inverse or
  eigenbasis that is not finite is discarded and the previous one kept
  (``rejected_refreshes``); nothing is refreshed from statistics that hold
  no accepted sample. A non-finite gradient or direction gives a zero
  update, raises ``λ`` (when adapted) and counts in ``rejected_steps``.

  **Data parallelism.** Inside ``jax.shard_map`` pass ``axis_name``; see
  the README's "Data parallelism" section. The ``*_batch_size`` arguments
  then count examples per shard. With ``distribute_inverses=True`` a
  refresh is spread over the devices of ``axis_name``: each block's
  inverses (or eigenbasis) are computed by one device, blocks assigned
  greedily by cost (``dim³``, largest first, to the least loaded device),
  and shared with one ``psum``, instead of every device computing all of
  them (:func:`curvature._blocks.assign_devices`).

  Args:
    predict_fn: ``(params, batch) -> outputs`` with a leading batch axis.
    loss: a loss from :mod:`curvature.losses`.
    statistics: ``"true_fisher"`` (targets sampled from the model),
      ``"curvature_propagation"`` (Rademacher probes ``Bv`` with ``BBᵀ`` the
      output Fisher: the same expectation with less variance; Martens,
      Sutskever & Swersky 2012, kfac-jax's default) or
      ``"empirical_fisher"`` (the batch's targets).
    structure: ``"kronecker"`` (K-FAC) or ``"eigen_kronecker"`` (EKFAC).
    num_samples: sampled targets per example for the true Fisher (1).
    statistics_batch_size: leading examples of each batch for the
      statistics (``None``: all; the MNIST benchmark uses 1/8 of the batch).
    decay: decay of the factor averages (0.95).
    averaging: ``"ema"`` (bias-corrected) or ``"schedule"`` (M&G's
      ``min(1 − 1/k, decay)``).
    initial_damping: ``λ₀`` (150 in M&G's autoencoder runs; in adaptive
      mode the curvature cap lowers a ``λ₀`` above the model's curvature at
      the first adaptation).
    l2_reg: L2 coefficient ``η`` added to the objective and the curvature.
    inverse_every: ``T₃``, steps between refreshes of the inverses (20).
    inverse_warmup: also refresh at steps 1, 2, 4, … below ``T₃``.
    adaptive: automatic learning rate and momentum (M&G §7).
    adapt_damping: Levenberg-Marquardt ``λ``; defaults to ``adaptive`` and
      needs it (the transform must know the step it takes).
    damping_every: ``T₁`` (5).
    damping_adaptation_decay: the per-step factor ``d`` of ``ω₁ = d^T₁``:
      19/20 as in M&G (``ω₁ = 0.77`` at ``T₁ = 5``); kfac-jax's default is
      0.9 (``ω₁ = 0.59``).
    calibrate_damping: divide ``λ`` by the over-damping ``ρ`` reveals,
      ``(ρ − 1)/(2 − ρ)`` when it exceeds 1 (adaptive mode; see above).
      ``False`` keeps M&G's rule with the curvature cap.
    max_momentum: keep the adaptive ``μ`` in ``[0, max_momentum]``,
      re-fitting ``α`` for a clipped ``μ`` (see above); ``None`` for the
      paper's unconstrained ``(α, μ)``.
    gamma_search: the γ search of M&G §6.6 (off by default; see above);
      needs ``adaptive``.
    gamma_every: ``T₂`` (20).
    min_damping: floor of ``λ``.
    max_damping: ceiling of ``λ``.
    quadratic_batch_size: leading examples used by the exact quadratic model
      (``None``: all).
    layer_overrides: ``{path: "dense" | "conv" | "lookup" | "diagonal"}``.
    max_factor_dim: layers with a larger factor get a diagonal block.
    targets_fn: finds the targets in a batch.
    seed: PRNG seed (kept in the state).
    axis_name: for ``jax.shard_map``: the mesh axis name (str or tuple of
      str) the batch is sharded over. ``None``: no cross-device reduction.
    weight_sharing: ``"expand"`` (default) or ``"reduce"``: how a kernel
      shared over positions or uses is factored (see above).
    example_batch: a batch (only its shapes matter) from which ``init``
      reserves the factors of exactly the discovered layers: needed for
      ``scan`` stacks and kernels not laid out ``[..., out]``. It also
      saves memory: the diagonal statistics are then reserved only for the
      leaves outside every layer, not one parameter-sized buffer in all.
    distribute_inverses: spread each refresh over the devices of
      ``axis_name`` (needs it) instead of computing every inverse on every
      device.
    diagonal_estimator: ``"per_example"`` (default) or ``"square_of_sum"``
      (see above): the Fisher diagonal of the leaves outside every layer
      (LayerNorm scales and biases, position embeddings). ``"square_of_sum"``
      saves a per-example pass through the model; it needs sampled
      statistics (not ``"empirical_fisher"``).
    diagonal_batch_size: leading examples of the statistics batch for the
      per-example diagonal (``None``: all). The pass costs about a
      gradient evaluation on that many examples; fewer examples trade
      variance for time.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`ScaleByKfacState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, curvature
    >>> predict = lambda p, b: jnp.tanh(b["inputs"] @ p["w"]) @ p["v"]
    >>> params = {"w": jnp.ones((4, 8)) / 4, "v": jnp.ones((8, 3)) / 8}
    >>> batch = {"inputs": jnp.ones((16, 4)), "targets": jnp.zeros(16, int)}
    >>> opt = optax.chain(
    ...     curvature.scale_by_kfac(predict,
    ...                             curvature.losses.softmax_cross_entropy,
    ...                             initial_damping=1e-2),
    ...     optax.scale_by_learning_rate(0.1))
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = opt.update(grads, state, params, batch=batch)

  References:
    Martens & Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML 2015. Grosse & Martens, "A Kronecker-factored
    approximate Fisher matrix for convolution layers", ICML 2016. George,
    Laurent, Bouthillier, Ballas & Vincent, "Fast approximate natural gradient
    descent in a Kronecker-factored eigenbasis", NeurIPS 2018 (EKFAC).
    Eschenhagen, Immer, Turner, Schneider & Hennig, "Kronecker-factored
    approximate curvature for modern neural network architectures",
    NeurIPS 2023 (K-FAC-expand and K-FAC-reduce).
    Amari, "Natural gradient works efficiently in learning", 1998. Kunstner,
    Balles & Hennig, "Limitations of the empirical Fisher approximation for
    natural gradient descent", NeurIPS 2019.
  """
  _validation.check_choice("statistics", statistics, STATISTICS)
  _validation.check_choice("structure", structure, STRUCTURES)
  _validation.check_choice("weight_sharing", weight_sharing, WEIGHT_SHARING)
  _validation.check_choice("diagonal_estimator", diagonal_estimator,
                           DIAGONAL_ESTIMATORS)
  if (diagonal_estimator == "square_of_sum"
      and statistics == "empirical_fisher"):
    raise ValueError(
        "diagonal_estimator='square_of_sum' needs cotangents of mean zero"
        " (sampled targets): with statistics='empirical_fisher' the square of"
        " the summed gradient also holds the squared mean gradient. Use"
        " diagonal_estimator='per_example', or statistics='true_fisher'.")
  if example_batch is not None:
    example_batch = _layers._abstract(example_batch)  # pylint: disable=protected-access
  if statistics == "curvature_propagation" and getattr(
      loss, "fisher_factor", None) is None:
    raise ValueError(
        f"statistics='curvature_propagation' needs the loss's output Fisher"
        f" factor, and {getattr(loss, 'name', loss)!r} has none: use"
        " statistics='true_fisher'.")
  _blocks.check_averaging(averaging, decay)
  if averaging == "sum":
    raise ValueError("K-FAC averages its factors: use averaging='ema' or"
                     " 'schedule'.")
  for name, value in (("initial_damping", initial_damping),
                      ("min_damping", min_damping),
                      ("max_damping", max_damping)):
    _check_damping_arg(name, value)
  _validation.check_nonnegative("initial_damping", initial_damping,
                                "K-FAC uses 150 on the autoencoders.")
  _validation.check_nonnegative("l2_reg", l2_reg)
  _validation.check_positive("max_damping", max_damping)
  _validation.check_nonnegative("min_damping", min_damping)
  if (isinstance(min_damping, (int, float))
      and isinstance(max_damping, (int, float)) and min_damping > max_damping):
    raise ValueError(
        f"min_damping={min_damping} exceeds max_damping={max_damping}: the"
        " damping would have no admissible value. Swap them.")
  num_samples = _validation.check_static_int("num_samples", num_samples, 1)
  inverse_every = _validation.check_static_int(
      "inverse_every", inverse_every, 1)
  damping_every = _validation.check_static_int(
      "damping_every", damping_every, 1)
  decay_fix = ("The damping is multiplied by its T₁-th power on a good step"
               " and divided by it on a bad one: use 19/20 (M&G) or 0.9"
               " (kfac-jax).")
  _validation.check_positive("damping_adaptation_decay",
                             damping_adaptation_decay, decay_fix)
  _validation.check_in_interval("damping_adaptation_decay",
                                damping_adaptation_decay, 0, 1, fix=decay_fix)
  gamma_every = _validation.check_static_int("gamma_every", gamma_every, 1)
  if max_momentum is not None:
    _validation.check_in_interval(
        "max_momentum", max_momentum, 0, 1,
        fix="pass a bound in [0, 1), e.g. 0.99, or None for the paper's"
        " unconstrained μ")
  max_factor_dim = _validation.check_static_int(
      "max_factor_dim", max_factor_dim, 1)
  for name, value in (("statistics_batch_size", statistics_batch_size),
                      ("quadratic_batch_size", quadratic_batch_size)):
    if value is not None:
      _validation.check_static_int(name, value, 1)
  diagonal_batch_size = _validation.check_optional_static_int(
      "diagonal_batch_size", diagonal_batch_size, 1)
  if diagonal_batch_size is not None and diagonal_estimator != "per_example":
    raise ValueError(
        "diagonal_batch_size picks the examples of the per-example diagonal"
        " estimate; diagonal_estimator='square_of_sum' takes the whole"
        " statistics batch from the pass it already makes. Drop"
        " diagonal_batch_size, or use diagonal_estimator='per_example'.")
  _losses.check_model(predict_fn, loss)
  axis_name = _validation.check_axis_name(axis_name)
  if distribute_inverses and axis_name is None:
    raise ValueError(
        "distribute_inverses=True needs axis_name: the refreshes are spread"
        " over the devices of that mesh axis inside jax.shard_map. Pass"
        " axis_name=..., or drop distribute_inverses (under plain jit every"
        " device computes every inverse).")
  overrides = dict(layer_overrides or {})
  for path, kind in overrides.items():
    _validation.check_choice(f"layer_overrides[{path!r}]", kind, LAYER_KINDS)
  if adapt_damping is None:
    adapt_damping = adaptive
  if gamma_search is None:
    gamma_search = False
  omega1 = damping_adaptation_decay ** damping_every
  # Only a Python number can be checked at construction: a decay given
  # through curvature.inject_hyperparams arrives traced.
  if adapt_damping and isinstance(omega1, float) and omega1 == 0.0:
    raise ValueError(
        f"damping_adaptation_decay ** damping_every = "
        f"{damping_adaptation_decay} ** {damping_every} underflows to 0, so"
        " one adjustment would send the damping to a bound. Lower"
        " damping_every, or keep the damping fixed with adapt_damping=False.")
  omega2 = math.sqrt(19.0 / 20.0) ** gamma_every
  if omega2 == 0.0 and gamma_search:
    raise ValueError(
        f"gamma_every={gamma_every} makes the γ search's factor (19/20)^"
        "(T₂/2) underflow to 0: lower gamma_every, or pass"
        " gamma_search=False.")
  for name, flag in (("adapt_damping", adapt_damping),
                     ("gamma_search", gamma_search)):
    if flag and not adaptive:
      raise ValueError(
          f"{name}=True needs adaptive=True: it compares steps through their"
          " quadratic model, and with adaptive=False the step is set by the"
          " learning rate outside this transform. Use adaptive=True, or keep"
          " the damping fixed.")

  config = _Config(
      predict_fn, loss, statistics, structure, num_samples,
      statistics_batch_size, decay, averaging, l2_reg, inverse_every,
      inverse_warmup, adaptive, adapt_damping, damping_every, gamma_search,
      gamma_every, initial_damping, min_damping, max_damping,
      quadratic_batch_size, overrides,
      max_factor_dim, targets_fn, axis_name,
      omega1, omega2,
      weight_sharing, example_batch, bool(distribute_inverses),
      diagonal_estimator, diagonal_batch_size, calibrate_damping,
      max_momentum)

  def init_fn(params):
    _validation.check_params(params, "scale_by_kfac")
    _check_overrides(overrides, leaf_paths(params))
    leaves = jax.tree.leaves(params)
    blocks = {}
    paths = leaf_paths(params)
    for path, reserved in _allocation(
        predict_fn, params, example_batch, max_factor_dim,
        structure).items():
      stack, a_dim, g_dim = reserved[:3]
      i = paths.index(path)
      dtype = _blocks.accumulation_dtype(leaves[i].dtype)
      fake = _layers.Layer("dense", i, 0, 0, False, 0, None, (), a_dim - 1,
                           g_dim, stack=stack)
      block = _layer_block(fake, a_dim, g_dim, dtype, structure, axis_name,
                           diagonal=_diagonal_sides(reserved)).init()
      blocks[path] = block._replace(refit=jax.tree.map(
          lambda r, i=i: _sharding.split_like_last_axis(r, leaves[i]),
          block.refit))
    dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
    zero = jnp.zeros((), dtype)
    damping = jnp.asarray(initial_damping, dtype)
    count = jnp.zeros((), jnp.int32)
    return _sharding.commit_state(ScaleByKfacState(
        count=count, statistics_count=count, key=jax.random.key(seed),
        blocks=blocks,
        diagonal=_diagonal_block(params, (), axis_name,
                                 _diagonal_slots(config, params)).init(),
        damping=damping, gamma=jnp.sqrt(damping + l2_reg),
        velocity=optax.tree.zeros_like(params) if adaptive else (),
        rejected_steps=count, rejected_statistics=count,
        rejected_refreshes=count,
        learning_rate=jnp.ones((), dtype), momentum=zero,
        reduction_ratio=zero), params)

  def update_fn(updates, state, params=None, *, batch=None, **extra_args):
    del extra_args
    _validation.check_update_args("scale_by_kfac", updates, params, batch)
    plan = _plan_step(config, params, batch,
                      _reserved_slots(state.diagonal, params))
    key, sample_key = jax.random.split(state.key)
    states, statistics_count, finite, rejected, linearized = (
        _statistics_stage(config, plan, state, params, sample_key))
    grad = optax.tree.add_scale(
        _products.batch_mean(updates, axis_name), l2_reg, params)
    if adaptive:
      step, states = _adaptive_stage(config, plan, state, states,
                                     statistics_count, params, grad,
                                     linearized)
    else:
      hats = _blocks.estimates(plan.blocks, states, statistics_count, decay,
                               averaging)
      damping = _damping_now(config, state)
      gamma = jnp.sqrt(damping + l2_reg)
      direction = _direction(plan, hats, grad, gamma)
      step = _AdaptiveOutcome(direction,
                              jnp.ones_like(state.learning_rate),
                              jnp.zeros_like(state.momentum), damping,
                              gamma, state.reduction_ratio, state.velocity)
    return _guard_stage(config, state, params, grad, step, states, key,
                        statistics_count, finite, rejected)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class _Config(NamedTuple):
  """The static settings of :func:`scale_by_kfac` (see its arguments)."""

  predict_fn: Callable
  loss: _losses.Loss
  statistics: str
  structure: str
  num_samples: int
  statistics_batch_size: Optional[int]
  decay: Any
  averaging: str
  l2_reg: Any
  inverse_every: int
  inverse_warmup: bool
  adaptive: bool
  adapt_damping: bool
  damping_every: int
  gamma_search: bool
  gamma_every: int
  initial_damping: Any
  min_damping: Any
  max_damping: Any
  quadratic_batch_size: Optional[int]
  overrides: dict
  max_factor_dim: int
  targets_fn: Callable
  axis_name: _validation.AxisName
  omega1: float
  omega2: float
  weight_sharing: str = "expand"
  example_batch: Any = None
  distribute_inverses: bool = False
  diagonal_estimator: str = "per_example"
  diagonal_batch_size: Optional[int] = None
  calibrate_damping: bool = True
  max_momentum: Any = 0.99


class _StepPlan(NamedTuple):
  """What one step works on: the blocks and the batches (shapes only)."""

  blocks: dict  # {kernel path | "diagonal": Block}
  layers: tuple
  diag_leaves: tuple
  batch: Any  # the whole batch
  statistics_batch: Any
  quadratic_batch: Any  # adaptive mode: the exact quadratic model's
  num_examples: int
  treedef: Any
  # Adaptive mode, the quadratic model on the statistics' batch: one
  # linearization serves both (:func:`_observe`).
  shares_pass: bool = False


def _damping_now(config, state):
  """λ: adapted in the state, or the configured (possibly injected) value.

  With fixed damping the argument is read at every step, so a schedule
  through :func:`curvature.inject_hyperparams` takes effect.
  """
  if config.adapt_damping:
    return state.damping
  return jnp.asarray(config.initial_damping, state.damping.dtype)


def _plan_step(config, params, batch, slots) -> _StepPlan:
  """Stage 1: split the batch, discover the layers, build the blocks.

  ``slots``: the leaves whose diagonal statistics the state holds
  (:func:`_reserved_slots`).
  """
  num_examples = _products.batch_size(batch, config.targets_fn)
  stats_size = _products.subset_size(config.statistics_batch_size,
                                     num_examples)
  quadratic_size = _products.subset_size(config.quadratic_batch_size,
                                         num_examples)
  stats_batch = _products.take_examples(batch, stats_size)
  quadratic_batch = _products.take_examples(batch, quadratic_size)
  layers, _ = _plan(config.predict_fn, params, stats_batch, config.overrides,
                    config.max_factor_dim, config.example_batch,
                    config.structure)
  diag_leaves = _outside_layers(layers, len(jax.tree.leaves(params)))
  _check_diagonal_slots(diag_leaves, slots, params)
  blocks = _blocks_for(layers, params, config.max_factor_dim,
                       config.structure, config.axis_name,
                       config.weight_sharing)
  blocks["diagonal"] = _diagonal_block(params, diag_leaves, config.axis_name,
                                       slots)
  return _StepPlan(blocks, layers, diag_leaves, batch, stats_batch,
                   quadratic_batch, num_examples, jax.tree.structure(params),
                   config.adaptive and quadratic_size == stats_size)


def _statistics_stage(config, plan, state, params, key):
  """Stage 2: observe, average, refresh and re-fit (EKFAC).

  Returns:
    ``(states, statistics_count, finite, rejected_refreshes, linearized)``,
    ``linearized`` the quadratic model's ``(outputs, v ↦ J v)`` from the
    same pass when ``plan.shares_pass``, else ``None``.
  """
  layer_evidence, diagonal, linearized = _observe(
      config.predict_fn, config.loss, plan.layers, plan.diag_leaves, params,
      plan.statistics_batch, key, config.statistics, config.num_samples,
      config.targets_fn, config.axis_name, config.diagonal_estimator,
      config.diagonal_batch_size, linearize=plan.shares_pass)
  paths = leaf_paths(params)
  # Each block's evidence: LayerEvidence, or the diagonal block's estimates.
  evidence: dict[str, Any] = {
      paths[layer.kernel]: e for layer, e in zip(plan.layers, layer_evidence)}
  evidence["diagonal"] = diagonal
  states = dict(state.blocks, diagonal=state.diagonal)
  states, count, finite = _blocks.accumulate(
      plan.blocks, states, evidence, state.statistics_count, config.decay,
      config.averaging)
  hats = _blocks.estimates(plan.blocks, states, count, config.decay,
                           config.averaging)
  gamma = (state.gamma if config.gamma_search
           else jnp.sqrt(_damping_now(config, state) + config.l2_reg))
  states, rejected = _blocks.refresh(
      plan.blocks, states, {n: h.statistics for n, h in hats.items()},
      _blocks.refresh_due(state.count, config.inverse_every,
                          config.inverse_warmup), gamma, count,
      axis_name=config.axis_name if config.distribute_inverses else None)
  states = _blocks.refit(plan.blocks, states, evidence, count, config.decay,
                         config.averaging, finite)
  return states, count, finite, rejected, linearized


def _direction(plan, hats, grad, gamma):
  """K-FAC's ``Δ``: every block's leaves preconditioned, damping γ²."""
  return plan.treedef.unflatten(_blocks.precondition(
      plan.blocks, hats, jax.tree.leaves(grad), gamma ** 2))


class _AdaptiveOutcome(NamedTuple):
  output: Params  # the transform's output, −δ (or Δ in fixed mode)
  alpha: Array
  mu: Array
  damping: Array
  gamma: Array
  reduction_ratio: Array
  velocity: Params  # the step δ to carry (unchanged in fixed mode)


def _adaptive_stage(config, plan, state, states, statistics_count, params,
                    grad, linearized):
  """Stage 3 (adaptive mode): γ search, (α, μ), Levenberg-Marquardt on ρ."""
  hats = _blocks.estimates(plan.blocks, states, statistics_count,
                           config.decay, config.averaging)
  q_batch = plan.quadratic_batch
  forms, value = _quadratic_model(config.predict_fn, config.loss, params,
                                  q_batch, config.l2_reg, config.targets_fn,
                                  config.axis_name, linearized)
  damping = _damping_now(config, state)
  gamma = (state.gamma if config.gamma_search
           else jnp.sqrt(damping + config.l2_reg))
  if config.gamma_search:
    gamma, hats = _search_gamma(
        plan.blocks, hats, gamma, forms, grad, state.velocity, damping,
        lambda h, g: _direction(plan, h, grad, g), config.omega2,
        (jnp.sqrt(config.min_damping + config.l2_reg),
         jnp.sqrt(config.max_damping + config.l2_reg)),
        state.count % config.gamma_every == 0, config.max_momentum)
    states = {n: s._replace(preconditioner=hats[n].preconditioner)
              if n in hats else s for n, s in states.items()}
  chosen = _adaptive_step(forms, grad, _direction(plan, hats, grad, gamma),
                          state.velocity, damping, config.max_momentum)

  def adapt():
    new_value = _products.objective(
        config.predict_fn, config.loss, optax.tree.add(params, chosen.step),
        q_batch, l2_reg=config.l2_reg, targets_fn=config.targets_fn,
        axis_name=config.axis_name)
    rho = _taylor.reduction_ratio(new_value, value, chosen.model)
    rho = jnp.where(jnp.isfinite(rho) & (chosen.model < 0), rho, -jnp.inf)
    return (_damping_update(config, damping, rho, chosen.curvature),
            rho.astype(state.reduction_ratio.dtype))

  if config.adapt_damping:
    new_damping, rho = jax.lax.cond(
        state.count % config.damping_every == 0, adapt,
        lambda: (damping, state.reduction_ratio))
  else:
    new_damping, rho = damping, state.reduction_ratio
  return _AdaptiveOutcome(optax.tree.scale(-1.0, chosen.step), chosen.alpha,
                          chosen.mu, new_damping, gamma, rho,
                          chosen.step), states


def _damping_update(config, damping, rho, curvature=math.inf):
  r"""Levenberg-Marquardt in the ω form, with the curvature cap.

  .. math::
    \lambda \leftarrow \begin{cases}
      \omega_1 \min(\lambda, q) & \rho > \tfrac34 \\
      \lambda / \omega_1 & \rho < \tfrac14 \\
      \lambda & \text{otherwise}
    \end{cases}, \qquad q = \frac{\delta^\top C \delta}{\delta^\top\delta}

  ``q`` is the exact curvature (GGN + ηI) along the step just taken (``inf``
  when unknown: the rejection of a non-finite step). Without the cap this is
  M&G's rule (§6.5) as is. With ``calibrate_damping``, a ``ρ > 1`` further
  divides ``λ`` by :func:`_overdamping` ``(ρ)``, the over-damping that ``ρ``
  itself reveals. See :func:`scale_by_kfac` for why the cap and the
  calibration.
  """
  capped = jnp.where((curvature > 0) & (curvature < damping), curvature,
                     damping)
  base = jnp.where(rho > 0.75, capped, damping).astype(damping.dtype)
  if config.calibrate_damping:
    base = base / jnp.where(rho > 1.0, _overdamping(rho), 1.0).astype(
        damping.dtype)
  return _damping.levenberg_marquardt(
      base, rho, increase=1.0 / config.omega1, decrease=config.omega1,
      bounds=(config.min_damping, config.max_damping))


_MAX_OVERDAMPING = 1e3  # At most three decades per adaptation.


def _overdamping(rho):
  """``λ/q ≈ (ρ − 1)/(2 − ρ)`` from ``ρ = (q + 2λ)/(q + λ)``, at least 1.

  The ratio the step's ``ρ`` implies for a model that is quadratic along the
  step (see :func:`scale_by_kfac`), clipped to ``[1, 1e3]`` (``ρ ≥ 2``, which
  no quadratic gives, takes the upper bound).
  """
  ratio = (rho - 1.0) / jnp.maximum(2.0 - rho, 1.0 / _MAX_OVERDAMPING)
  return jnp.clip(ratio, 1.0, _MAX_OVERDAMPING)


def _guard_stage(config, state, params, grad, step, states, key,
                 statistics_count, finite, rejected_refreshes):
  """Stage 4: a non-finite gradient or step never reaches the parameters."""
  output, rejected = _damping.guard_step(_validation.all_finite(grad),
                                         step.output)
  ok = ~rejected
  zeros = optax.tree.zeros_like(params)
  output = optax.tree.cast_like(output, params)
  damping = step.damping
  if config.adapt_damping:
    damping = _damping.raise_on_rejection(
        state.damping, step.damping, rejected, increase=1.0 / config.omega1,
        bounds=(config.min_damping, config.max_damping))
  gamma = (step.gamma if config.gamma_search
           else jnp.sqrt(damping + config.l2_reg))
  dtype = state.learning_rate.dtype
  diagonal = states.pop("diagonal")
  return output, ScaleByKfacState(
      count=_optax_typed.safe_increment(state.count),
      statistics_count=statistics_count, key=key,
      blocks={**state.blocks, **states}, diagonal=diagonal,
      damping=damping.astype(state.damping.dtype),
      gamma=jnp.asarray(gamma, state.gamma.dtype),
      velocity=(optax.tree.cast_like(
          optax.tree.where(ok, step.velocity, zeros), params)
                if config.adaptive else state.velocity),
      rejected_steps=state.rejected_steps + (~ok).astype(jnp.int32),
      rejected_statistics=state.rejected_statistics
      + (~finite).astype(jnp.int32),
      rejected_refreshes=state.rejected_refreshes + rejected_refreshes,
      learning_rate=jnp.where(ok, step.alpha, 0.0).astype(dtype),
      momentum=jnp.where(ok, step.mu, 0.0).astype(dtype),
      reduction_ratio=jnp.asarray(step.reduction_ratio, dtype))


def _redamped(blocks, hats, gamma):
  """Kronecker blocks' inverses re-formed at damping ``γ`` (no other change)."""
  return {name: hats[name]._replace(
      preconditioner=block.refresh(hats[name].statistics, gamma))
          if block.kind == "kronecker" else hats[name]
          for name, block in blocks.items()}


def _search_gamma(blocks, hats, gamma, forms, grad, velocity, damping,
                  direction_for, omega2, bounds, due, max_momentum=None):
  """M&G §6.6: keep the γ of {ω₂γ, γ, γ/ω₂} whose step has the lowest M(δ).

  Returns:
    ``(γ, hats)`` with the Kronecker inverses re-formed at the chosen γ.
  """

  def search():
    candidates = [jnp.clip(gamma * f, *bounds)
                  for f in (omega2, 1.0, 1.0 / omega2)]
    models = []
    for candidate in candidates:
      trial = _redamped(blocks, hats, candidate)
      step = _adaptive_step(forms, grad, direction_for(trial, candidate),
                            velocity, damping, max_momentum)
      models.append(jnp.where(jnp.isfinite(step.model), step.model, jnp.inf))
    best = jnp.argmin(jnp.asarray(models))
    chosen = jnp.asarray(candidates)[best].astype(gamma.dtype)
    return chosen, _redamped(blocks, hats, chosen)

  return jax.lax.cond(due, search, lambda: (gamma, hats))


def kfac(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    *,
    predict_fn: Callable[[Params, Any], Any],
    loss: _losses.Loss,
    momentum: float = 0.9,
    adaptive: bool = False,
    statistics: str = "true_fisher",
    structure: str = "kronecker",
    num_samples: int = 1,
    statistics_batch_size: Optional[int] = None,
    decay: float = 0.95,
    averaging: str = "ema",
    initial_damping: Optional[float] = None,
    l2_reg: float = 0.0,
    inverse_every: int = 20,
    inverse_warmup: bool = True,
    damping_every: int = 5,
    damping_adaptation_decay: float = 19.0 / 20.0,
    calibrate_damping: bool = True,
    max_momentum: Optional[float] = 0.99,
    gamma_search: Optional[bool] = None,
    gamma_every: int = 20,
    quadratic_batch_size: Optional[int] = None,
    layer_overrides: Optional[Mapping[str, str]] = None,
    max_factor_dim: int = 4096,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    seed: int = 0,
    axis_name: _validation.AxisName = None,
    weight_sharing: str = "expand",
    example_batch: Any = None,
    distribute_inverses: bool = False,
    diagonal_estimator: str = "per_example",
    diagonal_batch_size: Optional[int] = None,
    graft: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""K-FAC optimizer (Martens & Grosse 2015) as an ``optax.chain``.

  * ``adaptive=False``: ``θ ← θ − lr · v``, ``v ← momentum·v + Δ``, with
    ``Δ`` the K-FAC direction of :func:`scale_by_kfac` at fixed damping
    ``λ = initial_damping``.
  * ``adaptive=True``: the step ``δ = −αΔ + μδ₋₁`` with ``α, μ`` from the
    exact quadratic model and Levenberg-Marquardt damping (M&G §6–7); then
    ``learning_rate`` multiplies that step (keep it 1; ``momentum`` is not
    used) and ``initial_damping`` is ``λ₀`` (M&G use
    150).
  * ``graft`` (fixed mode only): each leaf's ``Δ`` is rescaled to the norm
    of ``graft``'s update before the momentum, ``Δ_ℓ‖m_ℓ‖/‖Δ_ℓ‖``
    (:func:`curvature.scale_by_graft`; Agarwal et al. 2020): K-FAC's
    direction at, e.g., Adam's per-layer step sizes
    (``graft=optax.scale_by_adam(b1=0.0)``), as Shampoo is grafted.

  See :func:`scale_by_kfac` for every argument.

  Args:
    learning_rate: a scalar or schedule.
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    momentum: heavy-ball momentum of the fixed mode (0 disables it).
    adaptive: automatic learning rate, momentum and damping.
    statistics: ``"true_fisher"``, ``"curvature_propagation"`` or
      ``"empirical_fisher"``.
    structure: ``"kronecker"`` (K-FAC) or ``"eigen_kronecker"`` (EKFAC).
    num_samples: sampled targets per example.
    statistics_batch_size: leading examples used for the statistics.
    decay: factor average decay.
    averaging: ``"ema"`` or ``"schedule"``.
    initial_damping: ``λ`` (fixed mode, default 1e-3) or ``λ₀`` (adaptive,
      default 150).
    l2_reg: L2 coefficient.
    inverse_every: steps between inverse refreshes.
    inverse_warmup: geometric extra refreshes before the first period ends.
    damping_every: steps between damping adaptations.
    damping_adaptation_decay: per-step factor of the damping's decrease.
    calibrate_damping: lower ``λ`` by the over-damping that ``ρ`` reveals
      (see :func:`scale_by_kfac`).
    max_momentum: bound on the adaptive ``μ`` (``None``: unconstrained).
    gamma_search: the γ search (off by default; see
      :func:`scale_by_kfac`).
    gamma_every: steps between γ searches.
    quadratic_batch_size: examples for the exact quadratic model.
    layer_overrides: ``{path: kind}``.
    max_factor_dim: larger factors fall back to diagonal blocks.
    targets_fn: finds the targets in a batch.
    seed: PRNG seed.
    axis_name: for ``jax.shard_map``: the mesh axis the batch is sharded
      over.
    weight_sharing: ``"expand"`` or ``"reduce"`` (see
      :func:`scale_by_kfac`).
    example_batch: a batch whose shapes reserve the factors (and the
      diagonal statistics of exactly the leaves outside every layer) at
      ``init``.
    distribute_inverses: spread the refreshes over the devices of
      ``axis_name``.
    diagonal_estimator: ``"per_example"`` or ``"square_of_sum"``: how the
      leaves outside every layer get their Fisher diagonal (see
      :func:`scale_by_kfac`).
    diagonal_batch_size: examples for the per-example diagonal (``None``:
      all).
    graft: an optax transform whose per-leaf norms K-FAC's direction takes
      (fixed mode), or ``None``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, curvature
    >>> predict = lambda p, b: b["inputs"] @ p["w"] + p["b"]
    >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    >>> batch = {"inputs": jnp.ones((8, 4)), "targets": jnp.zeros(8, int)}
    >>> opt = curvature.kfac(1e-2, predict_fn=predict,
    ...                      loss=curvature.losses.softmax_cross_entropy)
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = opt.update(grads, state, params, batch=batch)

  References:
    Martens & Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML 2015; Grosse & Martens, "A Kronecker-factored
    approximate Fisher matrix for convolution layers", ICML 2016.
  """
  _validation.check_learning_rate(learning_rate)
  if graft is not None and not isinstance(graft,
                                          optax.GradientTransformation):
    raise TypeError(
        f"`graft` must be an optax.GradientTransformation, got {graft!r}."
        " Pass e.g. graft=optax.scale_by_adam(b1=0.0), or None.")
  if graft is not None and adaptive:
    raise ValueError(
        "graft= rescales the fixed-mode direction; with adaptive=True the"
        " step length comes from the quadratic model (α, μ). Drop graft, or"
        " use adaptive=False.")
  if initial_damping is None:
    initial_damping = 150.0 if adaptive else 1e-3
  parts: list[optax.GradientTransformation] = [scale_by_kfac(
      predict_fn, loss, statistics=statistics, structure=structure,
      num_samples=num_samples, statistics_batch_size=statistics_batch_size,
      decay=decay, averaging=averaging, initial_damping=initial_damping,
      l2_reg=l2_reg, inverse_every=inverse_every,
      inverse_warmup=inverse_warmup, adaptive=adaptive,
      damping_every=damping_every,
      damping_adaptation_decay=damping_adaptation_decay,
      calibrate_damping=calibrate_damping, max_momentum=max_momentum,
      gamma_search=gamma_search,
      gamma_every=gamma_every, quadratic_batch_size=quadratic_batch_size,
      layer_overrides=layer_overrides, max_factor_dim=max_factor_dim,
      targets_fn=targets_fn, seed=seed, axis_name=axis_name,
      weight_sharing=weight_sharing, example_batch=example_batch,
      distribute_inverses=distribute_inverses,
      diagonal_estimator=diagonal_estimator,
      diagonal_batch_size=diagonal_batch_size)]
  if graft is not None:
    parts = [_grafting.scale_by_graft(graft, parts[0])]
  if not adaptive and not (isinstance(momentum, (int, float))
                           and momentum == 0):
    parts.append(_momentum.scale_by_momentum(momentum))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


# K-FAC as a preconditioner for another solver ---------------------------------


class KfacPreconditioner(NamedTuple):
  """K-FAC's statistics and damped inverses for another solver (e.g. CG).

  Attributes:
    init: ``params -> ScaleByKfacState``.
    update: ``(state, params, batch, damping) -> (state, precondition)``:
      one statistics stage of :func:`scale_by_kfac` on ``batch`` (observe,
      average, refresh the inverses when due), and
      ``precondition: vectors -> vectors``, K-FAC's factored
      ``(F̂ + (λ + η) I)⁻¹`` at ``γ = √(damping + η)``.
  """

  init: optax.TransformInitFn  # Returns a ScaleByKfacState.
  update: Callable[..., Any]


def kfac_preconditioner(
    predict_fn: Callable[[Params, Any], Any],
    loss: _losses.Loss,
    *,
    statistics: str = "true_fisher",
    num_samples: int = 1,
    decay: float = 0.95,
    l2_reg: float = 0.0,
    inverse_every: int = 20,
    inverse_warmup: bool = True,
    max_factor_dim: int = 4096,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    seed: int = 0,
    axis_name: _validation.AxisName = None,
) -> KfacPreconditioner:
  """The stages of :func:`scale_by_kfac` as a preconditioner, damped outside.

  The damping is the caller's (e.g. Hessian-free's Levenberg-Marquardt
  ``λ``), passed at every ``update``; the arguments are those of
  :func:`scale_by_kfac` (validated there).
  """
  transform = scale_by_kfac(
      predict_fn, loss, statistics=statistics, num_samples=num_samples,
      decay=decay, l2_reg=l2_reg, inverse_every=inverse_every,
      inverse_warmup=inverse_warmup, max_factor_dim=max_factor_dim,
      targets_fn=targets_fn, seed=seed, axis_name=axis_name)
  # adapt_damping=True only makes the stages read λ from the state.
  config = _Config(
      predict_fn=predict_fn, loss=loss, statistics=statistics,
      structure="kronecker", num_samples=num_samples,
      statistics_batch_size=None, decay=decay, averaging="ema",
      l2_reg=l2_reg, inverse_every=inverse_every,
      inverse_warmup=inverse_warmup, adaptive=False, adapt_damping=True,
      damping_every=1, gamma_search=False, gamma_every=1,
      initial_damping=0.0, min_damping=0.0, max_damping=math.inf,
      quadratic_batch_size=None, overrides={},
      max_factor_dim=max_factor_dim, targets_fn=targets_fn,
      axis_name=axis_name, omega1=1.0, omega2=1.0, weight_sharing="expand",
      example_batch=None)

  def update(state, params, batch, damping):
    plan = _plan_step(config, params, batch,
                      _reserved_slots(state.diagonal, params))
    key, sample_key = jax.random.split(state.key)
    state = state._replace(damping=jnp.asarray(damping, state.damping.dtype))
    states, count, finite, rejected, _ = _statistics_stage(
        config, plan, state, params, sample_key)
    hats = _blocks.estimates(plan.blocks, states, count, decay, "ema")
    gamma = jnp.sqrt(state.damping + l2_reg)
    diagonal = states.pop("diagonal")
    state = state._replace(
        count=_optax_typed.safe_increment(state.count), statistics_count=count,
        key=key, blocks={**state.blocks, **states}, diagonal=diagonal,
        gamma=gamma.astype(state.gamma.dtype),
        rejected_statistics=state.rejected_statistics
        + (~finite).astype(jnp.int32),
        rejected_refreshes=state.rejected_refreshes + rejected)
    return state, lambda vectors: _direction(plan, hats, vectors, gamma)

  return KfacPreconditioner(transform.init, update)
