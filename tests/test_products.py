"""Curvature-vector products against dense matrices from jax.hessian / jacfwd."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvature
from helpers import PROBLEMS
from helpers import dense_empirical_fisher
from helpers import dense_ggn
from helpers import dense_hessian
from helpers import dense_softmax_fisher
from helpers import flat
from helpers import mlp_predict
from helpers import random_like

L2 = 0.03


def _matvec(curvature_name, loss, params, batch, vector, **kwargs):
  lin = curvature.linearize(mlp_predict, loss, params, batch,
                            curvature=curvature_name, l2_reg=L2, **kwargs)
  return flat(lin.matvec(vector))


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_ggn_product_matches_dense(name):
  loss, make = PROBLEMS[name]
  params, batch = make()
  v = random_like(params, 1)
  expected = dense_ggn(mlp_predict, loss, params, batch, L2) @ flat(v)
  np.testing.assert_allclose(
      _matvec("ggn", loss, params, batch, v), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_hessian_product_matches_dense(name):
  loss, make = PROBLEMS[name]
  params, batch = make()
  v = random_like(params, 1)
  expected = dense_hessian(mlp_predict, loss, params, batch, L2) @ flat(v)
  np.testing.assert_allclose(
      _matvec("hessian", loss, params, batch, v), expected, rtol=1e-10,
      atol=1e-12)
  lin = curvature.linearize(mlp_predict, loss, params, batch,
                            curvature="hessian", l2_reg=L2)
  fn = lambda p: curvature.objective(mlp_predict, loss, p, batch, l2_reg=L2)
  np.testing.assert_allclose(
      flat(curvature.hessian_vector_product(fn, params, v)), expected,
      rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(lin.value, fn(params), rtol=1e-12)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_empirical_fisher_product_matches_dense(name):
  loss, make = PROBLEMS[name]
  params, batch = make()
  v = random_like(params, 2)
  dense = dense_empirical_fisher(mlp_predict, loss, params, batch)
  expected = (dense + L2 * np.eye(len(dense))) @ flat(v)
  np.testing.assert_allclose(
      _matvec("empirical_fisher", loss, params, batch, v), expected,
      rtol=1e-10, atol=1e-12)


def test_exact_fisher_matches_enumerated_softmax_fisher():
  loss, make = PROBLEMS["softmax_cross_entropy"]
  params, batch = make()
  v = random_like(params, 3)
  dense = dense_softmax_fisher(mlp_predict, params, batch)
  expected = (dense + L2 * np.eye(len(dense))) @ flat(v)
  np.testing.assert_allclose(
      _matvec("fisher", loss, params, batch, v), expected, rtol=1e-10,
      atol=1e-12)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_exact_fisher_equals_ggn_for_canonical_losses(name):
  loss, make = PROBLEMS[name]
  params, batch = make()
  v = random_like(params, 4)
  np.testing.assert_allclose(
      _matvec("fisher", loss, params, batch, v),
      _matvec("ggn", loss, params, batch, v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_sampled_fisher_is_unbiased(name):
  """E[F̂ v] = F v: 4000 samples; the tolerance is 5 standard errors."""
  loss, make = PROBLEMS[name]
  params, batch = make()
  v = random_like(params, 5)
  exact = _matvec("fisher", loss, params, batch, v) - L2 * flat(v)

  @jax.jit
  def one_sample_product(key):
    lin = curvature.linearize(mlp_predict, loss, params, batch,
                              curvature="sampled_fisher", key=key)
    return jax.flatten_util.ravel_pytree(lin.matvec(v))[0]

  keys = jax.random.split(jax.random.key(0), 4000)
  samples = np.asarray(jax.lax.map(one_sample_product, keys, batch_size=500))
  mean = samples.mean(0)
  stderr = samples.std(0) / np.sqrt(len(keys))
  assert np.all(np.abs(mean - exact) <= 5 * stderr + 1e-10), (
      np.max(np.abs(mean - exact) / (stderr + 1e-12)))
  # num_samples averages inside one product: same expectation, less spread.
  many = curvature.sampled_fisher_vector_product(
      mlp_predict, loss, params, batch, v, key=jax.random.key(9),
      num_samples=4000)
  spread = 5 * samples.std(0) / np.sqrt(4000) + 1e-10
  assert np.all(np.abs(flat(many) - exact) <= spread)


def test_linearization_value_and_gradient_match_autodiff():
  loss, make = PROBLEMS["softmax_cross_entropy"]
  params, batch = make()
  fn = lambda p: curvature.objective(mlp_predict, loss, p, batch, l2_reg=L2)
  value, grad = jax.value_and_grad(fn)(params)
  for name in curvature.CURVATURES:
    lin = curvature.linearize(mlp_predict, loss, params, batch,
                              curvature=name, l2_reg=L2,
                              key=jax.random.key(0))
    np.testing.assert_allclose(lin.value, value, rtol=1e-12)
    np.testing.assert_allclose(flat(lin.grad), flat(grad), rtol=1e-10,
                               atol=1e-14)


def test_one_shot_products_equal_the_shared_linearization():
  loss, make = PROBLEMS["sigmoid_binary_cross_entropy"]
  params, batch = make()
  v = random_like(params, 6)
  for fn, name in [
      (curvature.ggn_vector_product, "ggn"),
      (curvature.fisher_vector_product, "fisher"),
      (curvature.empirical_fisher_vector_product, "empirical_fisher"),
  ]:
    np.testing.assert_allclose(
        flat(fn(mlp_predict, loss, params, batch, v, l2_reg=L2)),
        _matvec(name, loss, params, batch, v), rtol=1e-12)


@pytest.mark.parametrize("name", ["ggn", "fisher", "empirical_fisher"])
def test_gauss_newton_family_is_symmetric_psd(name):
  loss, make = PROBLEMS["softmax_cross_entropy"]
  params, batch = make(n=5)
  lin = curvature.linearize(mlp_predict, loss, params, batch, curvature=name)
  u, v = random_like(params, 7), random_like(params, 8)
  np.testing.assert_allclose(
      flat(u) @ flat(lin.matvec(v)), flat(v) @ flat(lin.matvec(u)), rtol=1e-10)
  assert flat(v) @ flat(lin.matvec(v)) >= 0


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 32])
def test_empirical_fisher_diagonal_matches_dense(chunk_size):
  loss, make = PROBLEMS["squared_error"]
  params, batch = make(n=7)
  expected = np.diag(dense_empirical_fisher(mlp_predict, loss, params, batch))
  got = curvature.empirical_fisher_diagonal(
      mlp_predict, loss, params, batch, chunk_size=chunk_size)
  np.testing.assert_allclose(flat(got), expected, rtol=1e-10, atol=1e-14)


def test_products_jit_and_reuse_one_linearization():
  loss, make = PROBLEMS["softmax_cross_entropy"]
  params, batch = make()
  traces = []

  @jax.jit
  def products(params, batch, vectors):
    traces.append(1)
    lin = curvature.linearize(mlp_predict, loss, params, batch)
    return jax.lax.map(lin.matvec, vectors)

  vectors = jax.tree.map(lambda *x: jnp.stack(x),
                         *[random_like(params, k) for k in range(3)])
  out = products(params, batch, vectors)
  products(params, batch, jax.tree.map(lambda x: 2 * x, vectors))
  assert len(traces) == 1
  first = jax.tree.map(lambda x: x[1], out)
  np.testing.assert_allclose(
      flat(first),
      flat(curvature.ggn_vector_product(mlp_predict, loss, params, batch,
                                        random_like(params, 1))),
      rtol=1e-10)


def test_default_targets_and_errors():
  assert curvature.default_targets({"targets": 1, "x": 2}) == 1
  assert curvature.default_targets((0, 5)) == 5
  with pytest.raises(ValueError, match="targets_fn"):
    curvature.default_targets({"labels": 1})
  with pytest.raises(ValueError, match="targets_fn"):
    curvature.default_targets(jnp.zeros(3))


def test_bad_curvature_arguments_raise():
  loss, make = PROBLEMS["squared_error"]
  params, batch = make()
  with pytest.raises(ValueError, match="Unknown `curvature`"):
    curvature.linearize(mlp_predict, loss, params, batch, curvature="gnn")
  with pytest.raises(ValueError, match="key"):
    curvature.linearize(mlp_predict, loss, params, batch,
                        curvature="sampled_fisher")
  with pytest.raises(ValueError, match="num_samples"):
    curvature.linearize(mlp_predict, loss, params, batch,
                        curvature="sampled_fisher", key=jax.random.key(0),
                        num_samples=0)


def test_restrict_to_leaves_gives_the_diagonal_block():
  """The GGN of the restricted model at its leaves is the dense GGN's
  diagonal block of those leaves (float64, ``jax.jacfwd`` oracle)."""
  from curvature import _products  # pylint: disable=import-outside-toplevel
  loss, make = PROBLEMS[sorted(PROBLEMS)[0]]
  params, batch = make()
  leaves = jax.tree.leaves(params)
  indices = (0, len(leaves) - 1)
  sub_predict, sub = _products.restrict_to_leaves(mlp_predict, params, indices)
  assert all(a is leaves[i] for a, i in zip(sub, indices))
  np.testing.assert_array_equal(sub_predict(sub, batch),
                                mlp_predict(params, batch))
  sizes = [x.size for x in leaves]
  starts = np.cumsum([0] + sizes)
  rows = np.concatenate([np.arange(starts[i], starts[i] + sizes[i])
                         for i in indices])
  full = dense_ggn(mlp_predict, loss, params, batch)
  np.testing.assert_allclose(dense_ggn(sub_predict, loss, sub, batch),
                             full[np.ix_(rows, rows)], rtol=1e-12, atol=1e-14)


def test_take_examples():
  batch = {"inputs": jnp.arange(10).reshape(5, 2), "targets": jnp.arange(5)}
  head = curvature.take_examples(batch, 2)
  np.testing.assert_array_equal(head["targets"], [0, 1])
  assert head["inputs"].shape == (2, 2)


@pytest.mark.parametrize("requested,expected", [(None, 5), (2, 2), (5, 5),
                                                (9, 5)])
def test_subset_size_is_the_whole_batch_by_default_and_never_more(
    requested, expected):
  from curvature import _products
  assert _products.subset_size(requested, 5) == expected


@pytest.mark.parametrize("curvature_name",
                         ["ggn", "hessian", "fisher", "empirical_fisher"])
def test_axis_name_reduces_over_mapped_shards(curvature_name):
  """With ``axis_name``, per-shard values, gradients and products are
  ``pmean``-ed: under ``vmap(axis_name=...)`` over 4 shards of the batch they
  equal the global-batch ones (``shard_map``: tests/test_sharding.py)."""
  loss, problem = PROBLEMS["softmax_cross_entropy"]
  params, batch = problem(n=12)
  vector = random_like(params, 5)
  shards = jax.tree.map(lambda x: x.reshape(4, 3, *x.shape[1:]), batch)

  def quantities(batch, axis_name=None):
    lin = curvature.linearize(mlp_predict, loss, params, batch,
                              curvature=curvature_name, l2_reg=0.1,
                              axis_name=axis_name)
    return lin.value, lin.grad, lin.matvec(vector)

  expected = quantities(batch)
  got = jax.vmap(functools.partial(quantities, axis_name="shards"),
                 axis_name="shards")(shards)
  for e, g in zip(expected, got):
    g = jax.tree.map(lambda x: x[0], g)  # Identical on every shard.
    np.testing.assert_allclose(flat(g), flat(e), rtol=1e-12, atol=1e-14)


# Outputs of vocabulary size -------------------------------------------------
# A decoder whose logits dominate its memory: the softmax output Hessian must
# be applied per token as diag(p)v − p(pᵀv), never built as [N·T, V, V], and
# no Jacobian with a vocabulary axis may appear.

VOCAB_HEAVY = dict(vocab=3001, seq=16, dim=8, heads=2, layers=1)


def _compiled_memory(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled.memory_analysis(), compiled.as_text()


def _vocab_heavy_problem():
  import helpers  # pylint: disable=g-import-not-at-top
  params = helpers.transformer_params(dtype=jnp.float64, **VOCAB_HEAVY)
  batch = helpers.transformer_batch(n=8, **VOCAB_HEAVY)
  predict = functools.partial(helpers.transformer_predict,
                              heads=VOCAB_HEAVY["heads"])
  return predict, params, batch


def _shapes_with_two_vocab_axes(hlo_text, vocab):
  shapes = re.findall(r"\[([0-9,]+)\]", hlo_text)
  return [s for s in shapes if s.split(",").count(str(vocab)) >= 2]


@pytest.mark.parametrize("product", ["ggn", "fisher"])
def test_vocab_sized_outputs_product_memory_is_close_to_the_gradient(product):
  """One curvature-vector product costs ≤ 1.5× ``value_and_grad``'s compiled
  memory on a vocabulary-heavy decoder, and holds no ``[.., V, V]`` buffer."""
  predict, params, batch = _vocab_heavy_problem()
  loss = curvature.losses.softmax_cross_entropy
  vector = jax.tree.map(jnp.ones_like, params)
  logits_bytes = 8 * np.prod(batch["inputs"].shape) * VOCAB_HEAVY["vocab"]

  def value_and_grad(params, batch):
    objective = lambda p: loss.value(predict(p, batch), batch["targets"])
    return jax.value_and_grad(objective)(params)

  def curvature_product(params, batch, vector):
    return curvature.linearize(predict, loss, params, batch,
                               curvature=product).matvec(vector)

  grad_memory, _ = _compiled_memory(value_and_grad, params, batch)
  product_memory, hlo = _compiled_memory(curvature_product, params, batch,
                                         vector)
  # The logits dominate: a [N·T, V, V] buffer would be V = 3001 times them.
  assert grad_memory.temp_size_in_bytes >= logits_bytes
  assert (product_memory.temp_size_in_bytes
          <= 1.5 * grad_memory.temp_size_in_bytes), (product_memory,
                                                      grad_memory)
  peak = lambda m: (m.temp_size_in_bytes + m.argument_size_in_bytes
                    + m.output_size_in_bytes)
  assert peak(product_memory) <= 1.5 * peak(grad_memory)
  assert not _shapes_with_two_vocab_axes(hlo, VOCAB_HEAVY["vocab"])


def test_two_vocab_axes_are_detected():
  """The HLO shape check of the test above does see an [N, V, V] buffer."""
  vocab = VOCAB_HEAVY["vocab"]
  logits = jnp.zeros((2, vocab), jnp.float64)
  outer = lambda z: jax.vmap(jnp.diag)(jax.nn.softmax(z)) @ z[..., None]
  _, hlo = _compiled_memory(outer, logits)
  assert _shapes_with_two_vocab_axes(hlo, vocab)
