"""Tests for ``curvature.datasets``: shapes, ranges, seeds, κ and minima."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvature
from curvature import datasets


def test_public_module():
  assert curvature.datasets is datasets
  assert "datasets" in curvature.__all__
  for name in datasets.__all__:
    assert hasattr(datasets, name), name


# ----------------------------------------------------------------- CURVES


def test_curves_default_sizes_and_range():
  curves = datasets.make_curves()
  assert curves.train.shape == (20_000, 784)
  assert curves.test.shape == (10_000, 784)
  for images in curves:
    assert images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert np.isfinite(images).all()


def test_curves_images_show_a_stroke():
  images = datasets.make_curves(200, 0, flatten=False).train
  assert images.shape == (200, 28, 28)
  assert (images.max(axis=(1, 2)) > 0.9).all()  # every curve is visible
  ink = (images > 0.5).mean(axis=(1, 2))
  assert (ink > 0.005).all() and (ink < 0.3).all()  # a thin curve, not a blob
  border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0],
                           images[:, :, -1]], axis=1)
  assert border.mean() < images.mean()


def test_curves_intermediate_values_are_anti_aliased():
  images = datasets.make_curves(50, 0).train
  grey = (images > 0.05) & (images < 0.95)
  assert grey.sum() > (images >= 0.95).sum()


def test_curves_deterministic_from_seed():
  a = datasets.make_curves(64, 32, seed=3)
  b = datasets.make_curves(64, 32, seed=3)
  c = datasets.make_curves(64, 32, seed=4)
  np.testing.assert_array_equal(a.train, b.train)
  np.testing.assert_array_equal(a.test, b.test)
  assert not np.array_equal(a.train, c.train)
  assert not np.array_equal(a.train[:32], a.test)


def test_curves_train_set_independent_of_test_size_and_chunks():
  a = datasets.make_curves(40, 5, seed=1, chunk_size=7)
  b = datasets.make_curves(40, 500, seed=1)
  np.testing.assert_allclose(a.train, b.train, atol=1e-6)


def test_curves_empty_and_bad_arguments():
  curves = datasets.make_curves(0, 3)
  assert curves.train.shape == (0, 784) and curves.test.shape == (3, 784)
  with pytest.raises(ValueError, match="num_train"):
    datasets.make_curves(-1, 3)
  with pytest.raises(ValueError, match="width"):
    datasets.make_curves(3, 3, width=0.0)


# ------------------------------------------------------- labelled sets


def test_load_digits():
  data = datasets.load_digits()
  assert data.train_inputs.shape == (1500, 64)
  assert data.test_inputs.shape == (297, 64)
  assert data.train_labels.shape == (1500,)
  assert data.train_inputs.min() == 0.0 and data.train_inputs.max() == 1.0
  assert set(np.unique(data.train_labels)) == set(range(10))
  again = datasets.load_digits()
  np.testing.assert_array_equal(data.train_inputs, again.train_inputs)


def test_make_mnist1d_offline_and_no_global_side_effects():
  np.random.seed(123)
  random.seed(123)
  expected_numpy, expected_python = np.random.rand(), random.random()
  np.random.seed(123)
  random.seed(123)
  data = datasets.make_mnist1d(num_samples=500)
  assert np.random.rand() == expected_numpy
  assert random.random() == expected_python
  assert data.train_inputs.shape == (400, 40)
  assert data.test_inputs.shape == (100, 40)
  assert data.train_inputs.dtype == np.float32
  assert set(np.unique(data.train_labels)) <= set(range(10))
  again = datasets.make_mnist1d(num_samples=500)
  np.testing.assert_array_equal(data.train_inputs, again.train_inputs)


# ---------------------------------------------------------- quadratics


@pytest.mark.parametrize("kappa", [1.0, 10.0, 1e3, 1e6])
@pytest.mark.parametrize("spacing", ["log", "linear"])
def test_quadratic_condition_number_exact(kappa, spacing):
  quad = datasets.make_quadratic(12, kappa, seed=5, smallest=0.5,
                                 spacing=spacing)
  eigenvalues = np.linalg.eigvalsh(quad.A)
  np.testing.assert_allclose(eigenvalues[-1] / eigenvalues[0], kappa,
                             rtol=1e-9)
  np.testing.assert_allclose(eigenvalues[0], 0.5, rtol=1e-9)
  np.testing.assert_allclose(eigenvalues, quad.eigenvalues, rtol=1e-9,
                             atol=1e-12)
  assert quad.condition_number == pytest.approx(kappa, rel=1e-12)
  np.testing.assert_allclose(quad.A, quad.A.T, atol=0)


def test_quadratic_minimizer_and_least_squares_form():
  quad = datasets.make_quadratic(8, 100.0, seed=0)
  np.testing.assert_allclose(quad.A @ quad.x_star, quad.b, rtol=1e-12)
  x = np.random.default_rng(0).standard_normal(8)
  loss = curvature.losses.squared_error
  value = loss.value(quad.predict_fn(jnp.asarray(x), quad.batch),
                     quad.batch["targets"])
  expected = quad.loss_fn(x) - quad.loss_fn(quad.x_star)
  np.testing.assert_allclose(value, expected, rtol=1e-10)
  hessian = jax.hessian(
      lambda p: loss.value(quad.predict_fn(p, quad.batch),
                           quad.batch["targets"]))(jnp.asarray(x))
  np.testing.assert_allclose(hessian, quad.A, rtol=1e-9, atol=1e-9)


def test_quadratic_deterministic_and_bad_arguments():
  a = datasets.make_quadratic(5, 10.0, seed=2)
  b = datasets.make_quadratic(5, 10.0, seed=2)
  np.testing.assert_array_equal(a.A, b.A)
  np.testing.assert_array_equal(a.x_star, b.x_star)
  with pytest.raises(ValueError, match="condition_number"):
    datasets.make_quadratic(5, 0.5)
  with pytest.raises(ValueError, match="spacing"):
    datasets.make_quadratic(5, 2.0, spacing="cubic")


# -------------------------------------------------------- 2-D functions


@pytest.mark.parametrize("name", ["beale", "rosenbrock", "narrow_valley"])
def test_minimum_is_a_stationary_point_and_a_minimum(name):
  function = datasets.functions_2d()[name]
  minimum = jnp.asarray(function.minimum, jnp.float64)
  np.testing.assert_allclose(jax.grad(function.fn)(minimum), 0.0, atol=1e-12)
  assert function.minimum_value == pytest.approx(0.0, abs=1e-12)
  assert (np.linalg.eigvalsh(jax.hessian(function.fn)(minimum)) > 0).all()
  grid = jnp.stack(jnp.meshgrid(
      jnp.linspace(*function.bounds[0], 41),
      jnp.linspace(*function.bounds[1], 41)), axis=-1)
  assert float(function.fn(grid).min()) >= function.minimum_value


@pytest.mark.parametrize("name", ["beale", "rosenbrock", "narrow_valley"])
def test_least_squares_form_matches_function(name):
  function = datasets.functions_2d()[name]
  loss = curvature.losses.squared_error
  for point in np.random.default_rng(0).uniform(-2, 2, size=(5, 2)):
    point = jnp.asarray(point, jnp.float64)
    outputs = function.predict_fn(point, function.batch)
    np.testing.assert_allclose(
        loss.value(outputs, function.batch["targets"]), function.fn(point),
        rtol=1e-10)


def test_known_values_and_starts():
  beale = datasets.beale()
  np.testing.assert_allclose(beale.minimum, [3.0, 0.5])
  np.testing.assert_allclose(beale.starts, [[2.0, -2.0], [-3.0, 3.0]])
  # Beale(0, 0) = 1.5² + 2.25² + 2.625².
  assert float(beale.fn(jnp.zeros(2))) == pytest.approx(14.203125)
  rosenbrock = datasets.rosenbrock()
  assert float(rosenbrock.fn(jnp.zeros(2))) == pytest.approx(1.0)
  valley = datasets.narrow_valley(condition_number=50.0)
  hessian = jax.hessian(valley.fn)(jnp.zeros(2, jnp.float64))
  eigenvalues = np.linalg.eigvalsh(hessian)
  np.testing.assert_allclose(eigenvalues, [1.0, 50.0], rtol=1e-12)
  assert float(valley.fn(jnp.asarray(valley.starts[0]))) > 1.0
