"""Cells of notebook 10: how well each preconditioner fits the curvature."""

CELLS = [
    ("md", r"""
# 10 · How good is my preconditioner?

Every optimizer in `curvature` multiplies the gradient by the inverse of a
curvature model `P`: `P = I` for gradient descent, a diagonal for Adam and
the diagonal Fisher, dense blocks for the block-diagonal natural gradient,
Kronecker factors for K-FAC, EKFAC, Shampoo and SOAP. How well `P` fits the
damped curvature `A = C + λI` (here `C` is the Gauss-Newton matrix, the GGN)
is measured by the spectrum of

$$S = P^{-1/2} (C + \lambda I) P^{-1/2}.$$

Its condition number κ(S) is what preconditioned gradient descent
(contraction `(κ−1)/(κ+1)` per step on the quadratic model) and preconditioned
CG (`√κ`) pay; κ = 1 means `P` is `A` up to a scale. A second measure is the
**direction cosine** `cos∠(P⁻¹g, A⁻¹g)` between the preconditioned gradient
and the damped Newton step (found by CG): 1 means the optimizer steps along
the Newton direction.

`curvature.preconditioned_spectrum(matvec, precondition, params, ...)`
computes κ, the extreme eigenvalues, an SLQ density of `S` and the cosine by
Lanczos on `P⁻¹A` in the `P`-inner product (no square root of `P`). The
`precondition` function `v ↦ P⁻¹v` comes from each optimizer's own state:
`identity_preconditioner`, `adam_preconditioner`, `diagonal_preconditioner`,
`block_diagonal_preconditioner`, `kfac_preconditioner` (K-FAC and EKFAC),
`shampoo_preconditioner` and `soap_preconditioner`.

**The experiment.** A CURVES-like autoencoder (the architecture of Hinton &
Salakhutdinov 2006 and Martens 2010, shrunk so that this notebook runs in
minutes on a laptop CPU: 784-200-50-6-50-200-784, sigmoid units, a linear
6-unit code, sigmoid cross-entropy summed over pixels, Martens' sparse
initialization) is trained with Adam on CURVES-like images
(`curvature.datasets.make_curves`). At three points of training (init, early
and later) we look at

1. the per-layer top eigenvalue and trace of the GGN (`blocks="layers"`):
   which layers are stiff;
2. κ and the direction cosine of each preconditioner, each built from its
   optimizer's state after a few updates on the same batches at those
   parameters (Adam's second moment is the one of the training run);
3. the preconditioned spectral densities, side by side.

Set `CURVATURE_FAST=1` for the fast mode (CI): a tiny network and data.
"""),
    ("code", SETUP),
    ("code", r"""
import pathlib
import sys
import time

jax.config.update("jax_enable_x64", False)  # float32, as one trains
os.environ["TQDM_MININTERVAL"] = "15"  # a progress line every 15 s at most
LOSS = curvature.losses.sigmoid_binary_cross_entropy

LAYERS = (784, 16, 6, 16, 784) if FAST else (784, 200, 50, 6, 50, 200, 784)
N_TRAIN = 256 if FAST else 2000
BATCH = 128 if FAST else 500            # Adam's and the optimizers' batches
CURVATURE_BATCH = 128 if FAST else 500  # the batch the GGN is measured on
CHECKPOINTS = (0, 60) if FAST else (0, 200, 1000)  # Adam steps
ADAM_LR = 3e-3
WARM_STEPS = 2 if FAST else 5  # updates that populate each state
DAMPING = 1e-3                  # λ, the same for A and every P
LANCZOS_ITERS = 12 if FAST else 30
PROBES = 1 if FAST else 2
TRACE_SAMPLES = 4 if FAST else 20
CG_ITERS = 50 if FAST else 200
print(f"autoencoder {'-'.join(map(str, LAYERS))} on {N_TRAIN} images; "
      f"checkpoints after {CHECKPOINTS} Adam steps; λ = {DAMPING:g}")
"""),
    ("code", r"""
ROOT_DIR = pathlib.Path(curvature.__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT_DIR / "benchmarks"))
# The benchmarks' autoencoder: sigmoid units except the linear code layer,
# and Martens' (2010) sparse initialization (15 incoming N(0, 1) weights).
from _common import autoencoder_predict as predict
from _common import sparse_params


def data_loss(params, batch):
    return LOSS.value(predict(params, batch), batch["targets"])


images = jnp.asarray(datasets.make_curves(N_TRAIN, 0, seed=0).train,
                     jnp.float32)
data = {"inputs": images, "targets": images}
params0 = sparse_params(0, LAYERS)
n_params = sum(x.size for x in jax.tree.leaves(params0))
print(f"{n_params:,} parameters")


def batch_at(step, size=BATCH):
    order = jax.random.choice(jax.random.key(step), N_TRAIN, (size,),
                              replace=False)
    return jax.tree.map(lambda x: x[order], data)


curvature_batch = batch_at(-1, CURVATURE_BATCH)
"""),
    ("md", r"""
## Training with Adam, keeping three checkpoints

Adam (`optax.adam`, learning rate 3·10⁻³) runs on random batches; at each
checkpoint we keep the parameters and Adam's state.
"""),
    ("code", r"""
adam = optax.adam(ADAM_LR)


@jax.jit
def adam_step(params, state, batch):
    loss, grads = jax.value_and_grad(data_loss)(params, batch)
    updates, state = adam.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss


params, adam_state = params0, adam.init(params0)
checkpoints, losses = {}, []
for step in tqdm(range(CHECKPOINTS[-1] + 1), desc="Adam"):
    if step in CHECKPOINTS:
        checkpoints[step] = (params, adam_state)
    if step < CHECKPOINTS[-1]:
        params, adam_state, loss = adam_step(params, adam_state,
                                             batch_at(step))
        losses.append(float(loss))
full_loss = {s: float(jax.jit(data_loss)(p, data))
             for s, (p, _) in checkpoints.items()}
for s, value in full_loss.items():
    print(f"step {s:5d}: training loss {value:.2f} (summed over pixels, "
          f"mean over images)")
"""),
    ("md", r"""
## 1 · Which layers are stiff? Per-layer spectra of the GGN

`top_eigenpairs(..., blocks="layers")` and `hutchinson_trace(...,
blocks="layers")` restrict the GGN to each layer's diagonal block (kernel and
bias, as K-FAC finds them) by masking tangents and cotangents, all blocks in
one compiled call.
"""),
    ("code", r"""
block_names = list(curvature.diagnostic_blocks(
    params0, "layers", predict_fn=predict, batch=curvature_batch))
print("blocks (layer index):", block_names)


@jax.jit
def layer_spectra(p, key):
    # One compiled program for every checkpoint (p is an argument).
    matvec = curvature.linearize(predict, LOSS, p, curvature_batch).matvec
    per_block = dict(blocks="layers", predict_fn=predict,
                     batch=curvature_batch)
    top = curvature.top_eigenpairs(matvec, p, k=1, key=key,
                                   num_iterations=LANCZOS_ITERS, **per_block)
    trace = curvature.hutchinson_trace(matvec, p, key=key, **per_block,
                                       num_samples=TRACE_SAMPLES)
    whole = curvature.top_eigenpairs(matvec, p, k=1, key=key,
                                     num_iterations=LANCZOS_ITERS)
    return top, trace, whole


per_layer = {}
for s in tqdm(CHECKPOINTS, desc="per-layer spectra"):
    top, trace, whole = layer_spectra(checkpoints[s][0], jax.random.key(s))
    per_layer[s] = {
        "top": {b: float(top[b].eigenvalues[0]) for b in block_names},
        "trace": {b: float(trace[b].trace) for b in block_names},
        "se": {b: float(trace[b].standard_error) for b in block_names},
        "whole": float(whole.eigenvalues[0]),
    }

header = f"{'layer':>12} " + " ".join(
    f"{'λmax@' + str(s):>11} {'tr@' + str(s):>11}" for s in CHECKPOINTS)
print(header)
for b in block_names:
    print(f"{b:>12} " + " ".join(
        f"{per_layer[s]['top'][b]:11.3g} {per_layer[s]['trace'][b]:11.3g}"
        for s in CHECKPOINTS))
print(f"{'whole GGN':>12} " + " ".join(
    f"{per_layer[s]['whole']:11.3g} {sum(per_layer[s]['trace'].values()):11.3g}"
    for s in CHECKPOINTS))
"""),
    ("code", r"""
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
x = np.arange(len(block_names))
width = 0.8 / len(CHECKPOINTS)
for j, s in enumerate(CHECKPOINTS):
    for ax, key in zip(axes, ("top", "trace")):
        ax.bar(x + (j - 1) * width, [per_layer[s][key][b] for b in block_names],
               width, label=f"step {s}")
for ax, title in zip(axes, ("top eigenvalue of the layer's GGN block",
                            "trace of the layer's GGN block (Hutchinson)")):
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{b}: {LAYERS[int(b)]}→{LAYERS[int(b) + 1]}"
                      for b in block_names], rotation=30, fontsize=8)
    ax.set_xlabel("layer (kernel and bias)")
    ax.set_title(title)
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig("figures/10_per_layer_ggn.png", dpi=100, bbox_inches="tight")
plt.show()
for s in CHECKPOINTS:
    top = per_layer[s]["top"]
    stiff = max(top, key=top.get)
    soft = min(top, key=top.get)
    print(f"step {s}: the stiffest layer is {stiff} (λmax {top[stiff]:.3g}, "
          f"{top[stiff] / per_layer[s]['whole']:.0%} of the whole GGN's "
          f"{per_layer[s]['whole']:.3g}); the softest is {soft} "
          f"({top[soft]:.3g}), a ratio of {top[stiff] / top[soft]:.3g}.")
"""),
    ("md", r"""
## 2 · κ and the direction cosine of each preconditioner

Each optimizer's state is built by running its own `update` for a few steps
at the checkpoint's parameters on the batches that precede the checkpoint
(the parameters are not moved), so its statistics are populated and its
inverses refreshed. The damping is the same λ everywhere: `A = C + λI`, and
λ is added to each curvature estimate (`P = D + λI` for the diagonal Fisher,
`(Ĉ_b + λI)` for the blocks, `γ² = λ` for K-FAC and EKFAC, `L + λI` and
`R + λI` for Shampoo, `√(ν̂ + λ)` for Adam, `√ŝ + √λ` for SOAP, whose
diagonal is a root). The scale of `P` does not change κ or the cosine. The
damped Newton step `A⁻¹g` is solved once per checkpoint by CG
(`curvature.conjugate_gradient`, its residual printed below), and each
preconditioner's cosine is taken against it.
"""),
    ("code", r"""
def ggn(p):
    return curvature.linearize(predict, LOSS, p, curvature_batch)


def kfac_opt(structure):
    return curvature.scale_by_kfac(predict, LOSS, structure=structure,
                                   initial_damping=DAMPING, inverse_every=1)


ROOT = float(np.sqrt(DAMPING))
# name: (optimizer whose state P comes from, whether its update takes the
#        batch, (state, params) -> P⁻¹)
KINDS = {
    "GD (identity)": (None, False,
                      lambda st, p: curvature.identity_preconditioner()),
    "Adam": (adam, False, lambda st, p: curvature.adam_preconditioner(
        st, eps=0.0, eps_root=DAMPING)),
    "diagonal Fisher": (
        curvature.ema_curvature_diagonal(predict, LOSS), True,
        lambda st, p: curvature.diagonal_preconditioner(st, damping=DAMPING)),
    "block-diagonal": (
        curvature.scale_by_block_diagonal(predict, LOSS, damping=DAMPING,
                                          curvature="sampled_fisher"), True,
        lambda st, p: curvature.block_diagonal_preconditioner(
            st, p, damping=DAMPING)),
    "K-FAC": (kfac_opt("kronecker"), True,
              lambda st, p: curvature.kfac_preconditioner(
                  st, predict, p, curvature_batch)),
    "EKFAC": (kfac_opt("eigen_kronecker"), True,
              lambda st, p: curvature.kfac_preconditioner(
                  st, predict, p, curvature_batch)),
    "Shampoo": (curvature.scale_by_shampoo(damping=DAMPING, inverse_every=1),
                False, lambda st, p: curvature.shampoo_preconditioner(
                    st, p, damping=DAMPING)),
    "SOAP": (curvature.scale_by_soap(eps=ROOT, inverse_every=1), False,
             lambda st, p: curvature.soap_preconditioner(st, p, eps=ROOT)),
}
NAMES = list(KINDS)


def warm_fn(opt, with_batch):
    # step -> the optimizer's state after WARM_STEPS updates at fixed
    # parameters, on the batches before `step` (one compiled update).
    update = jax.jit(lambda st, p, b: opt.update(
        jax.grad(data_loss)(p, b), st, p,
        **({"batch": b} if with_batch else {}))[1])

    def warm(p, step):
        state = opt.init(p)
        for i in range(WARM_STEPS):
            state = update(state, p, batch_at(step - WARM_STEPS + i))
        return state
    return warm


def measure_fn(make):
    # One compiled program per preconditioner kind, reused at every
    # checkpoint: parameters and state are arguments, not constants.
    @jax.jit
    def measure(p, state, key):
        lin = ggn(p)
        precondition = make(state, p)
        result = curvature.preconditioned_spectrum(
            lin.matvec, precondition, p, damping=DAMPING,
            num_iterations=LANCZOS_ITERS, num_probes=PROBES, key=key)
        return result, precondition(lin.grad)
    return measure


@jax.jit
def newton_step(p):
    # d = (C + λI)⁻¹ g by CG, once per checkpoint for every cosine.
    lin = ggn(p)
    solve = curvature.conjugate_gradient(
        lambda v: optax.tree.add_scale(lin.matvec(v), DAMPING, v), lin.grad,
        max_iterations=CG_ITERS, tol=1e-6, progress_tol=None)
    return solve.x, solve.residual_norm / optax.tree.norm(lin.grad)


def cos(a, b):
    return float(optax.tree.vdot(a, b)
                 / (optax.tree.norm(a) * optax.tree.norm(b)))


newton = {s: newton_step(checkpoints[s][0]) for s in CHECKPOINTS}
quality, cosines, failures, seconds = {}, {}, [], {}
for name, (opt, with_batch, make) in tqdm(KINDS.items(),
                                          desc="preconditioners"):
    measure = measure_fn(make)
    warm = warm_fn(opt, with_batch) if opt is not None else None
    for s in CHECKPOINTS:
        p, trained_adam = checkpoints[s]
        start = time.perf_counter()
        try:
            if opt is None:
                state = None
            elif name == "Adam" and s > 0:
                state = trained_adam  # Adam's state of the training run
            else:  # Adam at init: its trained state is still empty
                state = warm(p, s)
            result, step_direction = measure(p, state, jax.random.key(s))
            quality[s, name] = result
            cosines[s, name] = cos(step_direction, newton[s][0])
        except Exception as error:  # report and go on with the others
            failures.append((s, name, f"{type(error).__name__}: {error}"))
        seconds[s, name] = time.perf_counter() - start
for s, name, message in failures:
    print(f"FAILED at step {s}, {name}: {message[:300]}")
print(f"{len(quality)} of {len(CHECKPOINTS) * len(NAMES)} measurements "
      f"succeeded in {sum(seconds.values()):.0f} s")
"""),
    ("code", r"""
def kappa(s, name):
    r = quality.get((s, name))
    return float(r.condition_number) if r is not None else float("nan")


def cosine(s, name):
    return cosines.get((s, name), float("nan"))


print(f"{'preconditioner':>16} " + " ".join(
    f"{'κ@' + str(s):>10} {'cos@' + str(s):>7}" for s in CHECKPOINTS))
for name in NAMES:
    print(f"{name:>16} " + " ".join(
        f"{kappa(s, name):10.3g} {cosine(s, name):7.3f}"
        for s in CHECKPOINTS))
for s in CHECKPOINTS:
    print(f"step {s}: CG residual of the Newton step ‖g − Ad‖/‖g‖ = "
          f"{float(newton[s][1]):.1e} after at most {CG_ITERS} iterations")
not_finite = [k for k, r in quality.items() if not bool(r.finite)]
print("non-finite results:", not_finite or "none")
"""),
    ("code", r"""
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
x = np.arange(len(NAMES))
width = 0.8 / len(CHECKPOINTS)
for j, s in enumerate(CHECKPOINTS):
    axes[0].bar(x + (j - 1) * width, [kappa(s, n) for n in NAMES], width,
                label=f"step {s}")
    axes[1].bar(x + (j - 1) * width, [cosine(s, n) for n in NAMES], width,
                label=f"step {s}")
axes[0].set_yscale("log")
axes[0].set_title("κ of P^{-1/2}(C + λI)P^{-1/2}  (lower is better)")
axes[1].set_title("cos∠(P⁻¹g, (C + λI)⁻¹g)  (higher is better)")
for ax in axes:
    ax.set_xticks(x, NAMES, rotation=30, fontsize=8)
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig("figures/10_kappa_cosine.png", dpi=100, bbox_inches="tight")
plt.show()
"""),
    ("code", r"""
for s in CHECKPOINTS:
    measured = [n for n in NAMES if (s, n) in quality
                and np.isfinite(kappa(s, n))]
    if not measured:
        print(f"step {s}: no finite κ")
        continue
    best = min(measured, key=lambda n: kappa(s, n))
    aligned = max(measured, key=lambda n: cosine(s, n))
    line = (f"At step {s}, {best} has the smallest κ ({kappa(s, best):.3g})")
    for other in ("Adam", "GD (identity)"):
        if other in measured and other != best:
            line += (f", {kappa(s, other) / kappa(s, best):.3g}× below "
                     f"{other}'s ({kappa(s, other):.3g})")
    line += (f"; {aligned} points closest to the damped Newton step "
             f"(cosine {cosine(s, aligned):.3f}).")
    print(line)
    beats_gd = [n for n in measured if n != "GD (identity)"
                and kappa(s, n) < kappa(s, "GD (identity)")]
    print(f"  {len(beats_gd)} of {len(measured) - 1} preconditioners improve "
          f"on plain GD's κ: {', '.join(beats_gd) or 'none'}.")
residual = max(float(r) for _, r in newton.values())
if residual > 1e-2:
    print(f"Caveat: the CG step the cosines are taken against has a relative "
          f"residual up to {residual:.2g} ({CG_ITERS} CG iterations on an A "
          f"with κ up to {max(kappa(s, 'GD (identity)') for s in CHECKPOINTS):.2g}"
          f"), so cosines that differ by less than about that are not "
          f"distinguished.")
"""),
    ("md", r"""
## 3 · The preconditioned spectra side by side

The SLQ density of `S` for each preconditioner, on a log axis of `t/λmax(S)`
(so every panel ends at 1 and a good preconditioner is a narrow peak near
it; its left edge is at `1/κ`). Each Gauss-quadrature node is broadened by a
Gaussian in `log₁₀ t`; the weights are averaged over the probes.
"""),
    ("code", r"""
def log_density(result, grid, width=0.08):
    nodes = np.asarray(result.density.nodes, np.float64)
    weights = np.asarray(result.density.weights, np.float64) / len(nodes)
    top = float(result.largest)
    logs = np.log10(np.clip(nodes / top, 1e-12, None)).ravel()
    bumps = np.exp(-0.5 * ((grid[:, None] - logs[None]) / width) ** 2)
    return bumps @ weights.ravel() / (width * np.sqrt(2 * np.pi))


grid = np.linspace(-8, 0.3, 600)
fig, axes = plt.subplots(2, 4, figsize=(14, 5.5), sharex=True)
for ax, name in zip(axes.flat, NAMES):
    for s in CHECKPOINTS:
        if (s, name) in quality and bool(quality[s, name].finite):
            ax.plot(grid, log_density(quality[s, name], grid),
                    label=f"step {s} (κ {kappa(s, name):.2g})")
    ax.set_title(name, fontsize=10)
    ax.legend(fontsize=7)
for ax in axes[1]:
    ax.set_xlabel("log₁₀(t / λmax(S))")
fig.suptitle("Spectral density of P^{-1/2}(C + λI)P^{-1/2}")
fig.tight_layout()
fig.savefig("figures/10_preconditioned_densities.png", dpi=100,
            bbox_inches="tight")
plt.show()
"""),
    ("code", r"""
# Sanity checks that hold for any run (also in CI's fast mode).
assert quality, "no preconditioner could be measured"
for (s, name), r in quality.items():
    k = float(r.condition_number)
    assert bool(r.finite) and np.isfinite(k) and k >= 1 - 1e-3, (s, name, k)
    assert -1 - 1e-3 <= cosines[s, name] <= 1 + 1e-3, (s, name)
    for probe in np.asarray(r.density.weights):
        np.testing.assert_allclose(probe.sum(), 1.0, atol=1e-3)
for s in CHECKPOINTS:
    assert all(v > 0 for v in per_layer[s]["top"].values())
print(f"all {len(quality)} results finite with κ ≥ 1; "
      f"{len(failures)} failure(s) reported above")
"""),
    ("md", r"""
## Reading the results

The cells above print every figure from this run: which layer's block of the
GGN is stiffest at each checkpoint, and which preconditioner has the
smallest κ and the best-aligned direction. Two caveats on the measures:

* κ uses the extreme Ritz values of a few Lanczos runs: the largest is a
  lower bound on `λmax(S)` and the smallest an upper bound on `λmin(S)`, so
  κ is a lower bound that tightens with more iterations; the densities show
  the bulk, which governs how fast CG or gradient descent makes progress in
  practice, better than κ alone.
* Every `P` comes from its optimizer's *own* statistic, estimated on a few
  minibatches: the sampled Fisher (K-FAC, EKFAC, diagonal Fisher,
  block-diagonal) or the empirical Fisher (Adam's `g²`, Shampoo's and
  SOAP's `GGᵀ`), while `C` is the GGN on a larger batch. A poor κ can come
  from the structure (diagonal vs Kronecker vs blocks), from the statistic
  or from the power (−1/2 for Adam and SOAP, −1/4 per side for Shampoo,
  −1 for the natural-gradient family).

References: Martens & Grosse (2015), *Optimizing neural networks with
Kronecker-factored approximate curvature*; George et al. (2018), *Fast
approximate natural gradient descent in a Kronecker-factored eigenbasis*;
Gupta, Koren & Singer (2018), *Shampoo*; Vyas et al. (2024), *SOAP*; Kingma
& Ba (2015), *Adam*; Le Roux, Manzagol & Bengio (2008), *Topmoumoute online
natural gradient*; Martens (2020), *New insights and perspectives on the
natural gradient method*; Golub & Meurant (2010), *Matrices, Moments and
Quadrature*.
"""),
]
