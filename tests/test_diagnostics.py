"""Tests for curvature._lanczos and curvature._diagnostics against dense oracles."""

import functools
import re

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import optax
import pytest
import scipy.stats

import curvature
from curvature import losses


def _predict(params, batch):
  inputs, _ = batch
  hidden = jnp.tanh(inputs @ params["w1"] + params["b1"])
  return hidden @ params["w2"] + params["b2"]


def _problem(seed=0):
  """A 3-4-2 tanh network (26 parameters), float64, softmax cross-entropy."""
  rng = np.random.default_rng(seed)
  params = {
      "w1": jnp.asarray(rng.normal(size=(3, 4)), jnp.float64),
      "b1": jnp.asarray(0.1 * rng.normal(size=4), jnp.float64),
      "w2": jnp.asarray(rng.normal(size=(4, 2)), jnp.float64),
      "b2": jnp.zeros(2, jnp.float64),
  }
  inputs = jnp.asarray(rng.normal(size=(16, 3)), jnp.float64)
  labels = jax.nn.one_hot(rng.integers(0, 2, size=16), 2, dtype=jnp.float64)
  return params, (inputs, labels)


LOSS = losses.softmax_cross_entropy


def _linearization(curvature_name="hessian", l2_reg=0.0, seed=0):
  params, batch = _problem(seed)
  lin = curvature.linearize(
      _predict, LOSS, params, batch, curvature=curvature_name, l2_reg=l2_reg)
  return params, batch, lin


def _dense(matvec, params):
  """The dense matrix of ``matvec`` in the ravel of ``params``."""
  flat, unravel = ravel_pytree(params)
  columns = jax.jit(jax.vmap(lambda e: ravel_pytree(matvec(unravel(e)))[0]))(
      jnp.eye(flat.size, dtype=flat.dtype))
  return np.asarray(columns).T


@functools.cache
def _dense_hessian(seed=0):
  """The oracle: ``jax.hessian`` of the objective on the raveled parameters."""
  params, batch = _problem(seed)
  flat, unravel = ravel_pytree(params)
  objective = lambda x: curvature.objective(_predict, LOSS, unravel(x), batch)
  return np.asarray(jax.jit(jax.hessian(objective))(flat))


def _nan_matvec(v):
  return jax.tree.map(lambda x: x * jnp.nan, v)


# Lanczos and Ritz pairs ------------------------------------------------------


def test_diagnostics_namespace_holds_the_top_level_objects():
  """``curvature.diagnostics.X`` is ``curvature.X`` for every diagnostic,
  and the namespace lists exactly what it defines."""
  from curvature import diagnostics  # pylint: disable=import-outside-toplevel
  assert curvature.diagnostics is diagnostics
  assert "diagnostics" in curvature.__all__
  public = {n for n in vars(diagnostics) if not n.startswith("_")}
  assert public == set(diagnostics.__all__)
  assert len(diagnostics.__all__) == len(set(diagnostics.__all__))
  for name in diagnostics.__all__:
    assert name in curvature.__all__, name
    assert getattr(diagnostics, name) is getattr(curvature, name), name
  assert not {"adam", "kfac", "hessian_free", "losses"} & public


def test_lanczos_matches_the_dense_hessian_built_by_jax_hessian():
  params, batch, lin = _linearization("hessian")
  hessian = _dense_hessian()
  np.testing.assert_allclose(_dense(lin.matvec, params), hessian, atol=1e-10)
  exact = np.linalg.eigvalsh(hessian)
  assert exact[0] < 0 < exact[-1]  # Indefinite: a real test of both ends.
  top = curvature.top_eigenpairs(lin.matvec, params, k=3, num_iterations=26)
  bottom = curvature.bottom_eigenpairs(
      lin.matvec, params, k=2, num_iterations=26)
  np.testing.assert_allclose(top.eigenvalues, exact[::-1][:3], atol=1e-9)
  np.testing.assert_allclose(bottom.eigenvalues, exact[:2], atol=1e-9)
  assert bool(top.finite) and bool(bottom.finite)


def test_outlier_eigenvalues_converge_before_the_dimension():
  params, _, lin = _linearization("ggn")
  exact = np.linalg.eigvalsh(_dense(lin.matvec, params))
  top = curvature.top_eigenpairs(lin.matvec, params, k=2, num_iterations=12)
  np.testing.assert_allclose(top.eigenvalues, exact[::-1][:2], rtol=1e-6)
  assert np.all(np.asarray(top.residual_bounds) < 1e-4)


def test_ritz_vectors_are_unit_eigenvector_pytrees():
  params, _, lin = _linearization("hessian")
  top = curvature.top_eigenpairs(lin.matvec, params, k=2, num_iterations=26)
  assert jax.tree.structure(top.eigenvectors) == jax.tree.structure(params)
  for i in range(2):
    vector = jax.tree.map(lambda x: x[i], top.eigenvectors)
    residual = optax.tree.add_scale(
        lin.matvec(vector), -top.eigenvalues[i], vector)
    np.testing.assert_allclose(optax.tree.norm(vector), 1.0, rtol=1e-10)
    assert optax.tree.norm(residual) < 1e-8
    assert top.residual_bounds[i] < 1e-8


def test_lanczos_restarts_on_a_low_rank_operator_without_nan():
  params, _ = _problem()
  flat, unravel = ravel_pytree(params)
  rng = np.random.default_rng(1)
  factor = jnp.asarray(rng.normal(size=(flat.size, 3)), jnp.float64)
  matvec = lambda v: unravel(factor @ (factor.T @ ravel_pytree(v)[0]))
  exact = np.linalg.eigvalsh(np.asarray(factor @ factor.T))
  result = curvature.lanczos(matvec, params | {"b2": jnp.ones(2)}, 26)
  assert bool(result.finite)
  assert np.all(np.isfinite(result.basis))
  np.testing.assert_allclose(
      np.sort(curvature.ritz_values(result)), exact, atol=1e-9)
  gram = np.asarray(result.basis @ result.basis.T)
  np.testing.assert_allclose(gram, np.eye(26), atol=1e-9)


def test_lanczos_without_reorthogonalization_keeps_the_extremes():
  params, _, lin = _linearization("ggn")
  exact = np.linalg.eigvalsh(_dense(lin.matvec, params))
  result = curvature.lanczos(
      lin.matvec, params | {"b2": jnp.ones(2)}, 20, reorthogonalize="none")
  assert result.basis is None
  np.testing.assert_allclose(
      jnp.max(curvature.ritz_values(result)), exact[-1], rtol=1e-8)


SQRT_EPS = np.sqrt(np.finfo(np.float64).eps)


def _outlier_operator(n=200):
  """``diag(1000, 500, 250, 125, bulk in [0, 1])`` on a flat float64 vector.

  The outliers are so well separated that ``λ = 1000`` converges in a few
  steps; plain Lanczos then loses orthogonality and copies it (Paige 1976).
  """
  eigenvalues = np.concatenate(
      [[1000.0, 500.0, 250.0, 125.0], np.linspace(0.0, 1.0, n - 4)])
  diagonal = jnp.asarray(eigenvalues, jnp.float64)
  start = jnp.asarray(np.random.default_rng(0).normal(size=n), jnp.float64)
  return (lambda v: diagonal * v), start, np.linalg.eigvalsh(
      np.diag(eigenvalues))


def _copies(values, target):
  return int(np.sum(np.abs(np.asarray(values) - target) < 1e-6 * target))


def _orthogonality_loss(result):
  basis = np.asarray(result.basis)
  return np.max(np.abs(basis @ basis.T - np.eye(basis.shape[0])))


def test_partial_reorthogonalization_removes_the_ghosts_like_full():
  matvec, start, exact = _outlier_operator()
  runs = {mode: curvature.lanczos(matvec, start, 60, reorthogonalize=mode)
          for mode in ("none", "partial", "full")}
  ritz = {mode: np.asarray(curvature.ritz_values(result))
          for mode, result in runs.items()}
  assert _copies(ritz["none"], exact[-1]) > 1  # Ghosts without reorth.
  for mode in ("partial", "full"):
    assert _copies(ritz[mode], exact[-1]) == 1
    np.testing.assert_allclose(ritz[mode][-4:], exact[-4:], rtol=1e-12)
    assert np.all((ritz[mode] > exact[0] - 1e-9)
                  & (ritz[mode] < exact[-1] + 1e-9))
  np.testing.assert_allclose(ritz["partial"], ritz["full"], atol=1e-9)
  assert _orthogonality_loss(runs["partial"]) <= SQRT_EPS
  assert _orthogonality_loss(runs["full"]) <= 1e-13
  assert 0 < int(runs["partial"].num_reorthogonalizations) < 60
  assert runs["full"].num_reorthogonalizations is None
  assert runs["none"].num_reorthogonalizations is None


def test_partial_reorthogonalization_is_skipped_on_a_benign_problem():
  n = 200
  diagonal = jnp.linspace(1.0, 2.0, n, dtype=jnp.float64)
  matvec = lambda v: diagonal * v
  start = jnp.asarray(np.random.default_rng(1).normal(size=n), jnp.float64)
  run = jax.jit(lambda v: curvature.lanczos(
      matvec, v, 30, reorthogonalize="partial"))
  partial = run(start)
  plain = curvature.lanczos(matvec, start, 30, reorthogonalize="none")
  assert int(partial.num_reorthogonalizations) == 0
  np.testing.assert_allclose(partial.alphas, plain.alphas, rtol=1e-13)
  np.testing.assert_allclose(partial.betas, plain.betas, rtol=1e-13)
  assert _orthogonality_loss(partial) <= SQRT_EPS
  run(2.0 * start)
  assert run._cache_size() == 1  # The reorth is a lax.cond, not a retrace.


def test_partial_reorthogonalization_matches_the_dense_hessian():
  params, _, lin = _linearization("hessian")
  exact = np.linalg.eigvalsh(_dense_hessian())
  top = curvature.top_eigenpairs(
      lin.matvec, params, k=3, num_iterations=26, reorthogonalize="partial")
  bottom = curvature.bottom_eigenpairs(
      lin.matvec, params, k=2, num_iterations=26, reorthogonalize="partial")
  np.testing.assert_allclose(top.eigenvalues, exact[::-1][:3], atol=1e-9)
  np.testing.assert_allclose(bottom.eigenvalues, exact[:2], atol=1e-9)
  for i in range(3):
    vector = jax.tree.map(lambda x: x[i], top.eigenvectors)
    np.testing.assert_allclose(optax.tree.norm(vector), 1.0, atol=SQRT_EPS)


def test_lanczos_restarts_with_partial_reorthogonalization():
  params, _ = _problem()
  flat, unravel = ravel_pytree(params)
  factor = jnp.asarray(
      np.random.default_rng(1).normal(size=(flat.size, 3)), jnp.float64)
  matvec = lambda v: unravel(factor @ (factor.T @ ravel_pytree(v)[0]))
  result = curvature.lanczos(
      matvec, params | {"b2": jnp.ones(2)}, 26, reorthogonalize="partial")
  assert bool(result.finite) and np.all(np.isfinite(result.basis))
  np.testing.assert_allclose(
      np.sort(curvature.ritz_values(result)),
      np.linalg.eigvalsh(np.asarray(factor @ factor.T)), atol=1e-9)
  assert _orthogonality_loss(result) <= SQRT_EPS


@pytest.mark.parametrize("mode", ["sometimes", "Full", 1, 0.5])
def test_reorthogonalize_rejects_unknown_modes(mode):
  params, _ = _problem()
  with pytest.raises(ValueError, match="'partial'"):
    curvature.lanczos(lambda v: v, params, 3, reorthogonalize=mode)


def test_ritz_pairs_refuse_no_reorthogonalization():
  params, _ = _problem()
  with pytest.raises(ValueError, match="need the Lanczos basis"):
    curvature.top_eigenpairs(lambda v: v, params, reorthogonalize="none")


def test_lanczos_and_eigenpairs_jit():
  params, batch = _problem()

  @jax.jit
  def top_of_ggn(params):
    lin = curvature.linearize(_predict, LOSS, params, batch)
    return curvature.top_eigenpairs(lin.matvec, params, k=1).eigenvalues

  _, _, lin = _linearization("ggn")
  eager = curvature.top_eigenpairs(lin.matvec, params, k=1).eigenvalues
  np.testing.assert_allclose(top_of_ggn(params), eager, rtol=1e-10)


def test_power_iteration_finds_the_largest_ggn_eigenvalue():
  params, _, lin = _linearization("ggn")
  exact = np.linalg.eigvalsh(_dense(lin.matvec, params))[-1]
  result = jax.jit(lambda: curvature.power_iteration(
      lin.matvec, params, max_iterations=500, rtol=1e-12))()
  assert bool(result.converged) and bool(result.finite)
  assert 1 < int(result.iterations) <= 500
  np.testing.assert_allclose(result.eigenvalue, exact, rtol=1e-6)


def test_power_iteration_stops_early_at_the_default_tolerance():
  params, _, lin = _linearization("ggn")
  result = curvature.power_iteration(lin.matvec, params)
  assert bool(result.converged) and int(result.iterations) < 100


# Trace ---------------------------------------------------------------------


def test_hutchinson_trace_is_within_four_standard_errors():
  params, _, lin = _linearization("ggn")
  exact = np.trace(_dense(lin.matvec, params))
  estimate = curvature.hutchinson_trace(
      lin.matvec, params, num_samples=200, key=jax.random.key(3))
  assert estimate.num_samples == 200 and bool(estimate.finite)
  assert 0 < estimate.standard_error < 0.2 * abs(exact)
  assert abs(estimate.trace - exact) < 4 * estimate.standard_error


def test_hutchinson_trace_is_exact_for_a_diagonal_operator():
  params, _ = _problem()
  scale = jax.tree.map(lambda x: jnp.arange(x.size, dtype=x.dtype).reshape(
      x.shape), params)
  matvec = lambda v: jax.tree.map(jnp.multiply, scale, v)
  estimate = curvature.hutchinson_trace(matvec, params, num_samples=5)
  exact = sum(float(jnp.sum(s)) for s in jax.tree.leaves(scale))
  np.testing.assert_allclose(estimate.trace, exact, rtol=1e-12)
  np.testing.assert_allclose(estimate.standard_error, 0.0, atol=1e-12)


# Spectral density ----------------------------------------------------------


def test_spectral_density_is_close_to_the_dense_spectrum():
  params, batch, lin = _linearization("hessian")
  exact = np.linalg.eigvalsh(_dense_hessian())
  density = curvature.spectral_density(
      lin.matvec, params, num_iterations=12, num_probes=30,
      key=jax.random.key(1))
  assert density.nodes.shape == (30, 12) and bool(density.finite)
  np.testing.assert_allclose(density.weights.sum(axis=1), 1.0, rtol=1e-10)
  distance = scipy.stats.wasserstein_distance(
      np.ravel(density.nodes), exact, u_weights=np.ravel(density.weights))
  spread = scipy.stats.wasserstein_distance(exact, [np.mean(exact)])
  assert distance < 0.1 * spread


def test_density_on_grid_is_a_normalized_density_with_the_right_mean():
  params, batch, lin = _linearization("hessian")
  exact = np.linalg.eigvalsh(_dense_hessian())
  density = curvature.spectral_density(
      lin.matvec, params, num_iterations=26, num_probes=20)
  on_grid = curvature.density_on_grid(density, num_points=4000)
  step = on_grid.grid[1] - on_grid.grid[0]
  np.testing.assert_allclose(jnp.sum(on_grid.density) * step, 1.0, rtol=1e-8)
  assert on_grid.grid[0] < exact[0] and on_grid.grid[-1] > exact[-1]
  mean = jnp.sum(on_grid.grid * on_grid.density) * step
  # The mean of the density is tr(H)/n, up to the probes' Monte-Carlo error.
  assert abs(mean - np.mean(exact)) < 0.5 * np.std(exact)


def test_plot_spectral_density_draws_on_a_log_scale():
  import matplotlib  # A test dependency: the plot must be exercised in CI.
  matplotlib.use("Agg")
  params, _, lin = _linearization("ggn")
  density = curvature.spectral_density(lin.matvec, params, num_iterations=10)
  ax = curvature.plot_spectral_density(density, num_points=500)
  assert ax.get_yscale() == "log"
  (line,) = ax.get_lines()
  assert np.all(line.get_ydata() > 0)
  matplotlib.pyplot.close(ax.figure)


# Conditioning and negative curvature --------------------------------------


@pytest.mark.parametrize("reorthogonalize", ["full", "partial"])
def test_condition_number_matches_the_dense_ggn(reorthogonalize):
  params, _, lin = _linearization("ggn", l2_reg=1e-2)
  exact = np.linalg.eigvalsh(_dense(lin.matvec, params))
  result = curvature.condition_number(lin.matvec, params, num_iterations=26,
                                      reorthogonalize=reorthogonalize)
  np.testing.assert_allclose(result.smallest, exact[0], rtol=1e-8)
  np.testing.assert_allclose(result.largest, exact[-1], rtol=1e-10)
  np.testing.assert_allclose(
      result.condition_number, exact[-1] / exact[0], rtol=1e-8)


def test_condition_number_is_infinite_for_an_indefinite_hessian():
  params, _, lin = _linearization("hessian")
  result = curvature.condition_number(lin.matvec, params)
  assert result.condition_number == jnp.inf and result.smallest < 0


@pytest.mark.parametrize("reorthogonalize", ["full", "partial"])
def test_negative_curvature_detects_the_saddle_of_the_hessian(reorthogonalize):
  params, batch, lin = _linearization("hessian")
  exact = np.linalg.eigvalsh(_dense_hessian())
  saddle = curvature.negative_curvature(lin.matvec, params, num_iterations=26,
                                        reorthogonalize=reorthogonalize)
  assert bool(saddle.has_negative_curvature) and bool(saddle.is_saddle)
  np.testing.assert_allclose(saddle.smallest, exact[0], atol=1e-9)
  np.testing.assert_allclose(
      saddle.negative_ratio, -exact[0] / exact[-1], rtol=1e-8)
  along = optax.tree.vdot(saddle.direction, lin.matvec(saddle.direction))
  np.testing.assert_allclose(along, exact[0], atol=1e-9)


def test_negative_curvature_is_absent_from_the_ggn():
  params, _, lin = _linearization("ggn")
  result = curvature.negative_curvature(lin.matvec, params)
  assert not bool(result.has_negative_curvature)
  assert not bool(result.is_saddle) and result.negative_ratio < 1e-5


# Bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, p: curvature.top_eigenpairs(m, p, k=27), "k <= 26"),
        (lambda m, p: curvature.bottom_eigenpairs(
            m, p, k=5, num_iterations=4), "num_iterations >= 5"),
        (lambda m, p: curvature.lanczos(m, p, 0), "must be >= 1"),
        (lambda m, p: curvature.lanczos(m, p, 27), "num_iterations <= 26"),
        (lambda m, p: curvature.spectral_density(
            m, p, num_iterations=0), "positive number"),
        (lambda m, p: curvature.spectral_density(
            m, p, num_probes=0), "num_probes=1"),
        (lambda m, p: curvature.power_iteration(
            m, p, max_iterations=0), "positive number"),
        (lambda m, p: curvature.hutchinson_trace(
            m, p, num_samples=1), "num_samples=100"),
        (lambda m, p: curvature.condition_number(
            m, p, num_iterations=100), "num_iterations <= 26"),
    ],
)
def test_bad_sizes_raise_with_the_fix(call, message):
  params, _, lin = _linearization("ggn")
  with pytest.raises(ValueError, match=message):
    call(lin.matvec, params)


def test_a_nan_operator_gives_flagged_results():
  params, _ = _problem()
  assert not bool(curvature.lanczos(_nan_matvec, params, 5).finite)
  assert not bool(curvature.top_eigenpairs(_nan_matvec, params).finite)
  assert not bool(curvature.hutchinson_trace(_nan_matvec, params).finite)
  assert not bool(curvature.spectral_density(
      _nan_matvec, params, num_iterations=5).finite)
  assert not bool(curvature.condition_number(_nan_matvec, params).finite)
  assert not bool(curvature.negative_curvature(_nan_matvec, params).finite)
  power = curvature.power_iteration(_nan_matvec, params)
  assert not bool(power.finite) and not bool(power.converged)
  assert int(power.iterations) == 1  # Stops at the first NaN.


# Monitoring ----------------------------------------------------------------


def _counting_predict():
  traces = []

  def predict(params, batch):
    traces.append(1)
    return _predict(params, batch)

  return predict, traces


def test_monitor_metrics_match_hand_computation():
  params, batch, lin = _linearization("ggn")
  grads = jax.grad(
      lambda p: curvature.objective(_predict, LOSS, p, batch))(params)
  opt = curvature.monitor(optax.sgd(0.1), _predict, LOSS)
  state = opt.init(params)
  updates, state = jax.jit(opt.update)(grads, state, params, batch=batch)
  g, _ = ravel_pytree(grads)
  ggn = _dense(lin.matvec, params)
  metrics = state.metrics
  assert int(metrics.step) == 0 and bool(metrics.finite)
  np.testing.assert_allclose(metrics.gradient_norm_squared, g @ g, rtol=1e-12)
  np.testing.assert_allclose(
      metrics.gradient_curvature, g @ ggn @ g / (g @ g), rtol=1e-10)
  np.testing.assert_allclose(
      metrics.update_norm, 0.1 * np.linalg.norm(g), rtol=1e-12)
  np.testing.assert_allclose(metrics.objective_value, lin.value, rtol=1e-12)
  assert metrics.reduction_ratio is None and metrics.cg_iterations is None
  expected = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(params))[0]
  np.testing.assert_allclose(
      ravel_pytree(updates)[0], ravel_pytree(expected)[0], rtol=1e-12)


def test_monitor_logs_every_n_steps_without_recompiling():
  params, batch = _problem()
  predict, traces = _counting_predict()
  opt = curvature.monitor(
      optax.sgd(0.1), predict, LOSS, curvature="hessian", every=2)
  update = jax.jit(opt.update)
  state = opt.init(params)
  logged = []
  for _ in range(4):
    grads = jax.grad(
        lambda p: curvature.objective(_predict, LOSS, p, batch))(params)
    updates, state = update(grads, state, params, batch=batch)
    params = optax.apply_updates(params, updates)
    logged.append(int(state.metrics.step))
    if len(logged) == 1:
      traces_after_first = len(traces)
  assert logged == [0, 0, 2, 2]
  assert len(traces) == traces_after_first  # No retrace after the first.
  assert int(state.count) == 4


def test_monitor_reads_rho_damping_and_cg_from_hessian_free():
  params, batch = _problem()
  grads = jax.grad(
      lambda p: curvature.objective(_predict, LOSS, p, batch))(params)
  inner = curvature.hessian_free(
      predict_fn=_predict, loss=LOSS, max_cg_iterations=10)
  opt = curvature.monitor(inner, _predict, LOSS)
  state = opt.init(params)
  _, state = jax.jit(opt.update)(grads, state, params, batch=batch)
  hf_state = optax.tree.get(state.inner_state, "ScaleByHessianFreeState")
  metrics = state.metrics
  assert int(metrics.cg_iterations) == int(hf_state.cg_iterations) > 0
  np.testing.assert_allclose(metrics.damping, hf_state.damping)
  np.testing.assert_allclose(metrics.reduction_ratio, hf_state.reduction_ratio)


def test_monitor_flags_a_nan_batch_and_rejects_bad_arguments():
  params, (inputs, labels) = _problem()
  batch = (inputs.at[0, 0].set(jnp.nan), labels)
  opt = curvature.monitor(optax.sgd(0.1), _predict, LOSS)
  grads = jax.tree.map(jnp.ones_like, params)
  _, state = opt.update(grads, opt.init(params), params, batch=batch)
  assert not bool(state.metrics.finite)
  with pytest.raises(ValueError, match="batch=batch"):
    opt.update(grads, opt.init(params), params)
  with pytest.raises(ValueError, match="every=1"):
    curvature.monitor(optax.sgd(0.1), _predict, LOSS, every=0)
  with pytest.raises(ValueError, match="curvature"):
    curvature.monitor(optax.sgd(0.1), _predict, LOSS, curvature="gnn")


# Per-block diagnostics -------------------------------------------------------


def _block_slices(params, named):
  """Raveled positions of each block of ``curvature.diagnostic_blocks``."""
  paths = curvature.diagnostic_blocks(params, "leaves")
  sizes = {p: int(np.size(x)) for p, x in zip(paths, jax.tree.leaves(params))}
  offsets = dict(zip(paths, np.cumsum([0] + list(sizes.values()))))
  return {name: np.concatenate([np.arange(offsets[p], offsets[p] + sizes[p])
                                for p in members])
          for name, members in named.items()}


def _ggn_blocks(blocks, l2_reg=0.0, **kwargs):
  params, batch, lin = _linearization("ggn", l2_reg=l2_reg)
  named = curvature.diagnostic_blocks(params, blocks, **kwargs)
  dense = _dense(lin.matvec, params)
  return params, batch, lin, {
      name: dense[np.ix_(idx, idx)]
      for name, idx in _block_slices(params, named).items()}


def test_layer_blocks_pair_each_kernel_with_its_bias():
  params, batch = _problem()
  named = curvature.diagnostic_blocks(params, "layers", predict_fn=_predict,
                                      batch=batch)
  assert named == {"w1": ("b1", "w1"), "w2": ("b2", "w2")}
  assert curvature.diagnostic_blocks(params, "leaves") == {
      p: (p,) for p in ("b1", "b2", "w1", "w2")}
  mapped = curvature.diagnostic_blocks(
      params, {"w*": "kernels", "b1": "first bias", "b2": "second bias"})
  assert mapped == {"first bias": ("b1",), "second bias": ("b2",),
                    "kernels": ("w1", "w2")}


@pytest.mark.parametrize("blocks", ["layers", "leaves"])
def test_block_top_eigenvalues_match_dense_eigh_of_each_block(blocks):
  params, batch, lin, dense = _ggn_blocks(
      blocks, predict_fn=_predict, batch=_problem()[1])
  top = curvature.top_eigenpairs(lin.matvec, params, k=5, blocks=blocks,
                                 predict_fn=_predict, batch=batch)
  bottom = curvature.bottom_eigenpairs(lin.matvec, params, k=2,
                                       blocks=blocks, predict_fn=_predict,
                                       batch=batch)
  assert set(top) == set(dense)
  for name, block in dense.items():
    exact = np.linalg.eigvalsh(block)
    k = min(5, block.shape[0])
    np.testing.assert_allclose(top[name].eigenvalues, exact[::-1][:k],
                               rtol=1e-8, atol=1e-12 * exact[-1])
    np.testing.assert_allclose(bottom[name].eigenvalues,
                               exact[:min(2, block.shape[0])],
                               atol=1e-8 * exact[-1])
    # The Ritz vector lives in the block and is an eigenvector of C_bb.
    vector = ravel_pytree(jax.tree.map(lambda x: x[0],
                                       top[name].eigenvectors))[0]
    inside = _block_slices(params, curvature.diagnostic_blocks(
        params, blocks, predict_fn=_predict, batch=batch))[name]
    outside = np.setdiff1d(np.arange(vector.size), inside)
    np.testing.assert_array_equal(np.asarray(vector)[outside], 0.0)
    np.testing.assert_allclose(block @ np.asarray(vector)[inside],
                               exact[-1] * np.asarray(vector)[inside],
                               atol=1e-8 * exact[-1])


def test_block_traces_add_up_to_the_whole_trace():
  params, batch, lin, dense = _ggn_blocks("leaves")
  whole = curvature.hutchinson_trace(lin.matvec, params, num_samples=200)
  parts = curvature.hutchinson_trace(lin.matvec, params, num_samples=200,
                                     blocks="leaves", key=jax.random.key(1))
  total = sum(float(p.trace) for p in parts.values())
  error = np.sqrt(float(whole.standard_error) ** 2 + sum(
      float(p.standard_error) ** 2 for p in parts.values()))
  assert abs(total - float(whole.trace)) <= 3 * error
  for name, block in dense.items():
    assert parts[name].num_samples == 200 and bool(parts[name].finite)
    assert abs(float(parts[name].trace) - np.trace(block)) <= 4 * float(
        parts[name].standard_error) + 1e-12


def test_block_densities_integrate_to_one_and_condition_numbers_match():
  params, batch, lin, dense = _ggn_blocks(
      "layers", l2_reg=0.1, predict_fn=_predict, batch=_problem()[1])
  densities = curvature.spectral_density(
      lin.matvec, params, num_probes=3, blocks="layers", predict_fn=_predict,
      batch=batch)
  kappas = curvature.condition_number(
      lin.matvec, params, blocks="layers", predict_fn=_predict, batch=batch,
      num_iterations=50)
  for name, block in dense.items():
    d = densities[name]
    assert d.nodes.shape == (3, block.shape[0])
    np.testing.assert_allclose(np.sum(d.weights, axis=1), 1.0, atol=1e-12)
    on_grid = curvature.density_on_grid(d, num_points=2000)
    step = float(on_grid.grid[1] - on_grid.grid[0])
    np.testing.assert_allclose(float(jnp.sum(on_grid.density)) * step, 1.0,
                               rtol=1e-10)
    exact = np.linalg.eigvalsh(block)
    np.testing.assert_allclose(float(kappas[name].condition_number),
                               exact[-1] / exact[0], rtol=1e-6)


def test_blocks_of_the_same_size_share_one_lax_map():
  # Two leaves of equal size run in one lax.map body; results match the
  # dense blocks all the same.
  matrix = np.diag(np.arange(1.0, 9.0))
  params = {"a": jnp.zeros(4), "b": jnp.zeros(4)}
  matvec = lambda v: {"a": jnp.asarray(matrix[:4, :4]) @ v["a"],
                      "b": jnp.asarray(matrix[4:, 4:]) @ v["b"]}
  top = curvature.top_eigenpairs(matvec, params, k=2, blocks="leaves")
  np.testing.assert_allclose(top["a"].eigenvalues, [4.0, 3.0], rtol=1e-12)
  np.testing.assert_allclose(top["b"].eigenvalues, [8.0, 7.0], rtol=1e-12)
  negative = curvature.negative_curvature(matvec, params, blocks="leaves")
  assert not bool(negative["a"].has_negative_curvature)
  np.testing.assert_allclose(float(negative["b"].smallest), 5.0, rtol=1e-12)


@pytest.mark.parametrize("mapping, message", [
    ({"w*": "kernels"}, "assigned to no block: ['b1', 'b2']"),
    ({"w*": "kernels", "b*": "biases", "nothere": "x"},
     "match no parameter: ['nothere']"),
    ({"w*": "kernels", "b*": "biases", "w1": "first"},
     "two blocks"),
])
def test_bad_block_mappings_list_the_offending_paths(mapping, message):
  params, _, lin = _linearization("ggn")
  with pytest.raises(ValueError, match=re.escape(message)):
    curvature.hutchinson_trace(lin.matvec, params, blocks=mapping)


def test_bad_block_arguments_say_what_to_pass():
  params, _, lin = _linearization("ggn")
  with pytest.raises(ValueError, match="predict_fn="):
    curvature.top_eigenpairs(lin.matvec, params, blocks="layers")
  with pytest.raises(ValueError, match="blocks"):
    curvature.top_eigenpairs(lin.matvec, params, blocks="rows")
  with pytest.raises(TypeError, match="mapping"):
    curvature.condition_number(lin.matvec, params, blocks=3)


def test_eager_calls_compile_once_per_matvec():
  params, _, lin = _linearization("ggn")
  traces = []

  def matvec(v):
    traces.append(1)
    return lin.matvec(v)

  first = curvature.top_eigenpairs(matvec, params, k=2)
  count = len(traces)
  second = curvature.top_eigenpairs(matvec, params, k=2)
  assert len(traces) == count  # The second call reused the compiled program.
  np.testing.assert_array_equal(first.eigenvalues, second.eigenvalues)
  # Inside jit the diagnostic runs in the caller's trace.
  inside = jax.jit(lambda p: curvature.top_eigenpairs(
      lin.matvec, p, k=2).eigenvalues)(params)
  np.testing.assert_allclose(inside, first.eigenvalues, rtol=1e-10)


def test_lanczos_probes_match_lanczos_one_probe_at_a_time():
  # A rank-3 operator exhausts the Krylov space: both restart, and the
  # batched run gives each probe the tridiagonal of its own run.
  rng = np.random.default_rng(0)
  factor = jnp.asarray(rng.normal(size=(12, 3)))
  params = jnp.zeros(12)
  matvec = lambda v: factor @ (factor.T @ v)
  starts = jnp.asarray(rng.normal(size=(2, 12)))
  batched = curvature._lanczos.lanczos_probes(matvec, params, starts, 8)
  exact = np.linalg.eigvalsh(np.asarray(factor @ factor.T))[-3:]
  for p in range(2):
    single = curvature.lanczos(matvec, starts[p], 8)
    np.testing.assert_allclose(batched.alphas[p][:4], single.alphas[:4],
                               atol=1e-10)
    ritz = curvature.ritz_values(jax.tree.map(lambda x: x[p], batched))
    np.testing.assert_allclose(ritz[-3:], exact, rtol=1e-10)
    assert bool(batched.finite[p])


@pytest.mark.parametrize("old, new", [(True, "full"), (False, "none"),
                                      (None, "none")])
def test_boolean_reorthogonalize_is_deprecated_but_still_works(old, new):
  matvec = lambda v: jnp.arange(1.0, 7.0) * v
  start = jnp.ones(6)
  with pytest.warns(DeprecationWarning, match=repr(new)):
    legacy = curvature.lanczos(matvec, start, 4, reorthogonalize=old)
  current = curvature.lanczos(matvec, start, 4, reorthogonalize=new)
  np.testing.assert_allclose(curvature.ritz_values(legacy),
                             curvature.ritz_values(current))


def test_unknown_reorthogonalize_names_the_options():
  with pytest.raises(ValueError, match="'partial'"):
    curvature.lanczos(lambda v: v, jnp.ones(3), 2, reorthogonalize="yes")
