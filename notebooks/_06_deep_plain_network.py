CELLS = [
("md", r"""
# 6. A deep plain network: K-FAC against Adam, with and without skip connections

Martens' lecture *Second-order optimization for neural networks* (2020, by
one of K-FAC's authors) closes its second-order section
with this experiment:

> "you can consider networks that are say 100 layers deep but don't have skip
> connections don't have [batch norm] have the usual tricks and this gives rise
> to a much harder optimization problem because it turns out those tricks are
> actually helping make the optimization problem [...] much easier so if you
> have such a network and you initialize it carefully [...] and you pick a
> batch size which is you know not crazy [...] (a similar result holds for a
> much smaller batch size say 64) then in fact there can be a huge advantage
> to using a second order method like K-FAC versus momentum methods or Adam
> [...] but it's interesting to note that if you run the same experiment on a
> ResNet the differences vanished completely so all methods perform almost
> identically"

and, answering questions, that a ResNet's implicit condition number "was
really really good", that skip connections make the network "look much more
like a shallow network", and that removing skip connections and batch norm
needs *both* a better optimizer and a careful initialization ("those methods
also as it turns out were fixing bad initializations").

We redo that experiment at laptop scale:

* **data**: MNIST-1D (`datasets.make_mnist1d`, 40-sample signals, 10
  classes, 4,000 training signals), softmax cross-entropy
  (`curvature.losses.softmax_cross_entropy`), minibatches of 256, and we
  report the *training* loss on the whole training set (an optimization
  question, not a generalization one);
* **plain network**: an input layer 40→64, `DEPTH` = 20 hidden layers
  `h ← tanh(h W + b)` of width 64 and a linear 64→10 output layer, no skip
  connections and no normalization;
* **residual network**: the same layers with `h ← h + tanh(h W + b)`;
* **optimizers**: K-FAC (`curvature.scale_by_kfac`, true Fisher, fixed
  damping, heavy-ball momentum 0.9), Adam (`optax.scale_by_adam`) and SGD
  with heavy-ball momentum 0.9 (`optax.trace`), each with its learning rate
  chosen from a grid of three, separately for each architecture.

Set `CURVATURE_FAST=1` for the fast mode (CI): 3 hidden layers of width 32,
1,000 signals, 40 steps, two learning rates per grid.
"""),
("code", SETUP),
("code", r'''
# float32: this is a training benchmark, not an exact 2-D picture. float32
# roughly halves the time of every matmul on the CPU, and K-FAC keeps its
# factors and inverses in (at least) float32 anyway.
jax.config.update("jax_enable_x64", False)

DEPTH = 3 if FAST else 20          # hidden tanh layers (weight layers: DEPTH + 2)
WIDTH = 32 if FAST else 64
NUM_SAMPLES = 1000 if FAST else 5000  # MNIST-1D signals, 80% for training
STEPS = 40 if FAST else 1000
BATCH_SIZE = 128 if FAST else 256
EVAL_EVERY = 5 if FAST else 20
TARGET = 1.5 if FAST else 0.5      # "steps to reach this training loss"
ADAM_LRS = (1e-3, 3e-3) if FAST else (3e-4, 1e-3, 3e-3)
KFAC_LRS = (3e-3, 1e-2) if FAST else (1e-3, 3e-3, 1e-2)
MOMENTUM_LRS = (3e-2, 1e-1) if FAST else (1e-2, 3e-2, 1e-1)
KFAC_DAMPING = 1e-2                # fixed λ (γ = √λ in the factored damping)

data = datasets.make_mnist1d(NUM_SAMPLES)
train = {"inputs": jnp.asarray(data.train_inputs),
         "targets": jnp.asarray(data.train_labels)}
num_train = train["inputs"].shape[0]
xent = curvature.losses.softmax_cross_entropy
print(f"{num_train} training signals of length {train['inputs'].shape[1]},"
      f" {DEPTH} hidden layers of width {WIDTH}, {STEPS} steps of batch"
      f" {BATCH_SIZE}")
'''),
("md", r"""
## Initialization

The lecture's "default initializer" is a Gaussian scaled by
$1/\sqrt{\text{fan-in}}$; it notes that a deep network without skip
connections needs more care. We use the simplest careful choice for tanh:
**orthogonal** weight matrices with gain 1 (Saxe, McClelland & Ganguli 2014;
for tanh near the origin this is the isometric, "edge of chaos" setting of
Pennington, Schoenholz & Ganguli 2017), zero biases, an input layer scaled so
that each unit's first pre-activation has unit variance, and a **zero output
layer** so that
both networks start at the uniform prediction, loss $\ln 10 \approx 2.303$.
Both architectures share exactly the same initial parameters; only the skip
connection differs. This is far simpler than the kernel-shaping
initialization the lecturer describes as his "two-year long epic project"
(Deep Kernel Shaping, Martens et al. 2021), which we do not attempt.
"""),
("code", r'''
def orthogonal(key, fan_in, fan_out):
  """A [fan_in, fan_out] matrix with orthonormal rows or columns."""
  q, r = jnp.linalg.qr(jax.random.normal(key, (max(fan_in, fan_out),
                                               min(fan_in, fan_out))))
  q = q * jnp.sign(jnp.diag(r))  # a Haar-distributed orthogonal matrix
  return q if fan_in >= fan_out else q.T


def init_params(key, num_inputs, depth=DEPTH, width=WIDTH, num_classes=10):
  keys = jax.random.split(key, depth + 1)
  first = orthogonal(keys[0], num_inputs, width) * np.sqrt(width / num_inputs)
  params = [{"w": first, "b": jnp.zeros(width)}]
  params += [{"w": orthogonal(k, width, width), "b": jnp.zeros(width)}
             for k in keys[1:]]
  params.append({"w": jnp.zeros((width, num_classes)),
                 "b": jnp.zeros(num_classes)})
  return params


def hidden_states(params, inputs, skip):
  """The activations after the input layer and after every hidden layer."""
  h = jnp.tanh(inputs @ params[0]["w"] + params[0]["b"])
  states = [h]
  for layer in params[1:-1]:
    z = jnp.tanh(h @ layer["w"] + layer["b"])
    h = h + z if skip else z
    states.append(h)
  return states


def plain_net(params, batch):
  h = hidden_states(params, batch["inputs"], skip=False)[-1]
  return h @ params[-1]["w"] + params[-1]["b"]


def residual_net(params, batch):
  h = hidden_states(params, batch["inputs"], skip=True)[-1]
  return h @ params[-1]["w"] + params[-1]["b"]


MODELS = {"plain": plain_net, "residual": residual_net}
params0 = init_params(jax.random.key(0), train["inputs"].shape[1])
probe = curvature.take_examples(train, 8)

# K-FAC finds its layers by tracing the model: every leaf must be in a
# Kronecker block ("dense" kernels and their biases), none "diagonal".
for name, model in MODELS.items():
  blocks = curvature.kfac_blocks(model, params0, probe)
  kinds = [b.block for b in blocks]
  print(f"{name}: {kinds.count('dense')} dense Kronecker blocks,"
        f" {sum(k.startswith('bias of') for k in kinds)} biases folded in,"
        f" {kinds.count('diagonal')} diagonal blocks")
  assert kinds.count("dense") == DEPTH + 2 and "diagonal" not in kinds
print()
summary = curvature.kfac_summary(residual_net, params0, probe).splitlines()
print("residual network, kfac_summary (first and last layers):")
print("\n".join(summary[:4] + ["..."] + summary[-4:]))
'''),
("code", r'''
fig, ax = plt.subplots(figsize=(6.5, 3.8))
inputs = train["inputs"][:500]
for (name, skip), color in zip((("plain", False), ("residual", True)),
                               ("C0", "C1")):
  rms = [float(jnp.sqrt(jnp.mean(h ** 2)))
         for h in hidden_states(params0, inputs, skip)]
  ax.plot(range(1, len(rms) + 1), rms, "o-", color=color, label=name)
  print(f"{name:8s} RMS activation: first layer {rms[0]:.3f},"
        f" last hidden layer {rms[-1]:.3f}")
ax.set_xlabel("layer")
ax.set_ylabel("RMS of the hidden state at init")
ax.set_yscale("log")
ax.legend()
ax.set_title("forward signal at initialization")
fig.tight_layout()
fig.savefig("figures/06_init_signal.png", dpi=110)
plt.show()
'''),
("md", r"""
The plain network's signal shrinks slowly with depth (tanh contracts a
little at every layer), but it does not collapse: the orthogonal init keeps
it trainable in principle. The residual network's hidden state *grows*
roughly like $\sqrt{\text{layer}}$, because every block adds a fresh
$O(1)$ term; nothing is rescaled, exactly as $h \leftarrow h + \tanh(hW+b)$
prescribes.

## Training

One jitted step per (architecture, optimizer) pair; the learning rate is an
argument of the step, so the grid reuses the compiled function. K-FAC is
`scale_by_kfac` (true-Fisher statistics from one sampled label per example,
EMA decay 0.95, inverses refreshed every 20 steps, fixed damping $\lambda$ =
`KFAC_DAMPING`) followed by heavy-ball momentum 0.9 — the same chain as
`curvature.kfac(lr, momentum=0.9, initial_damping=KFAC_DAMPING)`. Adam is
`optax.scale_by_adam()` with the default $\beta_1, \beta_2, \epsilon$. SGD with
momentum is `optax.trace(0.9)` (heavy ball, no Nesterov). Every run
sees the same minibatch sequence. The clock counts only the training steps
(after compilation), not the evaluations of the full training loss.
"""),
("code", r'''
import time


def make_step(model, transform):
  objective = lambda p, b: xent.value(model(p, b), b["targets"])

  @jax.jit
  def step(params, state, indices, learning_rate):
    batch = jax.tree.map(lambda x: x[indices], train)
    grads = jax.grad(objective)(params, batch)
    updates, state = transform.update(grads, state, params, batch=batch)
    updates = jax.tree.map(lambda u: -learning_rate * u, updates)
    return optax.apply_updates(params, updates), state

  return step, jax.jit(lambda p: objective(p, train))


def transforms(model):
  kfac = optax.chain(
      curvature.scale_by_kfac(model, xent, initial_damping=KFAC_DAMPING),
      curvature.scale_by_momentum(0.9))
  return {"K-FAC": kfac,
          "Adam": optax.with_extra_args_support(optax.scale_by_adam()),
          "momentum": optax.with_extra_args_support(optax.trace(0.9))}


batch_rng = np.random.default_rng(1)
BATCHES = [jnp.asarray(batch_rng.choice(num_train, BATCH_SIZE, replace=False))
           for _ in range(STEPS)]


def train_run(step, evaluate, state, learning_rate):
  params, seconds = params0, 0.0
  history = [(0, 0.0, float(evaluate(params)))]
  for t in range(STEPS):
    start = time.perf_counter()
    params, state = step(params, state, BATCHES[t], learning_rate)
    if (t + 1) % EVAL_EVERY == 0:
      jax.block_until_ready(params)
      seconds += time.perf_counter() - start
      history.append((t + 1, seconds, float(evaluate(params))))
    else:
      seconds += time.perf_counter() - start
  return np.asarray(history)  # columns: step, seconds, training loss
'''),
("code", r'''
grids = {"K-FAC": KFAC_LRS, "Adam": ADAM_LRS, "momentum": MOMENTUM_LRS}
runs = {}  # (model, optimizer, learning rate) -> history
with tqdm(total=sum(len(g) for g in grids.values()) * len(MODELS),
          desc="runs") as bar:
  for model_name, model in MODELS.items():
    for opt_name, transform in transforms(model).items():
      step, evaluate = make_step(model, transform)
      state = transform.init(params0)
      jax.block_until_ready(step(params0, state, BATCHES[0], 0.0))  # compile
      for lr in grids[opt_name]:
        runs[model_name, opt_name, lr] = train_run(step, evaluate, state, lr)
        bar.set_postfix(run=f"{model_name} {opt_name} {lr:g}",
                        loss=f"{runs[model_name, opt_name, lr][-1, 2]:.3g}")
        bar.update()


def final_loss(history):
  """Mean of the last three evaluations (NaN-safe: a diverged run is inf)."""
  tail = history[-3:, 2]
  return float(np.mean(tail)) if np.all(np.isfinite(tail)) else np.inf


print(f"final training loss (mean of the last 3 evaluations), {STEPS} steps")
best = {}
for model_name in MODELS:
  for opt_name, lrs in grids.items():
    finals = {lr: final_loss(runs[model_name, opt_name, lr]) for lr in lrs}
    best[model_name, opt_name] = min(finals, key=finals.get)
    cells = "  ".join(f"lr {lr:g}: {v:7.4f}" for lr, v in finals.items())
    print(f"  {model_name:8s} {opt_name:8s}  {cells}   best lr"
          f" {best[model_name, opt_name]:g}")
'''),
("code", r'''
fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), sharey="row")
colors = {"K-FAC": "C3", "Adam": "C0", "momentum": "C2"}
for row, model_name in enumerate(MODELS):
  for (opt_name, lrs) in grids.items():
    for lr in lrs:
      h = runs[model_name, opt_name, lr]
      chosen = lr == best[model_name, opt_name]
      style = dict(color=colors[opt_name], alpha=1.0 if chosen else 0.25,
                   linewidth=2.0 if chosen else 1.0,
                   label=f"{opt_name} lr={lr:g}" + (" (best)" if chosen
                                                      else ""))
      axes[row, 0].plot(h[:, 0], h[:, 2], **style)
      axes[row, 1].plot(h[:, 1], h[:, 2], **style)
  axes[row, 0].set_ylabel(f"{model_name}: training loss")
  for ax in axes[row]:
    ax.set_yscale("log")
    ax.axhline(TARGET, color="k", linestyle=":", linewidth=1)
    ax.grid(alpha=0.3)
  axes[row, 0].legend(fontsize=8, ncol=2)
axes[0, 0].set_title(f"vs steps (batch {BATCH_SIZE})")
axes[0, 1].set_title("vs wall-clock seconds (compilation excluded)")
axes[1, 0].set_xlabel("step")
axes[1, 1].set_xlabel("seconds")
fig.suptitle(f"{DEPTH} hidden tanh layers of width {WIDTH} on MNIST-1D;"
             f" dotted: loss {TARGET}")
fig.tight_layout()
fig.savefig("figures/06_deep_plain_network.png", dpi=110)
plt.show()
'''),
("code", r'''
def first_reach(history, target):
  """(steps, seconds) at the first evaluation with loss <= target, or None."""
  hit = np.nonzero(history[:, 2] <= target)[0]
  return (int(history[hit[0], 0]), float(history[hit[0], 1])) if len(hit) \
      else None


print(f"every run; 'reach' = first evaluation (every {EVAL_EVERY} steps) with"
      f" training loss <= {TARGET}; * = lowest final loss of its grid")
print(f"{'network':9s} {'optimizer':9s} {'lr':>7s} {'final loss':>10s}"
      f" {'seconds':>8s} {'ms/step':>8s} {'reach':>17s}")
fastest = {}  # (model, optimizer) -> the run of its grid that reached first
for model_name in MODELS:
  for opt_name, lrs in grids.items():
    for lr in lrs:
      h = runs[model_name, opt_name, lr]
      reach = first_reach(h, TARGET)
      old = fastest.get((model_name, opt_name))
      if reach and (old is None or reach[0] < old[0]):
        fastest[model_name, opt_name] = reach + (lr,)
      where = (f"{reach[0]:5d} st {reach[1]:6.1f} s" if reach
               else f"not in {STEPS}")
      mark = "*" if lr == best[model_name, opt_name] else " "
      print(f"{model_name:9s} {opt_name:9s} {lr:6g}{mark} {final_loss(h):10.4f}"
            f" {h[-1, 1]:8.1f} {1e3 * h[-1, 1] / STEPS:8.1f} {where:>17s}")
print()
ratio = {}  # network -> (best first-order steps to TARGET) / (K-FAC steps)
lower_bound = {}  # network -> True when no first-order run got there
for model_name in MODELS:
  kfac = fastest.get((model_name, "K-FAC"))
  firsts = {o: fastest.get((model_name, o)) for o in ("Adam", "momentum")}
  reached = {o: r for o, r in firsts.items() if r}
  if kfac is None:
    print(f"{model_name:9s} K-FAC did not reach {TARGET} in {STEPS} steps")
    ratio[model_name] = None
    lower_bound[model_name] = False
    continue
  if reached:
    name, first = min(reached.items(), key=lambda item: item[1][0])
    ratio[model_name] = first[0] / kfac[0]
    lower_bound[model_name] = False
    print(f"{model_name:9s} to reach {TARGET}: K-FAC {kfac[0]} steps (lr"
          f" {kfac[2]:g}); fastest first-order {name} {first[0]} steps (lr"
          f" {first[2]:g}): {ratio[model_name]:.1f}x K-FAC's steps,"
          f" {first[1] / kfac[1]:.2f}x its seconds")
  else:
    ratio[model_name] = STEPS / kfac[0]
    lower_bound[model_name] = True
    print(f"{model_name:9s} to reach {TARGET}: K-FAC {kfac[0]} steps (lr"
          f" {kfac[2]:g}); neither Adam nor momentum in {STEPS}: more than"
          f" {ratio[model_name]:.1f}x K-FAC's steps")
'''),
("md", r"""
## What the numbers say

The lecture makes two claims: on a deep network without skip connections
K-FAC has "a huge advantage" over momentum and Adam, and on a ResNet "the
differences vanished completely". The cell below states what this run
reproduces, from the numbers above.
"""),
("code", r'''
plain, residual = ratio["plain"], ratio["residual"]
ms = {(m, o): 1e3 * runs[m, o, best[m, o]][-1, 1] / STEPS
      for m in MODELS for o in grids}
best_final = {(m, o): final_loss(runs[m, o, best[m, o]])
              for m in MODELS for o in grids}
lines = []
if plain is None:
  lines.append(f"Plain network: K-FAC did not reach {TARGET}; the first claim"
               " is not reproduced at this scale.")
else:
  at_least = "at least " if lower_bound["plain"] else ""
  lines.append(
      f"Plain network: the first-order methods need {at_least}{plain:.1f}x"
      f" K-FAC's steps to reach {TARGET} (" + (
          "a large advantage: reproduced" if plain >= 2 else
          "neither got there within the budget, so only this bound is"
          " measured" if lower_bound["plain"] else
          "not the lecture's huge advantage") + ").")
if residual is not None and plain is not None:
  if residual <= 1.2:
    verdict = "the differences (nearly) vanish: reproduced"
  elif residual < plain:
    verdict = "the gap shrinks but does not vanish: a partial reproduction"
  else:
    verdict = "the gap does not shrink: not reproduced"
  at_least = "at least " if lower_bound["residual"] else ""
  lines.append(f"Residual network: {at_least}{residual:.1f}x K-FAC's steps;"
               f" {verdict}.")
lines.append(
    "Final training loss of each optimizer's best run, plain / residual: "
    + "; ".join(f"{o} {best_final['plain', o]:.2g} /"
                f" {best_final['residual', o]:.2g}" for o in grids) + ".")
lines.append(
    "Cost per step (ms, best run, plain network): "
    + ", ".join(f"{o} {ms['plain', o]:.0f}" for o in grids)
    + ". The machine was shared with other jobs: read seconds as rough and"
    " steps as exact.")
print("\n".join(lines))
'''),
("md", r"""
**Why the ResNet gap need not vanish here.** The lecture's explanation is
that once a ResNet is well conditioned, "it really only matters how much data
you've seen": the stochastic-gradient noise, not the curvature, limits
progress. Here the data set is small and we fit the *training* loss far
down, a nearly deterministic regime where a better preconditioner still
pays. Our residual network also has no normalization and its hidden state
grows like $\sqrt{\text{layer}}$ (figure above), so it is better but not
perfectly conditioned.

**Caveats.** One seed, one data set, one depth and width. Each optimizer's
learning rate comes from a grid of three, but K-FAC's damping (1e-2) was
picked before this notebook in a 400-step pilot over
$\lambda \in \{10^{-3}, 10^{-2}, 10^{-1}\}$, so K-FAC got a somewhat larger
tuning budget. Adam's $\epsilon$ and $\beta$s were not tuned.
"""),
]
