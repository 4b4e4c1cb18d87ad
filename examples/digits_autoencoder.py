"""Hessian-free against Adam on a deep sigmoid autoencoder of the digits.

The data is ``sklearn.datasets.load_digits`` (1797 images of 8×8 pixels,
scaled to [0, 1]), shipped with scikit-learn: nothing is downloaded. The
network is a deep autoencoder in the style of Hinton & Salakhutdinov (2006):
sigmoid hidden units, a linear code layer and a sigmoid cross-entropy
reconstruction loss, as in Martens (2010).

Every optimizer is charged in *data passes*, i.e. examples touched divided by
the data set's size: Adam one pass per epoch; Hessian-free its gradient batch,
the curvature batch once for the linearization and once per CG iteration
(each GGN product is one pass over the curvature batch), and the evaluation
batch once per objective evaluation (ρ, backtracking, line search).

Adam's learning rates are the best of {1e-3, 3e-3, 1e-2, 3e-2} for each batch
size (see ``benchmarks/README.md``).

Run: ``python examples/digits_autoencoder.py [--passes 300] [--plot out.png]``.
"""

import argparse
import os
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from tqdm.auto import tqdm

import curvature

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "benchmarks"))
from _common import sparse_params  # noqa: E402  (benchmarks/_common.py)

LOSS = curvature.losses.sigmoid_binary_cross_entropy
LAYERS = (64, 48, 24, 6, 24, 48, 64)
CODE_LAYER = 2  # Index of the linear code layer's weights.
L2_REG = 1e-5


def load_data(dtype=np.float32):
  images = load_digits().data.astype(dtype) / 16.0
  return {"inputs": jnp.asarray(images), "targets": jnp.asarray(images)}


def init_params(seed=0, layers=None, connections=15):
  """Martens' (2010) sparse initialisation.

  Each unit gets ``connections`` incoming weights drawn from N(0, 1) (all of
  them if the fan-in is smaller); every other weight and every bias is 0.
  """
  return sparse_params(seed, layers or LAYERS, connections)


def predict(params, batch):
  """Logits of the reconstruction: sigmoid layers, linear code and output."""
  h = batch["inputs"]
  for i, layer in enumerate(params):
    h = h @ layer["w"] + layer["b"]
    if i != CODE_LAYER and i < len(params) - 1:
      h = jax.nn.sigmoid(h)
  return h


def training_loss(params, batch):
  return LOSS.value(predict(params, batch), batch["targets"])


class Trace(NamedTuple):
  passes: np.ndarray
  seconds: np.ndarray
  loss: np.ndarray


def train_adam(data, passes, learning_rate=1e-2, batch_size=100, seed=0):
  """Adam for ``passes`` epochs of shuffled mini-batches (``None``: full batch)."""
  opt = optax.adam(learning_rate)
  params = init_params(seed)
  state = opt.init(params)
  n = data["inputs"].shape[0]
  batch_size = batch_size or n
  steps_per_epoch = n // batch_size

  @jax.jit
  def epoch(params, state, key):
    order = jax.random.permutation(key, n)[: steps_per_epoch * batch_size]
    batches = jax.tree.map(
        lambda x: x[order].reshape((steps_per_epoch, batch_size) + x.shape[1:]),
        data)

    def step(carry, batch):
      params, state = carry
      grads = jax.grad(training_loss)(params, batch)
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(step, (params, state), batches)
    return params, state, training_loss(params, data)

  jax.block_until_ready(epoch(params, state, jax.random.key(0)))  # Compile.
  key = jax.random.key(seed)
  record = [(0.0, 0.0, float(training_loss(params, data)))]
  start = time.perf_counter()
  for _ in tqdm(range(passes), desc=f"adam {learning_rate:g}/{batch_size}",
                leave=False):
    key, sub = jax.random.split(key)
    params, state, value = epoch(params, state, sub)
    record.append((record[-1][0] + steps_per_epoch * batch_size / n,
                   time.perf_counter() - start, float(value)))
  return Trace(*map(np.asarray, zip(*record)))


def train_hessian_free(data, passes, batch_size=None, curvature_batch_size=128,
                       evaluation_batch_size=128, seed=0):
  """Hessian-free until ``passes`` data passes are spent.

  Each step draws a batch of ``batch_size`` examples (``None``: all) for the
  gradient; its first ``curvature_batch_size`` examples serve the GGN
  products and its last ``evaluation_batch_size`` the objective evaluations
  of ρ, backtracking and the line search (Martens 2010).
  """
  opt = curvature.hessian_free(
      predict_fn=predict, loss=LOSS, l2_reg=L2_REG,
      curvature_batch_size=curvature_batch_size,
      evaluation_batch_size=evaluation_batch_size)
  params = init_params(seed)
  state = opt.init(params)
  n = data["inputs"].shape[0]
  batch_size = batch_size or n

  @jax.jit
  def step(params, state, key):
    order = jax.random.permutation(key, n)[:batch_size]
    batch = jax.tree.map(lambda x: x[order], data)
    grads = jax.grad(training_loss)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  key = jax.random.key(seed)
  jax.block_until_ready(step(params, state, key))  # Compile.
  record = [(0.0, 0.0, float(training_loss(params, data)))]
  start = time.perf_counter()
  with tqdm(total=passes, desc=f"hessian_free/{batch_size}", leave=False,
            bar_format="{l_bar}{bar}| {n:.0f}/{total} passes{postfix}") as bar:
    while record[-1][0] < passes:
      key, sub = jax.random.split(key)
      params, state = step(params, state, sub)
      hf = state[0]
      examples = (batch_size
                  + evaluation_batch_size * int(hf.loss_evaluations)
                  + curvature_batch_size * (1 + int(hf.cg_iterations)))
      value = float(training_loss(params, data))
      record.append((record[-1][0] + examples / n,
                     time.perf_counter() - start, value))
      bar.update(min(examples / n, passes - bar.n))
      bar.set_postfix(loss=f"{value:.3f}", damping=f"{float(hf.damping):.2g}",
                      cg=int(hf.cg_iterations))
  return Trace(*map(np.asarray, zip(*record)))


def loss_at(trace: Trace, passes: float) -> float:
  """The lowest loss reached within ``passes`` data passes."""
  return float(trace.loss[trace.passes <= passes].min())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--passes", type=int, default=300)
  parser.add_argument("--plot", default="examples/output/digits_autoencoder.png")
  args = parser.parse_args()

  data = load_data()
  traces = {
      "adam, lr 1e-2, batch 100": train_adam(data, args.passes),
      "adam, lr 3e-2, full batch": train_adam(data, args.passes, 3e-2, None),
      "hessian_free, full batch": train_hessian_free(data, args.passes),
      "hessian_free, batch 256": train_hessian_free(
          data, args.passes, batch_size=256, curvature_batch_size=64,
          evaluation_batch_size=64),
  }
  checkpoints = [p for p in (10, 30, 100, 300, 1000) if p <= args.passes]
  header = f"{'optimizer':28s}" + "".join(f"{f'{p} passes':>12s}" for p in
                                          checkpoints) + f"{'seconds':>10s}"
  print("\nTraining loss (sigmoid cross-entropy per image) within N data passes")
  print(header)
  for name, trace in traces.items():
    print(f"{name:28s}" + "".join(f"{loss_at(trace, p):12.3f}"
                                  for p in checkpoints)
          + f"{trace.seconds[-1]:10.1f}")

  if args.plot:
    import os
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, trace in traces.items():
      axes[0].plot(trace.passes, trace.loss, label=name)
      axes[1].plot(trace.seconds, trace.loss, label=name)
    axes[0].set_xlabel("data passes")
    axes[1].set_xlabel("seconds")
    for ax in axes:
      ax.set_ylabel("training loss")
      ax.set_yscale("log")
      ax.legend()
    fig.suptitle("Digits autoencoder " + "-".join(map(str, LAYERS)))
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot saved to {args.plot}")


if __name__ == "__main__":
  main()
