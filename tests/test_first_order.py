"""Aliases: 200-step equivalence with optax, seed variants, bad input, NaNs."""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature

STEPS = 200
# Relative tolerance per leaf dtype (the targets).
RTOL = {jnp.dtype(jnp.float32): 1e-6, jnp.dtype(jnp.float64): 1e-12}


def _mixed_params():
  """A multi-leaf pytree mixing float32 and float64 leaves."""
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  return {
      "dense": {
          "w": jax.random.normal(k[0], (4, 3), jnp.float32),
          "b": jax.random.normal(k[1], (3,), jnp.float64),
      },
      "scale": jax.random.normal(k[2], (), jnp.float32),
      "table": [jax.random.normal(k[3], (2, 5), jnp.float64)],
  }


def _gradient_sequence(params, steps=STEPS, seed=1):
  """A random gradient sequence, stacked on a leading time axis."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(
      treedef,
      [
          jax.random.normal(k, (steps,) + x.shape, x.dtype)
          for k, x in zip(keys, leaves)
      ],
  )


@functools.partial(jax.jit, static_argnums=0)
def _trajectory(opt, params, grads):
  """Final params after feeding ``grads`` (time-major) to ``opt``."""

  def step(carry, g):
    p, s = carry
    updates, s = opt.update(g, s, p)
    return (optax.apply_updates(p, updates), s), None

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), grads)
  return params


def assert_trees_close(ours, ref):
  """Leafwise, relative to the leaf's scale, at the leaf dtype's tolerance."""
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    assert a.dtype == b.dtype
    a, b = np.asarray(a), np.asarray(b)
    assert np.all(np.isfinite(a))
    tol = RTOL[np.dtype(b.dtype)]
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


EQUIVALENT = {
    "sgd": (lambda: curvature.sgd(0.05), lambda: optax.sgd(0.05)),
    "sgd_momentum": (
        lambda: curvature.sgd(0.05, momentum=0.9),
        lambda: optax.sgd(0.05, momentum=0.9),
    ),
    "heavy_ball": (
        lambda: curvature.heavy_ball(0.05, 0.9),
        lambda: optax.sgd(0.05, momentum=0.9),
    ),
    "sgd_nesterov": (
        lambda: curvature.sgd(0.05, momentum=0.9, nesterov=True),
        lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
    ),
    "nesterov": (
        lambda: curvature.nesterov(0.05, 0.9),
        lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
    ),
    "sgd_momentum_schedule": (
        lambda: curvature.sgd(optax.schedules.exponential_decay(0.1, 50, 0.5),
                              momentum=0.9),
        lambda: optax.sgd(optax.schedules.exponential_decay(0.1, 50, 0.5),
                          momentum=0.9),
    ),
    "adagrad": (lambda: curvature.adagrad(0.1), lambda: optax.adagrad(0.1)),
    "adagrad_zero_init": (
        lambda: curvature.adagrad(0.1, 0.0, 1e-7),
        lambda: optax.adagrad(0.1, 0.0, 1e-7),
    ),
    "rmsprop": (lambda: curvature.rmsprop(1e-3), lambda: optax.rmsprop(1e-3)),
    "rmsprop_eps_outside": (
        lambda: curvature.rmsprop(1e-3, 0.99, 1e-7, eps_in_root=False),
        lambda: optax.rmsprop(1e-3, 0.99, 1e-7, eps_in_sqrt=False),
    ),
    "rmsprop_initial_scale": (
        lambda: curvature.rmsprop(1e-3, initial_scale=1.0),
        lambda: optax.rmsprop(1e-3, initial_scale=1.0),
    ),
    "rmsprop_momentum": (
        lambda: curvature.rmsprop(1e-3, momentum=0.9),
        lambda: optax.rmsprop(1e-3, momentum=0.9),
    ),
    "rmsprop_nesterov": (
        lambda: curvature.rmsprop(1e-3, momentum=0.9, nesterov=True),
        lambda: optax.rmsprop(1e-3, momentum=0.9, nesterov=True),
    ),
    "adam": (lambda: curvature.adam(1e-3), lambda: optax.adam(1e-3)),
    "adam_eps_root": (
        lambda: curvature.adam(1e-2, 0.8, 0.99, 1e-6, 1e-8),
        lambda: optax.adam(1e-2, 0.8, 0.99, 1e-6, 1e-8),
    ),
    "adam_cosine_schedule": (
        lambda: curvature.adam(optax.schedules.cosine_decay_schedule(1e-2, 200)),
        lambda: optax.adam(optax.schedules.cosine_decay_schedule(1e-2, 200)),
    ),
    "adadelta": (
        lambda: curvature.adadelta(1.0),
        lambda: optax.adadelta(1.0),
    ),
    "adadelta_rho": (
        lambda: curvature.adadelta(0.5, rho=0.95, eps=1e-5),
        lambda: optax.adadelta(0.5, rho=0.95, eps=1e-5),
    ),
}


@pytest.mark.parametrize("name", sorted(EQUIVALENT))
def test_matches_optax_for_200_steps(name):
  ours, theirs = EQUIVALENT[name]
  params = _mixed_params()
  grads = _gradient_sequence(params)
  ref = _trajectory(theirs(), params, grads)
  got = _trajectory(ours(), params, grads)
  # The trajectory really moved (the comparison is not trivially satisfied).
  moved = optax.tree.norm(optax.tree.sub(ref, params))
  assert moved > 1e-3
  assert_trees_close(got, ref)


def _numpy_reference(rule, x0, grads):
  """Runs a seed's NumPy pseudo-code ``rule(x, g, t, state) -> x``."""
  x, state = np.array(x0, np.float64), {}
  for t, g in enumerate(np.asarray(grads), start=1):
    x = rule(x, g, t, state)
  return x


def _seed_adagrad(x, g, t, s, eps=0.1, nu=1e-7):
  s["a"] = s.get("a", 0.0) + g * g
  return x - eps * g / (np.sqrt(s["a"]) + nu)


def _seed_adam_no_bias_correction(x, g, t, s, eps=1e-2, b1=0.9, b2=0.99,
                                  nu=1e-7):
  s["v"] = b1 * s.get("v", 0.0) + (1 - b1) * g
  s["a"] = b2 * s.get("a", 0.0) + (1 - b2) * g * g
  return x - eps / np.sqrt(s["a"] + nu) * s["v"]


def _seed_adam(x, g, t, s, eps=1e-2, b1=0.9, b2=0.99, nu=1e-7):
  s["p"] = b1 * s.get("p", 0.0) + (1 - b1) * g
  s["a"] = b2 * s.get("a", 0.0) + (1 - b2) * g * g
  p_u, a_u = s["p"] / (1 - b1**t), s["a"] / (1 - b2**t)
  return x - eps * p_u / (np.sqrt(a_u) + nu)


def _seed_rmsprop_momentum(x, g, t, s, eps=1e-2, alpha=0.9, beta=0.99,
                           nu=1e-7):
  s["a"] = beta * s.get("a", 0.0) + (1 - beta) * g * g
  s["p"] = alpha * s.get("p", 0.0) - eps * g / (np.sqrt(s["a"]) + nu)
  return x + s["p"]


def _seed_adadelta_weights(x, g, t, s, eta=0.1, gamma=0.1, eps=1e-6):
  s["g"] = (1 - gamma) * s.get("g", 0.0) + gamma * g * g
  s["w"] = (1 - gamma) * s.get("w", 0.0) + gamma * x * x
  return x - eta * np.sqrt((s["w"] + eps) / (s["g"] + eps)) * g


SEED_VARIANTS = {
    "adagrad_seed_code": (
        lambda: curvature.adagrad(0.1, 0.0, 1e-7, eps_in_root=False),
        _seed_adagrad,
    ),
    "adam_without_bias_correction": (
        lambda: curvature.adam(1e-2, 0.9, 0.99, eps=0.0, eps_root=1e-7,
                               bias_correction=False),
        _seed_adam_no_bias_correction,
    ),
    "adam_seed_code": (
        lambda: curvature.adam(1e-2, 0.9, 0.99, eps=1e-7),
        _seed_adam,
    ),
    "rmsprop_momentum_seed_code": (
        lambda: curvature.rmsprop(1e-2, 0.99, 1e-7, eps_in_root=False,
                                  momentum=0.9),
        _seed_rmsprop_momentum,
    ),
    "adadelta_squared_weights": (
        lambda: curvature.adadelta(0.1, rho=0.9, form="weights"),
        _seed_adadelta_weights,
    ),
}


@pytest.mark.parametrize("name", sorted(SEED_VARIANTS))
def test_seed_variants_match_the_seed_pseudocode(name):
  make, rule = SEED_VARIANTS[name]
  x0 = jnp.linspace(-1.0, 1.0, 7, dtype=jnp.float64)
  grads = _gradient_sequence(x0, steps=50, seed=3)
  got = _trajectory(make(), x0, grads)
  want = _numpy_reference(rule, x0, grads)
  assert np.abs(want - np.asarray(x0)).max() > 1e-3
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


def test_adam_is_diagonal_empirical_fisher_preconditioner_with_momentum():
  """Adam, spelled out with the primitives, is ``curvature.adam``."""
  params = _mixed_params()
  grads = _gradient_sequence(params, steps=20)
  explicit = optax.chain(
      curvature.scale_by_diagonal(
          curvature.scale_by_ema(0.999, statistic="square"),
          direction=curvature.scale_by_ema(0.9),
          power=0.5,
          damping=1e-8,
      ),
      optax.scale_by_learning_rate(1e-3),
  )
  assert_trees_close(
      _trajectory(explicit, params, grads),
      _trajectory(curvature.adam(1e-3), params, grads),
  )


ALIASES = {
    "sgd": lambda **kw: curvature.sgd(0.1, momentum=0.9, **kw),
    "heavy_ball": lambda **kw: curvature.heavy_ball(0.1, **kw),
    "nesterov": lambda **kw: curvature.nesterov(0.1, **kw),
    "nesterov_lookahead": lambda **kw: curvature.nesterov(
        0.1, form="lookahead", **kw),
    "adagrad": lambda **kw: curvature.adagrad(0.1, **kw),
    "rmsprop": lambda **kw: curvature.rmsprop(0.1, momentum=0.9, **kw),
    "adam": lambda **kw: curvature.adam(0.1, **kw),
    "adadelta": lambda **kw: curvature.adadelta(0.1, **kw),
    "delta_bar_delta": lambda **kw: curvature.delta_bar_delta(0.1, **kw),
}


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_nonfinite_gradient_step_is_rejected(name):
  """With ``max_consecutive_errors`` a NaN step is zero and leaves the state."""
  opt = ALIASES[name](max_consecutive_errors=3)
  params = {"w": jnp.ones(3, jnp.float32), "b": jnp.ones((), jnp.float64)}
  state = opt.init(params)
  good = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)
  _, state = opt.update(good, state, params)
  bad = {"w": jnp.array([1.0, jnp.nan, 1.0], jnp.float32), "b": good["b"]}
  updates, new_state = jax.jit(opt.update)(bad, state, params)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)
  assert int(new_state.notfinite_count) == 1
  assert int(new_state.total_notfinite) == 1
  chex_equal = jax.tree.map(
      lambda a, b: bool(jnp.array_equal(a, b)), new_state.inner_state,
      state.inner_state)
  assert all(jax.tree.leaves(chex_equal))


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_nonfinite_gradient_propagates_by_default(name):
  """The documented default: like optax, a NaN gradient gives a NaN step."""
  opt = ALIASES[name]()
  params = {"w": jnp.ones(3, jnp.float32)}
  bad = {"w": jnp.array([1.0, jnp.nan, 1.0], jnp.float32)}
  updates, _ = opt.update(bad, opt.init(params), params)
  assert bool(jnp.isnan(updates["w"][1]))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: curvature.adam(-1e-3), "learning_rate"),
        (lambda: curvature.sgd(-0.1), "learning_rate"),
        (lambda: curvature.adam(1e-3, b1=1.0), r"`b1` must lie in \[0.0, 1.0\)"),
        (lambda: curvature.adam(1e-3, b2=-0.1), "b2"),
        (lambda: curvature.adam(1e-3, eps=-1e-8), "damping"),
        (lambda: curvature.adam(1e-3, eps_root=-1e-8), "damping"),
        (lambda: curvature.rmsprop(1e-3, decay=1.5), "decay"),
        (lambda: curvature.rmsprop(1e-3, eps=-1.0), "damping"),
        (lambda: curvature.rmsprop(1e-3, momentum=1.0), "momentum"),
        (lambda: curvature.nesterov(0.1, momentum=1.0), "momentum"),
        (lambda: curvature.adagrad(1e-3, eps=-1.0), "damping"),
        (lambda: curvature.adagrad(1e-3, -0.1), "initial_value"),
        (lambda: curvature.rmsprop(1e-3, initial_scale=-1.0),
         "initial_scale.*>= 0"),
        (lambda: curvature.rmsprop(1e-3, initial_scale=float("nan")),
         "initial_scale"),
        (lambda: curvature.adadelta(1.0, rho=1.0), "rho"),
        (lambda: curvature.adadelta(1.0, eps=-1e-6), "eps"),
        (lambda: curvature.adadelta(-1.0), "learning_rate"),
        (lambda: curvature.sgd(0.1, momentum=-0.5), "momentum"),
        (lambda: curvature.nesterov(0.1, form="bogus"), "form"),
        (lambda: curvature.delta_bar_delta(0.1, phi=1.0), "phi"),
        (lambda: curvature.adam(1e-3, max_consecutive_errors=-1),
         "max_consecutive_errors"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(make, match):
  with pytest.raises(ValueError, match=match):
    make()


# Found by tests/test_contract_fuzz.py: with every damping term 0, a
# coordinate whose gradient is 0 (a dead ReLU) got 0/0 = NaN (as in optax,
# except its adagrad). Its update is now 0, the limit (optax.adagrad's); the
# other coordinates are optax's.
@pytest.mark.parametrize(
    "make, reference",
    [
        (lambda: curvature.adam(1e-3, eps=0.0),
         lambda: optax.adam(1e-3, eps=0.0)),
        (lambda: curvature.adam(1e-3, eps=0.0, bias_correction=False),
         None),
        (lambda: curvature.rmsprop(1e-3, eps=0.0),
         lambda: optax.rmsprop(1e-3, eps=0.0)),
        (lambda: curvature.rmsprop(1e-3, eps=0.0, eps_in_root=False),
         lambda: optax.rmsprop(1e-3, eps=0.0, eps_in_sqrt=False)),
        (lambda: curvature.adagrad(1e-3, 0.0, eps=0.0),
         lambda: optax.adagrad(1e-3, 0.0, eps=0.0)),
        (lambda: curvature.adadelta(1.0, eps=0.0),
         lambda: optax.adadelta(1.0, eps=0.0)),
        (lambda: curvature.adadelta(1.0, eps=0.0, form="weights"), None),
    ],
)
def test_zero_damping_at_a_zero_gradient_gives_a_zero_update(make,
                                                             reference):
  opt = make()
  params = jnp.array([1.0, -2.0], jnp.float64)
  state = opt.init(params)
  ref = reference() if reference else None
  ref_state = ref.init(params) if ref else None
  for g in ([0.0, 1.0], [0.0, -0.5]):
    g = jnp.array(g, jnp.float64)
    updates, state = opt.update(g, state, params)
    assert np.all(np.isfinite(updates)) and float(updates[0]) == 0.0
    if ref:
      expected, ref_state = ref.update(g, ref_state, params)
      np.testing.assert_allclose(updates[1], expected[1], rtol=1e-12)


def test_schedule_and_clipping_recipe():
  """The README recipe: clip, then Adam with a warmup-cosine schedule."""
  schedule = optax.schedules.warmup_cosine_decay_schedule(
      0.0, 1e-2, warmup_steps=10, decay_steps=100)
  opt = optax.chain(optax.clip_by_global_norm(1.0), curvature.adam(schedule))
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  params = _mixed_params()
  grads = jax.tree.map(lambda g: 100.0 * g, _gradient_sequence(params, 100))
  assert_trees_close(_trajectory(opt, params, grads),
                     _trajectory(ref, params, grads))


# Every transform and alias: (factory, fixed kwargs, injected numeric kwargs).
CONTRACT = {
    "scale_by_ema": (curvature.scale_by_ema, {}, {"decay": 0.8}),
    "scale_by_ema_of_squares": (
        curvature.scale_by_ema, {"statistic": "square"},
        {"decay": 0.8, "initial_value": 0.5}),
    "scale_by_running_sum": (
        curvature.scale_by_running_sum, {}, {"initial_value": 0.2}),
    "scale_by_momentum": (curvature.scale_by_momentum, {}, {"decay": 0.8}),
    "scale_by_momentum_nesterov": (
        curvature.scale_by_momentum, {"nesterov": True}, {"decay": 0.8}),
    "scale_by_diagonal": (
        curvature.scale_by_diagonal,
        {"curvature": curvature.scale_by_running_sum(),
         "direction": curvature.scale_by_ema(0.5)},
        {"power": 0.75, "damping": 1e-3, "damping_in_root": 1e-2}),
    "scale_by_adadelta": (
        curvature.scale_by_adadelta, {}, {"rho": 0.8, "eps": 1e-4}),
    "scale_by_adadelta_weights": (
        curvature.scale_by_adadelta, {"form": "weights"},
        {"rho": 0.8, "eps": 1e-4}),
    "scale_by_delta_bar_delta": (
        curvature.scale_by_delta_bar_delta, {},
        {"kappa": 0.1, "phi": 0.2, "theta": 0.5, "initial_rate": 0.5}),
    "polyak_averaging": (curvature.polyak_averaging, {}, {"decay": 0.8}),
    "sgd": (curvature.sgd, {"nesterov": True},
            {"learning_rate": 0.1, "momentum": 0.8}),
    "heavy_ball": (curvature.heavy_ball, {},
                   {"learning_rate": 0.1, "momentum": 0.8}),
    "nesterov_lookahead": (curvature.nesterov, {"form": "lookahead"},
                           {"learning_rate": 0.1, "momentum": 0.8}),
    "adagrad": (curvature.adagrad, {"eps_in_root": False},
                {"learning_rate": 0.1, "initial_accumulator_value": 0.2,
                 "eps": 1e-3}),
    "rmsprop": (curvature.rmsprop, {"nesterov": True},
                {"learning_rate": 0.1, "decay": 0.8, "eps": 1e-3,
                 "initial_scale": 0.1, "momentum": 0.5}),
    "adam": (curvature.adam, {"bias_correction": True},
             {"learning_rate": 0.1, "b1": 0.8, "b2": 0.9, "eps": 1e-3,
              "eps_root": 1e-4}),
    "adadelta": (curvature.adadelta, {"form": "updates"},
                 {"learning_rate": 0.5, "rho": 0.8, "eps": 1e-4}),
    "delta_bar_delta": (curvature.delta_bar_delta, {},
                        {"learning_rate": 0.1, "kappa": 0.1, "phi": 0.2,
                         "theta": 0.5}),
}


def _contract_problem():
  params = {"w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float64).reshape(2, 3),
            "b": jnp.array([0.5, -0.25, 2.0], jnp.float64)}
  grads = [jax.tree.map(lambda p, k=k: jnp.cos(3.0 * p + k), params)
           for k in range(3)]
  return params, grads


def _run_jitted(opt, params, grads):
  """Jitted steps; returns final params and the number of traces."""
  traces = []

  @jax.jit
  def step(p, s, g):
    traces.append(None)  # Python side effect: runs once per trace.
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = opt.init(params)
  for g in grads:
    params, state = step(params, state, g)
  assert step._cache_size() == 1
  return params, state, len(traces)


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_transform_contract_jit_chain_no_retrace_inject(name):
  factory, fixed, numeric = CONTRACT[name]
  params, grads = _contract_problem()
  plain = factory(**fixed, **numeric)

  # Under jit, inside a chain, three update calls trace exactly once.
  chained = optax.chain(optax.clip_by_global_norm(10.0), plain)
  got, _, traces = _run_jitted(chained, params, grads)
  assert traces == 1

  # Eager, unchained, gives the same result (clipping is inactive here).
  eager, state = params, plain.init(params)
  for g in grads:
    u, state = plain.update(g, state, eager)
    eager = optax.apply_updates(eager, u)
  assert_trees_close(got, eager)

  # Injected hyperparameters: same result, no retrace, and changing one in the
  # state behaves as constructing with the new value.
  injected = optax.inject_hyperparams(factory)(**fixed, **numeric)
  got_inj, state_inj, traces = _run_jitted(injected, params, grads)
  assert traces == 1
  assert set(numeric) <= set(state_inj.hyperparams)
  np.testing.assert_allclose(
      jax.flatten_util.ravel_pytree(got_inj)[0],
      jax.flatten_util.ravel_pytree(eager)[0], rtol=1e-12)
  # Initial values only matter in ``init``: change a per-step hyperparameter.
  per_step = sorted(k for k in numeric if not k.startswith("initial"))
  if per_step:
    _check_changed_hyperparameter(factory, fixed, numeric, per_step[0])


def _check_changed_hyperparameter(factory, fixed, numeric, key):
  """Editing ``state.hyperparams[key]`` acts as constructing with that value."""
  params, grads = _contract_problem()
  injected = optax.inject_hyperparams(factory)(**fixed, **numeric)
  changed = dict(numeric, **{key: numeric[key] * 0.5})
  state = injected.init(params)
  state.hyperparams[key] = jnp.asarray(changed[key], jnp.float64)
  p_inj, p_ref = params, params
  ref = factory(**fixed, **changed)
  s_ref = ref.init(params)
  for g in grads:
    u, state = injected.update(g, state, p_inj)
    p_inj = optax.apply_updates(p_inj, u)
    u, s_ref = ref.update(g, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
  np.testing.assert_allclose(
      jax.flatten_util.ravel_pytree(p_inj)[0],
      jax.flatten_util.ravel_pytree(p_ref)[0], rtol=1e-12)
