"""Curvature diagnostics: trace, density, conditioning, saddles, monitoring.

Each estimator takes a symmetric ``matvec`` on parameter pytrees, typically
``curvature.linearize(predict_fn, loss, params, batch, curvature=...).matvec``
for the Hessian, the GGN or a Fisher, so one linearization serves every
product. Loops are ``lax.scan`` / ``lax.while_loop`` / ``lax.map`` and jit.
Results carry a ``finite`` flag: an operator that produces NaN or Inf gives a
flagged result, never a silent NaN. A ``matvec`` whose output does not
match the parameters' pytree raises a ``ValueError`` at trace time naming
the first differing leaf. For bfloat16 or float16 parameters the Lanczos and
power recurrences and the small tridiagonal eigendecompositions run in
float32 (the operator is still applied in the parameters' dtype). The
Lanczos and power-iteration primitives live in :mod:`curvature._lanczos`.
"""

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from curvature import _lanczos
from curvature import _losses
from curvature import _optax_typed
from curvature import _products
from curvature import _sharding
from curvature import _validation

Array = jax.Array
Params = Any
Matvec = Callable[[Params], Params]


def _key(key: Optional[Array]) -> Array:
  return jax.random.key(0) if key is None else key


# Hutchinson trace ----------------------------------------------------------


class TraceEstimate(NamedTuple):
  """A Hutchinson trace estimate.

  Attributes:
    trace: the sample mean of ``zᵀAz``.
    standard_error: the sample standard deviation over ``√num_samples``.
    num_samples: the number of probes.
    finite: ``False`` if the operator produced a NaN or an Inf.
  """

  trace: Array
  standard_error: Array
  num_samples: int
  finite: Array


def _rademacher_like(flat: Array, key: Array) -> Array:
  return jax.random.rademacher(key, flat.shape, flat.dtype)


def _trace_estimate(samples: Array, num_samples: int) -> TraceEstimate:
  return TraceEstimate(
      trace=jnp.mean(samples),
      standard_error=jnp.std(samples, ddof=1) / jnp.sqrt(num_samples),
      num_samples=num_samples,
      finite=jnp.all(jnp.isfinite(samples)),
  )


def _trace_samples(matvec, params, key, num_samples) -> Array:
  """``zᵀAz`` for ``num_samples`` Rademacher probes, in ``lax.scan``."""
  flat, unravel = _sharding.ravel(params)
  matvec = _lanczos.checked_matvec(matvec, params)

  def quadratic_form(carry, probe_key):
    probe = unravel(_rademacher_like(flat, probe_key))
    return carry, _optax_typed.vdot(probe, matvec(probe))

  _, samples = jax.lax.scan(
      quadratic_form, None, jax.random.split(key, num_samples))
  return samples


def _hutchinson(matvec, params, key, *, num_samples, named):
  def core(operator, vector, probe_key, _):
    return _trace_estimate(
        _trace_samples(operator, vector, probe_key, num_samples), num_samples)

  return _lanczos.on_blocks(core, matvec, params, key, named, None)


def _with_num_samples(result, num_samples):
  """Restores the Python int ``num_samples`` (a jitted call returns arrays)."""
  if isinstance(result, dict):
    return {n: r._replace(num_samples=num_samples) for n, r in result.items()}
  return result._replace(num_samples=num_samples)


def hutchinson_trace(
    matvec: Matvec,
    params: Params,
    *,
    num_samples: int = 100,
    key: Optional[Array] = None,
    blocks: _lanczos.Blocks = None,
    predict_fn: Optional[Callable[[Params, Any], Any]] = None,
    batch: Any = None,
) -> Union[TraceEstimate, dict]:
  r"""Hutchinson's unbiased trace estimate with Rademacher probes.

  .. math::
    \operatorname{tr} A \approx \frac1S \sum_{s=1}^S z_s^\top A z_s, \qquad
    z_s \in \{-1, +1\}^n \text{ uniform},
    \qquad \mathrm{SE} = \frac{\operatorname{std}(z_s^\top A z_s)}{\sqrt S}.

  Rademacher probes have the least variance among i.i.d. probes,
  ``Var = 2 Σ_{i≠j} A_ij²``: the diagonal contributes nothing, so a diagonal
  ``A`` is recovered exactly. One operator product per probe, in
  ``lax.scan``.

  **Outside jit.** Every diagnostic compiles itself when called outside
  ``jit``, once per ``matvec`` object (a small cache keeps the 16 most
  recent): call it again with the same ``matvec`` and it runs as fast as a
  jitted call. The arrays ``matvec`` closes over become constants of that
  program; to reuse one compiled program for fresh linearizations, call the
  diagnostic inside your own ``jax.jit`` (it then runs in your trace).

  Args:
    matvec: ``v ↦ A v`` on pytrees, symmetric ``A``.
    params: a pytree with the shapes and dtypes ``A`` acts on.
    num_samples: probes ``S ≥ 2`` (PyHessian uses up to 100).
    key: PRNG key; ``jax.random.key(0)`` if ``None``.
    blocks: ``None`` (the whole operator), ``"leaves"``, ``"layers"`` or a
      mapping ``{path pattern: block name}``: the trace of each diagonal
      block ``C_bb``, from probes masked to the block (see
      :func:`curvature.top_eigenpairs`). The block traces add up to the
      whole trace.
    predict_fn: ``(params, batch) -> outputs``, for ``blocks="layers"``.
    batch: a batch, for ``blocks="layers"``.

  Returns:
    A :class:`TraceEstimate`, or ``{block name: TraceEstimate}`` with
    ``blocks``; the exact trace lies within a few standard errors.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
    >>> def matvec(v):  # A = diag(1, 2, 3, 4, 5) on {"a": 2, "b": 3} entries
    ...   return {"a": jnp.asarray([1., 2.]) * v["a"],
    ...           "b": jnp.asarray([3., 4., 5.]) * v["b"]}
    >>> est = curvature.hutchinson_trace(matvec, params, num_samples=10)
    >>> round(float(est.trace), 4)  # exact for a diagonal A
    15.0
    >>> per_leaf = curvature.hutchinson_trace(matvec, params, num_samples=10,
    ...                                       blocks="leaves")
    >>> {name: round(float(e.trace), 4) for name, e in per_leaf.items()}
    {'a': 3.0, 'b': 12.0}

  References:
    Hutchinson, "A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines", Communications in Statistics -
    Simulation and Computation 18(3), 1989. Yao, Gholami, Keutzer & Mahoney,
    "PyHessian: Neural networks through the lens of the Hessian", IEEE Big
    Data 2020.
  """
  if isinstance(num_samples, int) and not isinstance(num_samples, bool) and (
      num_samples < 2):
    raise ValueError(
        f"`num_samples` must be >= 2 to estimate a standard error, got"
        f" {num_samples}. Pass num_samples=100 (PyHessian's cap) or more."
    )
  num_samples = _validation.check_static_int("num_samples", num_samples, 2)
  if _lanczos.dimension(params) == 0:
    raise ValueError("The parameter pytree is empty: there is no operator.")
  named = None if blocks is None else _lanczos.resolve_blocks(
      blocks, params, predict_fn, batch)
  result = _lanczos.jit_call(_hutchinson, matvec, params, _key(key),
                             num_samples=num_samples, named=named)
  return _with_num_samples(result, num_samples)


# Stochastic Lanczos quadrature --------------------------------------------


class SpectralDensity(NamedTuple):
  """The spectral density as Gauss quadrature nodes and weights.

  ``φ(t) ≈ (1/P) Σ_p Σ_k weights[p, k] · δ(t − nodes[p, k])``; each probe's
  weights sum to one.

  Attributes:
    nodes: Ritz values ``[num_probes, m]``.
    weights: squared first components of the Ritz vectors of ``T``,
      ``[num_probes, m]``.
    finite: ``False`` if the operator produced a NaN or an Inf.
  """

  nodes: Array
  weights: Array
  finite: Array


PROBE_MEMORY = 1 << 29
"""Bytes of Lanczos bases :func:`spectral_density` keeps at once (512 MiB)."""


def _probe_batch_size(probe_batch_size, num_probes, num_iterations, n,
                      itemsize, mode) -> int:
  if probe_batch_size is not None:
    return min(_validation.check_static_int(
        "probe_batch_size", probe_batch_size, 1), num_probes)
  rows = num_iterations if mode is not None else 3
  fits = PROBE_MEMORY // max(1, rows * n * itemsize)
  return int(max(1, min(num_probes, fits)))


def _density(matvec, params, key, *, num_iterations, num_probes,
             reorthogonalize, probe_batch_size):
  """Nodes, weights and finiteness of ``num_probes`` SLQ runs.

  Groups of ``probe_batch_size`` probes run together
  (:func:`curvature._lanczos.lanczos_probes`); the groups, and the probes of
  ``"partial"`` reorthogonalization, run one after another in ``lax.map``.
  """
  flat, unravel = _sharding.ravel(params)
  mode = _lanczos.reorthogonalization_mode(reorthogonalize)
  dtype = _lanczos.compute_dtype(flat.dtype)
  batch_size = 1 if mode == "partial" else _probe_batch_size(
      probe_batch_size, num_probes, num_iterations, flat.size,
      dtype.itemsize, mode)
  num_groups = -(-num_probes // batch_size)
  keys = jax.random.split(key, num_groups * batch_size).reshape(
      num_groups, batch_size)

  def group(group_keys):
    starts = jax.vmap(lambda k: _rademacher_like(
        flat.astype(dtype), jax.random.split(k)[0]))(group_keys)
    if mode == "partial":
      result = _lanczos.lanczos(
          matvec, unravel(starts[0]), num_iterations,
          reorthogonalize=reorthogonalize,
          key=jax.random.split(group_keys[0])[1])
      result = jax.tree.map(lambda x: x[None], result._replace(
          basis=None, num_reorthogonalizations=None, valid_start=None))
    else:
      result = _lanczos.lanczos_probes(
          matvec, params, starts, num_iterations,
          reorthogonalize=reorthogonalize,
          key=jax.random.split(group_keys[0])[1])
    nodes, vectors = jax.vmap(_lanczos.eigh_tridiagonal)(result)
    return nodes, vectors[:, 0] ** 2, result.finite

  nodes, weights, finite = jax.lax.map(group, keys)
  flatten = lambda x: x.reshape((-1,) + x.shape[2:])[:num_probes]
  return SpectralDensity(flatten(nodes), flatten(weights),
                         jnp.all(flatten(finite)))


def _spectral_density(matvec, params, key, *, num_iterations, num_probes,
                      reorthogonalize, probe_batch_size, named):
  def core(operator, vector, probe_key, steps):
    return _density(operator, vector, probe_key, num_iterations=steps,
                    num_probes=num_probes, reorthogonalize=reorthogonalize,
                    probe_batch_size=probe_batch_size)

  return _lanczos.on_blocks(core, matvec, params, key, named, num_iterations,
                            default=100)


def spectral_density(
    matvec: Matvec,
    params: Params,
    *,
    num_iterations: Optional[int] = None,
    num_probes: int = 1,
    reorthogonalize: _lanczos.Reorthogonalization = "full",
    key: Optional[Array] = None,
    probe_batch_size: Optional[int] = None,
    blocks: _lanczos.Blocks = None,
    predict_fn: Optional[Callable[[Params, Any], Any]] = None,
    batch: Any = None,
) -> Union[SpectralDensity, dict]:
  r"""Stochastic Lanczos quadrature (SLQ) estimate of the eigenvalue density.

  The density ``φ(t) = (1/n) Σᵢ δ(t − λᵢ)`` is approximated by averaging,
  over Rademacher probes ``v`` with ``‖v‖ = 1``, the Gauss quadrature rule of
  the spectral measure of ``v``: ``m`` Lanczos steps give ``T = S Θ Sᵀ`` and

  .. math::
    v^\top \delta(t - A)\, v \approx \sum_{k=1}^m (e_1^\top s_k)^2\,
    \delta(t - \theta_k).

  The rule integrates polynomials of degree ``2m − 1`` exactly, so the
  outliers are resolved as single nodes and the bulk as a smeared cloud
  (Ghorbani et al. 2019; PyHessian). :func:`density_on_grid` broadens the
  nodes with Gaussians; :func:`plot_spectral_density` draws it.

  The probes run together under ``vmap`` (one batched operator product per
  Lanczos step) as long as their bases fit in :data:`PROBE_MEMORY` bytes,
  else in groups of that size under ``lax.map``.

  Args:
    matvec: ``v ↦ A v`` on pytrees, symmetric ``A``.
    params: a pytree with the shapes and dtypes ``A`` acts on.
    num_iterations: Lanczos steps per probe; ``min(100, n)`` if ``None``
      (PyHessian's 100).
    num_probes: independent probes ``P``.
    reorthogonalize: ``"full"`` (PyHessian's default),
      ``"partial"`` (Simon 1984: only when the estimated loss of
      orthogonality exceeds √ε; same Ritz values, less work) or ``"none"``
      (``O(n)`` memory, but ghost copies of outliers appear).
    key: PRNG key; ``jax.random.key(0)`` if ``None``.
    probe_batch_size: probes run at once; ``None`` picks the most whose
      bases fit in :data:`PROBE_MEMORY`.
    blocks: ``None`` (the whole operator), ``"leaves"``, ``"layers"`` or a
      mapping ``{path pattern: block name}``: the density of each diagonal
      block ``C_bb`` (see :func:`curvature.top_eigenpairs`), each with
      ``min(num_iterations, n_b)`` steps.
    predict_fn: ``(params, batch) -> outputs``, for ``blocks="layers"``.
    batch: a batch, for ``blocks="layers"``.

  Returns:
    A :class:`SpectralDensity`, or ``{block name: SpectralDensity}`` with
    ``blocks``.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
    >>> def matvec(v):  # A = diag(1, 2, 3, 4, 5) on {"a": 2, "b": 3} entries
    ...   return {"a": jnp.asarray([1., 2.]) * v["a"],
    ...           "b": jnp.asarray([3., 4., 5.]) * v["b"]}
    >>> density = curvature.spectral_density(matvec, params)
    >>> density.nodes.shape  # [num_probes, num_iterations = min(n, 30)]
    (1, 5)
    >>> [round(float(t), 4) for t in density.nodes[0]]  # n steps: exact
    [1.0, 2.0, 3.0, 4.0, 5.0]
    >>> round(float(density.weights.sum()), 4)
    1.0

  References:
    Lanczos 1950; Golub & Meurant, "Matrices, Moments and Quadrature with
    Applications", Princeton University Press, 2010.
    Ghorbani, Krishnan & Xiao, "An investigation into neural net
    optimization via Hessian eigenvalue density", ICML 2019. Yao et al.,
    "PyHessian", 2020. Sagun et al., "Empirical analysis of the Hessian of
    over-parametrized neural networks", arXiv:1706.04454, 2017. Martens,
    "New insights and
    perspectives on the natural gradient method", JMLR 2020.
  """
  _lanczos.reorthogonalization_mode(reorthogonalize)
  if isinstance(num_probes, int) and not isinstance(num_probes, bool) and (
      num_probes < 1):
    raise ValueError(
        f"`num_probes` must be >= 1, got {num_probes}. Pass num_probes=1"
        " (PyHessian's default) or more."
    )
  num_probes = _validation.check_static_int("num_probes", num_probes, 1)
  if probe_batch_size is not None:
    _validation.check_static_int("probe_batch_size", probe_batch_size, 1)
  if blocks is None:
    named = None
    if num_iterations is None:
      num_iterations = min(100, _lanczos.dimension(params))
    num_iterations = _lanczos.check_num_iterations(num_iterations, params)
  else:
    named = _lanczos.resolve_blocks(blocks, params, predict_fn, batch)
    num_iterations = _lanczos.check_block_iterations(num_iterations)
  return _lanczos.jit_call(
      _spectral_density, matvec, params, _key(key),
      num_iterations=num_iterations, num_probes=num_probes,
      reorthogonalize=reorthogonalize, probe_batch_size=probe_batch_size,
      named=named)


class DensityOnGrid(NamedTuple):
  """A broadened density: ``density[i]`` at ``grid[i]``; integrates to 1."""

  grid: Array
  density: Array


def density_on_grid(
    density: SpectralDensity,
    *,
    num_points: int = 10_000,
    variance: float = 1e-5,
) -> DensityOnGrid:
  r"""The SLQ density broadened by Gaussians, on a uniform grid.

  .. math::
    \hat\varphi(t) = \frac1P \sum_{p,k} w_{pk}\,
      \mathcal N(t;\, \theta_{pk},\, \sigma^2), \qquad
    \sigma^2 = \text{variance} \cdot \max(1, \lambda_{\max} - \lambda_{\min}),

  on ``num_points`` points over ``[λmin − 3σ − 0.01, λmax + 3σ + 0.01]``,
  renormalized to integrate to one on the grid (PyHessian's convention).

  Args:
    density: a :class:`SpectralDensity`.
    num_points: grid size (10 000 as in PyHessian).
    variance: the broadening variance before scaling by the spectral width
      (1e-5 as in PyHessian).

  Returns:
    A :class:`DensityOnGrid`.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
    >>> def matvec(v):  # A = diag(1, 2, 3, 4, 5) on {"a": 2, "b": 3} entries
    ...   return {"a": jnp.asarray([1., 2.]) * v["a"],
    ...           "b": jnp.asarray([3., 4., 5.]) * v["b"]}
    >>> density = curvature.spectral_density(matvec, params)
    >>> grid, values = curvature.density_on_grid(density, num_points=1000)
    >>> grid.shape, values.shape
    ((1000,), (1000,))
    >>> round(float(values.sum() * (grid[1] - grid[0])), 4)  # integrates to 1
    1.0

  References:
    Ghorbani, Krishnan & Xiao 2019; Yao et al., "PyHessian", 2020.
  """
  num_points = _validation.check_static_int("num_points", num_points, 2)
  _validation.check_positive("variance", variance)
  lowest, highest = jnp.min(density.nodes), jnp.max(density.nodes)
  sigma2 = variance * jnp.maximum(1.0, highest - lowest)
  pad = 3.0 * jnp.sqrt(sigma2) + 0.01
  grid = jnp.linspace(lowest - pad, highest + pad, num_points)

  def probe_density(nodes_and_weights):
    nodes, weights = nodes_and_weights
    gaussians = jnp.exp(-((grid[:, None] - nodes) ** 2) / (2.0 * sigma2))
    return gaussians @ weights / jnp.sqrt(2.0 * jnp.pi * sigma2)

  values = jnp.mean(
      jax.lax.map(probe_density, (density.nodes, density.weights)), axis=0)
  values = values / (jnp.sum(values) * (grid[1] - grid[0]))
  return DensityOnGrid(grid, values)


def plot_spectral_density(
    density: SpectralDensity,
    ax=None,
    *,
    num_points: int = 10_000,
    variance: float = 1e-5,
    floor: float = 1e-7,
    **plot_kwargs,
):
  """Draws the broadened spectral density on a log scale (needs matplotlib).

  Plots ``density + floor`` against the eigenvalue with ``semilogy``, as
  PyHessian does; matplotlib is imported only here, so it stays an optional
  dependency.

  Args:
    density: a :class:`SpectralDensity`.
    ax: a matplotlib ``Axes``; a new figure's if ``None``.
    num_points: grid size for :func:`density_on_grid`.
    variance: broadening for :func:`density_on_grid`.
    floor: added before the log so that empty regions stay drawable.
    **plot_kwargs: passed to ``ax.semilogy``.

  Returns:
    The ``Axes``.

  Example:
    >>> import matplotlib
    >>> matplotlib.use("Agg")  # no display needed
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
    >>> def matvec(v):  # A = diag(1, 2, 3, 4, 5) on {"a": 2, "b": 3} entries
    ...   return {"a": jnp.asarray([1., 2.]) * v["a"],
    ...           "b": jnp.asarray([3., 4., 5.]) * v["b"]}
    >>> density = curvature.spectral_density(matvec, params)
    >>> ax = curvature.plot_spectral_density(density, num_points=1000)
    >>> ax.get_xlabel()
    'Eigenvalue'
    >>> # ax.figure.savefig("hessian_density.png")

  References:
    Ghorbani, Krishnan & Xiao 2019; Yao et al., "PyHessian", 2020.
  """
  try:
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        "plot_spectral_density needs matplotlib: `pip install matplotlib`."
    ) from error
  on_grid = density_on_grid(density, num_points=num_points, variance=variance)
  if ax is None:
    _, ax = plt.subplots()
  ax.semilogy(on_grid.grid, on_grid.density + floor, **plot_kwargs)
  ax.set_xlabel("Eigenvalue")
  ax.set_ylabel("Density (log scale)")
  return ax


# Conditioning and negative curvature ---------------------------------------


class ConditionNumber(NamedTuple):
  """A condition-number estimate from extreme Ritz values.

  Attributes:
    condition_number: ``λmax / λmin``; ``+∞`` unless ``λmin > 0``.
    largest: the largest Ritz value (a lower bound on ``λmax``).
    smallest: the smallest Ritz value (an upper bound on ``λmin``).
    finite: ``False`` if the operator produced a NaN or an Inf.
  """

  condition_number: Array
  largest: Array
  smallest: Array
  finite: Array


def _ritz_summary(matvec, params, key, *, num_iterations, reorthogonalize,
                  rtol, direction):
  """The extreme Ritz values (and the lowest Ritz vector) of one run."""
  ritz = _lanczos.ritz_decomposition(matvec, params, num_iterations, key,
                                     reorthogonalize)
  smallest, largest = ritz.values[0], ritz.values[-1]
  kappa = jnp.where(smallest > 0, largest / smallest, jnp.inf)
  out = ConditionNumber(kappa, largest, smallest, ritz.lanczos.finite)
  if not direction:
    return out
  lowest = _lanczos.select_pairs(ritz, params, jnp.arange(1))
  negative = smallest < -rtol * jnp.abs(largest)
  return NegativeCurvature(
      has_negative_curvature=negative,
      is_saddle=negative & (largest > 0),
      smallest=smallest,
      largest=largest,
      negative_ratio=_negative_ratio(smallest, largest),
      direction=jax.tree.map(lambda x: x[0], lowest.eigenvectors),
      finite=ritz.lanczos.finite,
  )


def _extremes(matvec, params, key, *, num_iterations, reorthogonalize, rtol,
              direction, named):
  def core(operator, vector, block_key, steps):
    return _ritz_summary(operator, vector, block_key, num_iterations=steps,
                         reorthogonalize=reorthogonalize, rtol=rtol,
                         direction=direction)

  def finish(out, indices):
    if not direction:
      return out
    return out._replace(direction=jax.tree.map(
        lambda x: x[0],
        _lanczos.embed_vectors(out.direction[None], indices, params)))

  return _lanczos.on_blocks(core, matvec, params, key, named, num_iterations,
                            finish=finish)


def _extreme_ritz(matvec, params, num_iterations, key, reorthogonalize,
                  blocks, predict_fn, batch, rtol=0.0, direction=False):
  """Validates, then one Lanczos run per block (or on the whole operator)."""
  if _lanczos.reorthogonalization_mode(reorthogonalize) is None:
    raise ValueError(
        "Ritz vectors need the Lanczos basis: pass reorthogonalize='full',"
        f" 'full' or 'partial', got {reorthogonalize!r}.")
  if blocks is None:
    named = None
    if num_iterations is None:
      num_iterations = _lanczos.default_num_iterations(params)
    num_iterations = _lanczos.check_num_iterations(num_iterations, params)
  else:
    named = _lanczos.resolve_blocks(blocks, params, predict_fn, batch)
    num_iterations = _lanczos.check_block_iterations(num_iterations)
  return _lanczos.jit_call(
      _extremes, matvec, params, _key(key), num_iterations=num_iterations,
      reorthogonalize=reorthogonalize, rtol=rtol, direction=direction,
      named=named)


def condition_number(
    matvec: Matvec,
    params: Params,
    *,
    num_iterations: Optional[int] = None,
    key: Optional[Array] = None,
    reorthogonalize: _lanczos.Reorthogonalization = "full",
    blocks: _lanczos.Blocks = None,
    predict_fn: Optional[Callable[[Params, Any], Any]] = None,
    batch: Any = None,
) -> Union[ConditionNumber, dict]:
  r"""Estimates ``κ = λmax / λmin`` from one Lanczos run.

  Both ends of the spectrum come from the same Ritz values ``θ₁ ≤ … ≤ θ_m``
  (interlacing gives ``λmin ≤ θ₁`` and ``θ_m ≤ λmax``). ``κ`` governs the
  rate of gradient descent, ``(κ − 1)/(κ + 1)`` per step on a quadratic. For
  an indefinite or singular matrix (``θ₁ ≤ 0``) ``κ = +∞``; see
  :func:`negative_curvature`. The smallest eigenvalue of a network's
  curvature lies in a dense bulk near zero and converges slowly: raise
  ``num_iterations`` until ``smallest`` settles.

  Args:
    matvec: ``v ↦ A v`` on pytrees, symmetric ``A``.
    params: a pytree with the shapes and dtypes ``A`` acts on.
    num_iterations: Lanczos steps; ``min(n, 30)`` if ``None``.
    key: PRNG key of the start vector.
    reorthogonalize: ``"full"`` or ``"partial"`` (Simon 1984: the
      same Ritz values for less work on a large basis).
    blocks: ``None`` (the whole operator), ``"leaves"``, ``"layers"`` or a
      mapping ``{path pattern: block name}``: ``κ`` of each diagonal block
      ``C_bb`` (see :func:`curvature.top_eigenpairs`).
    predict_fn: ``(params, batch) -> outputs``, for ``blocks="layers"``.
    batch: a batch, for ``blocks="layers"``.

  Returns:
    A :class:`ConditionNumber`, or ``{block name: ConditionNumber}``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> def predict(params, batch):
    ...   return batch["inputs"] @ params["w"]
    >>> batch = {"inputs": jnp.asarray([[1., 0.], [1., 1.], [1., 2.]]),
    ...          "targets": jnp.asarray([[1.], [3.], [5.]])}
    >>> params = {"w": jnp.zeros((2, 1))}
    >>> def loss_fn(params, batch):
    ...   return curvature.losses.squared_error.value(
    ...       predict(params, batch), batch["targets"])
    >>> grads = jax.grad(loss_fn)(params, batch)
    >>> lin = curvature.linearize(predict, curvature.losses.squared_error,
    ...                           params, batch)
    >>> estimate = curvature.condition_number(lin.matvec, params)
    >>> round(float(estimate.condition_number), 2)  # λmax / λmin of XᵀX / 3
    8.55

  References:
    Goodfellow, Bengio & Courville, *Deep Learning*, MIT Press 2016, ch. 8
    and Martens, "New insights and perspectives on the natural gradient
    method", JMLR 2020 (the condition number and convergence). Lanczos
    1950; Golub & Meurant 2010.
  """
  return _extreme_ritz(matvec, params, num_iterations, key, reorthogonalize,
                       blocks, predict_fn, batch)


class NegativeCurvature(NamedTuple):
  """The negative-curvature / saddle indicator of :func:`negative_curvature`.

  Attributes:
    has_negative_curvature: ``θ₁ < −rtol · |θ_m|``: a direction with
      ``dᵀAd < 0`` exists (a Ritz value is a Rayleigh quotient).
    is_saddle: eigenvalues of both signs: negative curvature and
      ``θ_m > 0``.
    smallest: ``θ₁``, an upper bound on ``λmin``.
    largest: ``θ_m``, a lower bound on ``λmax``.
    negative_ratio: ``max(0, −θ₁) / |θ_m|``, the size of the most negative
      curvature relative to the largest (PyHessian's saddle statistic); 0
      without negative curvature (the zero operator included), ``+∞`` if
      ``θ₁ < 0 = θ_m``.
    direction: the unit Ritz vector of ``θ₁``, a descent direction of the
      quadratic model in either sign (escape from a saddle along it).
    finite: ``False`` if the operator produced a NaN or an Inf.
  """

  has_negative_curvature: Array
  is_saddle: Array
  smallest: Array
  largest: Array
  negative_ratio: Array
  direction: Params
  finite: Array


def _negative_ratio(smallest: Array, largest: Array) -> Array:
  """``max(0, −θ₁) / |θ_m|`` without ``0 / 0`` (the zero operator gives 0)."""
  negative = jnp.maximum(0.0, -smallest)
  scale = jnp.abs(largest)
  ratio = negative / jnp.where(scale > 0, scale, 1.0)
  return jnp.where(negative > 0, jnp.where(scale > 0, ratio, jnp.inf), 0.0)


def negative_curvature(
    matvec: Matvec,
    params: Params,
    *,
    num_iterations: Optional[int] = None,
    rtol: float = 1e-5,
    key: Optional[Array] = None,
    reorthogonalize: _lanczos.Reorthogonalization = "full",
    blocks: _lanczos.Blocks = None,
    predict_fn: Optional[Callable[[Params, Any], Any]] = None,
    batch: Any = None,
) -> Union[NegativeCurvature, dict]:
  r"""Detects negative curvature and saddle points from one Lanczos run.

  At a critical point, ``H`` with eigenvalues of both signs is a saddle:
  Newton's method is attracted to it, and a step along the eigenvector of
  ``λmin < 0`` decreases the loss to second order,
  ``f(θ + εd) − f(θ) ≈ ½ ε² λmin``. Lanczos finds ``θ₁`` and its vector;
  ``θ₁ < 0`` certifies negative curvature because ``θ₁ = yᵀHy`` for the
  unit Ritz vector ``y``.

  Args:
    matvec: ``v ↦ A v`` on pytrees, usually the Hessian (a GGN or Fisher
      is positive semi-definite and never has negative curvature).
    params: a pytree with the shapes and dtypes ``A`` acts on.
    num_iterations: Lanczos steps; ``min(n, 30)`` if ``None``.
    rtol: ``θ₁`` counts as negative below ``−rtol · |θ_m|`` (rounding).
    key: PRNG key of the start vector.
    reorthogonalize: ``"full"`` or ``"partial"``, as in
      :func:`condition_number`.
    blocks: per-block results, as in :func:`condition_number`.
    predict_fn: for ``blocks="layers"``.
    batch: for ``blocks="layers"``.

  Returns:
    A :class:`NegativeCurvature`, or ``{block name: NegativeCurvature}``.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
    >>> def matvec(v):  # A = diag(−1, 2, 3, 4, 5): a saddle
    ...   return {"a": jnp.asarray([-1., 2.]) * v["a"],
    ...           "b": jnp.asarray([3., 4., 5.]) * v["b"]}
    >>> saddle = curvature.negative_curvature(matvec, params)
    >>> bool(saddle.is_saddle), round(float(saddle.smallest), 4)
    (True, -1.0)
    >>> round(float(saddle.negative_ratio), 4)  # |λmin| / λmax
    0.2
    >>> [round(abs(float(x)), 4) for x in saddle.direction["a"]]  # ±e₁
    [1.0, 0.0]

  References:
    Goodfellow, Bengio & Courville, *Deep Learning*, MIT Press 2016, ch. 8
    (saddle points and Newton's method). Dauphin et al., "Identifying and
    attacking the saddle point problem in high-dimensional non-convex
    optimization", NIPS 2014. Sagun
    et al. 2017; Yao et al., "PyHessian", 2020.
  """
  _validation.check_nonnegative("rtol", rtol)
  return _extreme_ritz(matvec, params, num_iterations, key, reorthogonalize,
                       blocks, predict_fn, batch, rtol=rtol, direction=True)


# Monitoring ------------------------------------------------------------------

_INNER_FIELDS = ("reduction_ratio", "damping", "cg_iterations")


class MonitorMetrics(NamedTuple):
  """What :func:`monitor` recorded at its last logged step.

  Attributes:
    step: the ``update`` count (from 0) at which these were recorded; −1
      before the first.
    objective_value: the objective ``f(θ)`` on the batch (not named
      ``value``, which optax's line searches look up in the state).
    gradient_norm_squared: ``gᵀg`` for the incoming gradient ``g``.
    gradient_curvature: ``gᵀCg / gᵀg``, the curvature along the gradient
      (0 if ``g = 0``).
    update_norm: ``‖u‖`` of the inner transform's output.
    reduction_ratio: the inner state's ``ρ`` after the step, or ``None`` if
      it has none.
    damping: the inner state's damping after the step, or ``None``.
    cg_iterations: the inner state's CG iterations, or ``None``.
    finite: ``False`` if the value, ``gᵀg`` or ``gᵀCg`` was NaN or Inf.
  """

  step: Array
  objective_value: Array
  gradient_norm_squared: Array
  gradient_curvature: Array
  update_norm: Array
  reduction_ratio: Optional[Array]
  damping: Optional[Array]
  cg_iterations: Optional[Array]
  finite: Array


class MonitorState(NamedTuple):
  """State of :func:`monitor`.

  Attributes:
    count: the number of ``update`` calls.
    key: PRNG key for ``curvature="sampled_fisher"``.
    metrics: the :class:`MonitorMetrics` of the last logged step.
    inner_state: the wrapped transform's state.
  """

  count: Array
  key: Array
  metrics: MonitorMetrics
  inner_state: Any


def find_inner_field(state: Any, name: str) -> Optional[Array]:
  """The first NamedTuple field ``name`` anywhere in ``state``, or ``None``."""
  for path, value in optax.tree.get_all_with_path(state, name):
    if hasattr(path[-1], "tuple_name"):  # A NamedTuple field, not a dict key.
      return value
  return None


def _inner_metrics(inner_state: Any, dtype) -> dict[str, Optional[Array]]:
  found = {name: find_inner_field(inner_state, name) for name in _INNER_FIELDS}
  casts = {"cg_iterations": jnp.int32}
  return {
      name: None if value is None
      else jnp.asarray(value).astype(casts.get(name, dtype))
      for name, value in found.items()
  }


def monitor(
    inner: optax.GradientTransformation,
    predict_fn: _products.PredictFn,
    loss: _losses.Loss,
    *,
    curvature: str = "ggn",
    every: int = 1,
    l2_reg: float = 0.0,
    num_samples: int = 1,
    targets_fn: Callable[[Any], Any] = _products.default_targets,
    seed: int = 0,
    axis_name: _validation.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps a transform and records curvature metrics in the optax state.

  Every ``every`` updates (the first included), for the incoming gradient
  ``g`` and the curvature ``C`` of :func:`curvature.linearize` on the batch:

  .. math::
    g^\top g, \qquad \frac{g^\top C g}{g^\top g}, \qquad \|u\|,

  with ``u`` the inner transform's update, plus ``ρ``, the damping and the CG
  iterations wherever the inner state (searched through chains and
  wrappers) has NamedTuple fields ``reduction_ratio``, ``damping`` and
  ``cg_iterations``, as :func:`curvature.scale_by_hessian_free` does. A
  gradient step ``−εg`` changes the loss by ``−ε gᵀg + ½ ε² gᵀCg``: when
  ``gᵀCg/gᵀg`` grows while ``gᵀg`` stays flat, the second-order term is
  eating the first and the learning rate is too large for the curvature
  (ill-conditioning; Goodfellow, Bengio & Courville, *Deep Learning*, 2016,
  ch. 8).

  The cost is one linearization and one curvature product per logged step,
  inside ``lax.cond``; other steps cost nothing. The updates pass through
  unchanged. Read the metrics from ``state.metrics`` (or with
  ``optax.tree.get(state, "metrics")`` inside a chain).

  Args:
    inner: the transform to wrap; its ``update`` receives ``batch`` and any
      other extra arguments.
    predict_fn: ``(params, batch) -> outputs``.
    loss: a loss from :mod:`curvature.losses`.
    curvature: one of :data:`curvature.CURVATURES`.
    every: log every this many updates, a Python int ``≥ 1``.
    l2_reg: the L2 coefficient included in the objective and in ``C``.
    num_samples: sampled targets for ``"sampled_fisher"``.
    targets_fn: finds the targets in a batch.
    seed: seeds the PRNG key kept in the state.
    axis_name: inside ``jax.shard_map``, the mesh axis (str or tuple of
      str) the batch is sharded over: the objective, the curvature product
      and the gradient ``g`` of the metrics (local or global) are
      ``pmean``-ed over it, so the metrics are the global batch's. It is not
      passed to ``inner``; give ``inner`` its own ``axis_name``. ``None``:
      no reduction.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update(grads, state,
    params, batch=batch)``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import curvature
    >>> def predict(params, batch):
    ...   return batch["inputs"] @ params["w"]
    >>> batch = {"inputs": jnp.asarray([[1., 0.], [1., 1.], [1., 2.]]),
    ...          "targets": jnp.asarray([[1.], [3.], [5.]])}
    >>> params = {"w": jnp.zeros((2, 1))}
    >>> def loss_fn(params, batch):
    ...   return curvature.losses.squared_error.value(
    ...       predict(params, batch), batch["targets"])
    >>> grads = jax.grad(loss_fn)(params, batch)
    >>> opt = curvature.monitor(optax.sgd(0.1), predict,
    ...                         curvature.losses.squared_error, every=10)
    >>> state = opt.init(params)
    >>> updates, state = opt.update(grads, state, params, batch=batch)
    >>> int(state.metrics.step), round(float(state.metrics.objective_value), 4)
    (0, 5.8333)
    >>> round(float(state.metrics.gradient_curvature), 4)  # gᵀCg / gᵀg
    2.3867

  References:
    Goodfellow, Bengio & Courville, *Deep Learning*, MIT Press 2016,
    §8.2.1 (monitor gᵀg and gᵀHg). Martens, "Deep learning via
    Hessian-free optimization", ICML 2010 (ρ, damping).
  """
  _validation.check_choice("curvature", curvature, _products.CURVATURES)
  if isinstance(every, int) and not isinstance(every, bool) and every < 1:
    raise ValueError(
        f"`every` must be >= 1, got {every}: pass every=1 to log each step or"
        " every=N to log every N steps."
    )
  every = _validation.check_static_int("every", every, 1)
  _validation.check_nonnegative("l2_reg", l2_reg)
  if curvature == "sampled_fisher":
    _validation.check_static_int("num_samples", num_samples, 1)
  axis_name = _validation.check_axis_name(axis_name)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    _validation.check_params(params, "monitor")
    inner_state = inner.init(params)
    dtype = _validation.compute_dtype(params)
    zero = jnp.zeros((), dtype)
    metrics = MonitorMetrics(
        step=jnp.full((), -1, jnp.int32),
        objective_value=zero,
        gradient_norm_squared=zero,
        gradient_curvature=zero,
        update_norm=zero,
        finite=jnp.ones((), bool),
        **_inner_metrics(inner_state, dtype),
    )
    return MonitorState(
        count=jnp.zeros((), jnp.int32),
        key=jax.random.key(seed),
        metrics=metrics,
        inner_state=inner_state,
    )

  def update_fn(updates, state, params=None, *, batch=None, **extra_args):
    _validation.check_update_args("monitor", None, params, batch)
    _products.batch_size(batch, targets_fn)
    new_updates, inner_state = inner.update(
        updates, state.inner_state, params, batch=batch, **extra_args)
    key, sample_key = jax.random.split(state.key)
    dtype = state.metrics.objective_value.dtype

    def record():
      lin = _products.linearize(
          predict_fn, loss, params, batch, curvature=curvature,
          l2_reg=l2_reg, targets_fn=targets_fn, key=sample_key,
          num_samples=num_samples, axis_name=axis_name)
      grads = _products.batch_mean(updates, axis_name)
      squared = _optax_typed.vdot(grads, grads)
      along = _optax_typed.vdot(grads, lin.matvec(grads))
      ratio = jnp.where(squared > 0, along / jnp.where(squared > 0, squared, 1),
                        0.0)
      finite = jnp.isfinite(lin.value) & jnp.isfinite(squared) & (
          jnp.isfinite(along))
      return MonitorMetrics(
          step=state.count,
          objective_value=lin.value.astype(dtype),
          gradient_norm_squared=squared.astype(dtype),
          gradient_curvature=ratio.astype(dtype),
          update_norm=optax.tree.norm(new_updates).astype(dtype),
          finite=finite,
          **_inner_metrics(inner_state, dtype),
      )

    logged = state.count % every == 0
    metrics = jax.lax.cond(logged, record, lambda: state.metrics)
    new_state = MonitorState(
        count=_optax_typed.safe_increment(state.count),
        key=key,
        metrics=metrics,
        inner_state=inner_state,
    )
    return new_updates, new_state

  # optax's OptState (ArrayTree) leaves out None, a valid (empty) pytree that
  # MonitorMetrics' optional fields hold.
  # pyrefly: ignore[bad-argument-type]
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
