"""cffi builder for dgguf.core._native: compiles every native/*.c against native/dgguf.h.

Flags are portable on purpose: fast paths select their instruction sets per
function (target attributes) and are chosen at run time, so no -march here.
"""
import os
import re
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADER = HERE / "dgguf.h"


def _cdef_text() -> str:
    """The header without preprocessor lines: cffi's cdef parses plain declarations."""
    text = HEADER.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


# DGGUF_SANITIZE=1: AddressSanitizer + UndefinedBehaviorSanitizer, every UB report fatal. For tests only: load
# with LD_PRELOAD=$(gcc -print-file-name=libasan.so) (see __main__ below for a build that leaves the normal one be).
SANITIZE = os.environ.get("DGGUF_SANITIZE", "") not in ("", "0")
_SANITIZER_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]

def _builder(base: Path | None) -> FFI:
    """The cffi builder; sources named relative to `base` (setuptools wants setup.py's directory), or absolute."""
    rel = (lambda p: str(p.relative_to(base))) if base is not None else str
    b = FFI()
    b.cdef(_cdef_text())
    b.set_source(
        "dgguf.core._native",
        '#include "dgguf.h"',
        sources=sorted(rel(p) for p in HERE.glob("*.c")),
        include_dirs=[rel(HERE)],
        libraries=["m", "pthread"],
        # -fno-trapping-math lets selects on floats vectorize (we never read FP exception flags); values unchanged
        extra_compile_args=["-std=c11", "-O1" if SANITIZE else "-O3", "-fno-strict-aliasing", "-fno-trapping-math",
                            "-Wall", "-Wextra", "-Wno-unused-parameter"] + (_SANITIZER_FLAGS if SANITIZE else []),
        # Windows (mingw-w64, pyproject.toml's cibuildwheel notes): libgcc and winpthreads linked in, no MinGW DLLs
        extra_link_args=(_SANITIZER_FLAGS if SANITIZE else []) + (["-static"] if sys.platform == "win32" else []),
    )
    return b


ffibuilder = _builder(HERE.parent)


def build_sanitized_tree(out: Path) -> Path:
    """OUT/dgguf: the Python packages (links into the source tree) with a sanitized dgguf.core._native, built in
    OUT/build. Put OUT first on PYTHONPATH: it shadows the installed dgguf, which stays as it was."""
    import shutil
    import sys
    root, out = HERE.parent, out.resolve()
    pkg = out / "dgguf"
    shutil.rmtree(pkg, ignore_errors=True)
    (pkg / "core").mkdir(parents=True)
    # every package of pyproject.toml's package-dir but core, e.g. "dgguf.format" = "format"
    dirs = re.findall(r'^"dgguf\.(\w+)" = "([\w/]+)"', (root / "pyproject.toml").read_text(), flags=re.M)
    for name, src in dirs:
        if name != "core":
            (pkg / name).symlink_to(root / src)
    for f in (root / "core").glob("*.py"):
        (pkg / "core" / f.name).symlink_to(f)
    so = _builder(None).compile(tmpdir=str(out / "build"), verbose=False)
    dest = pkg / "core" / Path(so).name
    shutil.copy2(so, dest)
    print(f"{'sanitized ' if SANITIZE else ''}native library: {dest}", file=sys.stderr)
    return dest


if __name__ == "__main__":
    import sys
    if SANITIZE and len(sys.argv) == 2:      # DGGUF_SANITIZE=1 python native/build_native.py OUT
        build_sanitized_tree(Path(sys.argv[1]))
    else:
        ffibuilder.compile(verbose=True)
