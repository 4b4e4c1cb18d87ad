"""Tests for curvature.losses against jax.hessian and the exact distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvature import losses

KEY = jax.random.key(0)


def _hessian(loss, outputs, targets):
  h = jax.hessian(lambda z: loss.value(z, targets))(outputs)
  return h.reshape(outputs.size, outputs.size)


CASES = {
    "softmax_int": (losses.softmax_cross_entropy, (5, 4),
                    lambda k, s: jax.random.randint(k, s[:-1], 0, s[-1])),
    "softmax_onehot": (losses.softmax_cross_entropy, (5, 4),
                       lambda k, s: jax.nn.one_hot(
                           jax.random.randint(k, s[:-1], 0, s[-1]), s[-1],
                           dtype=jnp.float64)),
    "softmax_soft_unnormalized": (
        losses.softmax_cross_entropy, (5, 4),
        lambda k, s: 2.0 * jax.random.uniform(k, s, jnp.float64)),
    "softmax_sequence": (losses.softmax_cross_entropy, (3, 2, 4),
                         lambda k, s: jax.random.randint(k, s[:-1], 0, s[-1])),
    "sigmoid": (losses.sigmoid_binary_cross_entropy, (5, 3),
                lambda k, s: jax.random.uniform(k, s, jnp.float64)),
    "squared_error": (losses.squared_error, (5, 3),
                      lambda k, s: jax.random.normal(k, s, jnp.float64)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hvp_equals_hessian_of_value(case):
  loss, shape, make_targets = CASES[case]
  outputs = jax.random.normal(KEY, shape, jnp.float64)
  targets = make_targets(jax.random.key(1), shape)
  tangent = jax.random.normal(jax.random.key(2), shape, jnp.float64)
  expected = _hessian(loss, outputs, targets) @ tangent.ravel()
  got = loss.hvp(outputs, targets, tangent)
  np.testing.assert_allclose(got.ravel(), expected, rtol=1e-12, atol=1e-14)


def test_values_are_batch_means_of_per_example_sums():
  logits = jax.random.normal(KEY, (6, 3, 4), jnp.float64)
  labels = jax.random.randint(jax.random.key(1), (6, 3), 0, 4)
  log_probs = jax.nn.log_softmax(logits)
  picked = jnp.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(
      losses.softmax_cross_entropy.per_example(logits, labels),
      -picked.sum(-1), rtol=1e-12)
  np.testing.assert_allclose(
      losses.softmax_cross_entropy.value(logits, labels),
      -picked.sum(-1).mean(), rtol=1e-12)
  z = jax.random.normal(KEY, (6, 5), jnp.float64)
  y = jax.random.uniform(jax.random.key(3), (6, 5), jnp.float64)
  np.testing.assert_allclose(
      losses.squared_error.value(z, y), 0.5 * ((z - y) ** 2).sum(-1).mean())
  p = jax.nn.sigmoid(z)
  bce = -(y * jnp.log(p) + (1 - y) * jnp.log1p(-p)).sum(-1).mean()
  np.testing.assert_allclose(
      losses.sigmoid_binary_cross_entropy.value(z, y), bce, rtol=1e-10)


def _exact_output_fisher(loss, outputs):
  """E_{y~p(y|z)}[∇ℓ ∇ℓᵀ]/N by enumeration (softmax, Bernoulli)."""
  n = outputs.shape[0]
  if loss is losses.softmax_cross_entropy:
    probs = jax.nn.softmax(outputs)
    total = 0
    for c in range(outputs.shape[-1]):
      labels = jnp.full(outputs.shape[:-1], c)
      g = losses.output_gradients(loss, outputs, labels)
      for i in range(n):
        block = jnp.zeros(outputs.shape).at[i].set(g[i]).ravel()
        total = total + probs[i, c] * jnp.outer(block, block)
    return total / n
  if loss is losses.sigmoid_binary_cross_entropy:
    # Each output unit is an independent Bernoulli: enumerate 0/1 per unit.
    probs = jax.nn.sigmoid(outputs).ravel()
    diag = []
    for j in range(outputs.size):
      g0 = jax.nn.sigmoid(outputs.ravel()[j])  # ∂ℓ/∂z at y = 0
      g1 = g0 - 1.0  # at y = 1
      diag.append(probs[j] * g1**2 + (1 - probs[j]) * g0**2)
    return jnp.diag(jnp.asarray(diag)) / n
  raise NotImplementedError


@pytest.mark.parametrize(
    "loss", [losses.softmax_cross_entropy, losses.sigmoid_binary_cross_entropy]
)
def test_fisher_vp_equals_enumerated_fisher(loss):
  outputs = jax.random.normal(KEY, (4, 3), jnp.float64)
  tangent = jax.random.normal(jax.random.key(5), (4, 3), jnp.float64)
  expected = _exact_output_fisher(loss, outputs) @ tangent.ravel()
  np.testing.assert_allclose(
      loss.fisher_vp(outputs, tangent).ravel(), expected, rtol=1e-12)


def test_gaussian_fisher_is_identity_in_expectation():
  # E[(z−y)(z−y)ᵀ] = I for y ~ N(z, I); checked with 20000 samples (SE ~ 0.007).
  outputs = jnp.zeros((1, 3), jnp.float64)
  keys = jax.random.split(KEY, 20000)
  samples = jax.vmap(lambda k: losses.squared_error.sample(k, outputs))(keys)
  g = (outputs - samples)[:, 0]
  np.testing.assert_allclose(g.T @ g / len(keys), np.eye(3), atol=0.04)
  np.testing.assert_allclose(
      losses.squared_error.fisher_vp(outputs, jnp.ones((1, 3))), jnp.ones((1, 3)))


@pytest.mark.parametrize("case", ["softmax_int", "sigmoid", "squared_error"])
def test_ggn_equals_fisher_for_canonical_links(case):
  loss, shape, make_targets = CASES[case]
  outputs = jax.random.normal(KEY, shape, jnp.float64)
  targets = make_targets(jax.random.key(1), shape)
  tangent = jax.random.normal(jax.random.key(2), shape, jnp.float64)
  np.testing.assert_allclose(
      loss.hvp(outputs, targets, tangent), loss.fisher_vp(outputs, tangent),
      rtol=1e-12)


def test_soft_targets_scale_the_hessian_but_not_the_fisher():
  outputs = jax.random.normal(KEY, (3, 4), jnp.float64)
  targets = 3.0 * jax.nn.softmax(jax.random.normal(jax.random.key(1), (3, 4)))
  tangent = jax.random.normal(jax.random.key(2), (3, 4), jnp.float64)
  loss = losses.softmax_cross_entropy
  np.testing.assert_allclose(
      loss.hvp(outputs, targets, tangent),
      3.0 * loss.fisher_vp(outputs, tangent), rtol=1e-12)


def test_samplers_follow_the_predictive_distribution():
  n = 40000  # Standard errors below 0.003: tolerances are > 4 SE.
  logits = jnp.array([[1.0, -0.5, 0.2]])
  keys = jax.random.split(KEY, n)
  labels = jax.vmap(lambda k: losses.softmax_cross_entropy.sample(k, logits))(
      keys)
  assert labels.dtype.kind == "i" and labels.shape == (n, 1)
  freq = np.bincount(np.asarray(labels[:, 0]), minlength=3) / n
  np.testing.assert_allclose(freq, jax.nn.softmax(logits[0]), atol=0.012)

  z = jnp.array([[0.3, -2.0]])
  bits = jax.vmap(
      lambda k: losses.sigmoid_binary_cross_entropy.sample(k, z))(keys)
  assert set(np.unique(bits)) <= {0.0, 1.0}
  np.testing.assert_allclose(bits.mean(0)[0], jax.nn.sigmoid(z[0]), atol=0.012)

  y = jax.vmap(lambda k: losses.squared_error.sample(k, z))(keys)
  np.testing.assert_allclose(y.mean(0)[0], z[0], atol=0.03)
  np.testing.assert_allclose(y.std(0)[0], [1.0, 1.0], atol=0.03)


def test_output_gradients_are_per_example():
  logits = jax.random.normal(KEY, (4, 3), jnp.float64)
  labels = jnp.array([0, 2, 1, 1])
  g = losses.output_gradients(losses.softmax_cross_entropy, logits, labels)
  expected = jax.nn.softmax(logits) - jax.nn.one_hot(labels, 3)
  np.testing.assert_allclose(g, expected, rtol=1e-12)


def test_loss_values_match_optax():
  logits = jax.random.normal(KEY, (4, 3), jnp.float64)
  labels = jnp.array([0, 2, 1, 1])
  np.testing.assert_allclose(
      losses.softmax_cross_entropy.value(logits, labels),
      optax.losses.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean())


@pytest.mark.parametrize(
    "loss, outputs, targets",
    [
        (losses.softmax_cross_entropy, jnp.zeros((3, 4)), jnp.zeros((3, 2), int)),
        (losses.softmax_cross_entropy, jnp.zeros((3, 4)), jnp.zeros((3, 5))),
        (losses.sigmoid_binary_cross_entropy, jnp.zeros((3, 4)),
         jnp.zeros((3,))),
        (losses.squared_error, jnp.zeros((3, 4)), jnp.zeros((4, 3))),
    ],
)
def test_mismatched_targets_raise(loss, outputs, targets):
  with pytest.raises(ValueError, match="shape"):
    loss.value(outputs, targets)


def test_scalar_outputs_raise():
  with pytest.raises(ValueError, match="leading batch axis"):
    losses.squared_error.hvp(jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))


@pytest.mark.parametrize("loss", [losses.softmax_cross_entropy,
                                  losses.sigmoid_binary_cross_entropy,
                                  losses.squared_error],
                         ids=lambda loss: loss.name)
def test_fisher_factor_probes_have_the_output_fisher_as_expectation(loss):
  # E[c cᵀ] over Rademacher probes is the per-example output Fisher
  # (N · fisher_vp, since fisher_vp is that of the mean). 40k probes: the
  # Monte-Carlo error of each entry is below ~0.005; tolerance 0.02.
  outputs = jax.random.normal(jax.random.key(3), (3, 4), jnp.float64)
  keys = jax.random.split(jax.random.key(4), 40_000)
  probes = jax.vmap(lambda k: loss.fisher_factor(k, outputs))(keys)
  empirical = np.einsum("sbi,sbj->bij", probes, probes) / len(keys)
  basis = np.eye(4)
  exact = np.stack([3 * np.asarray(loss.fisher_vp(
      outputs, jnp.broadcast_to(e, outputs.shape))) for e in basis], -1)
  np.testing.assert_allclose(empirical, exact, atol=0.02)
