"""curvature: second-order and curvature-aware optimizers for optax.

Every optimizer is an ``optax.GradientTransformation`` built from a few shared
primitives: curvature-vector products (Hessian, generalized Gauss-Newton, true
and empirical Fisher), a conjugate-gradient solver that runs inside
``lax.while_loop``, damping, moments with bias correction and momentum.
"""

from curvature import losses
from curvature._cg import CGResult
from curvature._cg import CGStatus
from curvature._cg import conjugate_gradient
from curvature._hessian_free import damped_newton
from curvature._hessian_free import gauss_newton
from curvature._hessian_free import hessian_free
from curvature._hessian_free import levenberg_marquardt
from curvature._hessian_free import newton
from curvature._hessian_free import scale_by_hessian_free
from curvature._hessian_free import ScaleByHessianFreeState
from curvature._products import CURVATURES
from curvature._products import default_targets
from curvature._products import empirical_fisher_diagonal
from curvature._products import empirical_fisher_vector_product
from curvature._products import fisher_vector_product
from curvature._products import ggn_vector_product
from curvature._products import hessian_vector_product
from curvature._products import linearize
from curvature._products import Linearization
from curvature._products import objective
from curvature._products import sampled_fisher_vector_product
from curvature._products import take_examples
from curvature._taylor import first_order_change
from curvature._taylor import reduction_ratio
from curvature._taylor import second_order_change

# --- diagnostics (issue 4) begin ---
# --- diagnostics (issue 4) end ---

# --- first-order primitives and aliases (issue 3) begin ---
# --- first-order primitives and aliases (issue 3) end ---

__version__ = "0.1.0"

__all__ = (
    "CGResult",
    "CGStatus",
    "CURVATURES",
    "Linearization",
    "ScaleByHessianFreeState",
    "conjugate_gradient",
    "damped_newton",
    "default_targets",
    "empirical_fisher_diagonal",
    "empirical_fisher_vector_product",
    "first_order_change",
    "fisher_vector_product",
    "gauss_newton",
    "ggn_vector_product",
    "hessian_free",
    "hessian_vector_product",
    "levenberg_marquardt",
    "linearize",
    "losses",
    "newton",
    "objective",
    "reduction_ratio",
    "sampled_fisher_vector_product",
    "scale_by_hessian_free",
    "second_order_change",
    "take_examples",
    # --- diagnostics names (issue 4) begin ---
    # --- diagnostics names (issue 4) end ---
    # --- first-order names (issue 3) begin ---
    # --- first-order names (issue 3) end ---
)
