"""Speed of curvature's first-order aliases against optax's.

On the 2.84M-parameter MNIST deep autoencoder pytree
(784-1000-500-250-30-250-500-1000-784, Hinton & Salakhutdinov 2006), times

* ``update`` + ``optax.apply_updates``, jitted, for ``curvature.adam`` vs
  ``optax.adam`` and ``curvature.heavy_ball`` vs ``optax.sgd(momentum=0.9)``;
* a full train step (``value_and_grad`` of the reconstruction loss on a batch,
  then update and apply) with Adam.

Compilation is excluded (one warm-up call each). Runs are interleaved (ours,
theirs, ours, ...) so that drift in machine load hits both alike; each sample
times ``--inner`` consecutive steps, and the median over ``--repeats``
samples is reported. Targets (issue 3): update ratios <= 1.10, train step
<= 1.03.

Usage: ``python benchmarks/first_order.py [--repeats 21] [--inner 10]``
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import curvature
from _common import LAYERS
from _common import autoencoder_batch
from _common import autoencoder_params
from _common import autoencoder_predict
from _common import machine



def reconstruction_loss(params, inputs):
  """Mean per-pixel sigmoid cross-entropy, as optax users write it."""
  logits = autoencoder_predict(params, {"inputs": inputs})
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, inputs))


def update_step(opt):
  @jax.jit
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def train_step(opt):
  @jax.jit
  def step(params, state, inputs):
    loss, grads = jax.value_and_grad(reconstruction_loss)(params, inputs)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss
  return step


def _timed(step, carry, arg, inner):
  """Seconds per step over ``inner`` consecutive steps; returns new carry."""
  params, state = carry
  jax.block_until_ready((params, state))
  start = time.perf_counter()
  for _ in range(inner):
    out = step(params, state, arg)
    params, state = out[0], out[1]
  jax.block_until_ready((params, state))
  return (time.perf_counter() - start) / inner, (params, state)


def compare(label, ours, theirs, make_step, params, arg, repeats, inner):
  """Median seconds per step of ours and theirs, interleaved."""
  steps = {"ours": make_step(ours), "optax": make_step(theirs)}
  carries = {"ours": (params, ours.init(params)),
             "optax": (params, theirs.init(params))}
  for name, step in steps.items():  # Compile and warm up.
    _, carries[name] = _timed(step, carries[name], arg, 1)
  times = {"ours": [], "optax": []}
  for _ in range(repeats):
    for name in ("ours", "optax"):
      t, carries[name] = _timed(steps[name], carries[name], arg, inner)
      times[name].append(t)
  med = {k: statistics.median(v) for k, v in times.items()}
  ratio = med["ours"] / med["optax"]
  print(f"{label:<34} ours {1e3 * med['ours']:8.3f} ms   optax"
        f" {1e3 * med['optax']:8.3f} ms   ratio {ratio:5.3f}")
  return ratio


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=21)
  parser.add_argument("--inner", type=int, default=10)
  parser.add_argument("--batch", type=int, default=256)
  args = parser.parse_args()

  params = autoencoder_params(jax.random.key(0))
  n = sum(x.size for x in jax.tree.leaves(params))
  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
  inputs = autoencoder_batch(jax.random.key(1), args.batch)["inputs"]
  print(f"machine: {machine()}, optax {optax.__version__}")
  print(f"autoencoder {'-'.join(map(str, LAYERS))}: {n:,} parameters;"
        f" median of {args.repeats} interleaved samples x {args.inner} steps")

  results = {
      "adam update": compare(
          "adam: update + apply", curvature.adam(1e-3), optax.adam(1e-3),
          update_step, params, grads, args.repeats, args.inner),
      "momentum update": compare(
          "momentum 0.9: update + apply", curvature.heavy_ball(1e-2, 0.9),
          optax.sgd(1e-2, momentum=0.9), update_step, params, grads,
          args.repeats, args.inner),
      "adam train step": compare(
          f"adam: train step (batch {args.batch})", curvature.adam(1e-3),
          optax.adam(1e-3), train_step, params, inputs, args.repeats,
          args.inner),
  }
  targets = {"adam update": 1.10, "momentum update": 1.10,
             "adam train step": 1.03}
  for name, ratio in results.items():
    verdict = "meets" if ratio <= targets[name] else "MISSES"
    print(f"{name:<18} ratio {ratio:5.3f}  {verdict} target"
          f" <= {targets[name]:.2f}")


if __name__ == "__main__":
  main()
