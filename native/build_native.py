"""cffi builder for dgguf.core._native: compiles every native/*.c against native/dgguf.h.

Flags are portable on purpose: fast paths select their instruction sets per
function (target attributes) and are chosen at run time, so no -march here.
"""
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADER = HERE / "dgguf.h"


def _cdef_text() -> str:
    """The header without preprocessor lines: cffi's cdef parses plain declarations."""
    text = HEADER.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "dgguf.core._native",
    '#include "dgguf.h"',
    # setuptools wants paths relative to setup.py's directory
    sources=sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("*.c")),
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    libraries=["m", "pthread"],
    # -fno-trapping-math lets selects on floats vectorize (we never read FP exception flags); values unchanged
    extra_compile_args=["-std=c11", "-O3", "-fno-strict-aliasing", "-fno-trapping-math", "-Wall", "-Wextra",
                        "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
