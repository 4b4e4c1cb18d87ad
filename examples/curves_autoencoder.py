"""The main job: Adam, K-FAC and Hessian-free on the CURVES-like autoencoder.

The headline experiment of Martens (2010) and Martens & Grosse (2015): the
deep autoencoder 784-400-200-100-50-25-6-25-50-100-200-400-784 (sigmoid
units, a linear code layer, sigmoid cross-entropy, sparse initialization,
L2 1e-5) on CURVES-like images, generated offline by
``curvature.datasets.make_curves``. Adam runs for ``--steps`` steps of batch
1000; its best training loss is the target ``L``. K-FAC (adaptive) and
Hessian-free then run until they reach ``L`` or their own step budget. The
script prints a table of final loss and steps and seconds to ``L``, and saves
a plot of the training loss against steps and against seconds.

The default size (5000 images, 400 Adam steps) takes a few minutes on two CPU
cores; ``--full`` is the benchmark's size (20,000 images, 2000 Adam steps at
each learning rate of {3e-4, 1e-3, 3e-3}). The experiment itself lives in
``benchmarks/convergence.py``, which this script drives.

Run: ``python examples/curves_autoencoder.py [--full] [--optimizers
adam,kfac,hessian_free] [--out examples/output]``.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
import convergence  # noqa: E402  (benchmarks/convergence.py)

CHOICES = ("adam", "kfac", "hessian_free")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--full", action="store_true",
                      help="20,000 images, 2000 Adam steps at 3 rates")
  parser.add_argument("--train-size", type=int, default=None,
                      help="training images (default 5000, 20000 with --full)")
  parser.add_argument("--steps", type=int, default=None,
                      help="Adam's steps N (default 400, 2000 with --full)")
  parser.add_argument("--curvature-steps", type=int, default=None,
                      help="step budget of K-FAC and Hessian-free "
                      "(default N)")
  parser.add_argument("--optimizers", default=",".join(CHOICES),
                      help="comma-separated subset of " + ",".join(CHOICES)
                      + " (Adam always runs: it sets the target)")
  parser.add_argument("--out", default=os.path.join(HERE, "output"))
  args = parser.parse_args(argv)
  optimizers = tuple(o.strip() for o in args.optimizers.split(",") if o)
  unknown = set(optimizers) - set(CHOICES)
  if unknown:
    parser.error(f"unknown optimizers {sorted(unknown)}; choose from "
                 f"{','.join(CHOICES)}")
  args.optimizers = optimizers
  args.train_size = args.train_size or (20_000 if args.full else 5000)
  args.steps = args.steps or (2000 if args.full else 400)
  args.curvature_steps = args.curvature_steps or args.steps
  return args


def main(argv=None):
  args = parse_args(argv)
  traces, rows, target, adam_name = convergence.run(
      args.train_size, args.steps, args.optimizers,
      adam_lrs=convergence.ADAM_LRS if args.full else (3e-3,),
      curvature_steps=args.curvature_steps)
  print(f"\nCURVES-like autoencoder, {args.train_size} images, batch 1000, "
        f"Adam for {args.steps} steps")
  print(f"machine: {convergence.machine()}")
  convergence.print_table(rows, target, adam_name)
  path = os.path.join(args.out, "curves_autoencoder.png")
  convergence.save_plot(traces, target, path,
                        f"CURVES-like autoencoder, {args.train_size} images")
  print(f"plot saved to {path}")
  return rows


if __name__ == "__main__":
  main()
