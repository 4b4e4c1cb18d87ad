"""Convergence benchmark: Adam, K-FAC, Hessian-free and momentum on CURVES.

The CURVES-like images of :func:`curvature.datasets.make_curves` (20k
training images by default) train the CURVES deep autoencoder of Hinton &
Salakhutdinov (2006) and Martens (2010): 784-400-200-100-50-25-6-25-50-100-
200-400-784, sigmoid hidden units, a linear 6-unit code layer, logits out,
sigmoid cross-entropy summed over pixels and averaged over images, Martens'
sparse initialization (15 incoming N(0, 1) weights per unit, zero biases)
and an L2 term ½·1e-5·‖θ‖².

* Adam at each learning rate of {3e-4, 1e-3, 3e-3}, batch 1000, for N steps
  (2000). The lowest training loss of the best rate is the target ``L``.
* ``curvature.kfac`` (adaptive: exact-quadratic α, μ and LM damping from
  λ₀ = 150), batch 1000.
* ``curvature.hessian_free``: gradient on a batch of 1000, curvature products
  on its first 250 examples, objective evaluations (ρ, backtracking, line
  search) on its last 250.
* ``hessian_free_kfac``: the same with the K-FAC-preconditioned CG of
  ``HF_PRECONDITIONED``. Both Hessian-free rows report their CG products
  per outer iteration.
* ``curvature.sgd(lr, momentum=0.9)`` and ``optax.sgd(lr, momentum=0.9)``,
  batch 1000, on the same batches.
* The peer: kfac-jax's adaptive K-FAC (same model, data, initialization,
  L2 term, λ₀ = 150 and batch size), run by ``_kfac_jax_curves.py`` in
  kfac-jax's own venv ``benchmarks/.venv-kfac-jax`` (jax 0.9.0; skipped with
  a message when the venv is missing).

Every row reports the outer iterations and the wall-clock seconds to reach
``L`` (training loss, whole training set, data term only), and its final
loss. The clock covers only the jitted optimizer steps (the loss evaluations
are excluded; each timed call ends with ``block_until_ready``). Compilation
is kept out of it: every row first runs its step on a throwaway run long
enough to compile every program it will use (``_common.warm_up``: two calls,
or ``2 * max(periods) + 1`` steps for the K-FAC rows, whose inverse and
damping updates are periodic), then times from a fresh state, and fails
(``CompilationInTimedLoop``) if jax.monitoring sees an XLA compilation or a
jit cache miss inside a timed call; the kfac-jax peer does the same in its
process and also fails on a step over 5x the median step of its kind
(inverse refresh, damping update or plain: a probable compilation). Each row
prints its check. The full training loss is evaluated every ``--eval-every``
steps for the first-order rows and K-FAC, and after every outer iteration for
Hessian-free, so "steps to L" has that resolution.

The rows that only need to reach ``L`` (K-FAC, Hessian-free) stop there, to
fit the budget; the momentum rows run all N steps, and when they do not reach
``L`` they are compared on the steps to the worse of their two best losses.

Run: ``python benchmarks/convergence.py [--train-size 20000] [--steps 2000]
[--optimizers adam,kfac,hessian_free,momentum,kfac_jax]
[--out benchmarks/results]``.
"""

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import curvature

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402  (benchmarks/ is not a package)
from _common import COMPILED_EXIT_CODE  # noqa: E402
from _common import CompilationInTimedLoop  # noqa: E402
from _common import TimedLoop  # noqa: E402
from _common import sparse_params  # noqa: E402
from _common import autoencoder_predict as predict  # noqa: E402

LAYERS = (784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784)
L2_REG = 1e-5
LOSS = curvature.losses.sigmoid_binary_cross_entropy
ADAM_LRS = (3e-4, 1e-3, 3e-3)
MOMENTUM_LR = 1e-2  # Stable here (3e-2 is too); not tuned further.
OPTIMIZERS = ("adam", "kfac", "ekfac", "shampoo", "soap", "hessian_free",
              "hessian_free_kfac", "momentum", "kfac_jax")
# The Kronecker family's first-order-style rows (no predict_fn): their
# learning rates, the best of a small grid on the 5k-image set (notebook 08).
SHAMPOO_LR = 3e-3
SOAP_LR = 1e-2
HERE = os.path.dirname(os.path.abspath(__file__))
PEER_PYTHON = os.path.join(HERE, ".venv-kfac-jax", "bin", "python")
PEER_OUTLIER_FACTOR = 5.0  # Fail on a peer step this much over its kind's.


def init_params(seed=0, layers=LAYERS, connections=15):
  """Martens' (2010) sparse initialization (15 incoming N(0, 1) weights)."""
  return sparse_params(seed, layers, connections)


def data_loss(params, batch):
  """Mean over images of the per-image summed sigmoid cross-entropy."""
  return LOSS.value(predict(params, batch), batch["targets"])


def objective(params, batch):
  """Data loss plus ½η‖θ‖² (what the first-order rows minimise)."""
  return data_loss(params, batch) + 0.5 * L2_REG * optax.tree.norm(
      params, squared=True)


def load_data(train_size, seed=0):
  images = curvature.datasets.make_curves(train_size, 0, seed=seed).train
  images = jnp.asarray(images, jnp.float32)
  return {"inputs": images, "targets": images}


class Trace(NamedTuple):
  steps: np.ndarray    # outer iterations
  seconds: np.ndarray  # optimizer time only
  loss: np.ndarray     # training data loss on the whole training set
  cg: Optional[np.ndarray] = None  # Hessian-free: CG iterations so far


def _batch_at(data, key, batch_size):
  n = data["inputs"].shape[0]
  order = jax.random.choice(key, n, (batch_size,), replace=False)
  return jax.tree.map(lambda x: x[order], data)


_sample = jax.jit(_batch_at, static_argnums=2)


def _evaluator(data, eval_batch=5000):
  """Jitted full-training-set data loss, in chunks (bounded memory)."""
  n = data["inputs"].shape[0]
  size = min(eval_batch, n)
  chunks = n // size
  stacked = jax.tree.map(
      lambda x: x[: chunks * size].reshape((chunks, size) + x.shape[1:]), data)

  @jax.jit
  def evaluate(params):
    return jax.lax.map(lambda b: data_loss(params, b), stacked).mean()

  return lambda params: float(evaluate(params))


def _advance(step):
  """``step(params, state, key)`` as a :func:`_common.warm_up` step function.

  The carry ``(params, state, key)`` draws its keys as the timed loops do.
  """
  def step_fn(carry, i):
    del i
    params, state, key = carry
    key, sub = jax.random.split(key)
    return step(params, state, sub) + (key,)
  return step_fn


def train_first_order(opt, data, steps, *, batch_size=1000, eval_every=20,
                      seed=0, target=None, desc="", evaluate=None,
                      warm_up_steps=2):
  """``opt`` on gradients of :func:`objective`, ``eval_every`` steps per call.

  Stops early once the loss is at or below ``target`` (when given). The
  jitted call is first warmed up (``warm_up_steps`` throwaway calls), and
  the run fails with :class:`CompilationInTimedLoop` if a timed call
  compiles.
  """
  evaluate = evaluate or _evaluator(data)
  params = init_params(seed)
  state = opt.init(params)

  @jax.jit
  def chunk(params, state, key):
    def step(carry, key):
      params, state = carry
      grads = jax.grad(objective)(params, _batch_at(data, key, batch_size))
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None
    (params, state), _ = jax.lax.scan(
        step, (params, state), jax.random.split(key, eval_every))
    return params, state

  key = jax.random.key(seed + 1)
  with TimedLoop(desc or "first-order") as loop:
    loop.warm_up(_advance(chunk), (params, state, key), warm_up_steps)
    jax.block_until_ready(state)  # Init is not timed.
    record = [(0, 0.0, evaluate(params))]  # From the fresh params and state.
    with tqdm(total=steps, desc=desc, leave=False) as bar:
      while record[-1][0] < steps:
        key, sub = jax.random.split(key)
        with loop.timed():
          params, state = jax.block_until_ready(chunk(params, state, sub))
        value = evaluate(params)
        record.append((record[-1][0] + eval_every, loop.seconds, value))
        bar.update(eval_every)
        bar.set_postfix(loss=f"{value:.3f}", refresh=False)
        if not np.isfinite(value) or (target is not None and value <= target):
          break
  print(loop.check())
  return Trace(*map(np.asarray, zip(*record)))


def _train_curvature(opt, data, steps, *, desc, batch_size, eval_every, seed,
                     target, evaluate, describe=lambda state: {},
                     warm_up_steps=2, tally=None, batch_growth=None):
  """A curvature-aware ``opt``, one jitted outer iteration per call.

  The loss on the whole training set is evaluated every ``eval_every``
  iterations (and at the last); the run stops early at ``target``. The step
  is first warmed up (``warm_up_steps`` throwaway iterations per batch
  size), and the run fails with :class:`CompilationInTimedLoop` if a timed
  iteration compiles. ``tally(state)`` (e.g. the CG iterations of the
  step) is summed into the trace's ``cg``. ``batch_growth = (factor,
  every, cap)`` multiplies the gradient batch by ``factor`` every ``every``
  iterations up to ``cap`` or the whole training set (Martens 2010).
  """
  evaluate = evaluate or _evaluator(data)
  params = init_params(seed)
  state = opt.init(params)
  sizes = [batch_size]
  if batch_growth is not None:
    factor, _, cap = batch_growth
    cap = min(cap, data["inputs"].shape[0])  # Never more than the data.
    while sizes[-1] < cap:
      sizes.append(min(int(sizes[-1] * factor), cap))

  def size_at(i):
    if batch_growth is None:
      return batch_size
    return sizes[min((i - 1) // batch_growth[1], len(sizes) - 1)]

  @jax.jit
  def batch_step(params, state, batch):
    grads = jax.grad(data_loss)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  def step(params, state, key, size=batch_size):
    return batch_step(params, state, _sample(data, key, size))

  def warm_step(carry, i):
    return _advance(lambda p, s, k: step(p, s, k, sizes[i % len(sizes)]))(
        carry, i)

  key = jax.random.key(seed + 1)
  with TimedLoop(desc) as loop:
    loop.warm_up(warm_step, (params, state, key),
                 warm_up_steps * len(sizes))
    jax.block_until_ready(state)  # Init is not timed.
    count = 0
    record = [(0, 0.0, evaluate(params)) + ((0,) if tally else ())]
    with tqdm(total=steps, desc=desc, leave=False) as bar:
      for i in range(1, steps + 1):
        key, sub = jax.random.split(key)
        with loop.timed():
          params, state = jax.block_until_ready(
              step(params, state, sub, size_at(i)))
        if tally is not None:
          count += int(tally(state))
        bar.update(1)
        if i % eval_every and i != steps:
          continue
        value = evaluate(params)
        record.append((i, loop.seconds, value) + ((count,) if tally else ()))
        bar.set_postfix(refresh=False, loss=f"{value:.3f}", **describe(state))
        if not np.isfinite(value) or (target is not None and value <= target):
          break
  print(loop.check())
  return Trace(*map(np.asarray, zip(*record)))


def _kfac_warm_up_steps(kfac_kwargs, steps):
  """``2 * max(periods) + 1``, past the first of every periodic update, or
  ``steps`` if fewer.

  The periods are ``curvature.kfac``'s ``*_every`` arguments (inverses,
  damping, ...), as given or by default. A run of ``steps`` timed calls
  from a fresh state reaches no program that a throwaway run of as many
  calls did not, so a short run (CI's) needs no longer warm-up.
  """
  defaults = inspect.signature(curvature.kfac).parameters
  periods = [kfac_kwargs.get(name, defaults[name].default)
             for name in defaults if name.endswith("_every")]
  periods = [p for p in periods if isinstance(p, int)]
  return min(2 * max(periods, default=20) + 1, max(steps, 2))


def train_kfac(data, steps, *, batch_size=1000, eval_every=5, seed=0,
               target=None, evaluate=None, **kfac_kwargs):
  """Adaptive K-FAC (λ₀ = 150, exact-quadratic α and μ), one jitted step."""
  kwargs = dict(adaptive=True, initial_damping=150.0)
  kwargs.update(kfac_kwargs)
  opt = curvature.kfac(1.0, predict_fn=predict, loss=LOSS, l2_reg=L2_REG,
                       **kwargs)
  return _train_curvature(opt, data, steps, desc="kfac",
                          batch_size=batch_size, eval_every=eval_every,
                          seed=seed, target=target, evaluate=evaluate,
                          warm_up_steps=_kfac_warm_up_steps(kwargs, steps))


# The best preconditioned Hessian-free configuration measured in
# benchmarks/README.md ("Hessian-free with a preconditioned CG"): K-FAC PCG
# capped at 25 iterations (2.4x fewer products per outer iteration than
# plain HF on 20k images; it does not reach L in 100 iterations).
HF_PRECONDITIONED = dict(preconditioner="kfac", preconditioner_every=10,
                         max_cg_iterations=25)


def train_hessian_free(data, steps, *, batch_size=1000,
                       curvature_batch_size=250, evaluation_batch_size=250,
                       seed=0, target=None, evaluate=None, batch_growth=None,
                       desc="hessian_free", **hf_kwargs):
  """Hessian-free, one jitted outer iteration, loss after every iteration.

  The trace's ``cg`` counts the CG iterations (curvature products).
  """
  opt = curvature.hessian_free(
      predict_fn=predict, loss=LOSS, l2_reg=L2_REG,
      curvature_batch_size=curvature_batch_size,
      evaluation_batch_size=evaluation_batch_size, **hf_kwargs)
  describe = lambda state: dict(damping=f"{float(state[0].damping):.2g}",
                                cg=int(state[0].cg_iterations))
  return _train_curvature(opt, data, steps, desc=desc,
                          batch_size=batch_size, eval_every=1, seed=seed,
                          target=target, evaluate=evaluate, describe=describe,
                          tally=lambda state: state[0].cg_iterations,
                          batch_growth=batch_growth)


def train_kfac_jax(data, steps, *, batch_size=1000, eval_every=5, seed=0,
                   target=None, outlier_factor=PEER_OUTLIER_FACTOR):
  """kfac-jax's adaptive K-FAC in its own venv (see ``_kfac_jax_curves.py``).

  Returns ``None`` (and says why) when the venv is missing or the run fails.
  Raises :class:`CompilationInTimedLoop` when the peer's own check (after
  its warm-up: jax.monitoring, and no timed step over ``outlier_factor``
  times the median of its kind) fails.
  """
  if not os.path.exists(PEER_PYTHON):
    print("kfac-jax peer skipped: no venv at", PEER_PYTHON,
          "(see benchmarks/kfac.py for the two commands that create it)")
    return None
  with tempfile.TemporaryDirectory() as tmp:
    images, out = os.path.join(tmp, "images.npz"), os.path.join(tmp, "o.json")
    np.savez(images, images=np.asarray(data["inputs"]))
    command = [PEER_PYTHON, os.path.join(HERE, "_kfac_jax_curves.py"), images,
               out, "--steps", str(steps), "--batch-size", str(batch_size),
               "--eval-every", str(eval_every), "--seed", str(seed),
               "--layers", ",".join(map(str, LAYERS)),
               "--outlier-factor", repr(outlier_factor)]
    if target is not None:
      command += ["--target", repr(target)]
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True,
                          cwd=HERE)  # stderr (the progress bar) passes through
    if proc.returncode == COMPILED_EXIT_CODE:
      with open(out) as f:
        raise CompilationInTimedLoop(json.load(f)["compile_check"])
    if proc.returncode:
      print("kfac-jax peer failed with exit code", proc.returncode)
      return None
    with open(out) as f:
      result = json.load(f)
  print(result["compile_check"])
  return Trace(*(np.asarray(result[k]) for k in Trace._fields
                 if k in result))


def to_target(trace: Trace, target: float):
  """(steps, seconds) at the first evaluation with loss ≤ target, or Nones."""
  hits = np.nonzero(trace.loss <= target)[0]
  if not hits.size:
    return None, None
  i = int(hits[0])
  return int(trace.steps[i]), float(trace.seconds[i])


def run(train_size=20_000, steps=2000, optimizers=OPTIMIZERS, eval_every=10,
        batch_size=1000, curvature_batch_size=250, momentum_lr=MOMENTUM_LR,
        adam_lrs=ADAM_LRS, kfac_eval_every=5, stop_at_target=True, seed=0,
        curvature_steps=None, shampoo_lr=SHAMPOO_LR, soap_lr=SOAP_LR,
        kfac_kwargs=None):
  """Every requested row; returns ``(traces, rows, target, adam_best_lr)``.

  Adam runs ``steps`` steps at each rate of ``adam_lrs``; K-FAC, Hessian-free
  and kfac-jax at most ``curvature_steps`` (default ``steps``).
  """
  curvature_steps = curvature_steps or steps
  data = load_data(train_size, seed)
  evaluate = _evaluator(data)
  batch_size = min(batch_size, train_size)
  traces = {}
  for lr in adam_lrs:
    traces[f"adam {lr:g}"] = train_first_order(
        optax.adam(lr), data, steps, batch_size=batch_size,
        eval_every=eval_every, seed=seed, desc=f"adam {lr:g}",
        evaluate=evaluate)
  best_name = min(traces, key=lambda k: traces[k].loss.min()) if traces else None
  target = float(traces[best_name].loss.min()) if traces else None
  stop = target if stop_at_target else None

  kfac_kwargs = dict(kfac_kwargs or {})
  if "kfac" in optimizers:
    traces["kfac (adaptive)"] = train_kfac(
        data, curvature_steps, batch_size=batch_size,
        eval_every=kfac_eval_every,
        seed=seed, target=stop, evaluate=evaluate, **kfac_kwargs)
  if "ekfac" in optimizers:
    traces["ekfac (adaptive)"] = train_kfac(
        data, curvature_steps, batch_size=batch_size,
        eval_every=kfac_eval_every, seed=seed, target=stop,
        evaluate=evaluate, **dict(kfac_kwargs, structure="eigen_kronecker"))
  for name, make, lr in (("shampoo", curvature.shampoo, shampoo_lr),
                         ("soap", curvature.soap, soap_lr)):
    if name in optimizers:
      traces[f"{name} {lr:g}"] = train_first_order(
          make(lr), data, steps, batch_size=batch_size,
          eval_every=eval_every, seed=seed, desc=f"{name} {lr:g}",
          evaluate=evaluate, target=stop)
  if "hessian_free" in optimizers:
    traces["hessian_free"] = train_hessian_free(
        data, curvature_steps, batch_size=batch_size,
        curvature_batch_size=min(curvature_batch_size, batch_size),
        evaluation_batch_size=min(curvature_batch_size, batch_size),
        seed=seed, target=stop, evaluate=evaluate)
  if "hessian_free_kfac" in optimizers:
    traces["hessian_free, kfac"] = train_hessian_free(
        data, curvature_steps, batch_size=batch_size,
        curvature_batch_size=min(curvature_batch_size, batch_size),
        evaluation_batch_size=min(curvature_batch_size, batch_size),
        seed=seed, target=stop, evaluate=evaluate, desc="hessian_free kfac",
        **HF_PRECONDITIONED)
  if "kfac_jax" in optimizers:
    trace = train_kfac_jax(data, curvature_steps, batch_size=batch_size,
                           eval_every=kfac_eval_every, seed=seed, target=stop)
    if trace is not None:
      traces["kfac-jax (adaptive)"] = trace
  if "momentum" in optimizers:
    for name, opt in (
        ("curvature.sgd momentum", curvature.sgd(momentum_lr, momentum=0.9)),
        ("optax.sgd momentum", optax.sgd(momentum_lr, momentum=0.9))):
      traces[name] = train_first_order(
          opt, data, steps, batch_size=batch_size, eval_every=eval_every,
          seed=seed, desc=name, evaluate=evaluate)

  print(f"compile check: no compilation inside the timed loops of the "
        f"{len(traces)} rows (each warmed up first; see the lines above)")
  rows = []
  for name, trace in traces.items():
    s, t = to_target(trace, target) if target is not None else (None, None)
    rows.append(dict(optimizer=name, steps_to_target=s, seconds_to_target=t,
                     final_loss=float(trace.loss[-1]),
                     best_loss=float(trace.loss.min()),
                     steps_run=int(trace.steps[-1]),
                     seconds_run=float(trace.seconds[-1]),
                     cg_per_iteration=(None if trace.cg is None else float(
                         trace.cg[-1] / max(trace.steps[-1], 1)))))
  return traces, rows, target, best_name


def momentum_comparison(traces):
  """Steps to the momentum rows' own common target (the worse best loss)."""
  a, b = traces.get("curvature.sgd momentum"), traces.get("optax.sgd momentum")
  if a is None or b is None:
    return None
  common = max(a.loss.min(), b.loss.min())
  sa, _ = to_target(a, common)
  sb, _ = to_target(b, common)
  return dict(target=float(common), curvature_steps=sa, optax_steps=sb,
              relative_difference=abs(sa - sb) / sb if sb else None)


def verdicts(rows, steps, adam_name):
  by = {r["optimizer"]: r for r in rows}
  adam = by.get(adam_name)
  out = {}
  if adam is None:
    return out
  t_adam = adam["seconds_to_target"]
  for name, step_frac, time_frac in (("kfac (adaptive)", 0.15, 0.6),
                                     ("ekfac (adaptive)", 0.15, 0.6),
                                     ("hessian_free", 0.05, 1.0),
                                     ("hessian_free, kfac", 0.05, 1.0)):
    r = by.get(name)
    if r is None:
      continue
    s, t = r["steps_to_target"], r["seconds_to_target"]
    out[name] = dict(
        steps_target=step_frac * steps, time_target=time_frac * t_adam,
        steps_met=s is not None and s <= step_frac * steps,
        time_met=t is not None and t <= time_frac * t_adam)
    peer = by.get("kfac-jax (adaptive)")
    if (peer is not None and peer["steps_to_target"] is not None
        and s is not None):
      # Issue targets: ours ÷ kfac-jax ≤ 1.0 in steps and ≤ 0.75 in seconds.
      out[name].update(
          steps_ratio_to_kfac_jax=s / peer["steps_to_target"],
          seconds_ratio_to_kfac_jax=t / peer["seconds_to_target"],
          beats_kfac_jax_steps=s <= peer["steps_to_target"],
          beats_kfac_jax_time=t <= 0.75 * peer["seconds_to_target"])
  return out


def print_table(rows, target, adam_name):
  """Steps and seconds to ``target``, final and best loss, for every row."""
  print(f"target L = {target:.4f} (best of {adam_name})")
  print(f"{'optimizer':26s}{'steps to L':>12s}{'s to L':>10s}"
        f"{'final loss':>12s}{'best loss':>11s}{'steps run':>11s}"
        f"{'s run':>9s}")
  for r in rows:
    s = "—" if r["steps_to_target"] is None else str(r["steps_to_target"])
    t = ("—" if r["seconds_to_target"] is None
         else f"{r['seconds_to_target']:.1f}")
    cg = ("" if r.get("cg_per_iteration") is None
          else f"   CG/iteration {r['cg_per_iteration']:.1f}")
    print(f"{r['optimizer']:26s}{s:>12s}{t:>10s}{r['final_loss']:12.4f}"
          f"{r['best_loss']:11.4f}{r['steps_run']:11d}{r['seconds_run']:9.1f}"
          f"{cg}")


def save_plot(traces, target, path, title):
  """Training loss against steps and against seconds, one line per row."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, trace in traces.items():
    axes[0].plot(trace.steps, trace.loss, label=name)
    axes[1].plot(trace.seconds, trace.loss, label=name)
  for ax, xlabel in zip(axes, ("steps (outer iterations)", "seconds")):
    ax.axhline(target, color="gray", ls=":", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
  axes[0].legend(fontsize=8)
  fig.suptitle(f"{title} (dotted: Adam's best, L = {target:.2f})")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--train-size", type=int, default=20_000)
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                      help="comma-separated subset of " + ",".join(OPTIMIZERS)
                      + " (Adam always runs: it sets the target)")
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--eval-every", type=int, default=10)
  parser.add_argument("--curvature-steps", type=int, default=None,
                      help="cap on K-FAC / Hessian-free steps (default N)")
  parser.add_argument("--batch-size", type=int, default=1000)
  parser.add_argument("--momentum-lr", type=float, default=MOMENTUM_LR)
  parser.add_argument("--shampoo-lr", type=float, default=SHAMPOO_LR)
  parser.add_argument("--soap-lr", type=float, default=SOAP_LR)
  parser.add_argument("--adam-lrs", default=",".join(map(str, ADAM_LRS)),
                      help="comma-separated Adam learning rates (the best "
                      "sets the target)")
  args = parser.parse_args(argv)
  adam_lrs = tuple(float(lr) for lr in args.adam_lrs.split(",") if lr)
  optimizers = tuple(o.strip() for o in args.optimizers.split(",") if o)

  traces, rows, target, adam_name = run(
      args.train_size, args.steps, optimizers, args.eval_every,
      args.batch_size, momentum_lr=args.momentum_lr, adam_lrs=adam_lrs,
      shampoo_lr=args.shampoo_lr, soap_lr=args.soap_lr,
      curvature_steps=args.curvature_steps)
  print(f"\nCURVES-like autoencoder {'-'.join(map(str, LAYERS))}, "
        f"{args.train_size} images, batch {args.batch_size}, N = {args.steps}")
  print(f"machine: {machine()}")
  print_table(rows, target, adam_name)
  checks = verdicts(rows, args.steps, adam_name)
  for name, v in checks.items():
    peer = (f"; ÷ kfac-jax: {v['steps_ratio_to_kfac_jax']:.2f} in steps"
            f" (≤ 1.0: {v['beats_kfac_jax_steps']}),"
            f" {v['seconds_ratio_to_kfac_jax']:.2f} in seconds"
            f" (≤ 0.75: {v['beats_kfac_jax_time']})"
            if "beats_kfac_jax_steps" in v else "")
    print(f"{name}: steps ≤ {v['steps_target']:.0f}: {v['steps_met']}; "
          f"seconds ≤ {v['time_target']:.1f}: {v['time_met']}{peer}")
  mom = momentum_comparison(traces)
  if mom:
    print(f"momentum, steps to {mom['target']:.4f}: curvature "
          f"{mom['curvature_steps']}, optax {mom['optax_steps']} "
          f"(relative difference {mom['relative_difference']})")

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "convergence.json"), "w") as f:
    json.dump(dict(machine=machine(), train_size=args.train_size,
                   steps=args.steps, batch_size=args.batch_size,
                   target=target, adam_best=adam_name, rows=rows,
                   targets=checks, momentum=mom,
                   traces={k: {f: v.tolist() for f, v in t._asdict().items()
                               if v is not None}
                           for k, t in traces.items()}), f, indent=1)
  png = os.path.join(args.out, "convergence.png")
  save_plot(traces, target, png,
            f"CURVES-like autoencoder, {args.train_size} images")
  print(f"results in {args.out}/convergence.json and {png}")
  return traces, rows


if __name__ == "__main__":
  main()
