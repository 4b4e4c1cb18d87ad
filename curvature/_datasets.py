"""Offline data sets for the notebooks, benchmarks and tests.

Nothing here downloads. The generated sets use only NumPy and JAX; the two
wrapped sets import their package inside the function that needs it:
scikit-learn for :func:`load_digits` and ``mnist1d`` for :func:`make_mnist1d`.

* :func:`make_curves`: CURVES-like 28×28 images of a smooth curve through
  three random points, the synthetic data of Hinton & Salakhutdinov (2006).
* :func:`load_digits` and :func:`make_mnist1d`: small labelled sets.
* :func:`make_quadratic`: ``½ xᵀAx − bᵀx`` with an exact condition number,
  also written as a least-squares problem for :mod:`curvature.losses`.
* :func:`beale`, :func:`rosenbrock` and :func:`narrow_valley`: 2-D test
  functions with their minima, as sums of squares.
"""

import functools
import math
import random
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

Array = Any


# --------------------------------------------------------------------------
# CURVES-like images
# --------------------------------------------------------------------------


class Curves(NamedTuple):
  """CURVES-like images, values in ``[0, 1]``, ``float32``.

  Attributes:
    train: ``[num_train, 784]`` (or ``[num_train, 28, 28]``).
    test: ``[num_test, 784]`` (or ``[num_test, 28, 28]``).
  """
  train: np.ndarray
  test: np.ndarray


def _bezier_through(points: np.ndarray, t: np.ndarray):
  """Quadratic Bézier curves through three points, and their speed.

  The curve passes through ``P0`` at ``t = 0``, ``P1`` at ``t = ½`` and
  ``P2`` at ``t = 1``: its middle control point is ``2P1 − (P0 + P2)/2``.

  Args:
    points: ``[n, 3, 2]`` points in pixel coordinates.
    t: ``[m]`` curve parameters in ``[0, 1]``.

  Returns:
    ``(positions [n, m, 2], speeds [n, m])`` with speed ``‖B′(t)‖``.
  """
  p0, p1, p2 = points[:, 0, None], points[:, 1, None], points[:, 2, None]
  control = 2.0 * p1 - 0.5 * (p0 + p2)
  s = t[None, :, None]
  positions = (1 - s) ** 2 * p0 + 2 * (1 - s) * s * control + s ** 2 * p2
  velocity = 2 * (1 - s) * (control - p0) + 2 * s * (p2 - control)
  return positions, np.linalg.norm(velocity, axis=-1)


def _render_curves(points: np.ndarray, image_size: int, width: float,
                   num_samples: int) -> np.ndarray:
  """Anti-aliased images of the curves through ``points``.

  The image is the line integral of a Gaussian kernel of standard deviation
  ``width`` (pixels) along the curve, normalized so that a straight stroke has
  intensity 1 on its centre line. The kernel is separable, so each image is
  one ``[size, m] @ [m, size]`` product over ``m`` curve samples; overlaps are
  clipped to 1.

  Args:
    points: ``[n, 3, 2]`` points in pixel coordinates ``(row, column)``.
    image_size: side of the square image.
    width: stroke width (Gaussian standard deviation) in pixels.
    num_samples: samples along each curve (midpoint rule).

  Returns:
    ``[n, image_size, image_size]`` float32 images in ``[0, 1]``.
  """
  t = ((np.arange(num_samples) + 0.5) / num_samples).astype(points.dtype)
  positions, speeds = _bezier_through(points, t)
  weights = speeds * np.float32(
      1 / (num_samples * math.sqrt(2 * math.pi) * width))
  centres = np.arange(image_size, dtype=points.dtype) + 0.5
  def kernel(coordinate):  # [n, m] -> [n, m, size]
    return np.exp(-0.5 * ((coordinate[..., None] - centres) / width) ** 2)
  rows = kernel(positions[..., 0]) * weights[..., None]
  columns = kernel(positions[..., 1])
  images = np.matmul(np.swapaxes(rows, 1, 2).astype(np.float32),
                     columns.astype(np.float32))
  return np.clip(images, 0.0, 1.0)


def _curve_images(num_images: int, rng: np.random.Generator, *,
                  image_size: int, width: float, margin: float,
                  num_samples: int, chunk_size: int) -> np.ndarray:
  """``num_images`` curve images drawn with ``rng``, rendered in chunks."""
  points = rng.uniform(margin, image_size - margin, size=(num_images, 3, 2))
  points = points.astype(np.float32)
  chunks = [
      _render_curves(points[i:i + chunk_size], image_size, width, num_samples)
      for i in range(0, num_images, chunk_size)
  ]
  if not chunks:
    return np.zeros((0, image_size, image_size), np.float32)
  return np.concatenate(chunks).astype(np.float32)


def make_curves(
    num_train: int = 20_000,
    num_test: int = 10_000,
    *,
    seed: int = 0,
    image_size: int = 28,
    width: float = 0.6,
    margin: float = 3.0,
    num_samples: int = 64,
    flatten: bool = True,
    chunk_size: int = 4096,
) -> Curves:
  """CURVES-like images: a smooth curve through 3 random points.

  Each image shows the quadratic Bézier curve that passes through three
  points drawn uniformly in ``[margin, image_size − margin]²``, rendered
  with a Gaussian anti-aliasing kernel (:func:`_render_curves`). Training and
  test images come from independent streams of one seed, so the training
  set does not depend on ``num_test``. The full 20,000 + 10,000 set takes a
  second or two on a laptop CPU.

  Args:
    num_train: number of training images.
    num_test: number of test images.
    seed: the seed of both streams.
    image_size: side of the square images (28 as in CURVES).
    width: stroke width (Gaussian standard deviation) in pixels.
    margin: distance of the random points from the image border, in pixels.
    num_samples: samples along each curve.
    flatten: return ``[n, image_size²]`` (the autoencoder's input) instead of
      ``[n, image_size, image_size]``.
    chunk_size: images rendered at once (bounds the memory).

  Returns:
    :class:`Curves` with ``float32`` images in ``[0, 1]``.

  Raises:
    ValueError: for negative sizes or a non-positive width.

  References:
    Hinton & Salakhutdinov, "Reducing the dimensionality of data with neural
    networks", Science 2006 (the CURVES data set); Martens, "Deep learning
    via Hessian-free optimization", ICML 2010.
  """
  if num_train < 0 or num_test < 0:
    raise ValueError(f"num_train and num_test must be >= 0, got {num_train}"
                     f" and {num_test}.")
  if width <= 0 or image_size <= 2 * margin:
    raise ValueError("width must be > 0 and image_size > 2 * margin.")
  options = dict(image_size=image_size, width=width, margin=margin,
                 num_samples=num_samples, chunk_size=chunk_size)
  train = _curve_images(num_train, np.random.default_rng([seed, 0]), **options)
  test = _curve_images(num_test, np.random.default_rng([seed, 1]), **options)
  if flatten:
    train = train.reshape(num_train, image_size * image_size)
    test = test.reshape(num_test, image_size * image_size)
  return Curves(train=train, test=test)


# --------------------------------------------------------------------------
# Wrapped labelled sets
# --------------------------------------------------------------------------


class LabeledData(NamedTuple):
  """A labelled classification set split into training and test parts."""
  train_inputs: np.ndarray
  train_labels: np.ndarray
  test_inputs: np.ndarray
  test_labels: np.ndarray


def load_digits(num_test: int = 297, *, seed: int = 0) -> LabeledData:
  """scikit-learn's 8×8 digits (1,797 images, shipped with the package).

  Pixels are scaled from ``0..16`` to ``[0, 1]`` and flattened to 64 inputs.
  A seeded permutation puts ``num_test`` images in the test part.

  Args:
    num_test: size of the test part (0 for none).
    seed: seed of the permutation.

  Returns:
    :class:`LabeledData` with ``float32`` inputs and ``int32`` labels.

  References:
    Alpaydin & Kaynak, "Optical recognition of handwritten digits", UCI
    Machine Learning Repository, 1998.
  """
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  # A Bunch; sklearn has no annotations, and pyrefly infers ``Bunch | tuple``.
  digits: Any = sk_datasets.load_digits()
  inputs = (digits.data / 16.0).astype(np.float32)
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(labels))
  test, train = order[:num_test], order[num_test:]
  return LabeledData(inputs[train], labels[train], inputs[test], labels[test])


def make_mnist1d(num_samples: int = 5000, *, seed: int = 42,
                 train_split: float = 0.8) -> LabeledData:
  """MNIST-1D, generated offline by ``mnist1d.data.make_dataset``.

  Uses the package's default arguments (40-point signals, standardized)
  except for the three given here; never ``get_dataset``, which downloads
  and writes files. ``make_dataset`` seeds NumPy's and Python's global
  generators; their states are restored afterwards.

  Args:
    num_samples: total number of signals (10 classes).
    seed: the generator's seed (42 is the published set's).
    train_split: fraction in the training part.

  Returns:
    :class:`LabeledData` with ``[n, 40]`` ``float32`` inputs and ``int32``
    labels.

  References:
    Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024.
  """
  from mnist1d import data as mnist1d_data  # pylint: disable=g-import-not-at-top
  # An ObjectView, whose attributes are its __dict__'s keys: untyped.
  args: Any = mnist1d_data.get_dataset_args()
  args.num_samples, args.seed, args.train_split = num_samples, seed, train_split
  numpy_state, python_state = np.random.get_state(), random.getstate()
  try:
    data = mnist1d_data.make_dataset(args)
  finally:
    np.random.set_state(numpy_state)
    random.setstate(python_state)
  return LabeledData(
      np.asarray(data["x"], np.float32), np.asarray(data["y"], np.int32),
      np.asarray(data["x_test"], np.float32),
      np.asarray(data["y_test"], np.int32))


# --------------------------------------------------------------------------
# Ill-conditioned quadratics
# --------------------------------------------------------------------------


class Quadratic(NamedTuple):
  """``f(x) = ½ xᵀAx − bᵀx`` and the same problem as least squares.

  ``predict_fn(x, batch)`` with :data:`curvature.losses.squared_error` and
  ``batch`` gives ``f(x) − f(x*)`` exactly: ``batch["inputs"] = √d·A^½`` and
  ``batch["targets"] = √d·A^½x*`` (the loss is a mean over the ``d`` rows).

  Attributes:
    A: ``[d, d]`` symmetric positive definite matrix.
    b: ``[d]`` linear term.
    x_star: ``[d]`` minimizer ``A⁻¹b``.
    eigenvalues: ``[d]`` eigenvalues of ``A``, ascending.
    batch: dict batch for :func:`quadratic_predict`.
    loss_fn: ``x ↦ ½ xᵀAx − bᵀx``.
    predict_fn: :func:`quadratic_predict`.
  """
  A: np.ndarray
  b: np.ndarray
  x_star: np.ndarray
  eigenvalues: np.ndarray
  batch: dict
  loss_fn: Callable[[Array], Array]
  predict_fn: Callable[[Array, Any], Array]

  @property
  def condition_number(self) -> float:
    return float(self.eigenvalues[-1] / self.eigenvalues[0])


def quadratic_value(x: Array, A: Array, b: Array) -> Array:
  """``½ xᵀAx − bᵀx``."""
  return 0.5 * x @ (A @ x) - b @ x


def quadratic_predict(params: Array, batch: dict) -> Array:
  """Residual model of a :class:`Quadratic`: ``[d, 1]`` outputs ``R x``."""
  return (batch["inputs"] @ params)[:, None]


def make_quadratic(dim: int, condition_number: float, *, seed: int = 0,
                   smallest: float = 1.0, spacing: str = "log") -> Quadratic:
  """A random quadratic whose Hessian has exactly the given condition number.

  ``A = Q diag(λ) Qᵀ`` with ``Q`` a Haar-random orthogonal matrix and
  ``λ`` from ``smallest`` to ``smallest · κ`` (both ends included), spaced
  logarithmically or linearly; ``x*`` is standard normal and ``b = Ax*``.
  Everything is float64 NumPy; cast as needed.

  Args:
    dim: dimension ``d`` (>= 2 unless ``κ = 1``).
    condition_number: ``κ = λmax / λmin >= 1``.
    seed: seed of ``Q`` and ``x*``.
    smallest: ``λmin`` (the strong-convexity constant μ).
    spacing: ``"log"`` or ``"linear"`` eigenvalue spacing.

  Returns:
    A :class:`Quadratic`.

  Raises:
    ValueError: for ``κ < 1``, ``dim < 1``, ``smallest <= 0`` or an unknown
      spacing.

  Example:
    >>> import curvature
    >>> problem = curvature.datasets.make_quadratic(5, 100.0)
    >>> round(problem.condition_number, 6), problem.batch["inputs"].shape
    (100.0, (5, 5))

  References:
    Nesterov, "Introductory Lectures on Convex Optimization: A Basic
    Course", Kluwer, 2004, §2.1 (the worst-case quadratics behind the κ and
    √κ bounds).
  """
  if dim < 1 or condition_number < 1 or smallest <= 0:
    raise ValueError("need dim >= 1, condition_number >= 1 and smallest > 0;"
                     f" got {dim}, {condition_number}, {smallest}.")
  if spacing not in ("log", "linear"):
    raise ValueError(f"spacing must be 'log' or 'linear', got {spacing!r}.")
  space = np.geomspace if spacing == "log" else np.linspace
  eigenvalues = space(smallest, smallest * condition_number, dim)
  eigenvalues[0], eigenvalues[-1] = smallest, smallest * condition_number
  rng = np.random.default_rng(seed)
  q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
  q = q * np.sign(np.diag(r))
  A = (q * eigenvalues) @ q.T
  A = 0.5 * (A + A.T)
  x_star = rng.standard_normal(dim)
  b = A @ x_star
  root = (q * np.sqrt(eigenvalues)) @ q.T * math.sqrt(dim)
  batch = {"inputs": root, "targets": (root @ x_star)[:, None]}
  return Quadratic(A=A, b=b, x_star=x_star, eigenvalues=eigenvalues,
                   batch=batch,
                   loss_fn=functools.partial(quadratic_value, A=A, b=b),
                   predict_fn=quadratic_predict)


# --------------------------------------------------------------------------
# 2-D test functions
# --------------------------------------------------------------------------


class Function2D(NamedTuple):
  """A 2-D test function ``f(θ) = Σᵢ rᵢ(θ)²`` with its minimum.

  ``fn`` and ``residual_fn`` take ``θ`` of shape ``[..., 2]`` (a point or a
  grid). As a least-squares problem for :mod:`curvature.losses`,
  ``loss.squared_error.value(predict_fn(θ, batch), batch["targets"]) ==
  f(θ)``: ``predict_fn`` returns ``√2·r(θ)`` as one example and the
  targets are zeros.

  Attributes:
    name: display name.
    fn: ``θ ↦ f(θ)``.
    residual_fn: ``θ ↦ r(θ)``, ``[..., m]``.
    minimum: ``[2]`` global minimizer.
    minimum_value: ``f(minimum)``.
    starts: ``[k, 2]`` starting points for optimizer trajectories.
    bounds: ``((xmin, xmax), (ymin, ymax))`` for contour plots.
    predict_fn: ``(θ, batch) ↦ [1, m]`` outputs ``√2·r(θ)``.
    batch: ``{"targets": zeros [1, m]}``.
  """
  name: str
  fn: Callable[[Array], Array]
  residual_fn: Callable[[Array], Array]
  minimum: np.ndarray
  minimum_value: float
  starts: np.ndarray
  bounds: tuple
  predict_fn: Callable[[Array, Any], Array]
  batch: dict


def _sum_of_squares(residual_fn, theta: Array) -> Array:
  return jnp.sum(residual_fn(theta) ** 2, axis=-1)


def _residual_predict(residual_fn, params: Array, batch: Any) -> Array:
  del batch
  return math.sqrt(2.0) * residual_fn(params)[None, :]


def _test_function(name, residual_fn, num_residuals, minimum, starts,
                   bounds) -> Function2D:
  minimum = np.asarray(minimum, np.float64)
  fn = functools.partial(_sum_of_squares, residual_fn)
  return Function2D(
      name=name, fn=fn, residual_fn=residual_fn, minimum=minimum,
      minimum_value=float(fn(jnp.asarray(minimum))),
      starts=np.asarray(starts, np.float64), bounds=bounds,
      predict_fn=functools.partial(_residual_predict, residual_fn),
      batch={"targets": jnp.zeros((1, num_residuals))})


def beale_residuals(theta: Array) -> Array:
  """Beale's residuals ``cᵢ − x + x yⁱ`` for ``c = (1.5, 2.25, 2.625)``."""
  x, y = theta[..., 0], theta[..., 1]
  return jnp.stack([1.5 - x + x * y, 2.25 - x + x * y ** 2,
                    2.625 - x + x * y ** 3], axis=-1)


def beale() -> Function2D:
  """Beale's function; minimum 0 at ``(3, ½)``, starts ``(2, −2)``, ``(−3, 3)``.

  Example:
    >>> import curvature
    >>> f = curvature.datasets.beale()
    >>> float(f.minimum_value), f.starts.tolist()
    (0.0, [[2.0, -2.0], [-3.0, 3.0]])

  References:
    Beale, "On an iterative method for finding a local minimum of a function
    of more than one variable", Technical Report 25, Statistical Techniques
    Research Group, Princeton University, 1958.
  """
  return _test_function("Beale", beale_residuals, 3, (3.0, 0.5),
                        [(2.0, -2.0), (-3.0, 3.0)], ((-4.5, 4.5), (-4.5, 4.5)))


def rosenbrock_residuals(theta: Array) -> Array:
  """Rosenbrock's residuals ``(1 − x, 10 (y − x²))``."""
  x, y = theta[..., 0], theta[..., 1]
  return jnp.stack([1.0 - x, 10.0 * (y - x ** 2)], axis=-1)


def rosenbrock() -> Function2D:
  """Rosenbrock's banana ``(1 − x)² + 100 (y − x²)²``; minimum 0 at ``(1, 1)``.

  References:
    Rosenbrock, "An automatic method for finding the greatest or least value
    of a function", The Computer Journal, 1960.
  """
  return _test_function("Rosenbrock", rosenbrock_residuals, 2, (1.0, 1.0),
                        [(-1.2, 1.0)], ((-2.0, 2.0), (-1.0, 3.0)))


def _valley_residuals(theta: Array, *, curvatures, angle) -> Array:
  c, s = math.cos(angle), math.sin(angle)
  along = c * theta[..., 0] + s * theta[..., 1]
  across = -s * theta[..., 0] + c * theta[..., 1]
  return jnp.stack([math.sqrt(curvatures[0] / 2) * along,
                    math.sqrt(curvatures[1] / 2) * across], axis=-1)


def narrow_valley(condition_number: float = 50.0,
                  angle: float = math.pi / 6) -> Function2D:
  """A narrow, tilted valley: ``½(u² + κ v²)``, minimum 0 at the origin.

  ``u`` runs along the valley floor (curvature 1) and ``v`` across it
  (curvature κ); the floor is tilted by ``angle`` so that a diagonal
  preconditioner does not simply undo the conditioning. This is the picture
  of ill-conditioning in Goodfellow, Bengio & Courville (2016, §4.3.1 and
  §8.2.1): gradient descent bounces between the walls with a large learning
  rate and crawls along the floor with a small one.

  Args:
    condition_number: κ, the ratio of the two curvatures.
    angle: angle of the valley floor to the first axis, in radians.

  Returns:
    A :class:`Function2D`.

  Example:
    >>> import jax
    >>> import curvature
    >>> f = curvature.datasets.narrow_valley(condition_number=50.0)
    >>> hessian = jax.jit(jax.hessian(f.fn))(f.minimum)
    >>> eigenvalues = jax.numpy.linalg.eigvalsh(hessian)
    >>> print([round(float(e), 4) for e in eigenvalues])
    [1.0, 50.0]

  References:
    Goodfellow, Bengio & Courville, "Deep Learning", MIT Press, 2016,
    §4.3.1 and §8.2.1.
  """
  residual_fn = functools.partial(_valley_residuals,
                                  curvatures=(1.0, float(condition_number)),
                                  angle=float(angle))
  c, s = math.cos(angle), math.sin(angle)
  start = (-4.0 * c - 1.0 * s, -4.0 * s + 1.0 * c)  # far along, off the floor
  return _test_function("narrow valley", residual_fn, 2, (0.0, 0.0), [start],
                        ((-5.0, 2.0), (-3.5, 2.0)))


def functions_2d() -> dict:
  """The three 2-D test functions by name."""
  return {"beale": beale(), "rosenbrock": rosenbrock(),
          "narrow_valley": narrow_valley()}
