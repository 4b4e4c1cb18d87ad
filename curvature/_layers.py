"""Automatic layer discovery and per-layer statistics taps for K-FAC.

No registration by the user. :func:`discover_layers` traces
``predict_fn(params, batch)`` to a jaxpr (``jax.make_jaxpr``) and walks it,
following every parameter leaf through *structural* operations only
(``convert_element_type``, ``copy``, a 2-D ``transpose``, and, for biases,
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
  ``MultiHeadAttention``) is the matrix ``[contracted, other axes]``; a
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
gives it a diagonal block.

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

from typing import Any, Callable, NamedTuple, Optional

import jax
from jax import lax
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_CALL_PRIMITIVES = ("jit", "pjit", "closed_call", "core_call", "checkpoint",
                    "remat", "remat2")
_IDENTITY_OPS = ("convert_element_type", "copy", "copy_p", "reduce_precision")
_BROADCAST_OPS = ("reshape", "broadcast_in_dim", "squeeze", "expand_dims")


class Use(NamedTuple):
  """One use of a layer's kernel in the program.

  Attributes:
    kind: ``"dense"``, ``"conv"`` or ``"lookup"``.
    path: the position of the equation in the (inlined) jaxpr; inside a
      ``scan`` body it continues the ``scan`` equation's path.
    in_axis: dense and lookup: the kernel leaf's input axis (0 or 1).
    weight_is_lhs: dense only: the kernel is the left operand of the dot.
    input_axis: dense only: the contracted axis of the activations.
    conv: conv only: as in :class:`Layer`.
    input_dim: rows of this use's ``A`` (without the homogeneous coordinate).
    output_dim: rows of this use's ``G``.
    batch_axis: a ``vmap``-ed stack (a ``dot_general`` whose batch
      dimension is the kernel's leading axis): the activations' axis that
      runs over the stack; ``None`` otherwise. ``input_axis`` and
      ``in_axis`` then count without the stack axis.
    kernel_axes: a kernel of rank ≥ 3 (Flax ``DenseGeneral``/
      ``LinearGeneral``, attention projections): ``(contracted axes, other
      axes)`` of the kernel, whose products are the input and output sizes;
      ``None`` for a 2-D kernel.
    input_axes: with ``kernel_axes``: the activations' contracted axes, in
      the order of the kernel's.
  """

  kind: str
  path: tuple
  in_axis: int
  weight_is_lhs: bool
  input_axis: int
  conv: Optional[tuple]
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
    conv: conv only: ``(window_strides, padding, lhs_dilation, rhs_dilation,
      lhs_spec, rhs_spec, out_spec, filter_shape)``.
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
  conv: Optional[tuple]
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
  leaf: int
  mode: str  # "exact", "transposed" (2-D) or "broadcast" (reshaped).
  stack: Optional[tuple] = None  # (scan path, length) of a scanned slice.


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
  """``(body jaxpr, body consts, num_consts, num_carry)`` of a ``scan``."""
  body = eqn.params["jaxpr"]
  return (body.jaxpr, body.consts, eqn.params["num_consts"],
          eqn.params["num_carry"])


def _is_var(v) -> bool:
  return not isinstance(v, jex_core.Literal)


class _Walk:
  """Symbolic walk of a jaxpr: origins of parameter-derived values and uses."""

  def __init__(self, num_params):
    self.uses = {i: [] for i in range(num_params)}  # leaf -> [(desc, info)]
    self.candidates = {}  # path -> partial layer dict
    self.bias_adds = []  # (layer path, bias leaf, bias stack)
    self.output_reads = {}  # layer path -> number of readers of raw output

  def run(self, jaxpr, origins, outputs, path):
    """origins/outputs: dicts var -> _Origin / layer path for the invars."""
    env_o = dict(origins)
    env_l = dict(outputs)
    for i, eqn in enumerate(jaxpr.eqns):
      here = path + (i,)
      ins = [env_o.get(v) if _is_var(v) else None for v in eqn.invars]
      lays = [env_l.get(v) if _is_var(v) else None for v in eqn.invars]
      for lay in lays:
        if lay is not None:
          self.output_reads[lay] = self.output_reads.get(lay, 0) + 1
      inner = _inner_jaxpr(eqn)
      if inner is not None:
        inner_jaxpr, _ = inner
        sub_o = {iv: o for iv, o in zip(inner_jaxpr.invars, ins) if o}
        sub_l = {iv: lay for iv, lay in zip(inner_jaxpr.invars, lays) if lay}
        for lay in lays:  # The call itself is not a reader; its body is.
          if lay is not None:
            self.output_reads[lay] -= 1
        out_o, out_l = self.run(inner_jaxpr, sub_o, sub_l, here)
        for ov, iv in zip(eqn.outvars, inner_jaxpr.outvars):
          if _is_var(iv) and iv in out_o:
            env_o[ov] = out_o[iv]
          if _is_var(iv) and iv in out_l:
            env_l[ov] = out_l[iv]
        continue
      derived = [(k, o) for k, o in enumerate(ins) if o is not None]
      if eqn.primitive.name == "scan" and derived:
        self._scan(eqn, ins, here)
        continue
      if not derived:
        continue
      name = eqn.primitive.name
      if name in _IDENTITY_OPS and len(eqn.invars) == 1:
        env_o[eqn.outvars[0]] = ins[0]
        continue
      if name == "transpose" and len(eqn.invars) == 1:
        origin = ins[0]
        if (origin.mode in ("exact", "transposed")
            and eqn.invars[0].aval.ndim == 2):
          mode = "transposed" if origin.mode == "exact" else "exact"
          env_o[eqn.outvars[0]] = origin._replace(mode=mode)
          continue
      if name in _BROADCAST_OPS and len(derived) == 1:
        env_o[eqn.outvars[0]] = ins[0]._replace(mode="broadcast")
        continue
      if name == "dot_general" and self._dense(eqn, ins, here):
        env_l[eqn.outvars[0]] = here
        continue
      if name == "conv_general_dilated" and self._conv(eqn, ins, here):
        env_l[eqn.outvars[0]] = here
        continue
      if name == "gather" and self._lookup(eqn, ins, here):
        env_l[eqn.outvars[0]] = here
        continue
      if name == "add" and self._bias(eqn, ins, lays, here):
        continue
      for _, origin in derived:
        self.uses[origin.leaf].append((f"`{name}`", None))
    out_o = {v: env_o[v] for v in jaxpr.outvars if _is_var(v) and v in env_o}
    out_l = {v: env_l[v] for v in jaxpr.outvars if _is_var(v) and v in env_l}
    for v in jaxpr.outvars:  # Returned raw layer outputs are read.
      if _is_var(v) and v in env_l and not path:
        lay = env_l[v]
        self.output_reads[lay] = self.output_reads.get(lay, 0) + 1
    return out_o, out_l

  def _scan(self, eqn, ins, here):
    """Follows stacked parameters (``xs``) into a ``scan`` body."""
    body, _, num_consts, num_carry = _scan_parts(eqn)
    sub_o = {}
    for k, (inner_var, origin) in enumerate(zip(body.invars, ins)):
      if origin is None:
        continue
      if k < num_consts + num_carry:
        self.uses[origin.leaf].append(
            ("`scan` as a loop constant or carry (applied at every"
             " iteration)", None))
      elif origin.stack is not None:
        self.uses[origin.leaf].append(("a nested `scan` stack", None))
      elif origin.mode != "exact":
        self.uses[origin.leaf].append(
            ("`scan` after a reshape or transpose of the stack", None))
      else:
        sub_o[inner_var] = origin._replace(
            stack=(here, int(eqn.params["length"])))
    _, out_l = self.run(body, sub_o, {}, here)
    for lay in out_l.values():  # A raw output leaving the body is read.
      self.output_reads[lay] = self.output_reads.get(lay, 0) + 1

  def _dense(self, eqn, ins, here):
    (contract_l, contract_r), (batch_l, batch_r) = eqn.params[
        "dimension_numbers"]
    lhs, rhs = eqn.invars
    if ins[0] is not None and ins[1] is not None:
      for o in ins:
        self.uses[o.leaf].append(("`dot_general` of two parameters", None))
      return True
    weight_is_lhs = ins[0] is not None
    origin = ins[0] if weight_is_lhs else ins[1]
    weight, x = (lhs, rhs) if weight_is_lhs else (rhs, lhs)
    c_w, c_x = ((contract_l, contract_r) if weight_is_lhs
                else (contract_r, contract_l))
    b_w, b_x = (batch_l, batch_r) if weight_is_lhs else (batch_r, batch_l)
    if (origin.mode == "exact" and origin.stack is None
        and weight.aval.ndim == 3 and tuple(b_w) == (0,) and len(c_w) == 1
        and len(c_x) == 1):
      return self._vmapped_dense(origin, weight, weight_is_lhs, c_w[0],
                                 c_x[0], b_x[0], here)
    if (origin.mode == "exact" and weight.aval.ndim >= 3 and not batch_l
        and not batch_r and len(c_w) < weight.aval.ndim):
      return self._general_dense(origin, weight, weight_is_lhs, tuple(c_w),
                                 tuple(c_x), here)
    ok = (origin.mode in ("exact", "transposed") and weight.aval.ndim == 2
          and len(c_w) == 1 and len(c_x) == 1 and not batch_l and not batch_r
          and x.aval.ndim >= 1)
    if not ok:
      self.uses[origin.leaf].append(
          ("`dot_general` that is not a dense layer (weight not 2-D, batch"
           " dimensions, or several contracting dimensions)", None))
      return True
    in_w = c_w[0]
    in_axis = in_w if origin.mode == "exact" else 1 - in_w
    self.uses[origin.leaf].append(("dense", here, origin.stack))
    self.candidates[here] = dict(
        kind="dense", kernel=origin.leaf, in_axis=in_axis,
        weight_is_lhs=weight_is_lhs, input_axis=c_x[0], conv=None, path=here,
        input_dim=weight.aval.shape[in_w],
        output_dim=weight.aval.shape[1 - in_w])
    return True

  def _general_dense(self, origin, weight, weight_is_lhs, c_w, c_x, here):
    """A kernel of rank ≥ 3 contracted over some of its axes (DenseGeneral).

    The contracted axes are the input side, the others the output side:
    the kernel is the matrix ``[prod(contracted), prod(others)]``.
    """
    shape = weight.aval.shape
    free = tuple(d for d in range(len(shape)) if d not in c_w)
    self.uses[origin.leaf].append(("dense", here, origin.stack, True))
    self.candidates[here] = dict(
        kind="dense", kernel=origin.leaf, in_axis=0,
        weight_is_lhs=weight_is_lhs, input_axis=c_x[-1], conv=None,
        path=here, input_dim=int(np.prod([shape[d] for d in c_w])),
        output_dim=int(np.prod([shape[d] for d in free])),
        kernel_axes=(c_w, free), input_axes=c_x)
    return True

  def _vmapped_dense(self, origin, weight, weight_is_lhs, c_w, c_x, b_x,
                     here):
    """A stack of dense layers applied by ``vmap`` (``nnx.vmap``)."""
    length = weight.aval.shape[0]
    in_w = c_w - 1
    self.uses[origin.leaf].append(("dense", here, (here, length)))
    self.candidates[here] = dict(
        kind="dense", kernel=origin.leaf, in_axis=in_w,
        weight_is_lhs=weight_is_lhs,
        input_axis=c_x - (1 if b_x < c_x else 0), conv=None, path=here,
        input_dim=weight.aval.shape[c_w],
        output_dim=weight.aval.shape[1 + (1 - in_w)], batch_axis=b_x)
    return True

  def _lookup(self, eqn, ins, here):
    """``E[indices]``: whole rows of a 2-D leaf gathered by integer indices."""
    if ins[0] is None or ins[1] is not None:
      return False
    origin = ins[0]
    operand, indices = eqn.invars
    out = eqn.outvars[0].aval
    dn = eqn.params["dimension_numbers"]
    ok = (origin.mode == "exact" and operand.aval.ndim == 2
          and tuple(dn.collapsed_slice_dims) == (0,)
          and tuple(dn.start_index_map) == (0,)
          and tuple(dn.offset_dims) == (out.ndim - 1,)
          and not tuple(getattr(dn, "operand_batching_dims", ()))
          and tuple(eqn.params["slice_sizes"]) == (1, operand.aval.shape[1])
          and indices.aval.shape[-1:] == (1,)
          and jnp.issubdtype(indices.aval.dtype, jnp.integer))
    if not ok:
      return False
    self.uses[origin.leaf].append(("lookup", here, origin.stack))
    self.candidates[here] = dict(
        kind="lookup", kernel=origin.leaf, in_axis=0, weight_is_lhs=False,
        input_axis=0, conv=None, path=here,
        input_dim=operand.aval.shape[0], output_dim=operand.aval.shape[1])
    return True

  def _conv(self, eqn, ins, here):
    p = eqn.params
    origin = ins[1]
    if ins[0] is not None or origin is None or origin.mode != "exact":
      for o in ins:
        if o is not None:
          self.uses[o.leaf].append(
              ("`conv_general_dilated` not as a plain kernel", None))
      return True
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
      self.uses[origin.leaf].append(
          ("grouped convolution (feature_group_count or batch_group_count"
           " > 1)", None))
      return True
    dn = p["dimension_numbers"]
    shape = eqn.invars[1].aval.shape
    out_dim = shape[dn.rhs_spec[0]]
    in_dim = int(np.prod([shape[d] for d in dn.rhs_spec[1:]]))
    self.uses[origin.leaf].append(("conv", here, origin.stack))
    self.candidates[here] = dict(
        kind="conv", kernel=origin.leaf, in_axis=0, weight_is_lhs=False,
        input_axis=0,
        conv=(tuple(p["window_strides"]), tuple(map(tuple, p["padding"])),
              tuple(p["lhs_dilation"]), tuple(p["rhs_dilation"]),
              tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec),
              tuple(shape[d] for d in dn.rhs_spec[2:])),
        path=here, input_dim=in_dim, output_dim=out_dim)
    return True

  def _bias(self, eqn, ins, lays, here):
    if len(eqn.invars) != 2:
      return False
    for k in (0, 1):
      lay, origin = lays[k], ins[1 - k]
      if lay is None or origin is None or ins[k] is not None:
        continue
      cand = self.candidates.get(lay)
      bias_var = eqn.invars[1 - k]
      if (cand is None or bias_var.aval.size != cand["output_dim"]
          or eqn.outvars[0].aval.shape != eqn.invars[k].aval.shape):
        continue
      self.uses[origin.leaf].append(("bias", here, origin.stack))
      self.bias_adds.append((lay, origin.leaf, origin.stack))
      return True
    return False


def _use_of(candidate) -> Use:
  return Use(candidate["kind"], candidate["path"], candidate["in_axis"],
             candidate["weight_is_lhs"], candidate["input_axis"],
             candidate["conv"], candidate["input_dim"],
             candidate["output_dim"], candidate.get("batch_axis"),
             candidate.get("kernel_axes"), candidate.get("input_axes"))


def _layer_reason(uses):
  """Why the uses of one leaf do not make a layer, or ``None`` if they do."""
  if len(uses) == 1 and uses[0][1] is None:
    return "used by " + uses[0][0]
  unfactored = sorted({u[0] for u in uses if u[1] is None or u[0] == "bias"})
  if unfactored:
    return (f"used {len(uses)} times (weight sharing), and not every use is"
            " a dense layer or a lookup: " + ", ".join(unfactored))
  kinds = [u[0] for u in uses]
  if "conv" in kinds and len(uses) > 1:
    return (f"used {len(uses)} times (weight sharing) as a convolution"
            " kernel: only dense uses and lookups can share a block")
  if len(uses) > 1 and any(len(u) > 3 and u[3] for u in uses):
    return (f"used {len(uses)} times (weight sharing) as a kernel of rank"
            " ≥ 3: only 2-D kernels can share a block")
  if len({u[2] for u in uses}) > 1:
    return ("used both inside and outside a `scan` stack (or in two stacks):"
            " its uses see different slices")
  return None


def discover_layers(
    predict_fn: Callable[[Any, Any], Any], params: Any, batch: Any
) -> Discovery:
  """Finds the dense, convolution and lookup layers of ``predict_fn``.

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
  closed = _trace(predict_fn, params, batch)
  leaves = jax.tree.leaves(params)
  walk = _Walk(len(leaves))
  origins = {v: _Origin(i, "exact")
             for i, v in enumerate(closed.jaxpr.invars[:len(leaves)])}
  walk.run(closed.jaxpr, origins, {}, ())
  kernels = {}  # first use path -> leaf
  reasons = {}
  for leaf, uses in walk.uses.items():
    if not uses:
      reasons[leaf] = "not used by predict_fn (or only through constants)"
      continue
    if len(uses) == 1 and uses[0][0] == "bias":
      continue
    reason = _layer_reason(uses)
    if reason is None:
      kernels[uses[0][1]] = leaf
    else:
      reasons[leaf] = reason
  biases = {}
  for lay, leaf, stack in walk.bias_adds:
    single = len(walk.uses[leaf]) == 1
    kernel = kernels.get(lay)
    fits = (kernel is not None and len(walk.uses[kernel]) == 1
            and walk.uses[kernel][0][2] == stack)
    raw_read_once = walk.output_reads.get(lay, 0) == 1
    if single and raw_read_once and fits:
      biases[lay] = leaf
    elif single:
      reasons[leaf] = ("bias of a layer whose raw output is read elsewhere,"
                       " whose kernel is used several times, or whose kernel"
                       " is not a K-FAC layer")
  layers = []
  for lay in sorted(kernels):
    leaf = kernels[lay]
    uses = tuple(_use_of(walk.candidates[u[1]]) for u in walk.uses[leaf])
    stack = walk.uses[leaf][0][2]
    first = {k: v for k, v in walk.candidates[lay].items()
             if k != "batch_axis"}
    vmapped = walk.candidates[lay].get("batch_axis") is not None
    layers.append(Layer(bias=biases.get(lay), **first,
                        uses=uses if len(uses) > 1 or vmapped else (),
                        stack=0 if stack is None else stack[1]))
  return Discovery(tuple(layers), reasons)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _trace(predict_fn, params, batch):
  return jax.make_jaxpr(predict_fn)(_abstract(params), _abstract(batch))


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
) -> Callable[[tuple], tuple]:
  """``perturbations ↦ (outputs, use inputs)`` for the given layers.

  The returned function evaluates ``predict_fn(params, batch)`` with
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
    ``(fn, zeros)``: the function, and the zero perturbations.
  """
  closed, out_shape = jax.make_jaxpr(predict_fn, return_shape=True)(
      _abstract(params), _abstract(batch))
  uses = _all_uses(layers)
  taps = {use.path: (k, use) for k, (_, use) in enumerate(uses)}
  shapes = _raw_output_shapes(closed.jaxpr, taps)
  zeros = tuple(jnp.zeros(s, d) for s, d in shapes)
  args = jax.tree.leaves((params, batch))

  def fn(perturbations):
    record = [None] * len(uses)
    flat = _evaluate(closed.jaxpr, closed.consts, args, taps, (), record,
                     perturbations)
    return jax.tree.unflatten(jax.tree.structure(out_shape), flat), tuple(
        record)

  return fn, zeros


def _raw_output_shapes(jaxpr, taps):
  shapes = [None] * len(taps)

  def visit(jaxpr, path, lead):
    for i, eqn in enumerate(jaxpr.eqns):
      here = path + (i,)
      if here in taps:
        aval = eqn.outvars[0].aval
        shapes[taps[here][0]] = (lead + tuple(aval.shape), aval.dtype)
      inner = _inner_jaxpr(eqn)
      if inner is not None:
        visit(inner[0], here, lead)
      elif eqn.primitive.name == "scan":
        visit(_scan_parts(eqn)[0], here, lead + (eqn.params["length"],))

  visit(jaxpr, (), ())
  return shapes


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
    (strides, padding, lhs_dil, rhs_dil, lhs_spec, _, out_spec,
     filter_shape) = layer.conv
    spatial = len(lhs_spec) - 2
    patches = lax.conv_general_dilated_patches(
        inputs, filter_shape, strides, padding, lhs_dilation=lhs_dil,
        rhs_dilation=rhs_dil,
        dimension_numbers=lax.ConvDimensionNumbers(
            lhs_spec, tuple(range(spatial + 2)), out_spec),
        precision=lax.Precision.HIGHEST)
    patches = jnp.moveaxis(patches, out_spec[1], -1)
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
    feature = layer.conv[6][1]
  elif layer.kind == "dense" and layer.weight_is_lhs:
    feature = 0
  else:
    feature = grads.ndim - 1
  moved = jnp.moveaxis(grads, feature, -1)
  return moved.reshape(-1, moved.shape[-1])
