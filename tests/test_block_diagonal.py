"""Block-diagonal curvature: blocks vs dense matrices (exact and in
expectation), diagonal fallback, dense block solve, cosine to the natural
gradient, stale inverses, non-finite rejection, summary, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature
from curvature import losses
from helpers import classification_problem
from helpers import dense_empirical_fisher
from helpers import dense_ggn
from helpers import dense_softmax_fisher
from helpers import flat
from helpers import mlp_predict
from helpers import regression_problem

CE = losses.softmax_cross_entropy
SE = losses.squared_error
# sizes (4, 5, 3): leaves 0/b (5), 0/w (20), 1/b (3), 1/w (15). With a cap of
# 15, 0/w falls back to the diagonal and the three others get dense blocks.
CAP = 15


def _grads(params, batch, loss=CE):
  return jax.grad(lambda p: loss.value(mlp_predict(p, batch),
                                       batch["targets"]))(params)


def _offsets(params):
  sizes = [x.size for x in jax.tree.leaves(params)]
  return np.concatenate([[0], np.cumsum(sizes)])


def _oracle(name, params, batch):
  if name == "ggn_squared_error":
    return dense_ggn(mlp_predict, SE, params, batch)
  if name == "ggn_softmax":
    return dense_ggn(mlp_predict, CE, params, batch)
  if name == "fisher":
    return dense_softmax_fisher(mlp_predict, params, batch)
  return dense_empirical_fisher(mlp_predict, CE, params, batch)


CASES = {  # name -> (curvature, loss, problem)
    "ggn_squared_error": ("ggn", SE, regression_problem),
    "ggn_softmax": ("ggn", CE, classification_problem),
    "fisher": ("fisher", CE, classification_problem),
    "empirical_fisher": ("empirical_fisher", CE, classification_problem),
}


def _rows_with_slices(params, **plan):
  rows = curvature.block_diagonal_blocks(params, **plan)
  offsets = _offsets(params)
  return [(r, slice(offsets[i], offsets[i + 1])) for i, r in enumerate(rows)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_blocks_equal_dense_matrix_blocks_and_fallback_gets_diagonal(name):
  kind, loss, problem = CASES[name]
  params, batch = problem(n=7, sizes=(4, 5, 3))
  dense = _oracle(name, params, batch)
  estimate = jax.jit(lambda p, b: curvature.block_diagonal_curvature(
      mlp_predict, loss, p, b, curvature=kind, max_block_size=CAP))(
          params, batch)
  rows = _rows_with_slices(params, max_block_size=CAP)
  assert [r.block for r, _ in rows] == ["dense", "diagonal", "dense",
                                        "dense"]
  assert estimate.diagonal[0] is None and estimate.diagonal[1] is not None
  for i, (row, leaf_slice) in enumerate(rows):
    if row.block == "dense":
      np.testing.assert_allclose(
          estimate.blocks[row.index], dense[leaf_slice, leaf_slice],
          rtol=1e-10, atol=1e-12)
    else:
      np.testing.assert_allclose(
          np.ravel(estimate.diagonal[i]), np.diag(dense)[leaf_slice],
          rtol=1e-10, atol=1e-12)


def test_layer_grouping_gives_a_dense_block_per_layer():
  params, batch = classification_problem(n=7, sizes=(4, 5, 3))
  dense = dense_softmax_fisher(mlp_predict, params, batch)
  estimate = curvature.block_diagonal_curvature(
      mlp_predict, CE, params, batch, max_block_size=25, grouping="layer")
  rows = curvature.block_diagonal_blocks(params, max_block_size=25,
                                         grouping="layer")
  assert [r.index for r in rows] == [0, 0, 1, 1]
  assert rows[0].members == ("0/b", "0/w") and rows[0].size == 25
  np.testing.assert_allclose(estimate.blocks[0], dense[:25, :25],
                             rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(estimate.blocks[1], dense[25:, 25:],
                             rtol=1e-10, atol=1e-12)
  # A layer over the cap is split into leaves; an oversized leaf falls back.
  rows = curvature.block_diagonal_blocks(params, max_block_size=18,
                                         grouping="layer")
  assert [r.block for r in rows] == ["dense", "diagonal", "dense", "dense"]
  assert rows[2].index == rows[3].index and rows[0].members == ("0/b",)
  assert "20 > max_block_size=18" in rows[1].reason


def test_sampled_fisher_blocks_equal_fisher_in_expectation():
  params, batch = classification_problem(key=2, n=6, sizes=(3, 4, 3))
  dense = dense_softmax_fisher(mlp_predict, params, batch)
  sampled = jax.jit(
      lambda cap: curvature.block_diagonal_curvature(
          mlp_predict, CE, params, batch, curvature="sampled_fisher",
          key=jax.random.key(0), num_samples=4000, max_block_size=cap),
      static_argnums=0)
  estimate = sampled(12)
  rows = _rows_with_slices(params, max_block_size=12)
  # 24,000 sampled targets: the Monte-Carlo error is about 1% of the
  # largest entry; 5% of it is a safe bound.
  scale = np.max(np.abs(dense))
  for row, leaf_slice in rows:
    assert row.block == "dense"
    np.testing.assert_allclose(
        estimate.blocks[row.index], dense[leaf_slice, leaf_slice], rtol=0,
        atol=0.05 * scale)
  # The fallback diagonal uses the same sampled targets as the blocks: it is
  # exactly the diagonal of the same sampled matrix.
  fallback = sampled(1)
  for i, (row, _) in enumerate(rows):
    np.testing.assert_allclose(
        np.ravel(fallback.diagonal[i]),
        np.diag(np.asarray(estimate.blocks[row.index])), rtol=1e-10)


def _block_diagonal_solve(params, dense, grad, damping, cap):
  """Dense oracle: blockdiag(C_b + λI)⁻¹ g, diagonal for fallback leaves."""
  out = np.zeros_like(grad)
  for row, s in _rows_with_slices(params, max_block_size=cap):
    if row.block == "dense":
      block = dense[s, s] + damping * np.eye(s.stop - s.start)
      out[s] = np.linalg.solve(block, grad[s])
    else:
      out[s] = grad[s] / (np.diag(dense)[s] + damping)
  return out


def test_update_equals_dense_block_diagonal_solve():
  params, batch = classification_problem(n=9, sizes=(4, 5, 3))
  damping = 0.05
  dense = dense_empirical_fisher(mlp_predict, CE, params, batch)
  grads = _grads(params, batch)
  # The alias (no momentum) is -lr times scale_by_block_diagonal's output.
  opt = curvature.block_diagonal_natural_gradient(
      0.3, predict_fn=mlp_predict, loss=CE, curvature="empirical_fisher",
      max_block_size=CAP, damping=damping, decay=0.9, momentum=0.0)
  step, state = jax.jit(opt.update)(grads, opt.init(params), params,
                                    batch=batch)
  expected = _block_diagonal_solve(params, dense, flat(grads), damping, CAP)
  np.testing.assert_allclose(flat(step), -0.3 * expected, rtol=1e-9,
                             atol=1e-12)
  assert isinstance(state[0], curvature.ScaleByBlockDiagonalState)
  assert int(state[0].count) == 1 and int(state[0].statistics_count) == 1


def _cosine(u, v):
  return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))


def test_closer_to_natural_gradient_than_diagonal_fisher():
  params, batch = classification_problem(key=1, n=24, sizes=(5, 6, 4))
  damping = 1e-3
  fisher = dense_softmax_fisher(mlp_predict, params, batch)
  grads = _grads(params, batch)
  grad = flat(grads)
  natural = np.linalg.solve(fisher + damping * np.eye(len(grad)), grad)
  diagonal = grad / (np.diag(fisher) + damping)
  opt = curvature.scale_by_block_diagonal(mlp_predict, CE, damping=damping)
  updates, state = jax.jit(opt.update)(grads, opt.init(params), params,
                                       batch=batch)
  block = flat(updates)
  assert int(state.rejected_steps) == 0
  assert _cosine(block, natural) > _cosine(diagonal, natural) + 0.05


def test_inverses_refresh_every_t_steps_and_are_stale_between():
  params, batch = classification_problem(n=8, sizes=(4, 5, 3))
  damping = 1e-2
  opt = curvature.scale_by_block_diagonal(
      mlp_predict, CE, inverse_every=3, damping=damping, max_block_size=CAP)
  state = opt.init(params)
  update = jax.jit(opt.update)
  grads = _grads(params, batch)
  inverses, outputs = [], []
  for k in range(4):
    shifted = dict(batch, inputs=batch["inputs"] * (1 + 0.3 * k))
    out, state = update(grads, state, params, batch=shifted)
    inverses.append([np.asarray(x.preconditioner) for x in state.blocks])
    outputs.append(out)
  for a, b, c in zip(*inverses[:3]):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  # Step 3 refreshes from the debiased EMA as it stands after step 3's
  # statistics; step 2 still used step 0's inverse.
  assert not np.allclose(inverses[2][2], inverses[3][2])
  leaves = jax.tree.leaves(grads)
  rows = curvature.block_diagonal_blocks(params, max_block_size=CAP)
  step2 = jax.tree.leaves(outputs[2])
  for i, row in enumerate(rows):
    if row.block == "dense":
      np.testing.assert_allclose(
          np.ravel(step2[i]),
          inverses[0][row.index] @ np.ravel(leaves[i]), rtol=1e-10)
  # And the refreshed inverse is that of the damped, debiased EMA.
  debiased = np.asarray(state.blocks[2].statistics) / (1 - 0.95 ** 4)
  np.testing.assert_allclose(
      inverses[3][2], np.linalg.inv(debiased + damping * np.eye(15)),
      rtol=1e-8)


def test_non_finite_statistics_rejected_and_non_finite_gradient_zeroed():
  params, batch = classification_problem(n=8, sizes=(4, 5, 3))
  opt = curvature.scale_by_block_diagonal(mlp_predict, CE, damping=1e-2,
                                          max_block_size=CAP)
  update = jax.jit(opt.update)
  grads = _grads(params, batch)
  _, state = update(grads, opt.init(params), params, batch=batch)
  poisoned = dict(batch, inputs=batch["inputs"].at[0, 0].set(jnp.nan))
  out, new_state = update(grads, state, params, batch=poisoned)
  for old, new in zip(jax.tree.leaves((state.blocks, state.diagonal)),
                      jax.tree.leaves((new_state.blocks,
                                       new_state.diagonal))):
    np.testing.assert_array_equal(old, new)
  assert int(new_state.rejected_statistics) == 1
  assert int(new_state.statistics_count) == 1
  assert np.all(np.isfinite(flat(out))) and np.any(flat(out) != 0)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.inf), grads)
  out, new_state = update(bad, state, params, batch=batch)
  assert np.all(flat(out) == 0) and int(new_state.rejected_steps) == 1


def test_jit_no_recompilation_and_float32():
  params, batch = regression_problem(n=8, sizes=(3, 4, 2), dtype=jnp.float32)
  opt = curvature.block_diagonal_natural_gradient(
      0.05, predict_fn=mlp_predict, loss=SE, curvature="sampled_fisher",
      max_block_size=8, grouping="layer", inverse_every=2,
      statistics_batch_size=4)
  state = opt.init(params)
  traces = []

  @jax.jit
  def step(params, state, batch):
    traces.append(1)
    grads = _grads(params, batch, SE)
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  for k in range(3):
    params, state = step(params, state,
                         dict(batch, inputs=batch["inputs"] + 0.1 * k))
  assert len(traces) == 1
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert np.all(np.isfinite(flat(params)))


def test_summary_names_dense_and_fallback_leaves():
  params, _ = classification_problem(n=4, sizes=(4, 5, 3))
  text = curvature.block_diagonal_summary(params, max_block_size=CAP)
  lines = text.splitlines()
  assert len(lines) == 4
  assert lines[0].startswith("0/b") and "dense 5x5" in lines[0]
  assert "diagonal" in lines[1] and "20 > max_block_size=15" in lines[1]
  assert "dense 15x15" in lines[3]


@pytest.mark.parametrize("kwargs, match", [
    (dict(damping=0.0), "damping"),
    (dict(damping=-1.0), "damping"),
    (dict(decay=1.0), "decay"),
    (dict(max_block_size=0), "max_block_size"),
    (dict(inverse_every=0), "inverse_every"),
    (dict(curvature="hessian"), "curvature"),
    (dict(grouping="neuron"), "grouping"),
])
def test_bad_hyperparameters_raise_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    curvature.scale_by_block_diagonal(mlp_predict, CE, **kwargs)


def test_bad_calls():
  params, batch = classification_problem(n=4, sizes=(4, 5, 3))
  opt = curvature.scale_by_block_diagonal(mlp_predict, CE)
  with pytest.raises(ValueError, match="batch=batch"):
    opt.update(_grads(params, batch), opt.init(params), params)
  with pytest.raises(ValueError, match="empty"):
    opt.init({})
  with pytest.raises(ValueError, match="key"):
    curvature.block_diagonal_curvature(mlp_predict, CE, params, batch,
                                       curvature="sampled_fisher")
