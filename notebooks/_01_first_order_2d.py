CELLS = [
("md", r"""
# 1. First-order methods in 2-D

Gradient descent with a small and a large learning rate, heavy-ball momentum,
Nesterov momentum, AdaGrad, RMSProp with momentum and Adam on **Beale's
function** from $(2, -2)$ and $(-3, 3)$, capped at 10,000 iterations — the
demonstrations of `shared/seeds/001_*` (Kao, UCLA ECE C147, lecture 10; the
animations follow Tiao's matplotlib notes) — and on the **narrow valley** of
`shared/seeds/000_*` (Martens, *Second-order optimization for neural
networks*, lecture 2020): a large learning rate bounces between the walls, a
small one crawls along the floor.

Every optimizer is a `curvature` alias (bit-identical to its optax namesake
with default arguments); the seed's variants are arguments: AdaGrad and
RMSProp with $\varepsilon$ outside the root and a zero initial accumulator,
Adam with $\beta_2 = 0.99$, $\nu = 10^{-7}$ as in the seed's code. One
`jax.lax.scan` runs each trajectory.

References: Polyak 1964 (momentum); Nesterov 1983; Sutskever et al. 2013;
Duchi et al. 2011 (AdaGrad); Tieleman & Hinton 2012 (RMSProp); Kingma & Ba
2015 (Adam); Beale 1958.

Set `CURVATURE_FAST=1` for the fast mode (CI): fewer iterations and a coarser
contour grid.
"""),
("code", SETUP),
("code", r'''
NUM_STEPS = 1_000 if FAST else 10_000  # the seed's cap is 10,000
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
minimum $0$ at $(3, \tfrac12)$. One learning rate per method for both starts,
as in the seed. The gradient at $(-3, 3)$ is large ($f \approx 6\,000$), so a
learning rate that works from $(2, -2)$ can diverge from there.
"""),
("code", r'''
beale = datasets.beale()
seed_variants = dict(eps=1e-7, eps_in_root=False)  # seed 001: ε outside the root
beale_optimizers = {
    "GD, lr 1e-4": curvature.sgd(1e-4),
    "GD, lr 1e-3": curvature.sgd(1e-3),
    "momentum 0.9, lr 1e-4": curvature.heavy_ball(1e-4, momentum=0.9),
    "Nesterov 0.9, lr 5e-5": curvature.nesterov(5e-5, momentum=0.9),
    "AdaGrad, lr 0.5": curvature.adagrad(0.5, initial_accumulator_value=0.0,
                                         **seed_variants),
    "RMSProp + momentum, lr 1e-2": curvature.rmsprop(
        1e-2, decay=0.99, momentum=0.9, **seed_variants),
    "Adam, lr 1e-2": curvature.adam(1e-2, b2=0.99, eps=1e-7),
}
beale_paths = run_all(beale_optimizers, beale, NUM_STEPS)
summary(beale_paths, beale)
'''),
("code", r'''
colors = plt.cm.tab10(np.arange(len(beale_optimizers)))
fig, axes = plt.subplots(1, 2, figsize=(15, 7.2))
for i, ax in enumerate(axes):
  contours(ax, beale)
  plot_paths(ax, beale_paths, i, colors)
  ax.set_title(f"Beale from {start_label(beale.starts[i])}, "
               f"{NUM_STEPS:,} iterations")
handles, labels = axes[1].get_legend_handles_labels()
fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=10)
fig.tight_layout(rect=(0, 0.09, 1, 1))
fig.savefig("figures/01_beale.png", dpi=110)
plt.show()
'''),
("md", r"""
From $(2, -2)$ every method that does not diverge reaches the valley; plain
gradient descent with the small rate has not arrived after the cap. From
$(-3, 3)$ the steep wall throws the large-rate GD off (it diverges); the small
rate GD, AdaGrad (whose accumulator has already shrunk its steps) and Adam
are caught in the flat valley at $y \approx 1$ that runs towards
$x \to -\infty$ — Adam slides down it, the seed's "a local, but not global,
minimum" — while momentum, Nesterov and RMSProp with momentum swing round to
$(3, \tfrac12)$. The table above gives the numbers.

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
                                         **seed_variants),
    "RMSProp + momentum, lr 0.01": curvature.rmsprop(
        0.01, decay=0.99, momentum=0.9, **seed_variants),
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
("md", r"""
With the large rate gradient descent zig-zags across the valley (the
across-valley factor is $|1 - 0.039 \cdot 50| = 0.95$ per step) while with the
small rate it crawls along the floor (factor $1 - 0.005$); momentum keeps
the along-floor velocity and gets there in far fewer steps — the picture of
seed 000. The diagonal methods do not undo the conditioning of a *tilted*
valley: they rescale coordinates, not directions.
"""),
]
