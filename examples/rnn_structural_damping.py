"""Structural damping for a recurrent network on the addition problem.

The addition problem (Hochreiter & Schmidhuber 1997), as used by Martens &
Sutskever (2011): each of ``T = 30`` time steps shows a random value in
[0, 1] and a marker; two steps are marked, one in the first half of the
sequence and one in the second, and the network must output the sum of the
two marked values at the last step. The data is generated here with a fixed
seed (nothing is downloaded). A case counts as solved when the prediction is
within 0.04 of the target, the paper's criterion.

The model is a small tanh RNN with a linear read-out of its last hidden
state, trained with squared error by

* Hessian-free (Martens 2010) without structural damping,
* Hessian-free with structural damping ``μ = 1/30`` (Martens & Sutskever
  2011): the damped curvature gains ``μλ (1/N) J_Sᵀ J_S``, with ``J_S`` the
  Jacobian of the hidden states, so a step that would change the hidden
  dynamics a lot is damped more than one that changes the output weights,
* Adam on mini-batches, as the first-order baseline.

The paper's run is far longer (and its network larger); this is a small,
minutes-long illustration, and the printed figures say what happened in this
run, not what the paper found.

Run: ``python examples/rnn_structural_damping.py [--steps 100]``; the plot is
saved to ``examples/output/rnn_structural_damping.png``.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import curvature

LOSS = curvature.losses.squared_error
LENGTH = 30
HIDDEN = 32
TOLERANCE = 0.04  # Martens & Sutskever (2011): "solved" within 0.04.
TARGET_LOSS = 1e-3  # Well below the loss of predicting the mean (printed).


def addition_problem(num, length=LENGTH, seed=0):
  """``num`` sequences ``[num, length, 2]`` (value, marker) and their sums."""
  rng = np.random.default_rng(seed)
  values = rng.uniform(0.0, 1.0, (num, length))
  markers = np.zeros((num, length))
  first = rng.integers(0, length // 2, num)
  second = rng.integers(length // 2, length, num)
  markers[np.arange(num), first] = 1.0
  markers[np.arange(num), second] = 1.0
  inputs = np.stack([values, markers], axis=-1).astype(np.float32)
  targets = (values * markers).sum(axis=1, keepdims=True).astype(np.float32)
  return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}


def init_params(seed=0, hidden=HIDDEN, spectral_radius=1.1):
  """Input and output weights N(0, 1/fan_in); recurrent weights rescaled to
  the given spectral radius (Martens & Sutskever start near 1.2)."""
  rng = np.random.default_rng(seed)
  w_h = rng.normal(0.0, 1.0, (hidden, hidden))
  w_h *= spectral_radius / np.max(np.abs(np.linalg.eigvals(w_h)))
  params = {
      "w_in": rng.normal(0.0, 1.0 / np.sqrt(2), (2, hidden)),
      "w_h": w_h,
      "b": np.zeros(hidden),
      "w_out": rng.normal(0.0, 1.0 / np.sqrt(hidden), (hidden, 1)),
      "b_out": np.ones(1),  # The mean target.
  }
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def hidden_states(params, batch):
  """The tanh RNN's hidden states, ``[batch, time, hidden]``."""
  inputs = batch["inputs"]

  def step(h, x):
    h = jnp.tanh(x @ params["w_in"] + h @ params["w_h"] + params["b"])
    return h, h

  h0 = jnp.zeros((inputs.shape[0], params["b"].shape[0]), inputs.dtype)
  _, hs = jax.lax.scan(step, h0, jnp.swapaxes(inputs, 0, 1))
  return jnp.swapaxes(hs, 0, 1)


def predict(params, batch):
  return hidden_states(params, batch)[:, -1] @ params["w_out"] + params[
      "b_out"]


@jax.jit
def _evaluate(params, batch):
  outputs = predict(params, batch)
  value = LOSS.value(outputs, batch["targets"])
  return value, jnp.mean(jnp.abs(outputs - batch["targets"]) < TOLERANCE)


def evaluate(params, batch):
  """(test loss ½(y − ŷ)², fraction solved within 0.04)."""
  value, solved = _evaluate(params, batch)
  return float(value), float(solved)


def run(name, opt, params, train, test, steps, batch_size, seed=0):
  """``steps`` updates on random batches; the test loss after each."""
  state = opt.init(params)
  grad_fn = jax.grad(lambda p, b: LOSS.value(predict(p, b), b["targets"]))

  @jax.jit
  def step(params, state, batch):
    updates, state = opt.update(grad_fn(params, batch), state, params,
                                batch=batch)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(seed)
  num = train["targets"].shape[0]
  history = []
  start = time.perf_counter()
  for _ in tqdm(range(steps), desc=name, mininterval=2.0):
    index = rng.choice(num, batch_size, replace=False)
    batch = {key: value[index] for key, value in train.items()}
    params, state = step(params, state, batch)
    history.append(evaluate(params, test)[0])
  seconds = time.perf_counter() - start
  return params, np.asarray(history), seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=100,
                      help="Hessian-free steps (Adam gets 10x as many).")
  parser.add_argument("--plot", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "output",
      "rnn_structural_damping.png"))
  args = parser.parse_args()

  train = addition_problem(4000, seed=0)
  test = addition_problem(1000, seed=1)
  params = init_params()
  hf = dict(predict_fn=predict, loss=LOSS, curvature_batch_size=250,
            max_cg_iterations=60)
  runs = {
      "HF": (curvature.hessian_free(**hf), args.steps, 1000),
      "HF + structural damping (μ = 1/30)": (curvature.hessian_free(
          structural_damping=1.0 / LENGTH, structural_fn=hidden_states,
          **hf), args.steps, 1000),
      "Adam (lr 3e-3, batch 100)": (optax.adam(3e-3), 10 * args.steps, 100),
  }
  print(f"Predicting the mean gives test loss {baseline(train, test):.4f}.")
  results = {}
  for name, (opt, steps, batch_size) in runs.items():
    final, history, seconds = run(name, opt, params, train, test, steps,
                                  batch_size)
    results[name] = (history, seconds, steps, batch_size)
    value, solved = evaluate(final, test)
    below = np.flatnonzero(history < TARGET_LOSS)
    reached = (f"test loss < {TARGET_LOSS:g} after {below[0] + 1} steps"
               f" ({(below[0] + 1) * batch_size} gradient examples)"
               if below.size else f"test loss never < {TARGET_LOSS:g}")
    print(f"{name}: {steps} steps of batch {batch_size} in {seconds:.1f} s"
          f" (compilation included); {reached}; final test loss"
          f" {value:.2e}, solved {100 * solved:.1f}% (|error| < {TOLERANCE})")

  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  os.makedirs(os.path.dirname(args.plot), exist_ok=True)
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, (history, _, steps, batch_size) in results.items():
    examples = np.arange(1, steps + 1) * batch_size
    ax.plot(examples, history, label=name)
  ax.axhline(baseline(train, test), color="gray", ls=":",
             label="predict the mean")
  ax.set(xscale="log", yscale="log",
         xlabel="gradient examples seen (HF's CG products not counted)",
         ylabel="test loss ½(y − ŷ)²",
         title=f"Addition problem, T = {LENGTH}, tanh RNN of {HIDDEN}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(args.plot, dpi=120)
  print(f"saved {args.plot}")


def baseline(train, test):
  """The test loss of always predicting the training targets' mean."""
  mean = jnp.mean(train["targets"])
  return float(LOSS.value(jnp.full_like(test["targets"], mean),
                          test["targets"]))


if __name__ == "__main__":
  main()
