"""Cells of notebook 05: the deep-autoencoder experiment."""

CELLS = [
    ("md", r"""
# 05 · Deep autoencoder: Hessian-free, K-FAC, Adam and momentum

The headline claim of the second-order literature is that curvature-aware
methods optimize *deep autoencoders* far faster than first-order methods:
Martens (2010) trained the CURVES, MNIST and FACES autoencoders of Hinton &
Salakhutdinov (2006) with Hessian-free (a damped Gauss-Newton step solved by
CG), and Martens & Grosse (2015) with K-FAC (a Kronecker-factored Fisher), both
in far fewer iterations than SGD with momentum. The lecture (`000_*`) frames
this as the reason to go beyond first-order methods: they remove (or reduce)
the dependence on the condition number κ that first-order methods cannot beat.

This notebook runs the experiment of `benchmarks/convergence.py` on
CURVES-like images (28×28 smooth curves through 3 random points, generated
offline by `curvature.datasets.make_curves`):

* the CURVES autoencoder 784-400-200-100-50-25-6-25-50-100-200-400-784,
  sigmoid units, a linear 6-unit code, sigmoid cross-entropy summed over
  pixels, Martens' sparse initialization (15 incoming N(0,1) weights per unit),
  L2 1e-5;
* **Adam** (best rate of a small grid), batch 1000, `N` steps: its best
  training loss is the target `L`;
* **K-FAC** (`curvature.kfac`, adaptive: α and μ from the exact quadratic
  model, Levenberg-Marquardt damping from λ₀ = 150), batch 1000;
* **Hessian-free** (`curvature.hessian_free`: gradient on 1000 examples, GGN
  products on 250 of them, ρ and backtracking on the other 250);
* **momentum** (`curvature.sgd(1e-2, momentum=0.9)` next to
  `optax.sgd(1e-2, momentum=0.9)`: the same algorithm, so the same curve);
* the **kfac-jax** peer (adaptive, with the same λ₀, inverse and damping
  periods), when its venv `benchmarks/.venv-kfac-jax` exists.

Loss is plotted against outer iterations *and* against wall-clock seconds of
jitted optimizer steps (loss evaluations excluded): a step of K-FAC or
Hessian-free costs several gradient evaluations, so only the second axis is a
fair race. Compilation is kept off that clock for every row, ours and
kfac-jax's alike: each first runs its step on a throwaway run long enough to
compile every program it uses (past the first periodic inverse and damping
updates for the K-FAC rows), then times from a fresh state, and the run fails
if anything still compiles while timed (each row prints its check). Fast mode
(CI) shrinks everything to a smoke test; the full mode here is 5000 images,
and `benchmarks/README.md` has the 20,000-image figures.
"""),
    ("code", SETUP),
    ("code", r"""
import pathlib
import sys

jax.config.update("jax_enable_x64", False)  # float32, as the benchmark
os.environ["TQDM_MININTERVAL"] = "15"  # a progress line every 15 s at most
ROOT = pathlib.Path(curvature.__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import convergence  # benchmarks/convergence.py: model, data, training loops

TRAIN_SIZE = 500 if FAST else 5000  # fast: the main job test's CI size
STEPS = 20 if FAST else 500
CURVATURE_STEPS = 4 if FAST else 500
ADAM_LRS = (3e-3,) if FAST else (1e-3, 3e-3)
OPTIMIZERS = ("adam", "kfac", "hessian_free", "momentum") + (
    () if FAST else ("kfac_jax",))
print(f"{TRAIN_SIZE} images, Adam for {STEPS} steps at {ADAM_LRS}")
"""),
    ("code", r"""
images = np.asarray(convergence.load_data(TRAIN_SIZE)["inputs"])
fig, axes = plt.subplots(2, 8, figsize=(10, 2.8))
for ax, image in zip(axes.flat, images):
    ax.imshow(image.reshape(28, 28), cmap="gray_r")
    ax.axis("off")
fig.suptitle("CURVES-like training images")
fig.savefig("figures/05_curves_samples.png", dpi=100, bbox_inches="tight")
plt.show()
"""),
    ("md", r"""
## The race

Every row starts from the same sparse initialization; the batches are random
draws of 1000 images (the first-order rows share one sequence of batches, the
curvature rows and kfac-jax draw their own). K-FAC, Hessian-free and kfac-jax
stop at Adam's best loss `L` (or after their step budget); the momentum rows
run all `N` steps.
"""),
    ("code", r"""
traces, rows, target, adam_name = convergence.run(
    TRAIN_SIZE, STEPS, OPTIMIZERS, eval_every=10, adam_lrs=ADAM_LRS,
    curvature_steps=CURVATURE_STEPS)
convergence.print_table(rows, target, adam_name)
convergence.save_plot(traces, target, "figures/05_deep_autoencoder.png",
                      f"CURVES-like autoencoder, {TRAIN_SIZE} images")
from IPython.display import Image
Image("figures/05_deep_autoencoder.png")
"""),
    ("code", r"""
by = {r["optimizer"]: r for r in rows}
adam = by[adam_name]
for name in ("kfac (adaptive)", "hessian_free", "kfac-jax (adaptive)"):
    r = by.get(name)
    if r is None:
        continue
    if r["steps_to_target"] is None:
        print(f"{name}: did not reach L = {target:.2f} in {r['steps_run']} "
              f"steps (best {r['best_loss']:.2f})")
        continue
    print(f"{name}: L in {r['steps_to_target']} steps "
          f"({adam['steps_to_target'] / r['steps_to_target']:.1f}x fewer than "
          f"Adam) and {r['seconds_to_target']:.1f} s "
          f"({r['seconds_to_target'] / adam['seconds_to_target']:.2f}x "
          f"Adam's time)")
mom = convergence.momentum_comparison(traces)
print(f"momentum: curvature {mom['curvature_steps']} vs optax "
      f"{mom['optax_steps']} steps to {mom['target']:.2f}")
"""),
    ("code", r"""
curvature_rows = [by[n] for n in ("kfac (adaptive)", "hessian_free",
                                  "kfac-jax (adaptive)")
                  if n in by and by[n]["steps_to_target"] is not None]
fewest_steps = min(curvature_rows + [adam],
                   key=lambda r: r["steps_to_target"])
fastest = min(curvature_rows + [adam], key=lambda r: r["seconds_to_target"])
print(f"Fewest steps (outer iterations) to L = {target:.2f}: "
      f"{fewest_steps['optimizer']} ({fewest_steps['steps_to_target']}).")
print(f"Least time to L: {fastest['optimizer']} "
      f"({fastest['seconds_to_target']:.1f} s).")
ours, peer = by.get("kfac (adaptive)"), by.get("kfac-jax (adaptive)")
if ours and peer and ours["steps_to_target"] and peer["steps_to_target"]:
    print(f"Our K-FAC / kfac-jax (both warmed up before timing): "
          f"{ours['steps_to_target'] / peer['steps_to_target']:.2f}x the "
          f"steps, {ours['seconds_to_target'] / peer['seconds_to_target']:.2f}"
          f"x the seconds.")
"""),
    ("md", r"""
## What the numbers say

The cells above print every figure from this run; the committed outputs
are one full-mode run on a 2-core CPU (the steps are deterministic, the
seconds are not). Every timed row, ours and kfac-jax's, is first warmed up
on a throwaway run, and the run fails if anything compiles inside a timed
step, so no row pays for compilation.

* **Per iteration** the curvature methods need far fewer steps than Adam:
  a K-FAC step uses the curvature of a layer's inputs and output gradients,
  a Hessian-free iteration solves the damped Gauss-Newton system by CG.
* **Per second** the comparison depends on the size: a K-FAC step costs
  several gradient evaluations (statistics, periodic inverses, the
  exact-quadratic α/μ solve) and a Hessian-free iteration tens of GGN
  products, while with few Adam steps the target is still a loose one. The
  20,000-image benchmark (`benchmarks/README.md`) has the larger case.
* `curvature.sgd(momentum=0.9)` and `optax.sgd(momentum=0.9)` are the same
  algorithm (Polyak's heavy ball in optax's form), so their curves coincide.

References: Hinton & Salakhutdinov (2006), *Reducing the dimensionality of
data with neural networks*; Martens (2010), *Deep learning via Hessian-free
optimization*; Martens & Grosse (2015), *Optimizing neural networks with
Kronecker-factored approximate curvature*.
"""),
]
