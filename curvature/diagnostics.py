"""Curvature diagnostics: ``curvature.diagnostics``.

Everything that measures a curvature matrix or a preconditioner instead of
taking a step, in one namespace. Every name is also available at the top
level: ``curvature.top_eigenpairs`` is
``curvature.diagnostics.top_eigenpairs``.

* **Extreme eigenvalues**: :func:`top_eigenpairs`, :func:`bottom_eigenpairs`
  (Lanczos with reorthogonalization), :func:`power_iteration`, and the
  Lanczos building blocks :func:`lanczos`, :func:`tridiagonal` and
  :func:`ritz_values`.
* **Spectral density and trace**: :func:`spectral_density` (stochastic
  Lanczos quadrature), :func:`density_on_grid`, :func:`plot_spectral_density`
  and :func:`hutchinson_trace`.
* **Conditioning**: :func:`condition_number`, :func:`negative_curvature`.
* **Per-block results**: every diagnostic above takes ``blocks=``; the blocks
  of a model are listed by :func:`diagnostic_blocks`.
* **Preconditioner quality**: :func:`preconditioned_spectrum` (the spectrum of
  ``P^{-1/2}(C+λI)P^{-1/2}`` and the direction cosine), with the ``P⁻¹`` of
  each optimizer's state from :func:`identity_preconditioner`,
  :func:`adam_preconditioner`, :func:`diagonal_preconditioner`,
  :func:`block_diagonal_preconditioner`, :func:`kfac_preconditioner`,
  :func:`shampoo_preconditioner` and :func:`soap_preconditioner`.
* **During training**: :func:`monitor`, a transform that records the
  curvature along the step, and the layout summaries :func:`kfac_summary`,
  :func:`block_diagonal_summary` and :func:`kronecker_family_summary`.

Example:
  >>> import jax.numpy as jnp
  >>> from curvature import diagnostics
  >>> matvec = lambda v: jnp.array([3.0, 1.0]) * v
  >>> result = diagnostics.top_eigenpairs(matvec, jnp.ones(2), k=1,
  ...                                     num_iterations=2)
  >>> print(round(float(result.eigenvalues[0]), 4))
  3.0
"""

from curvature._block_diagonal import block_diagonal_summary
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
from curvature._kfac import kfac_summary
from curvature._kronecker_family import kronecker_family_summary
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
from curvature._preconditioner_quality import PreconditionedSpectrum
from curvature._preconditioner_quality import adam_preconditioner
from curvature._preconditioner_quality import block_diagonal_preconditioner
from curvature._preconditioner_quality import diagonal_preconditioner
from curvature._preconditioner_quality import identity_preconditioner
from curvature._preconditioner_quality import kfac_preconditioner
from curvature._preconditioner_quality import preconditioned_spectrum
from curvature._preconditioner_quality import shampoo_preconditioner
from curvature._preconditioner_quality import soap_preconditioner

__all__ = (
    "adam_preconditioner",
    "block_diagonal_preconditioner",
    "block_diagonal_summary",
    "bottom_eigenpairs",
    "condition_number",
    "ConditionNumber",
    "density_on_grid",
    "DensityOnGrid",
    "diagnostic_blocks",
    "diagonal_preconditioner",
    "Eigenpairs",
    "hutchinson_trace",
    "identity_preconditioner",
    "kfac_preconditioner",
    "kfac_summary",
    "kronecker_family_summary",
    "lanczos",
    "LanczosResult",
    "monitor",
    "MonitorMetrics",
    "MonitorState",
    "negative_curvature",
    "NegativeCurvature",
    "plot_spectral_density",
    "power_iteration",
    "PowerIterationResult",
    "preconditioned_spectrum",
    "PreconditionedSpectrum",
    "ritz_values",
    "shampoo_preconditioner",
    "soap_preconditioner",
    "spectral_density",
    "SpectralDensity",
    "top_eigenpairs",
    "TraceEstimate",
    "tridiagonal",
)
