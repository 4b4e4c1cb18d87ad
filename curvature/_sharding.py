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


def gram(rows: Array, other: Optional[Array] = None) -> Array:
  """``rowsᵀ other`` (``rowsᵀ rows`` by default), replicated: a sum over
  the leading axis, which may be sharded (a batch, or FSDP's feature axis
  of a kernel's transpose)."""
  other = rows if other is None else other
  return jnp.einsum("bi,bj->ij", rows, other,
                    out_sharding=replicated_like(rows))


def replicate(x: Array) -> Array:
  """``x`` replicated over its Explicit mesh (``x`` itself elsewhere)."""
  target = replicated_like(x)
  return x if target is None else jax.sharding.reshard(x, target)


def shard_like(x: Array, reference: Array) -> Array:
  """``x`` with the sharding of ``reference`` when that is on an Explicit
  mesh (a tangent for a sharded parameter), else ``x`` itself."""
  if explicit_mesh(reference) is None:
    return x
  return jax.sharding.reshard(x, jax.typeof(reference).sharding)


def gather_last_axis(x: Array) -> Array:
  """``x`` with its last axis whole on every device, other axes as they are.

  Layer statistics slice and concatenate along the feature axis, which an
  Explicit mesh refuses on a sharded axis (FSDP parameters give sharded
  layer outputs and output gradients). Gathering it moves one layer's
  ``[batch, features]`` rows, never a parameter or the model.
  """
  mesh = explicit_mesh(x)
  if mesh is None or x.ndim == 0:
    return x
  spec = tuple(jax.typeof(x).sharding.spec)
  spec = spec + (None,) * (x.ndim - len(spec))
  if spec[-1] is None:
    return x
  return jax.sharding.reshard(x, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*spec[:-1], None)))


def _place(x: Any, sharding: jax.sharding.NamedSharding, reference: Any):
  """``x`` put on ``sharding``: resharded under a trace, else device_put on
  the concrete mesh of ``reference`` (an abstract mesh has no devices)."""
  if isinstance(reference, jax.core.Tracer):
    return jax.sharding.reshard(x, sharding)
  return jax.device_put(x, jax.sharding.NamedSharding(
      reference.sharding.mesh, sharding.spec))


def split_like_last_axis(x: Array, leaf: Array) -> Array:
  """``x`` split over the mesh axis that splits ``leaf``'s last axis.

  For a per-layer statistic whose last axis has the size of the kernel's
  output axis (EKFAC's and SOAP's diagonal re-fitted in the eigenbasis):
  FSDP parameters then keep it split instead of one replicated copy of the
  layer per device. A concrete ``leaf`` may be on any mesh (with Auto axes
  the compiler keeps the placement from step to step); a traced one only
  on an Explicit mesh, where the sharding is in its type. ``x`` itself when
  ``leaf``'s last axis is not split over a mesh axis, or the sizes differ.
  """
  if isinstance(leaf, jax.core.Tracer):
    sharding = (jax.typeof(leaf).sharding
                if explicit_mesh(leaf) is not None else None)
  else:
    sharding = getattr(leaf, "sharding", None)
  if (not isinstance(sharding, jax.sharding.NamedSharding) or x.ndim == 0
      or x.shape[-1] != leaf.shape[-1]):
    return x
  spec = tuple(sharding.spec)
  axis = spec[-1] if len(spec) == leaf.ndim else None
  if axis is None:
    return x
  target = jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(*([None] * (x.ndim - 1)),
                                                axis))
  return _place(x, target, leaf)


def commit_state(state: Any, params: Any) -> Any:
  """``init``'s state, committed to the Explicit mesh of ``params``.

  Leaves made without a sharding (factors, inverses, counters, keys) are
  replicated on the mesh; leaves that already have one (a velocity made by
  ``zeros_like(params)``) keep it. Otherwise the first jitted step would
  let the compiler pick their sharding, and the second would find a type
  its refresh cannot combine with the replicated statistics. Without an
  Explicit mesh in ``params`` the state is returned as it is.
  """
  on_mesh = [x for x in jax.tree.leaves(params) if explicit_mesh(x) is not None]
  if not on_mesh:
    return state
  reference = on_mesh[0]
  replicated = replicated_like(reference)
  assert replicated is not None  # ``reference`` is on an Explicit mesh.
  return jax.tree.map(
      lambda x: x if explicit_mesh(x) is not None
      else _place(x, replicated, reference), state)


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
  flat, unravel_replicated = ravel_pytree(jax.tree.map(replicate, tree))

  def unravel(vector):
    out = unravel_replicated(vector)
    out_leaves, treedef = jax.tree.flatten(out)
    return treedef.unflatten([
        x if s is None else jax.sharding.reshard(x, s)
        for x, s in zip(out_leaves, shardings)])

  return flat, unravel
