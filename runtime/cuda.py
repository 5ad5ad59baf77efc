"""Whether the GPU path can run: the CUDA library (libdgcuda.so from scripts/build_cuda.sh) is loaded only when the
CUDA driver (libcuda.so.1) loads and reports at least one device. Otherwise the reason is reported ("no GPU: ...")
and the CPU path is used; nothing here is needed to install or run dgguf on the CPU.

The library is the path cuda_status() is given, else DGGUF_CUDA_LIB (a path to libdgcuda.so), else
build/cuda/libdgcuda.so under the repository root (where scripts/build_cuda.sh puts it; the package's root, since
the repository's top-level folders are the package's subpackages), never a path under the current directory
that nobody named. Its C contract is native/cuda/dg_cuda.h.

On Windows the driver is nvcuda.dll and the library dgcuda.dll (README, "Windows"); Python does not search
PATH for the DLLs a DLL needs, so the CUDA runtime's are looked for in the library's folder and the toolkit's
(CUDA_PATH\bin, and bin\x64 where CUDA 13 puts them), added with os.add_dll_directory.
"""
from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from dgguf.core.errors import DggufError

WINDOWS = sys.platform == "win32"
DRIVER = "nvcuda.dll" if WINDOWS else "libcuda.so.1"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LIBRARY = ROOT / "build" / "cuda" / ("dgcuda.dll" if WINDOWS else "libdgcuda.so")


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
        drv = ctypes.CDLL(DRIVER)
    except OSError as e:
        return 0, f"no GPU: the CUDA driver ({DRIVER}) does not load ({e})"
    rc = drv.cuInit(0)
    if rc != 0:
        return 0, f"no GPU: the CUDA driver does not initialise (cuInit error {rc})"
    count = ctypes.c_int(0)
    rc = drv.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0 or count.value < 1:
        return 0, "no GPU: the CUDA driver reports no device"
    return count.value, f"{count.value} CUDA device(s)"


def detect_gpu(lib: str = DRIVER, device: int = 0) -> tuple[int, int, str]:
    """(free bytes, total bytes, name) of CUDA device `device` through the driver API, or a DggufError when no GPU
    is there. Only the driver library is needed (no toolkit); the context made for the query is released."""
    try:
        cuda = ctypes.CDLL(lib)
    except OSError as e:
        raise DggufError(f"--vram auto: no GPU found ({lib} does not load: {e}); give the budget, "
                         "e.g. --vram 12GiB") from None

    def call(fn: str, *args) -> None:
        status = getattr(cuda, fn)(*args)
        if status != 0:
            raise DggufError(f"--vram auto: no usable GPU ({fn} failed with CUDA error {status}); give the "
                             "budget, e.g. --vram 12GiB")

    call("cuInit", 0)
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    call("cuDeviceGet", ctypes.byref(dev), device)
    name = ctypes.create_string_buffer(256)
    call("cuDeviceGetName", name, 256, dev)
    call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
    try:
        call("cuCtxSetCurrent", ctx)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        call("cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total))
    finally:
        cuda.cuDevicePrimaryCtxRelease_v2(dev)
    return free.value, total.value, name.value.decode(errors="replace")


def cuda_status(library: str | os.PathLike | None = None) -> CudaStatus:
    """Load the CUDA library if, and only if, a device is present and the library was built."""
    devices, reason = driver_devices()
    if devices < 1:
        return CudaStatus(False, reason)
    # absolute, so that dlopen loads this file rather than searching the library path for its name
    path = Path(library or os.environ.get("DGGUF_CUDA_LIB") or DEFAULT_LIBRARY).absolute()
    if not path.is_file():
        return CudaStatus(False, f"{reason}, but no CUDA library at {path} (run scripts/build_cuda.sh)", devices)
    try:
        for d in dll_directories(path, os.environ) if WINDOWS else ():
            _DLL_DIRECTORIES.append(os.add_dll_directory(str(d)))
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        hint = (" (the CUDA runtime DLLs it was built with must be in its folder or in CUDA_PATH\\bin: "
                f"{', '.join(str(d) for d in dll_directories(path, os.environ))})") if WINDOWS else ""
        return CudaStatus(False, f"{reason}, but {path} does not load ({e}){hint}", devices)
    return CudaStatus(True, f"{reason}, library {path}", devices, lib)


_DLL_DIRECTORIES = []   # os.add_dll_directory's handles: a directory stays searched while its handle lives


def dll_directories(library: Path, environ) -> list[Path]:
    """Where the DLLs that the CUDA library needs (cudart64_*.dll, cublas...) are looked for on Windows: its own
    folder, then the toolkit's CUDA_PATH\\bin and CUDA_PATH\\bin\\x64, those that exist."""
    dirs = [Path(library).parent]
    if environ.get("CUDA_PATH"):
        dirs += [Path(environ["CUDA_PATH"]) / "bin", Path(environ["CUDA_PATH"]) / "bin" / "x64"]
    return [d for d in dirs if d.is_dir()]
