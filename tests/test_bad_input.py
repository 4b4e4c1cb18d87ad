"""The bad-input catalogue: every public transform against hostile input.

Each case either raises a clear ``ValueError``/``TypeError`` at construction
or trace time (the message names the fix), or leaves the parameters finite
and records the rejected step in the optax state. Nothing may crash with an
XLA-internals message.

Non-finite policies under test:

* curvature transforms (Hessian-free family, natural gradient, K-FAC): the
  step is rejected inside the transform (``rejected_steps``);
* first-order aliases: opt-in ``max_consecutive_errors=N``
  (``optax.apply_if_finite``, ``total_notfinite``), set here;
* ``scale_by_*`` primitives, ``polyak_averaging`` and ``monitor`` have no
  policy of their own; they are composed with ``optax.apply_if_finite``, the
  documented way to skip non-finite steps.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature
from curvature import losses
from helpers import flat
from helpers import mlp_predict
from helpers import regression_problem
from test_contract import TRANSFORMS
from test_contract import _with_learning_rate

LOSS = losses.squared_error
NAMES = sorted(TRANSFORMS)

# Transforms that reject non-finite steps themselves.
SELF_REJECTING = {
    "hessian_free", "hessian_free_sampled_fisher", "gauss_newton",
    "levenberg_marquardt", "newton", "damped_newton", "scale_by_hessian_free",
    "natural_gradient", "natural_gradient_sampled",
    "scale_by_natural_gradient", "kfac", "kfac_adaptive", "scale_by_kfac",
}
# First-order aliases: their documented policy is `max_consecutive_errors`.
FIRST_ORDER_ALIASES = {
    "sgd", "sgd_momentum", "heavy_ball", "nesterov", "adagrad", "rmsprop",
    "rmsprop_nesterov", "adadelta", "adam", "adam_no_bias_correction",
    "delta_bar_delta",
}
# Transforms that evaluate the loss (so a NaN loss with finite gradients is
# seen and rejected); the others never compute it and step normally.
USES_LOSS = {
    "hessian_free", "hessian_free_sampled_fisher", "gauss_newton",
    "levenberg_marquardt", "newton", "damped_newton", "scale_by_hessian_free",
    "natural_gradient", "natural_gradient_sampled",
    "scale_by_natural_gradient",
}
# Steps that must not raise the loss (line search or LM step rejection).
MONOTONE = {"hessian_free", "levenberg_marquardt", "damped_newton",
            "scale_by_hessian_free"}
# Transforms allowed to move at a zero gradient (none, so far).
MOVES_WITHOUT_GRADIENT = set()

# Defects in modules owned elsewhere, reported and pinned here (strict
# xfail: the test starts failing once they are fixed, so drop the entry).
KNOWN_DEFECTS = {}  # (case, transform) -> reason; strict xfails.


def _names(test, names=None):
  """``names`` as pytest params, known defects marked as strict xfails."""
  return [
      pytest.param(n, marks=pytest.mark.xfail(
          strict=True, reason=KNOWN_DEFECTS[(test, n)]))
      if (test, n) in KNOWN_DEFECTS else n
      for n in (NAMES if names is None else names)]


REJECTION_FIELDS = ("rejected_steps", "total_notfinite")


def _optimizer(name, **overrides):
  """The transform ``name`` with its documented non-finite policy on."""
  factory, kwargs = TRANSFORMS[name]
  kwargs = dict(kwargs, **overrides)
  if name in FIRST_ORDER_ALIASES:
    kwargs["max_consecutive_errors"] = 3
  opt = _with_learning_rate(name, factory(**kwargs))
  if name not in SELF_REJECTING | FIRST_ORDER_ALIASES:
    opt = optax.with_extra_args_support(optax.apply_if_finite(opt, 3))
  return opt


def rejections(state) -> int:
  """Sums every ``rejected_steps`` / ``total_notfinite`` field in ``state``."""
  total = 0

  def visit(node):
    nonlocal total
    if hasattr(node, "_fields"):
      for field in node._fields:
        value = getattr(node, field)
        if field in REJECTION_FIELDS:
          total += int(value)
        else:
          visit(value)
    elif isinstance(node, (tuple, list)):
      for item in node:
        visit(item)
    elif isinstance(node, dict):
      for item in node.values():
        visit(item)

  visit(state)
  return total


def _problem(dtype=jnp.float64):
  """Linear least squares whose GGN ``XᵀX/N`` has condition number ~1e12.

  ``mlp_predict`` with one layer is linear; every case of the catalogue
  runs on this problem, so one compiled step per transform serves them all.
  """
  rng = np.random.default_rng(0)
  n, d, condition = 32, 6, 1e12
  u = rng.standard_normal((n, d))
  u -= u.mean(axis=0)  # Orthogonal to the bias direction.
  u, _ = np.linalg.qr(u)
  v, _ = np.linalg.qr(rng.standard_normal((d, d)))
  singular = np.sqrt(n) * np.logspace(0, -0.5 * np.log10(condition), d)
  x = (u * singular) @ v.T
  w_true = rng.standard_normal((d, 2))
  batch = {"inputs": jnp.asarray(x, dtype),
           "targets": jnp.asarray(x @ w_true + 0.1, dtype)}
  params = [{"w": jnp.asarray(0.1 * rng.standard_normal((d, 2)), dtype),
             "b": jnp.zeros((2,), dtype)}]
  return params, batch


def _loss(params, batch):
  return LOSS.value(mlp_predict(params, batch), batch["targets"])


def _compiled(name, **overrides):
  """One jitted step and initial state per transform, shared by the cases."""
  return _compiled_cached(name, tuple(sorted(overrides.items())))


@functools.lru_cache(maxsize=None)
def _compiled_cached(name, overrides):
  opt = _optimizer(name, **dict(overrides))
  params, _ = _problem()

  @jax.jit
  def step(params, state, grads, batch):
    value = _loss(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch, value=value)
    return optax.apply_updates(params, updates), state

  return step, opt.init(params)


def _poison(tree, value):
  """``tree`` with its first entry set to ``value``."""
  leaves, treedef = jax.tree.flatten(tree)
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(value)
  return jax.tree.unflatten(treedef, leaves)


def _case(case, params):
  """(grads, batch, non_finite) for a data case at ``params``."""
  _, batch = _problem()
  grads = jax.grad(_loss)(params, batch)
  if case == "nan_grad":
    return _poison(grads, jnp.nan), batch, True
  if case == "inf_grad":
    return _poison(grads, jnp.inf), batch, True
  if case == "nan_batch":
    bad = dict(batch, inputs=batch["inputs"].at[0, 0].set(jnp.nan))
    return jax.grad(_loss)(params, bad), bad, True
  if case == "nan_loss":
    # Finite gradients, but the batch makes the loss NaN: only transforms
    # that evaluate the loss can notice.
    bad = dict(batch, targets=batch["targets"].at[0, 0].set(jnp.nan))
    return grads, bad, None
  if case == "zero_grad":
    return optax.tree.zeros_like(grads), batch, False
  return grads, batch, False


DATA_CASES = ("nan_grad", "inf_grad", "nan_batch", "nan_loss", "zero_grad")


def _check_case(name, step, state0, params0, case):
  grads, batch, non_finite = _case(case, params0)
  params, state = step(params0, state0, grads, batch)
  assert np.all(np.isfinite(flat(params))), f"{case}: NaN reached params"
  seen = rejections(state)
  if non_finite is None:  # nan_loss: a rejection only where the loss is used.
    non_finite = name in USES_LOSS
  if non_finite:
    assert seen == 1, f"{case}: the rejected step was not recorded"
    np.testing.assert_array_equal(flat(params), flat(params0),
                                  err_msg=f"{case}: a rejected step moved")
  elif case == "zero_grad":
    assert seen == 0, f"{case}: a finite step was rejected"
    if name not in MOVES_WITHOUT_GRADIENT:
      np.testing.assert_allclose(flat(params), flat(params0), atol=1e-12,
                                 err_msg="zero gradient, but a step")
  # A good step after the bad one works: the state is not poisoned.
  good_grads, good_batch, _ = _case("good", params)
  params2, state2 = step(params, state, good_grads, good_batch)
  assert np.all(np.isfinite(flat(params2))), f"{case}: poisoned state"
  assert rejections(state2) == seen, f"{case}: a good step was rejected"


def _three_steps(step, state):
  """Three good steps on the κ = 1e12 problem: finite, none rejected.

  Returns:
    The loss before and after.
  """
  params, batch = _problem()
  start = float(_loss(params, batch))
  for _ in range(3):
    grads = jax.grad(_loss)(params, batch)
    params, state = step(params, state, grads, batch)
  assert np.all(np.isfinite(flat(params)))
  assert rejections(state) == 0
  return start, float(_loss(params, batch))


@pytest.mark.parametrize("name", NAMES)
def test_bad_data_and_condition_number_1e12(name):
  """NaN/Inf gradients, NaN batch, NaN loss, zero gradients, then three steps
  on the κ = 1e12 problem: finite, nothing rejected, no blow-up."""
  step, state0 = _compiled(name)
  params0, batch = _problem()
  for case in DATA_CASES:
    _check_case(name, step, state0, params0, case)
  start, end = _three_steps(step, state0)
  assert end < 10 * start, f"loss exploded: {start} -> {end}"
  if name in MONOTONE:
    assert end <= start * (1 + 1e-12), f"{start} -> {end}"


def test_problem_has_condition_number_1e12():
  _, batch = _problem()
  x = np.asarray(batch["inputs"])
  eig = np.linalg.eigvalsh(x.T @ x / x.shape[0])
  assert 1e11 < eig[-1] / eig[0] < 1e13


@pytest.mark.parametrize("name", _names("empty"))
def test_empty_params(name):
  opt = _optimizer(name)
  try:
    state = opt.init({})
  except (ValueError, TypeError) as e:
    assert "empty" in str(e), str(e)
    return
  # Transforms that accept an empty tree must give an empty update.
  updates, _ = opt.update({}, state, {}, batch=_problem()[1])
  assert jax.tree.leaves(updates) == []


def _is_clear(error: Exception) -> bool:
  """A user-facing message, not an XLA or jax internals one."""
  text = str(error).split("-" * 20)[0]  # Drop jax's traceback-filtering note.
  return ("XLA" not in text and "jaxlib" not in text
          and "string indices" not in text and len(text) > 20)


def _int_params():
  params, _ = _problem()
  return jax.tree.map(lambda x: jnp.ones(x.shape, jnp.int32), params)


@pytest.mark.parametrize("name", _names("integer"))
def test_integer_params(name):
  """Integer parameters: a TypeError that says to use floating point."""
  opt = _optimizer(name)
  params = _int_params()
  with pytest.raises(TypeError, match="(?i)float") as info:
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    jax.jit(lambda g, s, p, b: opt.update(g, s, p, batch=b))(
        grads, state, params, _problem()[1])
  assert _is_clear(info.value), str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_mismatched_gradient_shapes(name):
  """Gradients that do not match the parameters: a clear error at trace time
  of the train step (``update`` or ``optax.apply_updates``)."""
  opt = _optimizer(name)
  params, batch = _problem()
  state = opt.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  grads[0]["w"] = jnp.ones((2, 6), grads[0]["w"].dtype)  # Transposed.

  def step(grads, state, params, batch):
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  with pytest.raises((ValueError, TypeError)) as info:
    jax.eval_shape(step, grads, state, params, batch)
  assert _is_clear(info.value), str(info.value)


# Damped transforms: name -> the damping argument.
DAMPED = {
    "hessian_free": "initial_damping",
    "gauss_newton": "damping",
    "levenberg_marquardt": "damping",
    "damped_newton": "damping",
    "scale_by_hessian_free": "initial_damping",
    "natural_gradient": "initial_damping",
    "scale_by_natural_gradient": "initial_damping",
    "scale_by_curvature_diagonal": "damping",
    "kfac": "initial_damping",
    "scale_by_kfac": "initial_damping",
}
# Those whose damping lives in the state as `damping` from the first step:
# the shared compiled step runs them with the state's damping replaced.
DAMPING_IN_STATE = {"hessian_free", "gauss_newton", "levenberg_marquardt",
                    "damped_newton", "scale_by_hessian_free",
                    "natural_gradient", "scale_by_natural_gradient"}


def _set_damping(state, value):
  """``state`` with every ``damping`` field set to ``value``."""
  if hasattr(state, "_fields"):
    return type(state)(*[
        jnp.full_like(v, value) if f == "damping" else _set_damping(v, value)
        for f, v in zip(state._fields, state)])
  if isinstance(state, tuple):
    return tuple(_set_damping(s, value) for s in state)
  return state


@pytest.mark.parametrize("damping", [0.0, 1e12])
@pytest.mark.parametrize("name", sorted(DAMPED))
def test_absurd_damping(name, damping):
  """λ = 0 or 1e12 on the κ = 1e12 problem: construction succeeds, steps are
  finite, and λ = 1e12 is a tiny gradient step.

  λ = 0 with a singular curvature (e.g. the empirical Fisher) may take large
  steps, but they stay finite; the line-searched transforms never go uphill.
  """
  opt = _optimizer(name, **{DAMPED[name]: damping})  # Must not raise.
  del opt
  if name in DAMPING_IN_STATE:
    step, state = _compiled(name)
    state = _set_damping(state, damping)
  else:
    step, state = _compiled(name, **{DAMPED[name]: damping})
  start, end = _three_steps(step, state)
  if damping == 1e12:
    assert abs(end - start) < 1e-6 * start, "λ=1e12 must barely move"
  elif name in MONOTONE:
    assert end <= start * (1 + 1e-12), f"{start} -> {end}"


# Curvature transforms that reduce over the batch take `axis_name` (for
# jax.shard_map; tests/test_sharding.py checks the results).
AXIS_NAME_TRANSFORMS = sorted(
    name for name, (factory, _) in TRANSFORMS.items()
    if "axis_name" in inspect.signature(factory).parameters)


def test_every_curvature_transform_takes_axis_name():
  first_order = FIRST_ORDER_ALIASES | {
      "scale_by_momentum", "scale_by_ema", "scale_by_adadelta",
      "scale_by_delta_bar_delta", "polyak_averaging"}
  assert set(AXIS_NAME_TRANSFORMS) == set(TRANSFORMS) - first_order


@pytest.mark.parametrize("axis_name", [0, ["batch"], ("batch", 1), (),
                                       {"batch"}])
@pytest.mark.parametrize("name", AXIS_NAME_TRANSFORMS)
def test_bad_axis_name_type(name, axis_name):
  """A bad `axis_name` fails at construction with a TypeError naming it."""
  factory, kwargs = TRANSFORMS[name]
  factory(**kwargs, axis_name=("data", "model"))  # Must not raise.
  with pytest.raises(TypeError, match="axis_name"):
    factory(**kwargs, axis_name=axis_name)


@pytest.mark.parametrize("fn", [
    curvature.linearize, curvature.objective,
    curvature.empirical_fisher_diagonal, curvature.ggn_diagonal,
    functools.partial(curvature.sampled_fisher_diagonal,
                      key=jax.random.key(0)),
    functools.partial(curvature.hutchinson_hessian_diagonal,
                      key=jax.random.key(0)),
    curvature.block_diagonal_curvature])
def test_bad_axis_name_type_in_primitives(fn):
  params, batch = regression_problem(n=4, sizes=(2, 3, 1))
  with pytest.raises(TypeError, match="axis_name='batch'"):
    fn(mlp_predict, LOSS, params, batch, axis_name=1)
