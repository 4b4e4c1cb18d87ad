"""CI tier of ``benchmarks/convergence.py``: a tiny configuration.

Correctness facts only (every optimizer's loss decreases and stays finite);
no timing assertions.
"""

import importlib.util
import pathlib

import numpy as np
import optax
import pytest

import curvature


def _load_convergence_benchmark():
  path = (pathlib.Path(__file__).parents[1] / "benchmarks" / "convergence.py")
  spec = importlib.util.spec_from_file_location("convergence_benchmark", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def bench():
  return _load_convergence_benchmark()


@pytest.fixture(scope="module")
def setup(bench):
  data = bench.load_data(1000)
  return data, bench._evaluator(data, eval_batch=1000)


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
