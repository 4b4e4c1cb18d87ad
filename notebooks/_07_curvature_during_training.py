CELLS = [
("md", r"""
# 7. Curvature during training: sharpness, the Hessian and the GGN spectrum

How does the curvature of a small network's loss change while gradient
descent trains it? The seeds state the classical facts this notebook measures:

* the step size is bounded by the largest curvature: gradient descent's
  "maximum allowable learning rate is, up to a fudge constant, $1/L$" with
  $L$ the maximum curvature (Martens, *Second-order
  optimization for neural networks*, lecture, 2020), "if we only use SGD the
  step size is determined by the largest eigenvalue of the Hessian", and too
  large a step diverges (lecture notes *Advanced Machine Learning:
  SGD, momentum, step size, Adam*). On a quadratic, gradient descent with
  step $\eta$ is stable iff $\eta < 2/\lambda_{\max}$;
* "in high dimensions the Hessian will have a spectrum of eigenvalues"
  (ibid.); its condition number $\lambda_{\max}/\lambda_{\min}$
  governs steepest descent (Perone, *A short
  introduction to optimization in deep learning*), though Martens calls it
  "sort of too primitive of a quantity" because many directions are flat,
  and warns that eigenvalues computed at one point describe only that point
  (Martens 2020);
* the Hessian of a network is indefinite: saddle points have "both positive
  and negative eigenvalues" (Goodfellow, Bengio & Courville,
  *Deep Learning*, 2016, ch. 8), and along a negative eigenvector a Newton step is
  a gradient *ascent* step (Kao, UCLA ECE C147 lecture notes); the Gauss-Newton and Fisher matrices "are always positive
  semi-definite so there's no negative curvature in the matrix itself"
  (Martens 2020).

The literature adds two pictures that we test here. **Edge of stability**
(Cohen, Kaur, Li, Kolter & Talwalkar, *Gradient descent on neural networks
typically occurs at the edge of stability*, ICLR 2021): with full-batch
gradient descent the sharpness $\lambda_{\max}(H)$ first grows
(*progressive sharpening*) until it reaches $2/\eta$, then hovers there
while the loss keeps decreasing non-monotonically. **Bulk and outliers**
(Sagun, Evci, Güney, Dauphin & Bottou 2017; Ghorbani, Krishnan & Xiao,
ICML 2019; Papyan 2019): the spectrum is a bulk near zero, with a few
negative eigenvalues, plus a handful of large outliers, roughly one per
class.

Tools, all matrix-free: `curvature.linearize(..., curvature="hessian" |
"ggn")` gives $v \mapsto Hv$ and $v \mapsto Gv$; `curvature.lanczos`,
`curvature.top_eigenpairs` and `curvature.negative_curvature` give extreme
eigenvalues; `curvature.spectral_density` (stochastic Lanczos quadrature)
the density, drawn by `curvature.plot_spectral_density`;
`curvature.hutchinson_trace` the trace; `curvature.monitor` records the
curvature along the gradient, $g^\top H g / g^\top g$, at every step.

Set `CURVATURE_FAST=1` for the fast mode (CI): a smaller network and data
set, fewer steps and Lanczos iterations.
"""),
("code", SETUP),
("code", r'''
from jax.flatten_util import ravel_pytree

N_TRAIN = 300 if FAST else 1000
SIZES = (40, 32, 10) if FAST else (40, 64, 64, 10)
STEPS = 200 if FAST else 800
EVERY = 20 if FAST else 10          # steps between sharpness measurements
LEARNING_RATES = (0.5, 2.0) if FAST else (0.2, 0.5, 1.0)
TOP_ITERS = 20 if FAST else 30      # Lanczos steps for λmax
SLQ_ITERS, SLQ_PROBES = (30, 1) if FAST else (90, 4)
xent = curvature.losses.softmax_cross_entropy

mnist1d = datasets.make_mnist1d()
batch = {"inputs": jnp.asarray(mnist1d.train_inputs[:N_TRAIN], jnp.float64),
         "targets": jnp.asarray(mnist1d.train_labels[:N_TRAIN])}


def init_mlp(key, sizes):
  """LeCun-normal weights and zero biases, one dict per layer."""
  layers = []
  for k, fan_in, fan_out in zip(jax.random.split(key, len(sizes) - 1), sizes,
                                sizes[1:]):
    layers.append(dict(w=jax.random.normal(k, (fan_in, fan_out)) / np.sqrt(fan_in),
                       b=jnp.zeros(fan_out)))
  return layers


def mlp(params, batch):
  """tanh hidden layers, linear logits."""
  *hidden, last = params
  h = batch["inputs"]
  for layer in hidden:
    h = jnp.tanh(h @ layer["w"] + layer["b"])
  return h @ last["w"] + last["b"]


def operator(params, data, kind):
  """``v ↦ Cv`` for C the Hessian or the GGN of the mean cross-entropy."""
  return curvature.linearize(mlp, xent, params, data, curvature=kind).matvec


params0 = init_mlp(jax.random.key(0), SIZES)
NUM_PARAMS = sum(p.size for p in jax.tree.leaves(params0))
print(f"MNIST-1D: {N_TRAIN} training signals of length 40, 10 classes; "
      f"MLP {SIZES} (tanh), {NUM_PARAMS} parameters")
'''),
("md", r"""
## Lanczos against the dense Hessian on a tiny network

Before trusting Lanczos on thousands of parameters, check it where the
Hessian fits in memory: a 40-4-10 network on 64 signals (a few hundred parameters),
a few gradient steps from initialization so that the Hessian is indefinite.
The dense oracle is `jnp.linalg.eigvalsh(jax.hessian(f))` on the flattened
parameters; the dense GGN is $\frac1N\sum_i J_i^\top(\operatorname{diag}p_i
- p_ip_i^\top)J_i$ from dense per-example Jacobians.
"""),
("code", r'''
tiny_data = jax.tree.map(lambda x: x[:64], batch)
tiny_loss = lambda p: xent.value(mlp(p, tiny_data), tiny_data["targets"])
tiny = jax.jit(lambda p: jax.lax.fori_loop(  # 20 steps off the initialization
    0, 20, lambda _, p: jax.tree.map(lambda w, g: w - 0.5 * g, p,
                                     jax.grad(tiny_loss)(p)), p))(
    init_mlp(jax.random.key(1), (40, 4, 10)))
flat_tiny, unravel = ravel_pytree(tiny)
n_tiny = flat_tiny.size


@jax.jit
def dense_oracle(w):
  dense_h = jax.hessian(lambda w: tiny_loss(unravel(w)))(w)
  jac = jax.jacobian(lambda w: mlp(unravel(w), tiny_data))(w)  # [N, 10, n]
  prob = jax.nn.softmax(mlp(unravel(w), tiny_data))
  out_h = jax.vmap(lambda p: jnp.diag(p) - jnp.outer(p, p))(prob)
  dense_g = jnp.einsum("ika,ikl,ilb->ab", jac, out_h, jac) / jac.shape[0]
  return dense_h, jnp.linalg.eigvalsh(dense_h), jnp.linalg.eigvalsh(dense_g)


dense_h, eig_h, eig_g = dense_oracle(flat_tiny)



@jax.jit
def matrix_free(params):
  hvp = operator(params, tiny_data, "hessian")
  gvp = operator(params, tiny_data, "ggn")
  return (curvature.top_eigenpairs(hvp, params, k=3, num_iterations=40),
          curvature.top_eigenpairs(gvp, params, k=3, num_iterations=40),
          curvature.negative_curvature(hvp, params, num_iterations=n_tiny),
          curvature.ritz_values(curvature.lanczos(hvp, params, n_tiny)),
          curvature.hutchinson_trace(hvp, params, num_samples=400),
          curvature.spectral_density(hvp, params, num_iterations=n_tiny,
                                     num_probes=10))


top_h, top_g, neg, full, trace, slq = matrix_free(tiny)

rows = [("top-3 λ(H), Lanczos 40 steps", top_h.eigenvalues, eig_h[::-1][:3]),
        ("top-3 λ(G), Lanczos 40 steps", top_g.eigenvalues, eig_g[::-1][:3]),
        ("λmin(H), negative_curvature", neg.smallest, eig_h[0]),
        ("all λ(H), Lanczos n steps", full, eig_h)]
oracle = {"errors": {}}
for name, lanczos_value, exact in rows:
  err = float(jnp.max(jnp.abs(jnp.asarray(lanczos_value) - exact)))
  oracle["errors"][name] = err
  print(f"{name:30s} max |Lanczos − eigvalsh| = {err:.1e}   "
        f"(eigvalsh: {np.round(np.atleast_1d(exact)[:3], 5)})")
  np.testing.assert_allclose(lanczos_value, exact, atol=1e-8 * eig_h[-1])
oracle.update(
    trace=float(trace.trace), trace_se=float(trace.standard_error),
    exact_trace=float(jnp.trace(dense_h)),
    slq_negative=float(jnp.sum(slq.weights * (slq.nodes < -1e-9 * eig_h[-1])) / 10),
    exact_negative=float(jnp.mean(eig_h < -1e-9 * eig_h[-1])),
    ggn_min=float(eig_g[0]), ggn_max=float(eig_g[-1]), hessian_min=float(eig_h[0]))
print(f"Hutchinson trace (400 probes) {float(trace.trace):.4f} ± "
      f"{float(trace.standard_error):.4f};  exact tr H = {float(jnp.trace(dense_h)):.4f}")
tol = 1e-9 * eig_h[-1]  # below this, a "negative" eigenvalue is rounding
print(f"SLQ weight of Ritz values < 0 (10 probes) "
      f"{float(jnp.sum(slq.weights * (slq.nodes < -tol)) / 10):.3f};  exact "
      f"fraction of eigenvalues < 0: {int(jnp.sum(eig_h < -tol))}/{n_tiny} = "
      f"{float(jnp.mean(eig_h < -tol)):.3f}")
print(f"dense GGN: λmin = {float(eig_g[0]):.1e} "
      f"({'PSD to rounding' if eig_g[0] > -1e-12 * eig_g[-1] else 'NOT PSD'});  "
      f"dense Hessian: λmin/λmax = {float(eig_h[0] / eig_h[-1]):.4f} "
      f"({'indefinite' if eig_h[0] < -tol else 'PSD'})")
hutchinson_z = abs(oracle["trace"] - oracle["exact_trace"]) / oracle["trace_se"]
print(f"Hutchinson's estimate is {hutchinson_z:.1f} standard errors from the exact "
      f"trace; the SLQ negative weight {oracle['slq_negative']:.3f} against the exact "
      f"fraction {oracle['exact_negative']:.3f}.")
assert eig_g[0] > -1e-12 * eig_g[-1] and eig_h[0] < -tol
'''),
("md", r"""
Above, Lanczos with a few dozen steps is checked against `eigvalsh` on the
three largest eigenvalues of both matrices, and with $m = n$ steps (full
reorthogonalization) the Ritz values are the whole spectrum; the assertions
fail if any of them is off by more than $10^{-8}\lambda_{\max}$. Hutchinson's
estimate should lie within a few standard errors of the exact trace, and the
SLQ weight of negative nodes estimates the fraction of negative eigenvalues.

## Sharpness during full-batch gradient descent

Plain gradient descent, full batch, at several learning rates from the same
initialization. The optimizer is `optax.sgd` wrapped in
`curvature.monitor(..., curvature="hessian")`, which records at every step
the objective and $g^\top H g / g^\top g$, the curvature along the gradient
(one Hessian-vector product per step, inside the jitted `lax.scan`). Every
`EVERY` steps a Lanczos run (`curvature.lanczos`, `TOP_ITERS` steps) gives
$\lambda_{\max}(H)$ and $\lambda_{\min}(H)$, and `curvature.top_eigenpairs`
gives $\lambda_{\max}(G)$ of the GGN.
"""),
("code", r'''
def gd(lr):
  return curvature.monitor(optax.sgd(lr), mlp, xent, curvature="hessian")


@jax.jit
def run_chunk(params, opt_state, lr):
  """``EVERY`` gradient-descent steps; per-step loss, gᵀHg/gᵀg and gᵀg."""
  opt = gd(lr)
  objective = lambda p: xent.value(mlp(p, batch), batch["targets"])

  def step(carry, _):
    params, opt_state = carry
    updates, opt_state = opt.update(jax.grad(objective)(params), opt_state,
                                    params, batch=batch)
    metrics = opt_state.metrics
    return (optax.apply_updates(params, updates), opt_state), (
        metrics.objective_value, metrics.gradient_curvature,
        metrics.gradient_norm_squared)

  return jax.lax.scan(step, (params, opt_state), None, length=EVERY)


@jax.jit
def extremes(params, key):
  """λmax(H), λmin(H) from one Lanczos run; λmax(G) from top_eigenpairs."""
  flat, unravel_params = ravel_pytree(params)
  start = unravel_params(jax.random.normal(key, flat.shape))
  ritz = curvature.ritz_values(curvature.lanczos(
      operator(params, batch, "hessian"), start, TOP_ITERS))
  top_g = curvature.top_eigenpairs(operator(params, batch, "ggn"), params,
                                   num_iterations=TOP_ITERS, key=key)
  return ritz[-1], ritz[0], top_g.eigenvalues[0]


history, snapshots = {}, {}
progress = tqdm(total=len(LEARNING_RATES) * (STEPS // EVERY), mininterval=10,
                desc="GD chunks")
for lr in LEARNING_RATES:
  params, opt_state = params0, gd(lr).init(params0)
  losses, along, gnorm, sharp = [], [], [], []
  for i in range(STEPS // EVERY):
    progress.update()
    sharp.append([float(v) for v in extremes(params, jax.random.key(i))])
    if i == STEPS // EVERY // 3:
      snapshots[lr, "middle"] = (i * EVERY, params)
    (params, opt_state), (loss, curv, gg) = run_chunk(params, opt_state, lr)
    losses.append(np.asarray(loss))
    along.append(np.asarray(curv))
    gnorm.append(np.asarray(gg))
  snapshots[lr, "end"] = (STEPS, params)
  history[lr] = {"loss": np.concatenate(losses),
                 "along": np.concatenate(along),      # gᵀHg/gᵀg
                 "gnorm": np.concatenate(gnorm),      # gᵀg
                 "sharp": np.asarray(sharp)}   # columns λmax H, λmin H, λmax G
  h = history[lr]
  peak = h["sharp"][:, 0].argmax()
  progress.write(
      f"η = {lr}: 2/η = {2 / lr:.2f}; λmax(H) {h['sharp'][0, 0]:.2f} at "
      f"step 0 → peak {h['sharp'][peak, 0]:.2f} at step {peak * EVERY} → "
      f"{h['sharp'][-1, 0]:.3f} at step {STEPS - EVERY}; loss "
      f"{h['loss'][0]:.3f} → {h['loss'][-1]:.4f}")
progress.close()
'''),
("code", r'''
steps = np.arange(STEPS)
checkpoints = np.arange(0, STEPS, EVERY)


def second_order_share(lr, h):
  """η/2 · gᵀHg/gᵀg: the quadratic model's second-order term over the first.

  One GD step changes f by ≈ −η gᵀg (1 − η/2 · gᵀHg/gᵀg); a share above 1
  means the curvature term eats the whole first-order decrease.
  """
  return lr / 2 * h["along"]


fig, axes = plt.subplots(2, 2, figsize=(15, 9))
(ax_loss, ax_sharp), (ax_along, ax_gnorm) = axes
for c, lr in enumerate(LEARNING_RATES):
  h = history[lr]
  ax_loss.semilogy(steps, h["loss"], f"C{c}-", label=f"η = {lr}")
  ax_sharp.plot(checkpoints, h["sharp"][:, 0], f"C{c}.-", label=f"λmax(H), η = {lr}")
  ax_sharp.plot(checkpoints, h["sharp"][:, 2], f"C{c}x", markersize=4)
  ax_sharp.axhline(2 / lr, color=f"C{c}", linestyle="--", linewidth=1)
  ax_along.semilogy(steps, h["along"], f"C{c}-", linewidth=0.7, alpha=0.8)
  ax_along.semilogy(checkpoints, h["sharp"][:, 0], f"C{c}--", linewidth=1)
  ax_gnorm.semilogy(steps, h["gnorm"], f"C{c}-", linewidth=0.8, label=f"η = {lr}")
  eaten = second_order_share(lr, h) > 1
  ax_gnorm.semilogy(steps[eaten], h["gnorm"][eaten], f"C{c}o", markersize=4,
                    markerfacecolor="none")
ax_loss.set(title="training loss (full batch)", xlabel="step")
ax_sharp.set(title="sharpness λmax(H) (dots), λmax(GGN) (×), 2/η (dashed)",
             xlabel="step", ylim=(0, 1.15 * max(2 / min(LEARNING_RATES),
                                                max(history[lr]["sharp"][:, 0].max()
                                                    for lr in LEARNING_RATES))))
ax_along.set(title="curvature along the gradient gᵀHg/gᵀg (monitor) vs λmax(H) (dashed)",
             xlabel="step")
ax_gnorm.set(title="gᵀg (monitor); ○: steps with η/2·gᵀHg/gᵀg > 1", xlabel="step")
ax_loss.legend()
ax_sharp.legend(fontsize=8)
ax_gnorm.legend()
fig.tight_layout()
fig.savefig("figures/07_sharpness.png", dpi=110)
plt.show()

for lr in LEARNING_RATES:
  h = history[lr]
  above = h["sharp"][:, 0] > 2 / lr
  ratio = h["along"][::EVERY] / h["sharp"][:, 0]  # at the checkpoints
  print(f"η = {lr}: λmax(H) > 2/η at {above.sum()} of {len(above)} checkpoints; "
        f"steps where the loss went up: {(np.diff(h['loss']) > 0).sum()}; "
        f"gᵀHg/gᵀg ÷ λmax(H): median {np.median(ratio):.3f}, max "
        f"{ratio.max():.2f}; "
        f"λmax(GGN)/λmax(H) at the end {h['sharp'][-1, 2] / h['sharp'][-1, 0]:.3f}")
  if above.any():
    jump = np.diff(h["loss"]).argmax()
    print(f"   above 2/η first at step {above.argmax() * EVERY}, last at step "
          f"{(len(above) - 1 - above[::-1].argmax()) * EVERY}; largest loss "
          f"increase at step {jump}: {h['loss'][jump]:.3f} → "
          f"{h['loss'][jump + 1]:.3f}")
'''),
("md", r"""
### What the run shows

The next cell reads the run and prints its findings, each one computed from
`history` (sharpness every `EVERY` steps with `TOP_ITERS` Lanczos steps, a
lower bound on $\lambda_{\max}$). It classifies each learning rate:

* **classical stable regime** if $\lambda_{\max}(H)$ never reaches $2/\eta$;
  *progressive sharpening* if it nevertheless grows well above its initial
  value;
* **edge of stability** (Cohen et al. 2021) if the sharpness crosses $2/\eta$
  and then stays near it while the loss keeps falling overall but not
  monotonically;
* a **catapult** (Lewkowycz, Bahri, Dyer, Sohl-Dickstein & Gur-Ari, *The
  large learning rate phase of deep learning: the catapult mechanism*, 2020)
  if the largest loss spike happens during the unstable phase and the
  sharpness is below $2/\eta$ for good afterwards.

It also checks the late-training behaviour with cross-entropy: as the fit
improves the softmax saturates, $\operatorname{diag}p - pp^\top \to 0$, and
the sharpness can fall far below $2/\eta$ (Cohen et al. report this for
cross-entropy). If that happens, the bound $\eta < 2/\lambda_{\max}$ of the
seeds is a level the sharpness adapts to, not a constraint GD respects
locally.

**What the monitor's two numbers say together.** Along the step
$-\eta g$ the quadratic model predicts
$f(\theta - \eta g) - f(\theta) \approx -\eta\, g^\top g\,
\bigl(1 - \tfrac{\eta}{2}\, g^\top H g / g^\top g\bigr)$: $g^\top g$ sets the
size of the first-order decrease, and $\tfrac\eta2 g^\top Hg/g^\top g$ the
share of it that the second-order term eats. When the curvature along the
gradient grows while $g^\top g$ stays flat, progress stalls and, past a share
of 1, the loss goes up. The cell measures how often that sign prediction is
right and what $g^\top g$ and $g^\top Hg/g^\top g$ did before the largest
loss increase.
"""),
("code", r'''
def describe_run(lr, h):
  """Prints what the run at step size ``lr`` shows; returns the key numbers."""
  sharp, ggn = h["sharp"][:, 0], h["sharp"][:, 2]
  limit = 2 / lr
  above = sharp > limit
  peak = int(sharp.argmax())
  rises = np.diff(h["loss"]) > 0
  jump = int(np.diff(h["loss"]).argmax())
  out = dict(initial=sharp[0], peak=sharp[peak], peak_step=peak * EVERY,
             final=sharp[-1], above=bool(above.any()), rises=int(rises.sum()),
             ggn_ratio_end=ggn[-1] / sharp[-1])
  growth = sharp[peak] / sharp[0]
  out["sharpening"] = growth > 1.5
  print(f"η = {lr} (2/η = {limit:.2f}):")
  print(f"  • progressive sharpening {'yes' if out['sharpening'] else 'no'}: "
        f"λmax(H) {sharp[0]:.2f} at step 0 → {sharp[peak]:.2f} at step "
        f"{peak * EVERY} (×{growth:.1f}).")
  if not above.any():
    print(f"  • λmax(H) never reaches 2/η (at most {sharp.max() / limit:.0%} of it); "
          f"the loss went up at {rises.sum()} of {len(rises)} steps: classical "
          f"stable regime.")
  else:
    first, last = int(above.argmax()), int(len(above) - 1 - above[::-1].argmax())
    out.update(first=first * EVERY, last=last * EVERY)
    during = sharp[first:last + 1]
    hover = np.median(during / limit)
    out["hover"] = hover
    print(f"  • λmax(H) crosses 2/η at step {first * EVERY} and is above it at "
          f"{above.sum()} checkpoints up to step {last * EVERY}; between those "
          f"steps it ranges over {during.min():.2f}–{during.max():.2f} (median "
          f"{hover:.2f} × 2/η) while the loss falls from {h['loss'][first * EVERY]:.3f} "
          f"to {h['loss'][min((last + 1) * EVERY, STEPS - 1)]:.3f}, going up at "
          f"{rises[first * EVERY:(last + 1) * EVERY].sum()} of those steps: "
          + ("edge of stability (Cohen et al. 2021) reproduced."
             if hover < 1.5 and h["loss"][min((last + 1) * EVERY, STEPS - 1)]
             < h["loss"][first * EVERY] else
             "edge of stability NOT reproduced (sharpness far above 2/η or "
             "loss not decreasing)."))
    after = sharp[last + 1:]
    # A catapult: the largest spike ends the unstable phase, and the sharpness
    # stays below 2/η afterwards.
    catapult = ((last - 2) * EVERY <= jump <= (last + 1) * EVERY
                and after.size > 0 and bool((after < limit).all()))
    out["catapult"] = catapult
    print(f"  • largest loss increase at step {jump}: {h['loss'][jump]:.3f} → "
          f"{h['loss'][jump + 1]:.3f}; "
          + (f"after step {last * EVERY} λmax(H) "
             + ("stays below 2/η" if (after < limit).all() else
                "crosses 2/η again")
             + f" (median {np.median(after[:10]):.2f} over the next "
             f"{min(after.size, 10)} checkpoints), "
             if after.size else "the run ends above 2/η, ")
          + ("a catapult in the sense of Lewkowycz et al. (2020)."
             if catapult else "no catapult-like exit from the unstable phase."))
  out["late_drop"] = sharp[-1] < 0.5 * sharp[peak]
  print(f"  • at step {STEPS - EVERY} λmax(H) = {sharp[-1]:.3f}, "
        f"{sharp[-1] / sharp[peak]:.0%} of its peak and {sharp[-1] / limit:.0%} "
        f"of 2/η: " + ("the sharpness falls late in training."
                       if out["late_drop"] else "no late drop."))
  print(f"  • λmax(GGN)/λmax(H): {ggn[-1] / sharp[-1]:.3f} at the end, "
        f"{(ggn / sharp).min():.3f}–{(ggn / sharp).max():.3f} over the run.")

  # The monitor: gᵀHg/gᵀg against λmax at the checkpoints (same parameters),
  # a checkpoint being unstable if λmax > 2/η or the loss rises in its chunk.
  relative = h["along"][::EVERY] / sharp
  unstable = above | np.append(rises, False).reshape(-1, EVERY).any(axis=1)
  out["stable_relative"] = relative[~unstable]  # may be empty
  out["unstable_relative"] = relative[unstable]
  stable = relative[~unstable] if (~unstable).any() else np.full(1, np.nan)
  print(f"  • gᵀHg/gᵀg ÷ λmax(H) at the checkpoints: median {np.median(stable):.1e} "
        f"(10–90 %: {np.quantile(stable, 0.1):.1e}–"
        f"{np.quantile(stable, 0.9):.1e}) at the "
        f"{(~unstable).sum()} stable checkpoints"
        + (f"; up to {relative[unstable].max():.2f} at the {unstable.sum()} "
           f"unstable ones (λmax > 2/η or the loss rising in the next {EVERY} "
           f"steps)." if unstable.any() else "; no unstable checkpoint."))
  share = second_order_share(lr, h)[:-1]
  predicted_rise = share > 1
  agree = np.mean(predicted_rise == rises)
  out.update(agree=agree, eaten=int(predicted_rise.sum()),
             eaten_and_rose=int((predicted_rise & rises).sum()))
  print(f"  • gᵀg falls from {h['gnorm'][0]:.2e} to {h['gnorm'][-1]:.2e} "
        f"({np.log10(h['gnorm'][0] / h['gnorm'][-1]):.1f} decades). The "
        f"second-order share η/2·gᵀHg/gᵀg exceeds 1 at {predicted_rise.sum()} "
        f"steps, the loss rose at {(predicted_rise & rises).sum()} of them and at "
        f"{rises.sum()} steps in all; the quadratic model's sign of the loss "
        f"change is right at {agree:.1%} of steps.")
  if rises.any():
    before = slice(max(jump - EVERY, 0), jump + 1)
    g_change = h["gnorm"][before][-1] / h["gnorm"][before][0]
    c_change = h["along"][before][-1] / h["along"][before][0]
    out.update(g_change=g_change, c_change=c_change)
    crossed = share[before.start] < 1 <= share[jump]
    out["crossed"] = crossed
    g_trend = ("stayed flat (within ×3)" if 1 / 3 < g_change < 3 else
               "grew" if g_change >= 3 else "fell")
    print(f"  • over the {jump - before.start} steps before the largest loss "
          f"increase (step {jump}) gᵀHg/gᵀg changed ×{c_change:.2g} (share "
          f"{share[before.start]:.2f} → {share[jump]:.2f}) while gᵀg changed "
          f"×{g_change:.2g}: "
          + (f"the share crossed 1 while gᵀg {g_trend}, so the second-order "
             "term ate the whole first-order decrease." if crossed else
             "the share was already above 1." if share[before.start] >= 1 else
             "the share stayed below 1: this increase is beyond the quadratic "
             "model along g."))
    # The build-up before the spike: a longer window that ends where it starts.
    build = slice(max(before.start - 10 * EVERY, 0), before.start + 1)
    if build.stop - build.start > EVERY:
      c_build = h["along"][build][-1] / h["along"][build][0]
      g_build = h["gnorm"][build][-1] / h["gnorm"][build][0]
      out["build_up"] = c_build > 2 and 1 / 3 < g_build < 3
      out.update(c_build=c_build, g_build=g_build)
      print(f"  • before that, from step {build.start} to step {build.stop - 1}, "
            f"gᵀHg/gᵀg changed ×{c_build:.2g} while gᵀg changed ×{g_build:.2g}: "
            + ("the curvature along g grew while gᵀg stayed flat (within ×3), "
               "the build-up the monitor is meant to catch."
               if out["build_up"] else
               "not the 'curvature grows while gᵀg stays flat' build-up."))
  return out


findings = {lr: describe_run(lr, history[lr]) for lr in LEARNING_RATES}
'''),
("md", r"""
## The spectrum at initialization, in the middle and at the end

For the middle learning rate, stochastic Lanczos quadrature
(`curvature.spectral_density`, `SLQ_ITERS` steps, `SLQ_PROBES` Rademacher
probes) of the Hessian and of the GGN at three points of the run, broadened
by Gaussians and drawn on a log scale by `curvature.plot_spectral_density`
(PyHessian's convention). Each Ritz node carries a weight; the weight of the
negative nodes estimates the fraction of negative eigenvalues. Alongside:
the twelve largest eigenvalues (`curvature.top_eigenpairs`, to look for
one outlier per class), the most negative one (`curvature.negative_curvature`),
and the trace from Hutchinson's estimator against the SLQ trace
$n\,\frac1P\sum_{p,k} w_{pk}\theta_{pk}$.
"""),
("code", r'''
LR = LEARNING_RATES[len(LEARNING_RATES) // 2]
points = {"initialization": (0, params0),
          "middle": snapshots[LR, "middle"], "end": snapshots[LR, "end"]}


@functools.partial(jax.jit, static_argnums=1)
def spectrum(params, kind):
  matvec = operator(params, batch, kind)
  density = curvature.spectral_density(
      matvec, params, num_iterations=SLQ_ITERS, num_probes=SLQ_PROBES,
      key=jax.random.key(7))
  top = curvature.top_eigenpairs(matvec, params, k=12,
                                 num_iterations=3 * TOP_ITERS)
  low = curvature.negative_curvature(matvec, params,
                                     num_iterations=3 * TOP_ITERS)
  trace = curvature.hutchinson_trace(matvec, params,
                                     num_samples=HUTCHINSON_SAMPLES)
  return density, top.eigenvalues, low.smallest, trace


HUTCHINSON_SAMPLES = 10 if FAST else 50
spectra = {}
fig, axes = plt.subplots(1, 3, figsize=(18, 4.6))
for ax, (title, (step, params)) in zip(axes, tqdm(points.items(),
                                                  desc="spectra")):
  for c, (kind, label) in enumerate((("hessian", "Hessian"), ("ggn", "GGN"))):
    density, top, smallest, trace = spectrum(params, kind)
    assert bool(density.finite)
    curvature.plot_spectral_density(density, ax, label=label, color=f"C{c}",
                                    linewidth=1)
    negative = float(jnp.sum(density.weights * (density.nodes < 0))) / SLQ_PROBES
    neg_mass = float(jnp.sum(density.weights * jnp.minimum(density.nodes, 0)))
    pos_mass = float(jnp.sum(density.weights * jnp.maximum(density.nodes, 0)))
    slq_trace = NUM_PARAMS * (pos_mass + neg_mass) / SLQ_PROBES
    spectra[title, label] = dict(
        step=step, top=np.asarray(top), smallest=float(smallest),
        min_node=float(jnp.min(density.nodes)), negative_weight=negative,
        negative_share=abs(neg_mass) / (pos_mass - neg_mass),
        trace=float(trace.trace), trace_se=float(trace.standard_error),
        slq_trace=slq_trace)
    print(f"{title} (step {step}), {label}: top-12 "
          f"{np.round(np.asarray(top), 2)}\n   λmin ≤ {float(smallest):+.4f}; "
          f"SLQ weight at λ<0 {negative:.3f}, |negative| share of Σ|λ| "
          f"{abs(neg_mass) / (pos_mass - neg_mass):.3f}; trace: Hutchinson "
          f"{float(trace.trace):.1f} ± {float(trace.standard_error):.1f}, "
          f"SLQ ({SLQ_PROBES} probes) {slq_trace:.1f}")
  ax.axvline(0, color="k", linewidth=0.5)
  ax.set_title(f"η = {LR}, {title} (step {step})")
  ax.legend()
fig.tight_layout()
fig.savefig("figures/07_spectral_density.png", dpi=110)
plt.show()
'''),
("md", r"""
### What the spectra show

The next cell reads `spectra` and prints, for the three checkpoints:

* whether the GGN is PSD as Martens (2020) says of Gauss-Newton matrices (no
  Ritz node and no `negative_curvature` value below zero beyond rounding),
  and the Hessian's negative tail ($\lambda_{\min}$, its size relative to
  $\lambda_{\max}$ and the share of $\sum|\lambda|$ it carries);
* the SLQ weight at negative nodes. It is a rough count only: a few dozen
  quadrature nodes cannot split a narrow cluster of eigenvalues around zero,
  so one node slightly below zero can carry the weight of eigenvalues of
  both signs (on the tiny network, with $m = n$, the same statistic is
  compared with the exact fraction above);
* where the Hessian and the GGN differ: the residual term
  $H - G = \frac1N\sum_i\sum_k (p_{ik} - y_{ik})\nabla^2 z_{ik}$ shows up in
  the traces and in the negative tail, while the tops of the two spectra may
  nearly coincide;
* **bulk and outliers**: whether the top twelve eigenvalues have a clear gap
  after the tenth (one outlier per class, Sagun et al. 2017; Papyan 2019), or
  where their largest gap is;
* whether the SLQ trace (itself a Hutchinson estimate with `SLQ_PROBES`
  probes) agrees with the Hutchinson estimate within the larger error of
  the smaller probe count.
"""),
("code", r'''
order = list(points)
print(f"η = {LR}; checkpoints: " + ", ".join(
    f"{t} = step {spectra[t, 'Hessian']['step']}" for t in order))
ggn_psd = {}
for t in order:
  g, hess = spectra[t, "GGN"], spectra[t, "Hessian"]
  tol = 1e-6 * g["top"][0]
  ggn_psd[t] = g["min_node"] > -tol and g["smallest"] > -tol
  print(f"• {t}: GGN lowest Ritz node {g['min_node']:+.1e}, λmin ≤ "
        f"{g['smallest']:+.1e} ({'PSD to rounding' if ggn_psd[t] else 'NOT PSD'}); "
        f"Hessian λmin ≤ {hess['smallest']:+.4f} = {hess['smallest'] / hess['top'][0]:+.1%} "
        f"of λmax = {hess['top'][0]:.2f}, negative eigenvalues carry "
        f"{hess['negative_share']:.1%} of Σ|λ|.")
tails = [abs(spectra[t, "Hessian"]["smallest"]) for t in order]
print(f"• The Hessian's negative tail is "
      + ("largest at initialization" if int(np.argmax(tails)) == 0 else
         f"largest at the {order[int(np.argmax(tails))]} checkpoint")
      + f"; the GGN is PSD at {sum(ggn_psd.values())} of {len(order)} checkpoints.")
print(f"• SLQ weight at negative Hessian nodes: " + ", ".join(
    f"{spectra[t, 'Hessian']['negative_weight']:.2f}" for t in order)
      + f" ({SLQ_ITERS} nodes per probe; on the tiny network with m = n: "
      f"{oracle['slq_negative']:.3f} vs exact {oracle['exact_negative']:.3f}).")
for t in order:
  g, hess = spectra[t, "GGN"], spectra[t, "Hessian"]
  gap = (hess["trace"] - g["trace"]) / np.hypot(hess["trace_se"], g["trace_se"])
  print(f"• {t}: tr H = {hess['trace']:.1f} ± {hess['trace_se']:.1f}, tr G = "
        f"{g['trace']:.1f} ± {g['trace_se']:.1f} (Hutchinson, {HUTCHINSON_SAMPLES} "
        f"probes; difference {gap:+.1f} standard errors); λmax(G)/λmax(H) = "
        f"{g['top'][0] / hess['top'][0]:.3f}.")
per_class = {}
for t in order:
  top = spectra[t, "Hessian"]["top"]
  gaps = top[:-1] / top[1:]
  biggest = int(gaps.argmax())
  per_class[t] = biggest == 9 and gaps[9] > 1.5
  print(f"• {t}: Hessian top-12 {np.round(top, 2)}; largest gap λ{biggest + 1}/"
        f"λ{biggest + 2} = {gaps[biggest]:.2f}, gap after the 10th "
        f"{gaps[9]:.2f}: one outlier per class "
        + ("reproduced." if per_class[t] else "not reproduced."))
for t in order:
  for label in ("Hessian", "GGN"):
    s = spectra[t, label]
    se_slq = s["trace_se"] * np.sqrt(HUTCHINSON_SAMPLES / SLQ_PROBES)
    print(f"• {t}, {label}: SLQ trace {s['slq_trace']:.1f} vs Hutchinson "
          f"{s['trace']:.1f}: {abs(s['slq_trace'] - s['trace']) / se_slq:.1f} "
          f"standard errors of a {SLQ_PROBES}-probe estimate.")

# Claims that hold in every mode (CI runs the fast one).
assert all(ggn_psd.values()), "the GGN must have no negative eigenvalue"
init = spectra["initialization", "Hessian"]
assert init["smallest"] < -1e-3 * init["top"][0], "H is indefinite at init"
'''),
("md", r"""
## Conclusions

The conclusions below are printed from the values computed above; the
interpretation they attach (a claim reproduced or not) follows from the
comparisons in the code.
"""),
("code", r'''
stable_lrs = [lr for lr in LEARNING_RATES if not findings[lr]["above"]]
eos_lrs = [lr for lr in LEARNING_RATES if findings[lr]["above"]]
lines = []
lines.append(
    "The matrix-free tools agree with the dense oracle on a "
    f"{n_tiny}-parameter network: largest |Lanczos − eigvalsh| "
    f"{max(oracle['errors'].values()):.0e} over the top-3 eigenvalues of H and "
    f"of the GGN, λmin(H) from negative_curvature and all {n_tiny} Ritz values "
    f"of an n-step Lanczos run.")
sharpening = [lr for lr in LEARNING_RATES if findings[lr]["sharpening"]]
lines.append(
    "Progressive sharpening: "
    + ("; ".join(f"η = {lr}: λmax {findings[lr]['initial']:.2f} → "
                 f"{findings[lr]['peak']:.2f} at step {findings[lr]['peak_step']}"
                 for lr in sharpening) if sharpening else "not observed")
    + ". "
    + (f"Edge of stability (λmax crosses 2/η and stays near it, median "
       + ", ".join(f"{findings[lr]['hover']:.2f}" for lr in eos_lrs)
       + f" × 2/η, for η = {', '.join(map(str, eos_lrs))}), with the loss "
       "decreasing non-monotonically; "
       + (f"the unstable phase ends catapult-like for η = "
          + ", ".join(str(lr) for lr in eos_lrs if findings[lr]["catapult"])
          if any(findings[lr]["catapult"] for lr in eos_lrs) else
          "no catapult-like exit")
       + ". The seeds' condition η < 2/λmax describes the ceiling the "
       "sharpness settles at, not a precondition GD obeys."
       if eos_lrs else "No learning rate reached 2/η: no edge of stability.")
    + (f" For η = {', '.join(map(str, stable_lrs))} the sharpness stays below "
       "2/η: the classical stable regime." if stable_lrs else ""))
dropped = [lr for lr in LEARNING_RATES if findings[lr]["late_drop"]]
lines.append(
    ("With cross-entropy the sharpness falls late in training for η = "
     + ", ".join(f"{lr} (to {findings[lr]['final']:.2f}, {findings[lr]['final'] * lr / 2:.0%} "
                 f"of 2/η)" for lr in dropped)
     + ": eigenvalues measured at one point describe only that point "
     "(Martens 2020)." if dropped else
     "The sharpness does not fall late in training in this run."))
ratios = [findings[lr]["ggn_ratio_end"] for lr in LEARNING_RATES]
init = spectra["initialization", "Hessian"]
lines.append(
    f"λmax(GGN) is {min(ratios):.2f}–{max(ratios):.2f} of λmax(H) at the end "
    f"of every run ({'from below' if max(ratios) <= 1 else 'not always from below'}),"
    f" but the GGN misses the negative tail: at initialization λmin(H) ≤ "
    f"{init['smallest']:.3f} and the negative eigenvalues carry "
    f"{init['negative_share']:.0%} of Σ|λ|, while the GGN is PSD at "
    f"{sum(ggn_psd.values())} of {len(ggn_psd)} checkpoints.")
stable_rel = np.concatenate([findings[lr]["stable_relative"] for lr in LEARNING_RATES])
unstable_max = [findings[lr]["unstable_relative"].max() for lr in eos_lrs
                if findings[lr]["unstable_relative"].size]
lines.append(
    f"gᵀHg/gᵀg from curvature.monitor is {np.quantile(stable_rel, 0.1):.0e}–"
    f"{np.quantile(stable_rel, 0.9):.0e} of λmax (10–90 %) while training is "
    "stable"
    + (" and reaches " + "–".join(sorted({f"{min(unstable_max):.2f}",
                                           f"{max(unstable_max):.2f}"}))
       + " λmax in the unstable episodes: a cheap warning light."
       if unstable_max else "."))
lines.append(
    "gᵀg and gᵀHg/gᵀg together: the quadratic model's sign of the loss change "
    "is right at " + ", ".join(f"{findings[lr]['agree']:.0%}" for lr in LEARNING_RATES)
    + f" of steps for η = {', '.join(map(str, LEARNING_RATES))}; the loss rose at "
    + ", ".join(f"{findings[lr]['eaten_and_rose']}/{findings[lr]['eaten']}"
                for lr in LEARNING_RATES)
    + " of the steps where η/2·gᵀHg/gᵀg > 1 (the second-order term eats the "
    "whole first-order decrease)."
    + "".join(f" Before the largest loss increase at η = {lr}, gᵀHg/gᵀg changed "
              f"×{findings[lr]['c_change']:.2g} and gᵀg ×{findings[lr]['g_change']:.2g}"
              + (", the share crossing 1" if findings[lr]["crossed"] else "")
              + (f"; in the {10 * EVERY} steps before, gᵀHg/gᵀg grew "
                 f"×{findings[lr]['c_build']:.2g} while gᵀg stayed flat "
                 f"(×{findings[lr]['g_build']:.2g})"
                 if findings[lr].get("build_up") else "") + "."
              for lr in LEARNING_RATES if "c_change" in findings[lr]))
lines.append(
    f"Caveats: one seed, one {SIZES} network on {N_TRAIN} examples for {STEPS} "
    f"steps; sharpness sampled every {EVERY} steps with {TOP_ITERS} Lanczos "
    f"steps (a lower bound); SLQ with {SLQ_ITERS} nodes and {SLQ_PROBES} probes."
    + (" Fast mode (CI): a smaller network and shorter run than the committed "
       "full-mode outputs." if FAST else ""))
for i, line in enumerate(lines, 1):
  print(f"{i}. {line}")
'''),
]
