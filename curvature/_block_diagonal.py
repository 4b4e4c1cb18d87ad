r"""Block-diagonal curvature: a dense block per small parameter leaf (or layer).

One step above the diagonal methods (Le Roux, Manzagol & Bengio 2008;
Martens & Grosse 2015, §4): the parameters are split into groups, each group
keeps a *full* curvature block ``C_b`` and the couplings between groups are
zeroed,

.. math::
  C \approx \operatorname{blockdiag}(C_1, \dots, C_B), \qquad
  u_b = (C_b + \lambda I)^{-1} g_b .

A group is one parameter leaf (``grouping="leaf"``) or the leaves of one layer
(``grouping="layer"``: leaves sharing a path prefix, e.g. ``kernel`` and
``bias``). Storage is ``Σ b²`` and a refresh of the inverses ``Σ b³``, so a
group larger than ``max_block_size`` falls back to the diagonal of the same
curvature, computed by the estimators of
:mod:`curvature._curvature_diagonals`. :func:`block_diagonal_summary` shows
which leaf got which block.

Each dense block is exact for its matrix: the curvature is linearized once
(:func:`curvature.linearize`) and multiplied by every one-hot basis vector of
the group, so column ``j`` of ``C_b`` is ``(C e_j)_b``.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvature import _blocks
from curvature import _curvature_diagonals
from curvature import _losses
from curvature import _momentum
from curvature import _optax_typed
from curvature import _products
from curvature import _sharding
from curvature import _validation

Array = jax.Array
Params = Any

BLOCK_CURVATURES = ("fisher", "sampled_fisher", "empirical_fisher", "ggn")
"""Curvature matrices :func:`scale_by_block_diagonal` can take blocks of."""

GROUPINGS = ("leaf", "layer")
"""How leaves are grouped into blocks: one per leaf, or one per layer."""


CurvatureBlock = _blocks.BlockRow


class BlockDiagonalCurvature(NamedTuple):
  """The output of :func:`block_diagonal_curvature`.

  Attributes:
    blocks: one dense ``[b, b]`` block per dense group, in the order of
      :func:`block_diagonal_blocks`'s ``index``; rows and columns follow the
      group's leaves in ``jax.tree.leaves`` order, each raveled in C order.
    diagonal: per leaf (``jax.tree.leaves`` order), the curvature diagonal
      shaped like the leaf, or ``None`` for a leaf inside a dense block.
  """

  blocks: tuple
  diagonal: tuple


class ScaleByBlockDiagonalState(NamedTuple):
  """State of :func:`scale_by_block_diagonal`.

  Attributes:
    count: number of ``update`` calls.
    statistics_count: accepted (finite) statistics, for the bias correction.
    key: PRNG key for the sampled targets.
    blocks: one :class:`curvature._blocks.BlockState` per dense group, in
      the order of :func:`block_diagonal_blocks`'s ``index``: the raw EMA of
      the block (``statistics``) and ``(Ĉ_b + λI)⁻¹`` from the last refresh
      (``preconditioner``).
    diagonal: the diagonal block of the fallback leaves: raw EMA of their
      curvature diagonal, one array per fallback leaf.
    rejected_steps: steps with a non-finite gradient or direction (zero
      update).
    rejected_statistics: statistics discarded because they were not finite.
    rejected_refreshes: inverses discarded because they were not finite (the
      previous ones were kept).
  """

  count: Array
  statistics_count: Array
  key: Array
  blocks: tuple
  diagonal: _blocks.BlockState
  rejected_steps: Array
  rejected_statistics: Array
  rejected_refreshes: Array


# Plan: which leaves share a dense block ------------------------------------


class _Plan(NamedTuple):
  groups: tuple  # Dense groups: tuples of leaf indices.
  diagonal: tuple  # Leaf indices with a diagonal block.
  reasons: dict  # Leaf index -> reason.


def _candidate_groups(paths, grouping):
  if grouping == "leaf":
    return [[i] for i in range(len(paths))]
  by_layer = {}
  for i, path in enumerate(paths):
    by_layer.setdefault(path.rpartition("/")[0], []).append(i)
  return list(by_layer.values())


def _plan(params, max_block_size, grouping) -> _Plan:
  """Dense groups and diagonal leaves; depends on shapes and paths only."""
  leaves = jax.tree.leaves(params)
  paths = _blocks.leaf_paths(params)
  sizes = [int(np.size(x)) for x in leaves]
  groups, diagonal, reasons = [], [], {}
  for group in _candidate_groups(paths, grouping):
    total = sum(sizes[i] for i in group)
    if total <= max_block_size and total > 0:
      groups.append(tuple(group))
      for i in group:
        reasons[i] = ("own dense block" if len(group) == 1 else
                      f"dense block of layer '{paths[i].rpartition('/')[0]}'")
      continue
    for i in group:
      if 0 < sizes[i] <= max_block_size:
        groups.append((i,))
        reasons[i] = (f"own dense block (its layer has {total} > "
                      f"max_block_size={max_block_size} parameters)")
      else:
        diagonal.append(i)
        reasons[i] = ("empty leaf" if sizes[i] == 0 else
                      f"size {sizes[i]} > max_block_size={max_block_size}:"
                      " diagonal fallback")
  return _Plan(tuple(groups), tuple(sorted(diagonal)), reasons)


def block_diagonal_blocks(
    params: Params,
    *,
    max_block_size: int = 1024,
    grouping: str = "leaf",
) -> tuple:
  """Which block every parameter leaf gets, and why.

  Args:
    params: the parameters (only their structure and shapes matter).
    max_block_size: as in :func:`scale_by_block_diagonal`.
    grouping: as in :func:`scale_by_block_diagonal`.

  Returns:
    A tuple of :class:`curvature.BlockRow`, one per leaf, in ``jax.tree.leaves``
    order.
  """
  max_block_size = _validation.check_static_int(
      "max_block_size", max_block_size, 1)
  _validation.check_choice("grouping", grouping, GROUPINGS)
  plan = _plan(params, max_block_size, grouping)
  leaves = jax.tree.leaves(params)
  paths = _blocks.leaf_paths(params)
  rows = {}
  for index, group in enumerate(plan.groups):
    size = sum(int(np.size(leaves[i])) for i in group)
    for i in group:
      rows[i] = ("dense", index, size, tuple(paths[j] for j in group))
  out = []
  for i, leaf in enumerate(leaves):
    block, index, size, members = rows.get(
        i, ("diagonal", None, int(np.size(leaf)), (paths[i],)))
    out.append(_blocks.BlockRow(paths[i], tuple(np.shape(leaf)), block,
                                None, plan.reasons[i], index, size, members))
  return tuple(out)


def block_diagonal_summary(
    params: Params,
    *,
    max_block_size: int = 1024,
    grouping: str = "leaf",
) -> str:
  """A printable table of :func:`block_diagonal_blocks`.

  Args:
    params: the parameters (only their structure and shapes matter).
    max_block_size: as in :func:`scale_by_block_diagonal`.
    grouping: as in :func:`scale_by_block_diagonal`.

  Returns:
    One line per leaf: its path, shape, block and the reason.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> params = [{"w": jnp.zeros((4, 5)), "b": jnp.zeros(5)},
    ...           {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}]
    >>> print(curvature.block_diagonal_summary(  # doctest: +ELLIPSIS
    ...     params, max_block_size=15))
    0/b  (5,)          dense 5x5 #0      own dense block
    0/w  (4, 5)        diagonal          size 20 > max_block_size=15: ...
    1/b  (3,)          dense 3x3 #1      own dense block
    1/w  (5, 3)        dense 15x15 #2    own dense block
  """
  rows = block_diagonal_blocks(params, max_block_size=max_block_size,
                               grouping=grouping)
  width = max((len(r.path) for r in rows), default=0)
  lines = []
  for r in rows:
    block = (f"dense {r.size}x{r.size} #{r.index}" if r.block == "dense"
             else "diagonal")
    lines.append(f"{r.path:<{width}}  {str(r.shape):<12}  {block:<16}"
                 f"  {r.reason}")
  return "\n".join(lines)


# Statistics -----------------------------------------------------------------


def _group_dtype(leaves, group):
  """Blocks and their inverses are kept in at least float32."""
  return _blocks.accumulation_dtype(
      jnp.result_type(*[leaves[i] for i in group]))


def _dense_block(matvec, leaves, treedef, group, chunk_size):
  """``C_b`` from ``b`` products with one-hot basis vectors of the group."""
  sizes = [leaves[i].size for i in group]
  dim = sum(sizes)
  dtype = _group_dtype(leaves, group)

  def column(e):
    parts = jnp.split(e, np.cumsum(sizes)[:-1])
    vector = [jnp.zeros_like(x) for x in leaves]
    for i, part in zip(group, parts):
      vector[i] = _sharding.shard_like(
          part.reshape(leaves[i].shape).astype(leaves[i].dtype), leaves[i])
    product = jax.tree.leaves(matvec(treedef.unflatten(vector)))
    # A dense block is small: its leaves' products are gathered whole
    # (an FSDP-sharded leaf cannot be flattened in place).
    return jnp.concatenate([
        _sharding.replicate(product[i]).reshape(-1).astype(dtype)
        for i in group])

  columns = _sharding.replicate(jax.lax.map(
      column, jnp.eye(dim, dtype=dtype), batch_size=min(chunk_size, dim)))
  return 0.5 * (columns + columns.T)


def _fallback_diagonal(curvature, predict_fn, loss, params, batch, indices,
                       key, num_samples, targets_fn, axis_name):
  """The curvature diagonal of the leaves ``indices`` (shared estimators)."""
  sub_predict, sub = _products.restrict_to_leaves(predict_fn, params,
                                                   indices)
  if curvature == "empirical_fisher":
    return _products.empirical_fisher_diagonal(
        sub_predict, loss, sub, batch, targets_fn=targets_fn,
        axis_name=axis_name)
  if curvature == "sampled_fisher":
    return _curvature_diagonals.sampled_fisher_diagonal(
        sub_predict, loss, sub, batch, key=key, num_samples=num_samples,
        axis_name=axis_name)
  try:
    return _curvature_diagonals.ggn_diagonal(
        sub_predict, loss, sub, batch, targets_fn=targets_fn,
        axis_name=axis_name)
  except ValueError as error:
    raise ValueError(
        f"The diagonal fallback of curvature={curvature!r} is exact and needs"
        f" one pass per model output: {error} With scale_by_block_diagonal,"
        " use curvature='sampled_fisher', or raise max_block_size so that"
        " no leaf falls back.") from error


def block_diagonal_curvature(
    predict_fn: Callable[[Params, Any], Array],
    loss: _losses.Loss,
    params: Params,
    batch: Any,
    *,
    curvature: str = "fisher",
    max_block_size: int = 1024,
    grouping: str = "leaf",
    key: Optional[Array] = None,
    num_samples: int = 1,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    chunk_size: int = 128,
    axis_name: _validation.AxisName = None,
) -> BlockDiagonalCurvature:
  r"""The dense curvature blocks of the small groups, the diagonal of the rest.

  For each group ``b`` of at most ``max_block_size`` parameters,

  .. math::
    C_b = \big[(C e_j)_b\big]_{j \in b}, \qquad
    C \in \{J^\top \nabla_z^2 L\, J,\ J^\top F_z J,\
    \tfrac{1}{NS}\textstyle\sum_{i,s} g_{is} g_{is}^\top,\
    \tfrac1N \textstyle\sum_i g_i g_i^\top\}

  (GGN, exact Fisher, Monte-Carlo Fisher with targets ``ỹ_is ~ p(y|x_i)``,
  empirical Fisher with the data's targets), from one shared linearization
  and ``b`` products, ``chunk_size`` of them vectorized at a time. Every other
  leaf gets ``diag(C)`` restricted to it, from
  :func:`curvature.ggn_diagonal` (``"ggn"``, ``"fisher"``; equal for the
  canonical losses of :mod:`curvature.losses`),
  :func:`curvature.sampled_fisher_diagonal` (same key, hence the same
  sampled targets, as the blocks) or
  :func:`curvature.empirical_fisher_diagonal`.

  Args:
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    params: the point.
    batch: the data.
    curvature: one of :data:`BLOCK_CURVATURES`.
    max_block_size: largest dense block side (a Python int).
    grouping: ``"leaf"`` or ``"layer"`` (see :func:`scale_by_block_diagonal`).
    key: PRNG key, required for ``"sampled_fisher"``.
    num_samples: sampled targets per example for ``"sampled_fisher"``.
    targets_fn: finds the targets in ``batch``.
    chunk_size: basis vectors multiplied at once (memory vs. speed).
    axis_name: inside ``jax.shard_map``, the mesh axis (str or tuple of
      str) the batch is sharded over: blocks and diagonals are
      ``pmean``-ed into the global-batch ones, and ``"sampled_fisher"``
      draws independent targets per device. ``None``: no reduction.

  Returns:
    A :class:`BlockDiagonalCurvature`.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> def predict(params, batch):
    ...   hidden = jnp.tanh(batch["inputs"] @ params[0]["w"] + params[0]["b"])
    ...   return hidden @ params[1]["w"] + params[1]["b"]
    >>> k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
    >>> params = [{"w": jax.random.normal(k0, (4, 5)), "b": jnp.zeros(5)},
    ...           {"w": jax.random.normal(k1, (5, 3)), "b": jnp.zeros(3)}]
    >>> batch = {"inputs": jax.random.normal(k2, (8, 4)),
    ...          "targets": jnp.arange(8) % 3}
    >>> c = jax.jit(lambda p: curvature.block_diagonal_curvature(
    ...     predict, curvature.losses.softmax_cross_entropy, p, batch,
    ...     max_block_size=15))(params)
    >>> [b.shape for b in c.blocks]  # 0/b, 1/b, 1/w (see the summary)
    [(5, 5), (3, 3), (15, 15)]
    >>> [None if d is None else d.shape for d in c.diagonal]  # 0/w falls back
    [None, (4, 5), None, None]
    >>> bool(jnp.all(jnp.linalg.eigvalsh(c.blocks[2]) > -1e-6))  # PSD
    True

  References:
    Le Roux, Manzagol & Bengio, "Topmoumoute online natural gradient
    algorithm", NIPS 2008.

    Martens & Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML 2015.
  """
  _validation.check_choice("curvature", curvature, BLOCK_CURVATURES)
  max_block_size = _validation.check_static_int(
      "max_block_size", max_block_size, 1)
  chunk_size = _validation.check_static_int("chunk_size", chunk_size, 1)
  _validation.check_choice("grouping", grouping, GROUPINGS)
  axis_name = _validation.check_axis_name(axis_name)
  if curvature == "sampled_fisher" and key is None:
    raise ValueError(
        "curvature='sampled_fisher' draws targets from the model: pass"
        " `key=jax.random.key(...)`.")
  plan = _plan(params, max_block_size, grouping)
  leaves, treedef = jax.tree.flatten(params)
  blocks = ()
  if plan.groups:
    lin = _products.linearize(predict_fn, loss, params, batch,
                              curvature=curvature, targets_fn=targets_fn,
                              key=key, num_samples=num_samples,
                              axis_name=axis_name)
    blocks = tuple(_dense_block(lin.matvec, leaves, treedef, g, chunk_size)
                   for g in plan.groups)
  diagonal = [None] * len(leaves)
  if plan.diagonal:
    values = _fallback_diagonal(curvature, predict_fn, loss, params, batch,
                                plan.diagonal, key, num_samples, targets_fn,
                                axis_name)
    for i, d in zip(plan.diagonal, values):
      diagonal[i] = d.astype(leaves[i].dtype)
  return BlockDiagonalCurvature(blocks, tuple(diagonal))


# Blocks -----------------------------------------------------------------------


def _core_blocks(plan, params):
  """``{"index": dense Block}`` and the fallback diagonal Block of ``plan``."""
  leaves = jax.tree.leaves(params)
  dense = {
      str(index): _blocks.dense_block(
          group, sum(leaves[i].size for i in group),
          _group_dtype(leaves, group))
      for index, group in enumerate(plan.groups)}
  diagonal = _blocks.diagonal_block(
      plan.diagonal, tuple(leaves[i].shape for i in plan.diagonal),
      tuple(leaves[i].dtype for i in plan.diagonal),
      like=tuple(leaves[i] for i in plan.diagonal))
  return dense, diagonal


def scale_by_block_diagonal(
    predict_fn: Callable[[Params, Any], Array],
    loss: _losses.Loss,
    *,
    curvature: str = "fisher",
    max_block_size: int = 1024,
    grouping: str = "leaf",
    damping: float = 1e-3,
    decay: float = 0.95,
    inverse_every: int = 1,
    num_samples: int = 1,
    statistics_batch_size: Optional[int] = None,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    chunk_size: int = 128,
    seed: int = 0,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Block-diagonal natural-gradient / Gauss-Newton direction (TONGA-style).

  .. math::
    \hat C_b = \frac{\text{EMA}_\beta(C_b)}{1 - \beta^t}, \qquad
    u_b = (\hat C_b + \lambda I)^{-1} g_b \ \text{(dense groups)}, \qquad
    u_i = \frac{g_i}{\hat d_i + \lambda} \ \text{(the other leaves)}

  with ``C_b`` the exact block of the chosen curvature on one group of
  parameters (:func:`block_diagonal_curvature`): ``"fisher"`` (exact true
  Fisher), ``"sampled_fisher"`` (Monte-Carlo true Fisher, ``num_samples``
  targets per example drawn from the model), ``"empirical_fisher"``
  (gradient outer products with the data's labels, the statistic of TONGA)
  or ``"ggn"``. A group is a leaf (``grouping="leaf"``) or a layer's leaves
  (``"layer"``, leaves sharing a path prefix such as ``Dense_0/kernel`` and
  ``Dense_0/bias``); a group larger than ``max_block_size`` is split into its
  leaves, and a leaf larger than ``max_block_size`` falls back to the
  diagonal ``d̂`` of the same curvature. :func:`block_diagonal_summary` prints
  which leaf got a dense block and which fell back, and why.

  The blocks and diagonals are EMAs (``decay``, 0.95) with the shared bias
  correction (:func:`curvature.debias`) over the first
  ``statistics_batch_size`` examples of each batch. The damped inverses
  ``(Ĉ_b + λI)⁻¹`` (Cholesky) are refreshed every ``inverse_every`` steps,
  from step 0, under ``lax.cond`` inside the jitted step; between refreshes
  the last inverse is used (the diagonal fallback uses the current ``d̂``).
  The output has no minus sign: chain a learning rate
  (:func:`block_diagonal_natural_gradient` does).

  Cost per step: ``Σ_b b`` curvature-vector products for the blocks (each a
  JVP and a VJP on the statistics batch), the per-example passes of the
  diagonal estimator for the fallback leaves, and ``Σ_b b³`` per refresh;
  memory ``Σ_b b²`` for the EMA blocks and as much for the inverses.

  **Non-finite values.** A non-finite statistic is discarded (the EMA keeps
  its value; ``rejected_statistics`` counts it); a non-finite inverse keeps
  the previous one; a non-finite gradient or direction gives a zero update
  (``rejected_steps``).

  **Data parallelism.** Inside ``jax.shard_map`` pass ``axis_name``; see
  the README's "Data parallelism" and "``shard_map``" sections. Under plain
  ``jit`` leave it ``None``.

  Args:
    predict_fn: ``(params, batch) -> outputs`` with a leading batch axis.
    loss: a loss from :mod:`curvature.losses`.
    curvature: one of :data:`BLOCK_CURVATURES`.
    max_block_size: largest dense block side ``b``; larger leaves fall back
      to the diagonal (a Python int).
    grouping: ``"leaf"`` (a block per leaf) or ``"layer"`` (a block per
      layer where it fits).
    damping: ``λ > 0``, Tikhonov damping of every block and diagonal.
    decay: EMA decay ``β`` of the statistics (0.95, as K-FAC).
    inverse_every: ``T``, steps between refreshes of the inverses.
    num_samples: sampled targets per example for ``"sampled_fisher"``.
    statistics_batch_size: leading examples of each batch for the
      statistics (``None``: all).
    targets_fn: finds the targets in a batch.
    chunk_size: basis vectors multiplied at once when building a block.
    seed: PRNG seed (kept in the state).
    axis_name: for ``jax.shard_map``: the mesh axis name (str or tuple of
      str) the batch is sharded over; see *Data parallelism*.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`ScaleByBlockDiagonalState`; call
    ``update(grads, state, params, batch=batch)``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> def predict(params, batch):
    ...   hidden = jnp.tanh(batch["inputs"] @ params[0]["w"] + params[0]["b"])
    ...   return hidden @ params[1]["w"] + params[1]["b"]
    >>> k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
    >>> params = [{"w": jax.random.normal(k0, (4, 5)), "b": jnp.zeros(5)},
    ...           {"w": jax.random.normal(k1, (5, 3)), "b": jnp.zeros(3)}]
    >>> batch = {"inputs": jax.random.normal(k2, (8, 4)),
    ...          "targets": jnp.arange(8) % 3}
    >>> import optax
    >>> loss = curvature.losses.softmax_cross_entropy
    >>> opt = optax.chain(
    ...     curvature.scale_by_block_diagonal(predict, loss, grouping="layer"),
    ...     optax.scale_by_learning_rate(0.1))
    >>> state = opt.init(params)
    >>> grads = jax.grad(
    ...     lambda p: loss.value(predict(p, batch), batch["targets"]))(params)
    >>> update = jax.jit(opt.update)
    >>> updates, state = update(grads, state, params, batch=batch)
    >>> [u["w"].shape for u in updates]
    [(4, 5), (5, 3)]
    >>> int(state[0].rejected_steps)
    0

  References:
    Le Roux, Manzagol & Bengio, "Topmoumoute online natural gradient
    algorithm", NIPS 2008 (TONGA: block-diagonal gradient covariance).

    Martens & Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML 2015 (block-diagonal approximations of the
    Fisher, §4).

    Amari, "Natural gradient works efficiently in learning", Neural
    Computation, 1998.
  """
  _validation.check_choice("curvature", curvature, BLOCK_CURVATURES)
  _validation.check_choice("grouping", grouping, GROUPINGS)
  _validation.check_positive(
      "damping", damping,
      "A block may be singular (fewer examples than parameters); use e.g."
      " 1e-3.")
  _blocks.check_averaging("ema", decay)
  max_block_size = _validation.check_static_int(
      "max_block_size", max_block_size, 1)
  inverse_every = _validation.check_static_int(
      "inverse_every", inverse_every, 1)
  num_samples = _validation.check_static_int("num_samples", num_samples, 1)
  chunk_size = _validation.check_static_int("chunk_size", chunk_size, 1)
  statistics_batch_size = _validation.check_optional_static_int(
      "statistics_batch_size", statistics_batch_size, 1)
  _losses.check_model(predict_fn, loss)
  axis_name = _validation.check_axis_name(axis_name)

  def init_fn(params):
    _validation.check_params(params, "scale_by_block_diagonal")
    dense, diagonal = _core_blocks(_plan(params, max_block_size, grouping),
                                   params)
    zero = jnp.zeros((), jnp.int32)
    return _sharding.commit_state(ScaleByBlockDiagonalState(
        count=zero, statistics_count=zero, key=jax.random.key(seed),
        blocks=tuple(b.init() for b in dense.values()),
        diagonal=diagonal.init(), rejected_steps=zero,
        rejected_statistics=zero, rejected_refreshes=zero), params)

  def update_fn(updates, state, params=None, *, batch=None, **extra_args):
    del extra_args
    _validation.check_update_args("scale_by_block_diagonal", updates, params,
                                  batch)
    assert params is not None  # check_update_args raised otherwise.
    _products.batch_size(batch, targets_fn)  # A clear error on a bad batch.
    plan = _plan(params, max_block_size, grouping)
    dense, diagonal = _core_blocks(plan, params)
    blocks = dict(dense, diagonal=diagonal)
    states = {str(i): s for i, s in enumerate(state.blocks)}
    states["diagonal"] = state.diagonal
    updates = _products.batch_mean(updates, axis_name)
    if statistics_batch_size is not None:
      batch = _products.take_examples(batch, statistics_batch_size)
    key, sample_key = jax.random.split(state.key)
    estimate = block_diagonal_curvature(
        predict_fn, loss, params, batch, curvature=curvature,
        max_block_size=max_block_size, grouping=grouping, key=sample_key,
        num_samples=num_samples, targets_fn=targets_fn, chunk_size=chunk_size,
        axis_name=axis_name)
    evidence = {str(i): b for i, b in enumerate(estimate.blocks)}
    evidence["diagonal"] = tuple(
        estimate.diagonal[i] for i in plan.diagonal)
    states, statistics_count, finite = _blocks.accumulate(
        blocks, states, evidence, state.statistics_count, decay, "ema")
    hats = _blocks.estimates(blocks, states, statistics_count, decay, "ema")
    states, rejected_refreshes = _blocks.refresh(
        blocks, states, {n: h.statistics for n, h in hats.items()},
        _blocks.refresh_due(state.count, inverse_every, warmup=False),
        damping, statistics_count)
    hats = _blocks.estimates(blocks, states, statistics_count, decay, "ema")
    treedef = jax.tree.structure(params)
    direction = treedef.unflatten(_blocks.precondition(
        blocks, hats, jax.tree.leaves(updates), damping))
    ok = (_validation.all_finite(updates)
          & _validation.all_finite(direction))
    output = optax.tree.cast_like(
        optax.tree.where(ok, direction, optax.tree.zeros_like(params)),
        params)
    return output, ScaleByBlockDiagonalState(
        count=_optax_typed.safe_increment(state.count),
        statistics_count=statistics_count, key=key,
        blocks=tuple(states[i] for i in dense), diagonal=states["diagonal"],
        rejected_steps=state.rejected_steps + (~ok).astype(jnp.int32),
        rejected_statistics=state.rejected_statistics
        + (~finite).astype(jnp.int32),
        rejected_refreshes=state.rejected_refreshes + rejected_refreshes)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def block_diagonal_natural_gradient(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    *,
    predict_fn: Callable[[Params, Any], Array],
    loss: _losses.Loss,
    momentum: float = 0.9,
    curvature: str = "fisher",
    max_block_size: int = 1024,
    grouping: str = "leaf",
    damping: float = 1e-3,
    decay: float = 0.95,
    inverse_every: int = 1,
    num_samples: int = 1,
    statistics_batch_size: Optional[int] = None,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    chunk_size: int = 128,
    seed: int = 0,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Block-diagonal natural gradient (TONGA-style) as an ``optax.chain``.

  .. math::
    v \leftarrow \mu v + \operatorname{blockdiag}(\hat C_b + \lambda I)^{-1} g,
    \qquad \theta \leftarrow \theta - \eta\, v

  With ``curvature="empirical_fisher"`` the blocks are the (uncentred)
  gradient covariance TONGA uses, kept exact and dense rather than low-rank.
  See :func:`scale_by_block_diagonal` for the direction and every argument.

  Args:
    learning_rate: ``η``, a scalar or schedule.
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    momentum: ``μ``, heavy-ball momentum (0 disables it).
    curvature: one of :data:`BLOCK_CURVATURES`.
    max_block_size: larger leaves fall back to the diagonal.
    grouping: ``"leaf"`` or ``"layer"``.
    damping: ``λ > 0``.
    decay: EMA decay of the statistics.
    inverse_every: steps between refreshes of the inverses.
    num_samples: sampled targets per example for ``"sampled_fisher"``.
    statistics_batch_size: leading examples used for the statistics.
    targets_fn: finds the targets in a batch.
    chunk_size: basis vectors multiplied at once.
    seed: PRNG seed.
    axis_name: for ``jax.shard_map``: the mesh axis the batch is sharded
      over (see :func:`scale_by_block_diagonal`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> def predict(params, batch):
    ...   hidden = jnp.tanh(batch["inputs"] @ params[0]["w"] + params[0]["b"])
    ...   return hidden @ params[1]["w"] + params[1]["b"]
    >>> k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
    >>> params = [{"w": jax.random.normal(k0, (4, 5)), "b": jnp.zeros(5)},
    ...           {"w": jax.random.normal(k1, (5, 3)), "b": jnp.zeros(3)}]
    >>> batch = {"inputs": jax.random.normal(k2, (8, 4)),
    ...          "targets": jnp.arange(8) % 3}
    >>> import optax
    >>> loss = curvature.losses.softmax_cross_entropy
    >>> opt = curvature.block_diagonal_natural_gradient(
    ...     0.1, predict_fn=predict, loss=loss, grouping="layer")
    >>> state = opt.init(params)
    >>> value_fn = lambda p: loss.value(predict(p, batch), batch["targets"])
    >>> @jax.jit
    ... def step(params, state):
    ...   grads = jax.grad(value_fn)(params)
    ...   updates, state = opt.update(grads, state, params, batch=batch)
    ...   return optax.apply_updates(params, updates), state
    >>> before = value_fn(params)
    >>> for _ in range(3):
    ...   params, state = step(params, state)
    >>> bool(value_fn(params) < before)
    True

  References:
    Le Roux, Manzagol & Bengio, "Topmoumoute online natural gradient
    algorithm", NIPS 2008.

    Martens & Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML 2015.

    Amari, "Natural gradient works efficiently in learning", Neural
    Computation, 1998.
  """
  _validation.check_learning_rate(learning_rate)
  parts: list[optax.GradientTransformation] = [scale_by_block_diagonal(
      predict_fn, loss, curvature=curvature, max_block_size=max_block_size,
      grouping=grouping, damping=damping, decay=decay,
      inverse_every=inverse_every, num_samples=num_samples,
      statistics_batch_size=statistics_batch_size, targets_fn=targets_fn,
      chunk_size=chunk_size, seed=seed, axis_name=axis_name)]
  if not (isinstance(momentum, (int, float)) and momentum == 0):
    parts.append(_momentum.scale_by_momentum(momentum))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)
