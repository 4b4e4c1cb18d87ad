"""Construction-time checks of hyperparameters, shared by every transform.

Hyperparameters may be Python numbers, concrete arrays, or tracers (under
``optax.inject_hyperparams`` the factory is called again inside ``update``
with traced values). Concrete values are checked; traced ones cannot be and
are let through.
"""

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

# The mesh axis (or axes) of ``jax.shard_map`` a batch is sharded over.
AxisName = Optional[Union[str, tuple[str, ...]]]


def concrete_value(value: Any):
  """``value`` as a NumPy scalar/array, or ``None`` if it is traced."""
  if isinstance(value, jax.core.Tracer):
    return None
  if callable(value):  # A schedule: checked where it is evaluated.
    return None
  return np.asarray(value)


def check_nonnegative(name: str, value: Any, fix: str = "") -> None:
  """Raises ``ValueError`` if a concrete ``value`` is negative or not finite."""
  concrete = concrete_value(value)
  if concrete is None:
    return
  if not np.all(np.isfinite(concrete)) or np.any(concrete < 0):
    raise ValueError(
        f"`{name}` must be a finite number >= 0, got {value!r}."
        + (f" {fix}" if fix else "")
    )


def check_finite(name: str, value: Any, fix: str = "") -> None:
  """Raises ``ValueError`` if a concrete ``value`` is NaN or infinite."""
  concrete = concrete_value(value)
  if concrete is None:
    return
  if not np.all(np.isfinite(concrete)):
    raise ValueError(
        f"`{name}` must be finite, got {value!r}." + (f" {fix}" if fix else "")
    )


def check_positive(name: str, value: Any, fix: str = "") -> None:
  """Raises ``ValueError`` if a concrete ``value`` is not finite and > 0."""
  concrete = concrete_value(value)
  if concrete is None:
    return
  if not np.all(np.isfinite(concrete)) or np.any(concrete <= 0):
    raise ValueError(
        f"`{name}` must be a finite number > 0, got {value!r}."
        + (f" {fix}" if fix else "")
    )


def check_in_interval(
    name: str, value: Any, low: float, high: float, *, closed_high=False,
    fix: str = "",
) -> None:
  """Raises ``ValueError`` unless ``low <= value < high`` (or ``<= high``)."""
  concrete = concrete_value(value)
  if concrete is None:
    return
  above = concrete > high if closed_high else concrete >= high
  if not np.all(np.isfinite(concrete)) or np.any(concrete < low) or np.any(
      above
  ):
    bracket = "]" if closed_high else ")"
    raise ValueError(
        f"`{name}` must lie in [{low}, {high}{bracket}, got {value!r}."
        + (f" {fix}" if fix else "")
    )


def check_at_least(name: str, value: Any, minimum: float,
                   fix: str = "") -> None:
  """Raises ``ValueError`` unless a concrete ``value`` is finite, >= minimum."""
  concrete = concrete_value(value)
  if concrete is None:
    return
  if not np.all(np.isfinite(concrete)) or np.any(concrete < minimum):
    raise ValueError(
        f"`{name}` must be a finite number >= {minimum}, got {value!r}."
        + (f" {fix}" if fix else "")
    )


def check_ordered(low_name: str, low: Any, high_name: str, high: Any,
                  fix: str = "") -> None:
  """Raises ``ValueError`` if concrete ``low > high`` (e.g. min above max)."""
  low_value, high_value = concrete_value(low), concrete_value(high)
  if low_value is None or high_value is None:
    return
  if np.any(low_value > high_value):
    raise ValueError(
        f"`{low_name}`={low!r} exceeds `{high_name}`={high!r}: it must not be"
        " larger." + (f" {fix}" if fix else "")
    )


def check_learning_rate(learning_rate: Any) -> None:
  """Raises ``ValueError`` for a NaN, infinite or negative learning rate.

  A schedule (a callable) is allowed and checked where it is evaluated, as
  optax does; traced values (``inject_hyperparams``) are let through.
  """
  check_nonnegative(
      "learning_rate",
      learning_rate,
      "Pass the step size as a positive number or an optax schedule; the"
      " sign is applied for you.",
  )


def check_not_schedule(name: str, value: Any, fix: str) -> None:
  """Raises ``TypeError`` if ``value`` is callable where a number is needed."""
  if callable(value):
    raise TypeError(
        f"`{name}` must be a number, got the callable {value!r} (a"
        f" schedule?). {fix}"
    )


def check_static_int(name: str, value: Any, minimum: int) -> int:
  """Returns ``value`` as an ``int`` >= ``minimum`` or raises.

  Integer hyperparameters that fix array shapes or loop structure must be
  Python integers. Under ``optax.inject_hyperparams`` list them in
  ``static_args``.
  """
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(
        f"`{name}` must be a Python int, got {type(value).__name__}. It fixes"
        " the shape of the solver's state; under `optax.inject_hyperparams`"
        f" pass `static_args=('{name}',)`."
    )
  if value < minimum:
    raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
  return int(value)


def check_optional_static_int(name: str, value: Any,
                              minimum: int) -> Optional[int]:
  """``None`` (the argument's "off" or "all"), or :func:`check_static_int`."""
  return None if value is None else check_static_int(name, value, minimum)


def check_choice(name: str, value: Any, choices) -> None:
  """Raises ``ValueError`` if ``value`` is not one of ``choices``."""
  if value not in choices:
    raise ValueError(
        f"Unknown `{name}`={value!r}. Choose one of: "
        + ", ".join(repr(c) for c in choices)
        + "."
    )


def check_params(params: Any, transform: str) -> None:
  """Raises unless ``params`` is a non-empty pytree of floating-point leaves.

  Curvature transforms differentiate with respect to the parameters, so an
  empty tree or an integer leaf would otherwise fail deep inside JAX.

  Args:
    params: the parameters given to ``init``.
    transform: the transform's name, for the message.
  """
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError(
        f"{transform} got an empty parameter tree: pass the model's"
        " parameters to `init`."
    )
  for leaf in leaves:
    dtype = jnp.asarray(leaf).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"{transform} needs floating-point parameters, got a {dtype} leaf."
          " Cast integer parameters to a float dtype."
      )


def all_finite(tree: Any) -> jax.Array:
  """``True`` when every leaf of ``tree`` is finite (a traced bool)."""
  return jnp.all(
      jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])
  )


def check_axis_name(axis_name: Any):
  """Returns ``axis_name`` (``None``, a str or a tuple of str) or raises.

  ``axis_name`` names the mapped axes (``jax.shard_map`` mesh axes, or a
  ``vmap``/``pmap`` ``axis_name``) the batch is split over; batch means are
  then reduced with ``jax.lax.pmean`` over them.
  """
  if axis_name is None or isinstance(axis_name, str):
    return axis_name
  if (isinstance(axis_name, tuple) and axis_name
      and all(isinstance(a, str) for a in axis_name)):
    return axis_name
  raise TypeError(
      "`axis_name` must be None, a str or a non-empty tuple of str naming the"
      " mesh axes the batch is sharded over, got"
      f" {type(axis_name).__name__} {axis_name!r}. Inside"
      " `jax.shard_map(..., in_specs=P('batch'))` pass `axis_name='batch'`"
      " (a tuple such as ('data', 'fsdp') for several axes); leave it None"
      " under plain `jit`, where sharded batch means are already global.")


def _paths_and_leaves(tree: Any):
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(path) or "<root>", leaf)
          for path, leaf in flat], treedef


def tree_mismatch(expected: Any, actual: Any) -> Optional[str]:
  """Where ``actual`` first differs from ``expected`` in structure or shape.

  Args:
    expected: the reference pytree (e.g. the parameters).
    actual: the pytree to compare (a state field, a product).

  Returns:
    ``None`` when both have the same structure and leaf shapes; otherwise a
    sentence naming the first differing leaf path.
  """
  expected_leaves, expected_def = _paths_and_leaves(expected)
  actual_leaves, actual_def = _paths_and_leaves(actual)
  for (e_path, e_leaf), (a_path, a_leaf) in zip(expected_leaves,
                                                actual_leaves):
    if e_path != a_path:
      return f"leaf {a_path} where {e_path} was expected"
    if jnp.shape(e_leaf) != jnp.shape(a_leaf):
      return (f"leaf {a_path} has shape {jnp.shape(a_leaf)} where"
              f" {jnp.shape(e_leaf)} was expected")
  if len(expected_leaves) > len(actual_leaves):
    return f"leaf {expected_leaves[len(actual_leaves)][0]} is missing"
  if len(actual_leaves) > len(expected_leaves):
    return f"leaf {actual_leaves[len(expected_leaves)][0]} is extra"
  if expected_def != actual_def:
    return f"the tree structure {actual_def} differs from {expected_def}"
  return None


def check_same_tree(expected: Any, actual: Any, what: str, fix: str,
                    reference: str = "the parameters") -> None:
  """Raises ``ValueError`` naming the first leaf where the trees differ.

  Checked at trace time, from shapes only, so that a mismatch gives this
  message instead of an XLA shape error.

  Args:
    expected: the reference pytree (usually the parameters).
    actual: the pytree that must match it.
    what: what ``actual`` is, for the message ("The state", "matvec(v)").
    fix: how to fix it.
    reference: what ``expected`` is, for the message.
  """
  mismatch = tree_mismatch(expected, actual)
  if mismatch is not None:
    raise ValueError(f"{what} does not match {reference}: {mismatch}. {fix}")


def check_state(params: Any, state_tree: Any) -> None:
  """Raises ``ValueError`` if a state pytree was made for other parameters.

  Args:
    params: the parameters given to ``update``.
    state_tree: the part of the state shaped like the parameters.
  """
  check_same_tree(
      params, state_tree, "The state",
      "It was made by `init` for other parameters: call `opt.init(params)`"
      " with the parameters given to `update`.")


def compute_dtype(params: Any):
  """The dtype curvature state is kept in: the parameters', at least float32.

  bfloat16 and float16 parameters get float32 damping, ratios and solver
  state; float64 parameters keep float64.
  """
  leaves = jax.tree.leaves(params)
  return jnp.promote_types(jnp.result_type(*leaves), jnp.float32)


GRADIENT_FIX = (
    "Pass the gradient of the loss with respect to exactly the `params`"
    " given to `update`.")


def check_update_args(name: str, updates: Any, params: Any, batch: Any, *,
                      data_for: str = "to build the curvature") -> None:
  """Raises ``ValueError`` unless ``update`` got ``params`` and ``batch=``.

  Also checks (from shapes, at trace time) that the gradient ``updates``
  matches the parameters, unless ``updates`` is ``None``.

  Args:
    name: the transform, for the message.
    updates: the incoming gradient, or ``None`` to skip its check.
    params: the parameters given to ``update``.
    batch: the ``batch=`` keyword argument given to ``update``.
    data_for: why the transform needs the data, for the message.
  """
  call = " `update(grads, state, params, batch=batch)`."
  if params is None:
    raise ValueError(f"{name} needs the parameters: call" + call)
  if batch is None:
    raise ValueError(f"{name} needs the data {data_for}: call" + call)
  if updates is not None:
    check_same_tree(params, updates, "The gradient", GRADIENT_FIX)
