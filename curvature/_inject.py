"""``optax.inject_hyperparams`` for factories with structural arguments."""

import collections.abc
import inspect
import typing
from typing import Callable, Iterable, Optional, Union

import numpy as np
import optax


def _is_structural(annotation) -> bool:
  """A model function (``Callable``) or a shape-fixing ``int`` parameter."""
  if annotation is int:
    return True
  origin = typing.get_origin(annotation)
  if origin is collections.abc.Callable:
    return True
  if origin is Union:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return len(args) == 1 and _is_structural(args[0])
  return False


def structural_args(factory: Callable[..., optax.GradientTransformation]):
  """The parameters of ``factory`` that must stay static under injection.

  These are the model functions (``predict_fn``, ``targets_fn``: optax would
  take any callable for a schedule) and the integers that fix shapes or loop
  structure (``max_cg_iterations``, ``num_samples``, ``seed``, ...).

  Args:
    factory: a transform or optimizer factory of this library.

  Returns:
    A tuple of parameter names.

  Example:
    >>> import curvature
    >>> curvature.structural_args(curvature.scale_by_curvature_diagonal)
    ('predict_fn', 'num_samples', 'statistics_batch_size', 'targets_fn', 'seed')
  """
  signature = inspect.signature(factory)
  return tuple(
      name
      for name, parameter in signature.parameters.items()
      if _is_structural(parameter.annotation)
  )


def inject_hyperparams(
    factory: Callable[..., optax.GradientTransformation],
    static_args: Union[str, Iterable[str]] = (),
    hyperparam_dtype: Optional[np.dtype] = None,
):
  """``optax.inject_hyperparams`` that knows which arguments are structural.

  ``optax.inject_hyperparams`` treats every callable argument as a schedule
  and every number as an array it may trace. The curvature-aware factories
  take model functions (``predict_fn``, ``targets_fn``) and integers that fix
  array shapes, so those are added to ``static_args`` here; every other
  numeric hyperparameter (learning rate, damping, L2, ...) is injected and can
  be scheduled or changed in the state as usual.

  Args:
    factory: a factory such as :func:`curvature.hessian_free`.
    static_args: further arguments to keep static.
    hyperparam_dtype: as in ``optax.inject_hyperparams``.

  Returns:
    The wrapped factory, as ``optax.inject_hyperparams`` returns it.

  Example:
    >>> import jax.numpy as jnp
    >>> import curvature
    >>> def predict(params, batch):
    ...   return batch["inputs"] @ params
    >>> params = jnp.zeros((3, 1))
    >>> opt = curvature.inject_hyperparams(curvature.hessian_free)(
    ...     learning_rate=1.0, predict_fn=predict,
    ...     loss=curvature.losses.squared_error, max_cg_iterations=10)
    >>> state = opt.init(params)
    >>> float(state.hyperparams["initial_damping"])
    1.0
    >>> "max_cg_iterations" in state.hyperparams  # structural: kept static
    False
  """
  static = {static_args} if isinstance(static_args, str) else set(static_args)
  static.update(structural_args(factory))
  return optax.inject_hyperparams(
      factory, static_args=tuple(sorted(static)),
      hyperparam_dtype=hyperparam_dtype)
