"""`dgguf convert` (HF checkpoint → GGUF) and `dgguf quantize` (GGUF → GGUF of another type)."""
from __future__ import annotations

import argparse

from dgguf.core.errors import DggufError
from dgguf.core.native import MAX_THREADS
from dgguf.format.quant_types import FILE_TYPES

from .args import positive, type_name


def _size(v: str) -> int:
    from dgguf.format.split import parse_size
    try:
        return parse_size(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _output(a):
    from dgguf.convert.quantize import Output
    return Output(a.split_max_size, a.split_max_tensors, a.manifest)


def _quant(a):
    """--imatrix / --target-size as convert.quantize.Quant (None when neither is given)."""
    if a.imatrix is None and a.target_size is None:
        return None
    from dgguf.convert.quantize import Quant
    return Quant(a.imatrix, a.target_size, on_mix=_print_lines)


def _print_lines(lines) -> None:
    for line in lines:
        print(line)


def _wrote(first, a) -> None:
    from dgguf.format.manifest import manifest_path
    from dgguf.format.split import set_paths
    for p in set_paths(first) if _output(a).split else [first]:
        print(f"wrote {p}")
    if a.manifest:
        print(f"wrote {manifest_path(a.output)}")


def print_plan(tensors, a) -> None:
    """--dry-run: each tensor's type, shape and size, a split set's parts, then the total and bits per weight."""
    from dgguf.format.gguf_file import printable
    from dgguf.format.split import output_paths, plan_split
    for t in tensors:
        print(f"{printable(t.name):<44} {t.type.name:<6} {str(list(t.ne)):<20} {t.nbytes:>14,}")
    if _output(a).split:
        parts = plan_split(tensors, a.split_max_size, a.split_max_tensors, a.output)
        for p, part in zip(output_paths(a.output, tensors, a.split_max_size, a.split_max_tensors), parts):
            print(f"part {printable(p.name)}: {len(part)} tensors, {sum(t.nbytes for t in part):,} bytes")
    total = sum(t.nbytes for t in tensors)
    weights = sum(t.nvalues for t in tensors)
    print(f"total: {len(tensors)} tensors, {total:,} bytes ({total / 2**20:.2f} MiB) of tensor data, "
          f"{8 * total / max(weights, 1):.3f} bits per weight; nothing written (--dry-run)")


def run_convert(a) -> None:
    from dgguf.convert.quantize import convert_checkpoint, convert_plan
    if a.target_size is not None and a.type is None:
        raise DggufError("--target-size needs --type: the file type the file is labelled with (e.g. Q3_K_M)")
    if a.dry_run:
        return print_plan(convert_plan(a.hf_dir, a.type, a.pure, _quant(a)), a)
    out = convert_checkpoint(a.hf_dir, a.output, a.type, a.pure, a.force, a.threads, progress=not a.quiet,
                             output=_output(a), quant=_quant(a))
    _wrote(out, a)


def run_quantize(a) -> None:
    from dgguf.convert.quantize import requantize, requantize_plan
    if a.dry_run:
        return print_plan(requantize_plan(a.input, a.type, a.pure, a.allow_requantize, _quant(a)), a)
    out = requantize(a.input, a.output, a.type, a.pure, a.force, a.threads, progress=not a.quiet,
                     allow_requantize=a.allow_requantize, output=_output(a), quant=_quant(a))
    _wrote(out, a)


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
    q.add_argument("--allow-requantize", action="store_true",
                   help="let already-quantized tensors become another quantized type (as llama-quantize)")
    q.set_defaults(func=run_quantize)

    for s in (c, q):
        s.add_argument("--pure", action="store_true", help="every matrix in the base type (no preset mix)")
        s.add_argument("--force", action="store_true", help="overwrite an existing output file")
        s.add_argument("--threads", type=positive("--threads", MAX_THREADS), default=None)
        s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        s.add_argument("--split-max-size", type=_size, default=None, metavar="SIZE",
                       help="write a split set (llama.cpp's gguf-split layout, OUT-00001-of-0000N.gguf ...) of "
                            "parts holding at most SIZE of tensor data each (4G = 4*10^9 bytes; 500M, 2GiB)")
        s.add_argument("--split-max-tensors", type=positive("--split-max-tensors"), default=None, metavar="N",
                       help="write a split set of parts holding at most N tensors each")
        s.add_argument("--manifest", action="store_true",
                       help="also write OUT.manifest.json: the sha256 of every tensor and file (dgguf verify)")
        s.add_argument("--dry-run", action="store_true",
                       help="print each tensor's type and size and the total; write nothing")
        s.add_argument("--imatrix", default=None, metavar="FILE",
                       help="importance matrix (llama.cpp's imatrix GGUF, e.g. from dgguf imatrix): the quantizers "
                            "minimise the error weighted by it")
        s.add_argument("--target-size", type=_size, default=None, metavar="SIZE",
                       help="choose each quantized tensor's type (Q2_K .. Q8_0, IQ4_XS) so the file fits SIZE "
                            "(bytes, or 5M, 2GiB ...) with the least predicted loss; prints the mix")
