"""curvature: second-order and curvature-aware optimizers for optax.

Every optimizer is an ``optax.GradientTransformation`` built from a few shared
primitives: curvature-vector products (Hessian, generalized Gauss-Newton, true
and empirical Fisher), a conjugate-gradient solver that runs inside
``lax.while_loop``, damping, moments with bias correction and momentum.
"""

from curvature import datasets
from curvature import diagnostics
from curvature import losses
from curvature._adadelta import ScaleByAdaDeltaState
from curvature._adadelta import ScaleByDeltaBarDeltaState
from curvature._adadelta import scale_by_adadelta
from curvature._adadelta import scale_by_delta_bar_delta
from curvature._averaging import PolyakAveragingState
from curvature._averaging import averaged_params
from curvature._averaging import polyak_averaging
from curvature._block_diagonal import BlockDiagonalCurvature
from curvature._block_diagonal import CurvatureBlock
from curvature._block_diagonal import ScaleByBlockDiagonalState
from curvature._block_diagonal import block_diagonal_blocks
from curvature._block_diagonal import block_diagonal_curvature
from curvature._block_diagonal import block_diagonal_natural_gradient
from curvature._block_diagonal import block_diagonal_summary
from curvature._block_diagonal import scale_by_block_diagonal
from curvature._blocks import BlockRow
from curvature._cg import CGResult
from curvature._cg import CGStatus
from curvature._cg import conjugate_gradient
from curvature._curvature_diagonals import CurvatureDiagonalState
from curvature._curvature_diagonals import ema_curvature_diagonal
from curvature._curvature_diagonals import ggn_diagonal
from curvature._curvature_diagonals import hutchinson_hessian_diagonal
from curvature._curvature_diagonals import sampled_fisher_diagonal
from curvature._curvature_diagonals import scale_by_curvature_diagonal
from curvature._diagnostics import ConditionNumber
from curvature._diagnostics import DensityOnGrid
from curvature._diagnostics import MonitorMetrics
from curvature._diagnostics import MonitorState
from curvature._diagnostics import NegativeCurvature
from curvature._diagnostics import SpectralDensity
from curvature._diagnostics import TraceEstimate
from curvature._diagnostics import condition_number
from curvature._diagnostics import density_on_grid
from curvature._diagnostics import hutchinson_trace
from curvature._diagnostics import monitor
from curvature._diagnostics import negative_curvature
from curvature._diagnostics import plot_spectral_density
from curvature._diagnostics import spectral_density
from curvature._diagonal import ScaleByDiagonalState
from curvature._diagonal import precondition
from curvature._diagonal import scale_by_diagonal
from curvature._first_order import adadelta
from curvature._first_order import adagrad
from curvature._first_order import adam
from curvature._first_order import delta_bar_delta
from curvature._first_order import heavy_ball
from curvature._first_order import nesterov
from curvature._first_order import rmsprop
from curvature._first_order import sgd
from curvature._grafting import ScaleByGraftState
from curvature._grafting import scale_by_graft
from curvature._hessian_free import PRECONDITIONERS
from curvature._hessian_free import HessianFreeInfo
from curvature._hessian_free import ScaleByHessianFreeState
from curvature._hessian_free import damped_newton
from curvature._hessian_free import gauss_newton
from curvature._hessian_free import hessian_free
from curvature._hessian_free import levenberg_marquardt
from curvature._hessian_free import newton
from curvature._hessian_free import scale_by_hessian_free
from curvature._inject import inject_hyperparams
from curvature._inject import structural_args
from curvature._kfac import KfacBlock
from curvature._kfac import ScaleByKfacState
from curvature._kfac import kfac
from curvature._kfac import kfac_blocks
from curvature._kfac import kfac_summary
from curvature._kfac import scale_by_kfac
from curvature._kronecker_family import ScaleByShampooState
from curvature._kronecker_family import ScaleBySoapState
from curvature._kronecker_family import ekfac
from curvature._kronecker_family import kronecker_family_summary
from curvature._kronecker_family import scale_by_shampoo
from curvature._kronecker_family import scale_by_soap
from curvature._kronecker_family import shampoo
from curvature._kronecker_family import soap
from curvature._lanczos import Eigenpairs
from curvature._lanczos import LanczosResult
from curvature._lanczos import PowerIterationResult
from curvature._lanczos import bottom_eigenpairs
from curvature._lanczos import diagnostic_blocks
from curvature._lanczos import lanczos
from curvature._lanczos import power_iteration
from curvature._lanczos import ritz_values
from curvature._lanczos import top_eigenpairs
from curvature._lanczos import tridiagonal
from curvature._layers import discover_layers
from curvature._moments import ScaleByEmaState
from curvature._moments import ScaleByRunningSumState
from curvature._moments import debias
from curvature._moments import ema_update
from curvature._moments import scale_by_ema
from curvature._moments import scale_by_running_sum
from curvature._momentum import ScaleByMomentumState
from curvature._momentum import lookahead_params
from curvature._momentum import scale_by_momentum
from curvature._natural_gradient import natural_gradient
from curvature._natural_gradient import scale_by_natural_gradient
from curvature._nonlinear_cg import ScaleByNonlinearCGState
from curvature._nonlinear_cg import nonlinear_cg
from curvature._nonlinear_cg import scale_by_nonlinear_cg
from curvature._preconditioner_quality import PreconditionedSpectrum
from curvature._preconditioner_quality import adam_preconditioner
from curvature._preconditioner_quality import block_diagonal_preconditioner
from curvature._preconditioner_quality import diagonal_preconditioner
from curvature._preconditioner_quality import identity_preconditioner
from curvature._preconditioner_quality import kfac_preconditioner
from curvature._preconditioner_quality import preconditioned_spectrum
from curvature._preconditioner_quality import shampoo_preconditioner
from curvature._preconditioner_quality import soap_preconditioner
from curvature._products import CURVATURES
from curvature._products import Linearization
from curvature._products import batch_size
from curvature._products import default_targets
from curvature._products import empirical_fisher_diagonal
from curvature._products import empirical_fisher_vector_product
from curvature._products import fisher_vector_product
from curvature._products import ggn_vector_product
from curvature._products import hessian_vector_product
from curvature._products import linearize
from curvature._products import objective
from curvature._products import sampled_fisher_vector_product
from curvature._products import take_examples
from curvature._quasi_newton import ScaleByBfgsState
from curvature._quasi_newton import WithObjectiveState
from curvature._quasi_newton import bfgs
from curvature._quasi_newton import lbfgs
from curvature._quasi_newton import scale_by_bfgs
from curvature._quasi_newton import with_objective
from curvature._saddle_free import ScaleBySaddleFreeNewtonState
from curvature._saddle_free import saddle_free_newton
from curvature._saddle_free import scale_by_saddle_free_newton
from curvature._taylor import TaylorModels
from curvature._taylor import first_order_change
from curvature._taylor import reduction_ratio
from curvature._taylor import second_order_change
from curvature._taylor import taylor_models

__version__ = "0.1.0"

__all__ = (
    "adadelta",
    "adagrad",
    "adam",
    "adam_preconditioner",
    "averaged_params",
    "batch_size",
    "bfgs",
    "block_diagonal_blocks",
    "block_diagonal_curvature",
    "block_diagonal_natural_gradient",
    "block_diagonal_preconditioner",
    "block_diagonal_summary",
    "BlockDiagonalCurvature",
    "BlockRow",
    "bottom_eigenpairs",
    "CGResult",
    "CGStatus",
    "condition_number",
    "ConditionNumber",
    "conjugate_gradient",
    "CurvatureBlock",
    "CurvatureDiagonalState",
    "CURVATURES",
    "damped_newton",
    "datasets",
    "debias",
    "default_targets",
    "delta_bar_delta",
    "density_on_grid",
    "DensityOnGrid",
    "diagnostic_blocks",
    "diagnostics",
    "diagonal_preconditioner",
    "discover_layers",
    "Eigenpairs",
    "ekfac",
    "ema_curvature_diagonal",
    "ema_update",
    "empirical_fisher_diagonal",
    "empirical_fisher_vector_product",
    "first_order_change",
    "fisher_vector_product",
    "gauss_newton",
    "ggn_diagonal",
    "ggn_vector_product",
    "heavy_ball",
    "HessianFreeInfo",
    "hessian_free",
    "hessian_vector_product",
    "hutchinson_hessian_diagonal",
    "hutchinson_trace",
    "identity_preconditioner",
    "inject_hyperparams",
    "kfac",
    "kfac_blocks",
    "kfac_preconditioner",
    "kfac_summary",
    "KfacBlock",
    "kronecker_family_summary",
    "lanczos",
    "LanczosResult",
    "lbfgs",
    "levenberg_marquardt",
    "Linearization",
    "linearize",
    "lookahead_params",
    "losses",
    "monitor",
    "MonitorMetrics",
    "MonitorState",
    "natural_gradient",
    "negative_curvature",
    "NegativeCurvature",
    "nesterov",
    "newton",
    "nonlinear_cg",
    "objective",
    "plot_spectral_density",
    "polyak_averaging",
    "PolyakAveragingState",
    "power_iteration",
    "PowerIterationResult",
    "precondition",
    "preconditioned_spectrum",
    "PreconditionedSpectrum",
    "PRECONDITIONERS",
    "reduction_ratio",
    "ritz_values",
    "rmsprop",
    "saddle_free_newton",
    "sampled_fisher_diagonal",
    "sampled_fisher_vector_product",
    "scale_by_adadelta",
    "scale_by_bfgs",
    "scale_by_block_diagonal",
    "scale_by_curvature_diagonal",
    "scale_by_delta_bar_delta",
    "scale_by_diagonal",
    "scale_by_ema",
    "scale_by_graft",
    "scale_by_hessian_free",
    "scale_by_kfac",
    "scale_by_momentum",
    "scale_by_natural_gradient",
    "scale_by_nonlinear_cg",
    "scale_by_running_sum",
    "scale_by_saddle_free_newton",
    "scale_by_shampoo",
    "scale_by_soap",
    "ScaleByAdaDeltaState",
    "ScaleByBfgsState",
    "ScaleByBlockDiagonalState",
    "ScaleByDeltaBarDeltaState",
    "ScaleByDiagonalState",
    "ScaleByEmaState",
    "ScaleByGraftState",
    "ScaleByHessianFreeState",
    "ScaleByKfacState",
    "ScaleByMomentumState",
    "ScaleByNonlinearCGState",
    "ScaleByRunningSumState",
    "ScaleBySaddleFreeNewtonState",
    "ScaleByShampooState",
    "ScaleBySoapState",
    "second_order_change",
    "sgd",
    "shampoo",
    "shampoo_preconditioner",
    "soap",
    "soap_preconditioner",
    "spectral_density",
    "SpectralDensity",
    "structural_args",
    "take_examples",
    "taylor_models",
    "TaylorModels",
    "top_eigenpairs",
    "TraceEstimate",
    "tridiagonal",
    "with_objective",
    "WithObjectiveState",
)
