"""Small models, dense oracles and the contract table shared by the tests."""

from typing import Any, Callable, NamedTuple, Optional

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax

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


# The contract table -----------------------------------------------------------
# Every public transform, with the keyword arguments the table tests build it
# with and what it promises (tests/test_contract.py, tests/test_bad_input.py,
# tests/test_dtypes.py, tests/test_checkpoint.py). Tests select rows by these
# flags, never by lists of names: a new row states its flags once, here.


class Contract(NamedTuple):
  """One row of the contract table: a public transform and its promises.

  Attributes:
    name: the row's id (a test id; unique).
    factory: the public factory, e.g. ``curvature.kfac``.
    kwargs: keyword arguments that build it on :func:`mlp_predict` models.
    self_rejecting: rejects a non-finite step itself and counts it in a
      ``rejected_steps`` field of its state.
    uses_loss: evaluates the loss, so a NaN loss with finite gradients is
      seen (and rejected); the others never compute it and step normally.
    monotone: a step never raises the loss on its batch (line search or
      Levenberg-Marquardt step rejection).
    damped: the name of the damping argument (``"damping"`` or
      ``"initial_damping"``), or None for an undamped transform.
    damping_in_state: the adapted damping lives in the state as ``damping``
      from the first step (a fixed damping is read from the argument).
    positive_damping: divides by the damping itself, so λ = 0 is refused at
      construction with a message that names the fix.
    first_order: no curvature model (takes no ``axis_name``).
    max_consecutive_errors: a first-order alias whose documented non-finite
      policy is ``max_consecutive_errors=N`` (``optax.apply_if_finite``).
    reads_batch: reads the ``batch`` keyword of ``update`` (the curvature
      transforms; Shampoo and SOAP take their statistics from the gradient).
    chain_learning_rate: a ``scale_by_*`` primitive (or averaging) with no
      learning rate of its own: the tests chain it with one.
    moves_without_gradient: may move at a zero gradient (decoupled weight
      decay, as ``optax.adamw``).
    numeric_hyperparameters: has numeric arguments for
      ``inject_hyperparams`` to inject (a combinator of transforms has none).
  """

  name: str
  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict[str, Any]
  self_rejecting: bool = False
  uses_loss: bool = False
  monotone: bool = False
  damped: Optional[str] = None
  damping_in_state: bool = False
  positive_damping: bool = False
  first_order: bool = False
  max_consecutive_errors: bool = False
  reads_batch: bool = False
  chain_learning_rate: bool = False
  moves_without_gradient: bool = False
  numeric_hyperparameters: bool = True

  def build(self, **overrides) -> optax.GradientTransformation:
    """``factory(**kwargs, **overrides)``, chained with a learning rate if
    it has none of its own."""
    return with_learning_rate(self.name,
                              self.factory(**dict(self.kwargs, **overrides)))


_LOSS = curvature.losses.squared_error
_MODEL = dict(predict_fn=mlp_predict, loss=_LOSS)

# Flag sets shared by several rows.
# A line-searched Hessian-free-family step: rejects, evaluates the loss,
# never goes uphill, and reads the batch.
_HF = dict(self_rejecting=True, uses_loss=True, monotone=True,
           reads_batch=True)
_CURVATURE = dict(self_rejecting=True, reads_batch=True)
_ALIAS = dict(first_order=True, max_consecutive_errors=True)
_PRIMITIVE = dict(first_order=True, chain_learning_rate=True)


def _structural_fn(p, b):
  return jnp.tanh(b["inputs"] @ p[0]["w"] + p[0]["b"])


def _kfac_grafted_onto_adam(
    predict_fn: Callable[[Any, Any], Any], loss: curvature.losses.Loss,
    targets_fn: Optional[Callable[[Any], Any]] = None,
) -> optax.GradientTransformationExtraArgs:
  """``curvature.scale_by_graft`` of K-FAC's direction at Adam's norms.

  The graft takes built transforms, so the row builds them from the model
  the tests pass (the fuzz suite's models have their own batch layouts);
  the annotations keep the model functions static under
  ``curvature.inject_hyperparams``.
  """
  kfac_args = {} if targets_fn is None else dict(targets_fn=targets_fn)
  return curvature.scale_by_graft(
      optax.scale_by_adam(b1=0.0),
      curvature.scale_by_kfac(predict_fn, loss, initial_damping=0.1,
                              **kfac_args))


CONTRACT_TABLE = (
    Contract("hessian_free", curvature.hessian_free,
             dict(learning_rate=1.0, **_MODEL), **_HF,
             damped="initial_damping", damping_in_state=True),
    Contract("hessian_free_sampled_fisher", curvature.hessian_free,
             dict(learning_rate=1.0, curvature="sampled_fisher",
                  num_samples=2, **_MODEL),
             **dict(_HF, monotone=False)),
    Contract("hessian_free_kfac_preconditioned", curvature.hessian_free,
             dict(learning_rate=1.0, preconditioner="kfac",
                  preconditioner_every=2, **_MODEL), **_HF,
             damped="initial_damping", damping_in_state=True),
    Contract("hessian_free_structural", curvature.hessian_free,
             dict(learning_rate=1.0, structural_damping=1 / 30,
                  structural_fn=_structural_fn, **_MODEL), **_HF,
             damped="initial_damping", damping_in_state=True),
    Contract("gauss_newton", curvature.gauss_newton,
             dict(learning_rate=1.0, damping=0.1, **_MODEL),
             **dict(_HF, monotone=False), damped="damping"),
    Contract("levenberg_marquardt", curvature.levenberg_marquardt,
             dict(learning_rate=1.0, **_MODEL), **_HF, damped="damping",
             damping_in_state=True),
    Contract("newton", curvature.newton, dict(learning_rate=1.0, **_MODEL),
             **dict(_HF, monotone=False)),
    Contract("damped_newton", curvature.damped_newton,
             dict(learning_rate=1.0, **_MODEL), **_HF, damped="damping",
             damping_in_state=True),
    Contract("scale_by_hessian_free", curvature.scale_by_hessian_free,
             dict(max_cg_iterations=20, **_MODEL), **_HF,
             damped="initial_damping", damping_in_state=True,
             chain_learning_rate=True),
    Contract("monitor", curvature.monitor,
             dict(inner=optax.sgd(0.1), every=2, **_MODEL), reads_batch=True),
    Contract("sgd", curvature.sgd, dict(learning_rate=0.1), **_ALIAS),
    Contract("sgd_momentum", curvature.sgd,
             dict(learning_rate=0.1, momentum=0.9), **_ALIAS),
    Contract("heavy_ball", curvature.heavy_ball, dict(learning_rate=0.1),
             **_ALIAS),
    Contract("nesterov", curvature.nesterov, dict(learning_rate=0.1),
             **_ALIAS),
    Contract("adagrad", curvature.adagrad, dict(learning_rate=0.1),
             **_ALIAS),
    Contract("rmsprop", curvature.rmsprop, dict(learning_rate=0.01),
             **_ALIAS),
    Contract("rmsprop_nesterov", curvature.rmsprop,
             dict(learning_rate=0.01, momentum=0.9, nesterov=True), **_ALIAS),
    Contract("adadelta", curvature.adadelta, dict(learning_rate=1.0),
             **_ALIAS),
    Contract("adam", curvature.adam, dict(learning_rate=0.01), **_ALIAS),
    Contract("adam_no_bias_correction", curvature.adam,
             dict(learning_rate=0.01, bias_correction=False), **_ALIAS),
    Contract("delta_bar_delta", curvature.delta_bar_delta,
             dict(learning_rate=0.1), **_ALIAS),
    Contract("scale_by_momentum", curvature.scale_by_momentum,
             dict(decay=0.9), **_PRIMITIVE),
    Contract("scale_by_ema", curvature.scale_by_ema, dict(decay=0.9),
             **_PRIMITIVE),
    Contract("scale_by_adadelta", curvature.scale_by_adadelta,
             dict(rho=0.9), **_PRIMITIVE),
    Contract("scale_by_delta_bar_delta", curvature.scale_by_delta_bar_delta,
             dict(), **_PRIMITIVE),
    Contract("polyak_averaging", curvature.polyak_averaging, dict(decay=0.9),
             **_PRIMITIVE),
    Contract("natural_gradient", curvature.natural_gradient,
             dict(learning_rate=0.5, max_cg_iterations=10, **_MODEL), **_HF,
             damped="initial_damping", damping_in_state=True),
    Contract("natural_gradient_sampled", curvature.natural_gradient,
             dict(learning_rate=0.5, fisher="sampled_fisher", num_samples=2,
                  max_cg_iterations=10, **_MODEL), **_HF),
    Contract("scale_by_natural_gradient", curvature.scale_by_natural_gradient,
             dict(fisher="empirical_fisher", **_MODEL), **_HF,
             damped="initial_damping", damping_in_state=True,
             chain_learning_rate=True),
    Contract("scale_by_curvature_diagonal",
             curvature.scale_by_curvature_diagonal,
             dict(damping=0.1, **_MODEL), reads_batch=True, damped="damping",
             positive_damping=True, chain_learning_rate=True),
    Contract("scale_by_curvature_diagonal_hutchinson",
             curvature.scale_by_curvature_diagonal,
             dict(estimator="hutchinson", num_samples=3, damping=1.0,
                  **_MODEL), reads_batch=True, chain_learning_rate=True),
    Contract("kfac", curvature.kfac,
             dict(learning_rate=0.01, inverse_every=2, **_MODEL),
             **_CURVATURE, damped="initial_damping"),
    Contract("kfac_adaptive", curvature.kfac,
             dict(learning_rate=1.0, adaptive=True, damping_every=2,
                  statistics_batch_size=8, **_MODEL), **_CURVATURE),
    Contract("scale_by_kfac", curvature.scale_by_kfac,
             dict(statistics="empirical_fisher", initial_damping=0.1,
                  **_MODEL), **_CURVATURE, damped="initial_damping",
             chain_learning_rate=True),
    Contract("scale_by_block_diagonal", curvature.scale_by_block_diagonal,
             dict(max_block_size=8, damping=0.1, inverse_every=2, **_MODEL),
             reads_batch=True, chain_learning_rate=True),
    Contract("ekfac", curvature.ekfac,
             dict(learning_rate=0.01, inverse_every=2, **_MODEL),
             **_CURVATURE),
    Contract("ekfac_adaptive", curvature.ekfac,
             dict(learning_rate=1.0, adaptive=True, damping_every=2,
                  gamma_every=2, **_MODEL), **_CURVATURE),
    Contract("kfac_schedule_averaging", curvature.kfac,
             dict(learning_rate=0.01, averaging="schedule", **_MODEL),
             **_CURVATURE),
    Contract("shampoo", curvature.shampoo,
             dict(learning_rate=0.01, inverse_every=2), self_rejecting=True),
    Contract("scale_by_shampoo", curvature.scale_by_shampoo,
             dict(inverse_every=2, statistics_decay=0.9,
                  graft=optax.scale_by_adam(b1=0.0)),
             self_rejecting=True, chain_learning_rate=True),
    Contract("scale_by_graft", _kfac_grafted_onto_adam, dict(**_MODEL),
             self_rejecting=True, reads_batch=True, first_order=True,
             chain_learning_rate=True, numeric_hyperparameters=False),
    Contract("soap", curvature.soap,
             dict(learning_rate=0.01, inverse_every=2, weight_decay=1e-4),
             self_rejecting=True, moves_without_gradient=True),
    Contract("scale_by_soap", curvature.scale_by_soap,
             dict(inverse_every=2), self_rejecting=True,
             chain_learning_rate=True),
    Contract("block_diagonal_natural_gradient",
             curvature.block_diagonal_natural_gradient,
             dict(learning_rate=0.01, curvature="sampled_fisher",
                  grouping="layer", max_block_size=12, **_MODEL),
             reads_batch=True),
    Contract("lbfgs", curvature.lbfgs,
             dict(learning_rate=1.0, memory_size=3, **_MODEL), **_HF),
    Contract("bfgs", curvature.bfgs, dict(learning_rate=1.0, **_MODEL),
             **_HF),
    Contract("nonlinear_cg", curvature.nonlinear_cg,
             dict(learning_rate=1.0, beta="hestenes_stiefel",
                  restart_every=2, **_MODEL), **_HF),
    Contract("saddle_free_newton", curvature.saddle_free_newton,
             dict(learning_rate=1.0, num_iterations=6, damping=0.1,
                  **_MODEL), **dict(_HF, monotone=False), damped="damping"),
)
CONTRACTS = {c.name: c for c in CONTRACT_TABLE}
assert len(CONTRACTS) == len(CONTRACT_TABLE), "duplicate contract names"
# The table as ``name -> (factory, kwargs)``, its older form.
TRANSFORMS = {c.name: (c.factory, c.kwargs) for c in CONTRACT_TABLE}


def contract_names(where: Callable[[Contract], bool] = lambda c: True,
                   **flags) -> list[str]:
  """Sorted names of the rows where ``where(row)`` holds and every flag in
  ``flags`` has the given truth value, e.g. ``contract_names(monotone=True)``
  or ``contract_names(damped=True)`` (any damping argument)."""
  for flag in flags:
    if flag not in Contract._fields:
      raise ValueError(f"{flag!r} is not a field of Contract: "
                       f"{Contract._fields}")
  return sorted(c.name for c in CONTRACT_TABLE if where(c) and all(
      bool(getattr(c, f)) == bool(v) for f, v in flags.items()))


def with_learning_rate(name, transform):
  """``transform`` chained with a learning rate where it has none of its
  own (a ``scale_by_*`` primitive, ``polyak_averaging``)."""
  row = CONTRACTS.get(name)
  chain = (row.chain_learning_rate if row is not None
           else name.startswith("scale_by") or name == "polyak_averaging")
  if chain:
    return optax.chain(transform, optax.scale_by_learning_rate(0.01))
  return transform


# The multi-device scripts of tests/test_sharding.py --------------------------
# (each runs in a subprocess with 4 forced host devices and imports these).


def attempt(fn, *args, **kwargs):
  """``fn(...)``, or the error's type and first line, so that one failing
  check is named instead of ending the script."""
  try:
    return fn(*args, **kwargs)
  except Exception as error:  # pylint: disable=broad-except
    return "ERROR " + type(error).__name__ + ": " + str(error).split("\n")[0]


def relative_difference(a, b):
  """``‖a − b‖ / ‖b‖`` of two pytrees (on the host), or ``a`` when it is an
  error message from :func:`attempt`."""
  if isinstance(a, str):
    return a
  a, b = flat(jax.tree.map(np.asarray, a)), flat(jax.tree.map(np.asarray, b))
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def train_steps(opt, params, batch, loss, steps=3):
  """``steps`` jitted steps of ``opt`` on the MLP: ``(params, state)``."""

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(
        lambda p: loss.value(mlp_predict(p, batch), batch["targets"]))(params)
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  for _ in range(steps):
    params, state = step(params, state, batch)
  return params, state


def diagnostics_differences(loss, params, batch, sharded_params,
                            sharded_batch):
  """Hutchinson's trace and the top two GGN eigenvalues, jitted, sharded
  against unsharded: ``{name: relative difference or error}``."""

  def diagnostics(params, batch):
    lin = curvature.linearize(mlp_predict, loss, params, batch)
    trace = curvature.hutchinson_trace(lin.matvec, params, num_samples=20,
                                       key=jax.random.key(0)).trace
    top = curvature.top_eigenpairs(lin.matvec, params, k=2,
                                   key=jax.random.key(1)).eigenvalues
    return trace, top

  jitted = jax.jit(diagnostics)
  reference = jitted(params, batch)
  sharded = attempt(jitted, sharded_params, sharded_batch)
  return {name: relative_difference(
      sharded if isinstance(sharded, str) else sharded[i], reference[i])
          for i, name in enumerate(("hutchinson_trace", "top_eigenpairs"))}
