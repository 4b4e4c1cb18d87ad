"""Layer discovery on linen, nnx, CNN and plain-JAX models; taps."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import curvature
from curvature import _layers
from curvature import losses
import helpers
from helpers import classification_problem
from helpers import mlp_predict


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(5)(x))
    return nn.Dense(3)(x)


class LinenCNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.Conv(2, (2, 2), strides=(2, 2), padding="VALID")(x)
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.a = nnx.Linear(4, 5, rngs=rngs)
    self.b = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    return self.b(jax.nn.sigmoid(self.a(x)))


def _kinds(found, params):
  paths = curvature._kfac.leaf_paths(params)
  return {paths[l.kernel]: (l.kind, None if l.bias is None else paths[l.bias])
          for l in found.layers}


def test_plain_jax_mlp():
  params, batch = classification_problem(n=5, sizes=(4, 5, 3))
  found = curvature.discover_layers(mlp_predict, params, batch)
  assert _kinds(found, params) == {"0/w": ("dense", "0/b"),
                                   "1/w": ("dense", "1/b")}
  assert not found.reasons


def test_linen_mlp_and_cnn():
  x = jnp.ones((2, 4))
  variables = LinenMLP().init(jax.random.key(0), x)
  found = _layers.discover_layers(LinenMLP().apply, variables, x)
  assert _kinds(found, variables) == {
      "params/Dense_0/kernel": ("dense", "params/Dense_0/bias"),
      "params/Dense_1/kernel": ("dense", "params/Dense_1/bias")}
  images = jnp.ones((2, 6, 6, 3))
  variables = LinenCNN().init(jax.random.key(0), images)
  found = _layers.discover_layers(LinenCNN().apply, variables, images)
  kinds = _kinds(found, variables)
  assert kinds["params/Conv_0/kernel"] == ("conv", "params/Conv_0/bias")
  assert kinds["params/Conv_1/kernel"] == ("conv", "params/Conv_1/bias")
  assert kinds["params/Dense_0/kernel"][0] == "dense"


def test_nnx_mlp():
  graphdef, state = nnx.split(NnxMLP(nnx.Rngs(0)))
  predict = lambda s, x: nnx.merge(graphdef, s)(x)
  found = _layers.discover_layers(predict, state, jnp.ones((2, 4)))
  assert len(found.layers) == 2
  assert all(l.bias is not None for l in found.layers)


def test_shared_transposed_and_unused_weights():
  def predict(p, x):
    h = jnp.tanh(x @ p["w"] + p["b"])  # w is used twice: tied weights.
    return h @ p["w"].T @ p["v"].T + p["scale"] * 0 + jnp.sum(p["w"])

  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3), "v": jnp.ones((2, 4)),
            "scale": jnp.ones(()), "unused": jnp.ones(2)}
  found = _layers.discover_layers(predict, params, jnp.ones((5, 4)))
  paths = curvature._kfac.leaf_paths(params)
  reasons = {paths[i]: r for i, r in found.reasons.items()}
  assert "used 3 times" in reasons["w"]
  assert "not used" in reasons["unused"]
  (layer,) = found.layers  # v, contracted on its axis 1: x @ v.T.
  assert paths[layer.kernel] == "v" and layer.in_axis == 1


def test_taps_record_inputs_and_output_gradients():
  params, batch = classification_problem(n=5, sizes=(4, 5, 3))
  found = _layers.discover_layers(mlp_predict, params, batch)
  fn, zeros = _layers.tapped_forward(mlp_predict, found.layers, params, batch)
  outputs, vjp_fn, inputs = jax.vjp(fn, zeros, has_aux=True)
  np.testing.assert_allclose(outputs, mlp_predict(params, batch))
  np.testing.assert_allclose(inputs[0], batch["inputs"])
  hidden = jnp.tanh(batch["inputs"] @ params[0]["w"] + params[0]["b"])
  np.testing.assert_allclose(inputs[1], hidden)
  loss = losses.softmax_cross_entropy
  cot = losses.output_gradients(loss, outputs, batch["targets"])
  (grads,) = vjp_fn(cot)
  # ∂(Σᵢ ℓᵢ)/∂s₂ is the output gradient itself; ∂/∂s₁ goes through tanh.
  np.testing.assert_allclose(grads[1], cot)
  expected = (cot @ params[1]["w"].T) * (1 - hidden ** 2)
  np.testing.assert_allclose(grads[0], expected, rtol=1e-12)


# Nested jit, remat and scan paths of the discovery and the taps -------------


def _check_taps(predict, params, batch, expected_inputs):
  """Taps record ``expected_inputs`` and output gradients equal to the
  gradients with respect to an explicit perturbation of each raw output."""
  found = _layers.discover_layers(predict, params, batch)
  fn, zeros = _layers.tapped_forward(predict, found.layers, params, batch)
  outputs, vjp_fn, inputs = jax.vjp(fn, zeros, has_aux=True)
  np.testing.assert_allclose(outputs, predict(params, batch), rtol=1e-12)
  for got, want in zip(inputs, expected_inputs):
    np.testing.assert_allclose(got, want, rtol=1e-12)
  cot = jnp.cos(outputs)
  (grads,) = vjp_fn(cot)
  # The taps are zero perturbations: the gradient with respect to them
  # integrates to the gradient with respect to the kernels.
  kernel_grads = jax.grad(lambda p: jnp.vdot(predict(p, batch), cot))(params)
  leaves = jax.tree.leaves(kernel_grads)
  for layer, x, g in zip(found.layers, inputs, grads):
    if layer.stack:
      got = jnp.einsum("l...i,l...o->lio", x, g)
    else:
      got = jnp.einsum("...i,...o->io", x, g)
    np.testing.assert_allclose(got, leaves[layer.kernel], rtol=1e-10)
  return found


def test_nested_jit_and_remat_are_followed():
  params, batch = classification_problem(n=4, sizes=(4, 5, 3))

  @jax.jit
  def inner(w, b, x):
    return jnp.tanh(x @ w + b)

  def predict(p, b):
    h = jax.checkpoint(inner)(p[0]["w"], p[0]["b"], b["inputs"])
    return jax.jit(lambda h: h @ p[1]["w"] + p[1]["b"])(h)

  hidden = jnp.tanh(batch["inputs"] @ params[0]["w"] + params[0]["b"])
  found = _check_taps(predict, params, batch, [batch["inputs"], hidden])
  assert [l.bias is not None for l in found.layers] == [True, True]
  assert not found.reasons


def test_scan_stacks_are_followed_and_tapped_per_layer():
  params, batch = classification_problem(n=4, sizes=(3, 3, 3, 3))
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *params)

  def predict(p, b):
    def body(h, layer):
      return jax.checkpoint(lambda h: jnp.tanh(h @ layer["w"] + layer["b"]))(
          h), None
    return jax.lax.scan(body, b["inputs"], p)[0] @ jnp.ones((3, 2))

  hs = [batch["inputs"]]
  for layer in params[:-1]:
    hs.append(jnp.tanh(hs[-1] @ layer["w"] + layer["b"]))
  found = _check_taps(predict, stacked, batch, [jnp.stack(hs)])
  (layer,) = found.layers
  assert layer.stack == 3 and layer.bias is not None


def test_scan_constants_and_carries_are_reported_not_factored():
  w = jnp.eye(3) * 0.5

  def predict(p, b):  # an RNN: the weight is a loop constant.
    return jax.lax.scan(lambda h, x: (jnp.tanh(h @ p["w"] + x), None),
                        b["inputs"][:, 0], jnp.moveaxis(b["inputs"], 1, 0))[0]

  found = _layers.discover_layers(predict, {"w": w}, {"inputs": jnp.ones((2, 4, 3))})
  assert not found.layers and "loop constant" in found.reasons[0]


class _FlatTreeOfGroups:
  """Stands in for jax 0.11's ``ft_in``: ``update(leaves).unpack()`` splits
  the scan's flat inputs into (loop constants, carry, xs), as seen on jax
  0.11.2 (``jax._src.lax.control_flow.loops._scan_impl``)."""

  def __init__(self, sizes):
    self.sizes = sizes

  def update(self, leaves):
    assert len(leaves) == sum(self.sizes)
    cuts = np.cumsum((0,) + self.sizes)
    return types.SimpleNamespace(unpack=lambda: tuple(
        iter(leaves[a:b]) for a, b in zip(cuts[:-1], cuts[1:])))


def test_scan_parts_reads_both_parameter_layouts_of_scan():
  def predict(p, b):  # 1 loop constant, 1 carry, 1 xs.
    return jax.lax.scan(lambda h, x: (jnp.tanh(h @ p["w"] + x), h),
                        b[0], b)[0]

  closed = jax.make_jaxpr(predict)({"w": jnp.eye(3)}, jnp.ones((4, 3)))
  (eqn,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "scan"]
  body, _, num_consts, num_carry = _layers._scan_parts(eqn)
  assert (num_consts, num_carry) == (1, 1)
  assert len(body.invars) == len(eqn.invars) == 3
  # jax 0.11: an open body jaxpr and a flat tree of groups instead of counts.
  params = {k: v for k, v in eqn.params.items()
            if k not in ("num_consts", "num_carry")}
  params.update(jaxpr=body, ft_in=_FlatTreeOfGroups((1, 1, 1)))
  new_eqn = types.SimpleNamespace(params=params, invars=eqn.invars)
  new_body, consts, num_consts, num_carry = _layers._scan_parts(new_eqn)
  assert new_body is body and consts == ()
  assert (num_consts, num_carry) == (1, 1)
  params.update(ft_in=_FlatTreeOfGroups((0, 2, 1)))
  assert _layers._scan_parts(new_eqn)[2:] == (0, 2)


def test_tied_embedding_is_one_layer_with_two_uses():
  e = jax.random.normal(jax.random.key(0), (7, 3))
  tokens = jnp.array([[1, 2, 3], [4, 5, 6]])

  def predict(p, b):
    return jnp.tanh(p["e"][b["inputs"]]) @ p["e"].T

  found = _check_taps_lookup(predict, {"e": e}, {"inputs": tokens})
  (layer,) = found.layers
  assert [u.kind for u in layer.uses] == ["lookup", "dense"]
  assert not _layers.is_transposed(layer, layer.uses[0])
  assert _layers.is_transposed(layer, layer.uses[1])


def _check_taps_lookup(predict, params, batch):
  found = _layers.discover_layers(predict, params, batch)
  fn, zeros = _layers.tapped_forward(predict, found.layers, params, batch)
  outputs, inputs = fn(zeros)
  np.testing.assert_allclose(outputs, predict(params, batch), rtol=1e-12)
  np.testing.assert_array_equal(inputs[0][..., 0], batch["inputs"])
  return found


# Coverage on a small decoder-only transformer --------------------------------


def _coverage(predict, params, batch):
  rows = curvature.kfac_blocks(predict, params, batch, example_batch=batch)
  share = curvature._kfac.kronecker_share(rows) / sum(r.size for r in rows)
  diagonal = {r.path for r in rows if r.block == "diagonal"}
  return share, diagonal, rows


def _assert_transformer_coverage(predict, params, batch):
  share, diagonal, rows = _coverage(predict, params, batch)
  text = curvature.kfac_summary(predict, params, batch, example_batch=batch)
  assert share >= 0.95, text
  # Only layer norms and the position embedding stay diagonal.
  assert all("ln" in p.lower() or "layernorm" in p.lower() or "pos" in p
             for p in diagonal), text
  embed = [r for r in rows if "embed" in r.path.lower()]
  assert [r.block for r in embed] == ["lookup+dense.T x2"], text
  stacked = [r for r in rows if r.factors and r.reason]
  assert len(stacked) == 4 and all("2 stacked" in r.reason for r in stacked)
  return share


DIMS = dict(dim=16)


def test_plain_jax_transformer_coverage():
  params = helpers.transformer_params(**DIMS)
  batch = helpers.transformer_batch(**DIMS)
  _assert_transformer_coverage(helpers.transformer_predict, params, batch)


def test_linen_transformer_coverage():
  batch = helpers.transformer_batch(**DIMS)
  module, predict = helpers.linen_transformer(**DIMS)
  variables = module.init(jax.random.key(0), batch["inputs"])
  _assert_transformer_coverage(predict, variables, batch)


def test_nnx_transformer_coverage():
  batch = helpers.transformer_batch(**DIMS)
  state, predict = helpers.nnx_transformer(**DIMS)
  _assert_transformer_coverage(predict, state, batch)


def test_a_raw_output_leaving_a_scan_body_keeps_its_bias_out_of_the_block():
  params, batch = classification_problem(n=4, sizes=(3, 3, 3))
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *params)

  def predict(p, b):
    def body(h, layer):
      raw = h @ layer["w"]
      return jnp.tanh(raw + layer["b"]), raw  # raw is also a scan output.
    h, raws = jax.lax.scan(body, b["inputs"], p)
    return h + jnp.sum(raws, axis=0)

  found = _layers.discover_layers(predict, stacked, batch)
  (layer,) = found.layers
  assert layer.stack == 2 and layer.bias is None
  assert "read elsewhere" in found.reasons[0]


def test_flax_multi_head_attention_projections_are_dense_layers():
  # DenseGeneral kernels: [in, heads, head_dim] (query, key, value) and
  # [heads, head_dim, out] (out), with their [heads, head_dim] biases.
  x = jnp.ones((3, 5, 8))
  batch = {"inputs": x, "targets": jnp.zeros((3, 5, 8))}
  att = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8,
                               decode=False, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(att)
  nnx_predict = lambda s, b: nnx.merge(graphdef, s)(b["inputs"])
  linen = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
  variables = linen.init(jax.random.key(0), x)
  linen_predict = lambda v, b: linen.apply(v, b["inputs"])
  for predict, params in ((nnx_predict, state), (linen_predict, variables)):
    rows = curvature.kfac_blocks(predict, params, batch, example_batch=batch)
    kernels = [r for r in rows if "kernel" in r.path]
    assert len(kernels) == 4
    assert all(r.block == "dense" and r.factors == (9, 8) for r in kernels)
    assert all(r.block.startswith("bias of") for r in rows
               if "bias" in r.path)


# K-FAC factors of discovered layers against an explicit computation ---------

CE = losses.softmax_cross_entropy


def _kfac_step(predict, params, batch, **kwargs):
  """One jitted K-FAC update with the empirical Fisher and no averaging."""
  opt = curvature.scale_by_kfac(predict, CE, statistics="empirical_fisher",
                                decay=0.0, initial_damping=1e-2, **kwargs)
  grads = jax.grad(lambda p: CE.value(predict(p, batch),
                                      batch["targets"]))(params)
  return jax.jit(opt.update)(grads, opt.init(params), params, batch=batch)


def _explicit_factors(explicit, params, batch, biases):
  """``[(A, G)]``: ``A = E[ā āᵀ]`` (``ā = [a; 1]``), ``G = E[g gᵀ]``.

  ``biases``: whether each layer has a bias; without one, its homogeneous
  coordinate is 0 (``ā = [a; 0]``).

  ``explicit(params, inputs, eps)`` is the model written out by hand with
  ``eps[k]`` added to the raw output of layer ``k``; it returns the logits
  and the layers' inputs ``a``. ``g`` is the gradient of each example's
  cross-entropy with respect to its raw output (with respect to ``eps``).
  """
  x, targets = batch["inputs"], batch["targets"]
  n, num_layers = x.shape[0], len(biases)
  _, acts = explicit(params, x, [0.0] * num_layers)

  def total_loss(eps):
    logits, _ = explicit(params, x, eps)
    log_p = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.take_along_axis(log_p, targets[:, None], axis=1))

  eps = [jnp.zeros((n, out)) for out in _raw_sizes(explicit, params, x,
                                                   num_layers)]
  gs = jax.grad(total_loss)(eps)
  out = []
  for a, g, bias in zip(acts, gs, biases):
    a = jnp.concatenate([a, jnp.full((n, 1), float(bias), a.dtype)], axis=1)
    out.append((a.T @ a / n, g.T @ g / n))
  return out


def _raw_sizes(explicit, params, x, num_layers):
  """The width of each layer's raw output (the next input, or the logits)."""
  logits, acts = explicit(params, x, [0.0] * num_layers)
  return [a.shape[1] for a in acts[1:]] + [logits.shape[1]]


def _assert_factors(state, paths, want):
  for path, (a, g) in zip(paths, want):
    got = state.blocks[path].statistics
    np.testing.assert_allclose(got.a, a, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(got.g, g, rtol=1e-10, atol=1e-14)


@jax.custom_vjp
def _tanh_custom_vjp(x):
  return jnp.tanh(x)


_tanh_custom_vjp.defvjp(lambda x: (jnp.tanh(x), jnp.tanh(x)),
                        lambda t, g: (g * (1 - t ** 2),))

ACTIVATIONS = {"relu (custom_jvp)": jax.nn.relu, "gelu": jax.nn.gelu,
               "tanh (custom_vjp)": _tanh_custom_vjp}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_nested_jit_remat_and_custom_derivative_activations(name):
  # Both layers are inside jit-of-checkpoint-of-jit calls, and the hidden
  # activation is a custom_jvp / plain / custom_vjp function: the blocks
  # are the explicit E[ā āᵀ] and E[g gᵀ] of the model written out by hand.
  act = ACTIVATIONS[name]
  params, batch = classification_problem(n=6, sizes=(4, 5, 3))
  affine = jax.jit(lambda w, b, x: x @ w + b)
  remat = jax.checkpoint(affine,
                         policy=jax.checkpoint_policies.dots_saveable)

  def predict(p, b):
    hidden = jax.jit(jax.checkpoint(
        lambda x: act(jax.jit(affine)(p[0]["w"], p[0]["b"], x))))
    return jax.jit(remat)(p[1]["w"], p[1]["b"], hidden(b["inputs"]))

  def explicit(p, x, eps):
    h = act(x @ p[0]["w"] + p[0]["b"] + eps[0])
    return h @ p[1]["w"] + p[1]["b"] + eps[1], (x, h)

  found = _layers.discover_layers(predict, params, batch)
  assert [(layer.kind, layer.bias is not None) for layer in found.layers] == [
      ("dense", True), ("dense", True)]
  assert not found.reasons
  _, state = _kfac_step(predict, params, batch)
  _assert_factors(state, ("0/w", "1/w"),
                  _explicit_factors(explicit, params, batch, (True, True)))


def test_a_kernel_inside_a_custom_derivative_is_diagonal_with_the_reason():
  @jax.custom_vjp
  def layer(w, x):
    return x @ w

  layer.defvjp(lambda w, x: (x @ w, (w, x)),
               lambda res, g: (res[1].T @ g, g @ res[0].T))
  params, batch = classification_problem(n=6, sizes=(4, 5, 3))
  predict = lambda p, b: layer(p[1]["w"], jnp.tanh(
      b["inputs"] @ p[0]["w"] + p[0]["b"])) + p[1]["b"]
  rows = {r.path: r for r in curvature.kfac_blocks(predict, params, batch)}
  assert rows["0/w"].block == "dense"
  assert rows["1/w"].block == "diagonal"
  assert "custom derivative" in rows["1/w"].reason
  assert "custom_vjp_call" in curvature.kfac_summary(predict, params, batch)


def test_a_bias_read_twice_leaves_the_kernels_their_blocks_without_it():
  # b is the bias of both layers: it is not the homogeneous coordinate of
  # either block, so both kernels get a bias-free block (ā still ends in a
  # 1) and b gets a diagonal block with the reason.
  params, batch = classification_problem(n=6, sizes=(4, 3, 3))
  params = {"w0": params[0]["w"], "w1": params[1]["w"],
            "b": params[0]["b"]}

  def predict(p, b):
    return jnp.tanh(b["inputs"] @ p["w0"] + p["b"]) @ p["w1"] + p["b"]

  def explicit(p, x, eps):
    h = jnp.tanh(x @ p["w0"] + p["b"] + eps[0])
    return h @ p["w1"] + p["b"] + eps[1], (x, h)

  found = _layers.discover_layers(predict, params, batch)
  assert [layer.bias for layer in found.layers] == [None, None]
  rows = {r.path: r for r in curvature.kfac_blocks(predict, params, batch)}
  assert rows["b"].block == "diagonal"
  assert "used 2 times" in rows["b"].reason and "bias" in rows["b"].reason
  _, state = _kfac_step(predict, params, batch)
  _assert_factors(state, ("w0", "w1"),
                  _explicit_factors(explicit, params, batch, (False, False)))
  # A bias added and also read by something else: the same verdict.
  also_read = lambda p, b: predict(p, b) + jnp.sum(p["b"] ** 2)
  found = _layers.discover_layers(also_read, params, batch)
  assert [layer.bias for layer in found.layers] == [None, None]
  index = curvature._kfac.leaf_paths(params).index("b")
  assert "`integer_pow`" in found.reasons[index]


def test_a_kernel_reshaped_to_a_matrix_is_that_matrix_layer():
  # x @ w.reshape(6, 4) with w of shape (2, 3, 4), h @ v.reshape(4, 3),
  # and einsum('ni,oi->no', h, u.reshape(3, 4)): every block, and the
  # update, equals those of the model with the matrices as leaves.
  key = jax.random.key(7)
  keys = jax.random.split(key, 5)
  mats = {"w": jax.random.normal(keys[0], (6, 4)) / 3,
          "b": 0.1 * jax.random.normal(keys[1], (4,)),
          "v": jax.random.normal(keys[2], (4, 3)) / 2,
          "u": jax.random.normal(keys[3], (3, 4)) / 2}
  batch = {"inputs": jax.random.normal(keys[4], (6, 6)),
           "targets": jnp.arange(6) % 3}
  shaped = {"w": mats["w"].reshape(2, 3, 4), "b": mats["b"],
            "v": mats["v"].reshape(4, 1, 3), "u": mats["u"].reshape(3, 2, 2)}

  def plain(p, b):
    h = jnp.tanh(b["inputs"] @ p["w"] + p["b"])
    return h @ p["v"] + jnp.einsum("ni,oi->no", h, p["u"])

  def reshaped(p, b):
    return plain({"w": p["w"].reshape(6, 4), "b": p["b"],
                  "v": p["v"].reshape(4, 3), "u": p["u"].reshape(3, 4)}, b)

  found = _layers.discover_layers(reshaped, shaped, batch)
  assert not found.reasons
  assert [layer.kernel_axes for layer in found.layers] == [
      ((0, 1), (2,)), ((0,), (1, 2)), ((1, 2), (0,))]
  want_updates, want = _kfac_step(plain, mats, batch, example_batch=batch)
  got_updates, got = _kfac_step(reshaped, shaped, batch, example_batch=batch)
  for path in ("w", "v", "u"):
    for x, y in zip(got.blocks[path].statistics, want.blocks[path].statistics):
      np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-14)
  for path in shaped:
    np.testing.assert_allclose(got_updates[path].reshape(mats[path].shape),
                               want_updates[path], rtol=1e-8, atol=1e-12)


def test_reshapes_that_are_not_a_matrix_of_the_kernel_fall_back():
  # w.reshape(4, 6) of a (6, 4) leaf mixes its rows; z.reshape(6, 4) @ x.T
  # has the two leading axes of z on the output side, which come first.
  params = {"w": jnp.ones((6, 4)) / 6, "z": jnp.ones((2, 3, 4)) / 4}
  batch = {"inputs": jnp.ones((5, 4)), "targets": jnp.arange(5) % 3}

  def predict(p, b):
    h = b["inputs"] @ p["w"].reshape(4, 6)
    return h[:, :3] + (p["z"].reshape(6, 4) @ b["inputs"].T).T[:, :3]

  found = _layers.discover_layers(predict, params, batch)
  assert not found.layers
  assert all("reshaped kernel" in r for r in found.reasons.values())
  rows = curvature.kfac_blocks(predict, params, batch)
  assert [r.block for r in rows] == ["diagonal", "diagonal"]
  with pytest.raises(ValueError, match="Allowed kinds here: 'diagonal'"):
    curvature.kfac_blocks(predict, params, batch,
                          layer_overrides={"w": "dense"})


def test_an_unfactorable_use_gets_the_empirical_fisher_diagonal():
  # einsum('nij,ij->n', x, m) contracts both axes of m, a 3-D kernel
  # contracted over all its axes has no output side, and an einsum of two
  # parameters is not a layer: each is diagonal, with its reason printed,
  # and its block holds E[(∂ℓᵢ/∂θ)²]; the dense layer keeps its block.
  key = jax.random.key(8)
  k1, k2, k3, k4, k5 = jax.random.split(key, 5)
  params = {"m": jax.random.normal(k1, (3, 2)),
            "k": jax.random.normal(k2, (3, 2, 1)),
            "a": jax.random.normal(k3, (2, 3)), "c": jax.random.normal(
                k4, (2, 3)), "w": jax.random.normal(k5, (6, 3)) / 3}
  x = jax.random.normal(jax.random.fold_in(key, 1), (6, 3, 2))
  batch = {"inputs": x, "targets": jnp.arange(6) % 3}

  def predict(p, b):
    x = b["inputs"]
    logits = x.reshape(-1, 6) @ p["w"]
    extra = (jnp.einsum("nij,ij->n", x, p["m"])
             + jnp.einsum("nij,ijk->n", x, p["k"])
             + jnp.einsum("ij,ij->", p["a"], p["c"]))
    return logits + extra[:, None] * jnp.array([1.0, 0.0, -1.0])

  text = curvature.kfac_summary(predict, params, batch)
  assert "not a dense layer" in text and "two parameters" in text
  rows = {r.path: r for r in curvature.kfac_blocks(predict, params, batch)}
  assert rows["w"].block == "dense"
  assert all(rows[p].block == "diagonal" for p in ("m", "k", "a", "c"))
  updates, state = _kfac_step(predict, params, batch)
  assert np.all(np.isfinite(ravel_pytree(updates)[0]))
  per_example = jax.vmap(lambda xi, ti: jax.grad(lambda p: CE.value(
      predict(p, {"inputs": xi[None]}), ti[None]))(params))(
          x, batch["targets"])
  paths = curvature._kfac.leaf_paths(params)
  for path in ("m", "k", "a", "c"):
    want = jnp.mean(per_example[path] ** 2, axis=0)
    got = state.diagonal.statistics[paths.index(path)]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)


def test_overrides_that_the_use_does_not_admit_name_the_allowed_kinds():
  images = jnp.ones((2, 6, 6, 3))
  variables = LinenCNN().init(jax.random.key(0), images)
  predict = lambda v, b: LinenCNN().apply(v, b["inputs"])
  batch = {"inputs": images, "targets": jnp.zeros(2, jnp.int32)}
  with pytest.raises(ValueError, match="Allowed kinds here: 'conv', 'diag"):
    curvature.kfac_blocks(predict, variables, batch, layer_overrides={
        "params/Conv_0/kernel": "dense"})
  with pytest.raises(ValueError, match="'diagonal' \\(the only one"):
    curvature.kfac_blocks(predict, variables, batch, layer_overrides={
        "params/Conv_0/bias": "conv"})
  rows = curvature.kfac_blocks(predict, variables, batch, layer_overrides={
      "params/Conv_0/kernel": "diagonal"})
  assert {r.path: r.block for r in rows}["params/Conv_0/kernel"] == (
      "diagonal")


# Scan fallbacks -------------------------------------------------------------


def test_scan_fallbacks_are_diagonal_with_their_reasons():
  h0 = jnp.ones((4, 3)) / 3
  leaf = lambda *shape: jnp.ones(shape) / 3
  params = {"const": leaf(3, 3), "nested": leaf(2, 2, 3, 3),
            "reshaped": leaf(2, 9), "twice": leaf(2, 3, 3),
            "stack": leaf(2, 3, 3)}
  batch = {"inputs": h0}

  def step(h, w):
    return jnp.tanh(h @ w), None

  def predict(p, b):
    h = jax.lax.scan(lambda h, _: (jnp.tanh(h @ p["const"]), None),
                     b["inputs"], None, length=2)[0]
    h = jax.lax.scan(lambda h, ws: (jax.lax.scan(step, h, ws)[0], None),
                     h, p["nested"])[0]
    h = jax.lax.scan(step, h, p["reshaped"].reshape(2, 3, 3))[0]
    h = jax.lax.scan(step, h, p["twice"])[0]
    h = jax.lax.scan(step, h, p["twice"])[0]
    return jax.lax.scan(step, h, p["stack"])[0]

  found = _layers.discover_layers(predict, params, batch)
  paths = curvature._kfac.leaf_paths(params)
  reasons = {paths[i]: r for i, r in found.reasons.items()}
  assert "loop constant or carry" in reasons["const"]
  assert "nested `scan` stack" in reasons["nested"]
  assert "after a reshape or transpose" in reasons["reshaped"]
  assert "in two stacks" in reasons["twice"]
  (layer,) = found.layers
  assert paths[layer.kernel] == "stack" and layer.stack == 2
  text = curvature.kfac_summary(predict, params, batch)
  for reason in reasons.values():
    assert reason in text


# Caching of the discovery -----------------------------------------------------


def test_discovery_is_traced_once_per_function_and_shapes():
  params, batch = classification_problem(n=5, sizes=(4, 5, 3))
  traces = []

  def predict(p, b):
    traces.append(jax.tree.leaves(b)[0].shape)
    return mlp_predict(p, b)

  first = _layers.discover_layers(predict, params, batch)
  first.reasons[0] = "a caller's edit does not reach the cache"
  again = _layers.discover_layers(predict, params, batch)
  assert len(traces) == 1
  assert again.layers == first.layers and not again.reasons
  curvature.kfac_blocks(predict, params, batch)  # The same discovery.
  assert len(traces) == 1
  _, wider = classification_problem(n=9, sizes=(4, 5, 3))
  assert len(_layers.discover_layers(predict, params, wider).layers) == 2
  assert len(traces) == 2

  class Unhashable:
    __hash__ = None

    def __call__(self, p, b):
      traces.append(None)
      return mlp_predict(p, b)

  fn = Unhashable()
  for _ in range(2):
    found = _layers.discover_layers(fn, params, batch)
    assert found.layers == first.layers
  assert len(traces) == 4


def test_taps_refuse_layers_that_are_not_at_their_equations():
  # The taps check every use's equation (a layer list from another
  # program, or a predict_fn whose trace changed with the same shapes).
  params, batch = classification_problem(n=5, sizes=(4, 5, 3))
  found = _layers.discover_layers(mlp_predict, params, batch)
  assert [layer.path for layer in found.layers] == [(0,), (4,)]
  moved = (found.layers[0]._replace(path=(1,)),) + found.layers[1:]
  with pytest.raises(ValueError, match="another program"):
    _layers.tapped_forward(mlp_predict, moved, params, batch)
  missing = (found.layers[0]._replace(path=(99,)),)
  with pytest.raises(ValueError, match="another program"):
    _layers.tapped_forward(mlp_predict, missing, params, batch)


def test_discovery_cache_takes_typed_keys_and_python_scalars_in_the_batch():
  """Batch leaves without a numpy dtype (a typed PRNG key, a Python float)."""
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  batch = {"x": jnp.ones((4, 3)), "key": jax.random.key(0), "rate": 0.5}

  def predict(p, b):
    return b["x"] @ p["w"] + p["b"]

  found = _layers.discover_layers(predict, params, batch)
  assert found == _layers.discover_layers(predict, params, batch)
  assert len(found.layers) == 1
