"""CI tier of ``benchmarks/convergence.py`` and the README's main job.

5000 CURVES-like training images and a few steps per row (500 images for
the end-to-end run of the main job). Correctness facts
only (every optimizer's loss decreases and stays finite, the table and plot
are written, every row's timed loop is checked for compilations and that
check fires when something compiles while timed); no timing assertions.
"""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature


ROOT = pathlib.Path(__file__).parents[1]


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def bench():
  return _load("benchmarks/convergence.py", "convergence_benchmark")


@pytest.fixture(scope="module")
def setup(bench):
  data = bench.load_data(5000)
  return data, bench._evaluator(data, eval_batch=2500)


def _check(trace):
  assert np.all(np.isfinite(trace.loss)), trace.loss
  assert trace.loss[-1] < trace.loss[0], trace.loss
  assert np.all(np.diff(trace.steps) > 0)
  assert np.all(np.diff(trace.seconds) >= 0)


@pytest.mark.parametrize("name", ["adam", "curvature.sgd", "optax.sgd",
                                  "shampoo", "soap"])
def test_first_order_rows_decrease(bench, setup, name):
  data, evaluate = setup
  opt = {"adam": optax.adam(1e-3),
         "curvature.sgd": curvature.sgd(1e-2, momentum=0.9),
         "optax.sgd": optax.sgd(1e-2, momentum=0.9),
         "shampoo": curvature.shampoo(bench.SHAMPOO_LR),
         "soap": curvature.soap(bench.SOAP_LR)}[name]
  _check(bench.train_first_order(opt, data, 30, batch_size=100, eval_every=10,
                                 evaluate=evaluate))


def test_kfac_row_decreases(bench, setup, capsys):
  data, evaluate = setup
  _check(bench.train_kfac(data, 10, batch_size=100, eval_every=5,
                          evaluate=evaluate))
  # Warmed up on as many throwaway calls as the run times (fewer than
  # 2 * 20 + 1, past the first of every periodic update), and past the
  # first damping update (every 5) and refreshes (steps 0, 1, 2, 4, 8).
  out = capsys.readouterr().out
  assert "kfac: warm-up of 10 calls" in out, out
  assert "no compilation in 10 timed calls" in out, out


def test_kfac_warm_up_covers_every_period_or_the_whole_run(bench):
  assert bench._kfac_warm_up_steps({}, 2000) == 41  # inverse_every=20
  assert bench._kfac_warm_up_steps({"inverse_every": 50}, 2000) == 101
  assert bench._kfac_warm_up_steps({}, 10) == 10
  assert bench._kfac_warm_up_steps({}, 1) == 2


def test_ekfac_row_decreases(bench, setup):
  data, evaluate = setup
  _check(bench.train_kfac(data, 10, batch_size=100, eval_every=5,
                          evaluate=evaluate, structure="eigen_kronecker"))


def test_hessian_free_row_decreases(bench, setup):
  data, evaluate = setup
  _check(bench.train_hessian_free(data, 3, batch_size=100,
                                  curvature_batch_size=50,
                                  evaluation_batch_size=50, evaluate=evaluate))


def test_compile_check_fires_when_a_timed_call_compiles(bench):
  x = jnp.ones(3)
  fresh = jax.jit(lambda x: 2 * x + 1)  # Its first call compiles.
  with bench.TimedLoop("cold") as loop:
    for _ in range(3):
      with loop.timed():
        jax.block_until_ready(fresh(x))
  with pytest.raises(bench.CompilationInTimedLoop,
                     match=r"cold: compilation inside the timed loop \(3 timed "
                     r"calls\): jax.monitoring saw 1 timed call\(s\) with an "
                     r"XLA compilation \[0\]"):
    loop.check()


def test_compile_check_is_quiet_after_warm_up(bench):
  x = jnp.ones(3)
  step = jax.jit(lambda x: 0.5 * x)
  with bench.TimedLoop("warm") as loop:
    loop.warm_up(lambda x, i: step(x), x, 2)
    for _ in range(3):
      with loop.timed():
        x = jax.block_until_ready(step(x))
  assert loop.warm_up_compilations == 1
  assert loop.check().startswith(
      "warm: warm-up of 2 calls compiled 1 program(s), then no compilation "
      "in 3 timed calls")
  assert loop.seconds == pytest.approx(sum(loop.call_seconds))


def test_compile_check_flags_step_time_outliers(bench):
  loop = bench.TimedLoop("peer", outlier_factor=5.0)
  loop.call_seconds = [0.1, 0.11, 0.09, 0.1, 0.6, 0.1]
  assert loop.outliers() == [4]
  with pytest.raises(bench.CompilationInTimedLoop,
                     match=r"call 4 \(step\) 0.60 s = 6.0x"):
    loop.check()
  loop.call_seconds[4] = 0.4
  assert "slowest 4.0x the median)" in loop.check()


def test_compile_check_compares_steps_of_one_kind(bench):
  """A periodic expensive step is no outlier; a slow first one of it is."""
  loop = bench.TimedLoop("peer", outlier_factor=5.0)
  loop.call_kinds = ["inverse", "plain", "plain", "plain"] * 3 + ["damping"]
  loop.call_seconds = [0.8, 0.1, 0.1, 0.1] * 3 + [5.0]  # 8x plain steps.
  assert loop.outliers() == []  # One damping step: left to jax.monitoring.
  assert "slowest 1.0x the median of its kind)" in loop.check()
  loop.call_seconds[0] = 9.0
  assert loop.outliers() == [0]
  with pytest.raises(bench.CompilationInTimedLoop,
                     match=r"call 0 \(inverse\) 9.00 s = 11.2x"):
    loop.check()


def test_kfac_jax_compilation_fails_the_run(bench, setup, monkeypatch):
  """The peer's exit code for a compiled timed step raises here."""
  def fake_peer(command, **kwargs):
    del kwargs
    with open(command[3], "w") as f:  # The OUT.json argument.
      json.dump({"compile_check": "kfac-jax (adaptive): compilation inside "
                                  "the timed loop"}, f)
    return subprocess.CompletedProcess(command, bench.COMPILED_EXIT_CODE)
  monkeypatch.setattr(bench, "PEER_PYTHON", sys.executable)
  monkeypatch.setattr(bench.subprocess, "run", fake_peer)
  with pytest.raises(bench.CompilationInTimedLoop, match="kfac-jax"):
    bench.train_kfac_jax(setup[0], 5)


def test_target_bookkeeping(bench):
  trace = bench.Trace(np.array([0, 10, 20]), np.array([0.0, 1.0, 2.0]),
                      np.array([9.0, 5.0, 3.0]))
  assert bench.to_target(trace, 5.0) == (10, 1.0)
  assert bench.to_target(trace, 1.0) == (None, None)


def test_kfac_jax_row_is_skipped_without_its_venv(bench, setup, monkeypatch,
                                                  capsys):
  monkeypatch.setattr(bench, "PEER_PYTHON", "/nonexistent/python")
  assert bench.train_kfac_jax(setup[0], 5) is None
  assert "kfac-jax peer skipped" in capsys.readouterr().out


def test_main_job_runs_and_writes_table_and_plot(tmp_path, capsys):
  example = _load("examples/curves_autoencoder.py", "curves_autoencoder")
  # 500 images: a batch of 500, Hessian-free's curvature products on 250 of
  # them (a subset, as in the full run); every row still runs end to end.
  rows = example.main(["--train-size", "500", "--steps", "20",
                       "--curvature-steps", "4", "--out", str(tmp_path)])
  assert [r["optimizer"] for r in rows] == [
      "adam 0.003", "kfac (adaptive)", "hessian_free"]
  for r in rows:
    assert np.isfinite(r["final_loss"]), r
    assert r["steps_run"] > 0, r
  assert (tmp_path / "curves_autoencoder.png").stat().st_size > 0
  assert "steps to L" in capsys.readouterr().out


def test_main_job_rejects_unknown_optimizers():
  example = _load("examples/curves_autoencoder.py", "curves_autoencoder")
  with pytest.raises(SystemExit):
    example.parse_args(["--optimizers", "adam,lbfgs"])


def test_batch_growth_doubles_the_gradient_batch_up_to_its_cap(bench, setup):
  # An "optimizer" whose state is the size of the batch it was given: the
  # tally sums the sizes of the timed steps (×2 every step, capped at the
  # 300 images of the training set, not at the requested 8000).
  def init(params):
    return jnp.zeros((), jnp.int32)

  def update(updates, state, params=None, *, batch):
    del state, params
    return (optax.tree.scale(-1e-3, updates),
            jnp.asarray(batch["inputs"].shape[0], jnp.int32))

  opt = optax.GradientTransformationExtraArgs(init, update)
  data = jax.tree.map(lambda x: x[:300], setup[0])
  trace = bench._train_curvature(
      opt, data, 4, desc="sizes", batch_size=100, eval_every=1, seed=0,
      target=None, evaluate=lambda params: 1.0, tally=lambda state: state,
      batch_growth=(2, 1, 8000))
  assert trace.cg.tolist() == [0, 100, 300, 600, 900]


def test_hessian_free_lever_table(monkeypatch, capsys):
  levers = _load("benchmarks/hf_levers.py", "hf_levers")
  bench = levers.convergence
  calls = []

  def fake_hessian_free(data, steps, **kwargs):
    calls.append(kwargs)
    return bench.Trace(np.array([0, 1, 2]), np.array([0.0, 1.0, 2.0]),
                       np.array([9.0, 5.0, 4.0]), np.array([0, 25, 50]))

  def fake_adam(opt, data, steps, **kwargs):
    return bench.Trace(np.array([0, 10]), np.array([0.0, 4.0]),
                       np.array([9.0, 4.5]))

  monkeypatch.setattr(bench, "train_hessian_free", fake_hessian_free)
  monkeypatch.setattr(bench, "train_first_order", fake_adam)
  monkeypatch.setattr(bench, "load_data", lambda size: {})
  monkeypatch.setattr(bench, "_evaluator", lambda data: None)
  target, adam_seconds, results = levers.main(
      ["--train-size", "1500", "--rows", "plain,kfac_growing_batch"])
  assert (target, adam_seconds) == (4.5, 4.0)
  # The row's growth as configured (the harness caps it at the training
  # set: test_batch_growth_doubles_the_gradient_batch_up_to_its_cap).
  assert calls[1]["batch_growth"] == (2, 20, 8000)
  assert calls[1]["preconditioner"] == "kfac" and "preconditioner" not in (
      calls[0])
  assert [r["steps_to_target"] for r in results] == [2, 2]
  assert results[0]["cg_per_iteration"] == 25.0
  assert results[0]["seconds_ratio"] == 0.5
  assert "| kfac_growing_batch | 2 | 4.00 | 25.0 | 1.000 | 0.50 |" in (
      capsys.readouterr().out)
  with pytest.raises(SystemExit):
    levers.main(["--rows", "plain,newton"])


def test_kfac_seed_table(monkeypatch, capsys):
  seeds_script = _load("benchmarks/kfac_seeds.py", "kfac_seeds")
  bench = seeds_script.convergence
  decays = []

  def fake_kfac(data, steps, *, seed, damping_adaptation_decay, **kwargs):
    decays.append(damping_adaptation_decay)
    hit = 10 * (seed + 1)
    return bench.Trace(np.array([0, hit]), np.array([0.0, hit / 10]),
                       np.array([9.0, 1.0]))

  monkeypatch.setattr(bench, "train_kfac", fake_kfac)
  monkeypatch.setattr(bench, "train_kfac_jax", lambda *a, **k: None)
  monkeypatch.setattr(bench, "load_data", lambda size: {})
  monkeypatch.setattr(bench, "_evaluator", lambda data: None)
  results = seeds_script.main(["--seeds", "0,1", "--target", "2.0"])
  assert decays == [19 / 20, 0.9, 19 / 20, 0.9]
  assert list(results) == ["curvature.kfac, d = 19/20",
                           "curvature.kfac, d = 0.9"]  # No venv: no peer.
  assert results["curvature.kfac, d = 0.9"] == [(10, 1.0), (20, 2.0)]
  assert "| curvature.kfac, d = 0.9 | 10 | 20 | 15 | 1.5 |" in (
      capsys.readouterr().out)


def test_kfac_digits_table(monkeypatch, capsys):
  """``benchmarks/kfac_digits.py`` on two of its rows and 2 steps: the
  table has our column only when kfac-jax's venv is missing, and the loss
  is the one :func:`train` gives."""
  digits = _load("benchmarks/kfac_digits.py", "kfac_digits")
  rows = {k: digits.ROWS[k] for k in ("adaptive, λ₀ = 150, d = 19/20",
                                      "fixed, lr 0.01")}
  monkeypatch.setattr(digits, "ROWS", rows)
  monkeypatch.setattr(digits, "PEER_PYTHON", "/nonexistent/python")
  results = digits.main(["--steps", "2"])
  assert list(results) == ["curvature.kfac"]
  assert list(results["curvature.kfac"]) == list(rows)
  data, predict, params = digits.problem()
  fixed = curvature.kfac(0.01, predict_fn=predict, loss=digits.CE,
                         initial_damping=1e-3)
  expected = float(jax.jit(lambda: digits.train(fixed, data, predict, params,
                                                steps=2))())
  np.testing.assert_allclose(results["curvature.kfac"]["fixed, lr 0.01"],
                             expected, rtol=1e-6)
  out = capsys.readouterr().out
  assert "kfac-jax peer skipped" in out
  assert f"| fixed, lr 0.01 | {expected:.4f} |" in out
