"""Small models and dense oracles shared by the tests."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import curvature


def mlp_params(key, sizes, dtype=jnp.float64):
  params = []
  for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
    key, sub = jax.random.split(key)
    params.append({
        "w": (jax.random.normal(sub, (fan_in, fan_out)) / np.sqrt(fan_in)
              ).astype(dtype),
        "b": (0.1 * jax.random.normal(jax.random.fold_in(sub, 1), (fan_out,))
              ).astype(dtype),
    })
  return params


def mlp_predict(params, batch):
  h = batch["inputs"]
  for i, layer in enumerate(params):
    h = h @ layer["w"] + layer["b"]
    if i < len(params) - 1:
      h = jnp.tanh(h)
  return h


def classification_problem(key=0, n=7, sizes=(4, 5, 3), dtype=jnp.float64):
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  params = mlp_params(k1, sizes, dtype)
  batch = {
      "inputs": jax.random.normal(k2, (n, sizes[0]), dtype),
      "targets": jax.random.randint(k3, (n,), 0, sizes[-1]),
  }
  return params, batch


def regression_problem(key=0, n=7, sizes=(4, 5, 3), dtype=jnp.float64):
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  params = mlp_params(k1, sizes, dtype)
  batch = {
      "inputs": jax.random.normal(k2, (n, sizes[0]), dtype),
      "targets": jax.random.normal(k3, (n, sizes[-1]), dtype),
  }
  return params, batch


def binary_problem(key=0, n=7, sizes=(4, 5, 3), dtype=jnp.float64):
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  params = mlp_params(k1, sizes, dtype)
  batch = {
      "inputs": jax.random.normal(k2, (n, sizes[0]), dtype),
      "targets": jax.random.uniform(k3, (n, sizes[-1]), dtype),
  }
  return params, batch


PROBLEMS = {
    "softmax_cross_entropy": (curvature.losses.softmax_cross_entropy,
                              classification_problem),
    "sigmoid_binary_cross_entropy": (
        curvature.losses.sigmoid_binary_cross_entropy, binary_problem),
    "squared_error": (curvature.losses.squared_error, regression_problem),
}


def flat(tree):
  return np.asarray(ravel_pytree(tree)[0])


def dense_jacobian(predict_fn, params, batch):
  """[outputs..., P] Jacobian of the model outputs."""
  vec, unravel = ravel_pytree(params)
  return jax.jacfwd(lambda v: predict_fn(unravel(v), batch))(vec)


def dense_ggn(predict_fn, loss, params, batch, l2_reg=0.0):
  """Jᵀ (∇²_z L) J + l2 I from jax.jacfwd and jax.hessian."""
  jac = dense_jacobian(predict_fn, params, batch)
  outputs = predict_fn(params, batch)
  targets = batch["targets"]
  hz = jax.hessian(lambda z: loss.value(z, targets))(outputs)
  out_dims = outputs.ndim
  jac2 = jac.reshape(-1, jac.shape[-1])
  hz2 = hz.reshape(jac2.shape[0], jac2.shape[0])
  return np.asarray(jac2.T @ hz2 @ jac2) + l2_reg * np.eye(jac.shape[-1])


def dense_hessian(predict_fn, loss, params, batch, l2_reg=0.0):
  vec, unravel = ravel_pytree(params)
  f = lambda v: curvature.objective(predict_fn, loss, unravel(v), batch,
                                    l2_reg=l2_reg)
  return np.asarray(jax.hessian(f)(vec))


def per_example_gradients(predict_fn, loss, params, batch, targets=None):
  """[N, P] gradients of each example's loss."""
  vec, unravel = ravel_pytree(params)
  targets = batch["targets"] if targets is None else targets
  f = lambda v: loss.per_example(predict_fn(unravel(v), batch), targets)
  return np.asarray(jax.jacrev(f)(vec))


def dense_empirical_fisher(predict_fn, loss, params, batch):
  grads = per_example_gradients(predict_fn, loss, params, batch)
  return grads.T @ grads / grads.shape[0]


def dense_softmax_fisher(predict_fn, params, batch):
  """E_{y~p}[g gᵀ] by enumerating every class, averaged over examples."""
  loss = curvature.losses.softmax_cross_entropy
  logits = predict_fn(params, batch)
  n, classes = logits.shape
  probs = np.asarray(jax.nn.softmax(logits))
  total = 0.0
  for c in range(classes):
    labels = jnp.full((n,), c)
    grads = per_example_gradients(predict_fn, loss, params, batch, labels)
    total = total + (grads * probs[:, c:c + 1]).T @ grads
  return total / n


def random_like(params, key):
  vec, unravel = ravel_pytree(params)
  return unravel(jax.random.normal(jax.random.key(key), vec.shape, vec.dtype))
