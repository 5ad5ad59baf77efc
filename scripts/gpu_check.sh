#!/usr/bin/env bash
# The one call a lent GPU machine gets (at most 8 minutes, every stage under its own timeout):
#   1. build the CUDA library and driver for the GPU found (nvidia-smi's compute capability)
#   2. every kernel against its CPU twin          (dg_cuda_check kernels)
#   3. a decoder step against the CPU forward     (dg_cuda_check decode: tiny random model, plain and TF32)
#   4. throughput on the real 30-layer shape, random Q4_K_M blocks made on the device, budgets 24, 16, 8 GiB
#      (the fully resident one first, so a timeout cuts the streamed ones)
#   5. the kernel checks again under compute-sanitizer's memcheck (out-of-bounds and misaligned accesses)
# Prints PASS / FAIL / TIMEOUT per stage and a summary; the full log goes to $OUT/gpu_check.log when OUT is set.
# Exit status: 0 when every stage passed.
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
    local t0=$(date +%s) rc
    timeout -k 5 "$limit" "$@"
    rc=$?
    local took=$(( $(date +%s) - t0 )) verdict=PASS
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict=TIMEOUT; elif [ $rc -ne 0 ]; then verdict="FAIL(rc=$rc)"; fi
    [ "$verdict" = PASS ] || status=1
    summary+=("$verdict $name ${took}s")
    echo "=== $name: $verdict in ${took}s"
    return $rc
}

if ! command -v nvidia-smi >/dev/null; then
    echo "FAIL gpu_check: nvidia-smi not found: no GPU driver on this machine"
    exit 1
fi
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader
cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
[[ $cc =~ ^[0-9]+$ ]] || { echo "FAIL gpu_check: cannot read the compute capability ('$cc')"; exit 1; }

if stage build 120 scripts/build_cuda.sh "$cc" "$bin"; then
    stage kernels 45 "$bin/dg_cuda_check" kernels
    stage decode 45 "$bin/dg_cuda_check" decode
    stage throughput 170 "$bin/dg_cuda_check" throughput 24 16 8
    if command -v compute-sanitizer >/dev/null || [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
        san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
        stage memcheck 80 "$san" --tool memcheck --error-exitcode 3 "$bin/dg_cuda_check" kernels
    else
        summary+=("SKIPPED memcheck (no compute-sanitizer)")
    fi
fi

echo "=== summary ($(( $(date +%s) - t_start ))s in all)"
printf '%s\n' "${summary[@]}"
grep -h '^RESULT' "$log" || true
exit $status
