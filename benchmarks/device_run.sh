#!/usr/bin/env bash
# GPU-stage checks on the GPU machine, in one go (prepared, run by the lead):
#   1. batched throughput, cold persistent compile cache (240 proteins, 50-150 residues,
#      1 model x 3 recycles, --max-batch 32), with useful FLOP/s and a measured bf16 peak;
#   2. the same run again on the warm compile cache (compile reuse: xla_compiles should be 0,
#      so its busy fraction and proteins/hour are the steady state), then the comparison on
#      the same inputs: the stock loop on 2 proteins, colabfold_batch if installed (else
#      reported as skipped, with the reason).
# Nine length buckets x one depth bucket = 9 compiles (~15 s each) dominate step 1.
# Each step is bounded by `timeout`, writes JSON under $OUT and its log; a table follows.
#
#   PYTHONPATH=src:.device_carry/fold_site bash benchmarks/device_run.sh
set -u
OUT=${OUT:-/tmp/parafold-device}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-src:.device_carry/fold_site}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
WORK=$(mktemp -d /tmp/parafold-bench-XXXX)
CACHE="$WORK/jax-cache"
BENCH=(python3 benchmarks/gpu_stage.py --workdir "$WORK" --models 1 --num-recycle 3)
MAIN=(--n 240 --lengths 50-150 --depths 32-127 --max-batch 32)

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$OUT/jax.txt"

step() {  # name, seconds, args...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "${BENCH[@]}" "$@" --json "$OUT/$name.json" \
    > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
  tail -n 8 "$OUT/$name.log"
}

step batched_cold 200 "${MAIN[@]}" --cache-dir "$CACHE" --stock-subset 0
step batched_warm 140 "${MAIN[@]}" --cache-dir "$CACHE" --no-flops --stock-subset 2 \
  --colabfold --colabfold-timeout 30

python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
cols = ("proteins_per_hour", "wall_s", "busy_fraction", "busy_fraction_nvidia_smi", "compiles",
        "xla_compiles", "compile_s", "mean_batch", "useful_tflops_per_s",
        "fraction_of_bf16_peak", "peak_device_bytes", "memory_model_bytes_biggest_batch")
print("\n=== summary ===")
for name in ("batched_cold", "batched_warm"):
    path = out / f"{name}.json"
    if not path.is_file():
        print(f"{name}: no result (see {name}.log)")
        continue
    rep = json.loads(path.read_text())
    ours = rep["parafold"]
    print(f"{name}: " + "  ".join(f"{c}={ours.get(c)}" for c in cols))
    if rep.get("bf16_peak_tflops"):
        print(f"  bf16 peak {rep['bf16_peak_tflops']} TFLOP/s")
    if rep.get("stock_loop"):
        print(f"  stock loop {rep['stock_loop']['proteins_per_hour_extrapolated']} proteins/hour "
              f"(extrapolated), speedup {rep.get('speedup')}x")
    if rep.get("colabfold") is not None:
        print(f"  colabfold: {rep['colabfold']}")
EOF
