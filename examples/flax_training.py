"""Curvature optimizers in Flax training steps: linen ``TrainState`` and nnx.

Both models are small MLP classifiers on a synthetic two-moons-like problem.
The optimizer is the same in both: ``optax.clip_by_global_norm``, then the
curvature transform (Hessian-free, or Adam for comparison) with an
``optax.schedules`` learning rate, all inside ``optax.MultiSteps`` that
accumulates gradients over ``k`` micro-batches.

Two things differ from a first-order Flax step:

* The transform needs the batch: ``update(grads, state, params,
  batch=batch)``. ``nnx.Optimizer.update(model, grads, **kwargs)`` forwards
  keyword arguments to ``tx.update``; linen's ``TrainState.apply_gradients``
  does not (its ``**kwargs`` replace dataclass fields), so the linen step
  calls ``tx.update`` itself (:func:`apply_gradients`).
* ``predict_fn(params, batch)`` takes the parameter pytree that the
  optimizer sees: linen's ``params`` dict, or for nnx the pure
  ``nnx.Param`` state, merged back with the module's graph definition.

``optax.MultiSteps`` goes outermost, so the extra arguments reach the
curvature transform (``optax.chain`` forwards them too, but a plain
``GradientTransformation`` in between would drop them). The curvature
transform runs once per ``k`` micro-batches, on the mean gradient and on the
last micro-batch: its curvature products, ``ρ`` and line search use that
micro-batch only.

Run: ``python examples/flax_training.py``.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.training import train_state

import curvature

LOSS = curvature.losses.softmax_cross_entropy


def make_data(key, num_examples=256):
  """Two noisy interleaved half-circles, labels 0/1."""
  k1, k2 = jax.random.split(key)
  labels = jax.random.bernoulli(k1, 0.5, (num_examples,)).astype(jnp.int32)
  angle = jnp.pi * jax.random.uniform(k2, (num_examples,))
  x = jnp.where(labels == 0, jnp.cos(angle), 1.0 - jnp.cos(angle))
  y = jnp.where(labels == 0, jnp.sin(angle), 0.5 - jnp.sin(angle))
  noise = 0.1 * jax.random.normal(jax.random.fold_in(key, 1),
                                  (num_examples, 2))
  return {"inputs": jnp.stack([x, y], axis=1) + noise, "targets": labels}


def batches(data, batch_size):
  """The data as a list of equal batches (drop the remainder)."""
  n = data["targets"].shape[0] // batch_size
  return [jax.tree.map(lambda x: x[i * batch_size:(i + 1) * batch_size], data)
          for i in range(n)]


def make_optimizer(predict_fn, name="hessian_free", every_k=2,
                   total_steps=100) -> optax.MultiSteps:
  """``MultiSteps(chain(clip_by_global_norm, optimizer with a schedule))``."""
  if name == "hessian_free":
    schedule = optax.schedules.linear_schedule(1.0, 0.5, total_steps)
    inner = curvature.hessian_free(schedule, predict_fn=predict_fn, loss=LOSS,
                                   max_cg_iterations=20, l2_reg=1e-4)
  elif name == "adam":
    schedule = optax.schedules.warmup_cosine_decay_schedule(
        0.0, 1e-2, warmup_steps=5, decay_steps=total_steps)
    inner = curvature.adam(schedule)
  else:
    raise ValueError(f"Unknown optimizer {name!r}; use 'hessian_free' or"
                     " 'adam'.")
  return optax.MultiSteps(optax.chain(optax.clip_by_global_norm(10.0), inner),
                          every_k_schedule=every_k)


# --- linen + TrainState -----------------------------------------------------


class LinenMLP(nn.Module):
  hidden: int = 16
  classes: int = 2

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(self.hidden)(x))
    return nn.Dense(self.classes)(x)


def linen_predict_fn(module: nn.Module) -> Callable[[Any, Any], jax.Array]:
  """``predict_fn(params, batch)`` for a linen module's ``params`` dict."""
  return lambda params, batch: module.apply({"params": params},
                                            batch["inputs"])


def apply_gradients(state: train_state.TrainState, grads, **extra_args):
  """``TrainState.apply_gradients`` that forwards ``batch=`` to the optimizer."""
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params,
                                       **extra_args)
  return state.replace(step=state.step + 1,
                       params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state)


def create_linen_state(key, example_batch, name="hessian_free", every_k=2):
  module = LinenMLP()
  params = module.init(key, example_batch["inputs"])["params"]
  predict = linen_predict_fn(module)
  tx = make_optimizer(predict, name, every_k).gradient_transformation()
  return train_state.TrainState.create(apply_fn=module.apply, params=params,
                                       tx=tx), predict


def make_linen_step(predict):
  @jax.jit
  def step(state, batch):
    def loss_fn(params):
      return LOSS.value(predict(params, batch), batch["targets"])
    value, grads = jax.value_and_grad(loss_fn)(state.params)
    return apply_gradients(state, grads, batch=batch), value
  return step


# --- nnx + nnx.Optimizer ----------------------------------------------------


class NnxMLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs, hidden: int = 16, classes: int = 2):
    self.hidden = nnx.Linear(2, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, classes, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def nnx_predict_fn(model: nnx.Module) -> Callable[[Any, Any], jax.Array]:
  """``predict_fn(params, batch)`` for the pure ``nnx.Param`` state.

  ``nnx.Optimizer`` hands ``tx.update`` the parameters as a pure state
  (arrays, no ``Variable`` wrappers); the model is rebuilt from its graph
  definition, the parameters and the rest of its state.
  """
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  return lambda params, batch: nnx.merge(graphdef, params, rest)(
      batch["inputs"])


def create_nnx_optimizer(seed=0, name="hessian_free", every_k=2):
  model = NnxMLP(nnx.Rngs(seed))
  predict = nnx_predict_fn(model)
  tx = make_optimizer(predict, name, every_k).gradient_transformation()
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def nnx_step(model, optimizer, batch):
  def loss_fn(model):
    return LOSS.value(model(batch["inputs"]), batch["targets"])
  value, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads, batch=batch)  # Forwarded to tx.update.
  return value


def train_linen(name, data, epochs=5, batch_size=32, every_k=2):
  data_batches = batches(data, batch_size)
  state, predict = create_linen_state(jax.random.key(0), data_batches[0],
                                      name, every_k)
  step = make_linen_step(predict)
  values = []
  for _ in range(epochs):
    for batch in data_batches:
      state, value = step(state, batch)
      values.append(float(value))
  return state, values


def train_nnx(name, data, epochs=5, batch_size=32, every_k=2):
  data_batches = batches(data, batch_size)
  model, optimizer = create_nnx_optimizer(0, name, every_k)
  values = []
  for _ in range(epochs):
    for batch in data_batches:
      values.append(float(nnx_step(model, optimizer, batch)))
  return model, values


def main():
  data = make_data(jax.random.key(42))
  for api, train in (("linen", train_linen), ("nnx", train_nnx)):
    for name in ("hessian_free", "adam"):
      _, values = train(name, data)
      print(f"{api:5s} {name:12s} loss {values[0]:.3f} -> {values[-1]:.3f}")


if __name__ == "__main__":
  main()
