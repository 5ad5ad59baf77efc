"""Split GGUF sets in llama.cpp's gguf-split layout: writing them, and reading one given its first file.

A set of N parts is named PREFIX-00001-of-0000N.gguf ... PREFIX-0000N-of-0000N.gguf. Every part is a complete GGUF
with three keys of its own: split.no (UINT16, 0-based), split.count (UINT16, N) and split.tensors.count (INT32,
the tensors of the whole set). The first part carries all the other metadata too (the split keys after it, as
gguf-split appends them); the later parts carry the split keys only. Tensors are never cut across parts, and
each part's tensor data starts at offset 0 of its own data section.

`read_gguf` hands a file holding split.count to `open_set`, which opens and checks every part and returns a
SplitGGUF: the same interface as GGUFFile (path, fields, get, tensors, tensor_bytes, close) over the whole set.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf.constants import GGUFValueType as V

from dgguf.core.errors import DggufError

from .gguf_file import (ALIGNMENT, Field, GGUFFile, GGUFWriter, TensorInfo, _ACTIVE, _align, abandoned, check_output_path,
                        printable, replace_output)

SPLIT_NO = "split.no"
SPLIT_COUNT = "split.count"
SPLIT_TENSORS = "split.tensors.count"
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS)
MAX_PARTS = 0xFFFF            # split.no and split.count are UINT16
_NAME = re.compile(r"-([0-9]{5})-of-([0-9]{5})\.gguf")


def split_path(prefix, no: int, count: int) -> Path:
    """Part `no` (0-based) of `count`: PREFIX-00001-of-00003.gguf for no 0, count 3 (llama.cpp's pattern)."""
    return Path(f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf")


def split_prefix(path) -> Path:
    """The prefix parts are named from, given an output path: its name without -0000K-of-0000N.gguf or .gguf."""
    path = Path(path)
    m = _NAME.search(path.name)
    if m and m.end() == len(path.name):
        return path.with_name(path.name[:m.start()])
    return path.with_name(path.name[:-5]) if path.name.endswith(".gguf") and len(path.name) > 5 else path


def set_paths(path) -> list[Path]:
    """Every part's path when `path` is named as a part of a split set (by its name alone), else [path]."""
    path = Path(path)
    m = _NAME.search(path.name)
    if not m or m.end() != len(path.name) or int(m.group(2)) < 1:
        return [path]
    prefix = path.with_name(path.name[:m.start()])
    n = int(m.group(2))
    return [split_path(prefix, i, n) for i in range(n)]


def parse_size(v: str) -> int:
    """A byte count: a number with an optional unit, K, M, G or T decimal (gguf-split's M and G are 10^6 and 10^9)
    or KiB, MiB, GiB, TiB binary; B or nothing for bytes. ValueError for anything else or a size < 1 byte."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]i?B?|B)?\s*", v, flags=re.I)
    if not m:
        raise ValueError(f"not a size: {v!r} (examples: 4G, 500M, 2GiB)")
    unit = (m.group(2) or "B").upper().rstrip("B")
    scale = 1 if not unit else (1024 if unit.endswith("I") else 1000) ** ("KMGT".index(unit[0]) + 1)
    n = int(float(m.group(1)) * scale)
    if n < 1:
        raise ValueError(f"size {v!r} is less than one byte")
    return n


# ----------------------------------------------------------------------------------------------- writing

def plan_split(tensors: list[TensorInfo], max_bytes: int | None = None, max_tensors: int | None = None,
               where: str = "output") -> list[list[TensorInfo]]:
    """Tensors grouped into parts in file order, as gguf-split groups them: a new part starts when the current
    part's tensor data (each tensor padded to the alignment; headers not counted) would pass max_bytes, or
    when it holds max_tensors tensors. A tensor larger than max_bytes is an error (tensors are never cut)."""
    parts: list[list[TensorInfo]] = [[]]
    size = 0
    for t in tensors:
        n = _align(t.nbytes, ALIGNMENT)
        if max_bytes is not None and n > max_bytes:
            raise DggufError(f"{where}: tensor {printable(t.name)} alone takes {n} bytes, more than the split size "
                             f"{max_bytes}; tensors are never cut across parts, so choose a larger size")
        full = (max_bytes is not None and size + n > max_bytes) or (max_tensors is not None
                                                                   and len(parts[-1]) >= max_tensors)
        if parts[-1] and full:
            parts.append([])
            size = 0
        parts[-1].append(t)
        size += n
    if len(parts) > MAX_PARTS:
        raise DggufError(f"{where}: {len(parts)} parts, more than a split set can number ({MAX_PARTS})")
    return parts


def part_fields(fields: dict[str, Field], no: int, count: int, n_tensors: int) -> dict[str, Field]:
    """A part's metadata: the first part's is `fields` (any split keys it had dropped) then the split keys;
    the later parts' is the split keys alone."""
    out = {k: f for k, f in fields.items() if k not in SPLIT_KEYS} if no == 0 else {}
    out[SPLIT_NO] = Field(V.UINT16, no)
    out[SPLIT_COUNT] = Field(V.UINT16, count)
    out[SPLIT_TENSORS] = Field(V.INT32, n_tensors)
    return out


class SplitWriter:
    """Writes a split set with GGUFWriter's interface (`write` the tensors' bytes in order, as a context manager).

    Parts are written one after the other (each by a GGUFWriter, so each is complete, magic last, before it is
    renamed) into a hidden staging directory beside the output, .FIRST.split-PID; only when every part is
    complete are they renamed into place, then the directory removed. On any error the staging directory and
    any part already renamed are removed: no part of a failed set is left behind, and an existing set is
    replaced (with force) only by a complete one. A staging directory whose process died is removed by the next
    writer of the same set name.
    """

    def __init__(self, path, fields: dict[str, Field], tensors: list[TensorInfo], force: bool = False, inputs=(),
                 max_bytes: int | None = None, max_tensors: int | None = None):
        prefix = split_prefix(path)
        groups = plan_split(tensors, max_bytes, max_tensors, str(path))
        n = len(groups)
        self.paths = [split_path(prefix, i, n) for i in range(n)]
        self.parts = [(p, part_fields(fields, i, n, len(tensors)), g) for i, (p, g) in enumerate(zip(self.paths,
                                                                                                      groups))]
        self.force, self.inputs = force, [Path(p) for p in inputs]
        self._check_outputs()
        self.stage = self.paths[0].with_name(f".{self.paths[0].name}.split-{os.getpid()}")
        self._part = -1              # index of the part being written
        self._writer: GGUFWriter | None = None
        self._tensor = 0             # index of the current tensor within the part
        self._written = 0            # bytes written of the current tensor
        self._moved: list[Path] = []

    def _check_outputs(self) -> None:
        for p in self.paths:
            check_output_path(p, self.force, self.inputs)

    def __enter__(self):
        parent = self.paths[0].parent
        if not parent.is_dir():
            raise DggufError(f"{self.paths[0]}: directory {parent} does not exist")
        remove_stale_stages(self.paths[0])
        try:
            os.mkdir(self.stage, 0o700)
        except OSError as e:
            raise DggufError(f"{self.paths[0]}: cannot write: {e.strerror or e}") from e
        _ACTIVE.add(str(self.stage))   # a sweep in this process leaves it alone
        try:
            self._next_part()
        except BaseException:
            self._abort()
            raise
        return self

    def _next_part(self) -> None:
        """Close the finished part (renamed into the staging directory) and open the next one, if any; parts
        without tensors are written at once."""
        while True:
            if self._writer is not None:
                w, self._writer = self._writer, None
                w.__exit__(None, None, None)
            self._part += 1
            self._tensor = self._written = 0
            if self._part == len(self.parts):
                return
            path, fields, tensors = self.parts[self._part]
            self._writer = GGUFWriter(self.stage / path.name, fields, tensors)
            self._writer.__enter__()
            if tensors:
                return

    def write(self, data) -> None:
        """Append the next bytes of the current tensor (whole tensor or a run of rows)."""
        if self._writer is None:
            raise DggufError("internal: more tensor data than the split set holds")
        self._writer.write(data)
        tensors = self.parts[self._part][2]
        self._written += memoryview(data).nbytes
        if self._written == tensors[self._tensor].nbytes:
            self._tensor += 1
            self._written = 0
            if self._tensor == len(tensors):
                self._next_part()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._abort(exc_type, exc, tb)
            return False
        try:
            if self._part != len(self.parts):
                raise DggufError(f"internal: only {self._part} of {len(self.parts)} parts were written")
            self._check_outputs()     # again: the paths may have changed meanwhile
            for p in self.paths:
                replace_output(self.stage / p.name, p)
                self._moved.append(p)
            os.rmdir(self.stage)
            _ACTIVE.discard(str(self.stage))
        except BaseException as e:
            self._abort()
            if isinstance(e, OSError):
                raise DggufError(f"{self.paths[0]}: write failed: {e.strerror or e}") from e
            raise
        return False

    def _abort(self, exc_type=None, exc=None, tb=None) -> None:
        """Remove the part being written, the staging directory and any part already renamed. Never raises."""
        if self._writer is not None:
            w, self._writer = self._writer, None
            try:
                w.__exit__(exc_type or DggufError, exc, tb)
            except Exception:
                pass
        for p in self._moved:
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass
        self._moved = []
        shutil.rmtree(self.stage, ignore_errors=True)
        _ACTIVE.discard(str(self.stage))


def open_writer(path, fields: dict[str, Field], tensors: list[TensorInfo], force: bool = False, inputs=(),
                max_bytes: int | None = None, max_tensors: int | None = None):
    """A GGUFWriter for one file, or a SplitWriter when a split size or tensor count is given."""
    if max_bytes is None and max_tensors is None:
        return GGUFWriter(Path(path), fields, tensors, force, inputs)
    return SplitWriter(path, fields, tensors, force, inputs, max_bytes, max_tensors)


def output_paths(path, tensors: list[TensorInfo], max_bytes: int | None = None,
                 max_tensors: int | None = None) -> list[Path]:
    """The files `open_writer` with these arguments writes."""
    if max_bytes is None and max_tensors is None:
        return [Path(path)]
    n = len(plan_split(tensors, max_bytes, max_tensors, str(path)))
    return [split_path(split_prefix(path), i, n) for i in range(n)]


def remove_stale_stages(first: Path) -> list[Path]:
    """Remove the staging directories (.FIRST.split-PID) of earlier writers of this set whose process is gone."""
    removed = []
    for p, pid in abandoned(Path(first), "split"):
        try:
            if not stat.S_ISDIR(os.lstat(p).st_mode):     # never through a link
                continue
            shutil.rmtree(p)
        except OSError:
            continue
        print(f"note: removed {p}, a partial split set left by process {pid}, which no longer runs", file=sys.stderr)
        removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------- reading

@dataclass
class SplitGGUF:
    """A split set read as one file: `path` is the first part's, `fields` its metadata, `tensors` every part's
    in order (offsets relative to their own part), `parts` the parts' GGUFFiles."""
    path: Path
    fields: dict[str, Field]
    tensors: list[TensorInfo]
    parts: list[GGUFFile]
    _owner: dict[str, GGUFFile] = field(default_factory=dict, repr=False)

    @property
    def paths(self) -> list[Path]:
        return [p.path for p in self.parts]

    def get(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.value

    def file_of(self, t: TensorInfo) -> Path:
        """The part that holds a tensor."""
        return self._owner[t.name].path

    def tensor_bytes(self, t: TensorInfo) -> np.ndarray:
        """The raw bytes of a tensor, as a read-only uint8 view of its part's mapping."""
        return self._owner[t.name].tensor_bytes(t)

    def close(self) -> None:
        for p in self.parts:
            p.close()


def _split_int(g: GGUFFile, key: str, lo: int, hi: int) -> int:
    f = g.fields.get(key)
    if f is None:
        raise DggufError(f"{g.path}: a split GGUF without {key}")
    v = f.value
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise DggufError(f"{g.path}: {key} is {printable(repr(v))}, expected an integer in {lo}..{hi}")
    return v


def open_set(first: GGUFFile, read_part) -> GGUFFile | SplitGGUF:
    """The whole set that `first` (holding split.count) starts, every part checked; read_part(path) reads one
    part as a plain GGUFFile. A set of one part is returned as that file. Closes what it opened on error."""
    parts = [first]
    try:
        path = first.path
        count = _split_int(first, SPLIT_COUNT, 1, MAX_PARTS)
        no = _split_int(first, SPLIT_NO, 0, MAX_PARTS - 1)
        total = _split_int(first, SPLIT_TENSORS, 0, 2**31 - 1)
        if no != 0:
            where = set_paths(path)
            hint = f" ({where[0].name})" if len(where) > 1 else ""
            raise DggufError(f"{path}: part {no + 1} of a {count}-part split set; open its first part{hint}")
        if count > 1:
            paths = set_paths(path)
            if len(paths) != count or paths[0].name != path.name:
                raise DggufError(f"{path}: first part of a {count}-part split set, but its name does not end in "
                                 f"-00001-of-{count:05d}.gguf, so its other parts cannot be found")
            for i, p in enumerate(paths[1:], 1):
                if not p.exists():
                    raise DggufError(f"{path}: part {i + 1} of this {count}-part split set, {p.name}, is missing")
                g = read_part(p)
                parts.append(g)
                for key, want in ((SPLIT_COUNT, count), (SPLIT_TENSORS, total)):
                    got = _split_int(g, key, 0, 2**31 - 1)
                    if got != want:
                        raise DggufError(f"{p}: {key} is {got} where {path.name} has {want}: a part of another "
                                         "split set")
                got = _split_int(g, SPLIT_NO, 0, MAX_PARTS - 1)
                if got != i:
                    raise DggufError(f"{p}: split.no is {got}, but its name makes it part {i + 1} (split.no {i}): a "
                                     "renamed part or a part of another split set")
        owner: dict[str, GGUFFile] = {}
        tensors = []
        for g in parts:
            for t in g.tensors:
                if t.name in owner:
                    raise DggufError(f"{g.path}: tensor {printable(t.name)} is also in {owner[t.name].path.name}: "
                                     "parts of different split sets")
                owner[t.name] = g
                tensors.append(t)
        if len(tensors) != total:
            raise DggufError(f"{path}: the {count} part(s) of this split set hold {len(tensors)} tensors, but "
                             f"split.tensors.count says {total}")
    except BaseException:
        for g in parts:
            g.close()
        raise
    if count == 1:
        return first
    return SplitGGUF(path, first.fields, tensors, parts, owner)
