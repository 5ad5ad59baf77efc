"""A random-weight DiffusionGemma GGUF of any config, written straight at a file type in bounded memory.

    python scripts/real_shape.py [--config tests/fixtures/real-config] [--type Q4_K_M] [-o /tmp/real-Q4_K_M.gguf]

The tensors, their order and their per-tensor types are exactly what `dgguf convert --type T` would write for a
checkpoint of that config (convert/quantize.output_tensors), so the file runs, plans and benchmarks like a real
conversion. A large matrix repeats one block of quantized random rows (N(0, 0.02), the block made once per
tensor): its compute and memory traffic are a real matrix's, and only a few MiB are ever held. Vectors (norms,
router scales, layer scalars) and the routers stay fully random, so expert routing is as spread as a trained
model's. No tokenizer is written: use --prompt-ids, `dgguf bench`, or `dgguf plan`.

The released model's shape (30 layers, 128 experts, vocabulary 262,144) is 15.6 GiB at Q4_K_M and takes a few
minutes; the block repetition makes generation time disk-bound.
"""
from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BLOCK_ROWS = 64


def tensor_rows(info, rng: np.random.Generator, block_rows: int):
    """(nrows, rows(r0, r1) -> bytes in info's type) for one tensor of the file."""
    from dgguf.core.native import encode

    ncols = info.ne[0]
    nrows = int(np.prod(info.ne[1:], dtype=np.int64)) if len(info.ne) > 1 else 1
    name = info.name
    if len(info.ne) == 1 or name.endswith(("layer_output_scale.weight", "ffn_gate_inp.weight")):
        if name.endswith("scale.weight"):
            values = np.ones((nrows, ncols), np.float32)                     # layer scalars
        elif len(info.ne) == 1:
            values = (1.0 + 0.02 * rng.standard_normal((nrows, ncols))).astype(np.float32)   # norms, scales
        else:
            values = (0.02 * rng.standard_normal((nrows, ncols))).astype(np.float32)         # router: all random
        data = np.ascontiguousarray(encode(values, info.type.ggml)).view(np.uint8).reshape(nrows, -1)
        return nrows, lambda r0, r1: data[r0:r1]
    rows = min(block_rows, nrows)
    block = np.ascontiguousarray(encode((0.02 * rng.standard_normal((rows, ncols))).astype(np.float32),
                                        info.type.ggml)).view(np.uint8).reshape(rows, -1)

    def tiled(r0, r1):
        return block[np.arange(r0, r1) % rows]
    return nrows, tiled


def write_real_shape(config: Path, type_name: str, out: Path, seed: int = 0, block_rows: int = BLOCK_ROWS,
                     threads: int | None = None, progress: bool = True, force: bool = True) -> Path:
    from dgguf.convert.checkpoint import read_config_file, read_generation_config
    from dgguf.convert.metadata import model_fields, rope_freqs
    from dgguf.convert.quantize import Job, output_tensors, write_jobs
    from dgguf.convert.tensor_names import expected_shapes
    from dgguf.core.native import default_threads
    from dgguf.format.gguf_file import GGUFWriter
    from dgguf.format.quant_types import file_type

    cfg, _ = read_config_file(config / "config.json" if config.is_dir() else config)
    gen = read_generation_config(config if config.is_dir() else config.parent)
    ft = file_type(type_name)
    planned = output_tensors(cfg, expected_shapes(cfg), ft)
    freqs = np.asarray(rope_freqs(cfg), dtype=np.float32)[None, :]
    jobs = [Job(planned[0][1], 1, None, lambda r0, r1: freqs, freqs.nbytes)]
    n_total = n_expert = 0
    for _, info in planned[1:]:
        rng = np.random.default_rng([seed, zlib.crc32(info.name.encode())])
        nrows, rows = tensor_rows(info, rng, block_rows)
        jobs.append(Job(info, nrows, None, rows, info.nbytes))
        n = int(np.prod(info.ne, dtype=np.int64))
        n_total += n
        n_expert += n if "_exps." in info.name and len(info.ne) == 3 else 0
    fields = model_fields(cfg, gen, "DiffusionGemma random weights", ft.ftype,
                          (n_total, n_total - n_expert, n_expert // cfg.num_experts))
    with GGUFWriter(out, fields, [j.info for j in jobs], force) as w:
        write_jobs(w, jobs, threads or default_threads(), progress)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "tests" / "fixtures" / "real-config",
                    help="an HF config.json or its directory (default: the released model's)")
    ap.add_argument("--type", default="Q4_K_M", help="file type, as dgguf convert --type")
    ap.add_argument("-o", "--output", type=Path, default=None, help="default /tmp/real-TYPE.gguf")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-rows", type=int, default=BLOCK_ROWS, help="rows of the block a matrix repeats")
    a = ap.parse_args()
    from dgguf.core.errors import DggufError
    out = a.output or Path(f"/tmp/real-{a.type.upper()}.gguf")
    t = time.perf_counter()
    try:
        write_real_shape(a.config, a.type.upper(), out, a.seed, a.block_rows)
    except DggufError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
