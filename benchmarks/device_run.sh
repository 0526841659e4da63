#!/usr/bin/env bash
# GPU-stage checks on the GPU machine, prepared to fit a 10-minute device call each (a
# session has 15 minutes of device time: one part per session, two if the machine starts
# fast). Runs past their --time-limit report the proteins finished by then, labeled
# stopped_at_time_limit. One compile-ahead thread: on an H100, 6 threads made each compile
# 52-160 s instead of 25-30 s (XLA's compiles and autotuning contend).
#   predict  (issue 3): the stock loop (a fresh RunModel per protein) on 2 proteins, then 200
#            proteins of 50-300 residues, full config, 1 model x 3 recycles, --max-batch 32,
#            cold caches, stopped at 400 s (modelled: 4 shapes after merging, 330-420 s; a run
#            cut short counts the wrong mix, the shapes with the most work go first, so the whole
#            set should finish).
#            ~9.5 min (timeout_s=590).
#   batched  (issue 5): 1,000 proteins of 50-150, cold, with useful FLOP/s and a measured bf16
#            peak, stopped at 280 s; then the same inputs warm, stopped at 180 s.  ~9.5 min.
#   five     (issue 5): the 1,000 of 50-150 with all 5 models, cold, stopped at 480 s (modelled:
#            4 shapes, one executable each for all five models, the inputs have no templates;
#            ~920 s for the whole set, so this counts the first half), with useful FLOP/s and
#            the bf16 peak.  ~9.5 min.
#   colabfold (issue 5): 200 proteins of 50-150 through parafold, then the same MSAs and random
#            weights through colabfold_batch 1.6.3 in its own environment
#            (.device_carry/colabfold_site, built with pip --target; Bio from fold_site), cold
#            both, colabfold stopped after 300 s and counted by the proteins it finished.  ~9 min.
# Each step is bounded by `timeout` and stops parafold's run 45 s before it (--deadline), so
# the run is reported; its JSON under $OUT is rewritten after each stage (an outer timeout
# keeps what was measured) and its log is beside it; a table follows.
#
#   PYTHONPATH=src:.device_carry/fold_site OUT=$OUT bash benchmarks/device_run.sh predict
#   PYTHONPATH=src:.device_carry/fold_site OUT=$OUT bash benchmarks/device_run.sh batched
#   PYTHONPATH=src:.device_carry/fold_site OUT=$OUT bash benchmarks/device_run.sh five
#   PYTHONPATH=src:.device_carry/fold_site OUT=$OUT bash benchmarks/device_run.sh colabfold
set -u
PART=${1:-batched}
case "$PART" in
  predict|batched|five|colabfold) ;;
  *) echo "unknown part '$PART': predict, batched, five or colabfold" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/parafold-device}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-src:.device_carry/fold_site}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
WORK=$(mktemp -d /tmp/parafold-bench-XXXX)
CACHE="$WORK/jax-cache"
BENCH=(python3 benchmarks/gpu_stage.py --workdir "$WORK" --models 1 --num-recycle 3)
MAIN=(--n 1000 --lengths 50-150 --depths 32-127 --max-batch 32)

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$OUT/jax.txt"

step() {  # name, seconds, args...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --signal=INT --kill-after=30 "$limit" "${BENCH[@]}" "$@" --json "$OUT/$name.json" \
    --deadline $((limit - 45)) > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
  tail -n 8 "$OUT/$name.log"
}

AHEAD=(--compile-ahead "${COMPILE_AHEAD:-1}" --executable-cache)
PREDICT=(--n 200 --lengths 50-300 --depths 64-500 --max-batch 32 --cache-dir "$CACHE" --no-flops)
if [ "$PART" = predict ]; then
  step predict_cold 550 "${PREDICT[@]}" --stock-subset 2 --time-limit 400 "${AHEAD[@]}"
  NAMES="predict_cold"
elif [ "$PART" = batched ]; then
  step batched_cold 340 "${MAIN[@]}" --cache-dir "$CACHE" --stock-subset 0 --time-limit 280 \
    "${AHEAD[@]}"
  step batched_warm 220 "${MAIN[@]}" --cache-dir "$CACHE" --stock-subset 0 \
    --time-limit 180 "${AHEAD[@]}"
  NAMES="batched_cold batched_warm"
elif [ "$PART" = five ]; then
  step five_cold 560 "${MAIN[@]}" --models 1,2,3,4,5 --cache-dir "$CACHE" --stock-subset 0 \
    --time-limit 480 "${AHEAD[@]}"
  NAMES="five_cold"
fi
if [ "$PART" = colabfold ]; then  # gpu_stage.py checks colabfold imports before GPU work
  CF_SITE="$PWD/.device_carry/colabfold_site:$PWD/.device_carry/fold_site"
  step vs_colabfold 560 --n 200 --lengths 50-150 --depths 32-127 --max-batch 32 \
    --cache-dir "$CACHE" --stock-subset 0 --no-flops "${AHEAD[@]}" --colabfold \
    --colabfold-python python3 --colabfold-pythonpath "$CF_SITE" --colabfold-timeout 300
  NAMES="vs_colabfold"
fi

python3 - "$OUT" $NAMES <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
cols = ("proteins_per_hour", "ok", "stopped_at_time_limit", "wall_s", "busy_fraction", "busy_fraction_nvidia_smi", "compiles",
        "xla_compiles", "executable_hits", "compile_s", "compiled_ahead", "loop_compile_s",
        "warm_s_per_prediction", "mean_batch", "useful_tflops_per_s",
        "fraction_of_bf16_peak", "peak_device_bytes", "memory_model_bytes_biggest_batch")
print("\n=== summary ===")
for name in sys.argv[2:]:
    path = out / f"{name}.json"
    if not path.is_file():
        print(f"{name}: no result (see {name}.log)")
        continue
    rep = json.loads(path.read_text())
    ours = rep.get("parafold") or {}
    print(f"{name}: " + "  ".join(f"{c}={ours.get(c)}" for c in cols))
    print(f"  stopped={ours.get('stopped')}  loop_s={ours.get('loop_s')}")
    if rep.get("bf16_peak_tflops"):
        print(f"  bf16 peak {rep['bf16_peak_tflops']} TFLOP/s")
    stock = rep.get("stock_loop") or {}
    if stock.get("proteins_timed"):
        print(f"  stock loop {stock['proteins_per_hour_extrapolated']} proteins/hour "
              f"(extrapolated, lengths {stock['lengths_timed']}), speedup {rep.get('speedup')}x; "
              f"one run_alphafold.py process {stock['proteins_per_hour_one_process_extrapolated']}"
              f"/hour, speedup {rep.get('speedup_vs_one_process')}x")
    if rep.get("colabfold") is not None:
        print(f"  colabfold: {rep['colabfold']}")
EOF
