"""Tests for curvature._damping: Levenberg-Marquardt, rejection, step guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvature
from curvature import _damping


def _martens_oracle(damping, rho, low, high, increase, decrease, bounds):
  """The rule written out by hand in NumPy, one case at a time."""
  if rho < low:
    damping = damping * increase
  elif rho > high:
    damping = damping * decrease
  return float(np.clip(damping, *bounds)) if bounds else damping


@pytest.mark.parametrize("rho", [-np.inf, -1.0, 0.0, 0.2499, 0.25, 0.5, 0.75,
                                 0.7501, 1.0, 3.0])
@pytest.mark.parametrize("bounds", [None, (0.9, 1.2), (1e-8, 1e8)])
def test_levenberg_marquardt_matches_the_rule_written_out(rho, bounds):
  got = _damping.levenberg_marquardt(
      jnp.asarray(1.0, jnp.float64), jnp.asarray(rho, jnp.float64),
      low=0.25, high=0.75, increase=1.5, decrease=2 / 3, bounds=bounds)
  want = _martens_oracle(1.0, rho, 0.25, 0.75, 1.5, 2 / 3, bounds)
  np.testing.assert_allclose(float(got), want, rtol=1e-15)


@pytest.mark.parametrize("rho", [-np.inf, 0.1, 0.5, 0.9])
def test_omega_form_is_increase_one_over_omega(rho):
  # Martens & Grosse (2015) §6.5: ρ > ¾ → λω, ρ < ¼ → λ/ω, clipped.
  omega, damping, bounds = (19 / 20) ** 5, 0.3, (1e-4, 1e4)
  factor = omega if rho > 0.75 else (1 / omega if rho < 0.25 else 1.0)
  want = np.clip(damping * factor, *bounds)
  got = _damping.levenberg_marquardt(
      jnp.asarray(damping, jnp.float64), jnp.asarray(rho, jnp.float64),
      increase=1 / omega, decrease=omega, bounds=bounds)
  np.testing.assert_allclose(float(got), want, rtol=1e-15)


def test_nan_rho_keeps_the_damping():
  got = _damping.levenberg_marquardt(jnp.asarray(2.0, jnp.float32),
                                     jnp.asarray(jnp.nan, jnp.float32))
  assert float(got) == 2.0


def test_failed_step_reads_as_a_poor_step_through_reduction_ratio():
  # ρ from _taylor: a NaN objective after the step, or a model predicting
  # no decrease, both give ρ = −∞, which raises λ.
  for after, predicted in ((jnp.nan, -1.0), (0.5, 0.0)):
    rho = curvature.reduction_ratio(jnp.asarray(after, jnp.float64), 1.0,
                                    jnp.asarray(predicted, jnp.float64))
    got = _damping.levenberg_marquardt(jnp.asarray(1.0, jnp.float64), rho)
    assert float(got) == 1.5


def test_levenberg_marquardt_keeps_the_damping_dtype():
  for dtype in (jnp.float32, jnp.float64):
    got = _damping.levenberg_marquardt(
        jnp.asarray(1.0, dtype), jnp.asarray(0.0, jnp.float64),
        bounds=(1e-8, 1e8))
    assert got.dtype == dtype


def test_levenberg_marquardt_jits_with_traced_factors():
  rule = jax.jit(lambda lam, rho, up: _damping.levenberg_marquardt(
      lam, rho, increase=up, bounds=(0.0, 10.0)))
  got = rule(jnp.asarray(4.0, jnp.float64), jnp.asarray(-1.0, jnp.float64),
             jnp.asarray(3.0, jnp.float64))
  assert float(got) == 10.0  # 12, clipped.


@pytest.mark.parametrize("rejected", [True, False])
def test_raise_on_rejection_raises_the_damping_before_the_step(rejected):
  got = _damping.raise_on_rejection(
      jnp.asarray(2.0, jnp.float64), jnp.asarray(0.5, jnp.float64),
      jnp.asarray(rejected), increase=1.5, bounds=(0.0, 2.5))
  assert float(got) == (2.5 if rejected else 0.5)  # 3, clipped: 2.5.


def test_guard_step_passes_a_finite_step_unchanged():
  step = {"w": jnp.arange(3.0, dtype=jnp.float64), "b": jnp.ones(2)}
  out, rejected = _damping.guard_step(jnp.asarray(True), step)
  assert not bool(rejected)
  jax.tree.map(np.testing.assert_array_equal, out, step)


@pytest.mark.parametrize("ok, bad", [(False, None), (True, jnp.nan),
                                     (True, jnp.inf)])
def test_guard_step_zeroes_a_rejected_step(ok, bad):
  step = {"w": jnp.arange(3.0, dtype=jnp.float64), "b": jnp.ones(2)}
  if bad is not None:
    step["b"] = step["b"].at[1].set(bad)
  out, rejected = _damping.guard_step(jnp.asarray(ok), step)
  assert bool(rejected)
  for leaf, original in zip(jax.tree.leaves(out), jax.tree.leaves(step)):
    assert leaf.dtype == original.dtype and leaf.shape == original.shape
    assert np.all(np.asarray(leaf) == 0)
