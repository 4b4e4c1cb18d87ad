"""Hessian-free's levers on CURVES, each measured against the same Adam run.

Issue 13's table: which of the levers that cut Hessian-free's cost pays on
``convergence.py``'s 20k CURVES-like images (batch 1000, the same model,
data, L2 term, initialization, evaluation and timing). Every row is a
configuration of ``curvature.hessian_free``; each is capped at
``--iterations`` outer iterations and stops at ``L``:

* ``plain``: Martens' (2010) defaults (progress rule, CG cap 250, diagonal
  preconditioner off), curvature and evaluation batches of 250;
* ``kfac``: ``convergence.HF_PRECONDITIONED`` (K-FAC PCG, inverses every
  10 iterations, CG capped at 25);
* ``kfac_cold_start``: the same without the warm start, so PCG's first iterate
  is the optimally scaled K-FAC step (starting from a K-FAC step);
* ``kfac_budget``: the adaptive CG budget ``max(10, ⌈1.5 i₋₁⌉)``
  under a cap of 50;
* ``kfac_curvature_100`` and ``kfac_curvature_500``: other curvature
  mini-batch fractions of the 1000-example gradient batch;
* ``kfac_growing_batch`` and ``plain_growing_batch``: the gradient batch
  doubled every 20 iterations up to 8000 or the training set (Martens
  2010).

Adam 3e-3 (the best rate of {3e-4, 1e-3, 3e-3} in every earlier
``convergence.py`` run) runs first for ``--adam-steps`` steps; its best loss
is ``L`` and its seconds to ``L`` the time to beat. Each row reports its
outer iterations to ``L`` (or its best loss), CG products per iteration,
seconds per iteration and seconds to ``L`` ÷ Adam's.

Run: ``python benchmarks/hf_levers.py [--iterations 110] [--rows plain,kfac]``.
"""

import argparse
import os
import sys

import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import machine  # noqa: E402
import convergence  # noqa: E402

GROWTH = (2, 20, 8000)
KFAC = convergence.HF_PRECONDITIONED
ROWS = {
    "plain": dict(),
    "kfac": dict(KFAC),
    "kfac_cold_start": dict(KFAC, warm_start_decay=0.0),
    "kfac_budget": dict(KFAC, max_cg_iterations=50, cg_budget_growth=1.5),
    "kfac_curvature_100": dict(KFAC, curvature_batch_size=100,
                               evaluation_batch_size=100),
    "kfac_curvature_500": dict(KFAC, curvature_batch_size=500,
                               evaluation_batch_size=500),
    "kfac_growing_batch": dict(KFAC, batch_growth=GROWTH),
    "plain_growing_batch": dict(batch_growth=GROWTH),
}


def run(rows, iterations, adam_steps, train_size=20_000, adam_lr=3e-3):
  """``(L, adam_seconds, results)``; one result dict per row."""
  data = convergence.load_data(train_size)
  evaluate = convergence._evaluator(data)
  adam = convergence.train_first_order(
      optax.adam(adam_lr), data, adam_steps, eval_every=10,
      desc=f"adam {adam_lr:g}", evaluate=evaluate)
  target = float(adam.loss.min())
  _, adam_seconds = convergence.to_target(adam, target)
  results = []
  for name in rows:
    trace = convergence.train_hessian_free(
        data, iterations, target=target, evaluate=evaluate, desc=name,
        **ROWS[name])
    steps, seconds = convergence.to_target(trace, target)
    run_steps = int(trace.steps[-1])
    results.append(dict(
        row=name, steps_to_target=steps, best_loss=float(trace.loss.min()),
        iterations_run=run_steps,
        cg_per_iteration=float(trace.cg[-1]) / max(run_steps, 1),
        seconds_per_iteration=float(trace.seconds[-1]) / max(run_steps, 1),
        seconds_ratio=None if seconds is None else seconds / adam_seconds))
  return target, adam_seconds, results


def print_table(target, adam_seconds, results):
  print(f"L = {target:.2f} (Adam's best); Adam reaches it in "
        f"{adam_seconds:.1f} s")
  print("| row | iterations to L | best loss | CG / iteration "
        "| s / iteration | seconds to L ÷ Adam |")
  print("|---|---|---|---|---|---|")
  for r in results:
    reached = (r["steps_to_target"] if r["steps_to_target"] is not None
               else f"not in {r['iterations_run']}")
    ratio = ("" if r["seconds_ratio"] is None
             else f"{r['seconds_ratio']:.2f}")
    print(f"| {r['row']} | {reached} | {r['best_loss']:.2f} "
          f"| {r['cg_per_iteration']:.1f} "
          f"| {r['seconds_per_iteration']:.3f} | {ratio} |")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--iterations", type=int, default=110)
  parser.add_argument("--adam-steps", type=int, default=2000)
  parser.add_argument("--train-size", type=int, default=20_000)
  parser.add_argument("--rows", default=",".join(ROWS),
                      help="comma-separated subset of: " + ", ".join(ROWS))
  args = parser.parse_args(argv)
  rows = [r.strip() for r in args.rows.split(",") if r.strip()]
  unknown = sorted(set(rows) - set(ROWS))
  if unknown:
    parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
  target, adam_seconds, results = run(rows, args.iterations, args.adam_steps,
                                      args.train_size)
  print(f"\nmachine: {machine()}")
  print_table(target, adam_seconds, results)
  return target, adam_seconds, results


if __name__ == "__main__":
  main()
