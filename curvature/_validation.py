"""Construction-time checks of hyperparameters, shared by every transform.

Hyperparameters may be Python numbers, concrete arrays, or tracers (under
``optax.inject_hyperparams`` the factory is called again inside ``update``
with traced values). Concrete values are checked; traced ones cannot be and
are let through.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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
    name: str, value: Any, low: float, high: float, *, closed_high=False
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
