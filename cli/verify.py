"""`dgguf verify`: check a GGUF (or a split set, given its first file) against its manifest of sha256 hashes.

Prints one line per mismatch (a file's size or hash, a tensor's bytes, type or shape, a file or tensor missing
or unlisted) and exits 1; prints a summary and exits 0 when everything matches; exits 2 on a user's error (no
manifest, an unreadable file).
"""
from __future__ import annotations

import sys

from dgguf.core.native import MAX_THREADS

from .args import positive


def run(a) -> None:
    from dgguf.format.gguf_file import printable
    from dgguf.format.manifest import verify
    bad, summary = verify(a.file, a.manifest, a.threads)
    for line in bad:
        print(printable(line, None))
    if bad:
        print(f"{len(bad)} mismatch{'es' if len(bad) > 1 else ''}", file=sys.stderr)
        raise SystemExit(1)
    print(summary)


def add_parser(sub) -> None:
    v = sub.add_parser("verify", help="check a GGUF or split set against its manifest (sha256 of files and tensors)")
    v.add_argument("file", help="the GGUF, or a split set's first file")
    v.add_argument("--manifest", default=None, metavar="PATH",
                   help="the manifest (default: beside the file, PREFIX.manifest.json as --manifest writes it)")
    v.add_argument("--threads", type=positive("--threads", MAX_THREADS), default=None,
                   help="hashing threads (default: the CPU count, at most 16)")
    v.set_defaults(func=run)
