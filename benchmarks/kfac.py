"""K-FAC step cost on the MNIST-autoencoder shape, against optax and kfac-jax.

784-1000-500-250-30-250-500-1000-784, sigmoid units, linear code layer,
sigmoid cross-entropy, batch 1000, float32, CPU. K-FAC statistics on 1/8 of
the batch with 1 sampled target, inverses every 20 steps. Random inputs in
[0, 1] stand in for MNIST (the step cost does not depend on the values).
Compile time is excluded; each figure is the median of >= 15 interleaved
timed steps.

The peer, kfac-jax 0.0.8, fails on jax 0.10 inside its graph matcher, so it
runs in its own virtual environment pinned to jax 0.9.0:

    python -m venv benchmarks/.venv-kfac-jax
    benchmarks/.venv-kfac-jax/bin/pip install "jax[cpu]==0.9.0" \
        kfac-jax==0.0.8 optax numpy tqdm

This script re-runs itself there with ``--peer`` when that venv exists.

    python benchmarks/kfac.py [--repeats 15]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from _common import autoencoder_predict as predict
from _common import machine

SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
BATCH = 1000
STATS = BATCH // 8
HERE = os.path.dirname(os.path.abspath(__file__))
# kfac-jax compiles separate programs for inverse-refresh (every 20) and
# damping-adaptation (every 5) steps: warm up past the first of each.
PEER_WARM_UP = 2 * 20 + 1
PEER_PYTHON = os.path.join(HERE, ".venv-kfac-jax", "bin", "python")


def init_params(seed=0):
  rng = np.random.default_rng(seed)
  return [{"w": (rng.normal(size=(i, o)) / np.sqrt(i)).astype(np.float32),
           "b": np.zeros(o, np.float32)} for i, o in zip(SIZES[:-1],
                                                          SIZES[1:])]


def make_batch(seed=1):
  x = np.random.default_rng(seed).uniform(size=(BATCH, 784)).astype(
      np.float32)
  return {"inputs": x, "targets": x}


def bce(logits, targets):
  return jnp.mean(jnp.sum(
      optax.losses.sigmoid_binary_cross_entropy(logits, targets), -1))


def median_interleaved(steps, repeats):
  """{name: median seconds} with the steps run round-robin."""
  times = {name: [] for name in steps}
  for _ in range(repeats):
    for name, run in steps.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def optax_step(opt, loss_fn, params, batch, extra=False):
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    value, grads = jax.value_and_grad(loss_fn)(p, batch)
    kwargs = dict(batch=batch) if extra else {}
    updates, s = opt.update(grads, s, p, **kwargs)
    return optax.apply_updates(p, updates), s, value

  holder = [params, state]

  def run():
    p, s, v = step(*holder)
    jax.block_until_ready(v)
    holder[:] = [p, s]

  run()  # compile (every lax.cond branch is in this one program)
  run()
  return run


def ours(repeats):
  import curvature
  params = jax.tree.map(jnp.asarray, init_params())
  batch = jax.tree.map(jnp.asarray, make_batch())
  loss = curvature.losses.sigmoid_binary_cross_entropy
  loss_fn = lambda p, b: bce(predict(p, b), b["targets"])
  fixed = curvature.kfac(1e-3, predict_fn=predict, loss=loss, momentum=0.9,
                         initial_damping=1e-1, statistics_batch_size=STATS,
                         inverse_every=20)
  adaptive = curvature.kfac(1.0, predict_fn=predict, loss=loss, adaptive=True,
                            initial_damping=150.0, l2_reg=1e-5,
                            statistics_batch_size=STATS, inverse_every=20)
  ekfac = curvature.ekfac(1e-3, predict_fn=predict, loss=loss, momentum=0.9,
                          initial_damping=1e-1, statistics_batch_size=STATS,
                          inverse_every=20)
  steps = {
      "adam": optax_step(optax.adam(1e-3), loss_fn, params, batch),
      "sgd_momentum": optax_step(optax.sgd(1e-3, momentum=0.9), loss_fn,
                                 params, batch),
      "kfac_fixed": optax_step(fixed, loss_fn, params, batch, extra=True),
      "kfac_adaptive": optax_step(adaptive, loss_fn, params, batch,
                                  extra=True),
      "ekfac_fixed": optax_step(ekfac, loss_fn, params, batch, extra=True),
      "shampoo": optax_step(curvature.shampoo(1e-3, inverse_every=10),
                            loss_fn, params, batch),
      "soap": optax_step(curvature.soap(3e-3, inverse_every=10), loss_fn,
                         params, batch),
  }
  return median_interleaved(steps, repeats)


def our_factors(params, batch):
  import curvature
  transform = curvature.scale_by_kfac(
      predict, curvature.losses.sigmoid_binary_cross_entropy,
      statistics="empirical_fisher", initial_damping=1.0)
  grads = jax.grad(lambda p: bce(predict(p, batch), batch["targets"]))(params)
  state = transform.init(params)
  _, state = jax.jit(transform.update)(grads, state, params, batch=batch)
  factors = [state.blocks[f"{k}/w"].statistics for k in range(len(params))]
  return ([f.a / (1 - 0.95) for f in factors],
          [f.g / (1 - 0.95) for f in factors])


def peer(repeats, out_path, factors_path):
  """Runs inside the jax 0.9.0 venv: kfac-jax step time and factors."""
  import kfac_jax

  def loss_fn(params, batch):
    logits = predict(params, batch)
    kfac_jax.register_sigmoid_cross_entropy_loss(logits, batch["targets"])
    return bce(logits, batch["targets"])

  params = jax.tree.map(jnp.asarray, init_params())
  batch = jax.tree.map(jnp.asarray, make_batch())
  stats_batch = jax.tree.map(lambda x: x[:STATS], batch)

  def optimizer(mode, adaptive):
    return kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0,
        use_adaptive_learning_rate=adaptive, use_adaptive_momentum=adaptive,
        use_adaptive_damping=adaptive,
        learning_rate_schedule=None if adaptive else (lambda s: 1e-3),
        momentum_schedule=None if adaptive else (lambda s: 0.9),
        damping_schedule=None if adaptive else (lambda s: 0.1),
        initial_damping=150.0 if adaptive else None,
        inverse_update_period=20, estimation_mode=mode, curvature_ema=0.95,
        num_burnin_steps=0, multi_device=False,
        batch_process_func=lambda b: b)

  results = {}
  steps = {}
  for name, adaptive in (("kfac_jax_fixed", False),
                         ("kfac_jax_adaptive", True)):
    opt = optimizer("fisher_gradients", adaptive)
    own = jax.tree.map(jnp.copy, params)  # kfac-jax donates its inputs.
    state = opt.init(own, jax.random.key(0), batch)
    holder = [own, state, 0]

    def run(opt=opt, holder=holder):
      p, s, i = holder
      p, s, stats = opt.step(p, s, jax.random.key(i), batch=batch,
                             global_step_int=i)
      jax.block_until_ready(p)
      holder[:] = [p, s, i + 1]

    for _ in range(PEER_WARM_UP):  # every program kfac-jax compiles
      run()
    steps[name] = run
  sgd = optax.sgd(1e-3, momentum=0.9)
  steps["sgd_momentum_peer_env"] = optax_step(
      sgd, lambda p, b: bce(predict(p, b), b["targets"]),
      jax.tree.map(jnp.copy, params), batch)
  results.update(median_interleaved(steps, repeats))
  # Factors in empirical-Fisher mode on one batch (no EMA history).
  opt = optimizer("fisher_empirical", False)
  own = jax.tree.map(jnp.copy, params)
  state = opt.init(own, jax.random.key(0), batch)
  _, state, _ = opt.step(own, state, jax.random.key(0), batch=batch,
                         global_step_int=0)
  factors = {}
  for k, block in enumerate(state.estimator_state.blocks_states):
    for name, avg in zip(("inputs_factor", "outputs_factor"), block.factors):
      weight = getattr(avg, "weight", 1.0)
      factors[f"{k}_{name}"] = np.asarray(avg.value / weight)
  np.savez(factors_path, **factors)
  with open(out_path, "w") as f:
    json.dump(results, f)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--peer", nargs=2)
  args = parser.parse_args()
  if args.peer:
    peer(args.repeats, *args.peer)
    return
  print(f"machine: {machine()}")
  times = ours(args.repeats)
  for name, t in times.items():
    print(f"{name:>24}: {1e3 * t:8.1f} ms")
  sgd, adam = times["sgd_momentum"], times["adam"]
  print(f"K-FAC fixed / sgd(momentum):    {times['kfac_fixed'] / sgd:5.2f}"
        "  (target <= 2.5)")
  print(f"K-FAC adaptive / sgd(momentum): {times['kfac_adaptive'] / sgd:5.2f}"
        "  (target <= 4.0)")
  for name, target in (("kfac_fixed", 2.0), ("ekfac_fixed", 2.5),
                       ("shampoo", 1.5), ("soap", 1.5)):
    print(f"{name} / optax.adam: {times[name] / adam:5.2f}"
          f"  (target <= {target})")
  if not os.path.exists(PEER_PYTHON):
    print("kfac-jax peer skipped: no venv at", PEER_PYTHON)
    return
  with tempfile.TemporaryDirectory() as tmp:
    out, fac = os.path.join(tmp, "peer.json"), os.path.join(tmp, "f.npz")
    proc = subprocess.run([PEER_PYTHON, __file__, "--repeats",
                           str(args.repeats), "--peer", out, fac],
                          capture_output=True, text=True)
    if proc.returncode:
      print("kfac-jax peer failed:\n", proc.stderr[-3000:])
      return
    peer_times = json.load(open(out))
    peer_factors = dict(np.load(fac))
  for name, t in peer_times.items():
    print(f"{name:>24}: {1e3 * t:8.1f} ms")
  print(f"K-FAC fixed / kfac-jax fixed:       "
        f"{times['kfac_fixed'] / peer_times['kfac_jax_fixed']:5.2f}"
        "  (target <= 1.0)")
  print(f"K-FAC adaptive / kfac-jax adaptive: "
        f"{times['kfac_adaptive'] / peer_times['kfac_jax_adaptive']:5.2f}")
  params = jax.tree.map(jnp.asarray, init_params())
  batch = jax.tree.map(jnp.asarray, make_batch())
  a, g = our_factors(params, batch)
  worst = {"inputs_factor": 0.0, "outputs_factor": 0.0}
  scales = []
  for k in range(len(a)):
    for mine, name in ((a[k], "inputs_factor"), (g[k], "outputs_factor")):
      theirs = peer_factors[f"{k}_{name}"]
      mine = np.asarray(mine)
      if theirs.shape != mine.shape:
        print(f"layer {k} {name}: shapes differ {theirs.shape} vs"
              f" {mine.shape}")
        continue
      if name == "outputs_factor":  # kfac-jax's G is of the *mean* loss.
        scale = float(np.sum(mine * theirs) / np.sum(theirs * theirs))
        scales.append(scale)
        theirs = theirs * scale
      rel = float(np.linalg.norm(mine - theirs) / np.linalg.norm(theirs))
      worst[name] = max(worst[name], rel)
  print("factor agreement with kfac-jax (empirical Fisher, one batch, max"
        " relative Frobenius difference; target <= 1e-5):")
  print(f"  A (inputs):  {worst['inputs_factor']:.2e}")
  print(f"  G (outputs): {worst['outputs_factor']:.2e} after a scalar"
        f" convention factor {np.median(scales):.1f} (batch size"
        f" {BATCH})")


if __name__ == "__main__":
  main()
