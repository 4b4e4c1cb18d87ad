"""Automatic layer discovery and per-layer statistics taps for K-FAC.

No registration by the user. :func:`discover_layers` traces
``predict_fn(params, batch)`` to a jaxpr (``jax.make_jaxpr``) and walks it,
following every parameter leaf through *structural* operations only
(``convert_element_type``, ``copy``, a 2-D ``transpose``, a ``reshape`` of a
kernel to the matrix of its leading and trailing axes, and, for biases,
``reshape``/``broadcast_in_dim``/``squeeze``/``expand_dims``), into nested
``jit``/``closed_call``/``checkpoint`` (remat) calls, and into the body of a
``scan`` whose scanned-over inputs (``xs``) are stacked parameters (Flax
``nn.scan``/``nnx.scan`` layer stacks, ``lax.scan`` over a stacked pytree).
Every *use* of a leaf is one of

* a **dense** use: the 2-D weight operand of a ``dot_general`` with one
  contracting dimension and no batch dimensions, whose other operand is not
  a parameter (Flax ``nn.Dense``/``nnx.Linear``, ``x @ w``, ``x @ w.T``,
  ``jnp.dot``, ``einsum('...i,io->...o')``, ``einsum('...i,oi->...o')``); the
  activations may have any number of leading axes (batch, sequence, heads:
  *weight sharing*); a kernel of rank ≥ 3 contracted over some of its
  axes (Flax ``DenseGeneral``/``LinearGeneral``, the projections of
  ``MultiHeadAttention``) is the matrix ``[contracted, other axes]``, and
  so is a kernel reshaped to the matrix ``[leading axes, trailing axes]``
  (``x @ w.reshape(-1, out)``); a
  ``dot_general`` whose one batch dimension is the
  leading axis of a 3-D kernel is a ``vmap``-ed stack (``nnx.vmap``) of
  dense layers;
* a **conv** use: the right-hand side of a ``conv_general_dilated`` with
  ``feature_group_count == batch_group_count == 1``;
* a **lookup**: a ``gather`` of whole rows of a 2-D leaf by integer indices
  (``jnp.take(E, tokens, axis=0)``, ``E[tokens]``, Flax ``Embed``): the same
  as a dense use on one-hot inputs;
* a **bias**: a 1-D leaf of the layer's output size whose only use is an
  ``add`` to the raw output of a single-use layer (which nothing else reads).

A leaf whose every use is a dense use or a lookup is a :class:`Layer` with
one Kronecker block, even when it is used several times (tied embeddings
``E[tokens]`` and ``h @ E.T``, ``f(p, x) + f(p, x)``); the uses' statistics
are combined by K-FAC (see :func:`curvature.scale_by_kfac`). A leaf sliced
by a ``scan`` is a *stacked* layer: one block per slice (layer of the
stack). Every other leaf (layer-norm scales, products of two parameters, an
einsum of two parameters or with other batch dimensions, a kernel of rank
≥ 3 used several times,
weights used as loop constants of ``scan``/``while``, grouped
convolutions...) is reported with the reason it was not matched; K-FAC
gives it a diagonal block. Each primitive's part in the walk is one small
rule of a table keyed by the primitive's name; the result is cached per
``predict_fn`` and shapes and dtypes of ``params`` and ``batch``.

:func:`tapped_forward` then evaluates the *same* jaxpr with a small
interpreter (the ``eval_jaxpr`` loop of JAX, with jit-like calls inlined,
and a ``scan`` that holds a tap re-run as a ``lax.scan`` of the interpreted
body) that

* records the input operand of every use (the activations ``a``, the
  image patches of a convolution, the indices of a lookup), and
* adds a zero *perturbation* to the use's raw output; the gradient of the
  per-example loss with respect to that perturbation is the back-propagated
  output gradient ``g`` of K-FAC.

This is the "tap" approach: it works for any model that JAX can trace, with
no pattern matcher and no change to the user's code.
"""

import collections
import functools
import math
import types
from typing import Any, Callable, NamedTuple, Optional

import jax
from jax import lax
from jax.extend import core as jex_core
import jax.numpy as jnp

Array = jax.Array

_CALL_PRIMITIVES = ("jit", "pjit", "closed_call", "core_call", "checkpoint",
                    "remat", "remat2")
_CUSTOM_CALLS = ("custom_jvp_call", "custom_vjp_call",
                 "custom_vjp_call_jaxpr")
_IDENTITY_OPS = ("convert_element_type", "copy", "copy_p", "reduce_precision")
_BROADCAST_OPS = ("broadcast_in_dim", "squeeze", "expand_dims")
_FLIP = {"exact": "transposed", "transposed": "exact"}
_CACHE_SIZE = 32  # Discoveries kept (by function and shapes), oldest out.


class ConvSpec(NamedTuple):
  """The geometry of a convolution use (``conv_general_dilated``'s params).

  The field order is that of the tuple it replaces, so ``conv[5]`` is still
  ``rhs_spec``.

  Attributes:
    window_strides: the stride of each spatial dimension.
    padding: ``((low, high), ...)``, one pair per spatial dimension.
    lhs_dilation: the input dilation of each spatial dimension.
    rhs_dilation: the kernel dilation of each spatial dimension.
    lhs_spec: the input's ``(batch, feature, spatial...)`` axes.
    rhs_spec: the kernel's ``(out feature, in feature, spatial...)`` axes.
    out_spec: the output's ``(batch, feature, spatial...)`` axes.
    filter_shape: the kernel's spatial sizes, in ``rhs_spec`` order.
  """

  window_strides: tuple
  padding: tuple
  lhs_dilation: tuple
  rhs_dilation: tuple
  lhs_spec: tuple
  rhs_spec: tuple
  out_spec: tuple
  filter_shape: tuple


class Use(NamedTuple):
  """One use of a layer's kernel in the program.

  Attributes:
    kind: ``"dense"``, ``"conv"`` or ``"lookup"``.
    path: the position of the equation in the (inlined) jaxpr; inside a
      ``scan`` body it continues the ``scan`` equation's path.
    in_axis: dense and lookup: the kernel leaf's input axis (0 or 1).
    weight_is_lhs: dense only: the kernel is the left operand of the dot.
    input_axis: dense only: the contracted axis of the activations.
    conv: conv only: the :class:`ConvSpec`.
    input_dim: rows of this use's ``A`` (without the homogeneous coordinate).
    output_dim: rows of this use's ``G``.
    batch_axis: a ``vmap``-ed stack (a ``dot_general`` whose batch
      dimension is the kernel's leading axis): the activations' axis that
      runs over the stack; ``None`` otherwise. ``input_axis`` and
      ``in_axis`` then count without the stack axis.
    kernel_axes: a kernel of rank ≥ 3 (Flax ``DenseGeneral``/
      ``LinearGeneral``, attention projections) or one reshaped to the
      matrix of its leading and trailing axes: ``(contracted axes, other
      axes)`` of the kernel leaf, whose products are the input and output
      sizes; ``None`` for a 2-D kernel used as it is.
    input_axes: with ``kernel_axes``: the activations' contracted axes, in
      the order of the kernel's.
  """

  kind: str
  path: tuple
  in_axis: int
  weight_is_lhs: bool
  input_axis: int
  conv: Optional[ConvSpec]
  input_dim: int
  output_dim: int
  batch_axis: Optional[int] = None
  kernel_axes: Optional[tuple] = None
  input_axes: Optional[tuple] = None


class Layer(NamedTuple):
  """A discovered layer: one Kronecker block over a kernel (and its bias).

  The first fields describe the first use of the kernel, which fixes the
  block's orientation (``A`` on its input side); ``uses`` lists every use.

  Attributes:
    kind: ``"dense"``, ``"conv"`` or ``"lookup"`` (of the first use).
    kernel: index of the kernel leaf in ``jax.tree.leaves(params)``.
    bias: index of the bias leaf, or ``None``.
    in_axis: dense only: the kernel leaf's input (contracted) axis, 0 or 1.
    weight_is_lhs: dense only: the kernel is the left operand of the dot.
    input_axis: dense only: the contracted axis of the activations.
    conv: conv only: the :class:`ConvSpec`.
    path: the position of the equation in the (inlined) jaxpr.
    input_dim: rows of ``A`` without the homogeneous coordinate.
    output_dim: rows of ``G``.
    uses: every :class:`Use` of the kernel, in program order (``()`` means
      the one use described by the fields above).
    stack: the number of layers of a ``scan`` stack whose slices the uses
      see (the leaf has this leading axis, one block per slice); 0 when the
      kernel is not stacked.
    kernel_axes: as in :class:`Use`.
    input_axes: as in :class:`Use`.
  """

  kind: str
  kernel: int
  bias: Optional[int]
  in_axis: int
  weight_is_lhs: bool
  input_axis: int
  conv: Optional[ConvSpec]
  path: tuple
  input_dim: int
  output_dim: int
  uses: tuple = ()
  stack: int = 0
  kernel_axes: Optional[tuple] = None
  input_axes: Optional[tuple] = None


def layer_uses(layer: Layer) -> tuple:
  """The uses of a layer (its first use when ``uses`` is empty)."""
  if layer.uses:
    return layer.uses
  return (Use(layer.kind, layer.path, layer.in_axis, layer.weight_is_lhs,
              layer.input_axis, layer.conv, layer.input_dim,
              layer.output_dim, None, layer.kernel_axes,
              layer.input_axes),)


def is_transposed(layer: Layer, use: Use) -> bool:
  """Whether ``use`` sees the kernel with its input and output sides swapped.

  A tied output layer ``h @ E.T`` uses the embedding ``E`` of a lookup with
  its vocabulary on the output side: its ``G`` is on the block's ``A``
  side and its ``A`` on the ``G`` side.
  """
  return use.kind != "conv" and use.in_axis != layer.in_axis


class Discovery(NamedTuple):
  """Result of :func:`discover_layers`.

  Attributes:
    layers: the discovered layers, in program order.
    reasons: ``{leaf index: why it is not part of a layer}`` for the others.
  """

  layers: tuple
  reasons: dict


class _Origin(NamedTuple):
  """How a value of the program derives from a parameter leaf."""

  leaf: int
  # "exact", "transposed" (2-D), "merged" (reshaped to the matrix of its
  # leading and trailing axes) or "broadcast" (any other reshape).
  mode: str
  stack: Optional[tuple] = None  # (scan path, length) of a scanned slice.
  groups: Optional[tuple] = None  # "merged": (row axes, column axes).


class _Seen(NamedTuple):
  """One use of a parameter leaf met by the walk."""

  what: str  # "dense", "conv", "lookup", "bias", or the unfactored op.
  path: Optional[tuple] = None  # The equation of a factorable use.
  stack: Optional[tuple] = None  # As in _Origin: the slice the use sees.
  general: bool = False  # A kernel used through a matrix of its axes.


class _Out(NamedTuple):
  """What an equation's outputs are to the walk, one entry per output."""

  origins: tuple = ()  # _Origin (a parameter-derived value) or None.
  layers: tuple = ()  # The path of the use whose raw output it is, or None.


_NOTHING = _Out()


def _inner_jaxpr(eqn):
  """(jaxpr, consts) of a jit-like call equation, or ``None``."""
  if eqn.primitive.name not in _CALL_PRIMITIVES:
    return None
  inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  if inner is None:
    return None
  if isinstance(inner, jex_core.ClosedJaxpr):
    return inner.jaxpr, inner.consts
  return inner, ()


def _scan_parts(eqn):
  """``(body jaxpr, body consts, num_consts, num_carry)`` of a ``scan``.

  Up to jax 0.10 the body is a ``ClosedJaxpr`` and the counts are the
  ``num_consts`` and ``num_carry`` parameters. From jax 0.11 the body is an
  open ``Jaxpr`` and the inputs are described by ``ft_in``, a flat tree of
  three groups (loop constants, carry, scanned-over ``xs``), in that order;
  the body's outputs are still the carry followed by the ``ys``.
  """
  body = eqn.params["jaxpr"]
  jaxpr, consts = ((body.jaxpr, body.consts)
                   if isinstance(body, jex_core.ClosedJaxpr) else (body, ()))
  if jaxpr.constvars and not consts:
    raise NotImplementedError(
        "Layer discovery met a `scan` body with free constants and no values"
        " for them (an unknown jax version?): please report it, with"
        " `jax.__version__`, at the project's issue tracker.")
  if "num_consts" in eqn.params:
    return jaxpr, consts, eqn.params["num_consts"], eqn.params["num_carry"]
  loop_consts, carry, _ = (
      list(group)
      for group in eqn.params["ft_in"].update(list(eqn.invars)).unpack())
  return jaxpr, consts, len(loop_consts), len(carry)


def _is_var(v) -> bool:
  return not isinstance(v, jex_core.Literal)


def _read(env, variables):
  """``env``'s entry for each variable (``None`` for literals, unknowns)."""
  return [env.get(v) if _is_var(v) else None for v in variables]


def _write(env, variables, values):
  for v, value in zip(variables, values):
    if value is not None:
      env[v] = value


def _pair(variables, values):
  return {v: value for v, value in zip(variables, values) if value is not None}


class _Walk:
  """Symbolic walk of a jaxpr: origins of parameter-derived values and uses.

  Every equation that reads a parameter-derived value goes to its rule in
  :data:`_RULES` (by primitive name; :func:`_unmatched` for the others),
  which records the uses it sees and says what its outputs are.
  """

  def __init__(self, num_params):
    self.seen = {i: [] for i in range(num_params)}  # leaf -> [_Seen]
    self.candidates = {}  # path -> Use of a factorable use.
    self.bias_adds = []  # (layer path, bias leaf, bias stack)
    self.output_reads = collections.Counter()  # layer path -> raw readers

  def run(self, jaxpr, origins, layers, path):
    """Walks ``jaxpr`` from ``{var: _Origin}`` and ``{var: layer path}``.

    Returns:
      The same two dicts for the outputs of ``jaxpr``.
    """
    env_o, env_l = dict(origins), dict(layers)
    for i, eqn in enumerate(jaxpr.eqns):
      ins, lays = _read(env_o, eqn.invars), _read(env_l, eqn.invars)
      self.output_reads.update(lay for lay in lays if lay is not None)
      name = eqn.primitive.name
      if name not in _CALL_PRIMITIVES and all(o is None for o in ins):
        continue
      out = _RULES.get(name, _unmatched)(self, eqn, ins, lays, path + (i,))
      _write(env_o, eqn.outvars, out.origins)
      _write(env_l, eqn.outvars, out.layers)
    outs = _pair(jaxpr.outvars, _read(env_l, jaxpr.outvars))
    if not path:  # Returned raw layer outputs are read.
      self.output_reads.update(outs.values())
    return _pair(jaxpr.outvars, _read(env_o, jaxpr.outvars)), outs

  def reject(self, ins, reason):
    """Records that the parameter-derived ``ins`` are used by ``reason``."""
    for origin in ins:
      if origin is not None:
        self.seen[origin.leaf].append(_Seen(reason))
    return _NOTHING

  def accept(self, origin, use, stack, general=False):
    """Records a factorable use of ``origin``'s leaf; its output is raw."""
    self.seen[origin.leaf].append(_Seen(use.kind, use.path, stack, general))
    self.candidates[use.path] = use
    return _Out((None,), (use.path,))


# The rules: (walk, eqn, ins, lays, here) -> _Out. ``ins``/``lays``: the
# origin/raw layer output of each operand (or None); ``here``: the path.


def _unmatched(walk, eqn, ins, lays, here):
  del lays, here
  return walk.reject(ins, f"`{eqn.primitive.name}`")


def _call(walk, eqn, ins, lays, here):
  """A ``jit``/``closed_call``/``checkpoint``: its body is walked inline."""
  inner = _inner_jaxpr(eqn)
  if inner is None:
    return _unmatched(walk, eqn, ins, lays, here)
  jaxpr = inner[0]
  # The call itself is not a reader of a raw output; its body is.
  walk.output_reads.subtract(lay for lay in lays if lay is not None)
  out_o, out_l = walk.run(jaxpr, _pair(jaxpr.invars, ins),
                          _pair(jaxpr.invars, lays), here)
  return _Out(tuple(_read(out_o, jaxpr.outvars)),
              tuple(_read(out_l, jaxpr.outvars)))


def _custom_call(walk, eqn, ins, lays, here):
  del lays, here
  return walk.reject(
      ins, f"`{eqn.primitive.name}` (a function with a custom derivative,"
      " whose inside is not followed)")


def _identity(walk, eqn, ins, lays, here):
  if len(ins) != 1:
    return _unmatched(walk, eqn, ins, lays, here)
  return _Out((ins[0],))


def _transpose(walk, eqn, ins, lays, here):
  """A 2-D transpose flips the kernel's sides; other transposes are uses."""
  if (len(ins) != 1 or ins[0].mode not in _FLIP
      or eqn.invars[0].aval.ndim != 2):
    return _unmatched(walk, eqn, ins, lays, here)
  return _Out((ins[0]._replace(mode=_FLIP[ins[0].mode]),))


def _broadcast(walk, eqn, ins, lays, here):
  """Broadcasts and reshapes keep a leaf's identity for the bias rule."""
  derived = [o for o in ins if o is not None]
  if len(derived) != 1:
    return _unmatched(walk, eqn, ins, lays, here)
  return _Out((derived[0]._replace(mode="broadcast", groups=None),))


def _split_groups(shape, new_shape):
  """The leaf's ``(leading axes, trailing axes)`` that a reshape to the 2-D
  ``new_shape`` merges into its rows and columns, or ``None``."""
  if len(new_shape) != 2:
    return None
  for k in range(1, len(shape)):
    if math.prod(shape[:k]) == new_shape[0]:
      return tuple(range(k)), tuple(range(k, len(shape)))
  return None


def _reshape(walk, eqn, ins, lays, here):
  """A kernel reshaped to the matrix ``[leading axes, trailing axes]``."""
  origin = ins[0]
  shape, new_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
  if origin is None or len(ins) != 1 or eqn.params.get("dimensions"):
    return _broadcast(walk, eqn, ins, lays, here)
  if tuple(shape) == tuple(new_shape):
    return _Out((origin,))
  groups = _split_groups(shape, new_shape)
  if origin.mode != "exact" or groups is None:
    return _broadcast(walk, eqn, ins, lays, here)
  return _Out((origin._replace(mode="merged", groups=groups),))


class _Dot(NamedTuple):
  """A ``dot_general`` of one parameter-derived operand (the weight)."""

  origin: _Origin
  weight: Any  # The weight operand's aval.
  x: Any  # The other operand's aval.
  weight_is_lhs: bool
  c_w: tuple  # Contracting dimensions of the weight and of x.
  c_x: tuple
  b_w: tuple  # Batch dimensions of the weight and of x.
  b_x: tuple


def _dot_of(eqn, ins) -> _Dot:
  (contract_l, contract_r), (batch_l, batch_r) = eqn.params[
      "dimension_numbers"]
  lhs, rhs = (v.aval for v in eqn.invars)
  if ins[0] is not None:
    return _Dot(ins[0], lhs, rhs, True, tuple(contract_l),
                tuple(contract_r), tuple(batch_l), tuple(batch_r))
  return _Dot(ins[1], rhs, lhs, False, tuple(contract_r), tuple(contract_l),
              tuple(batch_r), tuple(batch_l))


def _vmapped_dense(dot, here):
  """A stack of dense layers applied by ``vmap`` (``nnx.vmap``)."""
  if not (dot.origin.mode == "exact" and dot.origin.stack is None
          and dot.weight.ndim == 3 and dot.b_w == (0,) and len(dot.c_w) == 1
          and len(dot.c_x) == 1):
    return None
  c_w, c_x, b_x = dot.c_w[0], dot.c_x[0], dot.b_x[0]
  in_w = c_w - 1
  return Use("dense", here, in_w, dot.weight_is_lhs,
             c_x - (1 if b_x < c_x else 0), None, dot.weight.shape[c_w],
             dot.weight.shape[1 + (1 - in_w)], batch_axis=b_x)


def _general_dense(dot, here):
  """A kernel of rank ≥ 3 contracted over some of its axes (DenseGeneral).

  The contracted axes are the input side, the others the output side:
  the kernel is the matrix ``[prod(contracted), prod(others)]``.
  """
  shape = dot.weight.shape
  if not (dot.origin.mode == "exact" and len(shape) >= 3 and not dot.b_w
          and not dot.b_x and len(dot.c_w) < len(shape)):
    return None
  free = tuple(d for d in range(len(shape)) if d not in dot.c_w)
  return Use("dense", here, 0, dot.weight_is_lhs, dot.c_x[-1], None,
             math.prod(shape[d] for d in dot.c_w),
             math.prod(shape[d] for d in free), kernel_axes=(dot.c_w, free),
             input_axes=dot.c_x)


def _merged_dense(dot, here):
  """A kernel reshaped to ``[leading axes, trailing axes]``, then a matmul.

  The contracted side of the matrix is a group of the leaf's axes: as for
  :func:`_general_dense`, the kernel is the matrix ``[that group, the
  other]``.
  """
  if not (dot.origin.mode == "merged" and dot.weight.ndim == 2
          and len(dot.c_w) == 1 and len(dot.c_x) == 1 and not dot.b_w
          and not dot.b_x):
    return None
  size, groups = dot.weight.shape, dot.origin.groups
  contracted, free = groups if dot.c_w[0] == 0 else groups[::-1]
  if dot.weight_is_lhs and len(free) != 1:  # Its free axes would lead.
    return None
  return Use("dense", here, 0, dot.weight_is_lhs, dot.c_x[0], None,
             size[dot.c_w[0]], size[1 - dot.c_w[0]],
             kernel_axes=(contracted, free), input_axes=dot.c_x)


def _plain_dense(dot, here):
  """A 2-D kernel (or its transpose) contracted with the activations."""
  if not (dot.origin.mode in _FLIP and dot.weight.ndim == 2
          and len(dot.c_w) == 1 and len(dot.c_x) == 1 and not dot.b_w
          and not dot.b_x and dot.x.ndim >= 1):
    return None
  in_w = dot.c_w[0]
  in_axis = in_w if dot.origin.mode == "exact" else 1 - in_w
  return Use("dense", here, in_axis, dot.weight_is_lhs, dot.c_x[0], None,
             dot.weight.shape[in_w], dot.weight.shape[1 - in_w])


def _dot_general(walk, eqn, ins, lays, here):
  """A dense use: the weight of a ``dot_general`` with an activation."""
  del lays
  if ins[0] is not None and ins[1] is not None:
    return walk.reject(ins, "`dot_general` of two parameters")
  dot = _dot_of(eqn, ins)
  for match in (_vmapped_dense, _general_dense, _merged_dense, _plain_dense):
    use = match(dot, here)
    if use is not None:
      stack = ((here, dot.weight.shape[0]) if use.batch_axis is not None
               else dot.origin.stack)
      return walk.accept(dot.origin, use, stack,
                         general=use.kernel_axes is not None)
  if dot.origin.mode in ("broadcast", "merged"):
    return walk.reject(
        ins, "`dot_general` of a reshaped kernel (only a reshape to the"
        " matrix of its leading and trailing axes, used as it is, is"
        " followed)")
  return walk.reject(
      ins, "`dot_general` that is not a dense layer (weight not 2-D, batch"
      " dimensions, or several contracting dimensions)")


def _conv_spec(params, shape) -> ConvSpec:
  dn = params["dimension_numbers"]
  return ConvSpec(
      tuple(params["window_strides"]), tuple(map(tuple, params["padding"])),
      tuple(params["lhs_dilation"]), tuple(params["rhs_dilation"]),
      tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec),
      tuple(shape[d] for d in dn.rhs_spec[2:]))


def _conv(walk, eqn, ins, lays, here):
  """A conv use: the plain kernel of an ungrouped convolution."""
  del lays
  p = eqn.params
  origin = ins[1]
  if ins[0] is not None or origin is None or origin.mode != "exact":
    return walk.reject(ins, "`conv_general_dilated` not as a plain kernel")
  if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    return walk.reject(
        ins, "grouped convolution (feature_group_count or batch_group_count"
        " > 1)")
  shape = eqn.invars[1].aval.shape
  spec = _conv_spec(p, shape)
  use = Use("conv", here, 0, False, 0, spec,
            math.prod(shape[d] for d in spec.rhs_spec[1:]),
            shape[spec.rhs_spec[0]])
  return walk.accept(origin, use, origin.stack)


def _is_row_lookup(eqn, ins) -> bool:
  """``E[indices]``: whole rows of a 2-D leaf gathered by integer indices."""
  if ins[0] is None or ins[1] is not None or ins[0].mode != "exact":
    return False
  operand, indices = (v.aval for v in eqn.invars)
  out = eqn.outvars[0].aval
  dn = eqn.params["dimension_numbers"]
  return (operand.ndim == 2
          and tuple(dn.collapsed_slice_dims) == (0,)
          and tuple(dn.start_index_map) == (0,)
          and tuple(dn.offset_dims) == (out.ndim - 1,)
          and not tuple(getattr(dn, "operand_batching_dims", ()))
          and tuple(eqn.params["slice_sizes"]) == (1, operand.shape[1])
          and indices.shape[-1:] == (1,)
          and jnp.issubdtype(indices.dtype, jnp.integer))


def _gather(walk, eqn, ins, lays, here):
  """A lookup: the same as a dense use on one-hot inputs."""
  if not _is_row_lookup(eqn, ins):
    return _unmatched(walk, eqn, ins, lays, here)
  shape = eqn.invars[0].aval.shape
  use = Use("lookup", here, 0, False, 0, None, shape[0], shape[1])
  return walk.accept(ins[0], use, ins[0].stack)


def _add(walk, eqn, ins, lays, here):
  """A bias: a leaf of the output size added to a use's raw output."""
  for k in (0, 1) if len(ins) == 2 else ():
    lay, origin = lays[k], ins[1 - k]
    if lay is None or origin is None or ins[k] is not None:
      continue
    use = walk.candidates.get(lay)
    if (use is None or eqn.invars[1 - k].aval.size != use.output_dim
        or eqn.outvars[0].aval.shape != eqn.invars[k].aval.shape):
      continue
    walk.seen[origin.leaf].append(_Seen("bias", here, origin.stack))
    walk.bias_adds.append((lay, origin.leaf, origin.stack))
    return _NOTHING
  return _unmatched(walk, eqn, ins, lays, here)


def _scan_reason(k, origin, num_loop_invariant):
  """Why the ``k``-th input of a ``scan`` is not followed, or ``None``."""
  if k < num_loop_invariant:
    return ("`scan` as a loop constant or carry (applied at every"
            " iteration)")
  if origin.stack is not None:
    return "a nested `scan` stack"
  if origin.mode != "exact":
    return "`scan` after a reshape or transpose of the stack"
  return None


def _scan(walk, eqn, ins, lays, here):
  """Follows stacked parameters (``xs``) into a ``scan`` body."""
  del lays
  body, _, num_consts, num_carry = _scan_parts(eqn)
  sub = {}
  for k, (inner_var, origin) in enumerate(zip(body.invars, ins)):
    if origin is None:
      continue
    reason = _scan_reason(k, origin, num_consts + num_carry)
    if reason is None:
      sub[inner_var] = origin._replace(
          stack=(here, int(eqn.params["length"])))
    else:
      walk.seen[origin.leaf].append(_Seen(reason))
  _, out_l = walk.run(body, sub, {}, here)
  walk.output_reads.update(out_l.values())  # A raw output leaving is read.
  return _NOTHING


_RULES = types.MappingProxyType({
    **{name: _call for name in _CALL_PRIMITIVES},
    **{name: _custom_call for name in _CUSTOM_CALLS},
    **{name: _identity for name in _IDENTITY_OPS},
    **{name: _broadcast for name in _BROADCAST_OPS},
    "reshape": _reshape,
    "transpose": _transpose,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "gather": _gather,
    "add": _add,
    "scan": _scan,
})
"""The walk's rule for each primitive that can keep a leaf's identity or use
it as a layer; every other primitive is an unfactored use."""


def _layer_reason(seen):
  """Why the uses of one leaf do not make a layer, or ``None`` if they do."""
  if len(seen) == 1 and seen[0].path is None:
    return "used by " + seen[0].what
  unfactored = sorted({s.what for s in seen
                       if s.path is None or s.what == "bias"})
  if unfactored:
    return (f"used {len(seen)} times (weight sharing), and not every use is"
            " a dense layer or a lookup: " + ", ".join(unfactored))
  if len(seen) > 1 and any(s.what == "conv" for s in seen):
    return (f"used {len(seen)} times (weight sharing) as a convolution"
            " kernel: only dense uses and lookups can share a block")
  if len(seen) > 1 and any(s.general for s in seen):
    return (f"used {len(seen)} times (weight sharing) as a kernel of rank"
            " ≥ 3 or a reshaped kernel: only 2-D kernels can share a block")
  if len({s.stack for s in seen}) > 1:
    return ("used both inside and outside a `scan` stack (or in two stacks):"
            " its uses see different slices")
  return None


def _kernels(walk):
  """``({first use path: kernel leaf}, {leaf: reason})`` of the walk."""
  kernels, reasons = {}, {}
  for leaf, seen in walk.seen.items():
    if not seen:
      reasons[leaf] = "not used by predict_fn (or only through constants)"
    elif len(seen) == 1 and seen[0].what == "bias":
      continue  # Decided by _biases.
    elif (reason := _layer_reason(seen)) is not None:
      reasons[leaf] = reason
    else:
      kernels[seen[0].path] = leaf
  return kernels, reasons


def _biases(walk, kernels, reasons):
  """``{layer path: bias leaf}``; the reason of each bias left out."""
  biases = {}
  for lay, leaf, stack in walk.bias_adds:
    if len(walk.seen[leaf]) != 1:
      continue  # Read elsewhere too: _layer_reason says why.
    kernel = kernels.get(lay)
    fits = (kernel is not None and len(walk.seen[kernel]) == 1
            and walk.seen[kernel][0].stack == stack)
    if fits and walk.output_reads[lay] == 1:
      biases[lay] = leaf
    else:
      reasons[leaf] = ("bias of a layer whose raw output is read elsewhere,"
                       " whose kernel is used several times, or whose kernel"
                       " is not a K-FAC layer")
  return biases


def _layer(walk, path, leaf, bias) -> Layer:
  """The layer of kernel ``leaf``, whose first use is at ``path``."""
  seen = walk.seen[leaf]
  uses = tuple(walk.candidates[s.path] for s in seen)
  first = walk.candidates[path]
  keep = len(uses) > 1 or first.batch_axis is not None
  stack = seen[0].stack
  return Layer(
      kind=first.kind, kernel=leaf, bias=bias, in_axis=first.in_axis,
      weight_is_lhs=first.weight_is_lhs, input_axis=first.input_axis,
      conv=first.conv, path=path, input_dim=first.input_dim,
      output_dim=first.output_dim, uses=uses if keep else (),
      stack=0 if stack is None else stack[1],
      kernel_axes=first.kernel_axes, input_axes=first.input_axes)


def _discover(predict_fn, params, batch) -> Discovery:
  """:func:`discover_layers` on abstract ``params`` and ``batch``."""
  closed = jax.make_jaxpr(predict_fn)(params, batch)
  num_params = len(jax.tree.leaves(params))
  walk = _Walk(num_params)
  origins = {v: _Origin(i, "exact")
             for i, v in enumerate(closed.jaxpr.invars[:num_params])}
  walk.run(closed.jaxpr, origins, {}, ())
  kernels, reasons = _kernels(walk)
  biases = _biases(walk, kernels, reasons)
  layers = tuple(_layer(walk, path, kernels[path], biases.get(path))
                 for path in sorted(kernels))
  return Discovery(layers, reasons)


class _Signature(NamedTuple):
  """A hashable stand-in for the shapes and dtypes of a pytree."""

  treedef: Any
  leaves: tuple  # (shape, dtype, weak_type) per leaf.

  def abstract(self):
    return jax.tree.unflatten(self.treedef, [
        jax.ShapeDtypeStruct(shape, dtype, weak_type=weak)
        for shape, dtype, weak in self.leaves])


def _signature(tree) -> _Signature:
  """Shapes and dtypes of ``tree`` (typed PRNG keys and Python scalars too)."""
  leaves, treedef = jax.tree.flatten(jax.eval_shape(lambda t: t, tree))
  return _Signature(treedef, tuple(
      (tuple(x.shape), x.dtype, bool(getattr(x, "weak_type", False)))
      for x in leaves))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cached_discovery(predict_fn, params, batch, x64):
  del x64  # Part of the key only: it changes the traced dtypes.
  return _discover(predict_fn, params.abstract(), batch.abstract())


def discover_layers(
    predict_fn: Callable[[Any, Any], Any], params: Any, batch: Any
) -> Discovery:
  """Finds the dense, convolution and lookup layers of ``predict_fn``.

  The discovery depends only on ``predict_fn`` and on the shapes and dtypes
  of ``params`` and ``batch``: it is cached on them (the last few), so that
  the statistics, the summary and every trace of an update share one
  trace of ``predict_fn``. A ``predict_fn`` that cannot be hashed is traced
  at every call.

  Args:
    predict_fn: ``(params, batch) -> outputs``.
    params: the parameters (arrays, tracers or ``jax.ShapeDtypeStruct``).
    batch: a batch of the shapes that will be used.

  Returns:
    A :class:`Discovery`: the layers and, for every other parameter leaf, the
    reason it was not matched.

  Example:
    >>> import jax.numpy as jnp
    >>> from curvature._layers import discover_layers
    >>> def predict(params, batch):
    ...   hidden = jnp.tanh(batch["inputs"] @ params[0]["w"] + params[0]["b"])
    ...   return hidden @ params[1]["w"] + params[1]["b"]
    >>> params = [{"w": jnp.ones((4, 5)), "b": jnp.zeros(5)},
    ...           {"w": jnp.ones((5, 2)), "b": jnp.zeros(2)}]
    >>> found = discover_layers(predict, params, {"inputs": jnp.ones((8, 4))})
    >>> [layer.kind for layer in found.layers]
    ['dense', 'dense']
  """
  # jax sets its flags on Config with setattr, which pyrefly cannot see.
  # pyrefly: ignore[missing-attribute]
  x64 = bool(jax.config.jax_enable_x64)
  key = (predict_fn, _signature(params), _signature(batch), x64)
  try:
    hash(key)
  except TypeError:  # An unhashable callable (or pytree metadata).
    return _discover(predict_fn, _abstract(params), _abstract(batch))
  found = _cached_discovery(*key)
  return found._replace(reasons=dict(found.reasons))  # The cache's is kept.


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _bind(eqn, invals):
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(bind_params, tuple):  # jax < 0.7: (subfuns, params).
    subfuns, bind_params = bind_params
    invals = list(subfuns) + list(invals)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **bind_params)
  return out if eqn.primitive.multiple_results else [out]


def _taps_under(taps, here):
  return sorted(index for path, (index, _) in taps.items()
                if path[:len(here)] == here and len(path) > len(here))


def _tapped_scan(eqn, invals, taps, here, record, perturbations):
  """A ``scan`` that holds taps, re-run as a ``lax.scan`` of the interpreter.

  The taps' perturbations are scanned over (one slice per iteration) and
  the recorded inputs are stacked, so both have the ``scan`` length as
  leading axis.
  """
  body, consts, num_consts, num_carry = _scan_parts(eqn)
  inner = _taps_under(taps, here)
  loop_consts = invals[:num_consts]
  init = invals[num_consts:num_consts + num_carry]
  xs = invals[num_consts + num_carry:]

  def step(carry, sliced):
    x, perturbation = sliced
    local_record = [None] * len(record)
    local_perturbations = list(perturbations)
    for index, p in zip(inner, perturbation):
      local_perturbations[index] = p
    outs = _evaluate(body, consts, list(loop_consts) + list(carry) + list(x),
                     taps, here, local_record, local_perturbations)
    return outs[:num_carry], (outs[num_carry:],
                              [local_record[i] for i in inner])

  carry, (ys, recorded) = lax.scan(
      step, list(init), (list(xs), [perturbations[i] for i in inner]),
      length=eqn.params["length"], reverse=eqn.params["reverse"])
  for index, value in zip(inner, recorded):
    record[index] = value
  return list(carry) + list(ys)


def _evaluate(jaxpr, consts, args, taps, path, record, perturbations):
  env = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for i, eqn in enumerate(jaxpr.eqns):
    here = path + (i,)
    invals = [read(v) for v in eqn.invars]
    inner = _inner_jaxpr(eqn)
    if inner is not None and _taps_under(taps, here):
      outs = _evaluate(inner[0], inner[1], invals, taps, here, record,
                       perturbations)
    elif eqn.primitive.name == "scan" and _taps_under(taps, here):
      outs = _tapped_scan(eqn, invals, taps, here, record, perturbations)
    else:
      outs = _bind(eqn, invals)
    if here in taps:
      index, use = taps[here]
      operand = 1 if (use.kind == "dense" and use.weight_is_lhs) else (
          1 if use.kind == "lookup" else 0)
      record[index] = invals[operand]
      outs = [outs[0] + perturbations[index].astype(outs[0].dtype)]
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _all_uses(layers):
  """``[(layer index, use)]``: every use of every layer, in layer order."""
  return [(k, use) for k, layer in enumerate(layers)
          for use in layer_uses(layer)]


def tapped_forward(
    predict_fn: Callable[[Any, Any], Any],
    layers: tuple,
    params: Any,
    batch: Any,
) -> tuple[Callable[..., tuple], tuple]:
  """``(perturbations, at=params) ↦ (outputs, use inputs)`` for the layers.

  The returned function evaluates ``predict_fn(at, batch)`` with
  ``perturbations[k]`` (zeros of the shape of use ``k``'s raw output) added
  to use ``k``'s output, and also returns every use's input operand. Uses
  are numbered layer by layer (:func:`layer_uses`); a layer used once has
  one use, so for such layers ``k`` is the layer's index. A use inside a
  ``scan`` stack has the stack's length as leading axis of both. The VJP
  with respect to the perturbations gives K-FAC's output gradients.

  Args:
    predict_fn: ``(params, batch) -> outputs``.
    layers: from :func:`discover_layers` on the same shapes.
    params: the parameters.
    batch: the batch.

  Returns:
    ``(fn, zeros)``: the function, and the zero perturbations. ``fn``'s
    ``at`` (parameters shaped like ``params``) is what to evaluate at: its
    VJP with respect to ``at`` gives parameter gradients from the same pass.
  """
  closed, out_shape = jax.make_jaxpr(predict_fn, return_shape=True)(
      _abstract(params), _abstract(batch))
  uses = _all_uses(layers)
  taps = {use.path: (k, use) for k, (_, use) in enumerate(uses)}
  shapes = _raw_output_shapes(closed.jaxpr, taps)
  zeros = tuple(jnp.zeros(s, d) for s, d in shapes)
  args = jax.tree.leaves((params, batch))

  def fn(perturbations, at=None):
    record = [None] * len(uses)
    flat = _evaluate(closed.jaxpr, closed.consts,
                     args if at is None else jax.tree.leaves((at, batch)),
                     taps, (), record, perturbations)
    return jax.tree.unflatten(jax.tree.structure(out_shape), flat), tuple(
        record)

  return fn, zeros


_USE_PRIMITIVES = {"dense": "dot_general", "conv": "conv_general_dilated",
                   "lookup": "gather"}


def _raw_output_shapes(jaxpr, taps) -> list[tuple[tuple, Any]]:
  """``(shape, dtype)`` of each tap's raw output (stacked in a ``scan``).

  Raises:
    ValueError: a tap is not at an equation of its kind: ``predict_fn``
      traced to another program than at discovery.
  """
  shapes: list[Optional[tuple[tuple, Any]]] = [None] * len(taps)

  def visit(jaxpr, path, lead):
    for i, eqn in enumerate(jaxpr.eqns):
      here = path + (i,)
      if here in taps:
        _check_tap(eqn, taps[here][1])
        aval = eqn.outvars[0].aval
        shapes[taps[here][0]] = (lead + tuple(aval.shape), aval.dtype)
      inner = _inner_jaxpr(eqn)
      if inner is not None:
        visit(inner[0], here, lead)
      elif eqn.primitive.name == "scan":
        visit(_scan_parts(eqn)[0], here, lead + (eqn.params["length"],))

  visit(jaxpr, (), ())
  found = [shape for shape in shapes if shape is not None]
  if len(found) < len(shapes):
    _check_tap(None, None)  # Raises.
  return found


def _check_tap(eqn, use):
  if eqn is None or eqn.primitive.name != _USE_PRIMITIVES[use.kind]:
    raise ValueError(
        "predict_fn traced to another program than when its layers were"
        " discovered, with the same shapes of params and batch: a value it"
        " closes over changed shape or kind. Pass such values in the batch"
        " or params, or rebuild the optimizer.")


# Statistics -----------------------------------------------------------------


def use_inputs(use: Use, inputs: Array, num_examples: int) -> Array:
  """A use's input as ``[examples, positions, input_dim]``.

  Positions are what the weight is shared over: the sequence (and any other
  leading axis) of a dense use, the output locations of a convolution (its
  image patches), the indices of a lookup (one-hot rows). The leading axis
  of the activations is the batch.
  """
  if use.kind == "lookup":
    rows = jax.nn.one_hot(inputs[..., 0], use.input_dim,
                          dtype=jnp.float32)
    return rows.reshape(num_examples, -1, use.input_dim)
  rows = layer_inputs(use, inputs)
  return rows.reshape(num_examples, -1, rows.shape[-1])


def use_output_grads(use: Use, grads: Array, num_examples: int) -> Array:
  """A use's output gradients as ``[examples, positions, output_dim]``."""
  if use.kind == "lookup":
    return grads.reshape(num_examples, -1, grads.shape[-1])
  rows = layer_output_grads(use, grads)
  return rows.reshape(num_examples, -1, rows.shape[-1])


def layer_inputs(layer, inputs: Array) -> Array:
  """The layer's input as rows ``[positions, input_dim]`` (patches for conv)."""
  if layer.kind == "conv":
    spec = layer.conv
    spatial = len(spec.lhs_spec) - 2
    patches = lax.conv_general_dilated_patches(
        inputs, spec.filter_shape, spec.window_strides, spec.padding,
        lhs_dilation=spec.lhs_dilation, rhs_dilation=spec.rhs_dilation,
        dimension_numbers=lax.ConvDimensionNumbers(
            spec.lhs_spec, tuple(range(spatial + 2)), spec.out_spec),
        precision=lax.Precision.HIGHEST)
    patches = jnp.moveaxis(patches, spec.out_spec[1], -1)
    return patches.reshape(-1, patches.shape[-1])
  axes = getattr(layer, "input_axes", None)
  if axes:  # A kernel of rank ≥ 3: its contracted axes, flattened.
    moved = jnp.moveaxis(inputs, axes, tuple(range(-len(axes), 0)))
    return moved.reshape(-1, layer.input_dim)
  moved = jnp.moveaxis(inputs, layer.input_axis, -1)
  return moved.reshape(-1, moved.shape[-1])


def layer_output_grads(layer, grads: Array) -> Array:
  """Output gradients as rows ``[positions, output_dim]``."""
  kernel_axes = getattr(layer, "kernel_axes", None)
  if kernel_axes:  # The kernel's other axes lead (lhs) or trail (rhs).
    free = len(kernel_axes[1])
    if layer.weight_is_lhs:
      grads = jnp.moveaxis(grads, tuple(range(free)),
                           tuple(range(-free, 0)))
    return grads.reshape(-1, layer.output_dim)
  if layer.kind == "conv":
    feature = layer.conv.out_spec[1]
  elif layer.kind == "dense" and layer.weight_is_lhs:
    feature = 0
  else:
    feature = grads.ndim - 1
  moved = jnp.moveaxis(grads, feature, -1)
  return moved.reshape(-1, moved.shape[-1])
