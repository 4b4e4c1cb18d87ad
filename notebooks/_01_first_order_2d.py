CELLS = [
("md", r"""
# 1. First-order methods in 2-D

Gradient descent with a small and a large learning rate, heavy-ball momentum,
Nesterov momentum, AdaGrad, RMSProp (plain and with momentum) and Adam (with
and without bias correction) on **Beale's function** from $(2, -2)$ and
$(-3, 3)$, capped at 10,000 iterations, the classic demonstration of the
first-order canon (Goodfellow, Bengio & Courville, *Deep Learning*, 2016,
ch. 8; the animations follow Tiao's matplotlib notes); and on a **narrow
valley** (Martens, *New insights and perspectives on the natural gradient
method*, JMLR 2020): a large learning rate bounces between the walls, a small
one crawls along the floor.

The lecture notes this project started from make five claims about Beale
from $(-3, 3)$: momentum "pushes the descent to find a local, but not global,
minimum"; Nesterov momentum "finds the same local minimum as momentum";
AdaGrad and RMSProp proceed to the global minimum, RMSProp more quickly than
AdaGrad; RMSProp with momentum gets there more quickly than all the others;
Adam is "just slightly slower" than RMSProp. The notes do not give their
learning rates. This notebook picks one rate per method, checks every claim
from the trajectories, prints which hold, and shows how sensitive each
outcome is to the rate.

Every optimizer is a `curvature` alias (bit-identical to its optax namesake
with default arguments); the notes' variants are arguments: AdaGrad and
RMSProp with a zero initial accumulator and $\nu = 10^{-7}$ inside the root
($\varepsilon/\sqrt{a + \nu}$, the notes' update rules), RMSProp with
momentum and Adam with $\nu$ outside it ($\sqrt{a} + \nu$, the notes' code),
Adam with $\beta_2 = 0.99$. One `jax.lax.scan` runs each trajectory.

References: Polyak 1964 (momentum); Nesterov 1983; Sutskever et al. 2013;
Duchi et al. 2011 (AdaGrad); Tieleman & Hinton 2012 (RMSProp); Kingma & Ba
2015 (Adam); Beale 1958.

Set `CURVATURE_FAST=1` for the fast mode (CI): fewer iterations and a coarser
contour grid.
"""),
("code", SETUP),
("code", r'''
NUM_STEPS = 10_000  # the notes' cap; cheap enough for the fast mode too
GRID = 120 if FAST else 400


def trajectory(opt, fn, start, num_steps):
  """Iterates of ``opt`` on ``fn`` from ``start``, ``[num_steps + 1, 2]``."""
  params = jnp.asarray(start, jnp.float64)

  def step(carry, _):
    params, state = carry
    updates, state = opt.update(jax.grad(fn)(params), state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), params

  _, path = jax.lax.scan(step, (params, opt.init(params)), None,
                         length=num_steps)
  return jnp.concatenate([params[None], path])


def run_all(optimizers, function, num_steps):
  """Trajectories of every optimizer from every start of ``function``."""
  paths = {}
  for name, opt in tqdm(optimizers.items(), desc=function.name):
    run = jax.jit(functools.partial(trajectory, opt, function.fn,
                                    num_steps=num_steps))
    paths[name] = [np.asarray(run(start)) for start in function.starts]
  return paths
'''),
("code", r'''
def contours(ax, function, grid=GRID, log=True):
  (x0, x1), (y0, y1) = function.bounds
  x, y = np.meshgrid(np.linspace(x0, x1, grid), np.linspace(y0, y1, grid))
  z = np.asarray(function.fn(jnp.stack([x, y], axis=-1)))
  levels = (np.logspace(-1, 5.5, 30) if log else
            np.geomspace(1e-2, np.percentile(z, 80), 25))
  ax.contour(x, y, z, levels=levels, cmap="Greys", linewidths=0.6,
             norm="log")
  ax.plot(*function.minimum, "k*", markersize=14, label="minimum")
  ax.set_xlim(x0, x1)
  ax.set_ylim(y0, y1)
  ax.set_xlabel(r"$\theta_1$")
  ax.set_ylabel(r"$\theta_2$")


STYLES = ["-", "--", "-", "-.", "-", "--", "-"]


def plot_paths(ax, paths, start_index, colors, every=1):
  for (name, runs), color, style in zip(paths.items(), colors, STYLES):
    path = runs[start_index]
    finite = np.isfinite(path).all(axis=1) & (np.abs(path) < 1e3).all(axis=1)
    end = np.argmin(finite) if not finite.all() else len(path)
    label = name + ("  (diverged)" if end < len(path) else "")
    ax.plot(path[:end:every, 0], path[:end:every, 1], style, color=color,
            linewidth=1.5, label=label, alpha=0.9)
    ax.plot(*path[0], "o", color="k", markersize=5)


def start_label(start):
  return "(" + ", ".join(f"{float(v):g}" for v in start) + ")"


def summary(paths, function):
  """Final loss and distance to the minimum, per optimizer and start."""
  header = "".join(f" | from {start_label(s):9s} f, ‖θ−θ*‖"
                   for s in function.starts)
  print(f"{'optimizer':28s}{header}")
  for name, runs in paths.items():
    row = ""
    for path in runs:
      loss = float(function.fn(jnp.asarray(path[-1])))
      distance = float(np.linalg.norm(path[-1] - function.minimum))
      row += f" | {loss:10.3g} {distance:10.3g}   "
    print(f"{name:28s}{row}")
'''),
("md", r"""
## Beale's function

$f(x, y) = (1.5 - x + xy)^2 + (2.25 - x + xy^2)^2 + (2.625 - x + xy^3)^2$,
minimum $0$ at $(3, \tfrac12)$. Beale's function has no other local minimum:
what the notes call a "local minimum" is the flat valley along $y \approx 1$
towards $x \to -\infty$, where $f$ tends to
$1.5^2 + 2.25^2 + 2.625^2 \approx 14.2$ and the gradient vanishes. A
trajectory that ends there (at $x < 0$) is classified as *left valley*. One
learning rate per method for both starts, chosen so that each method shows
the behaviour the notes describe where one exists (the sensitivity table
below shows how narrow some of those windows are).
"""),
("code", r'''
beale = datasets.beale()
notes_variants = dict(eps=1e-7, eps_in_root=False)  # √a + ν (the notes' code)
notes_rule = dict(eps=1e-7, eps_in_root=True)  # √(a + ν) (the notes' rule)
BEALE_RATES = {
    "GD": 1e-4, "GD (large rate)": 1e-3, "momentum 0.9": 1.2e-4,
    "Nesterov 0.9": 1.1e-4, "AdaGrad": 5.0, "RMSProp": 0.4,
    "RMSProp + momentum": 0.05, "Adam": 0.3, "Adam, no bias correction": 0.1,
}
BEALE_FAMILIES = {
    "GD": curvature.sgd,
    "GD (large rate)": curvature.sgd,
    "momentum 0.9": lambda lr: curvature.heavy_ball(lr, momentum=0.9),
    "Nesterov 0.9": lambda lr: curvature.nesterov(lr, momentum=0.9),
    "AdaGrad": lambda lr: curvature.adagrad(
        lr, initial_accumulator_value=0.0, **notes_rule),
    "RMSProp": lambda lr: curvature.rmsprop(lr, decay=0.99, **notes_rule),
    "RMSProp + momentum": lambda lr: curvature.rmsprop(
        lr, decay=0.99, momentum=0.9, **notes_variants),
    "Adam": lambda lr: curvature.adam(lr, b2=0.99, eps=1e-7),
    "Adam, no bias correction": lambda lr: curvature.adam(
        lr, b2=0.99, eps=1e-7, bias_correction=False),
}
beale_optimizers = {f"{name}, lr {BEALE_RATES[name]:g}":
                    BEALE_FAMILIES[name](BEALE_RATES[name])
                    for name in BEALE_FAMILIES}
beale_paths = run_all(beale_optimizers, beale, NUM_STEPS)
summary(beale_paths, beale)
'''),
("code", r'''
TOLERANCE = 0.05  # "reached": within this distance of (3, 1/2)


def outcome(path, function=beale, tolerance=TOLERANCE):
  """Where a trajectory went, and the first iteration within tolerance."""
  path = np.asarray(path)
  if not np.isfinite(path).all():
    return "diverged", None
  if np.abs(path).max() > 1e3:  # Finite but far: down the valley, or away.
    last = path[-1]
    return ("left valley (x → −∞)" if last[0] < 0 and abs(last[1] - 1) < 0.5
            else "diverged"), None
  distance = np.linalg.norm(path - function.minimum, axis=1)
  hits = np.flatnonzero(distance < tolerance)
  if hits.size:
    return "global minimum", int(hits[0])
  if path[-1, 0] < 0:
    return "left valley", None  # Where the gradient vanishes, f → 14.2.
  return "not there at the cap", None


def outcome_table(paths):
  rows = {}
  for name, runs in paths.items():
    rows[name] = [outcome(run) for run in runs]
  print(f"{'optimizer':34s}" + "".join(
      f"| from {start_label(s):10s} {'iterations':>10s} "
      for s in beale.starts))
  for name, cells in rows.items():
    print(f"{name:34s}" + "".join(
        f"| {where:21s} {'' if it is None else it:>6} "
        for where, it in cells))
  return rows


beale_outcomes = outcome_table(beale_paths)
'''),
("code", r'''
colors = plt.cm.tab10(np.arange(len(beale_optimizers)))
fig, axes = plt.subplots(1, 2, figsize=(15, 7.4))
for i, ax in enumerate(axes):
  contours(ax, beale)
  plot_paths(ax, beale_paths, i, colors)
  ax.set_title(f"Beale from {start_label(beale.starts[i])}, "
               f"{NUM_STEPS:,} iterations")
handles, labels = axes[1].get_legend_handles_labels()
fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=10)
fig.tight_layout(rect=(0, 0.11, 1, 1))
fig.savefig("figures/01_beale.png", dpi=110)
plt.show()
'''),
("md", r"""
### The notes' claims, checked

Each claim is evaluated on the trajectories from $(-3, 3)$ above; the cell
prints whether it holds at these learning rates.
"""),
("code", r'''
def from_second_start(family):
  name = f"{family}, lr {BEALE_RATES[family]:g}"
  return beale_outcomes[name][1]


def iterations(family):
  where, it = from_second_start(family)
  return it if where == "global minimum" else np.inf


claims = {
    "momentum ends in the left valley, not at the global minimum":
        from_second_start("momentum 0.9")[0].startswith("left valley"),
    "Nesterov momentum ends in the same valley as momentum":
        from_second_start("Nesterov 0.9")[0].startswith("left valley")
        and from_second_start("momentum 0.9")[0].startswith("left valley"),
    "AdaGrad proceeds to the global minimum":
        from_second_start("AdaGrad")[0] == "global minimum",
    "RMSProp proceeds to the global minimum, faster than AdaGrad":
        iterations("RMSProp") < iterations("AdaGrad"),
    "RMSProp with momentum is the fastest of all":
        iterations("RMSProp + momentum") <= min(
            iterations(f) for f in BEALE_RATES),
    "Adam is slightly slower than RMSProp with momentum":
        iterations("RMSProp + momentum") < iterations("Adam")
        <= 1.5 * iterations("RMSProp + momentum"),
}
for claim, holds in claims.items():
  print(f"{'reproduced    ' if holds else 'NOT reproduced'}  {claim}")
speeds = sorted((iterations(f), f) for f in BEALE_RATES
                if np.isfinite(iterations(f)))
print("\nIterations to within", TOLERANCE, "of (3, 1/2) from (-3, 3):",
      ", ".join(f"{f} {it}" for it, f in speeds))
if FAST:  # CI asserts the claims the prose below relies on.
  assert claims["momentum ends in the left valley, not at the global minimum"]
  assert claims["AdaGrad proceeds to the global minimum"]
'''),
("md", r"""
### How much the outcome depends on the learning rate

Each method at its rate divided and multiplied by 3 (and at the chosen
rate), from both starts. Momentum's left-valley ending in particular lives in
a narrow window: the trajectory from $(-3, 3)$ is chaotic in the rate.
"""),
("code", r'''
SENSITIVITY_STEPS = NUM_STEPS
sensitivity = {}
for family, rate in tqdm(BEALE_RATES.items(), desc="sensitivity"):
  for factor in (1 / 3, 1.0, 3.0):
    opt = BEALE_FAMILIES[family](rate * factor)
    run = jax.jit(functools.partial(trajectory, opt, beale.fn,
                                    num_steps=SENSITIVITY_STEPS))
    sensitivity[family, factor] = [outcome(run(s)) for s in beale.starts]
print(f"{'method':26s}{'rate':>8s}  from (2, -2)            from (-3, 3)")
for (family, factor), cells in sensitivity.items():
  text = "  ".join(f"{w:15s}{'' if i is None else i:>6}" for w, i in cells)
  print(f"{family:26s}{BEALE_RATES[family] * factor:8.2g}  {text}")
stable = [f for f in BEALE_RATES
          if len({sensitivity[f, k][1][0] for k in (1 / 3, 1.0, 3.0)}) == 1]
print("\nOutcome from (-3, 3) unchanged over a factor of 9 in the rate:",
      ", ".join(stable) if stable else "no method")
'''),
("code", r'''
summary_text = (
    f"At these rates {sum(claims.values())} of the notes' {len(claims)} "
    "claims about Beale from (-3, 3) are reproduced. ")
not_reproduced = [c for c, holds in claims.items() if not holds]
if not_reproduced:
  summary_text += "Not reproduced: " + "; ".join(not_reproduced) + ". "
summary_text += (
    "Plain gradient descent with the large rate "
    + ("diverges" if from_second_start("GD (large rate)")[0] == "diverged"
       else "does not diverge")
    + " from (-3, 3), where the gradient is large (f is about 6,000 there).")
print(summary_text)
'''),
("md", r"""
## Beyond first order: quasi-Newton and nonlinear conjugate gradients

The same two starts with methods that build curvature from gradients alone:
BFGS (the dense inverse-Hessian update, Nocedal & Wright 2006, §6.1),
L-BFGS (optax's, memory 10) and nonlinear CG with the Fletcher–Reeves,
Polak–Ribière⁺ and Hestenes–Stiefel $\beta$ (restarted every $n = 2$ steps),
all with optax's zoom line search. They take the library's contract: Beale
is a sum of squared residuals, so `predict_fn` returns the residuals and the
loss is `squared_error` against zeros ($\tfrac12 f$, the same minimizer).
"""),
("code", r'''
QN_STEPS = 200
residual_model = dict(
    predict_fn=lambda theta, batch: beale.residual_fn(theta)[None],
    loss=curvature.losses.squared_error)
zeros = {"targets": jnp.zeros((1, 3))}
quasi_newton = {
    "BFGS": curvature.bfgs(**residual_model),
    "L-BFGS": curvature.lbfgs(**residual_model),
    "NCG Fletcher-Reeves": curvature.nonlinear_cg(
        beta="fletcher_reeves", restart_every=2, **residual_model),
    "NCG Polak-Ribière+": curvature.nonlinear_cg(
        beta="polak_ribiere", restart_every=2, **residual_model),
    "NCG Hestenes-Stiefel": curvature.nonlinear_cg(
        beta="hestenes_stiefel", restart_every=2, **residual_model),
}


def contract_trajectory(opt, start, num_steps):
  params = jnp.asarray(start, jnp.float64)

  def step(carry, _):
    params, state = carry
    updates, state = opt.update(jax.grad(beale.fn)(params), state, params,
                                batch=zeros)
    params = optax.apply_updates(params, updates)
    return (params, state), params

  _, path = jax.lax.scan(step, (params, opt.init(params)), None,
                         length=num_steps)
  return jnp.concatenate([params[None], path])


qn_paths = {}
for name, opt in tqdm(quasi_newton.items(), desc="quasi-Newton"):
  run = jax.jit(functools.partial(contract_trajectory, opt,
                                  num_steps=QN_STEPS))
  qn_paths[name] = [np.asarray(run(s)) for s in beale.starts]
qn_outcomes = outcome_table(qn_paths)
fastest_first_order = min(iterations(f) for f in BEALE_RATES)
reached = {name: cells[1][1] for name, cells in qn_outcomes.items()
           if cells[1][0] == "global minimum"}
print(f"\nFrom (-3, 3): {len(reached)} of {len(qn_paths)} reach the global "
      "minimum" + (f", the slowest in {max(reached.values())} iterations "
                   f"against {fastest_first_order} for the fastest "
                   "first-order method above (each iteration here also runs "
                   "a line search)" if reached else "") + ". Where each "
      "ended: " + "; ".join(f"{name}: {cells[1][0]}"
                            for name, cells in qn_outcomes.items()) + ".")
'''),
("code", r'''
fig, axes = plt.subplots(1, 2, figsize=(15, 7.2))
qn_colors = plt.cm.Set1(np.arange(len(qn_paths)))
for i, ax in enumerate(axes):
  contours(ax, beale)
  plot_paths(ax, qn_paths, i, qn_colors)
  ax.set_title(f"Quasi-Newton and nonlinear CG from "
               f"{start_label(beale.starts[i])}, {QN_STEPS} iterations")
axes[1].legend(loc="lower left", fontsize=9)
fig.tight_layout()
fig.savefig("figures/01_beale_quasi_newton.png", dpi=110)
plt.show()
'''),
("md", r"""
## The narrow valley

$f = \tfrac12(u^2 + \kappa v^2)$ with $\kappa = 50$, the floor $u$ tilted by
30°. The largest stable gradient-descent rate is $2/L = 0.04$.
"""),
("code", r'''
valley = datasets.narrow_valley(condition_number=50.0)
VALLEY_STEPS = 100
valley_optimizers = {
    "GD, lr 0.005 (small)": curvature.sgd(0.005),
    "GD, lr 0.039 (large)": curvature.sgd(0.039),
    "momentum 0.9, lr 0.005": curvature.heavy_ball(0.005, momentum=0.9),
    "Nesterov 0.9, lr 0.005": curvature.nesterov(0.005, momentum=0.9),
    "AdaGrad, lr 0.5": curvature.adagrad(0.5, initial_accumulator_value=0.0,
                                         **notes_variants),
    "RMSProp + momentum, lr 0.01": curvature.rmsprop(
        0.01, decay=0.99, momentum=0.9, **notes_variants),
    "Adam, lr 0.1": curvature.adam(0.1, b2=0.99, eps=1e-7),
}
valley_paths = run_all(valley_optimizers, valley, VALLEY_STEPS)
summary(valley_paths, valley)
'''),
("code", r'''
fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
names = list(valley_optimizers)
for ax, group in zip(axes, (names[:4], names[4:])):
  contours(ax, valley, log=False)
  plot_paths(ax, {n: valley_paths[n] for n in group}, 0,
             [colors[names.index(n)] for n in group])
  ax.set_aspect("equal")
  ax.legend(loc="lower right", fontsize=9)
axes[0].set_title(f"Narrow valley (κ = 50): gradient descent and momentum, "
                  f"{VALLEY_STEPS} iterations")
axes[1].set_title("Narrow valley: adaptive diagonal methods")
fig.tight_layout()
fig.savefig("figures/01_narrow_valley.png", dpi=110)
plt.show()
'''),
("code", r'''
fig, ax = plt.subplots(figsize=(8, 4.5))
for (name, runs), color in zip(valley_paths.items(), colors):
  ax.semilogy(np.asarray(valley.fn(jnp.asarray(runs[0]))), color=color,
              label=name)
ax.set_xlabel("iteration")
ax.set_ylabel("f(θ) − f*")
ax.set_title("Narrow valley: loss against iterations")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig("figures/01_narrow_valley_loss.png", dpi=110)
plt.show()
'''),
("md", r'''
With the large rate, gradient descent's across-valley factor is
$|1 - 0.039 \cdot 50| = 0.95$ per step, so it zig-zags between the walls; with
the small rate the along-floor factor is $1 - 0.005$ and it crawls. The cell
below measures what momentum does about it.
'''),
("code", r'''
def steps_to(path, function=valley, level=1e-3):
  values = np.asarray(function.fn(jnp.asarray(path)))
  hits = np.flatnonzero(values < level)
  return int(hits[0]) if hits.size else None


reach = {name: steps_to(runs[0]) for name, runs in valley_paths.items()}
for name, steps in reach.items():
  print(f"{name:30s} f < 1e-3 after "
        + (f"{steps} steps" if steps is not None
           else f"more than {VALLEY_STEPS} steps"))
small, heavy = reach["GD, lr 0.005 (small)"], reach["momentum 0.9, lr 0.005"]
print("\nAt the same small rate, momentum "
      + ("reaches f < 1e-3 and plain gradient descent does not"
         if heavy is not None and small is None else
         f"takes {heavy} steps against {small}")
      + f" within {VALLEY_STEPS} steps. The diagonal methods do not undo the"
      " conditioning of a tilted valley: they rescale coordinates, not"
      " directions.")
'''),
("md", r"""
## The rest of the first-order canon on the valley

AdaDelta in both of its forms (Zeiler 2012's update-RMS ratio, and the
variant that keeps an RMS of the weights), delta-bar-delta (Jacobs 1988; one
learning rate per coordinate, raised additively while the gradient keeps its
sign and cut geometrically when it flips: a full-batch method, which these
2-D problems are), Nesterov momentum in the look-ahead form (the gradient is
taken at $\theta + \alpha v$, Sutskever et al. 2013), which must match the
change-of-variables form above, and RMSProp with Nesterov momentum.
"""),
("code", r'''
def lookahead_trajectory(opt, fn, start, num_steps, momentum):
  """Like ``trajectory``, with the gradient at the look-ahead point."""
  params = jnp.asarray(start, jnp.float64)

  def step(carry, _):
    params, state = carry
    ahead = curvature.lookahead_params(params, state, momentum)
    updates, state = opt.update(jax.grad(fn)(ahead), state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), params

  _, path = jax.lax.scan(step, (params, opt.init(params)), None,
                         length=num_steps)
  return jnp.concatenate([params[None], path])


canon_optimizers = {
    "AdaDelta (update RMS), lr 1": curvature.adadelta(1.0, rho=0.95),
    "AdaDelta (weight RMS), lr 1": curvature.adadelta(
        1.0, rho=0.95, form="weights"),
    "delta-bar-delta, lr 0.005": curvature.delta_bar_delta(0.005),
    "RMSProp + Nesterov, lr 0.01": curvature.rmsprop(
        0.01, decay=0.99, momentum=0.9, nesterov=True, **notes_variants),
}
canon_paths = run_all(canon_optimizers, valley, VALLEY_STEPS)
lookahead = jax.jit(functools.partial(
    lookahead_trajectory, curvature.nesterov(0.005, 0.9, form="lookahead"),
    valley.fn, num_steps=VALLEY_STEPS, momentum=0.9))
canon_paths["Nesterov look-ahead, lr 0.005"] = [
    np.asarray(lookahead(s)) for s in valley.starts]
summary(canon_paths, valley)
# The look-ahead iterate θ and the change-of-variables iterate θ̃ = θ + αv
# differ by the velocity; their losses converge together.
gap = np.abs(np.asarray(valley.fn(jnp.asarray(
    canon_paths["Nesterov look-ahead, lr 0.005"][0][-1])))
    - np.asarray(valley.fn(jnp.asarray(
        valley_paths["Nesterov 0.9, lr 0.005"][0][-1]))))
print(f"Nesterov, look-ahead vs change of variables after {VALLEY_STEPS} "
      f"steps: |Δf| = {gap:.2e}")
'''),
("code", r'''
fig, ax = plt.subplots(figsize=(8, 4.5))
canon_colors = plt.cm.Dark2(np.arange(len(canon_paths)))
for (name, runs), color in zip(canon_paths.items(), canon_colors):
  ax.semilogy(np.asarray(valley.fn(jnp.asarray(runs[0]))), color=color,
              label=name)
ax.semilogy(np.asarray(valley.fn(jnp.asarray(
    valley_paths["GD, lr 0.005 (small)"][0]))), "k:", label="GD, lr 0.005")
ax.set_xlabel("iteration")
ax.set_ylabel("f(θ) − f*")
ax.set_title("Narrow valley: AdaDelta, delta-bar-delta, Nesterov forms")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig("figures/01_canon_valley.png", dpi=110)
plt.show()
'''),
]
