"""Diagonal preconditioning (d + damping)^p, with damping inside/outside the root."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature

DTYPES = [jnp.float32, jnp.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("power", [0.5, 1.0, 0.75])
@pytest.mark.parametrize("inside, outside", [(0.0, 1e-3), (1e-3, 0.0),
                                             (1e-2, 1e-3)])
def test_precondition_formula(dtype, power, inside, outside):
  x = jnp.array([1.0, -2.0, 3.0], dtype)
  d = jnp.array([4.0, 0.25, 0.0], dtype)
  got = curvature.precondition(x, d, power=power, damping=outside,
                               damping_in_root=inside)
  want = np.asarray(x, np.float64) / (
      (np.asarray(d, np.float64) + inside) ** power + outside)
  assert got.dtype == dtype
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_damping_placement_matters_and_traced_power_agrees():
  x, d = jnp.ones(2, jnp.float64), jnp.array([1e-6, 1.0])
  inside = curvature.precondition(x, d, damping_in_root=1e-4)
  outside = curvature.precondition(x, d, damping=1e-4)
  assert float(inside[0]) < 0.5 * float(outside[0])  # 1/0.01 vs 1/0.0011.
  traced = jax.jit(lambda p: curvature.precondition(x, d, power=p,
                                                    damping=1e-4))(0.5)
  np.testing.assert_allclose(traced, outside, rtol=1e-14)


class _FixedDiagonal:
  """A 'curvature' transform returning a known diagonal (e.g. exact Hessian)."""

  def __new__(cls, diagonal):
    return optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (diagonal, state),
    )


def test_power_one_with_exact_diagonal_is_a_newton_step():
  """On a diagonal quadratic, p=1 with the exact Hessian diagonal solves it."""
  h = jnp.array([100.0, 1.0, 0.01], jnp.float64)
  b = jnp.array([1.0, 2.0, 3.0], jnp.float64)
  loss = lambda x: 0.5 * jnp.sum(h * x**2) - b @ x
  opt = optax.chain(
      curvature.scale_by_diagonal(_FixedDiagonal(h), power=1.0, damping=0.0),
      optax.scale_by_learning_rate(1.0),
  )
  x = jnp.zeros(3, jnp.float64)
  u, _ = opt.update(jax.grad(loss)(x), opt.init(x), x)
  np.testing.assert_allclose(x + u, b / h, rtol=1e-14)


PRIMITIVE_COMPOSITIONS = {
    "adagrad": (
        lambda: curvature.scale_by_diagonal(
            curvature.scale_by_running_sum(initial_value=0.1), damping=0.0,
            damping_in_root=1e-7),
        lambda: optax.scale_by_rss(0.1, 1e-7),
    ),
    "rmsprop_eps_in_root": (
        lambda: curvature.scale_by_diagonal(
            curvature.scale_by_ema(0.9, statistic=jnp.square,
                                   bias_correction=False),
            damping=0.0, damping_in_root=1e-8),
        lambda: optax.scale_by_rms(0.9, 1e-8),
    ),
    "rmsprop_bias_corrected_eps_outside": (
        lambda: curvature.scale_by_diagonal(
            curvature.scale_by_ema(0.9, statistic=jnp.square), damping=1e-8),
        lambda: optax.scale_by_rms(0.9, 1e-8, eps_in_sqrt=False,
                                   bias_correction=True),
    ),
    "adam": (
        lambda: curvature.scale_by_diagonal(
            curvature.scale_by_ema(0.999, statistic=jnp.square),
            direction=curvature.scale_by_ema(0.9), damping=1e-8),
        lambda: optax.scale_by_adam(),
    ),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(PRIMITIVE_COMPOSITIONS))
def test_compositions_reproduce_optax_building_blocks(name, dtype):
  ours, ref = (f() for f in PRIMITIVE_COMPOSITIONS[name])
  params = {"w": jnp.zeros((3, 2), dtype), "b": jnp.zeros(2, dtype)}
  s_ours, s_ref = ours.init(params), ref.init(params)
  for k in range(10):
    g = jax.tree.map(
        lambda p: jnp.cos(jnp.arange(p.size, dtype=dtype) * (k + 1)
                          ).reshape(p.shape), params)
    u_ours, s_ours = ours.update(g, s_ours, params)
    u_ref, s_ref = ref.update(g, s_ref, params)
    for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_ref)):
      assert a.dtype == dtype
      np.testing.assert_allclose(a, b, rtol=2e-6 if dtype == jnp.float32
                                 else 1e-14)


def test_extra_args_reach_the_curvature_transform():
  seen = {}

  def update(updates, state, params=None, *, batch=None):
    seen["batch"] = batch
    return jax.tree.map(jnp.ones_like, updates), state

  curv = optax.GradientTransformationExtraArgs(
      lambda p: optax.EmptyState(), update)
  opt = optax.chain(curvature.scale_by_diagonal(curv, damping=0.0),
                    optax.scale_by_learning_rate(1.0))
  x = jnp.ones(2)
  opt.update(x, opt.init(x), x, batch="the-batch")
  assert seen["batch"] == "the-batch"


@pytest.mark.parametrize("bad, match", [
    ({"damping": -1e-8}, "damping"),
    ({"damping_in_root": -1.0}, "damping_in_root"),
    ({"power": 0.0}, "power"),
    ({"power": -0.5}, "power"),
])
def test_bad_damping_or_power_raises(bad, match):
  with pytest.raises(ValueError, match=match):
    curvature.scale_by_diagonal(curvature.scale_by_running_sum(), **bad)


# Found by tests/test_contract_fuzz.py: no damping and a diagonal entry still
# 0 (a coordinate whose gradient has been 0) gave 0/0 = NaN.
@pytest.mark.parametrize("power", [0.5, 1.0, 0.75, jnp.asarray(0.5)])
@pytest.mark.parametrize("damping", [0.0, jnp.asarray(0.0)])
def test_zero_denominator_gives_a_zero_update(power, damping):
  direction = jnp.array([0.0, 2.0])
  diagonal = jnp.array([0.0, 4.0])
  out = curvature.precondition(direction, diagonal, power=power,
                               damping=damping)
  np.testing.assert_allclose(out, [0.0, 2.0 / 4.0 ** float(power)],
                             rtol=1e-6)
