"""Output-space losses with closed-form curvature: ``curvature.losses``.

Each loss is a :class:`Loss`: its ``value`` is the mean over the leading batch
axis of per-example losses (each summed over the other axes), ``hvp`` is the
Hessian of that mean with respect to the outputs, ``fisher_vp`` the output-space
Fisher, and ``sample`` draws targets from the model's predictive distribution.

* :data:`softmax_cross_entropy`: logits ``[batch, ..., classes]``; targets are
  integer labels ``[batch, ...]`` or one-hot / soft targets shaped like the
  logits.
* :data:`sigmoid_binary_cross_entropy`: logits and targets in ``[0, 1]`` of the
  same shape (e.g. pixels of an autoencoder).
* :data:`squared_error`: ``½‖z − y‖²`` per example, the negative log-likelihood
  of a unit-variance Gaussian up to a constant.

All three use the canonical link, so for them the generalized Gauss-Newton
matrix equals the true Fisher (Martens, "New insights and perspectives on the
natural gradient method", JMLR 2020, §9.2).
"""

from curvature._losses import Loss
from curvature._losses import output_gradients
from curvature._losses import sigmoid_binary_cross_entropy
from curvature._losses import softmax_cross_entropy
from curvature._losses import squared_error

__all__ = (
    "Loss",
    "output_gradients",
    "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy",
    "squared_error",
)
