"""K-FAC's inverse refresh spread over the devices, against the replicated one.

Inside ``jax.shard_map`` over 4 devices (forced host devices on a CPU:
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` is set below, before
jax is imported), ``curvature.kfac(..., axis_name="batch")`` either refreshes
every layer's damped inverses on every device (replicated, the default) or,
with ``distribute_inverses=True``, gives each layer's block to one device
(greedy by ``dim³``) and shares the results with one ``psum``.

Model: a tanh MLP ``--sizes`` (default 512-512-512-512-512-512-10: six
blocks of about the same cost, ``Ā`` 513², ``G`` 512², and a small last
``G``), softmax cross-entropy, a global batch of ``--batch`` examples split
over the 4 devices, float32.

The refresh time is measured as the difference between the median time of
a step that refreshes (``inverse_every=1``) and of one that does not
(``inverse_every`` larger than the run, no warm-up): the rest of the step is
the same in both. The four step functions (replicated or distributed, with
or without a refresh) are compiled and run once before timing, then called
round-robin for ``--repeats`` rounds, each call blocking on its result;
medians are reported. On forced host devices the 4 "devices" share the
machine's cores, so the replicated refresh does 4 times the work on the same
cores: the ratio measures the work saved, not a multi-accelerator speed-up.

Run: ``python benchmarks/kfac_distributed.py [--sizes 512,512,...]
[--batch 256] [--repeats 15]``.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import time  # noqa: E402

from _common import machine  # noqa: E402  (benchmarks/ is not a package)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import curvature  # noqa: E402

LOSS = curvature.losses.softmax_cross_entropy
NEVER = 10 ** 9


def init_params(sizes, seed=0):
  key = jax.random.PRNGKey(seed)
  params = []
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    w = jax.random.normal(jax.random.fold_in(key, i), (fan_in, fan_out))
    params.append({"w": w / np.sqrt(fan_in), "b": jnp.zeros(fan_out)})
  return params


def predict(params, batch):
  x = batch["inputs"]
  for layer in params[:-1]:
    x = jnp.tanh(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def make_step(mesh, distribute, inverse_every):
  """A jitted shard_map-ed K-FAC step and its optimizer."""
  opt = curvature.kfac(1e-3, predict_fn=predict, loss=LOSS,
                       inverse_every=inverse_every, inverse_warmup=False,
                       axis_name="batch", distribute_inverses=distribute)

  def step(params, state, batch):
    grads = jax.grad(lambda p: LOSS.value(predict(p, batch),
                                          batch["targets"]))(params)
    grads = jax.lax.pmean(grads, "batch")
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  return opt, jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(), P("batch")),
      out_specs=(P(), P())))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="512,512,512,512,512,512,10")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args()
  sizes = tuple(int(s) for s in args.sizes.split(","))
  assert jax.device_count() == 4, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  params = init_params(sizes)
  key = jax.random.PRNGKey(1)
  batch = {"inputs": jax.random.normal(key, (args.batch, sizes[0])),
           "targets": jax.random.randint(key, (args.batch,), 0, sizes[-1])}

  runs = {}
  for distribute in (False, True):
    for every in (1, NEVER):
      opt, step = make_step(mesh, distribute, every)
      state = opt.init(params)
      # Two calls: the first refreshes whatever the schedule (step 0).
      for _ in range(2):
        out = step(params, state, batch)
        jax.block_until_ready(out)
        state = out[1]
      runs[distribute, every] = (step, state)

  times = {name: [] for name in runs}
  for _ in range(args.repeats):
    for name, (step, state) in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(step(params, state, batch))
      times[name].append(time.perf_counter() - start)
  median = {name: float(np.median(t)) for name, t in times.items()}

  refresh = {d: median[d, 1] - median[d, NEVER] for d in (False, True)}
  print(machine())
  print(f"MLP {'-'.join(map(str, sizes))}, batch {args.batch} over 4"
        f" devices, {args.repeats} interleaved rounds (medians)")
  for distribute in (False, True):
    label = "distributed" if distribute else "replicated "
    print(f"  {label}: step with refresh {1e3 * median[distribute, 1]:8.1f}"
          f" ms, without {1e3 * median[distribute, NEVER]:8.1f} ms,"
          f" refresh {1e3 * refresh[distribute]:8.1f} ms")
  print(f"refresh time, distributed / replicated:"
        f" {refresh[True] / refresh[False]:.2f}")
  print(f"step with refresh, distributed / replicated:"
        f" {median[True, 1] / median[False, 1]:.2f}")


if __name__ == "__main__":
  main()
