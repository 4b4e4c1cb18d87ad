"""Optimizer states round-trip through orbax-checkpoint.

Every state is a pytree of arrays (PRNG keys are typed key arrays), so
``orbax.checkpoint.StandardCheckpointer`` saves it as is and restores it
against a target: the concrete state, or ``jax.eval_shape(opt.init, params)``
when restoring into a fresh process. Typed keys need no conversion with
orbax >= 0.12 (tested here); without a target orbax returns plain dicts.
A checkpoint from a 4-device run restores onto 2 devices and onto 1 and
continues on the same loss curve (orbax reshards to the target shardings).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from helpers import mlp_predict
from helpers import regression_problem
from test_contract import TRANSFORMS
from test_contract import _with_learning_rate

LOSS = TRANSFORMS["hessian_free"][1]["loss"]


def _problem():
  return regression_problem(n=16, sizes=(3, 6, 2), dtype=jnp.float32)


def _loss(params, batch):
  return LOSS.value(mlp_predict(params, batch), batch["targets"])


def _optimizer(name):
  factory, kwargs = TRANSFORMS[name]
  return _with_learning_rate(name, factory(**kwargs))


def _scramble(state):
  """Distinct, non-trivial values in every leaf, without running a step."""
  leaves, treedef = jax.tree.flatten(state)
  out = []
  for i, leaf in enumerate(leaves):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      out.append(jax.random.fold_in(leaf, i + 1))
    elif jnp.issubdtype(leaf.dtype, jnp.bool_):
      out.append(~leaf)
    else:
      ramp = jnp.arange(leaf.size, dtype=leaf.dtype).reshape(leaf.shape)
      out.append(leaf + ramp + jnp.asarray(i + 1, leaf.dtype))
  return jax.tree.unflatten(treedef, out)


def _bits(tree):
  """Leaves as NumPy arrays, keys as their raw key data, for exact compares."""
  def raw(leaf):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)
  return [raw(leaf) for leaf in jax.tree.leaves(tree)]


def _assert_bit_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(_bits(a), _bits(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def _save_and_restore(path, tree, target):
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tree)
  checkpointer.wait_until_finished()
  return checkpointer.restore(path, target)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_state_round_trips(name, tmp_path):
  """Every leaf, key arrays included, comes back bit for bit, with its
  dtype and the state's NamedTuple structure, into an abstract target."""
  opt = _optimizer(name)
  params, _ = _problem()
  state = _scramble(opt.init(params))
  abstract = jax.eval_shape(opt.init, params)
  restored = _save_and_restore(tmp_path / "state", state, abstract)
  _assert_bit_identical(state, restored)
  assert type(restored) is type(state)


def _run(step, params, state, batches):
  for batch in batches:
    params, state = step(params, state, batch)
  return params, state


# Transforms with keys, warm starts, factor EMAs and inverses refreshed every
# other step, moments, and optax's own stateful wrappers.
RESUMED = ["hessian_free_sampled_fisher", "natural_gradient_sampled", "kfac",
           "scale_by_curvature_diagonal_hutchinson", "adam"]


@pytest.mark.parametrize("name", RESUMED)
def test_resume_is_bit_identical(name, tmp_path):
  """Stopped at step k = 3, saved, restored: the next steps are identical."""
  opt = optax.chain(optax.clip_by_global_norm(1.0), _optimizer(name))
  params, batch = _problem()
  batches = [dict(batch, inputs=batch["inputs"] + 0.1 * k) for k in range(6)]

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(_loss)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  state0 = opt.init(params)
  expected = _run(step, params, state0, batches)

  stopped = _run(step, params, state0, batches[:3])
  target = (jax.eval_shape(lambda: params),
            jax.eval_shape(opt.init, params))
  restored = _save_and_restore(tmp_path / "step3", stopped, target)
  _assert_bit_identical(stopped, restored)
  resumed = _run(step, *restored, batches[3:])
  _assert_bit_identical(expected, resumed)


# Resume on another mesh: a checkpoint written by a run whose batch is sharded
# over 4 (forced host) devices is restored by orbax onto a mesh of 2 devices
# and of 1, with the target shardings of the new mesh, and the run continues
# on the same loss curve. The main pytest process has one device, so each
# side runs in a subprocess with its own XLA_FLAGS.
RESHARD_SCRIPT = r'''
import json, sys, os
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np, optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import curvature
from helpers import mlp_predict, regression_problem

MODE, PATH = sys.argv[1], sys.argv[2]
STEPS = 3
loss = curvature.losses.squared_error
model = dict(predict_fn=mlp_predict, loss=loss)
OPTIMIZERS = {
    "hessian_free": lambda: curvature.hessian_free(max_cg_iterations=20, **model),
    "kfac": lambda: curvature.kfac(0.05, inverse_every=2, **model),
    "adam": lambda: curvature.adam(0.01),
}
mesh = Mesh(np.array(jax.devices()), ("batch",))
data = NamedSharding(mesh, P("batch"))
replicated = NamedSharding(mesh, P())
params, batch = regression_problem(n=32, sizes=(3, 6, 2))
batch = jax.device_put(batch, data)

def objective(p, b):
  return loss.value(mlp_predict(p, b), b["targets"])

def make_step(opt):
  @jax.jit
  def step(params, state, batch):
    value, grads = jax.value_and_grad(objective)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, value
  return step

def run(step, params, state, n):
  values = []
  for _ in range(n):
    params, state, value = step(params, state, batch)
    values.append(float(value))
  return params, state, values

checkpointer = ocp.StandardCheckpointer()
results = {}
for name, make in OPTIMIZERS.items():
  opt = make()
  step = make_step(opt)
  path = os.path.join(PATH, name)
  if MODE == "save":
    p = jax.device_put(params, replicated)
    state = opt.init(p)
    p, state, first = run(step, p, state, STEPS)
    checkpointer.save(path, {"params": p, "state": state})
    checkpointer.wait_until_finished()
    _, _, rest = run(step, p, state, STEPS)
    results[name] = {"devices": jax.device_count(), "losses": first + rest}
  else:
    abstract = jax.eval_shape(lambda p: {"params": p, "state": opt.init(p)},
                              params)
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                          sharding=replicated), abstract)
    restored = checkpointer.restore(path, target)
    devices = {d for leaf in jax.tree.leaves(restored)
               for d in leaf.sharding.device_set}
    _, _, rest = run(step, restored["params"], restored["state"], STEPS)
    results[name] = {"devices": len(devices), "losses": rest}
print(json.dumps(results))
'''


def _run_on_devices(num_devices, mode, path):
  env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__),
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                        f"platform_device_count={num_devices}"))
  result = subprocess.run(
      [sys.executable, "-c", RESHARD_SCRIPT, mode, str(path)], env=env,
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_resume_on_a_smaller_mesh(tmp_path):
  saved = _run_on_devices(4, "save", tmp_path)
  for devices in (2, 1):
    resumed = _run_on_devices(devices, "restore", tmp_path)
    for name, run in saved.items():
      assert run["devices"] == 4
      assert resumed[name]["devices"] == devices, name
      continued = run["losses"][len(run["losses"]) // 2:]
      np.testing.assert_allclose(resumed[name]["losses"], continued,
                                 rtol=1e-10, err_msg=f"{name}, {devices}")
