"""The `dgguf` command: convert, quantize, inspect.

User errors print one line, `error: <message>`, and exit 2; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys

from dgguf.convert.errors import DggufError
from dgguf.convert.quant_types import FILE_TYPES


def _threads(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--threads must be a positive integer, not {v!r}")
    return n


def _type_name(v: str) -> str:
    if v.upper() not in FILE_TYPES:
        raise argparse.ArgumentTypeError(f"unknown type {v!r}; choose one of: {', '.join(FILE_TYPES)}")
    return v.upper()


def cmd_convert(a) -> None:
    from dgguf.convert.quantize import convert_checkpoint
    out = convert_checkpoint(a.hf_dir, a.output, a.type, a.pure, a.force, a.threads, progress=not a.quiet)
    print(f"wrote {out}")


def cmd_quantize(a) -> None:
    from dgguf.convert.quantize import requantize
    out = requantize(a.input, a.output, a.type, a.pure, a.force, a.threads, progress=not a.quiet)
    print(f"wrote {out}")


def _short(v, limit: int = 6):
    if isinstance(v, list) and len(v) > limit:
        return v[:limit] + [f"... {len(v) - limit} more"]
    if isinstance(v, str) and len(v) > 200:
        return v[:200] + f"... ({len(v)} chars)"
    return v


def cmd_inspect(a) -> None:
    from dgguf.convert.gguf_file import read_gguf
    g = read_gguf(a.file)
    try:
        kv = {k: {"type": f.type.name if f.item_type is None else f"ARRAY[{f.item_type.name}]", "value": f.value}
              for k, f in g.fields.items()}
        tensors = [{"name": t.name, "ne": list(t.ne), "type": t.type.name, "bytes": t.nbytes} for t in g.tensors]
        if a.json:
            json.dump({"file": str(a.file), "kv": kv, "tensors": tensors}, sys.stdout)
            print()
            return
        print(f"{a.file}: {len(kv)} KV pairs, {len(tensors)} tensors, "
              f"{sum(t['bytes'] for t in tensors) / 2**20:.2f} MiB of tensor data")
        for k, f in kv.items():
            print(f"KV  {k:<52} {f['type']:<16} {_short(f['value'])!r}")
        for t in tensors:
            print(f"T   {t['name']:<52} {str(t['ne']):<22} {t['type']:<6} {t['bytes']}")
    finally:
        g.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dgguf", description="DiffusionGemma GGUF converter and runtime")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="HF checkpoint directory → GGUF")
    c.add_argument("hf_dir")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--type", type=_type_name, default=None,
                   help=f"file type ({', '.join(FILE_TYPES)}); default: the checkpoint's dtype")
    c.set_defaults(func=cmd_convert)

    q = sub.add_parser("quantize", help="GGUF → GGUF of another type")
    q.add_argument("input")
    q.add_argument("output")
    q.add_argument("type", type=_type_name)
    q.set_defaults(func=cmd_quantize)

    for s in (c, q):
        s.add_argument("--pure", action="store_true", help="every matrix in the base type (no preset mix)")
        s.add_argument("--force", action="store_true", help="overwrite an existing output file")
        s.add_argument("--threads", type=_threads, default=None)
        s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    i = sub.add_parser("inspect", help="show a GGUF's metadata and tensors")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DggufError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:   # output piped into `head`: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
