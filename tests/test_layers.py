"""Layer discovery on linen, nnx, CNN and plain-JAX models; taps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import curvature
from curvature import _layers
from curvature import losses
import helpers
from helpers import classification_problem
from helpers import mlp_predict


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(5)(x))
    return nn.Dense(3)(x)


class LinenCNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.Conv(2, (2, 2), strides=(2, 2), padding="VALID")(x)
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.a = nnx.Linear(4, 5, rngs=rngs)
    self.b = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    return self.b(jax.nn.sigmoid(self.a(x)))


def _kinds(found, params):
  paths = curvature._kfac.leaf_paths(params)
  return {paths[l.kernel]: (l.kind, None if l.bias is None else paths[l.bias])
          for l in found.layers}


def test_plain_jax_mlp():
  params, batch = classification_problem(n=5, sizes=(4, 5, 3))
  found = curvature.discover_layers(mlp_predict, params, batch)
  assert _kinds(found, params) == {"0/w": ("dense", "0/b"),
                                   "1/w": ("dense", "1/b")}
  assert not found.reasons


def test_linen_mlp_and_cnn():
  x = jnp.ones((2, 4))
  variables = LinenMLP().init(jax.random.key(0), x)
  found = _layers.discover_layers(LinenMLP().apply, variables, x)
  assert _kinds(found, variables) == {
      "params/Dense_0/kernel": ("dense", "params/Dense_0/bias"),
      "params/Dense_1/kernel": ("dense", "params/Dense_1/bias")}
  images = jnp.ones((2, 6, 6, 3))
  variables = LinenCNN().init(jax.random.key(0), images)
  found = _layers.discover_layers(LinenCNN().apply, variables, images)
  kinds = _kinds(found, variables)
  assert kinds["params/Conv_0/kernel"] == ("conv", "params/Conv_0/bias")
  assert kinds["params/Conv_1/kernel"] == ("conv", "params/Conv_1/bias")
  assert kinds["params/Dense_0/kernel"][0] == "dense"


def test_nnx_mlp():
  graphdef, state = nnx.split(NnxMLP(nnx.Rngs(0)))
  predict = lambda s, x: nnx.merge(graphdef, s)(x)
  found = _layers.discover_layers(predict, state, jnp.ones((2, 4)))
  assert len(found.layers) == 2
  assert all(l.bias is not None for l in found.layers)


def test_shared_transposed_and_unused_weights():
  def predict(p, x):
    h = jnp.tanh(x @ p["w"] + p["b"])  # w is used twice: tied weights.
    return h @ p["w"].T @ p["v"].T + p["scale"] * 0 + jnp.sum(p["w"])

  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3), "v": jnp.ones((2, 4)),
            "scale": jnp.ones(()), "unused": jnp.ones(2)}
  found = _layers.discover_layers(predict, params, jnp.ones((5, 4)))
  paths = curvature._kfac.leaf_paths(params)
  reasons = {paths[i]: r for i, r in found.reasons.items()}
  assert "used 3 times" in reasons["w"]
  assert "not used" in reasons["unused"]
  (layer,) = found.layers  # v, contracted on its axis 1: x @ v.T.
  assert paths[layer.kernel] == "v" and layer.in_axis == 1


def test_taps_record_inputs_and_output_gradients():
  params, batch = classification_problem(n=5, sizes=(4, 5, 3))
  found = _layers.discover_layers(mlp_predict, params, batch)
  fn, zeros = _layers.tapped_forward(mlp_predict, found.layers, params, batch)
  outputs, vjp_fn, inputs = jax.vjp(fn, zeros, has_aux=True)
  np.testing.assert_allclose(outputs, mlp_predict(params, batch))
  np.testing.assert_allclose(inputs[0], batch["inputs"])
  hidden = jnp.tanh(batch["inputs"] @ params[0]["w"] + params[0]["b"])
  np.testing.assert_allclose(inputs[1], hidden)
  loss = losses.softmax_cross_entropy
  cot = losses.output_gradients(loss, outputs, batch["targets"])
  (grads,) = vjp_fn(cot)
  # ∂(Σᵢ ℓᵢ)/∂s₂ is the output gradient itself; ∂/∂s₁ goes through tanh.
  np.testing.assert_allclose(grads[1], cot)
  expected = (cot @ params[1]["w"].T) * (1 - hidden ** 2)
  np.testing.assert_allclose(grads[0], expected, rtol=1e-12)


# Nested jit, remat and scan paths of the discovery and the taps -------------


def _check_taps(predict, params, batch, expected_inputs):
  """Taps record ``expected_inputs`` and output gradients equal to the
  gradients with respect to an explicit perturbation of each raw output."""
  found = _layers.discover_layers(predict, params, batch)
  fn, zeros = _layers.tapped_forward(predict, found.layers, params, batch)
  outputs, vjp_fn, inputs = jax.vjp(fn, zeros, has_aux=True)
  np.testing.assert_allclose(outputs, predict(params, batch), rtol=1e-12)
  for got, want in zip(inputs, expected_inputs):
    np.testing.assert_allclose(got, want, rtol=1e-12)
  cot = jnp.cos(outputs)
  (grads,) = vjp_fn(cot)
  # The taps are zero perturbations: the gradient with respect to them
  # integrates to the gradient with respect to the kernels.
  kernel_grads = jax.grad(lambda p: jnp.vdot(predict(p, batch), cot))(params)
  leaves = jax.tree.leaves(kernel_grads)
  for layer, x, g in zip(found.layers, inputs, grads):
    if layer.stack:
      got = jnp.einsum("l...i,l...o->lio", x, g)
    else:
      got = jnp.einsum("...i,...o->io", x, g)
    np.testing.assert_allclose(got, leaves[layer.kernel], rtol=1e-10)
  return found


def test_nested_jit_and_remat_are_followed():
  params, batch = classification_problem(n=4, sizes=(4, 5, 3))

  @jax.jit
  def inner(w, b, x):
    return jnp.tanh(x @ w + b)

  def predict(p, b):
    h = jax.checkpoint(inner)(p[0]["w"], p[0]["b"], b["inputs"])
    return jax.jit(lambda h: h @ p[1]["w"] + p[1]["b"])(h)

  hidden = jnp.tanh(batch["inputs"] @ params[0]["w"] + params[0]["b"])
  found = _check_taps(predict, params, batch, [batch["inputs"], hidden])
  assert [l.bias is not None for l in found.layers] == [True, True]
  assert not found.reasons


def test_scan_stacks_are_followed_and_tapped_per_layer():
  params, batch = classification_problem(n=4, sizes=(3, 3, 3, 3))
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *params)

  def predict(p, b):
    def body(h, layer):
      return jax.checkpoint(lambda h: jnp.tanh(h @ layer["w"] + layer["b"]))(
          h), None
    return jax.lax.scan(body, b["inputs"], p)[0] @ jnp.ones((3, 2))

  hs = [batch["inputs"]]
  for layer in params[:-1]:
    hs.append(jnp.tanh(hs[-1] @ layer["w"] + layer["b"]))
  found = _check_taps(predict, stacked, batch, [jnp.stack(hs)])
  (layer,) = found.layers
  assert layer.stack == 3 and layer.bias is not None


def test_scan_constants_and_carries_are_reported_not_factored():
  w = jnp.eye(3) * 0.5

  def predict(p, b):  # an RNN: the weight is a loop constant.
    return jax.lax.scan(lambda h, x: (jnp.tanh(h @ p["w"] + x), None),
                        b["inputs"][:, 0], jnp.moveaxis(b["inputs"], 1, 0))[0]

  found = _layers.discover_layers(predict, {"w": w}, {"inputs": jnp.ones((2, 4, 3))})
  assert not found.layers and "loop constant" in found.reasons[0]


def test_tied_embedding_is_one_layer_with_two_uses():
  e = jax.random.normal(jax.random.key(0), (7, 3))
  tokens = jnp.array([[1, 2, 3], [4, 5, 6]])

  def predict(p, b):
    return jnp.tanh(p["e"][b["inputs"]]) @ p["e"].T

  found = _check_taps_lookup(predict, {"e": e}, {"inputs": tokens})
  (layer,) = found.layers
  assert [u.kind for u in layer.uses] == ["lookup", "dense"]
  assert not _layers.is_transposed(layer, layer.uses[0])
  assert _layers.is_transposed(layer, layer.uses[1])


def _check_taps_lookup(predict, params, batch):
  found = _layers.discover_layers(predict, params, batch)
  fn, zeros = _layers.tapped_forward(predict, found.layers, params, batch)
  outputs, inputs = fn(zeros)
  np.testing.assert_allclose(outputs, predict(params, batch), rtol=1e-12)
  np.testing.assert_array_equal(inputs[0][..., 0], batch["inputs"])
  return found


# Coverage on a small decoder-only transformer --------------------------------


def _coverage(predict, params, batch):
  rows = curvature.kfac_blocks(predict, params, batch, example_batch=batch)
  share = curvature._kfac.kronecker_share(rows) / sum(r.size for r in rows)
  diagonal = {r.path for r in rows if r.block == "diagonal"}
  return share, diagonal, rows


def _assert_transformer_coverage(predict, params, batch):
  share, diagonal, rows = _coverage(predict, params, batch)
  text = curvature.kfac_summary(predict, params, batch, example_batch=batch)
  assert share >= 0.95, text
  # Only layer norms and the position embedding stay diagonal.
  assert all("ln" in p.lower() or "layernorm" in p.lower() or "pos" in p
             for p in diagonal), text
  embed = [r for r in rows if "embed" in r.path.lower()]
  assert [r.block for r in embed] == ["lookup+dense.T x2"], text
  stacked = [r for r in rows if r.factors and r.reason]
  assert len(stacked) == 4 and all("2 stacked" in r.reason for r in stacked)
  return share


DIMS = dict(dim=16)


def test_plain_jax_transformer_coverage():
  params = helpers.transformer_params(**DIMS)
  batch = helpers.transformer_batch(**DIMS)
  _assert_transformer_coverage(helpers.transformer_predict, params, batch)


def test_linen_transformer_coverage():
  batch = helpers.transformer_batch(**DIMS)
  module, predict = helpers.linen_transformer(**DIMS)
  variables = module.init(jax.random.key(0), batch["inputs"])
  _assert_transformer_coverage(predict, variables, batch)


def test_nnx_transformer_coverage():
  batch = helpers.transformer_batch(**DIMS)
  state, predict = helpers.nnx_transformer(**DIMS)
  _assert_transformer_coverage(predict, state, batch)


def test_a_raw_output_leaving_a_scan_body_keeps_its_bias_out_of_the_block():
  params, batch = classification_problem(n=4, sizes=(3, 3, 3))
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *params)

  def predict(p, b):
    def body(h, layer):
      raw = h @ layer["w"]
      return jnp.tanh(raw + layer["b"]), raw  # raw is also a scan output.
    h, raws = jax.lax.scan(body, b["inputs"], p)
    return h + jnp.sum(raws, axis=0)

  found = _layers.discover_layers(predict, stacked, batch)
  (layer,) = found.layers
  assert layer.stack == 2 and layer.bias is None
  assert "read elsewhere" in found.reasons[0]


def test_flax_multi_head_attention_projections_are_dense_layers():
  # DenseGeneral kernels: [in, heads, head_dim] (query, key, value) and
  # [heads, head_dim, out] (out), with their [heads, head_dim] biases.
  x = jnp.ones((3, 5, 8))
  batch = {"inputs": x, "targets": jnp.zeros((3, 5, 8))}
  att = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8,
                               decode=False, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(att)
  nnx_predict = lambda s, b: nnx.merge(graphdef, s)(b["inputs"])
  linen = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
  variables = linen.init(jax.random.key(0), x)
  linen_predict = lambda v, b: linen.apply(v, b["inputs"])
  for predict, params in ((nnx_predict, state), (linen_predict, variables)):
    rows = curvature.kfac_blocks(predict, params, batch, example_batch=batch)
    kernels = [r for r in rows if "kernel" in r.path]
    assert len(kernels) == 4
    assert all(r.block == "dense" and r.factors == (9, 8) for r in kernels)
    assert all(r.block.startswith("bias of") for r in rows
               if "bias" in r.path)
