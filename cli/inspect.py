"""`dgguf inspect`: a GGUF's metadata and tensors."""
from __future__ import annotations

import json
import sys


def _short(v, limit: int = 6):
    if isinstance(v, list) and len(v) > limit:
        return v[:limit] + [f"... {len(v) - limit} more"]
    if isinstance(v, str) and len(v) > 200:
        return v[:200] + f"... ({len(v)} chars)"
    return v


def run(a) -> None:
    from dgguf.format.gguf_file import read_gguf
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


def add_parser(sub) -> None:
    i = sub.add_parser("inspect", help="show a GGUF's metadata and tensors")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=run)
