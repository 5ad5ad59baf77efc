"""`dgguf convert` (HF checkpoint → GGUF) and `dgguf quantize` (GGUF → GGUF of another type)."""
from __future__ import annotations

from dgguf.core.native import MAX_THREADS
from dgguf.format.quant_types import FILE_TYPES

from .args import positive, type_name


def run_convert(a) -> None:
    from dgguf.convert.quantize import convert_checkpoint
    out = convert_checkpoint(a.hf_dir, a.output, a.type, a.pure, a.force, a.threads, progress=not a.quiet)
    print(f"wrote {out}")


def run_quantize(a) -> None:
    from dgguf.convert.quantize import requantize
    out = requantize(a.input, a.output, a.type, a.pure, a.force, a.threads, progress=not a.quiet)
    print(f"wrote {out}")


def add_parsers(sub) -> None:
    c = sub.add_parser("convert", help="HF checkpoint directory → GGUF")
    c.add_argument("hf_dir")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--type", type=type_name, default=None,
                   help=f"file type ({', '.join(FILE_TYPES)}); default: the checkpoint's dtype")
    c.set_defaults(func=run_convert)

    q = sub.add_parser("quantize", help="GGUF → GGUF of another type")
    q.add_argument("input")
    q.add_argument("output")
    q.add_argument("type", type=type_name)
    q.set_defaults(func=run_quantize)

    for s in (c, q):
        s.add_argument("--pure", action="store_true", help="every matrix in the base type (no preset mix)")
        s.add_argument("--force", action="store_true", help="overwrite an existing output file")
        s.add_argument("--threads", type=positive("--threads", MAX_THREADS), default=None)
        s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
