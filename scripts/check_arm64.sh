#!/usr/bin/env bash
# arm64 portability: cross-compile every native source for aarch64 (scalar paths only there), run the
# quantizer driver under qemu and require the same bytes as the native x86-64 build.
# Needs Debian's gcc-aarch64-linux-gnu, qemu-user and libc6-arm64-cross (installed if missing and possible).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    if ! { apt-get update -qq && apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user libc6-arm64-cross; } >/dev/null 2>&1; then
        echo "check_arm64: SKIPPED (cross compiler or qemu not available)"
        exit 0
    fi
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
flags="-std=c11 -O2 -Wall -Wextra -Wno-unused-parameter -Werror -Inative"
gcc $flags scripts/arm64/quant_driver.c native/*.c -lm -lpthread -o "$out/x86"
aarch64-linux-gnu-gcc $flags scripts/arm64/quant_driver.c native/*.c -lm -lpthread -o "$out/arm64"
"$out/x86" > "$out/x86.txt"
qemu-aarch64 -L /usr/aarch64-linux-gnu "$out/arm64" > "$out/arm64.txt"
diff "$out/x86.txt" "$out/arm64.txt"
echo "check_arm64: aarch64 build OK, quantizer bytes equal x86-64's for $(wc -l < "$out/x86.txt") types"
