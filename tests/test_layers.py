"""Layer discovery on linen, nnx, CNN and plain-JAX models; taps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import curvature
from curvature import _layers
from curvature import losses
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
