"""Cells of notebook 08: the Kronecker family on the CURVES-like autoencoder."""

CELLS = [
    ("md", r"""
# 08 · The Kronecker family: Adam, K-FAC, EKFAC, Shampoo and SOAP

Every optimizer of `curvature` is a preconditioner built from three choices:
a **statistic** (which curvature matrix it estimates), a **structure** (how
that matrix is approximated) and a **power** (what function of it multiplies
the gradient). The table is the README's ("The Kronecker family"); the
first five rows race in this notebook, and Hessian-free is in notebook 05.

| optimizer | statistic | structure | power | basis / extras | one line |
|---|---|---|---|---|---|
| Adam | empirical Fisher (EMA of g²) | diagonal | −1/2 | momentum; ε is damping | `curvature.adam(1e-3)` |
| K-FAC | true Fisher (sampled targets) or empirical | Kronecker `Ā ⊗ G` per layer | −1 | π-damping, γ search, α/μ from the exact quadratic model | `curvature.kfac(1.0, predict_fn=f, loss=l, adaptive=True)` |
| EKFAC | as K-FAC | Kronecker eigenbasis + diagonal re-fitted from per-example gradients | −1 | eigenbasis every `inverse_every` steps | `curvature.ekfac(1.0, predict_fn=f, loss=l, adaptive=True)` |
| Shampoo | empirical Fisher (`GGᵀ`, `GᵀG` of the batch gradient) | Kronecker `L ⊗ R` per matrix leaf | −1/4 per side | Adam grafting, roots every 10 steps | `curvature.shampoo(1e-3)` |
| SOAP | empirical Fisher (`GGᵀ`, `GᵀG`) | Shampoo's eigenbasis + Adam's diagonal | −1/2 | basis every 10 steps | `curvature.soap(3e-3)` |
| block-diagonal (TONGA) | Fisher, GGN or empirical Fisher | dense block per leaf or layer | −1 | Cholesky every k steps | `curvature.block_diagonal_natural_gradient(0.1, predict_fn=f, loss=l)` |
| Hessian-free | GGN (or Hessian, Fisher) | full, by CG | −1 | LM damping, Martens' CG heuristics | `curvature.hessian_free(predict_fn=f, loss=l)` |

Read down the *structure* column and the family is one idea refined: K-FAC
approximates each layer's Fisher block by a Kronecker product of two small
factors (Martens & Grosse 2015); EKFAC keeps K-FAC's eigenbasis but re-fits
the diagonal in it, which is the best diagonal in that basis rather than the
product of the factors' eigenvalues (George et al. 2018); Shampoo builds the
same kind of two-sided factors from the *gradient* alone, with a −1/4 power
on each side (Gupta, Koren & Singer 2018; Anil et al. 2020); and SOAP runs
Adam in Shampoo's eigenbasis (Vyas et al. 2024), the way EKFAC refines
K-FAC. K-FAC and EKFAC need the model (`predict_fn`) and the batch, to sample
targets from the model's predictive distribution; Shampoo and SOAP act on the
gradient alone and drop in like `optax.adam`.

**The experiment** reuses `benchmarks/convergence.py` (model, data, training
loops and timing checks): the CURVES autoencoder of Hinton & Salakhutdinov
(2006) and Martens (2010), 784-400-200-100-50-25-6-25-50-100-200-400-784,
sigmoid units, a linear 6-unit code, sigmoid cross-entropy summed over
pixels, Martens' sparse initialization, L2 1e-5, on CURVES-like images
(`curvature.datasets.make_curves`), minibatches drawn at random.

* **Adam** (`optax.adam`), each learning rate of a small grid, for `N` steps;
  the best training loss of the best rate is the target `L`.
* **Shampoo** (`curvature.shampoo`: Adam-grafted, momentum 0.9, inverse
  roots every 10 steps) and **SOAP** (`curvature.soap`: b₁ = b₂ = 0.95,
  eigenbasis every 10 steps), each learning rate of a small grid, at most `N`
  steps, stopping at `L`; the best rate is the one that reaches `L` in the
  fewest steps (or, if none does, the lowest loss).
* **K-FAC** and **EKFAC** in their adaptive mode (`adaptive=True`, λ₀ = 150):
  the step size α and the momentum μ are solved from the exact quadratic
  model at every step and the damping follows the Levenberg-Marquardt rule,
  so there is *no learning rate to tune* (the `1.0` passed as the learning
  rate multiplies the adaptive step). They stop at `L` or at their step
  budget.

Loss (the training loss on the whole training set, data term only) is
plotted against steps *and* against seconds. The clock counts only the
jitted optimizer steps (no compilation, no loss evaluations): every row first
compiles its step on a throwaway run and fails if anything compiles while
timed (each row prints its check). Set `CURVATURE_FAST=1` for the fast mode
(CI): a smoke test of the same code on a few hundred images downsampled to
14×14, a shallow autoencoder, a few steps and one learning rate per grid.
"""),
    ("code", r"""
import os
os.environ["TQDM_MININTERVAL"] = "20"  # before tqdm is imported: few progress lines
"""),
    ("code", SETUP),
    ("code", r"""
import pathlib
import sys
import time

jax.config.update("jax_enable_x64", False)  # float32, as the benchmark
ROOT = pathlib.Path(curvature.__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import convergence  # benchmarks/convergence.py: model, data, training loops

TRAIN_SIZE = 500 if FAST else 5000
BATCH_SIZE = 250 if FAST else 1000
STEPS = 10 if FAST else 500            # N: Adam's steps, the others' budget
EVAL_EVERY = 5 if FAST else 10         # first-order rows: loss every k steps
CURVATURE_STEPS = 4 if FAST else 500   # K-FAC and EKFAC budget
CURVATURE_EVAL_EVERY = 2 if FAST else 5
ADAM_LRS = (3e-3,) if FAST else (1e-3, 3e-3, 1e-2)
SHAMPOO_LRS = (3e-3,) if FAST else (1e-3, 3e-3, 1e-2)
SOAP_LRS = (1e-2,) if FAST else (3e-3, 1e-2, 3e-2)
# Fast mode: K-FAC's periods shortened, so that its warm-up (2 * max(periods)
# + 1 throwaway steps, past the first inverse and damping updates) is short.
KFAC_OPTIONS = (dict(inverse_every=4, damping_every=4, gamma_every=4)
                if FAST else {})
data = convergence.load_data(TRAIN_SIZE)
if FAST:
    # Fast mode (CI) only, a smoke test: 14×14 images (means of 2×2 pixels)
    # and a shallow autoencoder 196-64-6-64-196 (same units, loss and sparse
    # initialization), patched into the benchmark's initializer. Compiling
    # adaptive K-FAC for the 12-layer autoencoder, and decomposing its
    # 785×785 factors, take most of a minute on a loaded 2-core CPU.
    convergence.init_params = functools.partial(
        convergence.init_params, layers=(196, 64, 6, 64, 196))
    small = data["inputs"].reshape(-1, 14, 2, 14, 2).mean((2, 4))
    data = {"inputs": small.reshape(-1, 196), "targets": small.reshape(-1, 196)}
evaluate = convergence._evaluator(data)  # whole-training-set loss, jitted once
print(f"{TRAIN_SIZE} images, batch {BATCH_SIZE}; Adam for N = {STEPS} steps "
      f"at {ADAM_LRS}; Shampoo at {SHAMPOO_LRS}, SOAP at {SOAP_LRS} "
      f"(at most N steps); K-FAC and EKFAC at most {CURVATURE_STEPS} steps")
print("machine:", convergence.machine())
"""),
    ("md", r"""
## The race

The first-order rows (Adam, Shampoo, SOAP) share one sequence of batches
(same seed); K-FAC and EKFAC draw their own, also shared with each other. The
load average of the machine is printed before and after: the seconds are
wall-clock seconds of the optimizer steps, so other work on the machine
inflates them (the steps are deterministic; the seconds are not).
"""),
    ("code", r"""
def row(desc, train):
    '''`train()`, and its wall clock (compilation, warm-up and loss
    evaluations included, unlike the traces' seconds).'''
    t = time.perf_counter()
    trace = train()
    print(f"{desc}: {time.perf_counter() - t:.0f} s of wall clock in all")
    return trace


def first_order_grid(name, make, lrs, target=None):
    '''`make(lr)` at each rate, at most N steps, stopping at `target`.'''
    return {lr: row(f"{name} {lr:g}", lambda: convergence.train_first_order(
                make(lr), data, STEPS, batch_size=BATCH_SIZE,
                eval_every=EVAL_EVERY, target=target, desc=f"{name} {lr:g}",
                evaluate=evaluate))
            for lr in lrs}


def best_lr(grid, target):
    '''The rate that reaches `target` in fewest steps, else the lowest loss.'''
    def key(lr):
        steps, _ = convergence.to_target(grid[lr], target)
        return (steps is None, steps or 0, float(grid[lr].loss.min()))
    return min(grid, key=key)


def kfac_row(desc, **options):
    '''Adaptive K-FAC (λ₀ = 150) with `options`, stopping at `target`.'''
    return {"adaptive": row(desc, lambda: convergence.train_kfac(
        data, CURVATURE_STEPS, batch_size=BATCH_SIZE,
        eval_every=CURVATURE_EVAL_EVERY, target=target, evaluate=evaluate,
        **KFAC_OPTIONS, **options))}


load_before = os.getloadavg()
start = time.perf_counter()
grids = {"Adam": first_order_grid("adam", optax.adam, ADAM_LRS)}
adam_lr = min(grids["Adam"], key=lambda lr: grids["Adam"][lr].loss.min())
target = float(grids["Adam"][adam_lr].loss.min())
print(f"target L = {target:.4f}: Adam's best loss (lr {adam_lr:g})")
grids["Shampoo"] = first_order_grid(
    "shampoo", curvature.shampoo, SHAMPOO_LRS, target)
grids["SOAP"] = first_order_grid("soap", curvature.soap, SOAP_LRS, target)
# train_kfac builds curvature.kfac(1.0, predict_fn=..., loss=..., l2_reg=...,
# adaptive=True, initial_damping=150.0, **options); its progress bar and
# check say "kfac" for both rows. EKFAC is kfac(structure="eigen_kronecker"),
# which is what curvature.ekfac(...) returns.
grids["K-FAC"] = kfac_row("K-FAC (adaptive)")
grids["EKFAC"] = kfac_row("EKFAC (adaptive)", structure="eigen_kronecker")
print(f"race: {time.perf_counter() - start:.0f} s of wall clock in all; "
      f"load average (1 min) {load_before[0]:.1f} before, "
      f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores")
"""),
    ("code", r"""
best = {"Adam": adam_lr, "Shampoo": best_lr(grids["Shampoo"], target),
        "SOAP": best_lr(grids["SOAP"], target),
        "K-FAC": "adaptive", "EKFAC": "adaptive"}
colors = dict(zip(best, plt.rcParams["axes.prop_cycle"].by_key()["color"]))

fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
for name, grid in grids.items():
    for lr, trace in grid.items():
        chosen = lr == best[name]
        label = (f"{name} (lr {lr:g})" if chosen and lr != "adaptive" else
                 f"{name} (adaptive)" if chosen else None)
        style = dict(color=colors[name], lw=1.8 if chosen else 0.8,
                     alpha=1.0 if chosen else 0.35,
                     ls="-" if chosen else "--", label=label)
        axes[0].plot(trace.steps, trace.loss, **style)
        axes[1].plot(trace.seconds, trace.loss, **style)
for ax, xlabel in zip(axes, ("steps", "seconds (optimizer steps only)")):
    ax.axhline(target, color="gray", ls=":", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
axes[0].legend(fontsize=8)
fig.suptitle(f"CURVES-like autoencoder, {TRAIN_SIZE} images, batch "
             f"{BATCH_SIZE} (solid: best rate of each grid; dashed: the other "
             f"rates; dotted: L = {target:.2f})", fontsize=10)
fig.tight_layout()
fig.savefig("figures/08_kronecker_family.png", dpi=110)
plt.show()
"""),
    ("code", r"""
rows = {}
for name, grid in grids.items():
    for lr, trace in grid.items():
        steps, seconds = convergence.to_target(trace, target)
        rows[name, lr] = dict(
            steps=steps, seconds=seconds, final=float(trace.loss[-1]),
            best=float(trace.loss.min()), steps_run=int(trace.steps[-1]),
            seconds_run=float(trace.seconds[-1]),
            per_step=float(trace.seconds[-1]) / int(trace.steps[-1]))


def print_table(keys):
    print(f"{'optimizer':12s}{'lr':>10s}{'steps to L':>12s}{'s to L':>9s}"
          f"{'final loss':>12s}{'best loss':>11s}{'steps run':>11s}"
          f"{'ms/step':>9s}")
    for name, lr in keys:
        r = rows[name, lr]
        s = "—" if r["steps"] is None else str(r["steps"])
        t = "—" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lr_text = lr if isinstance(lr, str) else f"{lr:g}"
        print(f"{name:12s}{lr_text:>10s}{s:>12s}{t:>9s}{r['final']:12.3f}"
              f"{r['best']:11.3f}{r['steps_run']:11d}"
              f"{1e3 * r['per_step']:9.1f}")


print(f"Best rate of each grid, to Adam's best loss L = {target:.3f}:")
print_table(best.items())
print("\nEvery rate of every grid:")
print_table(rows)
"""),
    ("md", r"""
## What the numbers say

*The committed outputs are one full-mode run on a 2-core CPU shared with
other jobs (the load average is printed with the race): the steps and losses
are deterministic, the seconds are not, and every comparison below is
printed from this run's numbers.*

The cell below states the comparisons: which rows
reach `L`, how many steps and seconds each needs relative to Adam, and what
one step of each costs relative to one Adam step. What to expect, and why:

* **Per step**, every member of the family uses more information than Adam's
  diagonal, so it should need fewer steps. K-FAC and EKFAC get it from the
  true Fisher of each layer (targets sampled from the model), plus the exact
  quadratic model that picks α and μ; Shampoo and SOAP from the two-sided
  statistics of the gradient matrices.
* **Per second**, the comparison is against the extra cost of each step:
  K-FAC and EKFAC run a second backward pass (sampled targets), the exact
  quadratic model (GGN-vector products) and periodic factorizations of the
  785×785 and smaller factors (Cholesky for K-FAC, eigendecompositions for
  EKFAC, which also re-fits its diagonal from per-example gradients every
  step); Shampoo and SOAP form `GGᵀ` and `GᵀG` for every weight matrix every
  step and eigendecompose them every 10 steps. On two CPU cores those
  factorizations are not cheap relative to a batch of 1000 through this
  network, so fewer steps need not mean fewer seconds.
* **Tuning**: Adam, Shampoo and SOAP each had a grid of learning rates, and
  their rows are the best rate of each grid; K-FAC and EKFAC in the adaptive
  mode had none. A learning rate at the edge of its grid is flagged below
  (a wider grid might do better).

The fast mode (CI) checks only what holds at any scale: every row lowers the
loss from the shared initialization, and a K-FAC or EKFAC step costs more
than an Adam step.
"""),
    ("code", r"""
adam = rows["Adam", adam_lr]
initial = float(grids["Adam"][adam_lr].loss[0])
print(f"All rows start from the same sparse initialization (loss "
      f"{initial:.2f}); Adam's best rate {adam_lr:g} reaches its best loss "
      f"L = {target:.3f} at step {adam['steps']} "
      f"({adam['seconds']:.1f} s).")
for name, lr in best.items():
    if name == "Adam":
        continue
    r = rows[name, lr]
    how = "adaptive, no grid" if lr == "adaptive" else f"lr {lr:g}"
    cost = r["per_step"] / adam["per_step"]
    if r["steps"] is None:
        print(f"{name} ({how}): did not reach L in {r['steps_run']} steps "
              f"(best loss {r['best']:.3f}); a step costs {cost:.1f}x an "
              f"Adam step.")
        continue
    step_ratio = r["steps"] / adam["steps"]
    time_ratio = r["seconds"] / adam["seconds"]
    print(f"{name} ({how}): L in {r['steps']} steps ({step_ratio:.2f}x "
          f"Adam's {adam['steps']}: {'fewer' if step_ratio < 1 else 'not fewer'})"
          f" and {r['seconds']:.1f} s ({time_ratio:.2f}x Adam's time: "
          f"{'faster' if time_ratio < 1 else 'not faster'}); a step costs "
          f"{cost:.1f}x an Adam step.")
reached = {n: rows[n, lr] for n, lr in best.items()
           if rows[n, lr]["steps"] is not None}
fewest = min(reached, key=lambda n: reached[n]["steps"])
fastest = min(reached, key=lambda n: reached[n]["seconds"])
print(f"Fewest steps to L: {fewest} ({reached[fewest]['steps']}); fewest "
      f"seconds to L: {fastest} ({reached[fastest]['seconds']:.1f} s).")
for name, lrs in (("Adam", ADAM_LRS), ("Shampoo", SHAMPOO_LRS),
                  ("SOAP", SOAP_LRS)):
    if len(lrs) > 1 and best[name] in (min(lrs), max(lrs)):
        print(f"{name}: the best rate {best[name]:g} is at the edge of its "
              f"grid {lrs}.")

# Fast mode (CI) asserts only the robust claims.
for (name, lr), r in rows.items():
    assert np.isfinite(r["final"]) and r["best"] < initial, (name, lr, r)
for name in ("K-FAC", "EKFAC"):
    assert rows[name, "adaptive"]["per_step"] > adam["per_step"], name
print("checked: every row lowers the loss; a K-FAC and an EKFAC step cost "
      "more than an Adam step")
"""),
    ("md", r"""
References: Hinton & Salakhutdinov (2006), *Reducing the dimensionality of
data with neural networks*; Martens (2010), *Deep learning via Hessian-free
optimization*; Kingma & Ba (2015), *Adam: a method for stochastic
optimization*; Martens & Grosse (2015), *Optimizing neural networks with
Kronecker-factored approximate curvature*; George, Laurent, Bouthillier,
Ballas & Vincent (2018), *Fast approximate natural gradient descent in a
Kronecker-factored eigenbasis*; Gupta, Koren & Singer (2018), *Shampoo:
preconditioned stochastic tensor optimization*; Anil, Gupta, Koren, Regan &
Singer (2020), *Scalable second order optimization for deep learning*; Vyas,
Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson & Kakade (2024), *SOAP:
improving and stabilizing Shampoo using Adam*.
"""),
]
