"""Arrays sharded over ``Explicit`` mesh axes (``jax.make_mesh``'s default).

On such a mesh the sharding is part of an array's type, and an operation
whose output sharding is ambiguous raises ``ShardingTypeError`` instead of
letting the compiler choose: a product that contracts a sharded axis, or a
reshape that merges one. The helpers below give those operations the
sharding they need. On arrays that are not sharded over ``Explicit`` axes
(one device, ``Auto`` axes, inside ``jax.shard_map``) they are the plain
operations.
"""

from typing import Any, Callable, Optional

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp

Array = jax.Array


def explicit_mesh(x: Any):
  """The mesh of ``x`` if any of its axes is ``Explicit``, else ``None``."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not any(kind == jax.sharding.AxisType.Explicit
                             for kind in mesh.axis_types):
    return None
  return mesh


def replicated_like(x: Any) -> Optional[jax.sharding.NamedSharding]:
  """A replicated sharding on ``x``'s Explicit mesh, else ``None``."""
  mesh = explicit_mesh(x)
  if mesh is None:
    return None
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def gram(rows: Array) -> Array:
  """``rowsᵀ rows``, replicated: a sum over the (sharded) leading axis."""
  return jnp.einsum("bi,bj->ij", rows, rows,
                    out_sharding=replicated_like(rows))


def _replicate(x: Array) -> Array:
  target = replicated_like(x)
  return x if target is None else jax.sharding.reshard(x, target)


def ravel(tree: Any) -> tuple[Array, Callable[[Array], Any]]:
  """``jax.flatten_util.ravel_pytree`` for Explicit-sharded leaves too.

  A leaf sharded over an Explicit axis is replicated before it is raveled
  (a reshape cannot merge a sharded axis), and ``unravel`` gives each leaf
  its sharding back, so that products with the model see the arrays they
  were given. Other leaves are raveled as they are.
  """
  leaves = jax.tree.leaves(tree)
  shardings = [getattr(jax.typeof(x), "sharding", None)
               if explicit_mesh(x) is not None else None for x in leaves]
  if not any(s is not None for s in shardings):
    return ravel_pytree(tree)
  flat, unravel_replicated = ravel_pytree(jax.tree.map(_replicate, tree))

  def unravel(vector):
    out = unravel_replicated(vector)
    out_leaves, treedef = jax.tree.flatten(out)
    return treedef.unflatten([
        x if s is None else jax.sharding.reshard(x, s)
        for x, s in zip(out_leaves, shardings)])

  return flat, unravel
