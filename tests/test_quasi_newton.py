"""BFGS and L-BFGS: optax.lbfgs's iterates, finite termination, the seed's
inverse-Hessian update, the batch= contract and non-finite steps."""

import os
import subprocess
import sys

from flax import nnx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature
from curvature import losses
from curvature import _quasi_newton
from helpers import flat
from helpers import mlp_predict
from helpers import regression_problem

LOSS = losses.squared_error


def _loss(params, batch):
  return LOSS.value(mlp_predict(params, batch), batch["targets"])


def exact_linesearch():
  """The exact step on a quadratic: ``α = −gᵀu / uᵀHu`` (``Hu`` by jvp)."""

  def update_fn(updates, state, params, *, value, grad, value_fn, **extra):
    del value, extra
    curvature_u = jax.jvp(jax.grad(value_fn), (params,), (updates,))[1]
    alpha = -optax.tree.vdot(grad, updates) / optax.tree.vdot(
        updates, curvature_u)
    return optax.tree.scale(alpha, updates), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn)


def quadratic_problem(n=6, condition=30.0, seed=0):
  """``f(x) = ½‖Mx − t‖²`` (one example): Hessian ``MᵀM``, condition ~30."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  singular = np.sqrt(np.logspace(0, np.log10(condition), n))
  matrix = jnp.asarray((q * singular) @ q.T)
  batch = {"inputs": matrix[None], "targets": jnp.asarray(
      rng.standard_normal((1, n)))}
  predict = lambda x, b: jnp.einsum("bij,j->bi", b["inputs"], x)
  return predict, jnp.asarray(rng.standard_normal(n)), batch


def _run(opt, predict, params, batch, steps):
  loss = lambda p: LOSS.value(predict(p, batch), batch["targets"])

  @jax.jit
  def step(params, state):
    updates, state = opt.update(jax.grad(loss)(params), state, params,
                                batch=batch)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  iterates = [params]
  for _ in range(steps):
    params, state = step(params, state)
    iterates.append(params)
  return iterates, state


def test_lbfgs_matches_optax_lbfgs():
  """Same memory, same zoom line search: the same iterates. ``value`` and
  ``grad`` are given here, to skip recomputing them (the other tests let
  the transform compute them)."""
  params, batch = regression_problem(n=16, sizes=(3, 5, 2))
  fn = lambda p: _loss(p, batch)
  ours = curvature.lbfgs(predict_fn=mlp_predict, loss=LOSS, memory_size=4)

  @jax.jit
  def ours_step(params, state):
    value, grad = jax.value_and_grad(fn)(params)
    updates, state = ours.update(grad, state, params, batch=batch,
                                 value=value, grad=grad)
    return optax.apply_updates(params, updates), state

  iterates, state = [params], ours.init(params)
  for _ in range(8):
    params_k, state = ours_step(iterates[-1], state)
    iterates.append(params_k)
  reference = optax.lbfgs(memory_size=4)

  @jax.jit
  def step(params, state):
    value, grad = jax.value_and_grad(fn)(params)
    updates, state = reference.update(grad, state, params, value=value,
                                      grad=grad, value_fn=fn)
    return optax.apply_updates(params, updates), state

  state = reference.init(params)
  for k in range(8):
    params, state = step(params, state)
    np.testing.assert_allclose(flat(iterates[k + 1]), flat(params),
                               rtol=1e-12, atol=1e-14, err_msg=f"step {k + 1}")
  assert _loss(iterates[-1], batch) < 0.7 * _loss(iterates[0], batch)


@pytest.mark.parametrize("scale_init_precond", [True, False])
def test_bfgs_with_exact_line_search_terminates_in_n_steps(scale_init_precond):
  predict, x0, batch = quadratic_problem(n=6)
  opt = curvature.bfgs(predict_fn=predict, loss=LOSS,
                       scale_init_precond=scale_init_precond,
                       linesearch=exact_linesearch())
  iterates, state = _run(opt, predict, x0, batch, 6)
  matrix = np.asarray(batch["inputs"][0])
  solution = np.linalg.solve(matrix, np.asarray(batch["targets"][0]))
  errors = [np.linalg.norm(np.asarray(x) - solution) for x in iterates]
  assert errors[-1] < 1e-9 * errors[0], errors
  assert errors[-2] > 1e-6 * errors[0]  # It needs all n steps.
  inner = state[0].inner[0]
  assert int(inner.skipped_updates) == 0
  # Hereditary secant property (Nocedal & Wright 2006, Theorem 6.4): the
  # last H (built from the first n − 1 pairs) maps every yⱼ to sⱼ.
  hessian = matrix.T @ matrix
  steps = np.diff(np.stack([np.asarray(x) for x in iterates[:-1]]), axis=0)
  for s in steps:
    np.testing.assert_allclose(np.asarray(inner.inverse_hessian) @ (
        hessian @ s), s, rtol=1e-7, atol=1e-9 * np.linalg.norm(s))


def check_monotone_descent(opt, steps, reduction):
  """``opt`` on the quadratic: the loss never rises, falls by ``reduction``,
  and no step is rejected."""
  predict, x0, batch = quadratic_problem(n=6)
  iterates, state = _run(opt(predict), predict, x0, batch, steps)
  values = [float(LOSS.value(predict(x, batch), batch["targets"]))
            for x in iterates]
  assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))
  assert values[-1] < reduction * values[0], values
  assert int(state[0].rejected_steps) == 0


def test_bfgs_with_the_zoom_line_search_descends():
  """Unit steps pass the Wolfe tests here; BFGS then corrects H itself."""
  check_monotone_descent(
      lambda predict: curvature.bfgs(predict_fn=predict, loss=LOSS), 15, 1e-3)


def _seed_update(inverse_hessian, s, y):
  """The seed's formula, literally: (I − ρsyᵀ) H (I − ρysᵀ) + ρssᵀ."""
  rho = 1.0 / (y @ s)
  eye = np.eye(len(s))
  return ((eye - rho * np.outer(s, y)) @ inverse_hessian
          @ (eye - rho * np.outer(y, s)) + rho * np.outer(s, s))


def test_bfgs_update_is_the_seed_formula_and_satisfies_the_secant_equation():
  rng = np.random.default_rng(1)
  a = rng.standard_normal((5, 5))
  inverse_hessian = a @ a.T + np.eye(5)
  s, y = rng.standard_normal(5), rng.standard_normal(5)
  y = y if y @ s > 0 else -y
  updated = np.asarray(_quasi_newton.bfgs_update(
      jnp.asarray(inverse_hessian), jnp.asarray(s), jnp.asarray(y)))
  np.testing.assert_allclose(updated, _seed_update(inverse_hessian, s, y),
                             rtol=1e-12)
  np.testing.assert_allclose(updated @ y, s, rtol=1e-12)
  np.testing.assert_allclose(updated, updated.T, rtol=1e-12)


def test_scale_by_bfgs_follows_the_seed_recursion():
  """Directions along a fixed sequence of points and gradients, against a
  NumPy BFGS with the seed's update (H₀ scaled by yᵀs/yᵀy, N&W 6.20)."""
  rng = np.random.default_rng(2)
  points = rng.standard_normal((5, 4))
  a = rng.standard_normal((4, 4))
  hessian = a @ a.T + np.eye(4)
  grads = points @ hessian  # A quadratic's gradients: yᵀs > 0.
  opt = curvature.scale_by_bfgs()
  state = opt.init(jnp.zeros(4))
  inverse_hessian = np.eye(4)
  for k in range(5):
    direction, state = opt.update(jnp.asarray(grads[k]), state,
                                  jnp.asarray(points[k]))
    if k == 0:
      expected = grads[0] * min(1.0, 1.0 / np.linalg.norm(grads[0]))
    else:
      s, y = points[k] - points[k - 1], grads[k] - grads[k - 1]
      if k == 1:
        inverse_hessian = (y @ s) / (y @ y) * np.eye(4)
      inverse_hessian = _seed_update(inverse_hessian, s, y)
      expected = inverse_hessian @ grads[k]
    np.testing.assert_allclose(direction, expected, rtol=1e-10)


def test_bfgs_skips_a_pair_without_positive_curvature():
  opt = curvature.scale_by_bfgs()
  state = opt.init(jnp.zeros(2))
  _, state = opt.update(jnp.asarray([1.0, 0.0]), state, jnp.zeros(2))
  direction, state = opt.update(jnp.asarray([0.0, 0.0]), state,
                                jnp.asarray([1.0, 0.0]))  # yᵀs = −1.
  assert int(state.skipped_updates) == 1
  np.testing.assert_array_equal(state.inverse_hessian, np.eye(2))
  np.testing.assert_array_equal(direction, [0.0, 0.0])


def test_lbfgs_in_nnx_optimizer():
  """nnx.Optimizer forwards only keyword arguments: batch= is enough."""
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  predict = lambda params, batch: nnx.merge(graphdef, params, rest)(
      batch["inputs"])
  _, batch = regression_problem(n=16, sizes=(3, 2), dtype=jnp.float32)
  optimizer = nnx.Optimizer(
      model, curvature.lbfgs(predict_fn=predict, loss=LOSS), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    loss_fn = lambda m: LOSS.value(m(batch["inputs"]), batch["targets"])
    value, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, batch=batch)
    return value

  values = [float(step(model, optimizer, batch)) for _ in range(6)]
  assert values[-1] < 0.5 * values[0], values


def _nan_where_moved(params0):
  """``‖x‖²`` at ``params0`` and NaN at every other point: the line search
  only ever sees NaN."""

  def predict(x, batch):
    del batch
    value = jnp.where(jnp.all(x == params0), jnp.sum(x * x), jnp.nan)
    return jnp.sqrt(2 * value)[None, None]

  return predict


def test_non_finite_input_is_rejected_and_counted():
  params, batch = regression_problem(n=8, sizes=(3, 2))
  opt = curvature.lbfgs(predict_fn=mlp_predict, loss=LOSS)
  state = opt.init(params)
  grads = jax.grad(_loss)(params, batch)
  update = jax.jit(lambda g, s, b: opt.update(g, s, params, batch=b))
  _, state = update(grads, state, batch)  # One good step fills the memory.
  good_inner = state[0].inner
  bad_grads = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), grads)
  bad_batch = dict(batch, targets=batch["targets"].at[0, 0].set(jnp.inf))
  for k, (g, b) in enumerate([(bad_grads, batch), (grads, bad_batch)]):
    updates, state = update(g, state, b)
    assert np.all(flat(updates) == 0)
    assert int(state[0].rejected_steps) == k + 1
    for kept, now in zip(jax.tree.leaves(good_inner),
                         jax.tree.leaves(state[0].inner)):
      np.testing.assert_array_equal(kept, now)  # The memory is kept.


def test_a_non_finite_line_search_is_rejected():
  x0 = jnp.asarray([1.0, -2.0])
  predict = _nan_where_moved(x0)
  batch = {"inputs": jnp.zeros((1, 1)), "targets": jnp.zeros((1, 1))}
  opt = curvature.lbfgs(predict_fn=predict, loss=LOSS)
  grads = jax.grad(lambda x: LOSS.value(predict(x, batch),
                                        batch["targets"]))(x0)
  assert np.all(np.isfinite(grads))
  updates, state = jax.jit(
      lambda s: opt.update(grads, s, x0, batch=batch))(opt.init(x0))
  assert np.all(np.asarray(updates) == 0)
  assert int(state[0].rejected_steps) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(memory_size=0), "memory_size.*>= 1"),
    (dict(memory_size=2.5), "memory_size.*Python int"),
    (dict(learning_rate=-1.0), "learning_rate"),
    (dict(loss=None), "curvature.losses.Loss"),
])
def test_bad_arguments_raise(kwargs, match):
  kwargs = dict(dict(predict_fn=mlp_predict, loss=LOSS), **kwargs)
  with pytest.raises((ValueError, TypeError), match=match):
    curvature.lbfgs(**kwargs)


def test_update_without_batch_or_params_raises():
  params, batch = regression_problem(n=8, sizes=(3, 2))
  opt = curvature.bfgs(predict_fn=mlp_predict, loss=LOSS)
  state = opt.init(params)
  with pytest.raises(ValueError, match="batch=batch"):
    opt.update(params, state, params)
  with pytest.raises(ValueError, match="needs the parameters"):
    opt.update(params, state, batch=batch)


def test_bfgs_state_is_dense():
  params, _ = regression_problem(n=8, sizes=(3, 2))
  n = ravel_pytree(params)[0].size
  state = curvature.scale_by_bfgs().init(params)
  assert state.inverse_hessian.shape == (n, n)


SHARD_MAP_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2")
import jax
import numpy as np
jax.config.update("jax_enable_x64", True)
from jax.sharding import NamedSharding, PartitionSpec as P
import curvature
from helpers import flat, mlp_predict, regression_problem
LOSS = curvature.losses.squared_error
params, batch = regression_problem(n=8, sizes=(3, 4, 2))
loss = lambda p, b: LOSS.value(mlp_predict(p, b), b["targets"])
mesh = jax.make_mesh((2,), ("b",))
sharded_batch = jax.device_put(batch, NamedSharding(mesh, P("b")))
for name, kwargs in [("lbfgs", {}), ("saddle_free_newton",
                                     dict(num_iterations=5))]:
  factory = getattr(curvature, name)
  full = factory(predict_fn=mlp_predict, loss=LOSS, **kwargs)
  expected, _ = full.update(jax.grad(loss)(params, batch), full.init(params),
                            params, batch=batch)
  opt = factory(predict_fn=mlp_predict, loss=LOSS, axis_name="b", **kwargs)

  def step(shard):
    grads = jax.grad(lambda p: jax.lax.pmean(loss(p, shard), "b"))(params)
    return opt.update(grads, opt.init(params), params, batch=shard)[0]

  got = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("b"),),
                              out_specs=P()))(sharded_batch)
  print(name, np.abs(flat(got) - flat(expected)).max())
"""


def test_shard_map_with_axis_name_matches_full_batch():
  """Two host devices, each with half the batch, take the full-batch step:
  the objective, the gradient (and the Hessian products) are pmean-ed."""
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  result = subprocess.run(
      [sys.executable, "-c", SHARD_MAP_SCRIPT], cwd=tests_dir,
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  errors = dict(line.split() for line in result.stdout.strip().splitlines())
  assert set(errors) == {"lbfgs", "saddle_free_newton"}, result.stdout
  for name, error in errors.items():
    assert float(error) < 1e-12, (name, error)
