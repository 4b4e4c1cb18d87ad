"""Data parallelism: a batch sharded over 4 (forced host) devices gives the
single-device results, because every reduction is a mean over the global
batch inside ``jit`` and GSPMD makes it global.

The main pytest process has already initialised jax with one device, so the
checks run in one subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``; it prints one JSON
line of relative differences that the tests below read.
"""

import json
import os
import subprocess
import sys

SCRIPT = r'''
import json
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import curvature
from helpers import flat, mlp_predict, regression_problem

assert jax.device_count() == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("batch",))
data = NamedSharding(mesh, P("batch"))
replicated = NamedSharding(mesh, P())
loss = curvature.losses.squared_error
params, batch = regression_problem(n=32, sizes=(3, 6, 2))
sharded_batch = jax.device_put(batch, data)
sharded_params = jax.device_put(params, replicated)
model = dict(predict_fn=mlp_predict, loss=loss)
optimizers = {
    "hessian_free": curvature.hessian_free(max_cg_iterations=20, **model),
    "natural_gradient": curvature.natural_gradient(0.5, **model),
    "natural_gradient_sampled": curvature.natural_gradient(
        0.5, fisher="sampled_fisher", num_samples=2, **model),
    "kfac": curvature.kfac(0.05, inverse_every=1, **model),
    "adam": curvature.adam(0.01),
}

def rel(a, b):
  a, b = flat(a), flat(b)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

def run(opt, params, batch):
  @jax.jit
  def step(params, state, batch):
    value, grads = jax.value_and_grad(
        lambda p: loss.value(mlp_predict(p, batch), batch["targets"]))(params)
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state
  state = opt.init(params)
  for _ in range(3):
    params, state = step(params, state, batch)
  return params, state

out = {}
for name, opt in optimizers.items():
  single, _ = run(opt, params, batch)
  multi, _ = run(opt, sharded_params, sharded_batch)
  out[name] = rel(multi, single)

def diagnostics(params, batch):
  lin = curvature.linearize(mlp_predict, loss, params, batch)
  trace = curvature.hutchinson_trace(lin.matvec, params, num_samples=20,
                                     key=jax.random.key(0)).trace
  top = curvature.top_eigenpairs(lin.matvec, params, k=2,
                                 key=jax.random.key(1)).eigenvalues
  return trace, top

diag = jax.jit(diagnostics)
t1, e1 = diag(params, batch)
t2, e2 = diag(sharded_params, sharded_batch)
out["hutchinson_trace"] = rel(t2, t1)
out["top_eigenpairs"] = rel(e2, e1)
# The sharded step really ran on 4 devices with a sharded batch.
out["batch_devices"] = len(sharded_batch["inputs"].sharding.device_set)
print("RESULT " + json.dumps(out))
'''


def _results():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  here = os.path.dirname(os.path.abspath(__file__))
  env["PYTHONPATH"] = os.pathsep.join(
      [here, os.path.dirname(here), env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


SHARDED_CHECKS = ("hessian_free", "natural_gradient", "natural_gradient_sampled",
                  "kfac", "adam", "hutchinson_trace", "top_eigenpairs")


def test_sharded_matches_single_device():
  """One test, so that pytest-xdist starts the subprocess once."""
  results = _results()
  assert results["batch_devices"] == 4
  mismatched = {n: results[n] for n in SHARDED_CHECKS if results[n] >= 1e-9}
  assert not mismatched, f"relative differences: {mismatched}"
