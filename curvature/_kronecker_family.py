r"""Shampoo, SOAP and EKFAC: the Kronecker family on the block core.

All three are the Kronecker structure of K-FAC with another statistic, power
or basis (see :mod:`curvature._blocks`):

========= ================================= ============================ ======
optimizer statistic                          structure                    power
========= ================================= ============================ ======
K-FAC     true Fisher (layer taps)           ``Ā ⊗ G``                    −1
EKFAC     true Fisher (layer taps)           eigenbasis + re-fitted diag  −1
Shampoo   empirical Fisher (``GGᵀ, GᵀG``)    ``L ⊗ R``                    −1/4
SOAP      empirical Fisher (``GGᵀ, GᵀG``)    eigenbasis + Adam's diagonal −1/2
========= ================================= ============================ ======

Shampoo and SOAP act on the gradient alone (no ``predict_fn``): each leaf of
rank ≥ 2 is viewed as the matrix ``[prod(shape[:-1]), shape[-1]]`` (a dense
kernel as it is, an HWIO convolution kernel as ``[H·W·I, O]``). Leaves of rank
< 2, or with a side larger than ``max_factor_dim``, fall back to a diagonal
update (:func:`kronecker_family_summary` lists them with the reason).

A step whose gradient is not finite is rejected whole: the output is zero,
and no statistic, moment, graft state or step counter moves
(``rejected_steps`` counts it), so the next finite step is the step the
optimizer would have taken without it.
"""

import inspect
import typing
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from curvature import _blocks
from curvature import _grafting
from curvature import _kfac
from curvature import _momentum
from curvature import _products
from curvature import _sharding
from curvature import _validation

Array = jax.Array
Params = Any


# Shared by Shampoo and SOAP ---------------------------------------------------


def _matrix_leaves(params, max_factor_dim):
  """``{path: (leaf index, rows, cols)}`` of the leaves viewed as matrices."""
  out = {}
  for i, (path, leaf) in enumerate(zip(_blocks.leaf_paths(params),
                                       jax.tree.leaves(params))):
    dims = _blocks.matrix_shape(leaf.shape)
    if dims is not None and max(dims) <= max_factor_dim:
      out[path] = (i, *dims)
  return out


def _fallback_reason(shape, max_factor_dim):
  dims = _blocks.matrix_shape(shape)
  if dims is None:
    return f"rank {len(shape)} < 2: diagonal update"
  return (f"matrix view {dims[0]}x{dims[1]} has a side above max_factor_dim="
          f"{max_factor_dim}: diagonal update")


def kronecker_family_summary(params: Params, *,
                             max_factor_dim: int = 4096) -> str:
  """Which leaves :func:`scale_by_shampoo` / :func:`scale_by_soap` factor.

  Args:
    params: the parameters (only shapes matter).
    max_factor_dim: as given to the transform.

  Returns:
    A printable table: per leaf, the Kronecker factor sizes or the reason it
    falls back to a diagonal update.

  Example:
    >>> import jax.numpy as jnp, curvature
    >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    >>> print(curvature.kronecker_family_summary(params))
    b  (3,)      diagonal   rank 1 < 2: diagonal update
    w  (4, 3)    kronecker  L 4x4, R 3x3
  """
  matrices = _matrix_leaves(params, max_factor_dim)
  paths = _blocks.leaf_paths(params)
  width = max(len(p) for p in paths)
  lines = []
  for path, leaf in zip(paths, jax.tree.leaves(params)):
    if path in matrices:
      _, rows, cols = matrices[path]
      kind, detail = "kronecker", f"L {rows}x{rows}, R {cols}x{cols}"
    else:
      kind, detail = "diagonal", _fallback_reason(leaf.shape, max_factor_dim)
    lines.append(f"{path:<{width}}  {str(tuple(leaf.shape)):<8}  {kind:<9}"
                 f"  {detail}")
  return "\n".join(lines)


def gradient_factors(view: _blocks.MatrixView):
  """Shampoo's statistic of one leaf: ``(G Gᵀ, Gᵀ G)`` of its gradient."""

  def statistics(leaves):
    matrix = view.to_matrix(leaves)
    matrix = matrix.astype(_blocks.accumulation_dtype(matrix.dtype))
    return _blocks.KroneckerFactors(_sharding.gram(matrix.T),
                                    _sharding.gram(matrix))

  return statistics


def _check_family(max_factor_dim, inverse_every, statistics_decay):
  max_factor_dim = _validation.check_static_int(
      "max_factor_dim", max_factor_dim, 1)
  inverse_every = _validation.check_static_int(
      "inverse_every", inverse_every, 1)
  if statistics_decay is not None:
    _validation.check_in_interval("statistics_decay", statistics_decay, 0.0,
                                  1.0)
  return max_factor_dim, inverse_every


def _plan(params, max_factor_dim, matrix_block, power, damping_in_root):
  """``{path: Block}`` of the matrix leaves, and the fallback ``"diagonal"``.

  The fallback leaves get ``x / ((d + λ_in)^power + λ_out)`` with ``d`` the
  average of their squared gradients.
  """
  matrices = _matrix_leaves(params, max_factor_dim)
  leaves = jax.tree.leaves(params)
  blocks = {}
  for path, (i, rows, cols) in matrices.items():
    dtype = _blocks.accumulation_dtype(leaves[i].dtype)
    blocks[path] = matrix_block(i, rows, cols, dtype)
  covered = {i for i, _, _ in matrices.values()}
  fallback = tuple(i for i in range(len(leaves)) if i not in covered)
  diagonal = _blocks.diagonal_block(
      fallback, tuple(leaves[i].shape for i in fallback),
      tuple(_blocks.accumulation_dtype(leaves[i].dtype) for i in fallback),
      power=power, damping_in_root=damping_in_root,
      like=tuple(leaves[i] for i in fallback))
  square = lambda grads: tuple(
      g.astype(_blocks.accumulation_dtype(g.dtype)) ** 2 for g in grads)
  blocks["diagonal"] = diagonal._replace(statistics=square)
  return blocks


def _init_states(blocks, params):
  """``({path: BlockState}, the diagonal's BlockState)``.

  A re-fitted diagonal (SOAP) is split like its leaf's last axis on an
  Explicit mesh (:func:`curvature._sharding.split_like_last_axis`).
  """
  leaves = jax.tree.leaves(params)
  states = {}
  for name, block in blocks.items():
    state = block.init()
    if name != "diagonal":
      leaf = leaves[block.leaves[0]]
      state = state._replace(refit=jax.tree.map(
          lambda r, leaf=leaf: _sharding.split_like_last_axis(r, leaf),
          state.refit))
    states[name] = state
  return states, states.pop("diagonal")


def _evidence(blocks, fallback, leaves):
  """Each block's evidence is its leaves' gradient."""
  evidence = {name: tuple(leaves[i] for i in block.leaves)
              for name, block in blocks.items()}
  evidence["diagonal"] = tuple(leaves[i] for i in fallback)
  return evidence


def _guard(ok, output, params):
  zeros = optax.tree.zeros_like(output)
  return optax.tree.cast_like(optax.tree.where(ok, output, zeros), params)


def _keep_if(ok, new, old):
  return jax.tree.map(lambda x, y: jnp.where(ok, x, y), new, old)


# Shampoo ----------------------------------------------------------------------


class ScaleByShampooState(NamedTuple):
  """State of :func:`scale_by_shampoo`.

  Attributes:
    count: accepted steps (a rejected step does not count).
    blocks: ``{leaf path: BlockState}`` of the leaves viewed as matrices:
      the statistics ``(L, R)`` and the inverse roots of the last refresh.
    diagonal: the fallback leaves' diagonal statistic (``None`` graft).
    graft: the graft transform's state (``()`` without one).
    rejected_steps: steps rejected because the gradient was not finite.
    rejected_refreshes: inverse roots discarded because they were not
      finite (the previous ones were kept).
  """

  count: Array
  blocks: dict
  diagonal: _blocks.BlockState
  graft: Any
  rejected_steps: Array
  rejected_refreshes: Array


def _check_power(power):
  concrete = _validation.concrete_value(power)
  if concrete is None:
    return
  if not (-1.0 < float(concrete) < 0.0):
    raise ValueError(
        f"`power` must lie in (-1, 0), the exponent of each Kronecker factor,"
        f" got {power!r}. Shampoo uses -1/4 per side for a matrix"
        " (Gupta et al. 2018); -1/2 makes each side an inverse square root.")


def scale_by_shampoo(
    *,
    power: float = -0.25,
    damping: float = 1e-6,
    statistics_decay: Optional[float] = None,
    inverse_every: int = 10,
    graft: Optional[optax.GradientTransformation] = None,
    max_factor_dim: int = 4096,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformation:
  r"""Shampoo's direction (Gupta, Koren & Singer 2018), grafted if asked.

  For each leaf viewed as a matrix ``G`` of shape ``[m, n]``:

  .. math::
    L_t = L_{t-1} + G_t G_t^\top, \quad R_t = R_{t-1} + G_t^\top G_t, \qquad
    U_t = (L_t + \epsilon I)^{p}\, G_t\, (R_t + \epsilon I)^{p}

  (``statistics_decay=β``: ``L ← βL + (1−β)GGᵀ`` instead, no bias
  correction). With ``p = −1/4``, running sums and a refresh every step this
  is Algorithm 1 of Gupta et al. with ``L₀ = εI``. The inverse roots are
  formed by ``eigh`` every ``inverse_every`` accepted steps (from the
  statistics just updated; Anil et al. 2020) under ``lax.cond`` and reused in
  between.

  **Grafting** (Agarwal et al. 2020; Anil et al. 2020): with ``graft`` an
  optax transform (e.g. ``optax.scale_by_adam(b1=0.0)``), each matrix leaf's
  ``U`` is rescaled to the Frobenius norm of the graft's direction for that
  leaf, ``U·‖A‖/‖U‖``, so Shampoo chooses the direction and the graft the
  step size. The fallback leaves (rank < 2, or a side above
  ``max_factor_dim``) take the graft's direction; without a graft they take
  the diagonal of the same statistic with the tensor-order-one power
  ``2p``: ``(d + ε)^{2p} g``, ``d = Σ g²``.

  Args:
    power: ``p ∈ (−1, 0)``, the exponent of each factor (−1/4).
    damping: ``ε ≥ 0`` added to each factor before the power.
    statistics_decay: ``None`` (running sums, Algorithm 1) or ``β ∈ [0,
      1)`` (an EMA of the statistics).
    inverse_every: accepted steps between refreshes of the inverse roots.
    graft: an optax transform whose per-leaf norms the direction takes, or
      ``None``.
    max_factor_dim: leaves with a larger side fall back to the diagonal.
    axis_name: inside ``jax.shard_map``, the mesh axis the batch is sharded
      over: the incoming gradient is ``pmean``-ed over it first, so every
      device keeps the same statistics. ``None`` under plain ``jit``.

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`ScaleByShampooState`.

  Example:
    >>> import jax.numpy as jnp, optax, curvature
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> opt = optax.chain(curvature.scale_by_shampoo(inverse_every=1),
    ...                   optax.scale_by_learning_rate(0.1))
    >>> state = opt.init(params)
    >>> grads = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    >>> updates, state = opt.update(grads, state, params)

  References:
    Gupta, Koren & Singer, "Shampoo: Preconditioned stochastic tensor
    optimization", ICML 2018. Anil, Gupta, Koren, Regan & Singer, "Scalable
    second order optimization for deep learning", 2020. Agarwal, Anil,
    Hazan, Koren & Zhang, "Disentangling adaptive gradient methods from
    learning rates", 2020 (grafting).
  """
  _check_power(power)
  axis_name = _validation.check_axis_name(axis_name)
  _validation.check_nonnegative("damping", damping,
                                "Use a small epsilon such as 1e-6.")
  max_factor_dim, inverse_every = _check_family(
      max_factor_dim, inverse_every, statistics_decay)
  if graft is not None and not isinstance(graft,
                                          optax.GradientTransformation):
    raise TypeError(
        f"`graft` must be an optax.GradientTransformation, got {graft!r}."
        " Pass e.g. graft=optax.scale_by_adam(b1=0.0), or None.")
  mode = "sum" if statistics_decay is None else "uncorrected_ema"
  decay = 1.0 if statistics_decay is None else statistics_decay

  def matrix_block(i, rows, cols, dtype):
    view = _blocks.reshape_view()
    return _blocks.kronecker_block(
        (i,), rows, cols, dtype, statistics=gradient_factors(view),
        inverse=_blocks.factor_roots(power), view=view)

  def plan(params):
    return _plan(params, max_factor_dim, matrix_block, -2.0 * power, True)

  def init_fn(params):
    _validation.check_params(params, "scale_by_shampoo")
    states, diagonal = _init_states(plan(params), params)
    zero = jnp.zeros((), jnp.int32)
    return _sharding.commit_state(ScaleByShampooState(
        count=zero, blocks=states, diagonal=diagonal,
        graft=() if graft is None else graft.init(params),
        rejected_steps=zero, rejected_refreshes=zero), params)

  def update_fn(updates, state, params=None):
    updates = _products.batch_mean(updates, axis_name)
    blocks = plan(updates)
    leaves, treedef = jax.tree.flatten(updates)
    ok = _validation.all_finite(updates)
    # 1. Statistics, then the roots (every `inverse_every` accepted steps).
    states = dict(state.blocks, diagonal=state.diagonal)
    states, count, _ = _blocks.accumulate(
        blocks, states, _evidence(blocks, blocks["diagonal"].leaves, leaves),
        state.count, decay, mode, ok)
    hats = _blocks.estimates(blocks, states, count, decay, mode)
    states, rejected = _blocks.refresh(
        blocks, states, {n: h.statistics for n, h in hats.items()},
        (state.count % inverse_every == 0) & ok, damping, count)
    hats = _blocks.estimates(blocks, states, count, decay, mode)
    # 2. Precondition, then graft the norms.
    if graft is None:
      direction = _blocks.precondition(blocks, hats, leaves, damping)
      graft_state = ()
    else:
      grafted, graft_state = graft.update(updates, state.graft, params)
      graft_state = _keep_if(ok, graft_state, state.graft)
      direction = _graft(blocks, hats, leaves, jax.tree.leaves(grafted),
                         damping)
    output = _guard(ok, treedef.unflatten(direction), updates)
    return output, ScaleByShampooState(
        count=count, graft=graft_state,
        **_next_block_fields(state, states, ok, rejected))

  return optax.GradientTransformation(init_fn, update_fn)


def _next_block_fields(state, states, ok, rejected) -> dict:
  """The state fields Shampoo and SOAP share, after a step.

  ``states`` holds the blocks' new states by name (``"diagonal"`` too);
  ``ok`` says whether the gradient was finite, and ``rejected`` counts the
  refreshes whose result was not.
  """
  return dict(
      blocks={n: states[n] for n in state.blocks},
      diagonal=states["diagonal"],
      rejected_steps=state.rejected_steps + (~ok).astype(jnp.int32),
      rejected_refreshes=state.rejected_refreshes + rejected)


def _graft(blocks, hats, leaves, grafted, damping):
  """Matrix leaves: Shampoo's direction at the graft's norm; others: graft."""
  matrices = {n: b for n, b in blocks.items() if b.kind == "kronecker"}
  direction = _blocks.precondition(matrices, hats, leaves, damping)
  out = list(grafted)
  for block in matrices.values():
    (i,) = block.leaves
    out[i] = _grafting.rescale(direction[i], grafted[i])
  return out


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    power: float = -0.25,
    damping: float = 1e-6,
    statistics_decay: Optional[float] = 0.999,
    inverse_every: int = 10,
    graft: Optional[optax.GradientTransformation] = None,
    max_factor_dim: int = 4096,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformation:
  r"""Shampoo with Adam grafting and heavy-ball momentum, as an ``optax.chain``.

  .. math::
    u = \text{graft}_{\text{Adam}}\big((L+\epsilon I)^{p} G (R+\epsilon
    I)^{p}\big), \quad v \leftarrow b_1 v + u, \quad
    \theta \leftarrow \theta - \eta v

  ``graft`` defaults to ``optax.scale_by_adam(b1=0.0, b2=b2, eps=eps)`` (Adam
  grafting without momentum, applied before the momentum, as in the
  distributed Shampoo of Anil et al.). See :func:`scale_by_shampoo`.

  Args:
    learning_rate: a scalar or schedule.
    b1: heavy-ball momentum on the grafted direction (0 disables it).
    b2: the Adam graft's second-moment decay.
    eps: the Adam graft's epsilon, > 0.
    power: exponent of each factor.
    damping: ``ε`` of the factors.
    statistics_decay: EMA decay of the statistics (``None``: running sums).
    inverse_every: steps between refreshes of the inverse roots.
    graft: another graft transform instead of Adam's.
    max_factor_dim: larger leaves fall back to the graft.
    axis_name: for ``jax.shard_map`` (see :func:`scale_by_shampoo`).

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, curvature
    >>> opt = curvature.shampoo(1e-3)
    >>> state = opt.init({"w": jnp.ones((3, 2))})

  References:
    Gupta, Koren & Singer, ICML 2018; Anil et al., "Scalable second order
    optimization for deep learning", 2020.
  """
  _validation.check_learning_rate(learning_rate)
  if graft is None:
    _validation.check_in_interval("b2", b2, 0.0, 1.0)
    # Adam's update m / (√v + ε) is 0/0 where a gradient is exactly zero.
    _validation.check_positive(
        "eps", eps, "The Adam graft divides by √v + eps, 0/0 at a zero "
        "gradient: pass eps > 0 (default 1e-8), or a `graft=` of your own.")
    graft = optax.scale_by_adam(b1=0.0, b2=b2, eps=eps)
  parts = [scale_by_shampoo(
      power=power, damping=damping, statistics_decay=statistics_decay,
      inverse_every=inverse_every, graft=graft,
      max_factor_dim=max_factor_dim, axis_name=axis_name)]
  if not (isinstance(b1, (int, float)) and b1 == 0):
    parts.append(_momentum.scale_by_momentum(b1))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


# SOAP -------------------------------------------------------------------------


class ScaleBySoapState(NamedTuple):
  """State of :func:`scale_by_soap`.

  Attributes:
    count: accepted steps (a rejected step does not count).
    blocks: ``{leaf path: BlockState}`` of the leaves viewed as matrices:
      the statistics ``(L, R)``, the eigenbasis of the last refresh, and the
      raw EMA of the squared rotated gradient (Adam's second moment in that
      basis).
    diagonal: the fallback leaves' raw second moment (plain Adam).
    momentum: raw EMA of the gradient (Adam's first moment), in the
      parameters' own basis, so it is carried unchanged across refreshes.
    rejected_steps: steps rejected because the gradient was not finite.
    rejected_refreshes: eigenbases discarded because they were not finite.
  """

  count: Array
  blocks: dict
  diagonal: _blocks.BlockState
  momentum: Params
  rejected_steps: Array
  rejected_refreshes: Array


def _rotated_square(view):
  """SOAP's re-fit: the batch gradient rotated into the basis, squared."""

  def refit(leaves, basis):
    matrix = view.to_matrix(leaves)
    matrix = matrix.astype(basis.basis_a.dtype)
    return _blocks.rotate(basis, matrix) ** 2

  return refit


def scale_by_soap(
    *,
    b1: float = 0.95,
    b2: float = 0.95,
    eps: float = 1e-8,
    statistics_decay: Optional[float] = None,
    inverse_every: int = 10,
    max_factor_dim: int = 4096,
    weight_decay: float = 0.0,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformation:
  r"""SOAP's direction: Adam in the eigenbasis of Shampoo (Vyas et al. 2024).

  For each leaf viewed as a matrix ``G`` (at accepted step ``k = t + 1``):

  .. math::
    L \leftarrow \beta_s L + (1-\beta_s) G G^\top, \quad
    R \leftarrow \beta_s R + (1-\beta_s) G^\top G, \quad
    Q_L, Q_R = \operatorname{eigh}(L), \operatorname{eigh}(R)
    \ \text{every } f \text{ steps}

  .. math::
    M \leftarrow b_1 M + (1-b_1) G, \quad
    V \leftarrow b_2 V + (1-b_2) (Q_L^\top G Q_R)^{2}, \quad
    U = Q_L \frac{Q_L^\top \hat M Q_R}{\sqrt{\hat V} + \epsilon} Q_R^\top

  with ``M̂ = M/(1−b₁ᵏ)``, ``V̂ = V/(1−b₂ᵏ)``. As in the paper, ``M`` lives
  in the parameters' basis and ``V`` in the rotated one, both carried across
  refreshes unchanged. One difference from the paper's code: the statistics
  are updated before the refresh, so the first step already has a basis
  (the reference code skips the first update instead). Fallback leaves (rank
  < 2, a side above ``max_factor_dim``) get Adam itself (``Q = I``).

  Args:
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon (outside the root).
    statistics_decay: ``β_s`` of ``L`` and ``R`` (``None``: ``b2``).
    inverse_every: ``f``, accepted steps between eigenbasis refreshes (10).
    max_factor_dim: larger leaves fall back to Adam.
    weight_decay: decoupled weight decay ``w`` (``U + wθ``, as
      ``optax.add_decayed_weights``), inside the transform so that a
      rejected step does not decay the weights either.
    axis_name: inside ``jax.shard_map``, the mesh axis the batch is sharded
      over: the incoming gradient is ``pmean``-ed over it first.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleBySoapState`.

  Example:
    >>> import jax.numpy as jnp, optax, curvature
    >>> opt = optax.chain(curvature.scale_by_soap(),
    ...                   optax.scale_by_learning_rate(3e-3))
    >>> state = opt.init({"w": jnp.ones((3, 3))})

  References:
    Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson & Kakade,
    "SOAP: Improving and stabilizing Shampoo using Adam", 2024. Kingma & Ba,
    "Adam: A method for stochastic optimization", ICLR 2015.
  """
  for name, value in (("b1", b1), ("b2", b2)):
    _validation.check_in_interval(name, value, 0.0, 1.0)
  _validation.check_nonnegative("eps", eps, "Adam's epsilon, e.g. 1e-8.")
  _validation.check_nonnegative("weight_decay", weight_decay)
  axis_name = _validation.check_axis_name(axis_name)
  max_factor_dim, inverse_every = _check_family(
      max_factor_dim, inverse_every, statistics_decay)
  decay = b2 if statistics_decay is None else statistics_decay

  def matrix_block(i, rows, cols, dtype):
    view = _blocks.reshape_view()
    return _blocks.eigen_kronecker_block(
        (i,), rows, cols, dtype, statistics=gradient_factors(view),
        refit=_rotated_square(view), view=view, power=0.5,
        damping_in_root=False)

  def plan(params):
    return _plan(params, max_factor_dim, matrix_block, 0.5, False)

  def init_fn(params):
    _validation.check_params(params, "scale_by_soap")
    states, diagonal = _init_states(plan(params), params)
    zero = jnp.zeros((), jnp.int32)
    return _sharding.commit_state(ScaleBySoapState(
        count=zero, blocks=states, diagonal=diagonal,
        momentum=jax.tree.map(
            lambda x: jnp.zeros_like(
                x, dtype=_blocks.accumulation_dtype(x.dtype)),
            params),
        rejected_steps=zero, rejected_refreshes=zero), params)

  def update_fn(updates, state, params=None):
    updates = _products.batch_mean(updates, axis_name)
    blocks = plan(updates)
    matrices = {n: b for n, b in blocks.items() if n != "diagonal"}
    leaves, treedef = jax.tree.flatten(updates)
    ok = _validation.all_finite(updates)
    evidence = _evidence(blocks, blocks["diagonal"].leaves, leaves)
    states = dict(state.blocks, diagonal=state.diagonal)
    # 1. L and R (and the fallback's second moment, Adam's own EMA).
    states, count, _ = _blocks.accumulate(
        matrices, states, evidence, state.count, decay, "uncorrected_ema", ok)
    states, _, _ = _blocks.accumulate(
        {"diagonal": blocks["diagonal"]}, states, evidence, state.count, b2,
        "ema", ok)
    # 2. The eigenbasis, every `inverse_every` accepted steps.
    states, rejected = _blocks.refresh(
        matrices, states, {n: states[n].statistics for n in matrices},
        (state.count % inverse_every == 0) & ok, 0.0, count)
    # 3. Adam's moments: M in the parameters' basis, V in the rotated one.
    states = _blocks.refit(matrices, states, evidence, count, b2, "ema", ok)
    momentum = _keep_if(ok, _blocks.average(
        state.momentum, updates, count, b1, "ema"), state.momentum)
    hats = _blocks.estimates(matrices, states, count, decay,
                             "uncorrected_ema", b2, "ema")
    hats["diagonal"] = _blocks.estimates(
        {"diagonal": blocks["diagonal"]}, states, count, b2, "ema")[
            "diagonal"]
    first = jax.tree.leaves(_blocks.estimate(momentum, count, b1, "ema"))
    direction = treedef.unflatten(
        _blocks.precondition(blocks, hats, first, eps))
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
      if params is None:
        raise ValueError("scale_by_soap(weight_decay > 0) needs the params:"
                         " call update(grads, state, params).")
      direction = optax.tree.add_scale(direction, weight_decay, params)
    output = _guard(ok, direction, updates)
    return output, ScaleBySoapState(
        count=count, momentum=momentum,
        **_next_block_fields(state, states, ok, rejected))

  return optax.GradientTransformation(init_fn, update_fn)


def soap(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.95,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    statistics_decay: Optional[float] = None,
    inverse_every: int = 10,
    max_factor_dim: int = 4096,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformation:
  r"""SOAP (Vyas et al. 2024) as an ``optax.chain``, like ``optax.adamw``.

  .. math::
    \theta \leftarrow \theta - \eta\,(U_{\text{SOAP}} + w\,\theta)

  The same as ``optax.chain(scale_by_soap(...), optax.add_decayed_weights(w),
  optax.scale_by_learning_rate(lr))``, except that a rejected (non-finite)
  step does not decay the weights either. See :func:`scale_by_soap`. The
  defaults are the paper's (``b1 = b2 = 0.95``, a refresh every 10 steps).

  Args:
    learning_rate: a scalar or schedule.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: Adam's epsilon.
    weight_decay: decoupled weight decay ``w``.
    statistics_decay: decay of ``L`` and ``R`` (``None``: ``b2``).
    inverse_every: steps between eigenbasis refreshes.
    max_factor_dim: larger leaves fall back to Adam.
    axis_name: for ``jax.shard_map`` (see :func:`scale_by_soap`).

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, curvature
    >>> opt = curvature.soap(3e-3, weight_decay=0.01)
    >>> state = opt.init({"w": jnp.ones((3, 3))})

  References:
    Vyas et al., "SOAP: Improving and stabilizing Shampoo using Adam", 2024.
  """
  _validation.check_learning_rate(learning_rate)
  return optax.chain(
      scale_by_soap(b1=b1, b2=b2, eps=eps, statistics_decay=statistics_decay,
                    inverse_every=inverse_every,
                    max_factor_dim=max_factor_dim, weight_decay=weight_decay,
                    axis_name=axis_name),
      optax.scale_by_learning_rate(learning_rate))


# EKFAC ------------------------------------------------------------------------


def ekfac(learning_rate: optax.ScalarOrSchedule = 1e-3, **kfac_args
          ) -> optax.GradientTransformationExtraArgs:
  r"""EKFAC (George et al. 2018): K-FAC's eigenbasis with a re-fitted diagonal.

  .. math::
    \Delta = Q_A\Big[\frac{Q_A^\top \nabla_{\bar W} h\, Q_G}{s + \gamma^2}
    \Big] Q_G^\top, \qquad
    s = \tfrac{1}{NS}\textstyle\sum_{i,s}
        \big(Q_A^\top \nabla_{\bar W} \ell_{is}\, Q_G\big)^{2}

  ``curvature.kfac(..., structure="eigen_kronecker")``: the eigenbases of
  ``Ā`` and ``G`` are refreshed with K-FAC's schedule; the diagonal ``s`` is
  re-fitted every step from per-example gradients projected into them (the
  recorded layer inputs and output gradients; the mini-batch gradient is not
  enough). It takes every argument of :func:`curvature.kfac` but
  ``structure`` (its signature is K-FAC's, so
  :func:`curvature.inject_hyperparams` sees the same static arguments).

  Args:
    learning_rate: a scalar or schedule.
    **kfac_args: ``predict_fn``, ``loss`` and any other keyword argument of
      :func:`curvature.kfac`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, curvature
    >>> predict = lambda p, b: b["inputs"] @ p["w"]
    >>> params = {"w": jnp.zeros((4, 3))}
    >>> batch = {"inputs": jnp.ones((8, 4)), "targets": jnp.zeros(8, int)}
    >>> opt = curvature.ekfac(1e-2, predict_fn=predict,
    ...                       loss=curvature.losses.softmax_cross_entropy)
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones((4, 3))}, state, params,
    ...                             batch=batch)

  References:
    George, Laurent, Bouthillier, Ballas & Vincent, "Fast approximate natural
    gradient descent in a Kronecker-factored eigenbasis", NeurIPS 2018.
  """
  if "structure" in kfac_args:
    raise TypeError("ekfac fixes structure='eigen_kronecker'; use"
                    " curvature.kfac for the other structures.")
  return _kfac.kfac(learning_rate, structure="eigen_kronecker", **kfac_args)


# inspect.signature reads __signature__, which typeshed's FunctionType lacks.
typing.cast(Any, ekfac).__signature__ = inspect.signature(_kfac.kfac).replace(
    parameters=[
        p for p in inspect.signature(_kfac.kfac).parameters.values()
        if p.name != "structure"])
