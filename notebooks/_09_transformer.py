"""Cells of notebook 09: K-FAC, Shampoo and SOAP on a character-level LM."""

CELLS = [
    ("md", r"""
# 09 · K-FAC on a transformer: a character-level language model

K-FAC approximates each layer's Fisher block by a Kronecker product
`Ā ⊗ G` of the layer's input and output-gradient second moments. In a
transformer every kernel is applied at every position of the sequence (and
the token embedding twice: as a lookup and, tied, as the output layer), so
the layer sees `batch·seq` inputs per example batch. Eschenhagen et al.
(*Kronecker-factored approximate curvature for modern neural network
architectures*, NeurIPS 2023) give two ways to factor such a shared weight:

* **K-FAC-expand**: positions are examples, `Ā = E[a aᵀ]` over all
  `batch·seq` inputs;
* **K-FAC-reduce**: inputs are averaged and output gradients summed over the
  sequence first, `batch` rows only: `seq` times fewer rows to accumulate.

`curvature.kfac(..., weight_sharing="reduce" | "expand")` finds the layers
of a plain-JAX, linen or nnx transformer by tracing it (no registration).

**The experiment** (`benchmarks/transformer.py`, imported below: data, model
and training loops live there). The text is the source of Python's standard
library (the `.py` files next to `inspect`, sorted by name; nothing is
downloaded), one token per byte, the last 10% held out. A decoder-only
transformer with tied embeddings and two pre-LayerNorm blocks is trained with
the same batches and initialization by

* **AdamW** (`optax.adamw`, linear warmup and cosine decay from
  `optax.schedules`), each learning rate of a small grid: its lowest
  validation loss is the target;
* **K-FAC-reduce** and **K-FAC-expand** (momentum 0.9, the same schedule),
  **K-FAC-reduce grafted onto Adam** (`kfac_graft`: each layer takes
  K-FAC's direction at the norm of Adam's update, `graft=` of
  `curvature.kfac`, as Shampoo is grafted), **Shampoo** and **SOAP**, each
  learning rate of a small grid, stopping at the target; the best rate
  reaches it in the fewest steps.

The clock counts only the jitted training steps, compiled before timing; the
step-time ratios are medians of interleaved steps. Set `CURVATURE_FAST=1` for
the fast mode (CI): a smaller model, less text, a few steps, one learning
rate per row, and XLA compiling without optimizations (compile time
dominates such a short run). Its numbers say nothing about the optimizers.
"""),
    ("code", r"""
import os
os.environ["TQDM_MININTERVAL"] = "20"  # before tqdm is imported: few progress lines
if os.environ.get("CURVATURE_FAST") == "1":  # before jax is imported
  os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
"""),
    ("code", SETUP),
    ("code", r"""
import dataclasses
import pathlib
import sys

jax.config.update("jax_enable_x64", False)  # float32, as the benchmark
ROOT = pathlib.Path(curvature.__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import transformer as bench  # benchmarks/transformer.py: data, model, loops

config = bench.FAST if FAST else bench.Config()
data = bench.load_data(config)
params = bench.init_params(config)
print(f"{len(data['train']):,} training and {len(data['valid']):,} validation"
      f" characters from {data['folder']}")
print(f"model: {config.layers} blocks, d_model {config.dim}, {config.heads}"
      f" heads, seq {config.seq}, vocab {config.vocab}, tied embeddings;"
      f" {bench.num_params(params):,} parameters; batch {config.batch}")
print(f"machine: {bench.machine()}")
print("a validation window:")
print(bench.decode(data["valid"][1000:1000 + 3 * config.seq]))
"""),
    ("md", r"""
## What K-FAC sees

`curvature.kfac_summary` lists each parameter leaf, the block it got and
why. The kernels of both stacked blocks (scanned by `lax.scan`) get one
Kronecker block per layer; the token embedding is one layer with two uses
(the lookup and the tied output layer `h @ Eᵀ`); the layer norms and the
position embedding keep a diagonal block. Its last line is the share of the
parameters in Kronecker blocks. The diagonal blocks' Fisher diagonal comes
from per-example gradients of the leading examples of each batch (how many
is printed below; `diagonal_batch_size`), the Kronecker factors from every
example.
"""),
    ("code", r"""
example = bench.sample_batch(jax.random.key(0), jnp.asarray(data["train"]),
                             config)
model = bench.predict_fn(config)
print(curvature.kfac_summary(model, params, example, example_batch=example))
diagonal_examples = min(config.kfac_diagonal_batch or config.batch,
                        config.batch)
print(f"diagonal blocks: per-example gradients of {diagonal_examples} of"
      f" the {config.batch} examples of each batch")
"""),
    ("md", r"""
## Training: every row against AdamW's best validation loss

Each row's learning-rate grid runs to its step budget (AdamW) or to AdamW's
best validation loss; validation loss (nats per character on fixed windows
of the held-out text) is measured every `eval_every` steps.
"""),
    ("code", r"""
results = bench.sweep(bench.OPTIMIZERS, data, config)
target = results["adamw"]["target"]
"""),
    ("md", r"""
## Step time and memory

Step time: every row's best-rate step, compiled first, timed round-robin
(median of `timing_repeats` rounds of 5 steps). Memory: the compiled memory
(`jax.jit(...).lower(...).compile().memory_analysis()`) of one whole K-FAC
training step with each weight-sharing mode, and the peak (temp + arguments + outputs) of
one GGN-vector product against `value_and_grad`: the softmax output Hessian
is applied per token as `diag(p)v − p(pᵀv)`, never as a `V × V` matrix.
The factors K-FAC keeps are the same size in both modes; reduce
accumulates `batch` rows per factor statistic where expand accumulates
`batch·seq`.
"""),
    ("code", r"""
rows = {name: results[name]["best"]["lr"] for name in bench.OPTIMIZERS}
times = bench.step_times(rows, data, config)
memory = bench.kfac_memory(config, data)
ggn = bench.ggn_memory(config, data)
summary = bench.summarize(results, times, memory, ggn)
print(bench.table(summary, target))
"""),
    ("code", r"""
fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
for name in bench.OPTIMIZERS:
  run = results[name]["best"]
  label = f"{name} (lr {run['lr']:g})"
  axes[0].plot(run["steps"], run["valid"], label=label)
  axes[1].plot(run["seconds"], run["valid"], label=label)
for ax, xlabel in zip(axes, ("step", "seconds (timed steps only)")):
  ax.axhline(target, color="k", lw=0.8, ls=":")
  ax.set_xlabel(xlabel)
  ax.grid(alpha=0.3)
axes[0].set_ylabel("validation loss (nats / character)")
axes[0].legend()
low = min(min(results[n]["best"]["valid"]) for n in bench.OPTIMIZERS)
axes[0].set_ylim(low - 0.05, low + 1.5)
fig.suptitle(f"character LM on the Python standard library"
             f" ({'fast mode' if FAST else 'full mode'})")
fig.tight_layout()
fig.savefig("figures/09_transformer.png", dpi=110)
plt.show()
"""),
    ("md", r"""
## The issue's targets, checked

1. K-FAC-reduce reaches AdamW's best validation loss in at most 0.75×
   AdamW's steps;
2. at most 2.5× AdamW's step time;
3. K-FAC-reduce's factor statistics cost at most 1/seq of expand's;
4. one GGN-vector product needs at most 1.5× the compiled memory of
   `value_and_grad` (no `[batch·seq, vocab, vocab]` buffer).

Each verdict below is computed from the figures above
(`bench.verdicts`).
"""),
    ("code", r"""
print(f"({'fast' if FAST else 'full'} mode)")
print("\n".join(bench.verdicts(summary, config)))
"""),
    ("md", r"""
**Caveats.** One seed, one small model and a short run on a shared CPU;
the step times depend on the machine (on an accelerator the Kronecker
factors' inversions cost relatively less). The learning-rate grids are
small. The mode of the committed run is printed above the verdicts; the
full experiment is `python benchmarks/transformer.py` (or this notebook
without `CURVATURE_FAST`).
"""),
]
