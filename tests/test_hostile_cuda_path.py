"""Issue 13, item 9: the CUDA library is loaded from an explicit path, DGGUF_CUDA_LIB, or the repository root's
build/cuda, never from build/cuda under whatever the current directory is."""
import os

import pytest

from dgguf.runtime import cuda

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cuda.__file__)))


@pytest.fixture
def one_gpu_and_recorded_loads(monkeypatch):
    """Pretend the driver reports a device; record what would be dlopen'ed instead of loading it."""
    loaded = []
    monkeypatch.setattr(cuda, "driver_devices", lambda: (1, "1 CUDA device(s)"))

    def fake_cdll(path):
        loaded.append(path)
        return object()
    monkeypatch.setattr(cuda.ctypes, "CDLL", fake_cdll)
    monkeypatch.delenv("DGGUF_CUDA_LIB", raising=False)
    return loaded


@pytest.fixture
def planted_cwd(tmp_path, monkeypatch):
    """The current directory holds a build/cuda/libdgcuda.so that nobody asked for."""
    (tmp_path / "build" / "cuda").mkdir(parents=True)
    (tmp_path / "build" / "cuda" / "libdgcuda.so").write_bytes(b"\x7fELF planted")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_default_library_is_under_the_package_root_not_the_current_directory():
    assert cuda.DEFAULT_LIBRARY.is_absolute()
    assert str(cuda.DEFAULT_LIBRARY) == os.path.join(PACKAGE_ROOT, "build", "cuda", "libdgcuda.so")


def test_library_in_the_current_directory_is_not_loaded(one_gpu_and_recorded_loads, planted_cwd):
    status = cuda.cuda_status()
    assert not any(str(planted_cwd) in p for p in one_gpu_and_recorded_loads)
    assert str(planted_cwd) not in status.reason


def test_environment_variable_and_argument_are_used_as_absolute_paths(one_gpu_and_recorded_loads, planted_cwd,
                                                                      monkeypatch):
    lib = planted_cwd / "mine.so"
    lib.write_bytes(b"x")
    monkeypatch.setenv("DGGUF_CUDA_LIB", "mine.so")          # relative: the user's own choice, made absolute
    assert cuda.cuda_status().available
    assert one_gpu_and_recorded_loads[-1] == str(lib)
    other = planted_cwd / "other.so"
    other.write_bytes(b"x")
    assert cuda.cuda_status(other).available                 # an explicit argument wins over the variable
    assert one_gpu_and_recorded_loads[-1] == str(other)


def test_windows_dll_directories_are_the_library_folder_and_the_toolkit_bins(tmp_path):
    """Python on Windows does not search PATH for a DLL's DLLs: the CUDA runtime's are looked for beside the
    library and under CUDA_PATH (bin, and bin/x64 where CUDA 13 puts them), only those that exist."""
    from dgguf.runtime.cuda import dll_directories
    lib = tmp_path / "build" / "dgcuda.dll"
    lib.parent.mkdir()
    toolkit = tmp_path / "cuda"
    (toolkit / "bin" / "x64").mkdir(parents=True)
    assert dll_directories(lib, {"CUDA_PATH": str(toolkit)}) == [lib.parent, toolkit / "bin", toolkit / "bin" / "x64"]
    assert dll_directories(lib, {}) == [lib.parent]
    assert dll_directories(lib, {"CUDA_PATH": str(tmp_path / "none")}) == [lib.parent]
