"""Property-based fuzzing of the contract (hypothesis), issue 11.

For every public transform of the contract table (``helpers.CONTRACTS``,
built with its row's keyword arguments), hypothesis draws

* a small plain-JAX MLP: 1 to 3 affine maps of widths 1 to 8, with or without
  biases, a tanh/relu/gelu/identity activation, optionally the output kernel
  tied to the first kernel (transposed), and one of three heads: regression
  (``squared_error``), classification (``softmax_cross_entropy``, integer
  labels) or ``sigmoid_binary_cross_entropy``;
* a batch pytree of 1 to 8 examples: a dict with ``inputs``/``targets``, a
  dict with ``x``/``y`` (and ``targets_fn=``), or a tuple ``(x, y)``,
  optionally carrying leaves without a batch axis that ``predict_fn``
  ignores (a scalar float ``rate``, a typed PRNG ``key``; in a tuple as a
  dict ``(x, extras, y)``); float32 or float64 parameters and inputs, drawn
  separately;
* up to two hyperparameters of the transform (those of its signature named
  in ``VALID``), each from its valid range or an invalid value (0, negative,
  NaN, Inf; for the integer ones 0, -1 and a float).

The property: either construction, ``init`` or tracing the first update
raises a ``ValueError`` or ``TypeError`` with a non-empty message, or three
updates of one jitted train step (with ``batch=``, and ``value=`` or
``value=``, ``grad=``, ``value_fn=`` as drawn) leave every parameter finite
and of the same shape. Anything else (another exception type, a NaN or Inf
parameter) fails. When every drawn hyperparameter is valid the example is a
well-formed use of the contract, and raising is a failure too.

Profiles (hypothesis settings registered here and applied to the test only,
so other test modules are not affected):

* ``curvature-fuzz-ci`` (default, what CI runs): ``derandomize=True``, 3
  examples per transform, no deadline, no shrinking (every example compiles
  a train step);
* ``curvature-fuzz-long``: set ``CURVATURE_FUZZ_EXAMPLES=N`` to run ``N``
  random (not derandomized) examples per transform, with shrinking, e.g.::

    CURVATURE_FUZZ_EXAMPLES=200 python -m pytest tests/test_contract_fuzz.py

Defects found in modules owned elsewhere are listed in ``KNOWN_DEFECTS``
with a predicate on the drawn example: exactly those examples are
``pytest.xfail``-ed, with the reason; every other example must pass.
"""

import inspect
import math
import os
from typing import Any, Callable, NamedTuple, Optional
import zlib

from helpers import CONTRACTS
from hypothesis import HealthCheck
from hypothesis import Phase
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvature import losses

NAMES = sorted(CONTRACTS)

_EXAMPLES = os.environ.get("CURVATURE_FUZZ_EXAMPLES")
settings.register_profile(
    "curvature-fuzz-ci", max_examples=3, derandomize=True, deadline=None,
    database=None, print_blob=True,
    # No shrinking: each example compiles a train step (seconds); the
    # failing example is printed as drawn.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow,
                           HealthCheck.function_scoped_fixture])
settings.register_profile(
    "curvature-fuzz-long", max_examples=int(_EXAMPLES or 1),
    derandomize=False, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow,
                           HealthCheck.function_scoped_fixture])
PROFILE = "curvature-fuzz-long" if _EXAMPLES else "curvature-fuzz-ci"

# Models -----------------------------------------------------------------------

ACTIVATIONS = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "identity": lambda h: h,
}
HEADS = {
    "squared_error": losses.squared_error,
    "softmax_cross_entropy": losses.softmax_cross_entropy,
    "sigmoid_binary_cross_entropy": losses.sigmoid_binary_cross_entropy,
}
LAYOUTS = ("inputs_targets", "x_y", "tuple")


class Model(NamedTuple):
  """A drawn model and batch: everything a transform is built from."""
  params: Any
  batch: Any
  predict_fn: Callable[[Any, Any], jax.Array]
  loss: Any
  targets_fn: Optional[Callable[[Any], Any]]
  structural_fn: Callable[[Any, Any], jax.Array]
  description: dict


def _rotate(options, drawn: int, salt: int):
  """``options[(drawn + salt) % len]``: under ``derandomize`` every
  transform would otherwise see the same models in the same order."""
  return options[(drawn + salt) % len(options)]


def _inputs(batch, layout):
  return batch[0] if layout == "tuple" else batch[
      "x" if layout == "x_y" else "inputs"]


def _targets(batch, layout):
  return batch[-1] if layout == "tuple" else batch[
      "y" if layout == "x_y" else "targets"]


@st.composite
def models(draw, salt: int = 0) -> Model:
  """A small MLP and a batch for it (module docstring)."""
  depth = _rotate((1, 2, 3), draw(st.integers(0, 2)), salt)
  activation = _rotate(sorted(ACTIVATIONS), draw(st.integers(0, 3)), salt)
  head = _rotate(sorted(HEADS), draw(st.integers(0, 2)), salt // 3)
  layout = _rotate(LAYOUTS, draw(st.integers(0, 2)), salt // 9)
  bias = draw(st.booleans())
  tied = depth > 1 and draw(st.booleans())
  widths = [draw(st.integers(1, 8)) for _ in range(depth)]  # d_in, hidden.
  d_in = widths[0]
  hidden = widths[1:]
  if tied:  # Head kernel = first kernel transposed: back to d_in outputs.
    hidden = [hidden[0]] * len(hidden)
    d_out = d_in
  else:
    d_out = draw(st.integers(1, 8))
  n = draw(st.integers(1, 8))
  param_dtype = draw(st.sampled_from([jnp.float32, jnp.float64]))
  data_dtype = draw(st.sampled_from([jnp.float32, jnp.float64]))
  extras = draw(st.sampled_from([(), ("rate",), ("key",), ("rate", "key")]))
  seed = draw(st.integers(0, 2**16))

  rng = np.random.default_rng(seed)
  sizes = [d_in] + hidden

  def dense(fan_in, fan_out):
    layer = {"w": rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)}
    if bias:
      layer["b"] = 0.1 * rng.standard_normal(fan_out)
    return layer

  params = {"hidden": [dense(a, b) for a, b in zip(sizes[:-1], sizes[1:])]}
  head_params = dense(sizes[-1], d_out)
  if tied:
    del head_params["w"]
  if head_params:
    params["head"] = head_params
  params = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), params)
  act = ACTIVATIONS[activation]

  def affine(h, layer, kernel):
    h = h @ kernel
    return h + layer["b"] if "b" in layer else h

  def features(p, b):
    h = _inputs(b, layout)
    for layer in p["hidden"]:
      h = act(affine(h, layer, layer["w"]))
    return h

  def predict_fn(p, b):
    kernel = p["hidden"][0]["w"].T if tied else p["head"]["w"]
    return affine(features(p, b), p.get("head", {}), kernel)

  def structural_fn(p, b):
    return features(p, b) if p["hidden"] else predict_fn(p, b)

  x = jnp.asarray(rng.standard_normal((n, d_in)), data_dtype)
  if head == "softmax_cross_entropy":
    y = jnp.asarray(rng.integers(0, d_out, n), jnp.int32)
  elif head == "squared_error":
    y = jnp.asarray(rng.standard_normal((n, d_out)), data_dtype)
  else:
    y = jnp.asarray(rng.uniform(size=(n, d_out)), data_dtype)
  extra = {}
  if "rate" in extras:
    extra["rate"] = jnp.asarray(0.1, data_dtype)
  if "key" in extras:
    extra["key"] = jax.random.key(seed)
  if layout == "tuple":
    batch = (x, extra, y) if extra else (x, y)
  elif layout == "x_y":
    batch = {"x": x, "y": y, **extra}
  else:
    batch = {"inputs": x, "targets": y, **extra}
  description = dict(
      depth=depth, widths=sizes + [d_out], bias=bias, tied=tied,
      activation=activation, head=head, layout=layout, n=n,
      param_dtype=jnp.dtype(param_dtype).name,
      data_dtype=jnp.dtype(data_dtype).name, extras=extras, seed=seed)
  return Model(params, batch, predict_fn, HEADS[head],
               (lambda b: b["y"]) if layout == "x_y" else None,
               structural_fn, description)


# Hyperparameters -------------------------------------------------------------

def _log_uniform(low, high):
  return st.floats(math.log(low), math.log(high)).map(math.exp)


_UNIT = st.floats(0.0, 0.99)
# name -> its valid values. Only names in a factory's signature are drawn.
VALID = {
    "learning_rate": _log_uniform(1e-4, 1.0),
    "damping": _log_uniform(1e-4, 10.0),
    "initial_damping": _log_uniform(1e-4, 10.0),
    "momentum": _UNIT,
    "decay": _UNIT,
    "b1": _UNIT,
    "b2": _UNIT,
    "rho": _UNIT,
    "statistics_decay": _UNIT,
    "eps": _log_uniform(1e-8, 1e-3),
    "eps_root": st.floats(0.0, 1e-6),
    "l2_reg": st.floats(0.0, 1.0),
    "weight_decay": st.floats(0.0, 0.1),
    "damping_increase": st.floats(1.0, 3.0),
    "damping_decrease": st.floats(0.1, 1.0),
    "warm_start_decay": st.floats(0.0, 1.0),
    "cg_tol": st.floats(0.0, 1e-3),
    "progress_tol": st.floats(0.0, 1e-2),
    "initial_accumulator_value": st.floats(0.0, 1.0),
    "initial_scale": st.floats(0.0, 1.0),
    "initial_value": st.floats(0.0, 1.0),
    "initial_rate": _log_uniform(1e-3, 1.0),
    "kappa": st.floats(0.0, 0.1),
    "phi": st.floats(0.0, 0.5),
    "theta": _UNIT,
    "max_cg_iterations": st.integers(1, 8),
    "inverse_every": st.integers(1, 4),
    "damping_every": st.integers(1, 4),
    "gamma_every": st.integers(1, 4),
    "preconditioner_every": st.integers(1, 4),
    "memory_size": st.integers(1, 5),
    "num_samples": st.integers(1, 3),
    "num_iterations": st.integers(1, 8),
    "restart_every": st.integers(1, 4),
    "every": st.integers(1, 3),
    "max_block_size": st.integers(1, 16),
}
INVALID_FLOATS = st.sampled_from([0.0, -1.0, -1e-3, float("nan"),
                                  float("inf"), -float("inf")])
INVALID_INTS = st.sampled_from([0, -1, 2.5])


def _fuzzable(name: str):
  factory = CONTRACTS[name].factory
  return sorted(set(inspect.signature(factory).parameters) & set(VALID))


class Draw(NamedTuple):
  """Drawn hyperparameter overrides and the names drawn out of range."""
  overrides: dict
  invalid: tuple


@st.composite
def hyperparameters(draw, name: str) -> Draw:
  """Up to two overrides, each valid or not (module docstring)."""
  names = _fuzzable(name)
  chosen = draw(st.lists(st.sampled_from(names), max_size=2, unique=True)
                ) if names else []
  overrides, invalid = {}, []
  for key in chosen:
    if draw(st.booleans()):
      overrides[key] = draw(VALID[key])
    else:
      is_int = isinstance(draw(VALID[key]), int)
      overrides[key] = draw(INVALID_INTS if is_int else INVALID_FLOATS)
      invalid.append(key)
  return Draw(overrides, tuple(invalid))


# The property -----------------------------------------------------------------

# (transform, predicate(model description, overrides)) -> reason: defects in
# the library still to be fixed. Only examples the predicate matches may fail
# (they xfail); every other example of the transform must pass.
KNOWN_DEFECTS = {}


def _build(name: str, model: Model, overrides: dict):
  row = CONTRACTS[name]
  overrides = dict(overrides)
  if "predict_fn" in row.kwargs:
    overrides.update(predict_fn=model.predict_fn, loss=model.loss)
  if "structural_fn" in row.kwargs:
    overrides["structural_fn"] = model.structural_fn
  if (model.targets_fn is not None
      and "targets_fn" in inspect.signature(row.factory).parameters):
    overrides["targets_fn"] = model.targets_fn
  return row.build(**overrides)


def _objective(model: Model):
  layout = model.description["layout"]

  def value(params, batch):
    return model.loss.value(model.predict_fn(params, batch),
                            _targets(batch, layout))

  return value


def _known_defect(name, model, overrides):
  for (transform, predicate), reason in KNOWN_DEFECTS.items():
    if transform == name and predicate(model.description, overrides):
      return reason
  return None


EXTRA_ARGS = ("value", "value_grad_value_fn")


def _run(name: str, model: Model, draw: Draw, extra_args: str):
  """Builds, jits one train step and runs it three times.

  Returns:
    The parameters after three steps, or ``None`` if construction, ``init``
    or tracing raised a ``ValueError``/``TypeError`` (allowed only if a
    drawn hyperparameter is invalid).
  """
  try:
    opt = _build(name, model, draw.overrides)
    state = opt.init(model.params)
  except (ValueError, TypeError) as e:
    return _refused(e, draw)
  value_fn = _objective(model)

  @jax.jit
  def step(params, state, batch):
    value, grads = jax.value_and_grad(value_fn)(params, batch)
    extra = dict(value=value)
    if extra_args == "value_grad_value_fn":
      extra.update(grad=grads, value_fn=value_fn)
    updates, state = opt.update(grads, state, params, batch=batch, **extra)
    return optax.apply_updates(params, updates), state

  try:  # The first call traces: errors raised there are allowed.
    params, state = step(model.params, state, model.batch)
  except (ValueError, TypeError) as e:
    return _refused(e, draw)
  for _ in range(2):
    params, state = step(params, state, model.batch)
  return params


def _refused(error: Exception, draw: Draw):
  message = str(error).strip()
  assert message, f"{type(error).__name__} without a message"
  if not draw.invalid:
    raise AssertionError(
        f"valid hyperparameters {draw.overrides} refused") from error
  return None


def _check_finite(name, model, overrides, params):
  if params is None:
    return
  shapes = jax.tree.map(jnp.shape, model.params)
  assert jax.tree.map(jnp.shape, params) == shapes, "parameter shapes changed"
  bad = [jax.tree_util.keystr(path) for path, leaf in
         jax.tree_util.tree_leaves_with_path(params)
         if not np.all(np.isfinite(np.asarray(leaf)))]
  assert not bad, (f"{name}: non-finite parameters {bad} with "
                   f"{overrides} on {model.description}")


def _salt(name: str) -> int:
  return zlib.crc32(name.encode())


@pytest.mark.parametrize("name", NAMES)
def test_construction_raises_or_parameters_stay_finite(name):
  """The property of the module docstring, for one transform."""

  hits = []

  @settings(settings.get_profile(PROFILE))
  @given(model=models(salt=_salt(name)), draw=hyperparameters(name),
         extra_args=st.sampled_from(EXTRA_ARGS))
  def check(model, draw, extra_args):
    reason = _known_defect(name, model, draw.overrides)
    try:
      _check_finite(name, model, draw.overrides,
                    _run(name, model, draw, extra_args))
    except Exception as e:  # pylint: disable=broad-except
      if reason is None:
        raise
      hits.append(f"{reason} [{type(e).__name__} with {draw.overrides} on "
                  f"{model.description}]")

  check()
  if hits:  # Every other example passed; these match a known defect.
    pytest.xfail("; ".join(hits))
