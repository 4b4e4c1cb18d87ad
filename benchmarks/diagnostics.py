"""Benchmark: Lanczos, SLQ and eager diagnostics against their products.

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
* ``lanczos (no reorth.)``: the same with ``reorthogonalize="none"``.

Full reorthogonalization reads the ``20 × n`` basis once or twice per
iteration, so on a memory-bound CPU its share grows as the batch shrinks;
partial reorthogonalization reads it only when Simon's estimate of the loss
of orthogonality exceeds ``√ε``.

Both are compiled first; the timed runs are interleaved, and the script prints
the median of each and their ratio (target ≤ 1.15).

``--section density`` times ``curvature.spectral_density`` with ``P`` probes
(batched with ``vmap``, and one at a time) against one plain Lanczos run of
the same length plus its ``eigh``: the per-probe ratio (target ≤ 1.1).

``--section eager`` times ``curvature.top_eigenpairs`` called outside ``jit``
(after its first call, which compiles) against the same call inside
``jax.jit`` (target ≤ 1.5), and the old eager path (the un-jitted
implementation, every ``lax.scan`` dispatched from Python).

Usage::

  python benchmarks/diagnostics.py --batch 1000 --repeats 15
  python benchmarks/diagnostics.py --section density --batch 1000 --probes 4
  python benchmarks/diagnostics.py --section eager --batch 1000
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
      "Lanczos iterations (full reorthogonalization)": lanczos("full"),
      "Lanczos iterations (partial reorthogonalization)": lanczos("partial"),
      "Lanczos iterations (no reorthogonalization)": lanczos("none"),
  }


def density_functions(num_iterations, num_probes):
  """One plain Lanczos + eigh, and SLQ with ``num_probes`` probes."""
  loss = curvature.losses.sigmoid_binary_cross_entropy

  def plain(params, batch, vector):
    lin = curvature.linearize(predict, loss, params, batch)
    result = curvature.lanczos(lin.matvec, vector, num_iterations)
    return curvature._lanczos.eigh_tridiagonal(result)  # pylint: disable=protected-access

  def density(probe_batch_size):
    def run(params, batch, vector):
      del vector
      lin = curvature.linearize(predict, loss, params, batch)
      return curvature.spectral_density(
          lin.matvec, params, num_iterations=num_iterations,
          num_probes=num_probes, probe_batch_size=probe_batch_size)
    return jax.jit(run)

  return {
      "one Lanczos run + eigh": jax.jit(plain),
      f"spectral_density, {num_probes} probes, vmap": density(None),
      f"spectral_density, {num_probes} probes, one at a time": density(1),
  }


def eager_functions(params, batch, num_iterations):
  """``top_eigenpairs`` outside jit, inside jit, and the old eager path."""
  loss = curvature.losses.sigmoid_binary_cross_entropy
  lin = curvature.linearize(predict, loss, params, batch)
  kwargs = dict(k=1, num_iterations=num_iterations)

  def eager(params, batch, vector):
    del batch, vector
    return curvature.top_eigenpairs(lin.matvec, params, **kwargs).eigenvalues

  jitted = jax.jit(lambda params: curvature.top_eigenpairs(
      lin.matvec, params, **kwargs).eigenvalues)

  def old_eager(params, batch, vector):
    del batch, vector
    return curvature._lanczos._whole_eigenpairs(  # pylint: disable=protected-access
        lin.matvec, params, jax.random.key(0), k=1,
        num_iterations=num_iterations, reorthogonalize="full",
        largest=True).eigenvalues

  return {
      "top_eigenpairs inside jax.jit": lambda p, b, v: jitted(p),
      "top_eigenpairs called eagerly (compiles itself)": eager,
      "old eager path (no internal jit)": old_eager,
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
  parser.add_argument("--section", default="reorthogonalization",
                      choices=("reorthogonalization", "density", "eager"))
  parser.add_argument("--probes", type=int, default=4)
  args = parser.parse_args()

  key = jax.random.key(0)
  params_key, data_key, vector_key = jax.random.split(key, 3)
  params = init_params(params_key)
  batch = autoencoder_batch(data_key, args.batch)
  vector = jax.tree.map(
      lambda p: jax.random.normal(vector_key, p.shape, p.dtype), params)
  if args.section == "density":
    functions = density_functions(args.iterations, args.probes)
  elif args.section == "eager":
    functions = eager_functions(params, batch, args.iterations)
  else:
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
    print(f"{args.iterations} iterations, {name}: median"
          f" {median * 1e3:.1f} ms, ratio {median / baseline:.3f}")
  if args.section == "density":
    for name in names[1:]:
      print(f"{name}: per probe ÷ one Lanczos run"
            f" {medians[name] / args.probes / baseline:.3f} (target <= 1.1)")
    print(f"load average (1, 5, 15 min): {os.getloadavg()}")
    return
  if args.section == "eager":
    print(f"eager ÷ jitted {medians[names[1]] / baseline:.3f} (target <= 1.5);"
          f" old eager path ÷ jitted {medians[names[2]] / baseline:.3f}")
    print(f"load average (1, 5, 15 min): {os.getloadavg()}")
    return
  for name, (ritz, count) in list(outputs.items())[1:]:
    reorthogonalized = "" if count is None else (
        f"; {int(count)} of {args.iterations} vectors reorthogonalized")
    print(f"{name}: top Ritz values {np.asarray(ritz[-3:])}{reorthogonalized}")
  print(f"load average (1, 5, 15 min): {os.getloadavg()}")
  print("target: Lanczos / products <= 1.15")


if __name__ == "__main__":
  main()
