"""The contract every public transform keeps.

Each transform runs inside one jitted train step, inside ``optax.chain`` with
``optax.clip_by_global_norm``, does not recompile on the second ``update``,
works under ``inject_hyperparams``, and keeps all of its state in the optax
state (``init(params)`` is enough).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature
from curvature import losses
from helpers import flat
from helpers import mlp_predict
from helpers import regression_problem

LOSS = losses.squared_error
MODEL = dict(predict_fn=mlp_predict, loss=LOSS)

# name -> (factory, keyword arguments). Every factory here takes the learning
# rate first, or is a scale_by_* transform that is chained with one.
TRANSFORMS = {
    "hessian_free": (curvature.hessian_free, dict(learning_rate=1.0, **MODEL)),
    "hessian_free_sampled_fisher": (
        curvature.hessian_free,
        dict(learning_rate=1.0, curvature="sampled_fisher", num_samples=2,
             **MODEL)),
    "hessian_free_kfac_preconditioned": (
        curvature.hessian_free,
        dict(learning_rate=1.0, preconditioner="kfac", preconditioner_every=2,
             **MODEL)),
    "hessian_free_structural": (
        curvature.hessian_free,
        dict(learning_rate=1.0, structural_damping=1 / 30,
             structural_fn=lambda p, b: jnp.tanh(
                 b["inputs"] @ p[0]["w"] + p[0]["b"]), **MODEL)),
    "gauss_newton": (curvature.gauss_newton,
                     dict(learning_rate=1.0, damping=0.1, **MODEL)),
    "levenberg_marquardt": (curvature.levenberg_marquardt,
                            dict(learning_rate=1.0, **MODEL)),
    "newton": (curvature.newton, dict(learning_rate=1.0, **MODEL)),
    "damped_newton": (curvature.damped_newton,
                      dict(learning_rate=1.0, **MODEL)),
    "scale_by_hessian_free": (
        curvature.scale_by_hessian_free,
        dict(predict_fn=mlp_predict, loss=LOSS, max_cg_iterations=20)),
    "monitor": (curvature.monitor,
                dict(inner=optax.sgd(0.1), predict_fn=mlp_predict, loss=LOSS,
                     every=2)),
    "sgd": (curvature.sgd, dict(learning_rate=0.1)),
    "sgd_momentum": (curvature.sgd, dict(learning_rate=0.1, momentum=0.9)),
    "heavy_ball": (curvature.heavy_ball, dict(learning_rate=0.1)),
    "nesterov": (curvature.nesterov, dict(learning_rate=0.1)),
    "adagrad": (curvature.adagrad, dict(learning_rate=0.1)),
    "rmsprop": (curvature.rmsprop, dict(learning_rate=0.01)),
    "rmsprop_nesterov": (curvature.rmsprop,
                         dict(learning_rate=0.01, momentum=0.9,
                              nesterov=True)),
    "adadelta": (curvature.adadelta, dict(learning_rate=1.0)),
    "adam": (curvature.adam, dict(learning_rate=0.01)),
    "adam_no_bias_correction": (curvature.adam,
                                dict(learning_rate=0.01,
                                     bias_correction=False)),
    "delta_bar_delta": (curvature.delta_bar_delta, dict(learning_rate=0.1)),
    "scale_by_momentum": (curvature.scale_by_momentum, dict(decay=0.9)),
    "scale_by_ema": (curvature.scale_by_ema, dict(decay=0.9)),
    "scale_by_adadelta": (curvature.scale_by_adadelta, dict(rho=0.9)),
    "scale_by_delta_bar_delta": (curvature.scale_by_delta_bar_delta, dict()),
    "polyak_averaging": (curvature.polyak_averaging, dict(decay=0.9)),
    "natural_gradient": (curvature.natural_gradient,
                         dict(learning_rate=0.5, max_cg_iterations=10,
                              **MODEL)),
    "natural_gradient_sampled": (
        curvature.natural_gradient,
        dict(learning_rate=0.5, fisher="sampled_fisher", num_samples=2,
             max_cg_iterations=10, **MODEL)),
    "scale_by_natural_gradient": (
        curvature.scale_by_natural_gradient,
        dict(predict_fn=mlp_predict, loss=LOSS, fisher="empirical_fisher")),
    "scale_by_curvature_diagonal": (
        curvature.scale_by_curvature_diagonal,
        dict(predict_fn=mlp_predict, loss=LOSS, damping=0.1)),
    "scale_by_curvature_diagonal_hutchinson": (
        curvature.scale_by_curvature_diagonal,
        dict(predict_fn=mlp_predict, loss=LOSS, estimator="hutchinson",
             num_samples=3, damping=1.0)),
    "kfac": (curvature.kfac,
             dict(learning_rate=0.01, inverse_every=2, **MODEL)),
    "kfac_adaptive": (curvature.kfac,
                      dict(learning_rate=1.0, adaptive=True, damping_every=2,
                           statistics_batch_size=8, **MODEL)),
    "scale_by_kfac": (curvature.scale_by_kfac,
                      dict(predict_fn=mlp_predict, loss=LOSS,
                           statistics="empirical_fisher",
                           initial_damping=0.1)),
    "scale_by_block_diagonal": (
        curvature.scale_by_block_diagonal,
        dict(predict_fn=mlp_predict, loss=LOSS, max_block_size=8,
             damping=0.1, inverse_every=2)),
    "ekfac": (curvature.ekfac,
              dict(learning_rate=0.01, inverse_every=2, **MODEL)),
    "ekfac_adaptive": (curvature.ekfac,
                       dict(learning_rate=1.0, adaptive=True, damping_every=2,
                            gamma_every=2, **MODEL)),
    "kfac_schedule_averaging": (
        curvature.kfac, dict(learning_rate=0.01, averaging="schedule",
                             **MODEL)),
    "shampoo": (curvature.shampoo, dict(learning_rate=0.01, inverse_every=2)),
    "scale_by_shampoo": (curvature.scale_by_shampoo,
                         dict(inverse_every=2, statistics_decay=0.9,
                              graft=optax.scale_by_adam(b1=0.0))),
    "soap": (curvature.soap, dict(learning_rate=0.01, inverse_every=2,
                                  weight_decay=1e-4)),
    "scale_by_soap": (curvature.scale_by_soap, dict(inverse_every=2)),
    "block_diagonal_natural_gradient": (
        curvature.block_diagonal_natural_gradient,
        dict(learning_rate=0.01, curvature="sampled_fisher",
             grouping="layer", max_block_size=12, **MODEL)),
    "lbfgs": (curvature.lbfgs, dict(learning_rate=1.0, memory_size=3,
                                    **MODEL)),
    "bfgs": (curvature.bfgs, dict(learning_rate=1.0, **MODEL)),
    "nonlinear_cg": (curvature.nonlinear_cg,
                     dict(learning_rate=1.0, beta="hestenes_stiefel",
                          restart_every=2, **MODEL)),
    "saddle_free_newton": (curvature.saddle_free_newton,
                           dict(learning_rate=1.0, num_iterations=6,
                                damping=0.1, **MODEL)),
}


def _problem():
  params, batch = regression_problem(n=16, sizes=(3, 6, 2), dtype=jnp.float32)
  return params, batch


def _loss(params, batch):
  return LOSS.value(mlp_predict(params, batch), batch["targets"])


def _train_step(opt):
  traces = []

  @jax.jit
  def step(params, state, batch):
    traces.append(1)
    value, grads = jax.value_and_grad(_loss)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch, value=value)
    return optax.apply_updates(params, updates), state, value

  return step, traces


def _with_learning_rate(name, transform):
  if name.startswith("scale_by") or name == "polyak_averaging":
    return optax.chain(transform, optax.scale_by_learning_rate(0.01))
  return transform


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_jit_chain_and_no_recompilation(name):
  factory, kwargs = TRANSFORMS[name]
  opt = optax.chain(optax.clip_by_global_norm(10.0),
                    _with_learning_rate(name, factory(**kwargs)))
  params, batch = _problem()
  state = opt.init(params)  # init(params) is enough.
  step, traces = _train_step(opt)
  values = []
  for k in range(3):
    shifted = dict(batch, inputs=batch["inputs"] + 0.01 * k)
    params, state, value = step(params, state, shifted)
    values.append(float(value))
  assert len(traces) == 1, "the second update recompiled"
  assert np.all(np.isfinite(flat(params)))
  assert all(jnp.dtype(x.dtype) == jnp.float32 for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_inject_hyperparams(name):
  factory, kwargs = TRANSFORMS[name]
  injected = curvature.inject_hyperparams(factory)(**kwargs)
  opt = optax.chain(_with_learning_rate(name, injected))
  params, batch = _problem()
  state = opt.init(params)
  inject_states = [
      s for s in jax.tree.leaves(
          state, is_leaf=lambda x: hasattr(x, "hyperparams"))
      if hasattr(s, "hyperparams")]
  hyperparams = inject_states[0].hyperparams
  step, traces = _train_step(opt)
  params1, state1, _ = step(params, state, batch)
  params2, _, _ = step(params1, state1, batch)
  assert len(traces) == 1
  assert np.all(np.isfinite(flat(params2)))
  assert hyperparams  # At least one numeric hyperparameter is injected.


@pytest.mark.parametrize("name", [n for n in sorted(TRANSFORMS)
                                  if "learning_rate" in TRANSFORMS[n][1]])
def test_injected_learning_rate_is_used(name):
  factory, kwargs = TRANSFORMS[name]
  opt = curvature.inject_hyperparams(factory)(**kwargs)
  params, batch = _problem()
  state = opt.init(params)
  grads = jax.grad(_loss)(params, batch)
  full, _ = opt.update(grads, state, params, batch=batch)
  state.hyperparams["learning_rate"] = 0.5 * state.hyperparams["learning_rate"]
  half, _ = opt.update(grads, state, params, batch=batch)
  np.testing.assert_allclose(flat(half), 0.5 * flat(full), rtol=1e-5,
                             atol=1e-7)
