"""kfac-jax's half of ``kfac_digits.py``; runs in kfac-jax's venv.

``python _kfac_jax_digits.py ARRAYS ROWS OUT``: the digits, the MLP's initial
parameters and every step's batch indices (``ARRAYS``, an ``.npz`` written
by ``kfac_digits.py``), the rows as ``{name: [adaptive, initial damping,
decay, learning rate]}`` (``ROWS``, JSON); writes ``{name: loss}`` to
``OUT``. Adaptive rows use kfac-jax's adaptive learning rate, momentum and
damping (``damping_adaptation_decay`` = decay); fixed rows its schedules:
the learning rate, momentum 0.9 and the damping, constant. M&G's periods:
inverses every 20 steps, damping every 5, factor EMA 0.95.
"""

import json
import sys

import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np
import optax


def main(arrays, rows, out):
  saved = np.load(arrays)
  data = {"inputs": jnp.asarray(saved["inputs"]),
          "targets": jnp.asarray(saved["targets"])}
  indices = saved["indices"]

  def initial_params():  # Fresh arrays: kfac-jax donates its inputs.
    return [{k: jnp.array(saved[f"{k}{i}"]) for k in ("w", "b")}
            for i in range(2)]

  def data_loss(params, batch):
    hidden = jnp.tanh(batch["inputs"] @ params[0]["w"] + params[0]["b"])
    logits = hidden @ params[1]["w"] + params[1]["b"]
    return logits, jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["targets"]))

  def loss_fn(params, batch):
    logits, value = data_loss(params, batch)
    kfac_jax.register_softmax_cross_entropy_loss(logits, batch["targets"])
    return value

  def run(adaptive, damping, decay, lr):
    kwargs = dict(value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0,
                  initial_damping=damping, inverse_update_period=20,
                  damping_adaptation_interval=5, curvature_ema=0.95,
                  num_burnin_steps=0, multi_device=False)
    if adaptive:
      kwargs.update(use_adaptive_learning_rate=True,
                    use_adaptive_momentum=True, use_adaptive_damping=True,
                    damping_adaptation_decay=decay)
    else:
      kwargs.update(learning_rate_schedule=lambda _: lr,
                    momentum_schedule=lambda _: 0.9,
                    damping_schedule=lambda _: damping)
    opt = kfac_jax.Optimizer(**kwargs)
    batch_at = lambda i: jax.tree.map(lambda x: x[indices[i]], data)
    params = initial_params()
    state = opt.init(params, jax.random.key(0), batch_at(0))
    for i in range(indices.shape[0]):
      params, state, _ = opt.step(params, state, jax.random.key(i + 1),
                                  batch=batch_at(i), global_step_int=i)
    return float(data_loss(params, data)[1])

  with open(rows) as f:
    table = json.load(f)
  results = {name: run(*row) for name, row in table.items()}
  with open(out, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
