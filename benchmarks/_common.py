"""The model, machine description and timing checks shared by the benchmarks.

The MNIST deep autoencoder of Hinton & Salakhutdinov (2006) and Martens
(2010): 784-1000-500-250-30-250-500-1000-784, sigmoid hidden units, a linear
30-unit code layer, logits out (2,837,314 parameters). Nothing here imports
``curvature``, so the kfac-jax peer environment can import it too.

:func:`warm_up` and :class:`TimedLoop` keep compilation out of the clock:
every timed row first runs its step on a throwaway state until every program
it will use is compiled, then times its steps from a fresh state and fails
(:class:`CompilationInTimedLoop`) if anything still compiles while the clock
runs.
"""

import contextlib
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

# jax.monitoring events (jax 0.9 and 0.10): an XLA compilation, and a jit
# cache miss (tracing to a jaxpr, which precedes every compilation and also
# happens when the persistent compilation cache spares the compilation).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
# Exit code of a peer script whose timed loop compiled.
COMPILED_EXIT_CODE = 3


LAYERS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
CODE_LAYER = 3  # Index of the layer whose output is the linear code.
assert CODE_LAYER == (len(LAYERS) - 1) // 2 - 1


def autoencoder_params(key, dtype=jnp.float32):
  """Gaussian weights scaled by 1/√fan-in, zero biases."""
  params = []
  for fan_in, fan_out in zip(LAYERS[:-1], LAYERS[1:]):
    key, sub = jax.random.split(key)
    params.append({
        "w": jax.random.normal(sub, (fan_in, fan_out), dtype) / fan_in**0.5,
        "b": jnp.zeros((fan_out,), dtype),
    })
  return params


def sparse_params(seed, layers, connections=15):
  """Martens' (2010) sparse initialisation.

  Each unit gets ``connections`` incoming weights drawn from N(0, 1) (all of
  them if the fan-in is smaller); every other weight and every bias is 0.
  """
  params = []
  key = jax.random.key(seed)
  for fan_in, fan_out in zip(layers[:-1], layers[1:]):
    key, k_weights, k_mask = jax.random.split(key, 3)
    weights = jax.random.normal(k_weights, (fan_in, fan_out))
    if fan_in > connections:
      scores = jax.random.uniform(k_mask, (fan_in, fan_out))
      kth = jnp.sort(scores, axis=0)[-connections]
      weights = jnp.where(scores >= kth, weights, 0.0)
    params.append({"w": weights, "b": jnp.zeros(fan_out)})
  return params


def autoencoder_predict(params, batch):
  """Reconstruction logits for ``batch["inputs"]``.

  Sigmoid hidden units, except the middle (code) layer, which is linear: the
  output of weights ``len(params) // 2 - 1`` (``CODE_LAYER`` for ``LAYERS``,
  and the 6-unit code of the CURVES autoencoder).
  """
  code_layer = len(params) // 2 - 1
  h = batch["inputs"]
  for i, layer in enumerate(params):
    h = h @ layer["w"] + layer["b"]
    if i != code_layer and i < len(params) - 1:
      h = jax.nn.sigmoid(h)
  return h


def autoencoder_batch(key, batch_size, dtype=jnp.float32):
  """Random inputs in [0, 1] that are also the targets."""
  inputs = jax.random.uniform(key, (batch_size, LAYERS[0]), dtype)
  return {"inputs": inputs, "targets": inputs}


def machine() -> str:
  """CPU model, core count, jax version and backend (with the GPU's name)."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if "model name" in l)
  except (OSError, StopIteration):
    pass
  backend = jax.default_backend()
  if backend != "cpu":  # the accelerator that runs the programs, by name
    backend = f"{backend}: {jax.devices()[0].device_kind}"
  return (f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__}"
          f" ({backend})")


class CompilationInTimedLoop(RuntimeError):
  """Something compiled (or, by its step time, probably did) while timed."""


class _CompileCounter:
  """Counts jax.monitoring compile and trace events while ``active``."""

  def __init__(self, active=True):
    self.active = active
    self.events = []  # (event, seconds)

  def __call__(self, event, duration, **kwargs):
    del kwargs  # Newer jax passes event tags.
    if self.active and event in (COMPILE_EVENT, TRACE_EVENT):
      self.events.append((event, duration))

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)

  def count(self, event=COMPILE_EVENT):
    return sum(e == event for e, _ in self.events)


def warm_up(step_fn, state, num_steps):
  """Compiles every program a timed loop will run, on a throwaway run.

  Runs ``state = step_fn(state, i)`` for ``i`` in ``range(num_steps)``, waits
  for the result and throws it away: the caller then times its loop from a
  fresh state. ``num_steps`` must reach every program the loop will run: a
  step that is compiled separately every ``period`` steps (kfac-jax's
  damping-adaptation steps), or that first runs with a state a few steps old,
  needs ``2 * max(periods) + 1``; a single jitted step with ``lax.cond``
  branches needs two (the second sees the step's own output state).

  Args:
    step_fn: ``(state, i) -> state``, one timed call of the loop (``i`` is
      the step index, a Python int).
    state: the throwaway initial state (donated buffers are fine: it is not
      used again).
    num_steps: the number of throwaway calls.

  Returns:
    The number of XLA compilations during the warm-up.
  """
  with _CompileCounter() as counter:
    for i in range(num_steps):
      state = step_fn(state, i)
    jax.block_until_ready(state)
  return counter.count()


class TimedLoop:
  """The clock of one row's timed loop, and a check that nothing compiles.

  Use it as a context manager around the loop and wrap each timed call (and
  only it) in :meth:`timed`; the call must end with ``block_until_ready``.
  The clock (``seconds``) sums the timed calls. :meth:`check` then raises
  :class:`CompilationInTimedLoop` if jax.monitoring saw an XLA compilation or
  a jit cache miss inside a timed call or, when ``outlier_factor`` is given,
  if a timed call took more than ``outlier_factor`` times the median of the
  calls of its kind (a probable compilation; a second opinion, for a peer
  whose programs jax.monitoring might not see). Kinds are the ``kind``
  labels given to :meth:`timed` (steps that refresh inverses legitimately
  cost several plain steps); kinds with fewer than ``MIN_KIND`` calls are
  left to jax.monitoring alone.

  Args:
    name: the row, for the messages.
    outlier_factor: flag timed calls slower than this multiple of their
      kind's median; ``None`` reports the slowest call's ratio without
      failing on it.
  """

  MIN_KIND = 3

  def __init__(self, name, outlier_factor=None):
    self.name = name
    self.outlier_factor = outlier_factor
    self.seconds = 0.0
    self.call_seconds = []
    self.call_kinds = []
    self.warm_up_steps = self.warm_up_compilations = None
    self._counter = _CompileCounter(active=False)
    self._compiled_at = []  # (timed call index, event)

  def __enter__(self):
    self._counter.__enter__()
    return self

  def __exit__(self, *exc):
    self._counter.__exit__(*exc)

  def warm_up(self, step_fn, state, num_steps):
    """:func:`warm_up`, remembering its compilation count for the summary."""
    self.warm_up_compilations = warm_up(step_fn, state, num_steps)
    self.warm_up_steps = num_steps

  @contextlib.contextmanager
  def timed(self, kind=None):
    """Times the enclosed call and watches it for compilations.

    Args:
      kind: a label for calls that run the same program (e.g. a periodic
        inverse refresh), compared with each other by the outlier check.
    """
    seen = len(self._counter.events)
    self._counter.active = True
    start = time.perf_counter()
    try:
      yield
    finally:
      elapsed = time.perf_counter() - start
      self._counter.active = False
      self.seconds += elapsed
      self.call_seconds.append(elapsed)
      self.call_kinds.append(kind)
      self._compiled_at += [(len(self.call_seconds) - 1, event) for event, _
                            in self._counter.events[seen:]]

  def _kinds(self):
    n = len(self.call_seconds)
    return (self.call_kinds + [None] * n)[:n]

  def ratios(self):
    """Each timed call's seconds ÷ its kind's median (NaN: too few calls)."""
    seconds = np.asarray(self.call_seconds)
    kinds = self._kinds()
    ratios = np.full(len(seconds), np.nan)
    for kind in set(kinds):
      members = np.array([k == kind for k in kinds])
      if members.sum() >= self.MIN_KIND:
        ratios[members] = seconds[members] / np.median(seconds[members])
    return ratios

  def outliers(self):
    """Indices of the timed calls over ``outlier_factor`` × their median."""
    if self.outlier_factor is None:
      return []
    return [int(i) for i in np.nonzero(self.ratios() > self.outlier_factor)[0]]

  def check(self):
    """Raises :class:`CompilationInTimedLoop`, or returns a one-line summary."""
    n = len(self.call_seconds)
    compiles = sorted({i for i, e in self._compiled_at if e == COMPILE_EVENT})
    traces = sorted({i for i, e in self._compiled_at if e == TRACE_EVENT})
    problems = []
    if compiles or traces:
      problems.append(
          f"jax.monitoring saw {len(compiles)} timed call(s) with an XLA "
          f"compilation {compiles[:10]} and {len(traces)} with a jit cache "
          f"miss {traces[:10]}")
    slow = self.outliers()
    if slow:
      ratios = self.ratios()
      problems.append(
          f"{len(slow)} timed call(s) took over {self.outlier_factor:g}x the "
          "median of their kind, probably compiling: " + ", ".join(
              f"call {i} ({self._kinds()[i] or 'step'}) "
              f"{self.call_seconds[i]:.2f} s = {ratios[i]:.1f}x"
              for i in slow[:10]))
    if problems:
      raise CompilationInTimedLoop(
          f"{self.name}: compilation inside the timed loop ({n} timed "
          f"calls): " + "; ".join(problems) + ". Warm every compiled program "
          "up before timing (benchmarks/_common.warm_up).")
    ratios = self.ratios()
    ratio = np.nanmax(ratios) if np.isfinite(ratios).any() else float("nan")
    kinds = {k for k in self.call_kinds if k is not None}
    median = "the median" + (" of its kind" if kinds else "")
    warm = ("" if self.warm_up_compilations is None else
            f"warm-up of {self.warm_up_steps} calls compiled "
            f"{self.warm_up_compilations} program(s), then ")
    return (f"{self.name}: {warm}no compilation in {n} timed calls "
            f"(slowest {ratio:.1f}x {median})")
