#!/usr/bin/env bash
# The one call a lent GPU machine gets (at most 8 minutes; every stage under its own timeout, 450 s in all):
#   1. build the CUDA library and driver for the GPU found (nvidia-smi's compute capability)         100 s
#   2. every kernel against its CPU twin                 (dg_cuda_check kernels)                      40 s
#   3. the hybrid executor against the CPU forward       (dg_cuda_check decode: a tiny random model,
#      resident / CPU / streamed expert layers mixed, on the CUDA backend and on the host backend)    60 s
#   4. the real 30-layer shape, random Q4_K_M blocks, on the executor at the planner's placements for
#      8, 12, 16 and 24 GiB and fully resident (scripts/gpu_plans.txt, or the planner itself when dgguf
#      imports here), measured s/step printed beside the prediction                                  190 s
#   5. the kernel checks under compute-sanitizer's memcheck (out-of-bounds and misaligned accesses)     60 s
# Prints PASS / FAIL / TIMEOUT per stage and a summary; the full log goes to $OUT/gpu_check.log (/tmp without
# OUT). Exit status: 0 when every stage passed. DRY_RUN=1 (with GPU_NAME and GPU_CC when there is no nvidia-smi)
# prints each stage's command and limit without running it (tests/test_cuda.py checks the plan of the call).
set -uo pipefail
cd "$(dirname "$0")/.."
log=${OUT:-/tmp}/gpu_check.log
exec > >(tee "$log") 2>&1
t_start=$(date +%s)
bin=build/cuda-check
declare -a summary
status=0

stage() {   # stage NAME SECONDS COMMAND...: runs it under a hard timeout and records the verdict
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    if [ -n "${DRY_RUN:-}" ]; then summary+=("DRY $name ${limit}s"); return 0; fi
    local t0 rc
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@"
    rc=$?
    local took=$(( $(date +%s) - t0 )) verdict=PASS
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict=TIMEOUT; elif [ $rc -ne 0 ]; then verdict="FAIL(rc=$rc)"; fi
    [ "$verdict" = PASS ] || status=1
    summary+=("$verdict $name ${took}s")
    echo "=== $name: $verdict in ${took}s"
    return $rc
}

if [ -n "${DRY_RUN:-}" ] && [ -n "${GPU_NAME:-}" ]; then
    gpu_name=$GPU_NAME
    cc=$(echo "${GPU_CC:-}" | tr -d ' .')
elif ! command -v nvidia-smi >/dev/null; then
    echo "FAIL gpu_check: nvidia-smi not found: no GPU driver on this machine"
    exit 1
else
    nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader
    gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
fi
[[ $cc =~ ^[0-9]+$ ]] || { echo "FAIL gpu_check: cannot read the compute capability ('$cc')"; exit 1; }
card=h100
[[ $gpu_name == *H200* ]] && card=h200
echo "INFO predictions for the planner's card '$card' ($gpu_name)"

# The real-shape runs: NAME:EXECUTOR_BUDGET:PLACEMENT:PREDICTED per line of the plans, the planner's own when
# dgguf imports here (python3 with the package and numpy), else the committed scripts/gpu_plans.txt.
plans=$(python3 scripts/gpu_plans.py 2>/dev/null) && echo "INFO plans from the planner (python3 scripts/gpu_plans.py)" \
    || { plans=$(cat scripts/gpu_plans.txt); echo "INFO plans from scripts/gpu_plans.txt (dgguf does not import here)"; }
specs=()
seen=""
while read -r c name budget where predicted; do
    [ "$c" = "$card" ] || continue
    if [[ " $seen " == *" $where "* ]]; then echo "INFO $name: the same placement as a budget before it; not run again"
        continue; fi
    seen="$seen $where"
    [[ $where == *[CS]* ]] || name="$name(fully-resident)"
    specs+=("$name:$budget:$where:$predicted")
done <<< "$plans"

if stage build 100 scripts/build_cuda.sh "$cc" "$bin" || [ -n "${DRY_RUN:-}" ]; then
    stage kernels 40 "$bin/dg_cuda_check" kernels
    stage decode 60 "$bin/dg_cuda_check" decode
    stage real 190 "$bin/dg_cuda_check" real "${specs[@]}"
    if command -v compute-sanitizer >/dev/null || [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
        san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
        stage memcheck 60 "$san" --tool memcheck --error-exitcode 3 "$bin/dg_cuda_check" kernels
    else
        summary+=("SKIPPED memcheck (no compute-sanitizer)")
    fi
fi

echo "=== summary ($(( $(date +%s) - t_start ))s in all)"
printf '%s\n' "${summary[@]}"
grep -h '^RESULT' "$log" || true
exit $status
