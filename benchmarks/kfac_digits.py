"""Adaptive against fixed K-FAC on a small model, ours and kfac-jax's.

scikit-learn's digits (all 1797 images), a 64-32-10 tanh MLP, softmax
cross-entropy, a batch of 128 drawn with ``jax.random.choice(PRNGKey(i))`` at
step ``i``, 60 steps; the figure is the loss on all the digits after the last
step. This is the setting of ``tests/test_kfac.py``'s small-model test, which
imports :func:`problem` and :func:`train` from here.

Rows (``curvature.kfac``, M&G's constants otherwise):

* adaptive α, μ and λ from the README's λ₀ = 150, with M&G's per-step damping
  decay 19/20 and with kfac-jax's 0.9;
* adaptive from λ₀ = 1e-3, the damping the fixed rows use, so that there is
  no damping left to descend;
* fixed learning rate (a grid), momentum 0.9, damping 1e-3.

kfac-jax 0.0.8 runs the same rows in its venv (``_kfac_jax_digits.py``, on
the same data, initialization and batches), or is skipped with a message
when the venv is missing (see ``kfac.py`` for the two commands that make it).

Run: ``python benchmarks/kfac_digits.py [--steps 60]``.
"""

import argparse
import json
import os
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import curvature

HERE = os.path.dirname(os.path.abspath(__file__))
PEER_PYTHON = os.path.join(HERE, ".venv-kfac-jax", "bin", "python")
BATCH = 128
CE = curvature.losses.softmax_cross_entropy

# name -> (adaptive, initial damping, damping decay, learning rate)
ROWS = {
    "adaptive, λ₀ = 150, d = 19/20": (True, 150.0, 19 / 20, 1.0),
    "adaptive, λ₀ = 150, d = 0.9": (True, 150.0, 0.9, 1.0),
    "adaptive, λ₀ = 1e-3, d = 19/20": (True, 1e-3, 19 / 20, 1.0),
    "fixed, lr 0.003": (False, 1e-3, None, 0.003),
    "fixed, lr 0.01": (False, 1e-3, None, 0.01),
    "fixed, lr 0.03": (False, 1e-3, None, 0.03),
}


def problem():
  """``(data, predict, params)``: all the digits and the MLP at its init."""
  data = curvature.datasets.load_digits(num_test=0)
  data = {"inputs": jnp.asarray(data.train_inputs),
          "targets": jnp.asarray(data.train_labels)}

  def predict(params, batch):
    x = jnp.tanh(batch["inputs"] @ params[0]["w"] + params[0]["b"])
    return x @ params[1]["w"] + params[1]["b"]

  key = jax.random.PRNGKey(0)
  params = [{"w": jax.random.normal(jax.random.fold_in(key, i), (m, n))
                  / np.sqrt(m), "b": jnp.zeros(n)}
            for i, (m, n) in enumerate(((64, 32), (32, 10)))]
  return data, predict, params


def batch_indices(num_examples, steps):
  """``[steps, BATCH]``: step ``i``'s examples, drawn with ``PRNGKey(i)``."""
  return jnp.stack([
      jax.random.choice(jax.random.PRNGKey(i), num_examples, (BATCH,),
                        replace=False) for i in range(steps)])


def train(opt, data, predict, params, steps=60):
  """The loss on all of ``data`` after ``steps`` steps, in one ``lax.scan``."""
  indices = batch_indices(data["targets"].shape[0], steps)

  def step(carry, take):
    p, s = carry
    batch = jax.tree.map(lambda x: x[take], data)
    grads = jax.grad(
        lambda q: CE.value(predict(q, batch), batch["targets"]))(p)
    updates, s = opt.update(grads, s, p, batch=batch)
    return (optax.apply_updates(p, updates), s), None

  (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), indices)
  return CE.value(predict(p, data), data["targets"])


def ours(steps):
  """``{row: loss}`` for ``curvature.kfac``."""
  data, predict, params = problem()
  out = {}
  for name, (adaptive, damping, decay, lr) in ROWS.items():
    extra = {"damping_adaptation_decay": decay} if adaptive else {}
    opt = curvature.kfac(lr, predict_fn=predict, loss=CE, adaptive=adaptive,
                         initial_damping=damping, **extra)
    out[name] = float(jax.jit(lambda o=opt: train(o, data, predict, params,
                                                  steps))())
  return out


def peer(steps):
  """``{row: loss}`` for kfac-jax in its venv, or ``{}`` (and why)."""
  if not os.path.exists(PEER_PYTHON):
    print("kfac-jax peer skipped: no venv at", PEER_PYTHON)
    return {}
  data, _, params = problem()
  with tempfile.TemporaryDirectory() as tmp:
    arrays, out = os.path.join(tmp, "digits.npz"), os.path.join(tmp, "o.json")
    np.savez(arrays, inputs=data["inputs"], targets=data["targets"],
             indices=batch_indices(data["targets"].shape[0], steps),
             **{f"{k}{i}": np.asarray(layer[k])
                for i, layer in enumerate(params) for k in ("w", "b")})
    with open(os.path.join(tmp, "rows.json"), "w") as f:
      json.dump(ROWS, f)
    proc = subprocess.run(
        [PEER_PYTHON, os.path.join(HERE, "_kfac_jax_digits.py"), arrays,
         os.path.join(tmp, "rows.json"), out], cwd=HERE)
    if proc.returncode:
      print("kfac-jax peer failed with exit code", proc.returncode)
      return {}
    with open(out) as f:
      return json.load(f)


def print_table(results):
  names = list(results)
  print("| row | " + " | ".join(names) + " |")
  print("|---|" + "---|" * len(names))
  for row in ROWS:
    print(f"| {row} | " + " | ".join(
        f"{results[n][row]:.4f}" if row in results[n] else "—"
        for n in names) + " |")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=60)
  args = parser.parse_args(argv)
  results = {"curvature.kfac": ours(args.steps)}
  theirs = peer(args.steps)
  if theirs:
    results["kfac-jax 0.0.8"] = theirs
  data, predict, params = problem()
  start = float(CE.value(predict(params, data), data["targets"]))
  print(f"loss on all digits after {args.steps} steps (at the start:"
        f" {start:.4f})")
  print_table(results)
  return results


if __name__ == "__main__":
  main()
