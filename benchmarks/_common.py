"""The model and machine description shared by the benchmark scripts.

The MNIST deep autoencoder of Hinton & Salakhutdinov (2006) and Martens
(2010): 784-1000-500-250-30-250-500-1000-784, sigmoid hidden units, a linear
30-unit code layer, logits out (2,837,314 parameters). Nothing here imports
``curvature``, so the kfac-jax peer environment can import it too.
"""

import os
import platform

import jax
import jax.numpy as jnp


LAYERS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
CODE_LAYER = 3  # Index of the layer whose output is the linear code.
assert CODE_LAYER == (len(LAYERS) - 1) // 2 - 1


def autoencoder_params(key, dtype=jnp.float32):
  """Gaussian weights scaled by 1/√fan-in, zero biases."""
  params = []
  for fan_in, fan_out in zip(LAYERS[:-1], LAYERS[1:]):
    key, sub = jax.random.split(key)
    params.append({
        "w": jax.random.normal(sub, (fan_in, fan_out), dtype) / fan_in**0.5,
        "b": jnp.zeros((fan_out,), dtype),
    })
  return params


def sparse_params(seed, layers, connections=15):
  """Martens' (2010) sparse initialisation.

  Each unit gets ``connections`` incoming weights drawn from N(0, 1) (all of
  them if the fan-in is smaller); every other weight and every bias is 0.
  """
  params = []
  key = jax.random.key(seed)
  for fan_in, fan_out in zip(layers[:-1], layers[1:]):
    key, k_weights, k_mask = jax.random.split(key, 3)
    weights = jax.random.normal(k_weights, (fan_in, fan_out))
    if fan_in > connections:
      scores = jax.random.uniform(k_mask, (fan_in, fan_out))
      kth = jnp.sort(scores, axis=0)[-connections]
      weights = jnp.where(scores >= kth, weights, 0.0)
    params.append({"w": weights, "b": jnp.zeros(fan_out)})
  return params


def autoencoder_predict(params, batch):
  """Reconstruction logits for ``batch["inputs"]``.

  Sigmoid hidden units, except the middle (code) layer, which is linear: the
  output of weights ``len(params) // 2 - 1`` (``CODE_LAYER`` for ``LAYERS``,
  and the 6-unit code of the CURVES autoencoder).
  """
  code_layer = len(params) // 2 - 1
  h = batch["inputs"]
  for i, layer in enumerate(params):
    h = h @ layer["w"] + layer["b"]
    if i != code_layer and i < len(params) - 1:
      h = jax.nn.sigmoid(h)
  return h


def autoencoder_batch(key, batch_size, dtype=jnp.float32):
  """Random inputs in [0, 1] that are also the targets."""
  inputs = jax.random.uniform(key, (batch_size, LAYERS[0]), dtype)
  return {"inputs": inputs, "targets": inputs}


def machine() -> str:
  """CPU model, core count, jax version and backend."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if "model name" in l)
  except (OSError, StopIteration):
    pass
  return (f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__}"
          f" ({jax.default_backend()})")
