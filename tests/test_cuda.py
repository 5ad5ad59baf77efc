"""The CUDA sources (native/cuda) and the GPU gate (runtime/cuda.py).

The CUDA build is not made inside pytest: `.ci/run` compiles it once (scripts/build_cuda.sh) and names it in
DGGUF_CUDA_BUILD; without that the build tests skip, and without a device the GPU tests skip: a skip is not a
pass, it says the check did not run here. The GPU checks themselves (kernels against their CPU twins, a decoder
step against the CPU forward, throughput) live in the driver that scripts/gpu_check.sh runs on a lent GPU
machine; the GPU tests below run the same driver when a device is present.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from dgguf.convert.checkpoint import read_config_file
from dgguf.convert.presets import TypeChooser
from dgguf.format.arch import expected_tensors
from dgguf.format.quant_types import FILE_TYPES
from dgguf.runtime.cuda import cuda_status, driver_devices

ROOT = Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
BUILD = os.environ.get("DGGUF_CUDA_BUILD")
HAS_GPU = driver_devices()[0] > 0
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA sources were not compiled here")
needs_build = pytest.mark.skipif(not BUILD, reason="DGGUF_CUDA_BUILD not set: no CUDA build to check (.ci/run "
                                                   "makes one with scripts/build_cuda.sh)")
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device here: the GPU checks did not run")


@pytest.fixture(scope="module")
def cuda_build():
    """The build scripts/build_cuda.sh made (.ci/run: sm_80 and the release architectures in build/cuda-ci)."""
    return Path(BUILD).resolve()


@needs_build
def test_cuda_sources_compile_for_the_architectures_asked(cuda_build):
    """DGGUF_CUDA_ARCHS (.ci/run sets it to what it built): each architecture's machine code is in the library
    (every cubin names its sm_NN target)."""
    lib = (cuda_build / "libdgcuda.so").read_bytes()
    assert len(lib) > 0 and (cuda_build / "dg_cuda_check").stat().st_size > 0
    for arch in filter(None, os.environ.get("DGGUF_CUDA_ARCHS", "").split(",")):
        assert f"sm_{arch}".encode() in lib, f"no sm_{arch} code in {cuda_build / 'libdgcuda.so'}"


@needs_nvcc
def test_build_rejects_a_bad_architecture(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "scripts" / "build_cuda.sh"), "sm_90", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "bad architecture 'sm_90'" in r.stderr


@needs_build
def test_throughput_driver_uses_the_q4_k_m_types_presets_choose(cuda_build):
    """The throughput run's tensor types (hard-coded in check.cu) are those dgguf convert writes for Q4_K_M
    for the real config (tests/fixtures/real-config)."""
    cfg, _ = read_config_file(ROOT / "tests" / "fixtures" / "real-config" / "config.json")
    real = expected_tensors(cfg.shape())
    out = subprocess.run([str(cuda_build / "dg_cuda_check"), "types"], capture_output=True, text=True, check=True)
    lines = [line.split() for line in out.stdout.splitlines()]
    chooser = TypeChooser(FILE_TYPES["Q4_K_M"], n_layers=30, n_experts=128, n_attn_v=25, n_gqa=2)
    expected = [[name, chooser.choose(name, real[name]).name] for name, _ in lines]
    assert len(lines) == 4 + 30 * 9 + 25
    assert lines == expected


@needs_build
@pytest.mark.skipif(HAS_GPU, reason="a GPU is present: the no-GPU message cannot be checked here")
def test_check_driver_without_a_gpu_exits_2_naming_the_reason(cuda_build):
    r = subprocess.run([str(cuda_build / "dg_cuda_check"), "kernels"], capture_output=True, text=True, check=False)
    assert r.returncode == 2
    assert r.stderr.startswith("error: no CUDA device (no GPU: ")


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present")
def test_cuda_status_reports_no_gpu_and_loads_nothing():
    status = cuda_status()
    assert not status.available and status.library is None
    assert status.reason.startswith("no GPU: ")


@needs_build
@needs_gpu
@pytest.mark.parametrize("what", ["kernels", "decode"])
def test_gpu_matches_cpu_twins(cuda_build, what):
    r = subprocess.run([str(cuda_build / "dg_cuda_check"), what], capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_build
@needs_gpu
def test_cuda_status_loads_the_built_library(cuda_build):
    status = cuda_status(cuda_build / "libdgcuda.so")
    assert status.available and status.devices >= 1


@pytest.mark.parametrize("name,card", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200")])
def test_gpu_check_plan_fits_eight_minutes_and_runs_the_planners_placements(name, card):
    """scripts/gpu_check.sh's dry run: the stages it would run, their limits (one call of at most 8 minutes on a
    lent GPU), and the real-shape specs taken from the planner's placements (scripts/gpu_plans.txt)."""
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "DRY_RUN": "1", "GPU_NAME": name, "GPU_CC": "9.0", "OUT": "/tmp",
                            "PATH": "/usr/bin:/bin"}, check=False, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    limits = [int(line.split()[2].rstrip("s")) for line in r.stdout.splitlines() if line.startswith("DRY ")]
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("DRY ")] == \
        ["build", "kernels", "decode", "real"]
    assert sum(limits) + 60 <= 480                     # + memcheck's 60 s where compute-sanitizer is installed
    real = next(line for line in r.stdout.splitlines() if line.startswith("=== real"))
    specs = real.split("dg_cuda_check real ")[1].split()
    plans = [line.split() for line in (ROOT / "scripts" / "gpu_plans.txt").read_text().splitlines()
             if line.startswith(card + " ")]
    assert [s.split(":")[0] for s in specs] == ["8GiB", "12GiB", "16GiB", "24GiB(fully-resident)"]
    for spec, (_, _, budget, where, predicted) in zip(specs, plans):
        assert spec.split(":")[1:] == [budget, where, predicted]
