#!/usr/bin/env bash
# Every peer-free benchmark, once, on whatever accelerator jax finds.
#
#   benchmarks/accelerator.sh OUTDIR [SECONDS_PER_BENCHMARK [NAME...]]
#
# NAMEs pick benchmarks from the list at the end (all by default).
# Meant for a short lease on a GPU machine that has jax, optax, flax, tqdm and
# matplotlib installed but not this package: it runs from the repository root
# with the checkout on PYTHONPATH, gives each benchmark its own time limit (so
# that one slow compile does not cost the rest) and writes one log per
# benchmark into OUTDIR. kfac-jax is not run: its 0.0.8 release needs
# jax <= 0.9, whose CUDA wheels are too large to carry to such a machine.
set -u
out=${1:?usage: benchmarks/accelerator.sh OUTDIR [SECONDS [NAME...]]}
limit=${2:-150}
shift $(( $# < 2 ? $# : 2 ))
wanted=" $* "
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30

run() {  # run NAME COMMAND...: the command's output goes to OUTDIR/NAME.log
  local name=$1; shift
  [[ "$wanted" == "  " || "$wanted" == *" $name "* ]] || return 0
  local start=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - start)) s"
  tail -n 25 "$out/$name.log"
}

{
  nvidia-smi -L 2>/dev/null
  python3 -c 'import jax, optax; print("jax", jax.__version__, "optax",
    optax.__version__, jax.devices())'
} >"$out/machine.log" 2>&1
cat "$out/machine.log"

run diagnostics python3 benchmarks/diagnostics.py --batch 1000 --repeats 15
run density python3 benchmarks/diagnostics.py --section density --batch 200 \
  --repeats 5 --probes 4
run eager python3 benchmarks/diagnostics.py --section eager --batch 200 \
  --repeats 5
run products python3 benchmarks/products.py --batch 1000 --repeats 15
run first_order python3 benchmarks/first_order.py
run convergence python3 benchmarks/convergence.py --train-size 20000 \
  --steps 2000 --curvature-steps 600 --optimizers adam,kfac,shampoo,soap \
  --out "$out"
run diagnostics_8000 python3 benchmarks/diagnostics.py --batch 8000 --repeats 5
run kfac_parts_curves python3 benchmarks/kfac_step_parts.py --model curves \
  --rounds 15
run kfac_parts_transformer python3 benchmarks/kfac_step_parts.py --rounds 15
