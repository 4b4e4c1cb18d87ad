"""The bad-input catalogue: every public transform against hostile input.

Each case either raises a clear ``ValueError``/``TypeError`` at construction
or trace time (the message names the fix), or leaves the parameters finite
and records the rejected step in the optax state. Nothing may crash with an
XLA-internals message.

Non-finite policies under test, chosen by the flags of each row of the
contract table (``tests/helpers.py``):

* ``self_rejecting`` rows (Hessian-free family, natural gradient, K-FAC,
  Shampoo, ...): the step is rejected inside the transform
  (``rejected_steps``);
* ``max_consecutive_errors`` rows, the first-order aliases: opt-in
  ``max_consecutive_errors=N`` (``optax.apply_if_finite``,
  ``total_notfinite``), set here;
* the others (``scale_by_*`` primitives, ``polyak_averaging``, ``monitor``)
  have no policy of their own; they are composed with
  ``optax.apply_if_finite``, the documented way to skip non-finite steps.

To add a case: a row of the contract table for a new transform, a row of
``BAD_HYPERPARAMETERS`` or ``BATCH_CASES`` for a new hostile input, or a
``KNOWN_DEFECTS`` entry to pin a defect owned elsewhere as a strict xfail.
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
from helpers import CONTRACTS
from helpers import contract_names
from helpers import flat
from helpers import mlp_predict
from helpers import regression_problem
from helpers import TRANSFORMS

LOSS = losses.squared_error
# Every row of the contract table (tests/helpers.py). The tests below pick
# rows by the table's capability flags (self_rejecting, uses_loss, monotone,
# damped, ...): a new transform is covered by adding one row there.
NAMES = contract_names()

# Defects in modules owned elsewhere, reported and pinned here (strict
# xfail: the test starts failing once they are fixed, so drop the entry).
# A case of a table test is keyed "test:case", e.g. ("batch:empty", name).
KNOWN_DEFECTS = {}  # (case, transform) -> reason; strict xfails.


def _names(test, names=None):
  """``names`` as pytest params, known defects marked as strict xfails."""
  return [
      pytest.param(n, marks=pytest.mark.xfail(
          strict=True, reason=KNOWN_DEFECTS[(test, n)]))
      if (test, n) in KNOWN_DEFECTS else n
      for n in (NAMES if names is None else names)]


def _names_and_cases(test, names, cases):
  """(name, case) pytest params; ``(f"{test}:{case}", name)`` in
  ``KNOWN_DEFECTS`` is a strict xfail."""
  params = []
  for name in names:
    for case in sorted(cases):
      key = (f"{test}:{case}", name)
      marks = ([pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS[key])]
               if key in KNOWN_DEFECTS else [])
      params.append(pytest.param(name, case, marks=marks,
                                 id=f"{name}-{case}"))
  return params


REJECTION_FIELDS = ("rejected_steps", "total_notfinite")


def _optimizer(name, **overrides):
  """The transform ``name`` with its documented non-finite policy on."""
  row = CONTRACTS[name]
  if row.max_consecutive_errors:
    overrides = dict(overrides, max_consecutive_errors=3)
  opt = row.build(**overrides)
  if not (row.self_rejecting or row.max_consecutive_errors):
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
    non_finite = CONTRACTS[name].uses_loss
  if non_finite:
    assert seen == 1, f"{case}: the rejected step was not recorded"
    np.testing.assert_array_equal(flat(params), flat(params0),
                                  err_msg=f"{case}: a rejected step moved")
  elif case == "zero_grad":
    assert seen == 0, f"{case}: a finite step was rejected"
    if not CONTRACTS[name].moves_without_gradient:
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
  if CONTRACTS[name].monotone:
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
@pytest.mark.parametrize("name", contract_names(damped=True))
def test_absurd_damping(name, damping):
  """λ = 0 or 1e12 on the κ = 1e12 problem: construction succeeds, steps are
  finite, and λ = 1e12 is a tiny gradient step.

  λ = 0 with a singular curvature (e.g. the empirical Fisher) may take large
  steps, but they stay finite; the line-searched transforms never go uphill.
  Rows with ``positive_damping`` refuse λ = 0 at construction instead.
  Rows with ``damping_in_state`` (the adapted damping is the state's
  ``damping`` from the first step) run the shared compiled step with the
  state's damping replaced; a fixed damping is passed as the argument.
  """
  row = CONTRACTS[name]
  if damping == 0 and row.positive_damping:
    with pytest.raises(ValueError, match="0/0 = NaN") as info:
      _optimizer(name, **{row.damped: damping})
    assert _is_clear(info.value), str(info.value)
    return
  opt = _optimizer(name, **{row.damped: damping})  # Must not raise.
  del opt
  if row.damping_in_state:
    step, state = _compiled(name)
    state = _set_damping(state, damping)
  else:
    step, state = _compiled(name, **{row.damped: damping})
  start, end = _three_steps(step, state)
  if damping == 1e12:
    assert abs(end - start) < 1e-6 * start, "λ=1e12 must barely move"
  elif row.monotone:
    assert end <= start * (1 + 1e-12), f"{start} -> {end}"


# Curvature transforms that reduce over the batch take `axis_name` (for
# jax.shard_map; tests/test_sharding.py checks the results).
AXIS_NAME_TRANSFORMS = sorted(
    name for name, (factory, _) in TRANSFORMS.items()
    if "axis_name" in inspect.signature(factory).parameters)


def test_every_curvature_transform_takes_axis_name():
  assert AXIS_NAME_TRANSFORMS == contract_names(first_order=False)


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


# Hostile input, round 2 (issue 11) --------------------------------------------
#
# Tables, one row per case: extend them with rows for further transforms.

_SCHEDULE = optax.linear_schedule(1.0, 0.1, 100)

# (transform in TRANSFORMS, keyword overrides, error type, message regex):
# construction must raise, and the message must name the fix.
BAD_HYPERPARAMETERS = [
    ("hessian_free", dict(learning_rate=float("nan")), ValueError,
     "learning_rate.*positive number"),
    ("hessian_free", dict(learning_rate=-1.0), ValueError, "learning_rate"),
    ("hessian_free", dict(learning_rate=float("inf")), ValueError,
     "learning_rate"),
    ("gauss_newton", dict(learning_rate=-1.0), ValueError, "learning_rate"),
    ("newton", dict(learning_rate=float("nan")), ValueError, "learning_rate"),
    ("natural_gradient", dict(learning_rate=float("nan")), ValueError,
     "learning_rate"),
    ("natural_gradient", dict(learning_rate=-1.0), ValueError,
     "learning_rate"),
    ("natural_gradient", dict(learning_rate=float("inf")), ValueError,
     "learning_rate"),
    ("scale_by_hessian_free", dict(damping_increase=0.5), ValueError,
     "damping_increase.*>= 1.*Martens uses 1.5"),
    ("scale_by_hessian_free", dict(rho_low=0.9, rho_high=0.5), ValueError,
     "rho_low.*exceeds.*rho_high"),
    ("scale_by_hessian_free", dict(min_damping=1.0, max_damping=0.1),
     ValueError, "min_damping.*exceeds.*max_damping.*Swap"),
    ("scale_by_hessian_free", dict(cg_tol=-1.0), ValueError, "cg_tol.*>= 0"),
    ("hessian_free", dict(damping_increase=0.9), ValueError,
     "damping_increase"),
    ("hessian_free", dict(structural_damping=-0.1), ValueError,
     "structural_damping.*>= 0"),
    ("hessian_free", dict(structural_damping=float("nan")), ValueError,
     "structural_damping"),
    ("scale_by_hessian_free", dict(structural_damping=1 / 30), ValueError,
     "structural_fn=lambda params, batch"),
    ("hessian_free", dict(initial_damping=_SCHEDULE), TypeError,
     "initial_damping.*number.*adapt_damping=False"),
    ("natural_gradient", dict(initial_damping=_SCHEDULE), TypeError,
     "initial_damping.*adapt_damping=False"),
    ("damped_newton", dict(damping=_SCHEDULE), TypeError, "initial_damping"),
    ("scale_by_curvature_diagonal", dict(damping=_SCHEDULE), TypeError,
     "damping.*inject_hyperparams"),
    ("scale_by_curvature_diagonal", dict(damping=0.0), ValueError,
     "damping.*0/0 = NaN.*1e-3"),
    ("scale_by_curvature_diagonal", dict(damping=-1.0), ValueError,
     "damping"),
    ("lbfgs", dict(memory_size=0), ValueError, "memory_size.*>= 1"),
    ("lbfgs", dict(learning_rate=float("nan")), ValueError, "learning_rate"),
    ("bfgs", dict(learning_rate=-1.0), ValueError, "learning_rate"),
    ("nonlinear_cg", dict(beta="dai_yuan"), ValueError,
     "beta.*'fletcher_reeves', 'polak_ribiere', 'hestenes_stiefel'"),
    ("nonlinear_cg", dict(restart_every=0), ValueError, "restart_every"),
    ("saddle_free_newton", dict(lanczos_start="ones"), ValueError,
     "lanczos_start.*'gradient', 'random'"),
    ("saddle_free_newton", dict(damping=-1.0), ValueError, "damping.*>= 0"),
    ("saddle_free_newton", dict(damping=_SCHEDULE), TypeError,
     "damping.*inject_hyperparams"),
    ("saddle_free_newton", dict(num_iterations=0), ValueError,
     "num_iterations"),
    # Optional integer sizes: None means "all" (or "never"), else >= 1.
    ("scale_by_block_diagonal", dict(statistics_batch_size=0), ValueError,
     "statistics_batch_size.*>= 1"),
    ("scale_by_curvature_diagonal", dict(statistics_batch_size=2.5),
     TypeError, "statistics_batch_size.*Python int"),
    ("hessian_free_kfac_preconditioned", dict(preconditioner_batch_size=0),
     ValueError, "preconditioner_batch_size.*>= 1"),
    ("nonlinear_cg", dict(restart_every=True), TypeError,
     "restart_every.*Python int"),
]


@pytest.mark.parametrize(
    "name, overrides, error, match", BAD_HYPERPARAMETERS,
    ids=[f"{n}-{'-'.join(o)}-{i}"
         for i, (n, o, _, _) in enumerate(BAD_HYPERPARAMETERS)])
def test_bad_hyperparameters_raise_at_construction(name, overrides, error,
                                                   match):
  factory, kwargs = TRANSFORMS[name]
  with pytest.raises(error, match=match) as info:
    factory(**dict(kwargs, **overrides))
  assert _is_clear(info.value), str(info.value)


def test_learning_rate_schedules_are_still_accepted():
  for name in ("hessian_free", "natural_gradient", "gauss_newton"):
    factory, kwargs = TRANSFORMS[name]
    factory(**dict(kwargs, learning_rate=_SCHEDULE))  # Must not raise.


def test_a_fixed_damping_schedule_is_followed():
  """With ``adapt_damping=False`` a damping schedule (or an injected value)
  is read at every step, instead of a TypeError or being ignored."""
  params, batch = _problem()
  grads = jax.grad(_loss)(params, batch)
  opt = curvature.scale_by_hessian_free(
      mlp_predict, LOSS, adapt_damping=False,
      initial_damping=lambda count: 10.0 ** (-count))
  state = opt.init(params)
  seen = []
  for _ in range(3):
    _, state = opt.update(grads, state, params, batch=batch)
    seen.append(float(state.damping))
  np.testing.assert_allclose(seen, [1.0, 0.1, 0.01])
  injected = curvature.inject_hyperparams(curvature.gauss_newton)(
      learning_rate=1.0, predict_fn=mlp_predict, loss=LOSS, damping=0.1)
  state = injected.init(params)
  state.hyperparams["damping"] = jnp.asarray(7.0)
  _, state = jax.jit(lambda s: injected.update(grads, s, params, batch=batch))(
      state)
  assert float(_hf_damping(state)) == 7.0


def _hf_damping(state):
  return [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, curvature.ScaleByHessianFreeState))
          if isinstance(s, curvature.ScaleByHessianFreeState)][0].damping


# Batches: leaves without a batch axis, empty batches, disagreeing leaves.

def _with_unbatched_leaves(batch):
  """A dropout rate and a typed PRNG key: per-batch, not per-example."""
  return dict(batch, rate=jnp.asarray(0.1), key=jax.random.key(0))


# case -> (make the batch, None for "finite step" or (error, message regex)).
BATCH_CASES = {
    "unbatched_leaves": (_with_unbatched_leaves, None),
    "empty": (lambda b: jax.tree.map(lambda x: x[:0], b),
              (ValueError, "empty.*0 examples")),
    "leading_axis_mismatch": (
        lambda b: dict(b, weights=jnp.ones(3)),
        (ValueError, r"batch\['weights'\] has 3 entries.*32 examples.*scalars")),
    "raw_uint32_key": (
        lambda b: dict(b, key=jax.random.PRNGKey(0)),
        (ValueError, r"batch\['key'\].*jax.random.key")),
}
# The curvature transforms read the batch; first-order ones ignore it, and so
# do Shampoo and SOAP (their statistics come from the gradient alone).
BATCH_TRANSFORMS = contract_names(reads_batch=True)


@pytest.mark.parametrize(
    "name, case", _names_and_cases("batch", BATCH_TRANSFORMS, BATCH_CASES))
def test_batch_shapes(name, case):
  """A scalar or key leaf is carried along (finite step, nothing rejected);
  an empty batch or a leaf whose leading axis disagrees with the targets
  raises a ValueError at trace time that names the fix."""
  make, expected = BATCH_CASES[case]
  params, batch = _problem()
  batch = make(batch)
  opt = _optimizer(name)
  state = opt.init(params)
  grads = jax.grad(_loss)(params, _problem()[1])

  def step(params, state, grads, batch):
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  if expected is None:
    new_params, new_state = jax.jit(step)(params, state, grads, batch)
    assert np.all(np.isfinite(flat(new_params)))
    assert rejections(new_state) == 0
    return
  error, match = expected
  with pytest.raises(error, match=match) as info:
    jax.eval_shape(step, params, state, grads, batch)
  assert _is_clear(info.value), str(info.value)


def test_batch_size_helper():
  batch = {"inputs": jnp.ones((5, 2)), "targets": jnp.ones(5),
           "rate": 0.1, "key": jax.random.key(1)}
  assert curvature.batch_size(batch) == 5
  # From the targets first, else from the leaves with a leading axis.
  assert curvature.batch_size(batch, targets_fn=lambda b: None) == 5
  taken = curvature.take_examples(batch, 2)
  assert taken["inputs"].shape == (2, 2) and taken["targets"].shape == (2,)
  assert taken["rate"] == 0.1 and taken["key"] is batch["key"]
  with pytest.raises(ValueError, match="targets disagree"):
    curvature.batch_size(batch, targets_fn=lambda b: (jnp.ones(5),
                                                      jnp.ones(4)))
  with pytest.raises(ValueError, match="No leaf of the batch"):
    curvature.batch_size({"rate": 0.1}, targets_fn=lambda b: None)


def test_empty_batch_in_the_chunked_primitives():
  params, batch = _problem()
  empty = jax.tree.map(lambda x: x[:0], batch)
  for fn in (curvature.empirical_fisher_diagonal, curvature.ggn_diagonal):
    with pytest.raises(ValueError, match="empty"):
      fn(mlp_predict, LOSS, params, empty)
  with pytest.raises(ValueError, match="empty"):
    curvature.sampled_fisher_diagonal(mlp_predict, LOSS, params, empty,
                                      key=jax.random.key(0))


# Non-finite events turned into finite parameters and a recorded count.

def _unused_parameter_problem():
  """The catalogue's problem with one parameter the model never reads."""
  params, batch = _problem()
  return ({"layers": params, "unused": jnp.zeros(3)}, batch,
          lambda p, b: mlp_predict(p["layers"], b))


def test_injected_zero_damping_leaves_an_unused_parameter_still_not_nan():
  """λ = 0 reaching the diagonal transform under jit (injected): the unused
  parameter's 0/0 takes its limit 0 (as ``optax.adagrad``), the others move,
  and nothing is rejected."""
  params, batch, predict = _unused_parameter_problem()
  opt = curvature.inject_hyperparams(curvature.scale_by_curvature_diagonal)(
      predict_fn=predict, loss=LOSS, estimator="ggn", damping=0.1)
  state = opt.init(params)
  state.hyperparams["damping"] = jnp.asarray(0.0)
  grads = jax.grad(lambda p: _loss(p["layers"], batch))(params)
  updates, state = jax.jit(
      lambda g, s: opt.update(g, s, params, batch=batch))(grads, state)
  assert np.all(np.isfinite(flat(updates)))
  assert np.all(updates["unused"] == 0)
  assert np.any(flat(updates["layers"]) != 0)
  assert rejections(state) == 0


def _saddle():
  """f(a, b) = ½(ab − 1)² near the saddle at 0: Hessian ≈ [[0, −1], [−1, 0]].

  A one-probe Hutchinson estimate ``v ⊙ Hv`` is then negative for half the
  probes.
  """
  predict = lambda p, b: (p["a"] * p["b"])[None, None] * b["inputs"]
  batch = {"inputs": jnp.ones((1, 1)), "targets": jnp.ones((1, 1))}
  params = {"a": jnp.asarray(0.1), "b": jnp.asarray(0.1)}
  return predict, params, batch


@pytest.mark.parametrize("power", [0.5, 0.75])
def test_negative_hutchinson_estimate_under_a_fractional_power(power):
  predict, params, batch = _saddle()
  loss = lambda p: LOSS.value(predict(p, batch), batch["targets"])
  clipped = 0
  for seed in range(4):
    opt = curvature.scale_by_curvature_diagonal(
        predict, LOSS, estimator="hutchinson", num_samples=1, power=power,
        seed=seed)
    updates, state = jax.jit(
        lambda g, s: opt.update(g, s, params, batch=batch))(
            jax.grad(loss)(params), opt.init(params))
    assert np.all(np.isfinite(flat(updates))), f"seed {seed}: NaN update"
    assert int(state.curvature.rejected_steps) == 0
    clipped += int(state.curvature.clipped_statistics)
  assert 0 < clipped < 4  # Half the probes give a negative estimate.


# Integer labels out of range: a ValueError when concrete; NaN under jit, so
# that the step is rejected and counted.

@pytest.mark.parametrize("label", [-1, 3])
def test_out_of_range_labels_raise_when_concrete(label):
  logits = jnp.zeros((4, 3))
  labels = jnp.asarray([0, 1, label, 2])
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
    losses.softmax_cross_entropy.value(logits, labels)


@pytest.mark.parametrize("name", ["hessian_free", "natural_gradient"])
@pytest.mark.parametrize("label", [-1, 3])
def test_out_of_range_labels_under_jit_reject_the_step(name, label):
  loss = losses.softmax_cross_entropy
  params, batch = _problem()
  batch = dict(batch, targets=jnp.asarray(
      [label] + [i % 2 for i in range(31)]))
  opt = CONTRACTS[name].factory(**dict(CONTRACTS[name].kwargs, loss=loss))
  value = jax.jit(loss.value)(mlp_predict(params, batch), batch["targets"])
  assert np.isnan(value)
  grads = jax.jit(jax.grad(
      lambda p, b: loss.value(mlp_predict(p, b), b["targets"])))(params, batch)
  assert not np.all(np.isfinite(flat(grads)))  # Every guard sees it.
  updates, state = jax.jit(
      lambda g, s, b: opt.update(g, s, params, batch=b))(
          grads, opt.init(params), batch)
  assert np.all(flat(updates) == 0)
  assert rejections(state) == 1


# Mismatched trees: a clear ValueError at trace time naming the leaf.

_OTHER_SHAPES = [{"w": jnp.zeros((6, 3)), "b": jnp.zeros((3,))}]


@pytest.mark.parametrize("name", [
    "hessian_free", "natural_gradient", "scale_by_curvature_diagonal",
    "gauss_newton"])
def test_state_from_other_parameters(name):
  opt = _optimizer(name)
  params, batch = _problem()
  state = opt.init(_OTHER_SHAPES)
  grads = jax.grad(_loss)(params, batch)
  with pytest.raises(ValueError, match=r"state.*\[0\]\['b'\].*init") as info:
    jax.eval_shape(lambda s: opt.update(grads, s, params, batch=batch), state)
  assert _is_clear(info.value), str(info.value)


def _wrong_matvec(v):
  """Returns another pytree: the first layer's kernel transposed."""
  out = jax.tree.map(lambda x: x, v)
  out[0] = dict(v[0], w=v[0]["w"].T)
  return out


@pytest.mark.parametrize("call", [
    lambda m, p: curvature.lanczos(m, p, 5),
    lambda m, p: curvature.top_eigenpairs(m, p),
    lambda m, p: curvature.spectral_density(m, p, num_iterations=4),
    lambda m, p: curvature.condition_number(m, p),
    lambda m, p: curvature.negative_curvature(m, p),
    lambda m, p: curvature.power_iteration(m, p),
    lambda m, p: curvature.hutchinson_trace(m, p),
    lambda m, p: curvature.conjugate_gradient(m, p),
    lambda m, p: curvature.taylor_models(p, m, p),
], ids=["lanczos", "top_eigenpairs", "spectral_density", "condition_number",
        "negative_curvature", "power_iteration", "hutchinson_trace",
        "conjugate_gradient", "taylor_models"])
def test_matvec_returning_another_pytree(call):
  params, _ = _problem()
  with pytest.raises(ValueError, match=r"\[0\]\['w'\] has shape \(2, 6\)") as (
      info):
    jax.eval_shape(lambda p: call(_wrong_matvec, p), params)
  assert _is_clear(info.value), str(info.value)


# Diagnostics on degenerate operators.

def test_negative_curvature_of_the_zero_operator():
  params, _ = _problem()
  result = curvature.negative_curvature(optax.tree.zeros_like, params)
  assert bool(result.finite)
  assert float(result.negative_ratio) == 0.0
  assert not bool(result.has_negative_curvature)


def test_taylor_models_flag_non_finite_products():
  params, _ = _problem()
  good = curvature.taylor_models(params, lambda v: v, params)
  bad = curvature.taylor_models(
      params, lambda v: jax.tree.map(lambda x: x * jnp.nan, v), params)
  assert bool(good.finite) and not bool(bad.finite)


def test_power_iteration_does_not_claim_convergence_on_a_tie():
  """Eigenvalues ±2: the iterate flips between two vectors, its Rayleigh
  quotient stays put, and that is not convergence."""
  diagonal = jnp.asarray([2.0, -2.0, 0.5, 0.1])
  matvec = lambda v: diagonal * v
  result = curvature.power_iteration(matvec, jnp.ones(4))
  assert not bool(result.converged) and bool(result.finite)
  assert int(result.iterations) == 100
  # A clear winner still converges early.
  clear = curvature.power_iteration(
      lambda v: jnp.asarray([2.0, -1.0, 0.5, 0.1]) * v, jnp.ones(4))
  assert bool(clear.converged) and int(clear.iterations) < 100
  np.testing.assert_allclose(clear.eigenvalue, 2.0, rtol=1e-3)


def test_lanczos_from_a_zero_start_vector():
  matvec = lambda v: jnp.arange(1.0, 7.0) * v
  with pytest.raises(ValueError, match="start vector has norm 0.*nonzero"):
    curvature.lanczos(matvec, jnp.zeros(6), 3)
  # Traced, the zero cannot be seen at trace time: flagged, not blamed on
  # the operator.
  result = jax.jit(lambda v: curvature.lanczos(matvec, v, 6))(jnp.zeros(6))
  assert not bool(result.valid_start) and bool(result.finite)
  np.testing.assert_allclose(np.sort(curvature.ritz_values(result)),
                             np.arange(1.0, 7.0), rtol=1e-8)
  good = jax.jit(lambda v: curvature.lanczos(matvec, v, 6))(jnp.ones(6))
  assert bool(good.valid_start)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params_in_the_diagnostics(dtype):
  """The small tridiagonal eigendecompositions run in float32."""
  params, batch = _problem(jnp.float32)
  low = jax.tree.map(lambda x: x.astype(dtype), params)
  batch = jax.tree.map(lambda x: x.astype(dtype), batch)
  lin = curvature.linearize(mlp_predict, LOSS, low, batch)
  reference = curvature.linearize(mlp_predict, LOSS, params,
                                  jax.tree.map(lambda x: x.astype(jnp.float32),
                                               batch))
  top = curvature.top_eigenpairs(lin.matvec, low, k=2)
  assert bool(top.finite)
  assert {x.dtype for x in jax.tree.leaves(top.eigenvectors)} == {
      jnp.dtype(dtype)}
  exact = curvature.top_eigenpairs(reference.matvec, params, k=2)
  np.testing.assert_allclose(top.eigenvalues, exact.eigenvalues, rtol=0.05)
  density = curvature.spectral_density(lin.matvec, low, num_iterations=8)
  assert bool(density.finite)
  np.testing.assert_allclose(density.weights.sum(axis=1), 1.0, rtol=1e-5)
  kappa = curvature.condition_number(lin.matvec, low)
  assert bool(kappa.finite) and np.isfinite(float(kappa.largest))
