"""Multi-process data-parallel training on JAX's own distributed runtime.

Two processes on this machine, each with two CPU devices (four global
devices), train the same small MLP classifier with Hessian-free, adaptive
K-FAC and Adam. Every process feeds only its own shard of the global batch
(``jax.make_array_from_process_local_data``); the parameters and optimizer
state are replicated. There is no hand-written communication: the train step
is one ``jax.jit`` over global arrays, and XLA inserts the all-reduces that
the curvature products, CG, the K-FAC statistics and the loss need (on CPU
through Gloo collectives, on GPU through NCCL).

This is how a user goes past one machine: run the same script once per
process with ``jax.distributed.initialize``. The curvature transforms need no
``axis_name`` here (that is for ``shard_map``/``pmap`` steps).

Run: ``python examples/multiprocess_training.py`` (it launches its two
workers itself and prints the final loss of each optimizer). ``--steps``
sets the number of steps and ``--out FILE.npz`` saves the final parameters,
which ``tests/test_distributed.py`` compares with a single-process run on the
global batch.
"""

import argparse
import os
import socket
import subprocess
import sys

NUM_PROCESSES = 2
LOCAL_DEVICES = 2
GLOBAL_BATCH = 32
SIZES = (8, 16, 4)


def make_problem():
  """Parameters and the global batch (float64), identical in every process."""
  import jax
  import jax.numpy as jnp

  key = jax.random.PRNGKey(0)
  params = []
  for i, (fan_in, fan_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
    k = jax.random.fold_in(key, i)
    params.append({
        "w": jax.random.normal(k, (fan_in, fan_out), jnp.float64)
             / jnp.sqrt(fan_in),
        "b": jnp.zeros((fan_out,), jnp.float64),
    })
  kx, ky = jax.random.split(jax.random.fold_in(key, 99))
  batch = {
      "inputs": jax.random.normal(kx, (GLOBAL_BATCH, SIZES[0]), jnp.float64),
      "targets": jax.random.randint(ky, (GLOBAL_BATCH,), 0, SIZES[-1]),
  }
  return params, batch


def predict(params, batch):
  import jax

  x = batch["inputs"]
  for layer in params[:-1]:
    x = jax.nn.tanh(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def optimizers():
  """name -> optimizer; the same in the multi- and single-process runs."""
  import optax

  import curvature

  loss = curvature.losses.softmax_cross_entropy
  return {
      "hessian_free": curvature.hessian_free(
          predict_fn=predict, loss=loss, max_cg_iterations=10),
      "kfac": curvature.kfac(
          1.0, predict_fn=predict, loss=loss, adaptive=True,
          inverse_every=2),
      "adam": optax.adam(1e-2),
  }


def train(optimizer, params, batch, steps):
  """``steps`` jitted train steps on ``batch``; the final parameters."""
  import jax
  import optax

  import curvature

  loss = curvature.losses.softmax_cross_entropy

  def value_fn(params, batch):
    return loss.value(predict(params, batch), batch["targets"])

  @jax.jit
  def step(params, state, batch):
    value, grads = jax.value_and_grad(value_fn)(params, batch)
    updates, state = optimizer.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, value

  state = optimizer.init(params)
  for _ in range(steps):
    params, state, _ = step(params, state, batch)
  return params, float(jax.jit(value_fn)(params, batch))


def worker(process_id, port, steps, out):
  """One process: initialize the runtime, feed its shard, train, save."""
  import jax

  jax.config.update("jax_enable_x64", True)
  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"localhost:{port}",
      num_processes=NUM_PROCESSES, process_id=process_id)
  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  mesh = Mesh(np.array(jax.devices()), ("data",))
  by_example = NamedSharding(mesh, PartitionSpec("data"))
  replicated = NamedSharding(mesh, PartitionSpec())

  params, batch = make_problem()
  per_process = GLOBAL_BATCH // NUM_PROCESSES
  mine = slice(process_id * per_process, (process_id + 1) * per_process)
  global_batch = jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(
          by_example, np.asarray(x)[mine], x.shape), batch)
  global_params = jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(
          replicated, np.asarray(x), x.shape), params)

  results = {}
  for name, optimizer in optimizers().items():
    final, value = train(optimizer, global_params, global_batch, steps)
    gathered = multihost_utils.process_allgather(final, tiled=True)
    results[name] = (gathered, value)
    if process_id == 0:
      print(f"{name:>14}: loss after {steps} steps {value:.6f}", flush=True)
  if process_id == 0 and out:
    flat = {f"{name}/{i}": np.asarray(leaf)
            for name, (tree, _) in results.items()
            for i, leaf in enumerate(jax.tree.leaves(tree))}
    np.savez(out, **flat)
  jax.distributed.shutdown()


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(steps, out, timeout=600):
  """Runs the two workers of this script; raises if either fails."""
  port = free_port()
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # The workers set their own device count.
  workers = [
      subprocess.Popen(
          [sys.executable, __file__, "--process-id", str(i),
           "--port", str(port), "--steps", str(steps)]
          + (["--out", out] if out else []),
          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
          text=True)
      for i in range(NUM_PROCESSES)]
  outputs = [w.communicate(timeout=timeout)[0] for w in workers]
  for i, (w, output) in enumerate(zip(workers, outputs)):
    if w.returncode != 0:
      raise RuntimeError(f"worker {i} failed ({w.returncode}):\n{output}")
  return outputs[0]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--process-id", type=int, default=None)
  parser.add_argument("--port", type=int, default=None)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  if args.process_id is None:
    print(f"{NUM_PROCESSES} processes x {LOCAL_DEVICES} CPU devices, "
          f"global batch {GLOBAL_BATCH}")
    lines = launch(args.steps, args.out).splitlines()
    print("\n".join(line for line in lines if ": loss after" in line))
  else:
    worker(args.process_id, args.port, args.steps, args.out)


if __name__ == "__main__":
  main()
