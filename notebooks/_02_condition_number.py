CELLS = [
("md", r"""
# 2. Iterations to reach ε against the condition number κ

On a strongly convex quadratic with curvatures between $\mu$ and $L$,
$\kappa = L / \mu$, the classical bounds (Nesterov, *Introductory Lectures on
Convex Optimization*, 2004, as Martens quotes them in his 2020 lecture) are, for a relative accuracy $\varepsilon$:

| method | tuned parameters | iterations |
|---|---|---|
| gradient descent | $\alpha = 1/L$ | $\le \kappa \log(1/\varepsilon)$ |
| heavy-ball momentum (Polyak 1964) | $\alpha = 4/(\sqrt L + \sqrt\mu)^2$, $\beta = \big(\tfrac{\sqrt\kappa - 1}{\sqrt\kappa + 1}\big)^2$ | $\approx \tfrac12\sqrt\kappa \log(1/\varepsilon)$ (asymptotic rate) |
| Nesterov (1983) | $\alpha = 1/L$, $\beta = \tfrac{\sqrt\kappa - 1}{\sqrt\kappa + 1}$ | $\le 2\sqrt\kappa \log(\sqrt{2\kappa}/\varepsilon)$ |
| Newton | — | 1 on a quadratic, independent of $\kappa$ |

(the bounds are for the distance: Nesterov's is its bound on
$f(x_k) - f^*$ turned into one on $\|x_k - x^*\|$ with $\mu$ and $L$). The
lower bound for first-order methods is $\propto \sqrt\kappa$, so momentum
and Nesterov are optimal. We measure the first iteration with
$\|x_k - x^*\| \le \varepsilon\,\|x_0 - x^*\|$ (the distance, so that the
slowest eigenvector's share of the error does not depend on κ) on
`datasets.make_quadratic(d, κ)` (log-spaced spectrum, random rotation,
$x_0 - x^*$ with equal weight on every eigenvector), fit the slope of
$\log k$ against $\log\kappa$, and assert it. Newton is `curvature.newton`
on the same problem written as least squares.

Set `CURVATURE_FAST=1` for the fast mode (CI): fewer and smaller κ.
"""),
("code", SETUP),
("code", r'''
DIM = 20
EPS = 1e-6
KAPPAS = np.geomspace(10, 1e3, 5) if FAST else np.geomspace(10, 1e5, 11)
MAX_STEPS = 10 * int(KAPPAS.max() * np.log(1 / EPS))


def start(quad):
  """``x₀ = x* + Q 1``: equal weight on every eigenvector."""
  _, q = np.linalg.eigh(quad.A)
  return jnp.asarray(quad.x_star + q.sum(axis=1))


@functools.partial(jax.jit, static_argnums=0)
def iterations_to_eps(opt, A, b, x0, x_star):
  """First ``k`` with ``‖x_k − x*‖ ≤ ε ‖x₀ − x*‖`` (``MAX_STEPS`` cap)."""
  target = EPS * jnp.linalg.norm(x0 - x_star)

  def running(carry):
    k, x, _ = carry
    return (jnp.linalg.norm(x - x_star) > target) & (k < MAX_STEPS)

  def step(carry):
    k, x, state = carry
    updates, state = opt.update(A @ x - b, state, x)
    return k + 1, optax.apply_updates(x, updates), state

  k, _, _ = jax.lax.while_loop(running, step, (0, x0, opt.init(x0)))
  return k


def first_order_methods(quad):
  L, mu = quad.eigenvalues[-1], quad.eigenvalues[0]
  root = np.sqrt(quad.condition_number)
  return {
      "gradient descent": curvature.sgd(1 / L),
      "heavy-ball momentum": curvature.heavy_ball(
          4 / (np.sqrt(L) + np.sqrt(mu)) ** 2,
          momentum=((root - 1) / (root + 1)) ** 2),
      "Nesterov": curvature.nesterov(1 / L, momentum=(root - 1) / (root + 1)),
  }
'''),
("code", r'''
def newton_iterations(quad, x0, max_iterations=20):
  """Iterations of ``curvature.newton`` (CG to 1e-10) to reach ε."""
  loss = curvature.losses.squared_error
  opt = curvature.newton(predict_fn=quad.predict_fn, loss=loss,
                         max_cg_iterations=4 * DIM, cg_tol=1e-10)
  objective = lambda x: loss.value(quad.predict_fn(x, quad.batch),
                                   quad.batch["targets"])  # = f(x) − f*
  step = jax.jit(lambda x, s: opt.update(jax.grad(objective)(x), s, x,
                                         batch=quad.batch))
  distance = lambda x: np.linalg.norm(np.asarray(x) - quad.x_star)
  x, state, target = x0, opt.init(x0), EPS * distance(x0)
  for k in range(max_iterations):
    if distance(x) <= target:
      return k
    updates, state = step(x, state)
    x = optax.apply_updates(x, updates)
  return max_iterations


results = {name: [] for name in
           ("gradient descent", "heavy-ball momentum", "Nesterov", "Newton")}
for kappa in tqdm(KAPPAS, desc="κ"):
  quad = datasets.make_quadratic(DIM, kappa, seed=0)
  A, b, x0 = jnp.asarray(quad.A), jnp.asarray(quad.b), start(quad)
  x_star = jnp.asarray(quad.x_star)
  for name, opt in first_order_methods(quad).items():
    results[name].append(int(iterations_to_eps(opt, A, b, x0, x_star)))
  results["Newton"].append(newton_iterations(quad, x0))

print(f"{'κ':>10s}" + "".join(f"{name:>22s}" for name in results))
for i, kappa in enumerate(KAPPAS):
  print(f"{kappa:10.3g}" + "".join(f"{results[n][i]:22d}" for n in results))
'''),
("code", r'''
def fitted_slope(kappas, iterations):
  return np.polyfit(np.log(kappas), np.log(np.maximum(iterations, 1)), 1)[0]


slopes = {name: fitted_slope(KAPPAS, its) for name, its in results.items()}
log_eps = np.log(1 / EPS)
bounds = {"gradient descent": KAPPAS * log_eps,
          "Nesterov": 2 * np.sqrt(KAPPAS) * np.log(np.sqrt(2 * KAPPAS) / EPS)}

fig, ax = plt.subplots(figsize=(8, 6))
for (name, its), marker in zip(results.items(), "osD^"):
  ax.loglog(KAPPAS, its, marker + "-",
            label=f"{name}: slope {slopes[name]:.2f}")
ax.loglog(KAPPAS, bounds["gradient descent"], "k:", label=r"$\kappa\log(1/\varepsilon)$ (GD bound)")
ax.loglog(KAPPAS, bounds["Nesterov"], "k--",
          label=r"$2\sqrt{\kappa}\log(\sqrt{2\kappa}/\varepsilon)$ (Nesterov bound)")
ax.set_xlabel("condition number κ")
ax.set_ylabel(f"iterations to ε = {EPS:g}")
ax.set_title(f"Quadratic, d = {DIM}: iterations against κ")
ax.legend(fontsize=9)
ax.grid(True, which="major", alpha=0.3)
fig.tight_layout()
fig.savefig("figures/02_condition_number.png", dpi=110)
plt.show()
for name, slope in slopes.items():
  print(f"{name:22s} fitted slope {slope:.3f}")
'''),
("md", r"""
## Checks against the seeds' bounds

The fitted slopes must be $1 \pm 0.1$ for gradient descent, $0.5 \pm 0.1$ for
heavy-ball momentum and Nesterov, and $0 \pm 0.05$ for Newton; gradient
descent and Nesterov must also stay below their bounds at every κ, and every
run must have converged (no run hit the cap).
"""),
("code", r'''
assert abs(slopes["gradient descent"] - 1.0) < 0.1, slopes
assert abs(slopes["heavy-ball momentum"] - 0.5) < 0.1, slopes
assert abs(slopes["Nesterov"] - 0.5) < 0.1, slopes
assert abs(slopes["Newton"]) < 0.05, slopes
assert (np.array(results["gradient descent"]) <= bounds["gradient descent"]).all()
assert (np.array(results["Nesterov"]) <= bounds["Nesterov"]).all()
assert max(max(its) for its in results.values()) < MAX_STEPS
print("all slopes and bounds check")
'''),
]
