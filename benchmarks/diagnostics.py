"""Benchmark: 20 Lanczos iterations against 20 GGN products (issue 4).

On Hinton & Salakhutdinov's MNIST autoencoder shape
784-1000-500-250-30-250-500-1000-784 (logistic hidden units, a linear code
layer, sigmoid cross-entropy on the reconstruction; Martens 2010), with random
inputs in [0, 1], it times two jitted functions of ``(params, batch, v)``:

* ``products``: one ``curvature.linearize`` and 20 GGN products ``v ← Gv/‖Gv‖``;
* ``lanczos``: one ``curvature.linearize`` and ``curvature.lanczos`` with 20
  iterations and full reorthogonalization, then the Ritz values;
* ``lanczos (partial)``: the same with ``reorthogonalize="partial"``
  (Simon's partial reorthogonalization); the number of reorthogonalized
  vectors is printed;
* ``lanczos (no reorth.)``: the same with ``reorthogonalize=False``.

Full reorthogonalization reads the ``20 × n`` basis once or twice per
iteration, so on a memory-bound CPU its share grows as the batch shrinks;
partial reorthogonalization reads it only when Simon's estimate of the loss
of orthogonality exceeds ``√ε``.

Both are compiled first; the timed runs are interleaved, and the script prints
the median of each and their ratio (target ≤ 1.15).

Usage::

  python benchmarks/diagnostics.py --batch 1000 --repeats 15
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import curvature
from _common import autoencoder_batch
from _common import autoencoder_params as init_params
from _common import autoencoder_predict as predict
from _common import machine

def make_functions(num_iterations):
  loss = curvature.losses.sigmoid_binary_cross_entropy

  def products(params, batch, vector):
    lin = curvature.linearize(predict, loss, params, batch)

    def body(_, v):
      product = lin.matvec(v)
      norm = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(product)))
      return jax.tree.map(lambda x: x / norm, product)

    return jax.lax.fori_loop(0, num_iterations, body, vector)

  def lanczos(reorthogonalize):
    def run(params, batch, vector):
      lin = curvature.linearize(predict, loss, params, batch)
      result = curvature.lanczos(
          lin.matvec, vector, num_iterations, reorthogonalize=reorthogonalize)
      return curvature.ritz_values(result), result.num_reorthogonalizations

    return jax.jit(run)

  return {
      "GGN products (shared linearization)": jax.jit(products),
      "Lanczos iterations (full reorthogonalization)": lanczos(True),
      "Lanczos iterations (partial reorthogonalization)": lanczos("partial"),
      "Lanczos iterations (no reorthogonalization)": lanczos(False),
  }


def timed(fn, *args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1000)
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--iterations", type=int, default=20)
  args = parser.parse_args()

  key = jax.random.key(0)
  params_key, data_key, vector_key = jax.random.split(key, 3)
  params = init_params(params_key)
  batch = autoencoder_batch(data_key, args.batch)
  vector = jax.tree.map(
      lambda p: jax.random.normal(vector_key, p.shape, p.dtype), params)
  functions = make_functions(args.iterations)

  compile_start = time.perf_counter()
  outputs = {name: jax.block_until_ready(fn(params, batch, vector))
             for name, fn in functions.items()}
  compile_seconds = time.perf_counter() - compile_start

  times = {name: [] for name in functions}
  names = list(functions)
  for repeat in range(args.repeats):
    for name in names[repeat % len(names):] + names[:repeat % len(names)]:
      times[name].append(timed(functions[name], params, batch, vector))

  num_params = sum(p.size for p in jax.tree.leaves(params))
  medians = {name: statistics.median(t) for name, t in times.items()}
  baseline = medians[names[0]]
  print(f"machine: {machine()}")
  print(f"jax {jax.__version__}; {num_params:,} parameters, batch"
        f" {args.batch}, float32, {args.repeats} interleaved repeats;"
        f" compile (all) {compile_seconds:.1f} s")
  for name, median in medians.items():
    print(f"{args.iterations} {name}: median {median * 1e3:.1f} ms,"
          f" ratio {median / baseline:.3f}")
  for name, (ritz, count) in list(outputs.items())[1:]:
    reorthogonalized = "" if count is None else (
        f"; {int(count)} of {args.iterations} vectors reorthogonalized")
    print(f"{name}: top Ritz values {np.asarray(ritz[-3:])}{reorthogonalized}")
  print(f"load average (1, 5, 15 min): {os.getloadavg()}")
  print("target: Lanczos / products <= 1.15")


if __name__ == "__main__":
  main()
