"""Tests for curvature._grafting."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature
from helpers import classification_problem
from helpers import flat
from helpers import mlp_predict
from helpers import train_steps

CE = curvature.losses.softmax_cross_entropy


def _gradients(num_steps, key=0):
  keys = jax.random.split(jax.random.key(key), num_steps)
  return [{"w": jax.random.normal(k, (3, 4), jnp.float64),
           "b": 0.1 * jax.random.normal(jax.random.fold_in(k, 1), (4,),
                                        jnp.float64)} for k in keys]


def test_each_leaf_takes_the_direction_at_the_magnitude_norm():
  # Oracle: the two transforms run by hand, then d·‖m‖/‖d‖ per leaf.
  magnitude, direction = optax.scale_by_adam(b1=0.0), optax.scale_by_rms()
  graft = curvature.scale_by_graft(magnitude, direction)
  params = {"w": jnp.zeros((3, 4), jnp.float64), "b": jnp.zeros(4, jnp.float64)}
  state = graft.init(params)
  m_state, d_state = magnitude.init(params), direction.init(params)
  for grads in _gradients(5):
    out, state = graft.update(grads, state, params)
    m, m_state = magnitude.update(grads, m_state, params)
    d, d_state = direction.update(grads, d_state, params)
    for name in params:
      want = d[name] * np.linalg.norm(m[name]) / np.linalg.norm(d[name])
      np.testing.assert_allclose(out[name], want, rtol=1e-12)
      assert not np.allclose(out[name], m[name])  # not just the magnitude
  assert int(state.rejected_steps) == 0


def test_grafting_a_transform_onto_itself_is_the_transform():
  adam = optax.scale_by_adam()
  graft = curvature.scale_by_graft(adam, adam)
  params = {"w": jnp.zeros((3, 4), jnp.float64), "b": jnp.zeros(4, jnp.float64)}
  state, reference_state = graft.init(params), adam.init(params)
  for grads in _gradients(4, key=1):
    out, state = graft.update(grads, state, params)
    want, reference_state = adam.update(grads, reference_state, params)
    np.testing.assert_allclose(flat(out), flat(want), rtol=1e-12)


def test_kfac_direction_at_adam_step_sizes_passes_the_batch():
  params, batch = classification_problem(n=16, sizes=(4, 5, 3))
  kfac = curvature.scale_by_kfac(mlp_predict, CE, initial_damping=0.1)
  adam = optax.scale_by_adam(b1=0.0)
  graft = curvature.scale_by_graft(adam, kfac)
  loss_fn = lambda p: CE.value(mlp_predict(p, batch), batch["targets"])
  grads = jax.grad(loss_fn)(params)
  out, state = jax.jit(graft.update)(grads, graft.init(params), params,
                                     batch=batch)
  d, _ = kfac.update(grads, kfac.init(params), params, batch=batch)
  m, _ = adam.update(grads, adam.init(params), params)
  for o, dl, ml in zip(jax.tree.leaves(out), jax.tree.leaves(d),
                       jax.tree.leaves(m)):
    np.testing.assert_allclose(np.linalg.norm(o), np.linalg.norm(ml),
                               rtol=1e-6)
    cosine = np.vdot(o, dl) / (np.linalg.norm(o) * np.linalg.norm(dl))
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-6)
  assert int(state.direction.count) == 1

  # A chained, grafted K-FAC trains the small model.
  opt = optax.chain(graft, optax.scale_by_learning_rate(0.05))
  trained, _ = train_steps(opt, params, batch, CE, steps=30)
  assert loss_fn(trained) < 0.5 * loss_fn(params)


def test_a_zero_direction_leaf_gives_a_zero_update():
  graft = curvature.scale_by_graft(optax.identity(), optax.identity())
  params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
  grads = {"w": jnp.array([1.0, 2.0, 2.0]), "b": jnp.zeros(2)}
  out, _ = graft.update(grads, graft.init(params), params)
  np.testing.assert_array_equal(out["b"], 0.0)
  np.testing.assert_allclose(out["w"], grads["w"])


def test_non_finite_steps_are_rejected_and_the_states_kept():
  graft = curvature.scale_by_graft(optax.scale_by_adam(b1=0.0),
                                   optax.scale_by_rms())
  params = {"w": jnp.zeros((3, 4), jnp.float64), "b": jnp.zeros(4, jnp.float64)}
  grads = _gradients(1)[0]
  _, state = graft.update(grads, graft.init(params), params)
  bad = dict(grads, b=grads["b"].at[0].set(jnp.nan))
  out, new_state = jax.jit(graft.update)(bad, state, params)
  assert np.all(flat(out) == 0)
  assert int(new_state.rejected_steps) == 1
  for old, new in zip(jax.tree.leaves((state.magnitude, state.direction)),
                      jax.tree.leaves((new_state.magnitude,
                                       new_state.direction))):
    np.testing.assert_array_equal(old, new)


def test_bad_input():
  with pytest.raises(TypeError, match="magnitude=optax.scale_by_adam"):
    curvature.scale_by_graft(optax.adam, optax.identity())
  with pytest.raises(TypeError, match="`direction` must be"):
    curvature.scale_by_graft(optax.identity(), "kfac")


def test_kfac_alias_graft_is_the_graft_chain():
  params, batch = classification_problem(n=16, sizes=(4, 5, 3))
  grads = jax.grad(lambda p: CE.value(mlp_predict(p, batch),
                                      batch["targets"]))(params)
  adam = optax.scale_by_adam(b1=0.0)
  opt = curvature.kfac(0.1, predict_fn=mlp_predict, loss=CE, momentum=0.9,
                       initial_damping=0.1, graft=adam)
  want = optax.chain(
      curvature.scale_by_graft(adam, curvature.scale_by_kfac(
          mlp_predict, CE, initial_damping=0.1)),
      curvature.scale_by_momentum(0.9), optax.scale_by_learning_rate(0.1))
  state, want_state = opt.init(params), want.init(params)
  for _ in range(3):
    out, state = opt.update(grads, state, params, batch=batch)
    expected, want_state = want.update(grads, want_state, params, batch=batch)
    np.testing.assert_allclose(flat(out), flat(expected), rtol=1e-10)
  with pytest.raises(TypeError, match="graft=optax.scale_by_adam"):
    curvature.kfac(0.1, predict_fn=mlp_predict, loss=CE, graft=optax.adam)
  with pytest.raises(ValueError, match="Drop graft"):
    curvature.kfac(1.0, predict_fn=mlp_predict, loss=CE, adaptive=True,
                   graft=adam)
