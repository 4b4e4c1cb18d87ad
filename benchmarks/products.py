"""Cost of curvature-vector products and of one Hessian-free step.

Model: the MNIST autoencoder of Hinton & Salakhutdinov (2006) and Martens
(2010), 784-1000-500-250-30-250-500-1000-784, sigmoid hidden units, a linear
code layer and sigmoid cross-entropy; random inputs in [0, 1]; float32.

Every figure is a ratio against a baseline timed in the same run: the times
exclude compilation, each measurement calls a jitted function and blocks on
its result, the candidates are interleaved round-robin, and the median over
``--repeats`` rounds is reported.

Run: ``python benchmarks/products.py [--batch 1000] [--repeats 15]``.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import curvature
from _common import autoencoder_batch
from _common import autoencoder_params as init_params
from _common import autoencoder_predict as predict
from _common import machine


LOSS = curvature.losses.sigmoid_binary_cross_entropy


def loss_fn(params, batch):
  return LOSS.value(predict(params, batch), batch["targets"])


def timed(fn, *args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def interleaved_medians(candidates, args, repeats):
  for fn in candidates.values():  # Compile and warm up.
    jax.block_until_ready(fn(*args))
  samples = {name: [] for name in candidates}
  for _ in range(repeats):
    for name, fn in candidates.items():
      samples[name].append(timed(fn, *args))
  return {name: float(np.median(s)) for name, s in samples.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1000)
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--cg-iterations", type=int, default=10)
  args = parser.parse_args()
  k = args.cg_iterations

  key = jax.random.key(0)
  params = init_params(key)
  batch = autoencoder_batch(jax.random.key(1), args.batch)
  vector = jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)

  value_and_grad = jax.jit(jax.value_and_grad(loss_fn))

  @jax.jit
  def shared_ggn(params, batch, vectors):
    # One linearization, k products: the cost per product is what CG pays.
    lin = curvature.linearize(predict, LOSS, params, batch)
    return jax.lax.map(lin.matvec, vectors)

  @jax.jit
  def linearize_only(params, batch, vectors):
    # The same function with no product: the linearization's own cost.
    lin = curvature.linearize(predict, LOSS, params, batch)
    return lin.grad

  @jax.jit
  def fresh_ggn(params, batch, vector):
    return curvature.ggn_vector_product(predict, LOSS, params, batch, vector)

  @jax.jit
  def hvp_forward_over_reverse(params, batch, vector):
    return curvature.hessian_vector_product(
        lambda p: loss_fn(p, batch), params, vector)

  @jax.jit
  def hvp_reverse_over_reverse(params, batch, vector):
    grad_dot_v = lambda p: optax.tree.vdot(
        jax.grad(loss_fn)(p, batch), vector)
    return jax.grad(grad_dot_v)(params)

  @jax.jit
  def loss_only(params, batch):
    return loss_fn(params, batch)

  hf = curvature.scale_by_hessian_free(
      predict, LOSS, max_cg_iterations=k, progress_tol=None, cg_tol=0.0,
      backtracking=False, line_search=False)
  hf_state = hf.init(params)

  @jax.jit
  def hf_step(params, batch, grads):
    return hf.update(grads, hf_state, params, batch=batch)[0]

  vectors = jax.tree.map(lambda v: jnp.stack([v] * k), vector)
  grads = value_and_grad(params, batch)[1]
  t = interleaved_medians(
      {
          "value_and_grad": lambda: value_and_grad(params, batch),
          "linearize (value, grad)": lambda: linearize_only(params, batch,
                                                            vectors),
          f"linearize + {k} GGN products": lambda: shared_ggn(params, batch,
                                                              vectors),
          "fresh GGN product": lambda: fresh_ggn(params, batch, vector),
          "HVP forward-over-reverse": lambda: hvp_forward_over_reverse(
              params, batch, vector),
          "HVP reverse-over-reverse": lambda: hvp_reverse_over_reverse(
              params, batch, vector),
          "loss": lambda: loss_only(params, batch),
          f"HF step, {k} CG iterations": lambda: hf_step(params, batch, grads),
      },
      (),
      args.repeats,
  )
  base = t["value_and_grad"]
  per_product = (t[f"linearize + {k} GGN products"]
                 - t["linearize (value, grad)"]) / k
  hf_budget = (base + t["linearize (value, grad)"] + k * per_product
               + t["loss"])
  print(f"machine: {machine()}")
  print(f"batch {args.batch}, float32, median of {args.repeats} interleaved"
        " rounds, compile time excluded")
  print(f"{'measurement':42s} {'ms':>9s}")
  for name, seconds in t.items():
    print(f"{name:42s} {1e3 * seconds:9.2f}")
  rows = [
      ("GGN product, shared linearization / value_and_grad",
       per_product / base, 1.6),
      ("fresh GGN product / value_and_grad", t["fresh GGN product"] / base,
       2.2),
      ("HVP (forward-over-reverse) / value_and_grad",
       t["HVP forward-over-reverse"] / base, 3.0),
      ("HVP forward-over-reverse / reverse-over-reverse",
       t["HVP forward-over-reverse"] / t["HVP reverse-over-reverse"], 1.0),
      (f"HF step (K={k}) / (grad + linearize + {k} products + loss)",
       t[f"HF step, {k} CG iterations"] / hf_budget, 1.10),
  ]
  print(f"\n{'ratio':62s} {'value':>7s} {'target':>7s}")
  for name, ratio, target in rows:
    mark = "ok" if ratio <= target else "MISSED"
    print(f"{name:62s} {ratio:7.2f} {target:7.2f}  {mark}")


if __name__ == "__main__":
  main()
