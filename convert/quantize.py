"""Streaming conversion: checkpoint or GGUF in, GGUF out, one tensor at a time in bounded row chunks.

Each chunk of rows is widened to float32 and encoded to its target type on a worker thread (the native
quantizers release the GIL); results are written in order while at most 2 × threads chunks are in flight,
so memory stays at a few chunk buffers whatever the tensor size.
"""
from __future__ import annotations

import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf.constants import GGUFValueType as V
from tqdm import tqdm

from dgguf.core import native
from dgguf.core.errors import DggufError
from dgguf.core.imatrix import encode_imatrix
from dgguf.core.native import default_threads, encode
from dgguf.format.arch import ARCH
from dgguf.format.gguf_file import (Field, GGUFFile, GGUFWriter, TensorInfo, _align, check_output_path, header_bytes,
                                    printable, read_gguf)
from dgguf.format.imatrix import Imatrix, read_imatrix
from dgguf.format.manifest import manifest_path, write_manifest
from dgguf.format.quant_types import TENSOR_TYPES, FileType, file_type, is_quantized
from dgguf.format.split import SPLIT_KEYS, open_writer

from .checkpoint import (SourceTensor, TextConfig, input_files, read_config, read_generation_config,
                         read_tensors)
from .metadata import model_fields, rope_freqs, tokenizer_fields
from .presets import TypeChooser
from .tensor_names import DECODER, ROPE_FREQS, plan_tensors

CHUNK_VALUES = 1 << 21   # 8 MiB of float32 per work item


@dataclass
class Job:
    """One output tensor: where its rows come from and what type they become."""
    info: TensorInfo
    nrows: int
    read_rows: Callable[[int, int], np.ndarray] | None   # (r0, r1) → float32 [r1-r0, ncols]
    raw_rows: Callable[[int, int], np.ndarray] | None = None   # bytes already in the target type (preferred)
    source_bytes: int = 0
    importance: np.ndarray | None = None   # [n_mat, ncols] from an importance matrix; matrix e is rows e*R..
    source_quantized: bool = False


def write_jobs(writer: GGUFWriter, jobs: list[Job], threads: int, progress: bool) -> None:
    total = sum(j.source_bytes for j in jobs)
    with ThreadPoolExecutor(max_workers=threads) as pool, \
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=None if progress else True,
                 dynamic_ncols=True) as bar:
        for job in jobs:
            bar.set_description(job.info.name[:40])
            ncols = job.info.ne[0]
            step = max(1, CHUNK_VALUES // ncols)
            per_row = job.source_bytes / max(job.nrows, 1)

            def work(r0, r1, job=job):
                if job.raw_rows is not None:
                    return job.raw_rows(r0, r1)
                if job.importance is None:
                    return encode(job.read_rows(r0, r1), job.info.type.ggml)
                x = job.read_rows(r0, r1)
                per_mat = job.nrows // job.importance.shape[0]
                pieces, a = [], r0   # rows of one matrix at a time: each with its own importance
                while a < r1:
                    e = a // per_mat
                    b = min(r1, (e + 1) * per_mat)
                    pieces.append(encode_imatrix(x[a - r0:b - r0], job.info.type.ggml, job.importance[e]))
                    a = b
                return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

            pending: deque = deque()
            for r0 in range(0, job.nrows, step):
                r1 = min(job.nrows, r0 + step)
                pending.append((pool.submit(work, r0, r1), r1 - r0))
                if len(pending) >= 2 * threads:
                    _drain_one(writer, pending, bar, per_row)
            while pending:
                _drain_one(writer, pending, bar, per_row)


def _drain_one(writer, pending, bar, per_row) -> None:
    fut, n = pending.popleft()
    writer.write(np.ascontiguousarray(fut.result()))
    bar.update(round(n * per_row))


# ------------------------------------------------------------------------------------------- HF → GGUF

def _widen(st: SourceTensor) -> Callable[[int, int], np.ndarray]:
    view = st.view()
    if st.dtype == "BF16":
        return lambda r0, r1: native.bf16_to_f32(view[r0:r1])
    return lambda r0, r1: np.asarray(view[r0:r1], dtype=np.float32)


def _model_name(hf_dir: Path) -> str:
    return re.sub(r"[-_]+", " ", hf_dir.resolve().name).strip().title() or "DiffusionGemma"


def output_tensors(cfg: TextConfig, shapes: dict[str, tuple[int, ...]], ft: FileType,
                   pure: bool = False, imatrix: bool = False) -> list[tuple[str | None, TensorInfo]]:
    """What `convert` writes for checkpoint tensors of these shapes: (HF name, GGUF tensor with its type) in
    file order, rope_freqs (computed, HF name None) first. The planner sizes --config --type plans with it."""
    order = plan_tensors(cfg, shapes)
    n_attn_v = sum(1 for _, g in order if g.endswith("attn_v.weight"))
    chooser = TypeChooser(ft, cfg.num_hidden_layers, cfg.num_experts, n_attn_v,
                          cfg.num_attention_heads // cfg.kv_heads[0], pure, imatrix)
    out = [(None, TensorInfo(ROPE_FREQS, (cfg.global_head_dim // 2,), TENSOR_TYPES["F32"]))]
    for hf_name, gname in order:
        ne = tuple(reversed(shapes[hf_name]))
        out.append((hf_name, TensorInfo(gname, ne, chooser.choose(gname, ne))))
    return out


@dataclass
class Quant:
    """How quantized tensors are chosen and encoded beyond the preset: an importance matrix (a path or a loaded
    Imatrix) for the weighted error, and a target file size in bytes (convert/target_size.py), whose chosen mix
    is passed to on_mix as printable lines."""
    imatrix: object = None
    target_size: int | None = None
    on_mix: Callable[[list[str]], None] | None = None

    def load(self) -> Imatrix | None:
        if self.imatrix is None or isinstance(self.imatrix, Imatrix):
            return self.imatrix
        self.imatrix = read_imatrix(self.imatrix)
        return self.imatrix


def _apply_quant(jobs: list[Job], fields: dict, q: Quant | None, src: str, allow_requantize: bool = True) -> None:
    """Attach importances to the jobs of quantized tensors and, with a target size, choose their types."""
    if q is None:
        return
    im = q.load()
    if im is not None:
        for j in jobs:
            if is_quantized(j.info.type) and j.read_rows is not None:
                ne = j.info.ne
                j.importance = im.importance(j.info.name, ne[0], ne[2] if len(ne) == 3 else 1)
    if q.target_size is None:
        return
    from .target_size import KEEP_PRESET, Candidate, choose, describe
    idx = [i for i, j in enumerate(jobs) if is_quantized(j.info.type) and j.read_rows is not None
           and j.info.name not in KEEP_PRESET]
    if not idx:
        raise DggufError(f"{src}: --target-size needs a quantized file type (the preset chose no quantized tensor)")
    cands = [Candidate(jobs[i].info.name, jobs[i].info.ne, jobs[i].nrows, jobs[i].read_rows, jobs[i].importance,
                       im.counts.get(jobs[i].info.name) if im is not None else None) for i in idx]
    chosen = set(idx)
    fixed = sum(_align(j.info.nbytes) for i, j in enumerate(jobs) if i not in chosen)
    header = len(header_bytes(fields, [j.info for j in jobs]))
    choices = choose(cands, q.target_size - header - fixed)
    for i, ch in zip(idx, choices):
        j = jobs[i]
        if ch.type.ggml != j.info.type.ggml:
            if j.source_quantized and not allow_requantize:
                raise DggufError(f"{src}: tensor {printable(j.info.name)} is already quantized; choosing its type for "
                                 "--target-size requantizes it: pass --allow-requantize, or convert from F32/F16/BF16")
            j.info = TensorInfo(j.info.name, j.info.ne, ch.type)
            j.raw_rows = None
    if q.on_mix:
        q.on_mix(describe(choices, header + fixed, q.target_size))


@dataclass
class Output:
    """Where and how the result is written: split into a set (split_max_bytes / split_max_tensors, as gguf-split's
    --split-max-size / --split-max-tensors) and with a manifest of sha256 hashes beside it."""
    split_max_bytes: int | None = None
    split_max_tensors: int | None = None
    manifest: bool = False

    @property
    def split(self) -> bool:
        return self.split_max_bytes is not None or self.split_max_tensors is not None


def _check_outputs(out: Path, force: bool, inputs, output: Output) -> None:
    """Refuse bad output paths before any work (the writers check again). A split set's part names depend on the
    plan, so its writer checks them."""
    if not output.split:
        check_output_path(out, force, inputs)
    if output.manifest:
        check_output_path(manifest_path(out), force, inputs)


def _write(out: Path, fields, jobs: list[Job], force: bool, inputs, threads, progress, output: Output) -> Path:
    """Write the jobs to `out` (or the split set named from it), then the manifest if asked; returns the path
    written, a split set's first part."""
    with open_writer(out, fields, [j.info for j in jobs], force, inputs, output.split_max_bytes,
                     output.split_max_tensors) as w:
        write_jobs(w, jobs, threads or default_threads(), progress)
    first = w.paths[0] if output.split else out
    if output.manifest:
        write_manifest(first, manifest_path(out), force, threads, inputs)
    return first


def _checkpoint_plan(hf_dir: Path, type_name: str | None, pure: bool, imatrix: bool = False):
    sources = read_tensors(hf_dir)
    cfg, _ = read_config(hf_dir, {n: t.shape for n, t in sources.items()})   # head dims the config omits: tensors
    gen = read_generation_config(hf_dir, cfg.vocab_size)
    embed = sources.get(DECODER + "embed_tokens.weight")   # missing: output_tensors names it
    ft = file_type(type_name or (embed.dtype if embed else "F32"))   # default: the checkpoint's own dtype
    return sources, cfg, gen, ft, output_tensors(cfg, {n: t.shape for n, t in sources.items()}, ft, pure, imatrix)


def convert_plan(hf_dir, type_name: str | None = None, pure: bool = False,
                 quant: Quant | None = None) -> list[TensorInfo]:
    """The tensors `convert_checkpoint` would write, with their types and sizes; writes nothing (with a target
    size, the mix is chosen, which quantizes samples of every tensor)."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise DggufError(f"{hf_dir}: not a directory")
    if quant is None or quant.target_size is None:
        return [info for _, info in _checkpoint_plan(hf_dir, type_name, pure, quant is not None and
                                                     quant.imatrix is not None)[4]]
    jobs, fields = _checkpoint_jobs(hf_dir, type_name, pure, quant)
    return [j.info for j in jobs]


def _checkpoint_jobs(hf_dir: Path, type_name: str | None, pure: bool, quant: Quant | None):
    if quant is not None:
        quant.load()
    sources, cfg, gen, ft, planned = _checkpoint_plan(hf_dir, type_name, pure, quant is not None and
                                                      quant.imatrix is not None)

    freqs = np.asarray(rope_freqs(cfg), dtype=np.float32)
    jobs = [Job(planned[0][1], 1, lambda r0, r1: freqs[None, :], source_bytes=freqs.nbytes)]
    n_total = n_expert = 0
    for hf_name, info in planned[1:]:
        st = sources[hf_name]
        gname = info.name
        raw = None
        if info.type.name == "BF16" and st.dtype == "BF16":
            view = st.view()
            raw = lambda r0, r1, view=view: view[r0:r1]
        jobs.append(Job(info, st.rows(), None if raw else _widen(st), raw, st.nbytes))
        n = int(np.prod(st.shape))
        n_total += n
        if "_exps." in gname and len(st.shape) == 3:
            n_expert += n
    fields = model_fields(cfg, gen, _model_name(hf_dir), ft.ftype,
                          (n_total, n_total - n_expert, n_expert // cfg.num_experts))
    fields.update(tokenizer_fields(hf_dir, cfg, gen))
    _apply_quant(jobs, fields, quant, str(hf_dir))
    return jobs, fields


def convert_checkpoint(hf_dir, out, type_name: str | None = None, pure: bool = False, force: bool = False,
                       threads: int | None = None, progress: bool = False, output: Output | None = None,
                       quant: Quant | None = None) -> Path:
    """Convert an HF DiffusionGemma checkpoint directory to GGUF. Returns the output path (a split set's first
    part). quant: an importance matrix and/or a target size (Quant)."""
    hf_dir, out, output = Path(hf_dir), Path(out), output or Output()
    if not hf_dir.is_dir():
        raise DggufError(f"{hf_dir}: not a directory")
    _check_outputs(out, force, input_files(hf_dir), output)   # before any work
    jobs, fields = _checkpoint_jobs(hf_dir, type_name, pure, quant)
    return _write(out, fields, jobs, force, input_files(hf_dir), threads, progress, output)


# ------------------------------------------------------------------------------------------ GGUF → GGUF

def _dequantizer(g: GGUFFile, t: TensorInfo, nrows: int) -> Callable[[int, int], np.ndarray]:
    raw = g.tensor_bytes(t).reshape(nrows, -1)
    ncols = t.ne[0]
    if t.type.name == "F32":
        return lambda r0, r1: raw[r0:r1].view(np.float32)
    if t.type.name == "F16":
        return lambda r0, r1: raw[r0:r1].view(np.float16).astype(np.float32)
    if t.type.name == "BF16":
        return lambda r0, r1: native.bf16_to_f32(raw[r0:r1].view(np.uint16))
    return lambda r0, r1: native.dequantize_rows(raw[r0:r1], t.type.ggml, ncols)


_MISSING = object()


def _meta_int(g: GGUFFile, key: str, default: int, value=_MISSING) -> int:
    """An integer metadata value the type choice reads (the loader checks the rest): a clear error, not a
    traceback, when a file stores something else there."""
    v = g.get(key, default) if value is _MISSING else value
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 2**31 - 1:
        raise DggufError(f"{g.path}: key {key} is {printable(repr(v))}, expected an integer in 0..{2**31 - 1}")
    return v


def _requantize_jobs(g: GGUFFile, src: Path, ft: FileType, pure: bool, allow_requantize: bool,
                     imatrix: bool = False) -> list[Job]:
    arch = g.get("general.architecture")
    if arch != ARCH:
        raise DggufError(f"{src}: architecture {printable(repr(arch))} is not {ARCH}")
    n_layers = _meta_int(g, f"{ARCH}.block_count", 0)
    kv = g.get(f"{ARCH}.attention.head_count_kv", [1])
    kv0 = _meta_int(g, f"{ARCH}.attention.head_count_kv", 1, kv[0] if isinstance(kv, list) and kv else kv)
    n_attn_v = sum(1 for t in g.tensors if t.name.endswith("attn_v.weight"))
    chooser = TypeChooser(ft, n_layers, _meta_int(g, f"{ARCH}.expert_count", 0), n_attn_v,
                          _meta_int(g, f"{ARCH}.attention.head_count", 1) // max(kv0, 1), pure, imatrix)
    jobs = []
    for t in g.tensors:
        nrows = t.nvalues // t.ne[0]
        new = chooser.choose(t.name, t.ne)
        raw = None
        if new.ggml == t.type.ggml:
            data = g.tensor_bytes(t).reshape(nrows, -1)
            raw = lambda r0, r1, data=data: data[r0:r1]
        elif is_quantized(t.type) and is_quantized(new) and not allow_requantize:
            # as llama-quantize: quantizing quantized weights again compounds both errors
            raise DggufError(f"{src}: tensor {printable(t.name)} is already quantized ({t.type.name}); requantizing "
                             f"it to {new.name} adds the second quantization's error to the first. Convert from the "
                             "F32/F16/BF16 weights, or pass --allow-requantize to do it anyway")
        jobs.append(Job(TensorInfo(t.name, t.ne, new), nrows, _dequantizer(g, t, nrows), raw, t.nbytes,
                        source_quantized=is_quantized(t.type)))
    return jobs


def _requantize_all(g: GGUFFile, src: Path, ft: FileType, pure: bool, allow_requantize: bool, quant: Quant | None):
    if quant is not None:
        quant.load()
    jobs = _requantize_jobs(g, src, ft, pure, allow_requantize, quant is not None and quant.imatrix is not None)
    fields = {k: f for k, f in g.fields.items() if k not in SPLIT_KEYS}
    fields["general.file_type"] = Field(V.UINT32, ft.ftype)
    fields["general.quantization_version"] = Field(V.UINT32, 2)
    fields.pop("general.alignment", None)
    _apply_quant(jobs, fields, quant, str(src), allow_requantize)
    return jobs, fields


def requantize_plan(src, type_name: str, pure: bool = False, allow_requantize: bool = False,
                    quant: Quant | None = None) -> list[TensorInfo]:
    """The tensors `requantize` would write, with their types and sizes; writes nothing."""
    src = Path(src)
    g = read_gguf(src)
    try:
        return [j.info for j in _requantize_all(g, src, file_type(type_name), pure, allow_requantize, quant)[0]]
    finally:
        g.close()


def requantize(src, out, type_name: str, pure: bool = False, force: bool = False, threads: int | None = None,
               progress: bool = False, allow_requantize: bool = False, output: Output | None = None,
               quant: Quant | None = None) -> Path:
    """Re-encode a DiffusionGemma GGUF (or split set) to another file type. Tensors already in their target type
    are copied; quantized tensors become another quantized type only with allow_requantize. quant: an importance
    matrix and/or a target size (Quant). Returns the output path (a split set's first part)."""
    src, out, output = Path(src), Path(out), output or Output()
    ft: FileType = file_type(type_name)
    _check_outputs(out, force, [src], output)
    g = read_gguf(src)
    try:
        inputs = [src, *getattr(g, "paths", [])]
        _check_outputs(out, force, inputs, output)
        jobs, fields = _requantize_all(g, src, ft, pure, allow_requantize, quant)
        return _write(out, fields, jobs, force, inputs, threads, progress, output)
    finally:
        g.close()


