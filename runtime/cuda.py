"""Whether the GPU path can run: the CUDA library (libdgcuda.so from scripts/build_cuda.sh) is loaded only when the
CUDA driver (libcuda.so.1) loads and reports at least one device. Otherwise the reason is reported ("no GPU: ...")
and the CPU path is used; nothing here is needed to install or run dgguf on the CPU.

The library is found through DGGUF_CUDA_LIB (a path to libdgcuda.so) or at build/cuda/libdgcuda.so under the
current directory. Its C contract is native/cuda/dg_cuda.h.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LIBRARY = Path("build") / "cuda" / "libdgcuda.so"


@dataclass(frozen=True)
class CudaStatus:
    """available: the library is loaded and a device is present; reason: why not (or what was found)."""
    available: bool
    reason: str
    devices: int = 0
    library: ctypes.CDLL | None = None


def driver_devices() -> tuple[int, str]:
    """(device count, description) from the CUDA driver API, without the toolkit: 0 and the reason when none."""
    try:
        drv = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return 0, f"no GPU: the CUDA driver (libcuda.so.1) does not load ({e})"
    rc = drv.cuInit(0)
    if rc != 0:
        return 0, f"no GPU: the CUDA driver does not initialise (cuInit error {rc})"
    count = ctypes.c_int(0)
    rc = drv.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0 or count.value < 1:
        return 0, "no GPU: the CUDA driver reports no device"
    return count.value, f"{count.value} CUDA device(s)"


def cuda_status(library: str | os.PathLike | None = None) -> CudaStatus:
    """Load the CUDA library if, and only if, a device is present and the library was built."""
    devices, reason = driver_devices()
    if devices < 1:
        return CudaStatus(False, reason)
    path = Path(library or os.environ.get("DGGUF_CUDA_LIB") or DEFAULT_LIBRARY)
    if not path.is_file():
        return CudaStatus(False, f"{reason}, but no CUDA library at {path} (run scripts/build_cuda.sh)", devices)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return CudaStatus(False, f"{reason}, but {path} does not load ({e})", devices)
    return CudaStatus(True, f"{reason}, library {path}", devices, lib)
