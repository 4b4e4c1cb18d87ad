"""Where K-FAC-reduce's step time goes on the character LM of transformer.py.

Each row is a K-FAC-reduce variant (damping 0.1, ``inverse_every=10``, the
model, data and batch of ``benchmarks/transformer.py``), timed against
``optax.adamw`` in the same run: every step compiled and run past the
inverse warm-up first, then rounds of 10 steps of each row in turn; the
figure is the median over the rounds of each row's time per step divided by
AdamW's.

    python benchmarks/kfac_step_parts.py [--rounds 7] [--rows kfac,kfac_sos]
"""

import argparse
import os
import sys
import time

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

import curvature

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import transformer as bench  # pylint: disable=g-import-not-at-top,wrong-import-position
from _common import machine  # pylint: disable=g-import-not-at-top,wrong-import-position

ROWS = {
    "kfac": ("factors and diagonal from all 32 examples", {}),
    "kfac_no_refresh": ("no refresh after the warm-up (inverse_every=1000)",
                        dict(inverse_every=1000, inverse_warmup=False)),
    "kfac_stats1": ("statistics from 1 example",
                    dict(statistics_batch_size=1)),
    "kfac_stats16": ("statistics from 16 examples",
                     dict(statistics_batch_size=16)),
    "kfac_diag8": ("diagonal from 8 examples (diagonal_batch_size=8)",
                   dict(diagonal_batch_size=8)),
    "kfac_sos": ("diagonal from square_of_sum",
                 dict(diagonal_estimator="square_of_sum")),
}


def optimizer(config, example, overrides):
  kwargs = dict(predict_fn=bench.predict_fn(config), loss=bench.LOSS,
                momentum=0.9, initial_damping=0.1, inverse_every=10,
                weight_sharing="reduce", example_batch=example)
  return curvature.kfac(1e-3, **dict(kwargs, **overrides))


def make_step(opt, needs_batch, tokens, config):
  model = bench.predict_fn(config)

  @jax.jit
  def step(params, state, key):
    batch = bench.sample_batch(key, tokens, config)
    value, grads = jax.value_and_grad(
        lambda p: bench.LOSS.value(model(p, batch), batch["targets"]))(params)
    extra = {"batch": batch} if needs_batch else {}
    updates, state = opt.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, value

  return step


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--rows", default=",".join(ROWS))
  args = parser.parse_args(argv)
  config = bench.Config()
  tokens = jax.numpy.asarray(bench.load_data(config)["train"])
  example = bench.sample_batch(jax.random.key(0), tokens, config)
  names = ["adamw"] + args.rows.split(",")
  steps, carries = {}, {}
  for name in tqdm(names, desc="compile and warm up"):
    if name == "adamw":
      opt, needs_batch = optax.adamw(1e-3), False
    else:
      opt, needs_batch = optimizer(config, example, ROWS[name][1]), True
    steps[name] = make_step(opt, needs_batch, tokens, config)
    params = bench.init_params(config)
    state = opt.init(params)
    for k in range(12):  # Past the geometric refresh warm-up (1, 2, 4, 8).
      params, state, value = steps[name](params, state, jax.random.key(k))
    jax.block_until_ready(value)
    carries[name] = (params, state)
  times = {name: [] for name in names}
  key = jax.random.key(3)
  for _ in tqdm(range(args.rounds), desc="timing"):
    for name in names:
      params, state = carries[name]
      start = time.perf_counter()
      for _ in range(10):
        key, sub = jax.random.split(key)
        params, state, value = steps[name](params, state, sub)
      jax.block_until_ready(value)
      times[name].append((time.perf_counter() - start) / 10)
      carries[name] = (params, state)
  adam = np.asarray(times["adamw"])
  print("| K-FAC-reduce variant | step (ms) | step ÷ AdamW |")
  print("|---|---|---|")
  print(f"| AdamW | {1e3 * np.median(adam):.1f} | 1 |")
  for name in names[1:]:
    ratio = np.median(np.asarray(times[name]) / adam)
    print(f"| {ROWS[name][0]} | {1e3 * np.median(times[name]):.1f} |"
          f" {ratio:.2f} |")
  print(machine())


if __name__ == "__main__":
  main()
