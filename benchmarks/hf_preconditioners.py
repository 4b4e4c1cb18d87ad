"""Preconditioned Hessian-free against plain Hessian-free and Adam on digits.

The second model of the Hessian-free preconditioner comparison (the first is
``convergence.py``'s CURVES-like autoencoder): the deep sigmoid autoencoder
of the digits, 64-48-24-6-24-48-64, of ``examples/digits_autoencoder.py``
(scikit-learn's 1797 digits, nothing downloaded), L2 1e-5.

* Adam, batch 100, at its best learning rate of {3e-3, 1e-2, 3e-2} over
  ``--epochs`` epochs: its best full-data loss is the target ``L``.
* ``curvature.hessian_free`` on the full batch (curvature and evaluation
  batches of 512), with ``preconditioner=None`` and ``"kfac"``.

Each row is warmed up (its step compiled and run twice on a throwaway
state), then timed from a fresh state; the clock covers the jitted steps
only (``block_until_ready``), not the full-data loss evaluations. The rows
are run ``--repeats`` times, interleaved (Adam, HF, HF-K-FAC, Adam, …), and
the median seconds to ``L`` is reported with the outer iterations and CG
iterations per outer iteration.

Run: ``python benchmarks/hf_preconditioners.py [--epochs 200] [--repeats 3]``.
"""

import argparse
import os
import sys
import time

import jax
import numpy as np
import optax

import curvature

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
from _common import machine  # noqa: E402
import digits_autoencoder as digits  # noqa: E402

ADAM_LRS = (3e-3, 1e-2, 3e-2)
HF_ROWS = {"hessian_free": dict(preconditioner=None),
           "hessian_free, kfac": dict(preconditioner="kfac")}


def _loss_fn(data):
  return jax.jit(lambda p: digits.training_loss(p, data))


def adam_run(data, lr, epochs, batch_size=100, seed=0, target=None):
  """``(seconds, losses)`` per epoch; stops at ``target`` when given."""
  opt = optax.adam(lr)
  n = data["inputs"].shape[0]
  per_epoch = n // batch_size
  loss = _loss_fn(data)

  @jax.jit
  def epoch(params, state, key):
    order = jax.random.permutation(key, n)[: per_epoch * batch_size]
    batches = jax.tree.map(lambda x: x[order].reshape(
        (per_epoch, batch_size) + x.shape[1:]), data)

    def step(carry, batch):
      params, state = carry
      updates, state = opt.update(
          jax.grad(digits.training_loss)(params, batch), state, params)
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(step, (params, state), batches)[0]

  params = digits.init_params(seed)
  jax.block_until_ready(epoch(*epoch(params, opt.init(params),
                                     jax.random.key(99)), jax.random.key(98)))
  state, key = opt.init(params), jax.random.key(seed)
  seconds, losses, clock = [], [], 0.0
  for _ in range(epochs):
    key, sub = jax.random.split(key)
    start = time.perf_counter()
    params, state = jax.block_until_ready(epoch(params, state, sub))
    clock += time.perf_counter() - start
    seconds.append(clock)
    losses.append(float(loss(params)))
    if target is not None and losses[-1] <= target:
      break
  return np.asarray(seconds), np.asarray(losses)


def hf_run(data, iterations, target, seed=0, **kwargs):
  """``(seconds, losses, cg iterations)`` per outer iteration, to ``target``."""
  opt = curvature.hessian_free(
      predict_fn=digits.predict, loss=digits.LOSS, l2_reg=digits.L2_REG,
      curvature_batch_size=512, evaluation_batch_size=512, **kwargs)
  loss = _loss_fn(data)

  @jax.jit
  def step(params, state):
    grads = jax.grad(digits.training_loss)(params, data)
    updates, state = opt.update(grads, state, params, batch=data)
    return optax.apply_updates(params, updates), state

  params = digits.init_params(seed)
  jax.block_until_ready(step(*step(params, opt.init(params))))
  state = opt.init(params)
  seconds, losses, cg, clock = [], [], [], 0.0
  for _ in range(iterations):
    start = time.perf_counter()
    params, state = jax.block_until_ready(step(params, state))
    clock += time.perf_counter() - start
    seconds.append(clock)
    losses.append(float(loss(params)))
    cg.append(int(state[0].cg_iterations))
    if losses[-1] <= target:
      break
  return np.asarray(seconds), np.asarray(losses), np.asarray(cg)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=200)
  parser.add_argument("--iterations", type=int, default=300)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  data = digits.load_data()

  finals = {lr: adam_run(data, lr, args.epochs)[1].min() for lr in ADAM_LRS}
  best_lr = min(finals, key=finals.get)
  target = float(finals[best_lr])
  print(f"Adam's best loss over {args.epochs} epochs: L = {target:.4f} "
        f"(lr {best_lr:g}; others: "
        + ", ".join(f"{lr:g}: {v:.4f}" for lr, v in finals.items()) + ")")

  results = {name: [] for name in ["adam"] + list(HF_ROWS)}
  for _ in range(args.repeats):
    seconds, losses = adam_run(data, best_lr, args.epochs, target=target)
    results["adam"].append((len(losses), seconds[-1], None))
    for name, kwargs in HF_ROWS.items():
      seconds, losses, cg = hf_run(data, args.iterations, target, **kwargs)
      hit = losses[-1] <= target
      results[name].append((len(losses) if hit else None,
                            seconds[-1] if hit else None, cg.mean()))

  adam_seconds = np.median([r[1] for r in results["adam"]])
  print(f"\ndigits autoencoder {'-'.join(map(str, digits.LAYERS))}, "
        f"machine: {machine()}, median of {args.repeats} interleaved runs")
  print(f"{'optimizer':22s}{'steps to L':>12s}{'s to L':>9s}"
        f"{'÷ Adam':>8s}{'CG/iter':>9s}")
  for name, runs in results.items():
    steps = [r[0] for r in runs]
    secs = [r[1] for r in runs]
    if any(s is None for s in secs):
      print(f"{name:22s}{'—':>12s}{'—':>9s}")
      continue
    t = float(np.median(secs))
    cg = "" if runs[0][2] is None else f"{np.mean([r[2] for r in runs]):9.1f}"
    unit = "epochs" if name == "adam" else ""
    print(f"{name:22s}{int(np.median(steps)):>12d}{t:9.2f}"
          f"{t / adam_seconds:8.2f}{cg} {unit}")


if __name__ == "__main__":
  main()
