#!/usr/bin/env bash
# Windows x64 portability: cross-compile every native source with mingw-w64 (-Werror), link dgguf.dll (libgcc and
# winpthreads static: it needs only KERNEL32 and msvcrt), and run scripts/windows/driver.c against it under Wine:
#   1. dg_fmaf (native/compat.h) over 4M cases: the same result bits as the native build, whose equality with
#      glibc's fmaf tests/test_fmaf.py checks (mingw's own fmaf differs);
#   2. every type quantized, every matmul kernel, the soft embedding and both attention kernels: the in-process
#      reference equalities (int8 kernels = int8-reference, bf16 = int8-bf16-reference, blocked attention the same
#      at every kernel level, 1 thread = 2 threads), and every result's bits equal to the native Linux build's;
#   3. one canvas forward of models/small (Q8_0, converted here), with and without self-conditioning, against the
#      logits of the installed Linux build (scripts/windows/export_model.py): within 2e-5 of the largest |logit|
#      (libm's cosf/sinf differ in the last bit, see driver.c); the same driver built natively must match exactly.
# Needs Debian's gcc-mingw-w64-x86-64 and wine (installed if missing and possible; else SKIPPED) and the installed
# dgguf (python). Takes a few minutes, mostly the two -O3 builds.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v x86_64-w64-mingw32-gcc >/dev/null || ! command -v wine >/dev/null; then
    if ! { apt-get update -qq && apt-get install -y -qq gcc-mingw-w64-x86-64 wine wine64; } >/dev/null 2>&1; then
        echo "check_windows: SKIPPED (mingw-w64 or wine not available)"
        exit 0
    fi
fi
out=$(mktemp -d)
export WINEPREFIX="$out/wineprefix" WINEDEBUG=-all WINEDLLOVERRIDES="mscoree,mshtml="   # no Mono/Gecko prompts
trap 'wineserver -k >/dev/null 2>&1 || true; rm -rf "$out"' EXIT
mkdir -p "$out/linux" "$out/windows"
t0=$SECONDS
# native/build_native.py's flags, with -Werror
flags=(-std=c11 -O3 -fno-strict-aliasing -fno-trapping-math -Wall -Wextra -Wno-unused-parameter -Werror -Inative)
jobs=$(nproc 2>/dev/null || echo 2)
build() {   # compiler, object directory: native/*.c and the driver, in parallel
    printf '%s\n' native/*.c scripts/windows/driver.c |
        xargs -P "$jobs" -I{} sh -c "$1 ${flags[*]} -c {} -o $2/\$(basename {} .c).o"
}
(wineboot -i >/dev/null 2>&1 || true) &    # the fresh Wine prefix is made while the compilers run
build gcc "$out/linux"
build x86_64-w64-mingw32-gcc "$out/windows"
gcc "$out"/linux/*.o -lm -lpthread -o "$out/driver"
w=$out/windows
x86_64-w64-mingw32-gcc -shared -static -o "$w/dgguf.dll" $(ls "$w"/*.o | grep -v '/driver\.o$') -lpthread \
    -Wl,--out-implib,"$w/libdgguf.dll.a"
x86_64-w64-mingw32-gcc -static -o "$w/driver.exe" "$w/driver.o" "$w/libdgguf.dll.a"
imports=$(x86_64-w64-mingw32-objdump -p "$w/dgguf.dll" | sed -n 's/^\s*DLL Name: //p' | sort -u | tr '\n' ' ')
echo "check_windows: built in $((SECONDS - t0)) s; dgguf.dll imports: $imports"
case "$imports" in *pthread*|*libgcc*) echo "check_windows: dgguf.dll needs a MinGW runtime DLL"; exit 1;; esac
wait

# 1. the fused multiply-add of the reference kernels
gcc "${flags[@]}" -DWITH_LIBM_FMAF scripts/windows/fma_check.c -lm -o "$out/fma_check"
x86_64-w64-mingw32-gcc "${flags[@]}" scripts/windows/fma_check.c -o "$w/fma_check.exe"
"$out/fma_check" > "$out/fma.linux"
grep -qx "libm fmaf differs: 0" "$out/fma.linux"
t1=$SECONDS
wine "$w/fma_check.exe" | tr -d '\r' > "$out/fma.windows"
diff <(head -2 "$out/fma.linux") <(head -2 "$out/fma.windows")
echo "check_windows: dg_fmaf gives the same bits under Wine ($(head -1 "$out/fma.linux"); $((SECONDS - t1)) s)"

# 2. quantizers and kernels
mapfile -t kernels < <(python -c "from dgguf.core import native; print('\n'.join(native.MATMUL_KERNELS))")
"$out/driver" kernels "${kernels[@]}" > "$out/kernels.linux"
t1=$SECONDS
wine "$w/driver.exe" kernels "${kernels[@]}" | tr -d '\r' > "$out/kernels.windows" || {
    grep FAIL "$out/kernels.windows"; exit 1; }
diff "$out/kernels.linux" "$out/kernels.windows"
echo "check_windows: $(grep -c '^quant' "$out/kernels.linux") quantizations, $(grep -c '^matmul' "$out/kernels.linux")" \
     "matmuls, $(grep -c '^soft_embed' "$out/kernels.linux") soft embeddings, $(grep -c '^attention' "$out/kernels.linux")" \
     "attentions: the reference's bits, and Linux's ($(head -1 "$out/kernels.linux"); $((SECONDS - t1)) s)"

# 3. models/small's canvas logits
dgguf convert models/small -o "$out/small-Q8_0.gguf" --type Q8_0 --force -q
python scripts/windows/export_model.py "$out/small-Q8_0.gguf" "$out/forward.bin"
"$out/driver" forward "$out/forward.bin" > /dev/null
t1=$SECONDS
wine "$w/driver.exe" forward "$(winepath -w "$out/forward.bin")" 2e-5 | tr -d '\r'
echo "check_windows: Windows x64 build OK (forward under Wine $((SECONDS - t1)) s; whole check $((SECONDS - t0)) s)"
