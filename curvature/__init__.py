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
from curvature._inject import inject_hyperparams
from curvature._inject import structural_args
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
from curvature._diagnostics import condition_number
from curvature._diagnostics import ConditionNumber
from curvature._diagnostics import density_on_grid
from curvature._diagnostics import DensityOnGrid
from curvature._diagnostics import hutchinson_trace
from curvature._diagnostics import monitor
from curvature._diagnostics import MonitorMetrics
from curvature._diagnostics import MonitorState
from curvature._diagnostics import negative_curvature
from curvature._diagnostics import NegativeCurvature
from curvature._diagnostics import plot_spectral_density
from curvature._diagnostics import spectral_density
from curvature._diagnostics import SpectralDensity
from curvature._diagnostics import TraceEstimate
from curvature._lanczos import bottom_eigenpairs
from curvature._lanczos import Eigenpairs
from curvature._lanczos import lanczos
from curvature._lanczos import LanczosResult
from curvature._lanczos import power_iteration
from curvature._lanczos import PowerIterationResult
from curvature._lanczos import ritz_values
from curvature._lanczos import top_eigenpairs
from curvature._lanczos import tridiagonal
from curvature._taylor import taylor_models
from curvature._taylor import TaylorModels
# --- diagnostics (issue 4) end ---

# --- first-order primitives and aliases (issue 3) begin ---
from curvature._adadelta import scale_by_adadelta
from curvature._adadelta import scale_by_delta_bar_delta
from curvature._adadelta import ScaleByAdaDeltaState
from curvature._adadelta import ScaleByDeltaBarDeltaState
from curvature._averaging import averaged_params
from curvature._averaging import polyak_averaging
from curvature._averaging import PolyakAveragingState
from curvature._diagonal import precondition
from curvature._diagonal import scale_by_diagonal
from curvature._diagonal import ScaleByDiagonalState
from curvature._first_order import adadelta
from curvature._first_order import adagrad
from curvature._first_order import adam
from curvature._first_order import delta_bar_delta
from curvature._first_order import heavy_ball
from curvature._first_order import nesterov
from curvature._first_order import rmsprop
from curvature._first_order import sgd
from curvature._moments import debias
from curvature._moments import ema_update
from curvature._moments import scale_by_ema
from curvature._moments import scale_by_running_sum
from curvature._moments import ScaleByEmaState
from curvature._moments import ScaleByRunningSumState
from curvature._momentum import lookahead_params
from curvature._momentum import scale_by_momentum
from curvature._momentum import ScaleByMomentumState
# --- first-order primitives and aliases (issue 3) end ---

# --- natural gradient and K-FAC (issue 5) begin ---
from curvature._curvature_diagonals import CurvatureDiagonalState
from curvature._curvature_diagonals import ema_curvature_diagonal
from curvature._curvature_diagonals import ggn_diagonal
from curvature._curvature_diagonals import hutchinson_hessian_diagonal
from curvature._curvature_diagonals import sampled_fisher_diagonal
from curvature._curvature_diagonals import scale_by_curvature_diagonal
from curvature._kfac import kfac
from curvature._kfac import kfac_blocks
from curvature._kfac import kfac_summary
from curvature._kfac import KfacBlock
from curvature._kfac import scale_by_kfac
from curvature._kfac import ScaleByKfacState
from curvature._layers import discover_layers
from curvature._natural_gradient import natural_gradient
from curvature._natural_gradient import scale_by_natural_gradient
# --- natural gradient and K-FAC (issue 5) end ---

# --- datasets (issue 6) begin ---
from curvature import datasets
# --- datasets (issue 6) end ---

# --- block diagonal (issue 5) begin ---
from curvature._block_diagonal import block_diagonal_blocks
from curvature._block_diagonal import block_diagonal_curvature
from curvature._block_diagonal import block_diagonal_natural_gradient
from curvature._block_diagonal import block_diagonal_summary
from curvature._block_diagonal import BlockDiagonalCurvature
from curvature._block_diagonal import CurvatureBlock
from curvature._block_diagonal import scale_by_block_diagonal
from curvature._block_diagonal import ScaleByBlockDiagonalState
# --- block diagonal (issue 5) end ---

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
    "inject_hyperparams",
    "levenberg_marquardt",
    "linearize",
    "losses",
    "newton",
    "objective",
    "reduction_ratio",
    "sampled_fisher_vector_product",
    "scale_by_hessian_free",
    "second_order_change",
    "structural_args",
    "take_examples",
    # --- diagnostics names (issue 4) begin ---
    "ConditionNumber",
    "DensityOnGrid",
    "Eigenpairs",
    "LanczosResult",
    "MonitorMetrics",
    "MonitorState",
    "NegativeCurvature",
    "PowerIterationResult",
    "SpectralDensity",
    "TaylorModels",
    "TraceEstimate",
    "bottom_eigenpairs",
    "condition_number",
    "density_on_grid",
    "hutchinson_trace",
    "lanczos",
    "monitor",
    "negative_curvature",
    "plot_spectral_density",
    "power_iteration",
    "ritz_values",
    "spectral_density",
    "taylor_models",
    "top_eigenpairs",
    "tridiagonal",
    # --- diagnostics names (issue 4) end ---
    # --- first-order names (issue 3) begin ---
    "PolyakAveragingState",
    "ScaleByAdaDeltaState",
    "ScaleByDeltaBarDeltaState",
    "ScaleByDiagonalState",
    "ScaleByEmaState",
    "ScaleByMomentumState",
    "ScaleByRunningSumState",
    "adadelta",
    "adagrad",
    "adam",
    "averaged_params",
    "debias",
    "delta_bar_delta",
    "ema_update",
    "heavy_ball",
    "lookahead_params",
    "nesterov",
    "polyak_averaging",
    "precondition",
    "rmsprop",
    "scale_by_adadelta",
    "scale_by_delta_bar_delta",
    "scale_by_diagonal",
    "scale_by_ema",
    "scale_by_momentum",
    "scale_by_running_sum",
    "sgd",
    # --- first-order names (issue 3) end ---
    # --- issue 5 names begin ---
    "CurvatureDiagonalState",
    "KfacBlock",
    "ScaleByKfacState",
    "discover_layers",
    "ema_curvature_diagonal",
    "ggn_diagonal",
    "hutchinson_hessian_diagonal",
    "kfac",
    "kfac_blocks",
    "kfac_summary",
    "natural_gradient",
    "sampled_fisher_diagonal",
    "scale_by_curvature_diagonal",
    "scale_by_kfac",
    "scale_by_natural_gradient",
    # --- issue 5 names end ---
    # --- datasets (issue 6) begin ---
    "datasets",
    # --- datasets (issue 6) end ---
    # --- block diagonal names begin ---
    "BlockDiagonalCurvature",
    "CurvatureBlock",
    "ScaleByBlockDiagonalState",
    "block_diagonal_blocks",
    "block_diagonal_curvature",
    "block_diagonal_natural_gradient",
    "block_diagonal_summary",
    "scale_by_block_diagonal",
    # --- block diagonal names end ---
)
