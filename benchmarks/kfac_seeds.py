"""Adaptive K-FAC against kfac-jax on CURVES, over several seeds.

``convergence.py``'s 20k CURVES-like images, model, batch of 1000 and timing
(warm-up excluded, compile check); each run stops at ``L``. Rows:
``curvature.kfac`` (adaptive, λ₀ = 150) with M&G's per-step damping decay
19/20 and with kfac-jax's 0.9 (``damping_adaptation_decay``), and kfac-jax's
adaptive K-FAC in its venv (skipped with a message when the venv is
missing). ``--seeds`` sets the sparse initialization and the batch and
target-sampling keys of every row. ``L`` is given (``--target``, Adam 3e-3's
best after 2000 steps in ``convergence.py``: 63.29 on the Intel VM) so that
no Adam run is needed.

Run: ``python benchmarks/kfac_seeds.py [--seeds 0,1,2] [--target 63.29]``.
"""

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import machine  # noqa: E402
import convergence  # noqa: E402

DECAYS = {"curvature.kfac, d = 19/20": 19 / 20,
          "curvature.kfac, d = 0.9": 0.9}


def run(seeds, target, train_size=20_000, steps=500):
  """``{row: [(steps, seconds) or (None, None) per seed]}``."""
  data = convergence.load_data(train_size)
  evaluate = convergence._evaluator(data)
  results = {name: [] for name in (*DECAYS, "kfac-jax")}
  for seed in seeds:
    for name, decay in DECAYS.items():
      trace = convergence.train_kfac(
          data, steps, seed=seed, target=target, evaluate=evaluate,
          damping_adaptation_decay=decay)
      results[name].append(convergence.to_target(trace, target))
    trace = convergence.train_kfac_jax(data, steps, seed=seed, target=target)
    if trace is not None:
      results["kfac-jax"].append(convergence.to_target(trace, target))
  return {name: r for name, r in results.items() if r}


def print_table(seeds, results):
  print("| run | " + " | ".join(f"seed {s}" for s in seeds)
        + " | mean steps | mean seconds to L |")
  print("|---|" + "---|" * (len(seeds) + 2))
  for name, runs in results.items():
    steps = [s for s, _ in runs]
    reached = [(s, t) for s, t in runs if s is not None]
    mean = (f"{np.mean([s for s, _ in reached]):.0f} | "
            f"{np.mean([t for _, t in reached]):.1f}"
            if len(reached) == len(runs) else "— | —")
    print(f"| {name} | " + " | ".join(
        "not reached" if s is None else str(s) for s in steps)
        + f" | {mean} |")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--target", type=float, default=63.29)
  parser.add_argument("--train-size", type=int, default=20_000)
  parser.add_argument("--steps", type=int, default=500)
  args = parser.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",") if s]
  results = run(seeds, args.target, args.train_size, args.steps)
  print(f"\nmachine: {machine()}; L = {args.target}")
  print_table(seeds, results)
  return results


if __name__ == "__main__":
  main()
