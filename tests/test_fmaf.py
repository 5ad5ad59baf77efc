"""native/compat.h's dg_fmaf, the reference kernels' fused multiply-add, against glibc's fmaf (correctly rounded;
mingw's is not, which is why the library has its own) over 4 million cases of scripts/windows/fma_check.c: random
bits, cancellation, float midpoints that a double sum would round the wrong way, subnormal and overflowing results,
every triple of special values. The SIMD kernels' hardware FMA rounds the same way: the -mfma build (the FMA
instruction in place of the software path) must give the same results."""
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from dgguf.core import native

ROOT = Path(__file__).resolve().parents[1]
CASES = 4_000_000

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or not shutil.which("gcc"),
                                reason="needs glibc's fmaf and gcc")


def run_check(tmp_path, *flags):
    exe = tmp_path / ("fma_check" + "".join(flags).replace("-", "_"))
    subprocess.run(["gcc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-DWITH_LIBM_FMAF", *flags,
                    f"-I{ROOT / 'native'}", str(ROOT / "scripts/windows/fma_check.c"), "-lm", "-o", str(exe)],
                   check=True)
    out = subprocess.run([str(exe), str(CASES)], check=True, capture_output=True, text=True).stdout
    return dict(line.rsplit(" ", 1) if ":" in line else ("hash", line.split()[-1]) for line in out.splitlines())


def test_dg_fmaf_equals_glibc_fmaf_bit_for_bit(tmp_path):
    got = run_check(tmp_path)
    assert got["libm fmaf differs:"] == "0"
    assert got["dg_fmaf_soft differs from dg_fmaf:"] == "0"
    # the cases reach the double-rounding trap: rounding the double sum to float is wrong on many of them
    assert int(got["the double sum rounded to float differs:"]) > 1000
    if "fma" in native.cpu_features():
        hard = run_check(tmp_path, "-mfma")
        assert hard["hash"] == got["hash"] and hard["libm fmaf differs:"] == "0"
