"""Automatic layer discovery and per-layer statistics taps for K-FAC.

No registration by the user. :func:`discover_layers` traces
``predict_fn(params, batch)`` to a jaxpr (``jax.make_jaxpr``) and walks it,
following every parameter leaf through *structural* operations only
(``convert_element_type``, ``copy``, a 2-D ``transpose``, and, for biases,
``reshape``/``broadcast_in_dim``/``squeeze``/``expand_dims``) and into nested
``jit``/``closed_call``/``checkpoint`` calls. A parameter leaf is

* a **dense kernel** when its only use is as the 2-D weight operand of a
  ``dot_general`` with one contracting dimension and no batch dimensions,
  whose other operand is not a parameter (Flax ``nn.Dense``/``nnx.Linear``,
  ``x @ w``, ``jnp.dot``, ``einsum('...i,io->...o')``);
* a **conv kernel** when its only use is as the right-hand side of a
  ``conv_general_dilated`` with ``feature_group_count == batch_group_count ==
  1`` (Flax ``nn.Conv``/``nnx.Conv``, ``lax.conv_general_dilated``);
* a **bias** when it is 1-D, of the layer's output size, and its only use is an
  ``add`` to the layer's raw output (which nothing else reads).

Every other leaf (embeddings, layer-norm scales, weights used twice, weights
used inside ``scan``/``while``/``custom_jvp`` bodies, products of two
parameters, grouped convolutions...) is reported with the reason it was not
matched; K-FAC gives it a diagonal block.

:func:`tapped_forward` then evaluates the *same* jaxpr with a small
interpreter (the ``eval_jaxpr`` loop of JAX, with jit-like calls inlined) that

* records the input operand of every discovered layer (the activations ``a``,
  or the image patches of a convolution), and
* adds a zero *perturbation* to the layer's raw output; the gradient of the
  per-example loss with respect to that perturbation is the back-propagated
  output gradient ``g`` of K-FAC.

This is the "tap" approach: it works for any model that JAX can trace, with
no pattern matcher and no change to the user's code.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

Array = jax.Array

_CALL_PRIMITIVES = ("jit", "pjit", "closed_call", "core_call", "checkpoint",
                    "remat", "remat2")
_IDENTITY_OPS = ("convert_element_type", "copy", "copy_p", "reduce_precision")
_BROADCAST_OPS = ("reshape", "broadcast_in_dim", "squeeze", "expand_dims")


class Layer(NamedTuple):
  """A discovered layer.

  Attributes:
    kind: ``"dense"`` or ``"conv"``.
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


def _is_var(v) -> bool:
  return not isinstance(v, jex_core.Literal)


class _Walk:
  """Symbolic walk of a jaxpr: origins of parameter-derived values and uses."""

  def __init__(self, num_params):
    self.uses = {i: [] for i in range(num_params)}  # leaf -> [(desc, info)]
    self.candidates = {}  # path -> partial layer dict
    self.bias_adds = []  # (layer path, bias leaf, add path)
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
        sub_l = {iv: l for iv, l in zip(inner_jaxpr.invars, lays) if l}
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
      if not derived:
        continue
      name = eqn.primitive.name
      if name in _IDENTITY_OPS and len(eqn.invars) == 1:
        env_o[eqn.outvars[0]] = ins[0]
        continue
      if name == "transpose" and len(eqn.invars) == 1:
        origin = ins[0]
        if origin.mode in ("exact", "transposed") and eqn.invars[0].aval.ndim == 2:
          mode = "transposed" if origin.mode == "exact" else "exact"
          env_o[eqn.outvars[0]] = _Origin(origin.leaf, mode)
          continue
      if name in _BROADCAST_OPS and len(derived) == 1:
        env_o[eqn.outvars[0]] = _Origin(ins[0].leaf, "broadcast")
        continue
      if name == "dot_general" and self._dense(eqn, ins, here):
        env_l[eqn.outvars[0]] = here
        continue
      if name == "conv_general_dilated" and self._conv(eqn, ins, here):
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
    self.uses[origin.leaf].append(("dense", here))
    self.candidates[here] = dict(
        kind="dense", kernel=origin.leaf, in_axis=in_axis,
        weight_is_lhs=weight_is_lhs, input_axis=c_x[0], conv=None, path=here,
        input_dim=weight.aval.shape[in_w],
        output_dim=weight.aval.shape[1 - in_w])
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
    self.uses[origin.leaf].append(("conv", here))
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
      self.uses[origin.leaf].append(("bias", here))
      self.bias_adds.append((lay, origin.leaf, bias_var.aval.shape))
      return True
    return False


def discover_layers(
    predict_fn: Callable[[Any, Any], Any], params: Any, batch: Any
) -> Discovery:
  """Finds the dense and convolution layers of ``predict_fn`` and their biases.

  Args:
    predict_fn: ``(params, batch) -> outputs``.
    params: the parameters (arrays, tracers or ``jax.ShapeDtypeStruct``).
    batch: a batch of the shapes that will be used.

  Returns:
    A :class:`Discovery`: the layers and, for every other parameter leaf, the
    reason it was not matched.

  Example:
    >>> found = discover_layers(model.apply, variables, batch)
    >>> [layer.kind for layer in found.layers]
    ['dense', 'dense']
  """
  closed = _trace(predict_fn, params, batch)
  leaves = jax.tree.leaves(params)
  walk = _Walk(len(leaves))
  origins = {v: _Origin(i, "exact")
             for i, v in enumerate(closed.jaxpr.invars[:len(leaves)])}
  walk.run(closed.jaxpr, origins, {}, ())
  kernels = {}
  reasons = {}
  for leaf, uses in walk.uses.items():
    if not uses:
      reasons[leaf] = "not used by predict_fn (or only through constants)"
    elif len(uses) > 1:
      reasons[leaf] = (f"used {len(uses)} times (weight sharing): "
                       + ", ".join(sorted({d for d, _ in uses})))
    elif uses[0][1] is None:
      reasons[leaf] = "used by " + uses[0][0]
    elif uses[0][0] in ("dense", "conv"):
      kernels[uses[0][1]] = leaf
  biases = {}
  for lay, leaf, _ in walk.bias_adds:
    single = len(walk.uses[leaf]) == 1
    raw_read_once = walk.output_reads.get(lay, 0) == 1
    if single and raw_read_once and lay in kernels:
      biases[lay] = leaf
    elif single:
      reasons[leaf] = ("bias of a layer whose raw output is read elsewhere or"
                       " whose kernel is not a K-FAC layer")
  layers = []
  for lay in sorted(kernels):
    layers.append(Layer(bias=biases.get(lay), **walk.candidates[lay]))
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
    if inner is not None and any(t[:len(here)] == here for t in taps):
      outs = _evaluate(inner[0], inner[1], invals, taps, here, record,
                       perturbations)
    else:
      outs = _bind(eqn, invals)
    if here in taps:
      index, layer = taps[here]
      record[index] = invals[0 if (layer.kind == "conv"
                                   or not layer.weight_is_lhs) else 1]
      outs = [outs[0] + perturbations[index].astype(outs[0].dtype)]
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def tapped_forward(
    predict_fn: Callable[[Any, Any], Any],
    layers: tuple,
    params: Any,
    batch: Any,
) -> Callable[[tuple], tuple]:
  """``perturbations ↦ (outputs, layer inputs)`` for the given layers.

  The returned function evaluates ``predict_fn(params, batch)`` with
  ``perturbations[k]`` (zeros of the shape of layer ``k``'s raw output) added
  to layer ``k``'s output, and also returns every layer's input operand. Its
  VJP with respect to the perturbations gives K-FAC's output gradients.

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
  taps = {layer.path: (k, layer) for k, layer in enumerate(layers)}
  shapes = _raw_output_shapes(closed.jaxpr, taps)
  zeros = tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)
  args = jax.tree.leaves((params, batch))

  def fn(perturbations):
    record = [None] * len(layers)
    flat = _evaluate(closed.jaxpr, closed.consts, args, taps, (), record,
                     perturbations)
    return jax.tree.unflatten(jax.tree.structure(out_shape), flat), tuple(
        record)

  return fn, zeros


def _raw_output_shapes(jaxpr, taps):
  shapes = [None] * len(taps)

  def visit(jaxpr, path):
    for i, eqn in enumerate(jaxpr.eqns):
      here = path + (i,)
      if here in taps:
        shapes[taps[here][0]] = eqn.outvars[0].aval
      inner = _inner_jaxpr(eqn)
      if inner is not None:
        visit(inner[0], here)

  visit(jaxpr, ())
  return shapes


# Statistics -----------------------------------------------------------------


def layer_inputs(layer: Layer, inputs: Array) -> Array:
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
  moved = jnp.moveaxis(inputs, layer.input_axis, -1)
  return moved.reshape(-1, moved.shape[-1])


def layer_output_grads(layer: Layer, grads: Array) -> Array:
  """Output gradients as rows ``[positions, output_dim]``."""
  if layer.kind == "conv":
    feature = layer.conv[6][1]
  elif layer.weight_is_lhs:
    feature = 0
  else:
    feature = grads.ndim - 1
  moved = jnp.moveaxis(grads, feature, -1)
  return moved.reshape(-1, moved.shape[-1])
