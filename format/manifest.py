"""Manifests: the sha256 of every tensor's bytes and of every file of a GGUF (or split set), as JSON.

    {"format": "dgguf-manifest", "version": 1, "algorithm": "sha256",
     "files":   [{"name": "m-00001-of-00002.gguf", "size": 123, "sha256": "..."}, ...],
     "tensors": [{"name": "token_embd.weight", "file": "m-00001-of-00002.gguf", "type": "Q8_0",
                  "ne": [256, 4096], "bytes": 1114112, "sha256": "..."}, ...]}

File names are relative to the directory that holds the GGUF files (the manifest is written there, beside
them); files and tensors are listed in set order. A file's sha256 is that of its whole content, as sha256sum
and the Hugging Face hub's LFS pointers compute it. Hashing runs on threads (hashlib releases the GIL on large
buffers): files and tensors at once, largest first, so a set is checked at about the disk's read speed.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dgguf.core.errors import DggufError

from .gguf_file import check_output_path, printable, read_gguf, remove_stale_partials, replace_output

FORMAT = "dgguf-manifest"
VERSION = 1
_CHUNK = 16 << 20


def default_threads() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def manifest_path(path) -> Path:
    """Where a manifest goes by default: beside the output, its prefix (see split_prefix) + .manifest.json."""
    from .split import split_prefix
    prefix = split_prefix(path)
    return prefix.with_name(prefix.name + ".manifest.json")


def _hash_file(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    size = 0
    try:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                h.update(view[:n])
                size += n
    except OSError as e:
        raise DggufError(f"{path}: cannot read: {e.strerror or e}") from e
    return size, h.hexdigest()


def _hash_bytes(data) -> str:
    return hashlib.sha256(memoryview(data)).hexdigest()


def _tensor_entry(g, t) -> dict:
    return {"name": t.name, "file": _owner_name(g, t), "type": t.type.name, "ne": list(t.ne), "bytes": t.nbytes}


def _owner_name(g, t) -> str:
    return (g.file_of(t) if hasattr(g, "file_of") else g.path).name


def _file_paths(g) -> list[Path]:
    return list(getattr(g, "paths", [g.path]))


def hash_all(files: list[Path], g=None, threads: int | None = None) -> tuple[dict[Path, tuple[int, str]],
                                                                             dict[str, str]]:
    """(path → (size, sha256)) for `files` and (tensor name → sha256) for every tensor of the open GGUF `g`
    (None: no tensors), hashed on `threads` threads."""
    tensors = sorted(g.tensors, key=lambda t: -t.nbytes) if g is not None else []
    with ThreadPoolExecutor(max_workers=threads or default_threads()) as pool:
        # whole files first: each is one serial hash, the longest tasks
        file_futs = {p: pool.submit(_hash_file, p) for p in files}
        tensor_futs = {t.name: pool.submit(_hash_bytes, g.tensor_bytes(t)) for t in tensors}
        return ({p: f.result() for p, f in file_futs.items()}, {n: f.result() for n, f in tensor_futs.items()})


def build_manifest(path, threads: int | None = None) -> dict:
    """The manifest of a GGUF or of the split set its first file starts."""
    g = read_gguf(path)
    try:
        files = _file_paths(g)
        file_hashes, tensor_hashes = hash_all(files, g, threads)
        return {"format": FORMAT, "version": VERSION, "algorithm": "sha256",
                "files": [{"name": p.name, "size": file_hashes[p][0], "sha256": file_hashes[p][1]} for p in files],
                "tensors": [{**_tensor_entry(g, t), "sha256": tensor_hashes[t.name]} for t in g.tensors]}
    finally:
        g.close()


def write_text(path: Path, text: str, force: bool = False, inputs=()) -> Path:
    """Write a text file atomically: a temp file beside `path` (.NAME.partial-PID, as GGUFWriter's), renamed when
    complete; `path` is checked as GGUFWriter checks its path."""
    path = Path(path)
    check_output_path(path, force, inputs)
    remove_stale_partials(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        check_output_path(path, force, inputs)
        replace_output(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise DggufError(f"{path}: cannot write: {e.strerror or e}") from e
        raise
    return path


def write_manifest(gguf_path, out=None, force: bool = False, threads: int | None = None, inputs=()) -> Path:
    """Hash a written GGUF (or split set, given its first file) and write its manifest (default: beside it)."""
    out = Path(out) if out is not None else manifest_path(gguf_path)
    return write_text(out, dumps(build_manifest(gguf_path, threads)), force, inputs)


def dumps(m: dict) -> str:
    """A manifest as JSON text with one line per file and per tensor (readable, and diffs line by line)."""
    lists = ("files", "tensors")
    out = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in m.items() if k not in lists]
    for i, key in enumerate(lists):
        items = ",\n".join("  " + json.dumps(e) for e in m[key])
        out.append(f" {json.dumps(key)}: [\n{items}\n ]" + ("," if i == 0 else ""))
    return "\n".join(out) + "\n}\n"


def load_manifest(path) -> dict:
    """A manifest, its structure checked; DggufError naming the file otherwise."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except FileNotFoundError:
        raise DggufError(f"{path}: no manifest there (write one with --manifest, or name it with --manifest PATH)") \
            from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DggufError(f"{path}: cannot read the manifest: {printable(getattr(e, 'strerror', None) or e)}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DggufError(f"{path}: not a dgguf manifest (no \"format\": \"{FORMAT}\")")
    if m.get("version") != VERSION or m.get("algorithm") != "sha256":
        raise DggufError(f"{path}: manifest version {printable(repr(m.get('version')))} / algorithm "
                         f"{printable(repr(m.get('algorithm')))} not supported (version {VERSION}, sha256 expected)")

    def entries(key: str, fields: dict) -> list[dict]:
        items = m.get(key)
        if not isinstance(items, list):
            raise DggufError(f"{path}: manifest has no \"{key}\" list")
        for i, e in enumerate(items):
            if not isinstance(e, dict) or any(not isinstance(e.get(k), t) or isinstance(e.get(k), bool) and t is int
                                              for k, t in fields.items()):
                raise DggufError(f"{path}: manifest {key}[{i}] lacks one of {', '.join(fields)} or has the wrong "
                                 "type")
        return items

    files = entries("files", {"name": str, "size": int, "sha256": str})
    entries("tensors", {"name": str, "file": str, "sha256": str})
    for e in files:
        if Path(e["name"]).name != e["name"] or e["name"] in ("", ".", ".."):
            raise DggufError(f"{path}: manifest file name {printable(repr(e['name']))} is not a plain file name")
    return m


def verify(path, manifest=None, threads: int | None = None) -> tuple[list[str], str]:
    """Check a GGUF (or split set, given its first file) against its manifest: (one line per mismatch, a summary).
    The files are looked for in `path`'s directory. DggufError for a user's error (no or bad manifest, `path`
    not among its files, `path` unreadable)."""
    path = Path(path)
    mpath = Path(manifest) if manifest is not None else manifest_path(path)
    m = load_manifest(mpath)
    names = [e["name"] for e in m["files"]]
    if path.name not in names:
        raise DggufError(f"{mpath}: the manifest lists {', '.join(printable(n) for n in names[:4])}"
                         f"{', ...' if len(names) > 4 else ''}, not {path.name}")
    if path.name != names[0]:
        raise DggufError(f"{path}: the manifest {mpath.name} describes a split set; verify it by its first file, "
                         f"{names[0]}")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise DggufError(f"{path}: cannot open: {e.strerror or e}") from e
    t0 = time.perf_counter()
    bad: list[str] = []
    files = {path.with_name(n): e for n, e in zip(names, m["files"])}
    present = []
    for p, e in files.items():
        try:
            size = os.stat(p).st_size
        except OSError as err:
            bad.append(f"{p}: {'missing' if isinstance(err, FileNotFoundError) else err.strerror or err}")
            continue
        if size != e["size"]:
            bad.append(f"{p}: size {size}, the manifest says {e['size']}")
        else:
            present.append(p)
    g = unread = None
    try:
        g = read_gguf(path)
    except DggufError as e:
        unread = f"tensors not checked: {e}"
    try:
        if g is not None:
            for p in _file_paths(g):
                if p.name not in names:
                    bad.append(f"{p}: a part of this set that the manifest does not list")
        file_hashes, tensor_hashes = hash_all(present, g, threads)
        for p in present:
            if file_hashes[p][1] != files[p]["sha256"]:
                bad.append(f"{p}: sha256 {file_hashes[p][1]}, the manifest says {files[p]['sha256']}")
        n_bytes = sum(file_hashes[p][0] for p in present)
        if unread:
            bad.append(unread)
        if g is not None:
            have = {t.name: t for t in g.tensors}
            listed = set()
            for e in m["tensors"]:
                name = e["name"]
                listed.add(name)
                t = have.get(name)
                shown = printable(name)
                if t is None:
                    bad.append(f"tensor {shown}: missing from {path.name}")
                    continue
                now = _tensor_entry(g, t)
                diffs = [f"{k} {now[k]}, the manifest says {printable(repr(e[k]))}"
                         for k in ("file", "type", "ne", "bytes") if k in e and e[k] != now[k]]
                if tensor_hashes[name] != e["sha256"]:
                    diffs.append("its bytes' sha256 differs")
                if diffs:
                    bad.append(f"tensor {shown} ({now['file']}): {'; '.join(diffs)}")
            for t in g.tensors:
                if t.name not in listed:
                    bad.append(f"tensor {printable(t.name)} ({_owner_name(g, t)}): not in the manifest")
    finally:
        if g is not None:
            g.close()
    dt = time.perf_counter() - t0
    summary = (f"{path.name}: {len(m['files'])} file(s) and {len(m['tensors'])} tensors match {mpath.name} "
               f"({n_bytes / 2**20:.1f} MiB hashed in {dt:.2f} s, {n_bytes / 2**20 / max(dt, 1e-9):.0f} MiB/s)")
    return bad, summary
