"""`dgguf inspect`: a GGUF's metadata and tensors."""
from __future__ import annotations

import json
import sys

from dgguf.format.gguf_file import printable


def _shown(v, items: int = 6) -> str:
    """A value for the listing: long arrays cut to their first items, strings escaped and cut (printable)."""
    if isinstance(v, list):
        more = f", ... {len(v) - items} more" if len(v) > items else ""
        return "[" + ", ".join(_shown(x) for x in v[:items]) + more + "]"
    if isinstance(v, str):
        return "'" + printable(v, 200) + "'" + (f" ({len(v)} chars)" if len(v) > 200 else "")
    return printable(repr(v))


def _file_type(ftype) -> str:
    from dgguf.format.quant_types import FILE_TYPES
    names = {ft.ftype: name for name, ft in FILE_TYPES.items()}
    return names.get(ftype, "unknown to dgguf") if ftype is not None else "not stated"


def _tokenizer_source(g) -> str:
    from dgguf.runtime.tokenizer import tokenizer_source
    return tokenizer_source(g)


def run(a) -> None:
    from dgguf.format.gguf_file import read_gguf
    g = read_gguf(a.file)
    try:
        kv = {k: {"type": f.type.name if f.item_type is None else f"ARRAY[{f.item_type.name}]", "value": f.value}
              for k, f in g.fields.items()}
        tensors = [{"name": t.name, "ne": list(t.ne), "type": t.type.name, "bytes": t.nbytes} for t in g.tensors]
        ftype = g.get("general.file_type")
        summary = {"file_type": _file_type(ftype), "tokenizer": _tokenizer_source(g)}
        if a.json:   # JSON escapes every control character itself
            json.dump({"file": str(a.file), **summary, "kv": kv, "tensors": tensors}, sys.stdout)
            print()
            return
        print(f"{printable(a.file, None)}: {len(kv)} KV pairs, {len(tensors)} tensors, "
              f"{sum(t['bytes'] for t in tensors) / 2**20:.2f} MiB of tensor data")
        print(f"file type: {summary['file_type']}; tokenizer: {summary['tokenizer']}")
        for k, f in kv.items():
            value = _shown(f["value"])
            if k == "general.file_type":
                value += f" ({summary['file_type']})"
            print(f"KV  {printable(k):<52} {f['type']:<16} {value}")
        for t in tensors:
            print(f"T   {printable(t['name']):<52} {str(t['ne']):<22} {t['type']:<6} {t['bytes']}")
    finally:
        g.close()


def add_parser(sub) -> None:
    i = sub.add_parser("inspect", help="show a GGUF's metadata and tensors")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=run)
