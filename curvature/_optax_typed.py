"""optax helpers annotated with the type they return in this package.

optax annotates :func:`optax.safe_increment` and :func:`optax.tree.vdot` as
returning ``chex.Numeric`` (any Python number or array). On the arrays and
pytrees of arrays this package passes them, both return a ``jax.Array``;
these wrappers say so, so that the results can be compared, ``.astype``-ed
and stored in ``Array`` fields without a cast at every call. They call optax
and return its result unchanged.
"""

from typing import Any, cast

import jax
import optax

Array = jax.Array


def safe_increment(count: Array) -> Array:
  """:func:`optax.safe_increment`: ``count + 1``, saturating at the max."""
  return cast(Array, optax.safe_increment(count))


def vdot(tree_x: Any, tree_y: Any) -> Array:
  """:func:`optax.tree.vdot`: the inner product of two (nonempty) pytrees."""
  return cast(Array, optax.tree.vdot(tree_x, tree_y))
