"""Small models and dense oracles shared by the tests."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import curvature


def mlp_params(key, sizes, dtype=jnp.float64):
  params = []
  for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
    key, sub = jax.random.split(key)
    params.append({
        "w": (jax.random.normal(sub, (fan_in, fan_out)) / np.sqrt(fan_in)
              ).astype(dtype),
        "b": (0.1 * jax.random.normal(jax.random.fold_in(sub, 1), (fan_out,))
              ).astype(dtype),
    })
  return params


def mlp_predict(params, batch):
  h = batch["inputs"]
  for i, layer in enumerate(params):
    h = h @ layer["w"] + layer["b"]
    if i < len(params) - 1:
      h = jnp.tanh(h)
  return h


def classification_problem(key=0, n=7, sizes=(4, 5, 3), dtype=jnp.float64):
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  params = mlp_params(k1, sizes, dtype)
  batch = {
      "inputs": jax.random.normal(k2, (n, sizes[0]), dtype),
      "targets": jax.random.randint(k3, (n,), 0, sizes[-1]),
  }
  return params, batch


def regression_problem(key=0, n=7, sizes=(4, 5, 3), dtype=jnp.float64):
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  params = mlp_params(k1, sizes, dtype)
  batch = {
      "inputs": jax.random.normal(k2, (n, sizes[0]), dtype),
      "targets": jax.random.normal(k3, (n, sizes[-1]), dtype),
  }
  return params, batch


def binary_problem(key=0, n=7, sizes=(4, 5, 3), dtype=jnp.float64):
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  params = mlp_params(k1, sizes, dtype)
  batch = {
      "inputs": jax.random.normal(k2, (n, sizes[0]), dtype),
      "targets": jax.random.uniform(k3, (n, sizes[-1]), dtype),
  }
  return params, batch


PROBLEMS = {
    "softmax_cross_entropy": (curvature.losses.softmax_cross_entropy,
                              classification_problem),
    "sigmoid_binary_cross_entropy": (
        curvature.losses.sigmoid_binary_cross_entropy, binary_problem),
    "squared_error": (curvature.losses.squared_error, regression_problem),
}


def flat(tree):
  return np.asarray(ravel_pytree(tree)[0])


def dense_jacobian(predict_fn, params, batch):
  """[outputs..., P] Jacobian of the model outputs."""
  vec, unravel = ravel_pytree(params)
  return jax.jacfwd(lambda v: predict_fn(unravel(v), batch))(vec)


def dense_ggn(predict_fn, loss, params, batch, l2_reg=0.0):
  """Jᵀ (∇²_z L) J + l2 I from jax.jacfwd and jax.hessian."""
  jac = dense_jacobian(predict_fn, params, batch)
  outputs = predict_fn(params, batch)
  targets = batch["targets"]
  hz = jax.hessian(lambda z: loss.value(z, targets))(outputs)
  out_dims = outputs.ndim
  jac2 = jac.reshape(-1, jac.shape[-1])
  hz2 = hz.reshape(jac2.shape[0], jac2.shape[0])
  return np.asarray(jac2.T @ hz2 @ jac2) + l2_reg * np.eye(jac.shape[-1])


def dense_hessian(predict_fn, loss, params, batch, l2_reg=0.0):
  vec, unravel = ravel_pytree(params)
  f = lambda v: curvature.objective(predict_fn, loss, unravel(v), batch,
                                    l2_reg=l2_reg)
  return np.asarray(jax.hessian(f)(vec))


def per_example_gradients(predict_fn, loss, params, batch, targets=None):
  """[N, P] gradients of each example's loss."""
  vec, unravel = ravel_pytree(params)
  targets = batch["targets"] if targets is None else targets
  f = lambda v: loss.per_example(predict_fn(unravel(v), batch), targets)
  return np.asarray(jax.jacrev(f)(vec))


def dense_empirical_fisher(predict_fn, loss, params, batch):
  grads = per_example_gradients(predict_fn, loss, params, batch)
  return grads.T @ grads / grads.shape[0]


def dense_softmax_fisher(predict_fn, params, batch):
  """E_{y~p}[g gᵀ] by enumerating every class, averaged over examples."""
  loss = curvature.losses.softmax_cross_entropy
  logits = predict_fn(params, batch)
  n, classes = logits.shape
  probs = np.asarray(jax.nn.softmax(logits))
  total = 0.0
  for c in range(classes):
    labels = jnp.full((n,), c)
    grads = per_example_gradients(predict_fn, loss, params, batch, labels)
    total = total + (grads * probs[:, c:c + 1]).T @ grads
  return total / n


def random_like(params, key):
  vec, unravel = ravel_pytree(params)
  return unravel(jax.random.normal(jax.random.key(key), vec.shape, vec.dtype))


# A tiny decoder-only transformer, in plain JAX, Flax linen and Flax nnx ------
# Token and position embeddings, the output layer tied to the token
# embedding, a scan over blocks of causal multi-head attention + MLP (pre
# LayerNorm). Tiny dimensions: for structure tests, not for training.

TINY_TRANSFORMER = dict(vocab=11, seq=6, dim=8, heads=2, layers=2)


def _layer_norm(h, scale, bias):
  mean = jnp.mean(h, axis=-1, keepdims=True)
  var = jnp.var(h, axis=-1, keepdims=True)
  return (h - mean) * jax.lax.rsqrt(var + 1e-6) * scale + bias


def _attention(q, k, v, heads):
  n, t, d = q.shape
  split = lambda x: x.reshape(n, t, heads, d // heads)
  scores = jnp.einsum("nthd,nshd->nhts", split(q), split(k))
  scores = scores / np.sqrt(d // heads)
  mask = jnp.tril(jnp.ones((t, t), bool))
  weights = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
  return jnp.einsum("nhts,nshd->nthd", weights, split(v)).reshape(n, t, d)


def transformer_params(key=0, dtype=jnp.float64, **dims):
  """Parameters of :func:`transformer_predict`; blocks stacked on axis 0."""
  c = dict(TINY_TRANSFORMER, **dims)
  v, t, d, l = c["vocab"], c["seq"], c["dim"], c["layers"]
  keys = iter(jax.random.split(jax.random.key(key), 16))
  normal = lambda shape, scale: (scale * jax.random.normal(
      next(keys), shape)).astype(dtype)
  blocks = {
      "ln1_scale": jnp.ones((l, d), dtype), "ln1_bias": jnp.zeros((l, d), dtype),
      "qkv": normal((l, d, 3 * d), d ** -0.5), "qkv_b": normal((l, 3 * d), 0.1),
      "proj": normal((l, d, d), d ** -0.5), "proj_b": normal((l, d), 0.1),
      "ln2_scale": jnp.ones((l, d), dtype), "ln2_bias": jnp.zeros((l, d), dtype),
      "fc1": normal((l, d, 4 * d), d ** -0.5), "fc1_b": normal((l, 4 * d), 0.1),
      "fc2": normal((l, 4 * d, d), (4 * d) ** -0.5), "fc2_b": normal((l, d), 0.1),
  }
  return {"embed": normal((v, d), 1.0), "pos": normal((t, d), 0.1),
          "blocks": blocks, "ln_scale": jnp.ones(d, dtype),
          "ln_bias": jnp.zeros(d, dtype)}


def transformer_predict(params, batch, heads=TINY_TRANSFORMER["heads"]):
  """Logits ``[batch, seq, vocab]`` of a plain-JAX decoder (scan over blocks)."""
  tokens = batch["inputs"]
  h = params["embed"][tokens] + params["pos"][None, :tokens.shape[1]]

  def block(h, p):
    x = _layer_norm(h, p["ln1_scale"], p["ln1_bias"])
    q, k, v = jnp.split(x @ p["qkv"] + p["qkv_b"], 3, axis=-1)
    h = h + (_attention(q, k, v, heads) @ p["proj"] + p["proj_b"])
    x = _layer_norm(h, p["ln2_scale"], p["ln2_bias"])
    h = h + (jax.nn.gelu(x @ p["fc1"] + p["fc1_b"]) @ p["fc2"]
             + p["fc2_b"])
    return h, None

  h, _ = jax.lax.scan(block, h, params["blocks"])
  h = _layer_norm(h, params["ln_scale"], params["ln_bias"])
  return h @ params["embed"].T


def transformer_batch(key=0, n=3, **dims):
  c = dict(TINY_TRANSFORMER, **dims)
  k1, k2 = jax.random.split(jax.random.key(key))
  shape = (n, c["seq"])
  return {"inputs": jax.random.randint(k1, shape, 0, c["vocab"]),
          "targets": jax.random.randint(k2, shape, 0, c["vocab"])}


def linen_transformer(**dims):
  """``(module, predict_fn)``: the same decoder in Flax linen (``nn.scan``)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  c = dict(TINY_TRANSFORMER, **dims)

  class Block(nn.Module):

    @nn.compact
    def __call__(self, h, _):
      d = h.shape[-1]
      q, k, v = jnp.split(nn.Dense(3 * d)(nn.LayerNorm()(h)), 3, axis=-1)
      h = h + nn.Dense(d)(_attention(q, k, v, c["heads"]))
      x = nn.LayerNorm()(h)
      return h + nn.Dense(d)(jax.nn.gelu(nn.Dense(4 * d)(x))), None

  class Decoder(nn.Module):

    @nn.compact
    def __call__(self, tokens):
      embed = nn.Embed(c["vocab"], c["dim"])
      pos = self.param("pos", nn.initializers.normal(0.1),
                       (c["seq"], c["dim"]))
      h = embed(tokens) + pos[None, :tokens.shape[1]]
      stack = nn.scan(Block, variable_axes={"params": 0},
                      split_rngs={"params": True}, length=c["layers"])
      h, _ = stack()(h, None)
      return embed.attend(nn.LayerNorm()(h))

  module = Decoder()
  return module, lambda variables, batch: module.apply(variables,
                                                       batch["inputs"])


def nnx_transformer(key=0, **dims):
  """``(state, predict_fn)``: the same decoder in Flax nnx (``nnx.scan``)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  c = dict(TINY_TRANSFORMER, **dims)
  d = c["dim"]

  class Block(nnx.Module):

    def __init__(self, rngs):
      self.ln1 = nnx.LayerNorm(d, rngs=rngs)
      self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
      self.proj = nnx.Linear(d, d, rngs=rngs)
      self.ln2 = nnx.LayerNorm(d, rngs=rngs)
      self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
      self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, h):
      q, k, v = jnp.split(self.qkv(self.ln1(h)), 3, axis=-1)
      h = h + self.proj(_attention(q, k, v, c["heads"]))
      return h + self.fc2(jax.nn.gelu(self.fc1(self.ln2(h))))

  class Decoder(nnx.Module):

    def __init__(self, rngs):
      self.embed = nnx.Embed(c["vocab"], d, rngs=rngs)
      self.pos = nnx.Param(0.1 * jax.random.normal(rngs.params(),
                                                   (c["seq"], d)))

      @nnx.split_rngs(splits=c["layers"])
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return Block(rngs)

      self.blocks = make(rngs)
      self.ln = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, tokens):
      h = self.embed(tokens) + self.pos[None, :tokens.shape[1]]

      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def body(h, block):
        return block(h)

      return self.embed.attend(self.ln(body(h, self.blocks)))

  graphdef, state = nnx.split(Decoder(nnx.Rngs(key)))
  return state, lambda s, batch: nnx.merge(graphdef, s)(batch["inputs"])
