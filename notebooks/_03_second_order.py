CELLS = [
("md", r"""
# 3. Second-order methods: Newton, damping as a trust region, saddles

Newton, damped Newton, Gauss-Newton and Hessian-free on Rosenbrock's function
written as least squares (`datasets.rosenbrock()`: residuals
$r(\theta) = (1 - x,\ 10(y - x^2))$, $f = \|r\|^2$), then two pictures from
`shared/seeds/000_*` (Martens, *Second-order optimization for neural
networks*, lecture 2020) and `shared/seeds/004_*` (notes on Goodfellow et
al., *Deep Learning*, ch. 8):

* **damping is a trust region**: the damped step
  $p(\lambda) = -(C + \lambda I)^{-1} g$ minimizes the quadratic model
  $q(p) = g^\top p + \tfrac12 p^\top C p$ over the ball
  $\|p\| \le \|p(\lambda)\|$, and its length falls monotonically as λ grows
  (Moré 1983; Nocedal & Wright 2006, Thm 4.1);
* **Newton is attracted by saddles**, while the Gauss-Newton matrix, positive
  semi-definite, is not, gradient descent "seems immune to saddles" (seed
  004), and saddle-free Newton, which rescales by $|H|$ instead of $H$, is
  repelled by them (Dauphin et al. 2014).

References: Martens 2010 (Hessian-free); Schraudolph 2002 (GGN);
Levenberg 1944, Marquardt 1963; Moré 1983; Dauphin et al. 2014;
Saxe et al. 2014 (the two-weight linear network below).

Set `CURVATURE_FAST=1` for the fast mode (CI): fewer iterations and grid
points.
"""),
("code", SETUP),
("code", r'''
NUM_ITERATIONS = 12 if FAST else 40
GRID = 8 if FAST else 30  # even: no start on the axes
loss = curvature.losses.squared_error
rosen = datasets.rosenbrock()


def run(opt, predict_fn, batch, starts, num_iterations):
  """Iterates ``[len(starts), num_iterations + 1, 2]`` of a curvature-aware
  transform (``update(..., batch=)``), one ``lax.scan`` vmapped over starts."""
  objective = lambda x: loss.value(predict_fn(x, batch), batch["targets"])

  def one(x):
    def step(carry, _):
      x, state = carry
      updates, state = opt.update(jax.grad(objective)(x), state, x,
                                  batch=batch)
      x = optax.apply_updates(x, updates)
      return (x, state), x
    _, path = jax.lax.scan(step, (x, opt.init(x)), None,
                           length=num_iterations)
    return jnp.concatenate([x[None], path])

  return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(starts, jnp.float64)))


second_order = {
    "Newton": curvature.newton(predict_fn=rosen.predict_fn, loss=loss),
    "damped Newton": curvature.damped_newton(predict_fn=rosen.predict_fn,
                                             loss=loss),
    "Gauss-Newton": curvature.gauss_newton(predict_fn=rosen.predict_fn,
                                           loss=loss),
    "Hessian-free": curvature.hessian_free(predict_fn=rosen.predict_fn,
                                           loss=loss),
}
start = rosen.starts[0]
paths = {name: run(opt, rosen.predict_fn, rosen.batch, [start],
                   NUM_ITERATIONS)[0]
         for name, opt in tqdm(second_order.items(), desc="optimizers")}
for name, path in paths.items():
  values = np.asarray(rosen.fn(jnp.asarray(path)))
  hit = np.flatnonzero(values < 1e-10)
  print(f"{name:14s} final f = {values[-1]:.3g}, "
        f"f < 1e-10 after {hit[0] if hit.size else '—'} iterations")
'''),
("code", r'''
def contours(ax, function, bounds=None, grid=300):
  (x0, x1), (y0, y1) = bounds or function.bounds
  x, y = np.meshgrid(np.linspace(x0, x1, grid), np.linspace(y0, y1, grid))
  z = np.asarray(function.fn(jnp.stack([x, y], axis=-1)))
  ax.contour(x, y, z, levels=np.geomspace(1e-2, z.max(), 25), cmap="Greys",
             linewidths=0.6, norm="log")
  ax.plot(*function.minimum, "k*", markersize=14)
  ax.set_xlim(x0, x1)
  ax.set_ylim(y0, y1)


fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(14, 5.5))
contours(ax, rosen)
for (name, path), style in zip(paths.items(), ["o-", "s--", "^-", "D:"]):
  ax.plot(path[:, 0], path[:, 1], style, markersize=4, label=name)
  ax_loss.semilogy(np.maximum(np.asarray(rosen.fn(jnp.asarray(path))), 1e-16),
                   style, markersize=4, label=name)
ax.plot(*start, "ko")
ax.set_title("Rosenbrock from (−1.2, 1)")
ax.legend()
ax_loss.set_xlabel("iteration")
ax_loss.set_ylabel("f(θ)")
ax_loss.set_title("loss against iterations")
fig.tight_layout()
fig.savefig("figures/03_second_order_rosenbrock.png", dpi=110)
plt.show()
'''),
("md", r"""
## Damping is a trust region

At $\theta_0 = (-1.2, 1)$ we build the dense GGN $C$ from
`curvature.linearize(...).matvec` and follow the damped step
$p(\lambda) = -(C + \lambda I)^{-1}g$ from the Gauss-Newton step
($\lambda \to 0$) to a short gradient step ($\lambda \to \infty$,
$p \approx -g/\lambda$). Each $p(\lambda)$ is the minimizer of the model
inside the circle of radius $\|p(\lambda)\|$ drawn around $\theta_0$.
"""),
("code", r'''
theta0 = jnp.asarray(start, jnp.float64)
lin = curvature.linearize(rosen.predict_fn, loss, theta0, rosen.batch,
                          curvature="ggn")
C = jnp.stack([lin.matvec(e) for e in jnp.eye(2)], axis=1)
g = lin.grad
lambdas = np.geomspace(1e-3, 1e5, 40 if FAST else 200)
steps = np.stack([np.asarray(-jnp.linalg.solve(C + lam * jnp.eye(2), g))
                  for lam in lambdas])
lengths = np.linalg.norm(steps, axis=1)
model = lambda p: g @ p + 0.5 * p @ (C @ p)
assert np.all(np.diff(lengths) < 0), "‖p(λ)‖ must fall as λ grows"

# p(λ) minimizes the model on its circle: check against 720 points on it.
angles = np.linspace(0, 2 * np.pi, 720, endpoint=False)
circle = np.stack([np.cos(angles), np.sin(angles)], axis=1)
for p, radius in zip(steps[::10], lengths[::10]):
  on_circle = min(float(model(jnp.asarray(radius * c))) for c in circle)
  assert float(model(jnp.asarray(p))) <= on_circle + 1e-9 * abs(on_circle)
print("‖p(λ)‖ decreases monotonically and p(λ) minimizes q on its circle")
print(f"Gauss-Newton step length {lengths[0]:.3f}, at λ = 1e5: {lengths[-1]:.2e}")
'''),
("code", r'''
fig, (ax_len, ax_path) = plt.subplots(1, 2, figsize=(14, 5.5))
ax_len.loglog(lambdas, lengths, "-", label=r"$\|p(\lambda)\|$")
ax_len.loglog(lambdas, float(jnp.linalg.norm(g)) / lambdas, "k:",
              label=r"$\|g\|/\lambda$ (gradient step, lr $1/\lambda$)")
ax_len.set_xlabel("damping λ")
ax_len.set_ylabel("step length = trust-region radius")
ax_len.set_title("Damped step length against λ")
ax_len.legend()

points = np.asarray(theta0) + steps
bounds = ((-2.0, 2.0), (-4.5, 1.8))
contours(ax_path, rosen, bounds=bounds)
ax_path.plot(points[:, 0], points[:, 1], "-", color="C1",
             label=r"$\theta_0 + p(\lambda)$, λ from 1e-3 to 1e5")
for lam in (1e-3, 0.3, 1.0, 3.0):
  i = np.argmin(np.abs(lambdas - lam))
  ax_path.add_patch(plt.Circle(np.asarray(theta0), lengths[i], fill=False,
                               linestyle="--", color="C0", alpha=0.7))
  ax_path.plot(*points[i], "o", color="C1")
  ax_path.annotate(f"λ = {lam:g}", points[i], textcoords="offset points",
                   xytext=(8, -4), fontsize=10)
ax_path.plot(*theta0, "ko")
ax_path.set_aspect("equal")
ax_path.set_title("θ₀ + p(λ) over f's contours; circles: trust regions")
ax_path.legend(loc="lower right")
fig.tight_layout()
fig.savefig("figures/03_damping_trust_region.png", dpi=110)
plt.show()
'''),
("md", r"""
## Newton is attracted by a saddle; Gauss-Newton, gradient descent and saddle-free Newton are not

A two-weight linear network $\hat y = a\,b\,x$ fitted to $x = y = 1$ with
squared error, $f(a, b) = \tfrac12(ab - 1)^2$: its minima are the hyperbola
$ab = 1$ and the origin is a saddle with Hessian eigenvalues $\pm 1$ (Saxe et
al. 2014). The textbook Newton step $-H^{-1}g$ (seed 001's update rule)
jumps to the nearest stationary point, so from every start near the origin it
converges to the saddle. The GGN $J^\top J$ is positive semi-definite, so the
Gauss-Newton step is a descent direction and goes to the hyperbola.
`curvature.newton` solves $Hp = -g$ by CG, stops at the first direction
of non-positive curvature and, if that is the very first one, takes the
steepest-descent direction instead (Newton-CG, Nocedal & Wright 2006,
Alg. 7.1). Gradient descent (`curvature.sgd`, learning rate 0.5) follows
$-g$, which near the saddle points away from it along the negative-curvature
direction. `curvature.saddle_free_newton` takes $-(|H| + \lambda I)^{-1}g$
(here with the exact 2-D Lanczos subspace and $\lambda = 0.1$): with
$|H| \approx I$ near the origin it is a unit gradient step there, and
Newton's step near the minima, where $H \succeq 0$. The table and the
sentences under it are printed from the runs.
"""),
("code", r'''
def predict_linear_net(params, batch):
  return params[0] * params[1] * batch["inputs"]


net = {"inputs": jnp.ones((1, 1)), "targets": jnp.ones((1, 1))}
net_objective = lambda p: loss.value(predict_linear_net(p, net), net["targets"])
point = jnp.asarray([0.3, 0.2])
lin = curvature.linearize(predict_linear_net, loss, point, net,
                          curvature="hessian")
saddle = curvature.negative_curvature(lin.matvec, point)
print("Hessian eigenvalues (dense):",
      np.linalg.eigvalsh(jax.hessian(net_objective)(point)))
print(f"curvature.negative_curvature: is_saddle={bool(saddle.is_saddle)}, "
      f"smallest={float(saddle.smallest):.3f}, "
      f"direction={np.round(np.asarray(saddle.direction), 3)}")


def dense_newton(x, num_iterations):
  for _ in range(num_iterations):
    x = x - jnp.linalg.solve(jax.hessian(net_objective)(x),
                             jax.grad(net_objective)(x))
  return x


methods = {
    "Newton (dense −H⁻¹g)": None,
    "curvature.newton (Newton-CG)": curvature.newton(
        predict_fn=predict_linear_net, loss=loss),
    "curvature.gauss_newton": curvature.gauss_newton(
        predict_fn=predict_linear_net, loss=loss),
    "curvature.damped_newton": curvature.damped_newton(
        predict_fn=predict_linear_net, loss=loss),
    "gradient descent (lr 0.5)": curvature.sgd(0.5),
    "curvature.saddle_free_newton": curvature.saddle_free_newton(
        predict_fn=predict_linear_net, loss=loss, num_iterations=2,
        damping=0.1),
}
# Gradient descent converges linearly: it gets 100 steps, the others 20.
steps = {name: 100 if name.startswith("gradient") else 20 for name in methods}
starts = np.stack(np.meshgrid(np.linspace(-0.9, 0.9, GRID),
                              np.linspace(-0.9, 0.9, GRID)), -1).reshape(-1, 2)
starts = starts + np.array([0.021, 0.0])  # off the anti-diagonal a = −b,
# where every descent method converges to the saddle: on that line it *is*
# the minimum of f (the gradient keeps iterates on the line).
newton_jit = jax.jit(jax.vmap(functools.partial(dense_newton,
                                                num_iterations=20)))
finals = {"Newton (dense −H⁻¹g)": np.asarray(newton_jit(jnp.asarray(starts)))}
for name, opt in tqdm(list(methods.items())[1:], desc="methods"):
  finals[name] = run(opt, predict_linear_net, net, starts, steps[name])[:, -1]
outcomes = {}
for name, final in finals.items():
  values = np.asarray(jax.vmap(net_objective)(jnp.asarray(final)))
  outcomes[name] = dict(
      saddle=np.mean(np.linalg.norm(final, axis=1) < 1e-6),
      stalled=np.mean(np.linalg.norm(final - starts, axis=1) < 1e-9),
      minimum=np.mean(values < 1e-10))
  o = outcomes[name]
  print(f"{name:30s} {steps[name]:3d} steps. at the saddle: {o['saddle']:5.0%},"
        f" stalled: {o['stalled']:5.0%}, at a minimum (f < 1e-10):"
        f" {o['minimum']:5.0%}")

print()
for name, o in outcomes.items():
  if o["saddle"] > 0.5:
    verdict = (f"is attracted by the saddle from {o['saddle']:.1%} of the"
               f" starts")
  elif o["saddle"] == 0:
    verdict = (f"never ends at the saddle and reaches a minimum from"
               f" {o['minimum']:.1%} of the starts")
  else:
    verdict = (f"ends at the saddle from {o['saddle']:.0%} of the starts,"
               f" stalls from {o['stalled']:.0%} and reaches a minimum from"
               f" {o['minimum']:.0%}")
  print(f"{name} {verdict}.")
sfn = outcomes["curvature.saddle_free_newton"]
newton_at_saddle = outcomes["Newton (dense −H⁻¹g)"]["saddle"]
print("Seed 004's claims: Newton falls in saddles —",
      "reproduced" if newton_at_saddle > 0.5 else "not reproduced",
      f"({newton_at_saddle:.0%}); gradient descent seems immune —",
      "reproduced;" if outcomes["gradient descent (lr 0.5)"]["saddle"] == 0
      else "not reproduced;",
      "saddle-free Newton escapes —",
      "reproduced" if sfn["saddle"] == 0 and sfn["minimum"] > 0.99
      else "not reproduced", f"(at a minimum from {sfn['minimum']:.0%}).")
# The claims above, checked (CI runs this in fast mode).
assert newton_at_saddle > 0.5
for name in ("gradient descent (lr 0.5)", "curvature.saddle_free_newton"):
  assert outcomes[name]["saddle"] == 0 and outcomes[name]["minimum"] > 0.99
'''),
("code", r'''
x, y = np.meshgrid(np.linspace(-1.6, 1.6, 200), np.linspace(-1.6, 1.6, 200))
z = 0.5 * (x * y - 1) ** 2
fig, axes = plt.subplots(2, 3, figsize=(16, 11))
for ax, (name, final) in zip(axes.flat, finals.items()):
  ax.contour(x, y, z, levels=np.geomspace(1e-3, z.max(), 20), cmap="Greys",
             linewidths=0.6, norm="log")
  hyperbola = np.linspace(0.62, 1.6, 50)
  for sign in (1, -1):
    ax.plot(sign * hyperbola, sign / hyperbola, "g-", linewidth=2)
  for s, f in zip(starts, final):
    ax.annotate("", f, s, arrowprops=dict(arrowstyle="->", color="C3",
                                          alpha=0.5, linewidth=0.7))
  ax.plot(0, 0, "kx", markersize=12, mew=3)
  ax.set_xlim(-1.6, 1.6)
  ax.set_ylim(-1.6, 1.6)
  ax.set_aspect("equal")
  ax.set_title(name, fontsize=11)
  ax.set_xlabel("a")
for ax in axes[:, 0]:
  ax.set_ylabel("b")
fig.suptitle("f(a, b) = ½(ab − 1)²: start → end point. ×: saddle; green: "
             "minima (ab = 1)")
fig.tight_layout()
fig.savefig("figures/03_saddle.png", dpi=110)
plt.show()
'''),
]
