#!/usr/bin/env bash
# Builds the CUDA library and its check driver with nvcc (pip install never needs nvcc):
#   build/cuda/libdgcuda.so    native/cuda/*.cu (except check.cu) + the CPU library native/*.c (the twins)
#   build/cuda/dg_cuda_check   the driver (native/cuda/check.cu) linked with both
# ARCHS: comma-separated compute capabilities without the dot (default 80: CI's one real architecture); each gets
# its machine code, and the highest also gets PTX so newer GPUs can JIT it. Release: 86,89,90,120.
# OUT_DIR (second argument) defaults to build/cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
archs=${1:-80}
out=${2:-build/cuda}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
    echo "build_cuda: nvcc not found (set NVCC or put it on PATH)" >&2
    exit 3
fi
gencode=()
highest=0
for a in ${archs//,/ }; do
    [[ $a =~ ^[0-9]+$ ]] || { echo "build_cuda: bad architecture '$a' (expected e.g. 80,90)" >&2; exit 2; }
    gencode+=(-gencode "arch=compute_$a,code=sm_$a")
    (( a > highest )) && highest=$a
done
gencode+=(-gencode "arch=compute_$highest,code=compute_$highest")
mkdir -p "$out/obj"
cflags="-std=c11 -O3 -fPIC -fno-strict-aliasing -Wall -Wextra -Wno-unused-parameter -Werror -Inative"
nvflags=(-std=c++17 -O3 -Xcompiler -fPIC,-Wall -Werror all-warnings -Inative/cuda "${gencode[@]}")
objs=()
for c in native/*.c; do
    o="$out/obj/$(basename "${c%.c}").o"
    gcc $cflags -c "$c" -o "$o" &
    objs+=("$o")
done
cu_objs=()
for cu in native/cuda/*.cu; do
    [ "$(basename "$cu")" = check.cu ] && continue
    o="$out/obj/$(basename "${cu%.cu}").cu.o"
    "$NVCC" "${nvflags[@]}" -c "$cu" -o "$o" &
    cu_objs+=("$o")
done
"$NVCC" "${nvflags[@]}" -c native/cuda/check.cu -o "$out/obj/check.cu.o" &
for job in $(jobs -p); do wait "$job"; done
"$NVCC" "${gencode[@]}" -shared "${cu_objs[@]}" "${objs[@]}" -lpthread -lm -o "$out/libdgcuda.so"
"$NVCC" "${gencode[@]}" "$out/obj/check.cu.o" "${cu_objs[@]}" "${objs[@]}" -lpthread -lm -o "$out/dg_cuda_check"
echo "build_cuda: $out/libdgcuda.so and $out/dg_cuda_check for compute capabilities $archs (+ PTX $highest)"
