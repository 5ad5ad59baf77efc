"""The GGUF container: a validating reader and a streaming, atomic writer.

Layout (little-endian, version 3): magic "GGUF", version u32, tensor count u64, KV count u64; then the KV
pairs (key string, value type u32, value); then tensor infos (name, n_dims u32, ne u64 × n_dims, type u32,
data offset u64); then padding to `general.alignment` (32) and the tensor data, each tensor aligned.
Strings are u64 length + UTF-8 bytes; arrays are item type u32 + count u64 + items.

Our own code rather than gguf-py's: the reader must validate every size and offset of untrusted files and
parse a 262k-token vocabulary quickly; the writer streams row chunks of tensors far larger than memory and
must leave nothing that looks like a GGUF when interrupted.
"""
from __future__ import annotations

import mmap
import os
import re
import shutil
import stat
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf.constants import GGUFValueType as V

from dgguf.core.errors import DggufError
from .quant_types import BY_GGML, TensorType

MAGIC = b"GGUF"
ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 16

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(s, limit: int = 80) -> str:
    """A name or value read from a file, safe to print in one line of a message or listing.

    Characters that are not printable (NULs, newlines, ESC and other control or format characters, lone
    surrogates) become Python-style escapes (\\n, \\x1b, \\u202e); bytes are decoded as UTF-8 first, undecodable
    bytes shown as \\xNN. At most `limit` characters are kept (escapes count at their printed length, never
    split), then "..." marks the cut; limit None keeps everything."""
    if isinstance(s, (bytes, bytearray, memoryview)):
        s = bytes(s).decode("utf-8", "surrogateescape")
    elif not isinstance(s, str):
        s = str(s)
    out, n = [], 0
    for ch in s:
        if ch.isprintable():
            piece = ch
        elif ch in _ESCAPES:
            piece = _ESCAPES[ch]
        else:
            o = ord(ch)
            if 0xDC80 <= o <= 0xDCFF:        # an undecodable byte (surrogateescape)
                o -= 0xDC00
            piece = f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"
        if limit is not None and n + len(piece) > limit:
            return "".join(out) + "..."
        out.append(piece)
        n += len(piece)
    return "".join(out)


_SCALAR = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
           V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}
_NUMPY = {V.UINT8: "<u1", V.INT8: "<i1", V.UINT16: "<u2", V.INT16: "<i2", V.UINT32: "<u4", V.INT32: "<i4",
          V.FLOAT32: "<f4", V.BOOL: "?", V.UINT64: "<u8", V.INT64: "<i8", V.FLOAT64: "<f8"}


@dataclass
class Field:
    """One metadata value. For ARRAY, `value` is a list and `item_type` its element type."""
    type: V
    value: object
    item_type: V | None = None


@dataclass
class TensorInfo:
    name: str
    ne: tuple[int, ...]        # ggml order: ne[0] is the row length
    type: TensorType
    offset: int = 0            # relative to the start of the data section
    nbytes: int = 0

    def __post_init__(self):
        n = 1
        for d in self.ne:
            n *= d
        self.nvalues = n
        self.nbytes = self.type.nbytes(n)


def _align(n: int, a: int = ALIGNMENT) -> int:
    return (n + a - 1) // a * a


# ----------------------------------------------------------------------------------------------- writer

def _pack_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _pack_value(t: V, v) -> bytes:
    if t == V.STRING:
        return _pack_string(v)
    return struct.pack(_SCALAR[t], v)


def _pack_field(key: str, f: Field) -> bytes:
    out = [_pack_string(key), struct.pack("<I", int(f.type))]
    if f.type == V.ARRAY:
        out.append(struct.pack("<IQ", int(f.item_type), len(f.value)))
        if f.item_type == V.STRING:
            out.extend(_pack_string(s) for s in f.value)
        else:
            out.append(np.asarray(f.value, dtype=_NUMPY[f.item_type]).tobytes())
    else:
        out.append(_pack_value(f.type, f.value))
    return b"".join(out)


def header_bytes(fields: dict[str, Field], tensors: list[TensorInfo]) -> bytes:
    """The whole header up to the data section, with tensor offsets assigned (aligned)."""
    offset = 0
    for t in tensors:
        t.offset = offset
        offset = _align(offset + t.nbytes)
    parts = [MAGIC, struct.pack("<IQQ", 3, len(tensors), len(fields))]
    parts += [_pack_field(k, f) for k, f in fields.items()]
    for t in tensors:
        parts.append(_pack_string(t.name) + struct.pack("<I", len(t.ne)) + struct.pack(f"<{len(t.ne)}Q", *t.ne)
                     + struct.pack("<IQ", t.type.ggml, t.offset))
    head = b"".join(parts)
    return head + b"\0" * (_align(len(head)) - len(head))


class GGUFWriter:
    """Writes a GGUF to a hidden temp file beside `path`, renamed into place only when complete.

    The magic is written last, so an interrupted run never leaves a file that looks like a GGUF; the temp
    file is removed on any error, and temp files of writers to the same path that died (SIGKILL, power loss)
    are removed by the next one. Tensor data is appended in header order, in chunks of whole rows.

    `path` may name only a regular file (or nothing yet): never a directory, device, FIFO or socket, nor a
    symbolic link to one, and never one of `inputs` (the files the same command reads; compared by device and
    inode, so through symbolic and hard links too); an existing file is replaced only with `force`.
    """

    def __init__(self, path: Path, fields: dict[str, Field], tensors: list[TensorInfo], force: bool = False,
                 inputs=()):
        self.path = Path(path)
        self.force = force
        self.inputs = [Path(p) for p in inputs]
        check_output_path(self.path, force, self.inputs)
        self.header = header_bytes(fields, tensors)
        self.tensors = tensors
        self.total = len(self.header) + (_align(tensors[-1].offset + tensors[-1].nbytes) if tensors else 0)
        self.tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self._f = None
        self._created = False
        self._index = 0
        self._written = 0

    def __enter__(self):
        parent = self.path.parent
        if not parent.is_dir():
            raise DggufError(f"{self.path}: directory {parent} does not exist")
        remove_stale_partials(self.path)
        try:
            # "x": never through an existing file or symbolic link planted at the temp name
            self._f = open(self.tmp, "xb")
            _ACTIVE.add(str(self.tmp))
            self._created = True
        except OSError as e:
            self._abort()
            raise DggufError(f"{self.path}: cannot write: {e.strerror or e}") from e
        # Checked once the directory has proved writable, so that this message means space and nothing else.
        free = _disk_free(parent)
        if free is not None and free < self.total:
            self._abort()
            raise DggufError(f"{self.path}: not enough disk space ({self.total / 2**20:.1f} MiB needed, "
                             f"{free / 2**20:.1f} MiB free)")
        try:
            self._f.write(b"\0" * len(MAGIC) + self.header[len(MAGIC):])
        except OSError as e:
            self._abort()
            raise DggufError(f"{self.path}: cannot write: {e.strerror or e}") from e
        return self

    def write(self, data) -> None:
        """Append the next bytes of the current tensor (whole tensor or a run of rows)."""
        t = self.tensors[self._index]
        n = memoryview(data).nbytes
        if self._written + n > t.nbytes:
            raise DggufError(f"internal: {t.name}: {self._written + n} bytes written, {t.nbytes} expected")
        self._io(data)
        self._written += n
        if self._written == t.nbytes:
            self._io(b"\0" * (_align(t.nbytes) - t.nbytes))
            self._index += 1
            self._written = 0

    def _io(self, data) -> None:
        try:
            self._f.write(data)
        except OSError as e:
            raise DggufError(f"{self.path}: write failed: {e.strerror or e}") from e

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._abort()
            return False
        try:
            if self._index != len(self.tensors):
                raise DggufError(f"internal: only {self._index} of {len(self.tensors)} tensors were written")
            self._f.flush()
            self._f.seek(0)
            self._f.write(MAGIC)
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            check_output_path(self.path, self.force, self.inputs)   # again: the path may have changed meanwhile
            replace_output(self.tmp, self.path)
            self._created = False
            _ACTIVE.discard(str(self.tmp))
        except BaseException as e:
            self._abort()
            if isinstance(e, OSError):
                raise DggufError(f"{self.path}: write failed: {e.strerror or e}") from e
            raise
        return False

    def _abort(self) -> None:
        """Close and remove the temp file. Never raises: a failed clean-up (a read-only or vanished file
        system) must not hide the error that caused it; the next writer to this path removes what is left."""
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
        if self._created:
            try:
                self.tmp.unlink(missing_ok=True)
            except OSError:
                pass
            self._created = False
        _ACTIVE.discard(str(self.tmp))


# Temp files this process is writing now: the stale-file sweep must not take them for a dead process's.
_ACTIVE: set[str] = set()

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def check_output_path(path: Path, force: bool, inputs=()) -> None:
    """Refuse an output path that is not a regular file, that is one of `inputs`, or that exists without force."""
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise DggufError(f"{path}: cannot check the output path: {e.strerror or e}") from e
    st = lst
    link = stat.S_ISLNK(lst.st_mode)
    if link:
        try:
            st = os.stat(path)
        except OSError:
            st = None       # a dangling link: replacing the link itself touches nothing else
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a regular file")
        via = " (through a symbolic link)" if link else ""
        raise DggufError(f"{path}: output path is {kind}{via}; only a regular file can be replaced")
    if st is not None:
        for p in inputs:
            try:
                ist = os.stat(p)
            except OSError:
                continue
            if (ist.st_dev, ist.st_ino) == (st.st_dev, st.st_ino):
                same = "" if os.path.abspath(p) == os.path.abspath(path) else f" ({p}, through a link)"
                raise DggufError(f"{path}: output path is an input file of this command{same}; choose another "
                                 "output path")
    if not force:
        raise DggufError(f"{path}: output file exists (use --force to overwrite)")


# Windows refuses to replace a file that a process holds open or mapped (PermissionError), and virus scanners open
# new files briefly: a few tries over about a second, then a message that says what to do.
_REPLACE_TRIES = (0.05, 0.1, 0.2, 0.3, 0.4)
_WINDOWS = sys.platform == "win32"


def replace_output(tmp: Path, path: Path) -> None:
    """os.replace(tmp, path); on Windows retried while `path` is held, then a DggufError naming it."""
    for delay in _REPLACE_TRIES if _WINDOWS else ():
        try:
            os.replace(tmp, path)
            return
        except PermissionError:
            time.sleep(delay)
    try:
        os.replace(tmp, path)
    except PermissionError as e:
        if not _WINDOWS:
            raise
        raise DggufError(f"{path}: cannot replace it: another program (or a model loaded from it) has it open or "
                         f"mapped; close that and run again ({e.strerror or e})") from e


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if _WINDOWS:   # os.kill(pid, 0) would send CTRL_C_EVENT there; unknown counts as alive
        return _pid_alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):   # EPERM: alive, someone else's; nonsense pids: leave alone
        return True
    return True


def abandoned(path: Path, tag: str):
    """(entry, pid) for each .NAME.TAG-PID beside `path` (what a writer of `path` stages under its process id)
    whose process no longer runs. One of this process's own counts too unless a writer holds it (_ACTIVE): its
    pid was reused."""
    pattern = re.compile(r"\." + re.escape(path.name) + r"\." + tag + r"-([0-9]{1,10})")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        entry, pid = path.parent / name, int(m.group(1))
        if str(entry) in _ACTIVE or (pid != os.getpid() and _pid_alive(pid)):
            continue
        yield entry, pid


def remove_stale_partials(path: Path) -> list[Path]:
    """Remove the temp files of earlier writers to `path` whose process no longer runs (say so on stderr).

    Only names of our own pattern (.NAME.partial-PID) are considered, and only regular files or links are
    removed (a link itself, never its target)."""
    removed = []
    for p, pid in abandoned(Path(path), "partial"):
        try:
            mode = os.lstat(p).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                continue
            os.unlink(p)
        except OSError:
            continue
        print(f"note: removed {p}, a partial output left by process {pid}, which no longer runs", file=sys.stderr)
        removed.append(p)
    return removed


def _pid_alive_windows(pid: int) -> bool:
    try:
        import ctypes
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)   # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() != 87            # ERROR_INVALID_PARAMETER: no such process
        code = ctypes.c_ulong()
        ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return not ok or code.value == 259                  # STILL_ACTIVE
    except (OSError, AttributeError, ValueError):
        return True


def _disk_free(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free   # statvfs's f_bavail * f_frsize on POSIX; Windows has no statvfs
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------- reader

@dataclass
class GGUFFile:
    path: Path
    fields: dict[str, Field]
    tensors: list[TensorInfo]
    data_offset: int
    _mm: mmap.mmap | None = field(default=None, repr=False)

    def get(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.value

    def tensor_bytes(self, t: TensorInfo) -> np.ndarray:
        """The raw bytes of a tensor, as a read-only uint8 view of the mapped file."""
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=self.data_offset + t.offset)

    def close(self) -> None:
        """Release the mapping; arrays still viewing it keep it alive until they are gone."""
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
            self._mm = None


class _Cursor:
    """Bounds-checked reads from the mapped header; every failure names the file and what was being read."""

    def __init__(self, path: Path, buf):
        self.path, self.buf, self.pos, self.size = path, buf, 0, len(buf)

    def fail(self, what: str):
        raise DggufError(f"{self.path}: corrupt or truncated GGUF ({what} at byte {self.pos})")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            self.fail(f"file ends inside {what}")
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        if n > self.size - self.pos:
            self.fail(f"{what} length {n} runs past the end of the file")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8: {printable(raw)}")

    def value(self, t: int, what: str):
        try:
            t = V(t)
        except ValueError:
            self.fail(f"unknown value type {t} in {what}")
        if t == V.STRING:
            return Field(t, self.string(what))
        if t == V.ARRAY:
            it = self.unpack("<I", what)
            n = self.unpack("<Q", what)
            try:
                it = V(it)
            except ValueError:
                self.fail(f"unknown array item type {it} in {what}")
            if it == V.STRING:
                if n > (self.size - self.pos) // 8:
                    self.fail(f"{what} claims {n} strings")
                return Field(t, [self.string(what) for _ in range(n)], it)
            if it == V.ARRAY:
                self.fail(f"nested arrays in {what}")
            width = struct.calcsize(_SCALAR[it])
            if n > (self.size - self.pos) // width:
                self.fail(f"{what} claims {n} items")
            arr = np.frombuffer(self.buf, dtype=_NUMPY[it], count=n, offset=self.pos)
            self.pos += n * width
            return Field(t, arr.tolist(), it)
        return Field(t, self.unpack(_SCALAR[t], what))


def read_gguf(path, whole_set: bool = True) -> GGUFFile:
    """Parse and validate a GGUF header; tensor data stays memory-mapped. The first file of a split set is read
    as the whole set, every part checked (format/split.py), unless whole_set is False."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise DggufError(f"{path}: cannot open: {e.strerror}") from e
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 24:
            raise DggufError(f"{path}: not a GGUF file (only {size} bytes)")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        g = _parse(path, mm)
    except BaseException:
        mm.close()
        raise
    if whole_set and "split.count" in g.fields:
        from .split import open_set
        return open_set(g, lambda p: read_gguf(p, whole_set=False))
    return g


_INTEGER_TYPES = (V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64)


def _alignment(path: Path, f: Field | None) -> int:
    """general.alignment: any integer type (llama.cpp and gguf-py insist on UINT32; we are lenient on the type),
    a power of two from 8 (native code reads F32 data in place, so every float must stay aligned; llama.cpp
    accepts any power of two) to 2^16."""
    if f is None:
        return ALIGNMENT
    if f.type not in _INTEGER_TYPES:
        raise DggufError(f"{path}: general.alignment is a {f.type.name}, not an integer")
    align = int(f.value)
    if not 8 <= align <= MAX_ALIGNMENT or align & (align - 1):
        raise DggufError(f"{path}: general.alignment {align} is not a power of two in 8..{MAX_ALIGNMENT}")
    return align


def _parse(path: Path, mm) -> GGUFFile:
    c = _Cursor(path, mm)
    if mm[:4] != MAGIC:
        raise DggufError(f"{path}: not a GGUF file (bad magic {bytes(mm[:4])!r})")
    c.pos = 4
    version = c.unpack("<I", "version")
    if version not in (2, 3):
        raise DggufError(f"{path}: unsupported GGUF version {version} (2 or 3 expected)")
    n_tensors, n_kv = c.unpack("<QQ", "counts")
    if n_tensors > c.size // 24 or n_kv > c.size // 12:
        c.fail(f"implausible counts ({n_tensors} tensors, {n_kv} KV pairs)")
    fields: dict[str, Field] = {}
    for _ in range(n_kv):
        key = c.string("KV key")
        shown = f"key {printable(key)}"
        if key in fields:     # llama.cpp's reader refuses these too ("duplicate key")
            c.fail(f"duplicate metadata {shown}")
        fields[key] = c.value(c.unpack("<I", f"type of {shown}"), shown)
    tensors = []
    for _ in range(n_tensors):
        name = c.string("tensor name")
        shown = printable(name)
        nd = c.unpack("<I", f"dims of {shown}")
        if not 1 <= nd <= 4:
            c.fail(f"tensor {shown} has {nd} dimensions")
        ne = tuple(c.unpack(f"<{nd}Q", f"shape of {shown}")) if nd > 1 else (c.unpack("<Q", f"shape of {shown}"),)
        gt, off = c.unpack("<IQ", f"type of {shown}")
        tt = BY_GGML.get(gt)
        if tt is None:
            raise DggufError(f"{path}: tensor {shown} has unsupported type {gt}")
        if any(d == 0 for d in ne) or ne[0] % tt.block_size:
            raise DggufError(f"{path}: tensor {shown} has invalid shape {list(ne)} for type {tt.name}")
        tensors.append(TensorInfo(name, ne, tt, off))
    align = _alignment(path, fields.get("general.alignment"))
    data_offset = _align(c.pos, align)
    names = set()
    for t in tensors:
        if t.name in names:
            raise DggufError(f"{path}: tensor {printable(t.name)} appears twice")
        names.add(t.name)
        if t.offset % align:
            raise DggufError(f"{path}: tensor {printable(t.name)} data offset {t.offset} is not aligned to {align}")
        end = data_offset + t.offset + t.nbytes
        if end > c.size:
            raise DggufError(f"{path}: truncated: tensor {printable(t.name)} ends at byte {end}, file has {c.size}")
    return GGUFFile(path, fields, tensors, data_offset, mm)
