"""optax helpers annotated with the type they return in this package.

optax annotates :func:`optax.safe_increment` and :func:`optax.tree.vdot` as
returning ``chex.Numeric`` (any Python number or array). On the arrays and
pytrees of arrays this package passes them, both return a ``jax.Array``;
these wrappers say so, so that the results can be compared, ``.astype``-ed
and stored in ``Array`` fields without a cast at every call. They call optax
and return its result unchanged.
"""

import functools
from typing import Any, cast

import jax
import jax.numpy as jnp
import optax

from curvature import _sharding

Array = jax.Array


def safe_increment(count: Array) -> Array:
  """:func:`optax.safe_increment`: ``count + 1``, saturating at the max."""
  return cast(Array, optax.safe_increment(count))


def vdot(tree_x: Any, tree_y: Any) -> Array:
  """:func:`optax.tree.vdot`: the inner product of two (nonempty) pytrees.

  Leaves sharded over an ``Explicit`` mesh axis cannot go through
  ``jnp.vdot`` (a contraction of a sharded axis must name its output
  sharding): their inner product is the sum of the elementwise product,
  a reduction that is allowed and gives the same value.
  """
  leaves_x, leaves_y = jax.tree.leaves(tree_x), jax.tree.leaves(tree_y)
  if not any(_sharding.explicit_mesh(x) is not None
             for x in leaves_x + leaves_y):
    return cast(Array, optax.tree.vdot(tree_x, tree_y))
  products = [jnp.sum(jnp.conj(x) * y)
              for x, y in zip(leaves_x, leaves_y, strict=True)]
  return functools.reduce(jnp.add, products)
