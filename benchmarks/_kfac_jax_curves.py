"""The kfac-jax peer row of ``convergence.py``, run in kfac-jax's own venv.

kfac-jax 0.0.8 breaks on jax 0.10, so ``convergence.py`` runs this script
with ``benchmarks/.venv-kfac-jax/bin/python`` (jax 0.9.0; see ``kfac.py``
for how to create it). It does not import ``curvature``: the main process
writes the training images to an ``.npz`` file, and this script trains the
same CURVES autoencoder (``_common.autoencoder_predict``, the same sparse
initialization and L2 term) with kfac-jax's adaptive K-FAC (α, μ from the
exact quadratic model, Levenberg-Marquardt damping from λ₀ = 150, Fisher
from sampled targets, inverses every 20 steps and damping updates every 5,
as ours; EMA 0.95) on random batches of 1000 (the same seed, but not the
same batches as our rows), and writes the trace as JSON.

kfac-jax compiles a separate program for the steps that adapt the damping
(every 5, from step 4 on: a two-step warm-up left its ~10 s compilation in
the timed loop), so the timed run is preceded by a throwaway run of
``2 * 20 + 1`` steps (past the first inverse refresh and damping update,
with every batch drawn as in the timed run) on its own fresh state. The timed loop then fails, exit code
``_common.COMPILED_EXIT_CODE`` with the reason in the JSON's
``compile_check``, if jax.monitoring sees a compilation in a timed step or a
timed step takes over ``--outlier-factor`` (5) times the median of its kind
(inverse-refresh, damping-update and plain steps are compared separately:
under load an inverse refresh alone can take 7x a plain step).

    python _kfac_jax_curves.py DATA.npz OUT.json --steps 2000 --target L
"""

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np
import optax
from tqdm.auto import tqdm

from _common import autoencoder_predict as predict
from _common import COMPILED_EXIT_CODE
from _common import CompilationInTimedLoop
from _common import sparse_params
from _common import TimedLoop

L2_REG = 1e-5
INVERSE_PERIOD = 20
DAMPING_PERIOD = 5


def data_loss(params, batch):
  logits = predict(params, batch)
  return jnp.mean(jnp.sum(optax.losses.sigmoid_binary_cross_entropy(
      logits, batch["targets"]), -1))


def loss_fn(params, batch):
  logits = predict(params, batch)
  kfac_jax.register_sigmoid_cross_entropy_loss(logits, batch["targets"])
  return data_loss(params, batch) + 0.5 * L2_REG * optax.tree.norm(
      params, squared=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("data")
  parser.add_argument("out")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--target", type=float, default=None)
  parser.add_argument("--batch-size", type=int, default=1000)
  parser.add_argument("--eval-every", type=int, default=5)
  parser.add_argument("--layers", default="")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--warm-up-steps", type=int,
                      default=2 * max(INVERSE_PERIOD, DAMPING_PERIOD) + 1)
  parser.add_argument("--outlier-factor", type=float, default=5.0)
  args = parser.parse_args()
  images = jnp.asarray(np.load(args.data)["images"])
  data = {"inputs": images, "targets": images}
  layers = tuple(int(n) for n in args.layers.split(","))
  n = images.shape[0]

  @jax.jit
  def batch_at(key):
    order = jax.random.choice(key, n, (args.batch_size,), replace=False)
    return jax.tree.map(lambda x: x[order], data)

  size = min(5000, n)
  stacked = jax.tree.map(
      lambda x: x[: n // size * size].reshape((n // size, size) + x.shape[1:]),
      data)
  evaluate = jax.jit(
      lambda p: jax.lax.map(lambda b: data_loss(p, b), stacked).mean())

  opt = kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=L2_REG,
      use_adaptive_learning_rate=True, use_adaptive_momentum=True,
      use_adaptive_damping=True, initial_damping=150.0,
      inverse_update_period=INVERSE_PERIOD,
      damping_adaptation_interval=DAMPING_PERIOD,
      curvature_ema=0.95, num_burnin_steps=0,
      multi_device=False, batch_process_func=lambda b: b)

  def fresh():
    params = sparse_params(args.seed, layers)
    return params, opt.init(params, jax.random.key(args.seed),
                            batch_at(jax.random.key(0)))

  def throwaway_step(carry, i):
    params, state, key = carry
    key, sub, rng = jax.random.split(key, 3)
    params, state, _ = opt.step(params, state, rng, batch=batch_at(sub),
                                global_step_int=i)
    return params, state, key

  def kind(step):
    """kfac-jax's step programs: inverse refresh, damping update or plain."""
    return ("inverse" if step % INVERSE_PERIOD == 0 else
            "damping" if (step + 1) % DAMPING_PERIOD == 0 else "plain")

  loop = TimedLoop("kfac-jax (adaptive)", outlier_factor=args.outlier_factor)
  with loop:
    # A throwaway run on its own state (kfac-jax donates its inputs).
    loop.warm_up(throwaway_step, fresh() + (jax.random.key(args.seed + 1),),
                 args.warm_up_steps)
    params, state = jax.block_until_ready(fresh())  # Init is not timed.
    key = jax.random.key(args.seed + 1)
    record = [(0, 0.0, float(evaluate(params)))]
    with tqdm(total=args.steps, desc="kfac-jax", leave=False) as bar:
      for i in range(1, args.steps + 1):
        key, sub, rng = jax.random.split(key, 3)
        with loop.timed(kind(i - 1)):
          params, state, _ = opt.step(params, state, rng, batch=batch_at(sub),
                                      global_step_int=i - 1)
          jax.block_until_ready(params)
        bar.update(1)
        if i % args.eval_every and i != args.steps:
          continue
        value = float(evaluate(params))
        record.append((i, loop.seconds, value))
        bar.set_postfix(loss=f"{value:.3f}", refresh=False)
        if not np.isfinite(value) or (args.target is not None
                                      and value <= args.target):
          break
  try:
    check, failed = loop.check(), False
  except CompilationInTimedLoop as e:
    check, failed = str(e), True
  steps, seconds, loss = zip(*record)
  with open(args.out, "w") as f:
    json.dump(dict(steps=steps, seconds=seconds, loss=loss,
                   jax=jax.__version__, compile_check=check,
                   step_seconds=loop.call_seconds), f)
  if failed:
    print(check, file=sys.stderr)
    sys.exit(COMPILED_EXIT_CODE)


if __name__ == "__main__":
  main()
