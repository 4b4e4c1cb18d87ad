"""CI tier of ``benchmarks/convergence.py`` and the README's main job.

5000 CURVES-like training images and a few steps per row (2000 images for
the end-to-end run of the main job). Correctness facts
only (every optimizer's loss decreases and stays finite, the table and plot
are written); no timing assertions.
"""

import importlib.util
import pathlib

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


@pytest.mark.parametrize("name", ["adam", "curvature.sgd", "optax.sgd"])
def test_first_order_rows_decrease(bench, setup, name):
  data, evaluate = setup
  opt = {"adam": optax.adam(1e-3),
         "curvature.sgd": curvature.sgd(1e-2, momentum=0.9),
         "optax.sgd": optax.sgd(1e-2, momentum=0.9)}[name]
  _check(bench.train_first_order(opt, data, 30, batch_size=100, eval_every=10,
                                 evaluate=evaluate))


def test_kfac_row_decreases(bench, setup):
  data, evaluate = setup
  _check(bench.train_kfac(data, 10, batch_size=100, eval_every=5,
                          evaluate=evaluate))


def test_hessian_free_row_decreases(bench, setup):
  data, evaluate = setup
  _check(bench.train_hessian_free(data, 3, batch_size=100,
                                  curvature_batch_size=50,
                                  evaluation_batch_size=50, evaluate=evaluate))


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
  rows = example.main(["--train-size", "2000", "--steps", "20",
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
