"""Offline data sets: ``curvature.datasets``.

Nothing downloads. The generated sets need only NumPy and JAX; scikit-learn
(:func:`load_digits`) and ``mnist1d`` (:func:`make_mnist1d`) are imported
only when those functions are called (``pip install -e ".[examples]"``).

* :func:`make_curves`: CURVES-like 28×28 images of a smooth curve through
  three random points (Hinton & Salakhutdinov 2006), 20,000 + 10,000 by
  default, from a fixed seed.
* :func:`load_digits`, :func:`make_mnist1d`: small labelled sets.
* :func:`make_quadratic`: ``½ xᵀAx − bᵀx`` with an exact condition number κ,
  also as a least-squares problem for :data:`curvature.losses.squared_error`.
* :func:`beale`, :func:`rosenbrock`, :func:`narrow_valley`: 2-D test
  functions as sums of squares, with their minima and starting points.
"""

from curvature._datasets import Curves
from curvature._datasets import Function2D
from curvature._datasets import LabeledData
from curvature._datasets import Quadratic
from curvature._datasets import beale
from curvature._datasets import beale_residuals
from curvature._datasets import functions_2d
from curvature._datasets import load_digits
from curvature._datasets import make_curves
from curvature._datasets import make_mnist1d
from curvature._datasets import make_quadratic
from curvature._datasets import narrow_valley
from curvature._datasets import quadratic_predict
from curvature._datasets import quadratic_value
from curvature._datasets import rosenbrock
from curvature._datasets import rosenbrock_residuals

__all__ = (
    "Curves",
    "Function2D",
    "LabeledData",
    "Quadratic",
    "beale",
    "beale_residuals",
    "functions_2d",
    "load_digits",
    "make_curves",
    "make_mnist1d",
    "make_quadratic",
    "narrow_valley",
    "quadratic_predict",
    "quadratic_value",
    "rosenbrock",
    "rosenbrock_residuals",
)
