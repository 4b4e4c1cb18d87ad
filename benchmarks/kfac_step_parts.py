"""Where K-FAC's step time goes, against a first-order step in the same run.

``--model transformer`` (the default): K-FAC-reduce variants (damping 0.1,
``inverse_every=10``) on the character LM of ``benchmarks/transformer.py``,
against ``optax.adamw``. ``--model curves``: adaptive K-FAC variants (λ₀ =
150, M&G's T₁ = 5, T₃ = 20) on the CURVES-like autoencoder and batch of 1000
of ``benchmarks/convergence.py``, against ``optax.adam``.

Every step is jitted with its gradient and batch sampling, compiled and run
past the inverse warm-up first; then come rounds of ``--window`` steps of
each row in turn (20 by default, a whole refresh period for CURVES, so
refreshes and damping adaptations are in every window). The figure is the
median over the rounds of each row's time per step divided by the baseline's.

    python benchmarks/kfac_step_parts.py [--rounds 7] [--rows kfac,kfac_sos]
    python benchmarks/kfac_step_parts.py --model curves
"""

import argparse
import os
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

import curvature

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # pylint: disable=g-import-not-at-top,wrong-import-position
import convergence as curves  # pylint: disable=g-import-not-at-top,wrong-import-position
import transformer as bench  # pylint: disable=g-import-not-at-top,wrong-import-position

TRANSFORMER_ROWS = {
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

CURVES_ROWS = {
    "kfac": ("adaptive, the defaults (refresh every 20, damping every 5)",
             {}),
    "kfac_no_refresh": ("no refresh after the warm-up (inverse_every=1000)",
                        dict(inverse_every=1000, inverse_warmup=False)),
    "kfac_no_damping": ("no damping adaptation (damping_every=1000)",
                        dict(damping_every=1000)),
    "kfac_fixed": ("fixed mode: no quadratic model (lr 1e-3, momentum)",
                   dict(adaptive=False, learning_rate=1e-3)),
    "kfac_sub250": ("statistics and quadratic model from 250 of 1000",
                    dict(statistics_batch_size=250,
                         quadratic_batch_size=250)),
}


class Problem(NamedTuple):
  """A model, its batches, the baseline and the K-FAC rows to time."""
  baseline: str
  baseline_opt: optax.GradientTransformation
  rows: dict
  init_params: Callable[[], Any]
  sample_batch: Callable[[Any], Any]  # key -> batch
  value: Callable[[Any, Any], Any]  # (params, batch) -> loss
  kfac: Callable[[dict], optax.GradientTransformation]  # overrides -> opt


def transformer_problem():
  config = bench.Config()
  tokens = jax.numpy.asarray(bench.load_data(config)["train"])
  example = bench.sample_batch(jax.random.key(0), tokens, config)
  model = bench.predict_fn(config)

  def kfac(overrides):
    kwargs = dict(predict_fn=model, loss=bench.LOSS, momentum=0.9,
                  initial_damping=0.1, inverse_every=10,
                  weight_sharing="reduce", example_batch=example)
    return curvature.kfac(1e-3, **dict(kwargs, **overrides))

  return Problem(
      "AdamW", optax.adamw(1e-3), TRANSFORMER_ROWS,
      lambda: bench.init_params(config),
      lambda key: bench.sample_batch(key, tokens, config),
      lambda p, batch: bench.LOSS.value(model(p, batch), batch["targets"]),
      kfac)


def curves_problem():
  data = curves.load_data(20_000)

  def kfac(overrides):
    kwargs = dict(learning_rate=1.0, predict_fn=curves.predict,
                  loss=curves.LOSS, l2_reg=curves.L2_REG, adaptive=True,
                  initial_damping=150.0)
    kwargs.update(overrides)
    return curvature.kfac(**kwargs)

  return Problem(
      "Adam", optax.adam(3e-3), CURVES_ROWS, curves.init_params,
      lambda key: curves._batch_at(data, key, 1000),  # pylint: disable=protected-access
      curves.objective, kfac)


PROBLEMS = {"transformer": transformer_problem, "curves": curves_problem}


def make_step(opt, needs_batch, problem):
  @jax.jit
  def step(params, state, key):
    batch = problem.sample_batch(key)
    value, grads = jax.value_and_grad(problem.value)(params, batch)
    extra = {"batch": batch} if needs_batch else {}
    updates, state = opt.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, value

  return step


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=sorted(PROBLEMS),
                      default="transformer")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--window", type=int, default=None,
                      help="steps per timed window (10 for the transformer,"
                      " 20 for CURVES)")
  parser.add_argument("--rows", default=None,
                      help="comma-separated rows (default: all the model's)")
  args = parser.parse_args(argv)
  problem = PROBLEMS[args.model]()
  window = args.window or (20 if args.model == "curves" else 10)
  names = [problem.baseline] + (args.rows.split(",") if args.rows
                                else list(problem.rows))
  steps, carries = {}, {}
  for name in tqdm(names, desc="compile and warm up"):
    if name == problem.baseline:
      opt, needs_batch = problem.baseline_opt, False
    else:
      opt, needs_batch = problem.kfac(problem.rows[name][1]), True
    steps[name] = make_step(opt, needs_batch, problem)
    params = problem.init_params()
    state = opt.init(params)
    for k in range(2 * window + 1):  # Past the refresh warm-up (1, 2, 4, 8).
      params, state, value = steps[name](params, state, jax.random.key(k))
    jax.block_until_ready(value)
    carries[name] = (params, state)
  times = {name: [] for name in names}
  key = jax.random.key(3)
  for _ in tqdm(range(args.rounds), desc="timing"):
    for name in names:
      params, state = carries[name]
      start = time.perf_counter()
      for _ in range(window):
        key, sub = jax.random.split(key)
        params, state, value = steps[name](params, state, sub)
      jax.block_until_ready(value)
      times[name].append((time.perf_counter() - start) / window)
      carries[name] = (params, state)
  base = np.asarray(times[problem.baseline])
  print(f"| K-FAC variant ({args.model}) | step (ms) |"
        f" step ÷ {problem.baseline} |")
  print("|---|---|---|")
  print(f"| {problem.baseline} | {1e3 * np.median(base):.2f} | 1 |")
  for name in names[1:]:
    ratio = np.median(np.asarray(times[name]) / base)
    print(f"| {problem.rows[name][0]} | {1e3 * np.median(times[name]):.2f} |"
          f" {ratio:.2f} |")
  print(machine())


if __name__ == "__main__":
  main()
