"""K-FAC (reduce and expand), Shampoo and SOAP against AdamW on a char-LM.

The text is the source of Python's standard library: the ``.py`` files of the
directory that holds ``inspect``, in sorted order, concatenated up to a fixed
size (nothing is downloaded). Characters are bytes; printable ASCII, newline
and tab get a token each, every other byte one "unknown" token. The last 10%
is the validation split.

The model is a small decoder-only transformer in plain JAX (the pattern of
``tests/helpers.py``): token and position embeddings, the output layer tied
to the token embedding, a ``lax.scan`` over pre-LayerNorm blocks of causal
multi-head attention and a GELU MLP, float32.

Rows, all at the same batch, model, initialization and data order:

* **AdamW** (``optax.adamw``, weight decay 0.01), each learning rate of a
  small grid, linear warmup then cosine decay (``optax.schedules``); the
  lowest validation loss of the best rate is the target ``L``.
* **K-FAC-reduce** and **K-FAC-expand** (``curvature.kfac`` with
  ``weight_sharing="reduce"`` / ``"expand"``, momentum 0.9, the same
  schedule shape), **K-FAC-reduce grafted onto Adam** (``graft=
  optax.scale_by_adam(b1=0.0)``: K-FAC's direction at Adam's per-layer step
  sizes, as Shampoo is grafted), **Shampoo** and **SOAP**
  (``curvature.shampoo`` / ``curvature.soap``), each learning rate of a
  small grid; the best rate is
  the one that reaches ``L`` in the fewest steps (or, if none does, the
  lowest validation loss).

Reported: steps and seconds (timed jitted steps only, compile excluded) to
AdamW's best validation loss, the per-step time ratio to AdamW (median of
interleaved timed steps, each optimizer's step compiled first), and the
compiled memory of K-FAC's update (reduce against expand).

    python benchmarks/transformer.py [--fast] [--steps 300]

``--fast`` (or ``CURVATURE_FAST=1``) is a smoke run: less text, a few steps,
one learning rate per row.
"""

import argparse
import dataclasses
import functools
import inspect
import json
import os
import pathlib
import sys
import time
from typing import Any, Callable, NamedTuple

if "--fast" in sys.argv or os.environ.get("CURVATURE_FAST") == "1":
  # A smoke run: compile time dominates, so compile without optimizations.
  os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import optax
from tqdm.auto import tqdm

import curvature

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # pylint: disable=g-import-not-at-top,wrong-import-position

LOSS = curvature.losses.softmax_cross_entropy
OPTIMIZERS = ("adamw", "kfac_reduce", "kfac_expand", "kfac_graft", "shampoo",
              "soap")
WEIGHT_DECAY = 0.01


@dataclasses.dataclass(frozen=True)
class Config:
  """The experiment: data size, model, batch and learning-rate grids."""
  text_bytes: int = 1_500_000
  vocab: int = 98  # 95 printable ASCII, newline, tab, unknown.
  seq: int = 64
  dim: int = 64
  heads: int = 4
  layers: int = 2
  batch: int = 32
  steps: int = 300
  warmup: int = 20
  eval_every: int = 20
  eval_windows: int = 256
  timing_repeats: int = 10
  # K-FAC's initial damping: of 1e-3, 0.1 and 1 (each with its best rate of
  # two or three), 0.1 gave the lowest validation loss (benchmarks/README.md).
  kfac_damping: float = 0.1
  # The grafted row: with Adam's step sizes the damping no longer bounds the
  # step (of 1e-3, 1e-2 and 0.1 at lr 3e-3, 1e-3 did best), and the
  # diagonal estimate's noise moves only directions within a leaf, so the
  # free "square_of_sum" did as well as per-example gradients.
  kfac_graft_damping: float = 1e-3
  kfac_graft_diagonal_estimator: str = "square_of_sum"
  # Examples of each batch K-FAC's factor statistics use (None: all).
  kfac_statistics_batch: int | None = None
  # How K-FAC estimates the Fisher diagonal of the leaves outside every layer
  # (LayerNorm, position embeddings, 4% of the parameters): per-example
  # gradients of the first 8 examples of the batch (the factor statistics
  # keep all 32), or "square_of_sum" (no extra pass; noisier). 8 of 32 cost
  # 0.012 validation loss and save a fifth of the step (benchmarks/README.md).
  kfac_diagonal_estimator: str = "per_example"
  kfac_diagonal_batch: int | None = 8
  grids: tuple = (("adamw", (3e-3, 1e-2, 3e-2)),
                  ("kfac_reduce", (3e-3, 1e-2)),
                  ("kfac_expand", (3e-3, 1e-2)),
                  ("kfac_graft", (1e-3, 3e-3)),
                  ("shampoo", (1e-3, 3e-3)),
                  ("soap", (3e-3, 1e-2)))

  def grid(self, name):
    return dict(self.grids)[name]


FAST = Config(text_bytes=200_000, seq=32, dim=32, batch=16, steps=20,
              warmup=4, eval_every=5, eval_windows=32, timing_repeats=2,
              grids=(("adamw", (3e-3,)), ("kfac_reduce", (1e-2,)),
                     ("kfac_expand", (1e-2,)), ("kfac_graft", (3e-3,)),
                     ("shampoo", (3e-3,)),
                     ("soap", (3e-3,))))


# Data ----------------------------------------------------------------------


def stdlib_text(num_bytes):
  """The standard library's ``.py`` sources, sorted by name, ``num_bytes``."""
  folder = pathlib.Path(inspect.__file__).resolve().parent
  chunks, total = [], 0
  for path in sorted(folder.glob("*.py")):
    data = path.read_bytes()
    chunks.append(data)
    total += len(data)
    if total >= num_bytes:
      break
  return b"".join(chunks)[:num_bytes], folder


def encode(data: bytes):
  """Bytes to tokens: 0-94 printable ASCII, 95 newline, 96 tab, 97 other."""
  raw = np.frombuffer(data, np.uint8).astype(np.int32)
  tokens = np.full(raw.shape, 97, np.int32)
  printable = (raw >= 32) & (raw < 127)
  tokens[printable] = raw[printable] - 32
  tokens[raw == 10] = 95
  tokens[raw == 9] = 96
  return tokens


def decode(tokens):
  table = [chr(32 + i) for i in range(95)] + ["\n", "\t", "?"]
  return "".join(table[int(t)] for t in tokens)


def load_data(config):
  """``{"train", "valid"}`` token arrays (the last 10% is validation)."""
  data, folder = stdlib_text(config.text_bytes)
  tokens = encode(data)
  cut = int(0.9 * len(tokens))
  return {"train": tokens[:cut], "valid": tokens[cut:], "folder": str(folder)}


def windows(tokens, starts, seq):
  index = starts[:, None] + jnp.arange(seq)[None]
  return {"inputs": tokens[index], "targets": tokens[index + 1]}


def sample_batch(key, tokens, config):
  starts = jax.random.randint(key, (config.batch,), 0,
                              tokens.shape[0] - config.seq - 1)
  return windows(tokens, starts, config.seq)


def validation_batch(tokens, config):
  """``eval_windows`` evenly spaced windows of the validation split."""
  starts = np.linspace(0, len(tokens) - config.seq - 2,
                       config.eval_windows).astype(np.int32)
  return windows(jnp.asarray(tokens), jnp.asarray(starts), config.seq)


# Model ---------------------------------------------------------------------


def init_params(config, seed=0):
  """Parameters of :func:`predict`; the blocks stacked on axis 0."""
  v, t, d, n = config.vocab, config.seq, config.dim, config.layers
  keys = iter(jax.random.split(jax.random.key(seed), 8))
  normal = lambda shape, scale: scale * jax.random.normal(next(keys), shape)
  zeros, ones = jnp.zeros, jnp.ones
  blocks = {
      "ln1_scale": ones((n, d)), "ln1_bias": zeros((n, d)),
      "qkv": normal((n, d, 3 * d), d ** -0.5), "qkv_b": zeros((n, 3 * d)),
      "proj": normal((n, d, d), (2 * n * d) ** -0.5), "proj_b": zeros((n, d)),
      "ln2_scale": ones((n, d)), "ln2_bias": zeros((n, d)),
      "fc1": normal((n, d, 4 * d), d ** -0.5), "fc1_b": zeros((n, 4 * d)),
      "fc2": normal((n, 4 * d, d), (8 * n * d) ** -0.5),
      "fc2_b": zeros((n, d)),
  }
  return {"embed": normal((v, d), d ** -0.5), "pos": normal((t, d), 0.1),
          "blocks": blocks, "ln_scale": ones(d), "ln_bias": zeros(d)}


def _layer_norm(h, scale, bias):
  mean = jnp.mean(h, axis=-1, keepdims=True)
  var = jnp.var(h, axis=-1, keepdims=True)
  return (h - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def _attention(q, k, v, heads):
  n, t, d = q.shape
  split = lambda x: x.reshape(n, t, heads, d // heads)
  scores = jnp.einsum("nthd,nshd->nhts", split(q), split(k))
  scores = scores * (d // heads) ** -0.5
  mask = jnp.tril(jnp.ones((t, t), bool))
  weights = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
  return jnp.einsum("nhts,nshd->nthd", weights, split(v)).reshape(n, t, d)


def predict(params, batch, heads=4):
  """Logits ``[batch, seq, vocab]``; the output layer is ``h @ embedᵀ``."""
  tokens = batch["inputs"]
  h = params["embed"][tokens] + params["pos"][None, :tokens.shape[1]]

  def block(h, p):
    x = _layer_norm(h, p["ln1_scale"], p["ln1_bias"])
    q, k, v = jnp.split(x @ p["qkv"] + p["qkv_b"], 3, axis=-1)
    h = h + (_attention(q, k, v, heads) @ p["proj"] + p["proj_b"])
    x = _layer_norm(h, p["ln2_scale"], p["ln2_bias"])
    h = h + (jax.nn.gelu(x @ p["fc1"] + p["fc1_b"]) @ p["fc2"] + p["fc2_b"])
    return h, None

  h, _ = jax.lax.scan(block, h, params["blocks"])
  h = _layer_norm(h, params["ln_scale"], params["ln_bias"])
  return h @ params["embed"].T


def predict_fn(config):
  return functools.partial(predict, heads=config.heads)


def num_params(params):
  return sum(x.size for x in jax.tree.leaves(params))


# Optimizers ----------------------------------------------------------------


def schedule(config):
  """Linear warmup over ``config.warmup`` steps, then cosine decay to 0.

  Peak 1: the learning rate multiplies the update inside the step, so one
  compiled step serves a whole learning-rate grid. Every optimizer here
  ends in ``scale_by_learning_rate``, so this is the same as passing
  ``lr · schedule`` to it.
  """
  return optax.schedules.warmup_cosine_decay_schedule(
      0.0, 1.0, config.warmup, config.steps)


def make_optimizer(name, config, example_batch):
  """``(optimizer, needs_batch)`` for a row of :data:`OPTIMIZERS`."""
  lr = schedule(config)
  if name == "adamw":
    return optax.adamw(lr, weight_decay=WEIGHT_DECAY), False
  if name == "shampoo":
    return curvature.shampoo(lr), False
  if name == "soap":
    return curvature.soap(lr, weight_decay=WEIGHT_DECAY), False
  if name == "kfac_graft":
    sharing, graft = "reduce", optax.scale_by_adam(b1=0.0)
    damping, estimator = (config.kfac_graft_damping,
                          config.kfac_graft_diagonal_estimator)
  else:
    sharing, graft = name.split("_")[1], None
    damping, estimator = config.kfac_damping, config.kfac_diagonal_estimator
  return curvature.kfac(
      lr, predict_fn=predict_fn(config), loss=LOSS, momentum=0.9,
      initial_damping=damping, inverse_every=10,
      statistics_batch_size=config.kfac_statistics_batch,
      diagonal_estimator=estimator,
      diagonal_batch_size=(config.kfac_diagonal_batch
                           if estimator == "per_example" else None),
      weight_sharing=sharing, graft=graft,
      example_batch=example_batch), True


class Row(NamedTuple):
  """One optimizer: its transform, its compiled step and the step's memory."""
  opt: optax.GradientTransformation
  step: Callable
  memory: Any  # ``memory_analysis()`` of the compiled step.


_ROWS = {}


def row(name, config, tokens):
  """The optimizer and its jitted step, compiled once (cached).

  ``step(params, state, tokens, key, lr) -> (params, state, loss)``: one
  minibatch drawn with ``key``; the objective is ``LOSS.value``, the
  cross-entropy summed over the sequence and averaged over the batch
  (K-FAC's statistics use the same scale).
  """
  if (name, config) in _ROWS:
    return _ROWS[name, config]
  example_batch = sample_batch(jax.random.key(0), tokens, config)
  opt, needs_batch = make_optimizer(name, config, example_batch)
  model = predict_fn(config)

  def step(params, state, tokens, key, lr):
    batch = sample_batch(key, tokens, config)
    objective = lambda p: LOSS.value(model(p, batch), batch["targets"])
    value, grads = jax.value_and_grad(objective)(params)
    extra = {"batch": batch} if needs_batch else {}
    updates, state = opt.update(grads, state, params, **extra)
    updates = jax.tree.map(lambda u: lr * u, updates)
    return optax.apply_updates(params, updates), state, value

  step = jax.jit(step)
  params = init_params(config)
  # The arguments' types exactly as the callers pass them (a float32 array
  # learning rate, not a weakly typed Python float), so that jit's cache
  # serves their calls with this compilation instead of compiling again.
  args = (params, opt.init(params), tokens, jax.random.key(0),
          jnp.float32(1.0))
  compiled = step.lower(*args).compile()
  _ROWS[name, config] = Row(opt, step, compiled.memory_analysis())
  return _ROWS[name, config]


@functools.lru_cache(maxsize=4)
def _evaluate(config, valid_bytes):
  valid = np.frombuffer(valid_bytes, np.int32)
  batch = validation_batch(valid, config)
  model = predict_fn(config)
  per_char = lambda p: LOSS.value(model(p, batch), batch["targets"])
  return jax.jit(lambda p: per_char(p) / config.seq)


def make_evaluate(config, valid):
  """Validation loss in nats per character (one compiled program per data)."""
  return _evaluate(config, np.asarray(valid, np.int32).tobytes())


# Training ------------------------------------------------------------------


def train(name, learning_rate, data, config, *, target=None, seed=0):
  """One run: validation loss (nats per character) every ``eval_every``.

  The step is compiled first (once per optimizer, see :func:`row`) and run
  once on a throwaway state; then the run starts from the initialization.
  Only the jitted steps are timed. With a ``target``, the run stops at the
  first evaluation at or below it.

  Returns:
    ``{"name", "lr", "steps", "valid", "seconds", "train"}``: evaluation
    steps, validation losses, cumulative step seconds at each evaluation,
    training losses (per character) of the steps.
  """
  tokens = jnp.asarray(data["train"])
  opt, step, _ = row(name, config, tokens)
  evaluate = make_evaluate(config, data["valid"])
  lr = jnp.float32(learning_rate)
  params = init_params(config, seed)
  jax.block_until_ready(step(params, opt.init(params), tokens,
                             jax.random.key(0), lr))
  state = opt.init(params)
  key = jax.random.key(seed + 1)
  out = {"name": name, "lr": learning_rate, "steps": [0],
         "valid": [float(evaluate(params))], "seconds": [0.0], "train": []}
  seconds = 0.0
  bar = tqdm(range(1, config.steps + 1), desc=f"{name} {learning_rate:g}",
             leave=False)
  for t in bar:
    key, sub = jax.random.split(key)
    start = time.perf_counter()
    params, state, value = step(params, state, tokens, sub, lr)
    value = float(value) / config.seq
    seconds += time.perf_counter() - start
    out["train"].append(value)
    if not np.isfinite(value):
      break
    if t % config.eval_every == 0 or t == config.steps:
      out["steps"].append(t)
      out["valid"].append(float(evaluate(params)))
      out["seconds"].append(seconds)
      bar.set_postfix(valid=f"{out['valid'][-1]:.3f}")
      if target is not None and out["valid"][-1] <= target:
        break
  bar.close()
  return out


def first_reach(run, target):
  """``(steps, seconds)`` at the first evaluation ≤ ``target``, or None."""
  for s, v, sec in zip(run["steps"], run["valid"], run["seconds"]):
    if v <= target:
      return s, sec
  return None


def best_run(runs, target=None):
  """The fastest run to ``target`` (fewest steps), else the lowest loss."""
  if target is not None:
    reached = [(first_reach(r, target)[0], i) for i, r in enumerate(runs)
               if first_reach(r, target)]
    if reached:
      return runs[min(reached)[1]]
  return min(runs, key=lambda r: np.nanmin(r["valid"]))


def sweep(names, data, config, log=print):
  """AdamW's grid first (its best validation loss is the target), then the
  other rows' grids against it. ``{name: {"best": run, "runs": [...]}}``."""
  results = {}
  adam_runs = [train("adamw", lr, data, config) for lr in config.grid("adamw")]
  adam = best_run(adam_runs)
  target = float(np.min(adam["valid"]))
  results["adamw"] = {"best": adam, "runs": adam_runs, "target": target}
  log(f"adamw: best lr {adam['lr']:g}, best validation loss {target:.4f}")
  for name in names:
    if name == "adamw":
      continue
    runs = [train(name, lr, data, config, target=target)
            for lr in config.grid(name)]
    best = best_run(runs, target)
    results[name] = {"best": best, "runs": runs}
    reach = first_reach(best, target)
    log(f"{name}: best lr {best['lr']:g}, "
        + (f"reaches {target:.4f} at step {reach[0]}" if reach else
           f"best {np.nanmin(best['valid']):.4f} (target not reached)"))
  return results


# Step time and memory ------------------------------------------------------


def step_times(rows, data, config):
  """Median seconds per step, the rows' steps run round-robin.

  ``rows``: ``{name: learning_rate}``. The steps are the compiled ones of
  the sweep; each repeat times 5 steps of every row.
  """
  tokens = jnp.asarray(data["train"])
  carries = {}
  for name in rows:
    opt = row(name, config, tokens).opt
    params = init_params(config)
    carries[name] = (params, opt.init(params))
  times = {name: [] for name in rows}
  key = jax.random.key(7)
  for _ in tqdm(range(config.timing_repeats), desc="timing", leave=False):
    for name, learning_rate in rows.items():
      step = row(name, config, tokens).step
      params, state = carries[name]
      start = time.perf_counter()
      for _ in range(5):
        key, sub = jax.random.split(key)
        params, state, value = step(params, state, tokens, sub,
                                    jnp.float32(learning_rate))
      jax.block_until_ready(value)
      times[name].append((time.perf_counter() - start) / 5)
      carries[name] = (params, state)
  return {name: float(np.median(t)) for name, t in times.items()}


def kfac_memory(config, data):
  """Memory of K-FAC's step with each weight-sharing mode.

  Returns ``{sharing: {"step_temp", "statistics_rows", "factor_bytes",
  "diagonal_bytes"}}``: the compiled temporary bytes of one whole training
  step (``memory_analysis``), the rows each kernel's inputs contribute to
  its factor statistics (``batch·seq`` expanded, ``batch`` reduced), the
  bytes of the Kronecker blocks kept in the state (factors and their
  inverses, the same for both) and those of the diagonal block's statistics
  (the leaves outside every layer, as ``example_batch`` reserves them).
  """
  tokens = jnp.asarray(data["train"])
  params = init_params(config)
  out = {}
  nbytes = lambda tree: int(sum(x.nbytes for x in jax.tree.leaves(tree)))
  for sharing in ("reduce", "expand"):
    name = f"kfac_{sharing}"
    opt, _, memory = row(name, config, tokens)
    kfac_state = optax.tree.get(opt.init(params), "ScaleByKfacState")
    examples = config.kfac_statistics_batch or config.batch
    rows = examples * (1 if sharing == "reduce" else config.seq)
    out[sharing] = {"step_temp": int(memory.temp_size_in_bytes),
                    "statistics_rows": rows,
                    "factor_bytes": nbytes(kfac_state.blocks),
                    "diagonal_bytes": nbytes(kfac_state.diagonal)}
  return out


def ggn_memory(config, data):
  """Compiled peak bytes of ``value_and_grad`` and of one GGN product."""
  tokens = jnp.asarray(data["train"])
  batch = sample_batch(jax.random.key(0), tokens, config)
  params = init_params(config)
  model = predict_fn(config)

  def value_and_grad(p, b):
    return jax.value_and_grad(lambda q: LOSS.value(model(q, b),
                                                   b["targets"]))(p)

  def ggn(p, b, v):
    return curvature.ggn_vector_product(model, LOSS, p, b, v)

  def peak(fn, *args):
    m = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes
               + m.output_size_in_bytes)

  return {"value_and_grad": peak(value_and_grad, params, batch),
          "ggn_vector_product": peak(ggn, params, batch, params)}


# Report --------------------------------------------------------------------


def summarize(results, times, memory, ggn):
  """The figures table rows: ``{name: {...}}`` against AdamW."""
  adam = results["adamw"]["best"]
  target = results["adamw"]["target"]
  adam_reach = first_reach(adam, target)
  rows = {}
  for name, result in results.items():
    run = result["best"]
    reach = first_reach(run, target)
    rows[name] = {
        "lr": run["lr"],
        "best_valid": float(np.nanmin(run["valid"])),
        "steps_to_target": reach[0] if reach else None,
        "seconds_to_target": reach[1] if reach else None,
        "step_ratio": (reach[0] / adam_reach[0]
                       if reach and adam_reach[0] else None),
        "seconds_ratio": (reach[1] / adam_reach[1]
                          if reach and adam_reach[0] else None),
        "step_time": times.get(name),
        "step_time_ratio": (times[name] / times["adamw"]
                            if name in times else None),
    }
  rows["_memory"] = memory
  rows["_ggn_memory"] = ggn
  rows["_target"] = target
  return rows


def table(summary, target):
  """The summary as a Markdown table."""
  lines = ["| optimizer | lr | best valid loss | steps to AdamW's best"
           " | × AdamW's steps | seconds to it | step time (ms) | × AdamW |",
           "|---|---|---|---|---|---|---|---|"]
  fmt = lambda x, f: "—" if x is None else format(x, f)
  for name, row in summary.items():
    if name.startswith("_"):
      continue
    lines.append(
        f"| {name} | {row['lr']:g} | {row['best_valid']:.4f} "
        f"| {fmt(row['steps_to_target'], 'd')} "
        f"| {fmt(row['step_ratio'], '.2f')} "
        f"| {fmt(row['seconds_to_target'], '.1f')} "
        f"| {fmt(row['step_time'] and 1e3 * row['step_time'], '.1f')} "
        f"| {fmt(row['step_time_ratio'], '.2f')} |")
  lines.append(f"\nTarget: AdamW's best validation loss {target:.4f}"
               " (nats per character).")
  return "\n".join(lines)


def verdicts(summary, config):
  """The issue's targets, each checked against the figures (lines)."""
  reduce, adam = summary["kfac_reduce"], summary["adamw"]
  memory, ggn = summary["_memory"], summary["_ggn_memory"]
  target = summary["_target"]
  lines = []
  if reduce["step_ratio"] is None:
    lines.append(f"1. not met: K-FAC-reduce did not reach {target:.4f} in"
                 f" {config.steps} steps (its best: "
                 f"{reduce['best_valid']:.4f}).")
  else:
    verdict = "met" if reduce["step_ratio"] <= 0.75 else "not met"
    lines.append(f"1. {verdict} (≤ 0.75× AdamW's steps): K-FAC-reduce"
                 f" reached {target:.4f} at step {reduce['steps_to_target']},"
                 f" AdamW at {adam['steps_to_target']}:"
                 f" {reduce['step_ratio']:.2f}×.")
  graft = summary.get("kfac_graft")
  if graft is not None:
    reached = graft["step_ratio"] is not None
    verdict = ("both met" if reached and graft["step_ratio"] <= 0.75
               and graft["step_time_ratio"] <= 2.5 else "not both met")
    detail = (f"reached {target:.4f} at step {graft['steps_to_target']},"
              f" {graft['step_ratio']:.2f}× AdamW's steps" if reached else
              f"did not reach {target:.4f} (its best:"
              f" {graft['best_valid']:.4f})")
    lines.append(f"   1-2. grafted onto Adam ({verdict}): K-FAC-reduce"
                 f" {detail};"
                 f" its step takes {graft['step_time_ratio']:.2f}× AdamW's"
                 f" (damping {config.kfac_graft_damping:g}, diagonal"
                 f" estimate {config.kfac_graft_diagonal_estimator!r}).")
  verdict = "met" if reduce["step_time_ratio"] <= 2.5 else "not met"
  factors = config.kfac_statistics_batch or config.batch
  diagonal = ("the square of the summed gradient"
              if config.kfac_diagonal_estimator == "square_of_sum" else
              f"{min(config.kfac_diagonal_batch or factors, factors)}"
              " examples' gradients")
  lines.append(f"2. {verdict} (≤ 2.5× AdamW's step time): K-FAC-reduce's step"
               f" takes {reduce['step_time_ratio']:.2f}× AdamW's"
               f" ({1e3 * reduce['step_time']:.1f} ms against"
               f" {1e3 * adam['step_time']:.1f} ms), with factor statistics"
               f" from {factors} examples of {config.batch} and the diagonal"
               f" of the leaves outside the layers from {diagonal}.")
  rows = memory["reduce"]["statistics_rows"] / memory["expand"][
      "statistics_rows"]
  temp = memory["reduce"]["step_temp"] / memory["expand"]["step_temp"]
  verdict = "met" if rows <= 1 / config.seq else "not met"
  lines.append(
      f"3. {verdict} for the factor statistics (≤ 1/seq of expand's):"
      f" reduce accumulates {memory['reduce']['statistics_rows']} rows per"
      f" factor, expand {memory['expand']['statistics_rows']} ({rows:.4f} ="
      f" 1/{1 / rows:.0f}); the factors kept are the same size"
      f" ({memory['reduce']['factor_bytes'] / 2**20:.2f} MiB with their"
      f" inverses, beside {memory['reduce']['diagonal_bytes'] / 2**20:.2f}"
      " MiB of diagonal statistics for the leaves outside every layer), and"
      " the whole"
      f" compiled step's temporary memory is {temp:.2f}× expand's"
      f" ({memory['reduce']['step_temp'] / 2**20:.1f} against"
      f" {memory['expand']['step_temp'] / 2**20:.1f} MiB).")
  ratio = ggn["ggn_vector_product"] / ggn["value_and_grad"]
  lines.append(f"4. {'met' if ratio <= 1.5 else 'not met'} (≤ 1.5×): one"
               f" GGN-vector product's compiled peak memory is {ratio:.2f}×"
               f" value_and_grad's ({ggn['ggn_vector_product'] / 2**20:.2f}"
               f" against {ggn['value_and_grad'] / 2**20:.2f} MiB).")
  return lines


def run(config, names=OPTIMIZERS, log=print, checkpoint=None):
  """The whole benchmark: ``(data, results, summary)``.

  ``checkpoint(results)``, if given, is called after the sweep.
  """
  data = load_data(config)
  log(f"{len(data['train'])} training and {len(data['valid'])} validation"
      f" characters from {data['folder']}")
  log(f"{num_params(init_params(config))} parameters; batch {config.batch}"
      f" × seq {config.seq}; {machine()}")
  results = sweep(names, data, config, log)
  if checkpoint:
    checkpoint(results)
  rows = {name: results[name]["best"]["lr"] for name in names}
  times = step_times(rows, data, config)
  memory = kfac_memory(config, data)
  ggn = ggn_memory(config, data)
  summary = summarize(results, times, memory, ggn)
  return data, results, summary


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--fast", action="store_true",
                      default=os.environ.get("CURVATURE_FAST") == "1")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
  parser.add_argument("--out", default=None, help="write the JSON here")
  parser.add_argument("--grids", default=None,
                      help="learning rates, e.g. adamw=1e-2,3e-3;soap=3e-3")
  parser.add_argument("--kfac-damping", type=float, default=None,
                      help="K-FAC's initial damping (default 0.1)")
  parser.add_argument("--kfac-statistics-batch", type=int, default=None,
                      help="examples per batch for K-FAC's statistics")
  parser.add_argument("--kfac-diagonal-estimator", default=None,
                      choices=("per_example", "square_of_sum"),
                      help="K-FAC's diagonal estimate outside the layers")
  parser.add_argument("--kfac-diagonal-batch", type=int, default=None,
                      help="examples for K-FAC's per-example diagonal (8;"
                      " 0: all)")
  args = parser.parse_args(argv)
  config = FAST if args.fast else Config()
  if args.steps:
    config = dataclasses.replace(config, steps=args.steps)
  if args.kfac_damping is not None:
    config = dataclasses.replace(config, kfac_damping=args.kfac_damping)
  if args.kfac_statistics_batch is not None:
    config = dataclasses.replace(
        config, kfac_statistics_batch=args.kfac_statistics_batch)
  if args.kfac_diagonal_batch is not None:
    config = dataclasses.replace(
        config, kfac_diagonal_batch=args.kfac_diagonal_batch or None)
  if args.kfac_diagonal_estimator is not None:
    config = dataclasses.replace(
        config, kfac_diagonal_estimator=args.kfac_diagonal_estimator)
  if args.grids:
    grids = dict(config.grids)
    for item in args.grids.split(";"):
      name, lrs = item.split("=")
      grids[name] = tuple(float(x) for x in lrs.split(","))
    config = dataclasses.replace(config, grids=tuple(grids.items()))
  names = tuple(args.optimizers.split(","))
  start = time.time()
  def save(results, summary=None):
    if args.out:
      with open(args.out, "w") as f:
        json.dump({"summary": summary, "config": dataclasses.asdict(config),
                   "results": results}, f, default=float)

  _, results, summary = run(config, names, checkpoint=save)
  save(results, summary)
  print(table(summary, results["adamw"]["target"]))
  print("\n".join(verdicts(summary, config)))
  print(f"total {time.time() - start:.0f} s; {machine()}")


if __name__ == "__main__":
  main()
