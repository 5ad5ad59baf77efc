"""The VRAM planner and its cost model: what of a DiffusionGemma lives on the GPU at a memory budget, how the
rest runs, and how long a denoising step takes on a named card.

Sizes are exact: a GGUF's own tensor table (`-m`), or the tensors `dgguf convert` would write for a config and
a file type (`--config --type`: the CLI builds that PlannedModel with the converter's own tables). The groups'
bytes are what the hybrid executor (native/executor.c) allocates for them, to the byte (tests/test_gpu_exec.py
runs it on the host backend and compares). Placement: the mandatory groups (reserve, embedding/head, globals,
the layers' non-expert weights, KV cache, pass buffers, workspace) go to the GPU first, then whole expert layers
in layer order while they fit; the remaining expert layers are either computed on the CPU or streamed over PCIe
every pass, whichever the cost model predicts is faster (or as asked: offload=, or an explicit placement).
The plan never exceeds the budget. docs/planner.md explains the groups, the cost model and its constants.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from decimal import Decimal, InvalidOperation

import numpy as np

from dgguf.core.errors import DggufError

from dgguf.format.arch import ModelShape, spec_of

from .bench import best_of
from .model_config import read_model_config

GIB = 1 << 30
MIB = 1 << 20
DEFAULT_RESERVE = 512 * MIB   # CUDA context, driver and library workspaces (300-500 MiB on current cards)
DEFAULT_CTX = 8192            # as `dgguf run`
DEFAULT_STEPS = 16


# ------------------------------------------------------------------------------------------------- cards

@dataclass(frozen=True)
class Card:
    name: str
    vram_gib: float
    mem_gbs: float       # memory bandwidth, GB/s
    fp16_tflops: float   # dense tensor-core FP16 with FP32 accumulate
    int8_tops: float     # dense tensor-core INT8
    pcie: str
    pcie_gbs: float      # one direction, GB/s, before protocol overhead
    tf32_tflops: float   # dense tensor-core TF32 (what native/cuda's GEMMs use): half the FP16 rate on every card here
    fp32_tflops: float   # CUDA-core FP32 FMA (native/cuda's attention and plain kernels): SMs x 128 x 2 x clock


# Spec-sheet figures. Tensor throughputs are dense (no 2:4 sparsity); where NVIDIA lists only clocks, they are
# SMs x boost clock x per-SM rate (Ampere/Ada GeForce: 512 FP16-with-FP32-accumulate and 2048 INT8 ops per SM
# per clock; the GeForce whitepapers' 3090/4090 figures, 71/165 TFLOPS, follow this). PCIe: 3.94 GB/s per
# 4.0 lane, 7.88 per 5.0 lane.
CARDS = {
    # AD107, 24 SMs, boost up to 2370 MHz at 115 W (lower at lower TGP), 8 GB GDDR6 128-bit 16 Gbps, PCIe 4.0 x8
    "rtx4060-laptop": Card("RTX 4060 Laptop 8 GB", 8, 256, 29.1, 116.5, "4.0 x8", 15.75, 14.6, 14.6),
    # GA106, 28 SMs, 1777 MHz, 12 GB GDDR6 192-bit 15 Gbps
    "rtx3060": Card("RTX 3060 12 GB", 12, 360, 25.5, 101.9, "4.0 x16", 31.5, 12.7, 12.7),
    # AD104, 46 SMs, 2475 MHz, 12 GB GDDR6X 192-bit 21 Gbps
    "rtx4070": Card("RTX 4070 12 GB", 12, 504, 58.3, 233.2, "4.0 x16", 31.5, 29.1, 29.1),
    # AD103, 76 SMs, 2505 MHz, 16 GB GDDR6X 256-bit 22.4 Gbps
    "rtx4080": Card("RTX 4080 16 GB", 16, 716.8, 97.5, 389.9, "4.0 x16", 31.5, 48.7, 48.7),
    # GA102, 82 SMs, 1695 MHz, 24 GB GDDR6X 384-bit 19.5 Gbps (Ampere GA102 whitepaper: 71 / 284)
    "rtx3090": Card("RTX 3090 24 GB", 24, 936.2, 71.2, 284.7, "4.0 x16", 31.5, 35.6, 35.6),
    # AD102, 128 SMs, 2520 MHz, 24 GB GDDR6X 384-bit 21 Gbps (Ada whitepaper: 165.2 / 660.6)
    "rtx4090": Card("RTX 4090 24 GB", 24, 1008, 165.2, 660.6, "4.0 x16", 31.5, 82.6, 82.6),
    # GB202, 170 SMs, 2407 MHz, 32 GB GDDR7 512-bit 28 Gbps, PCIe 5.0 x16 (838 FP16 TFLOPS is the sparse,
    # FP16-accumulate figure; FP32 accumulate runs at half rate on GeForce)
    "rtx5090": Card("RTX 5090 32 GB", 32, 1792, 209.5, 838, "5.0 x16", 63, 104.8, 104.8),
    # H100 SXM5 80 GB HBM3: 3.35 TB/s, 989 dense FP16/BF16 TFLOPS, 1979 dense INT8 TOPS, PCIe 5.0 x16
    "h100": Card("H100 SXM 80 GB", 80, 3350, 989.4, 1979, "5.0 x16", 63, 494.7, 66.9),
    # H200 SXM 141 GB HBM3e (~140 GiB as the driver reports it): 4.8 TB/s, the H100's tensor rates; the kind
    # of machine the project's GPU checks run on
    "h200": Card("H200 SXM 141 GB", 140, 4800, 989.4, 1979, "5.0 x16", 63, 494.7, 66.9),
    # Cards of the published measurements the model is compared with (docs/planner.md):
    # GA104 laptop, 40 SMs, boost up to 1620 MHz at 125 W, 8 GB GDDR6 256-bit 14 Gbps
    "rtx3070-laptop": Card("RTX 3070 Laptop 8 GB", 8, 448, 33.2, 132.7, "4.0 x16", 31.5, 16.6, 16.6),
    # GA102, 84 SMs, 1860 MHz, 24 GB GDDR6X 384-bit 21 Gbps
    "rtx3090ti": Card("RTX 3090 Ti 24 GB", 24, 1008, 80.0, 320.0, "4.0 x16", 31.5, 40.0, 40.0),
    # AD104 data-centre card, 24 GB GDDR6 300 GB/s, 121 dense FP16 TFLOPS (full rate with FP32 accumulate),
    # 242 dense INT8 TOPS
    "l4": Card("L4 24 GB", 24, 300, 121, 242, "4.0 x16", 31.5, 60.3, 30.3),
}
CPU_CARD = "cpu"   # --card cpu: no GPU, everything on the CPU the planner runs on

# Efficiency factors of the cost model: every one an assumption, none fitted to a GPU measurement yet (no GPU
# run exists; docs/planner.md says why each, and scripts/gpu_check.sh prints measured beside predicted).
MEM_EFF = 0.80          # fraction of spec memory bandwidth a streaming kernel reaches
GEMM_EFF = 0.50         # fraction of tensor peak for GEMMs over the whole canvas (dequantize-in-tile)
MOE_EFF = 0.25          # per-expert GEMMs over ~C*k/E tokens each, plus gather and scatter
ATTN_EFF = 0.30         # attention: of the FP32 CUDA-core peak (tf32, the kernel that exists) or FP16 tensor peak
PLAIN_EFF = 0.10        # the plain (exact, FMA-free, CUDA-core) matmul the router uses
PCIE_EFF = 0.80         # large copies from pinned host memory
LAYER_OVERHEAD_S = 60e-6   # kernel launches and gaps per layer and pass (about 20 kernels)
OFFLOAD_SYNC_S = 100e-6    # host round trip per CPU-computed expert layer (two copies, a wake-up)
SAMPLER_PASSES = 4      # [C, V] float32 passes per step on the CPU: softmax, entropy, argmax and sample, SC softmax
# GEMM paths: tf32 is what native/cuda has (TF32 tensor-core GEMMs on dequantized tiles, FP32 CUDA-core
# attention); fp16 and int8 price kernels it does not have (FP16 / INT8 tensor-core GEMMs, flash attention on FP16
# tensor cores), for comparison with other implementations' figures.
GEMMS = ("tf32", "fp16", "int8")
# The executor's fixed sizes (native/dgguf.h DG_EXEC_*; tests/test_gpu_exec.py checks they agree).
ALIGN = 256             # every allocation, and every item placed in one, rounds up to this
MOE_CHUNK = 256         # tokens per MoE call: bounds the MoE's workspace
SOFT_SLICES = 16        # the soft embedding's partial sums (workspace)


def card_key(text: str) -> str:
    """`RTX 4060 Laptop`, `rtx4060-laptop` and `4060 laptop` all name the key rtx4060-laptop."""
    norm = re.sub(r"[^a-z0-9]", "", text.lower())
    for key in list(CARDS) + [CPU_CARD]:
        k = key.replace("-", "")
        if norm in (k, k.removeprefix("rtx")):
            return key
    raise DggufError(f"--card {text!r}: unknown card; choose one of: {', '.join(list(CARDS) + [CPU_CARD])}")


def card_for_gpu_name(name: str) -> str | None:
    """The table's key for a CUDA device name such as 'NVIDIA GeForce RTX 4090' (longest match), or None."""
    norm = re.sub(r"[^a-z0-9]", "", name.lower())
    found = [k for k in CARDS if k.replace("-", "") in norm]
    return max(found, key=len) if found else None


def card_for_budget(budget: int) -> str:
    """The smallest card of the issue's list whose memory holds the budget (the H100 beyond 32 GiB)."""
    for key in ("rtx4060-laptop", "rtx3060", "rtx4080", "rtx4090", "rtx5090"):
        if budget <= CARDS[key].vram_gib * GIB:
            return key
    return "h100"


# ------------------------------------------------------------------------------------------ the model

def shape_of(c) -> ModelShape:
    """The ModelShape part of a runtime ModelConfig (or of anything with those attributes)."""
    return ModelShape(**{f.name: getattr(c, f.name) for f in fields(ModelShape)})


@dataclass(frozen=True)
class Tensor:
    name: str
    nbytes: int
    type: str


@dataclass(frozen=True)
class PlannedModel:
    """A model to plan: its shape, every GGUF tensor with its size and type, and where it came from."""
    source: str
    file_type: str
    shape: ModelShape
    tensors: list[Tensor]


def model_from_gguf(path) -> PlannedModel:
    """Shape and tensor table of a GGUF; reads the header only (tensor data stays unread in the mapping)."""
    from dgguf.format.gguf_file import read_gguf
    from dgguf.format.quant_types import FILE_TYPES

    g = read_gguf(path)
    try:
        cfg = read_model_config(g)
        ftype = g.get("general.file_type")
        names = {ft.ftype: name for name, ft in FILE_TYPES.items()}
        label = names.get(ftype, f"file_type {ftype}" if ftype is not None else "unknown")
        tensors = [Tensor(t.name, t.nbytes, t.type.name) for t in g.tensors]
    finally:
        g.close()
    return PlannedModel(str(path), label, shape_of(cfg), tensors)


def tensor_part(name: str) -> tuple[int | None, str]:
    """(layer or None, part) of a GGUF tensor, from the architecture's table. Parts: experts, attention,
    dense, router, norms (per layer); embedding, self_conditioning, norms (global)."""
    layer, spec = spec_of(name)
    return layer, spec.part if spec is not None else "norms"


def part_bytes(model: PlannedModel) -> dict[tuple[int | None, str], int]:
    out: dict[tuple[int | None, str], int] = {}
    for t in model.tensors:
        key = tensor_part(t.name)
        out[key] = out.get(key, 0) + t.nbytes
    return out


# --------------------------------------------------------------------------------- runtime memory groups

@dataclass(frozen=True)
class KVLayout:
    """How the KV cache is stored: its element; K and V apart in every layer (full layers too, where V is the
    normed raw K), as native/model.c and native/executor.c store them."""
    type: str              # f16 or f32

    @property
    def elem(self) -> int:
        return {"f16": 2, "f32": 4}[self.type]


GPU_KV = KVLayout("f16")      # the executor's default cache (dgguf run --gpu; --kv-type f32 gives model.c's)
CPU_KV = KVLayout("f32")      # the CPU runtime (native/model.c)


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def kv_positions(s: ModelShape, layer: int, ctx: int) -> int:
    """Positions a layer's cache holds: sliding layers the last W-1, full layers all ctx."""
    return min(s.sliding_window - 1, ctx) if s.sliding[layer] else ctx


def kv_cache_bytes(s: ModelShape, ctx: int, kv: KVLayout) -> int:
    """One cache of ctx positions as the executor allocates it: K and V of every layer, each aligned."""
    return sum(2 * align(max(kv_positions(s, i, ctx), 1) * s.kv_heads[i] * s.head_dims[i] * kv.elem)
               for i in range(s.n_layers))


def buffer_bytes(s: ModelShape, tokens: int | None = None) -> int:
    """The executor's buffers of one pass of `tokens` (the canvas) positions, each aligned: ids and the routing
    (int32), the residual and five [T, H] activations (normed input, MoE input, attention output, dense and MoE
    outputs), q and the attention output [T, heads * d], this pass's K and V, the dense MLP's gate and up, router
    logits and weights, and [T, V] float32 logits (only decoder passes fill them; the self-conditioning input
    is uploaded into them)."""
    T = tokens or s.canvas_length
    H, d, kvh = s.hidden_size, max(s.head_dims), max(kv * d for kv, d in zip(s.kv_heads, s.head_dims))
    items = [T, T * s.top_k] + [T * H] * 6 + [T * s.n_heads * d] * 2 + [T * kvh] * 2 + [T * s.dense_ff] * 2 + \
            [T * s.n_experts, T * s.top_k, T * s.vocab_size]
    return sum(align(4 * n) for n in items)


def workspace_bytes(s: ModelShape, kv: KVLayout, tokens: int | None = None) -> int:
    """The kernels' scratch (native/executor.c dg_workspace_bytes): the largest of the MoE's slots for a chunk,
    the soft embedding's partial sums, and one sliding cache layer (overlapping copies go through it)."""
    T = tokens or s.canvas_length
    P, H, I, E = min(T, MOE_CHUNK) * s.top_k, s.hidden_size, s.expert_ff, s.n_experts
    moe = align(4 * (2 * (E + 1) + 3 * P)) + align(4 * P * 2 * I) + align(4 * P * I) + align(4 * P * H)
    soft = align(4 * 2 * T) + align(4 * SOFT_SLICES * T * H)
    move = max((align(max(s.sliding_window - 1, 1) * s.kv_heads[i] * s.head_dims[i] * kv.elem)
                for i in range(s.n_layers) if s.sliding[i]), default=0)
    return max(moe, soft, move)


def _by_name(model: PlannedModel) -> dict[str, int]:
    return {t.name: t.nbytes for t in model.tensors}


def device_tensors(model: PlannedModel) -> dict[tuple[int | None, str], list[int]]:
    """Bytes of the tensors the executor places, by (layer, group): (None, embedding), (None, globals), (i,
    layers), (i, experts) [gate_up, down]. Only tensors the native forward reads (a dgguf.h field): layer
    scalars and rope_freqs stay on the host."""
    cached = model.__dict__.get("_device_tensors")
    if cached is not None:
        return cached
    out: dict[tuple[int | None, str], list[int]] = {}
    for t in model.tensors:
        layer, spec = spec_of(t.name)
        if spec is None or spec.field is None:
            continue
        group = "embedding" if spec.part == "embedding" else "experts" if spec.part == "experts" else \
            "globals" if layer is None else "layers"
        out.setdefault((layer, group), []).append(t.nbytes)
    object.__setattr__(model, "_device_tensors", out)   # computed once per model (plans ask for it often)
    return out


def expert_layer_bytes(model: PlannedModel, layer: int, device: bool) -> int:
    """A layer's experts: on the device, its block (both tensors aligned); elsewhere what a stream copies."""
    parts = device_tensors(model).get((layer, "experts"), [])
    return sum(align(b) for b in parts) if device else sum(parts)


def mandatory_groups(model: PlannedModel, ctx: int, kv: KVLayout, reserve: int) -> list[tuple[str, int]]:
    """The groups every GPU plan holds, in placement order, with the bytes the executor allocates for them."""
    s, dt = model.shape, device_tensors(model)
    rope = 4 * sum(d // 2 for d in s.head_dims)
    return [("reserve", reserve),
            ("embedding", sum(align(b) for b in dt.get((None, "embedding"), []))),
            ("globals", sum(align(b) for b in dt.get((None, "globals"), [])) + align(rope)),
            ("layers", sum(align(b) for i in range(s.n_layers) for b in dt.get((i, "layers"), []))),
            ("kv_cache", kv_cache_bytes(s, ctx, kv)),
            ("buffers", buffer_bytes(s)),
            ("workspace", workspace_bytes(s, kv))]


def staging_bytes(model: PlannedModel, layers: list[str]) -> int:
    """Streaming's slots: two (one when one layer streams), each the largest streamed layer's aligned block."""
    streamed = [expert_layer_bytes(model, i, True) for i, w in enumerate(layers) if w == "stream"]
    return min(2, len(streamed)) * max(streamed, default=0)


def pass_traffic(model: PlannedModel, layers: list[str], tokens: int, decoder: bool, sc: bool = True,
                 logits_rows: int | None = None) -> tuple[int, int]:
    """(host -> device, device -> host) bytes of one executor pass over `tokens` positions: the ids; a decoder
    pass's self-conditioning logits up (sc) and logits down (logits_rows rows, default all); each CPU expert
    layer's MoE input and routing down and output up; each streamed layer's experts up. The encoder's last layer
    stops at its K/V: its experts are not needed."""
    s = model.shape
    T, H, K, V = tokens, s.hidden_size, s.top_k, s.vocab_size
    used = layers if decoder else layers[:-1]
    up = 4 * T + sum(expert_layer_bytes(model, i, False) for i, w in enumerate(used) if w == "stream")
    up += used.count("cpu") * 4 * T * H
    down = used.count("cpu") * T * (4 * H + 8 * K)
    if decoder:
        up += 4 * T * V if sc else 0
        down += 4 * (T if logits_rows is None else logits_rows) * V
    return up, down


# ------------------------------------------------------------------------------------------ pass work

@dataclass(frozen=True)
class Work:
    flops: float
    bytes: float
    kind: str      # gemm, moe, attention, plain (the router's exact matmul), memory, pcie, host (the CPU's)


def _causal_keys(context: int, T: int, window: int | None) -> int:
    """sum over j < T of min(context + j + 1, window) (no window: no cap), in closed form."""
    a, b = context + 1, context + T          # the first and last query's keys before the cap
    if window is None or b <= window:
        return (a + b) * T // 2
    if a >= window:
        return T * window
    return (a + window) * (window - a + 1) // 2 + (b - window) * window


def pass_work(s: ModelShape, tokens: int, context: int, decoder: bool,
              pb: dict | None = None, kv: KVLayout = GPU_KV) -> tuple[dict[str, Work], list[dict[str, Work]]]:
    """The work of one pass over `tokens` new positions after `context` cached ones: the global parts and,
    per layer, its parts. Decoder: bidirectional canvas with self-conditioning and head; its logits go to the
    host and the self-conditioning input comes back (logits_io), where the sampler runs (sampler, host work
    between passes). Encoder: causal; the last layer computes only its K/V. Bytes are weight bytes (pb:
    part_bytes) plus the KV and [C, V] traffic."""
    pb = pb or {}
    T, H, F, I, E, k, V = (tokens, s.hidden_size, s.dense_ff, s.expert_ff, s.n_experts, s.top_k, s.vocab_size)
    glob: dict[str, Work] = {}
    if decoder:
        emb, logits = pb.get((None, "embedding"), 0), T * V * 4
        glob["soft_embedding"] = Work(2 * T * V * H, emb + logits, "gemm")
        glob["self_conditioning"] = Work(2 * T * 3 * H * F, pb.get((None, "self_conditioning"), 0), "gemm")
        glob["head"] = Work(2 * T * V * H, emb + logits, "gemm")
        glob["logits_io"] = Work(0, 2 * logits, "pcie")
        glob["sampler"] = Work(0, SAMPLER_PASSES * logits, "host")
    touched = 1 - (1 - k / E) ** T      # expected share of experts some token routes to
    layers = []
    for i in range(s.n_layers):
        d, kvh, nh = s.head_dims[i], s.kv_heads[i], s.n_heads
        kv_proj = H * kvh * d * (2 if s.sliding[i] else 1)
        if not decoder and i == s.n_layers - 1:   # the encoder's last layer: K/V only
            layers.append({"attn_proj": Work(2 * T * kv_proj, pb.get((i, "attention"), 0), "gemm")})
            continue
        cached = kv_positions(s, i, context)
        if decoder:
            keys = T * (cached + T)
        else:   # causal over the new tokens; sliding layers see at most W keys
            keys = _causal_keys(context, T, s.sliding_window if s.sliding[i] else None)
        proj = H * nh * d + kv_proj + nh * d * H
        kv_read = cached * kvh * d * 2 * kv.elem
        layers.append({
            "attn_proj": Work(2 * T * proj, pb.get((i, "attention"), 0) + pb.get((i, "norms"), 0), "gemm"),
            "attention": Work(2 * 2 * nh * keys * d, kv_read, "attention"),
            "dense": Work(2 * T * 3 * H * F, pb.get((i, "dense"), 0), "gemm"),
            "router": Work(2 * T * H * E, pb.get((i, "router"), 0), "plain"),
            "experts": Work(2 * T * k * 3 * H * I, pb.get((i, "experts"), 0) * touched, "moe"),
            # what crosses PCIe when the CPU computes this layer's experts: the MoE input down and its output up
            # as float32 [T, H], the routing down as T x k (id, weight)
            "expert_io": Work(0, T * (2 * H * 4 + k * 8), "pcie"),
        })
    return glob, layers


# ------------------------------------------------------------------------------------------- CPU speed

@dataclass(frozen=True)
class CpuSpeed:
    gops_dense: float    # native matmul GOP/s over a whole canvas (dense MLP shape and type)
    gops_expert: float   # native matmul GOP/s over one expert's tokens (expert shape and type)
    gbs: float           # memory copy bandwidth, GB/s
    source: str


def measure_cpu(model: PlannedModel, threads: int, gops: float | None = None, gbs: float | None = None,
                repeats: int = 5) -> CpuSpeed:
    """The CPU's speed for this model: the native matmul (core/native.matmul, the runtime's kernel) on the
    dense MLP's and one expert's shape and type at their column counts, and a numpy copy for bandwidth.
    Best of `repeats` after a warm-up; ~0.5 s for the real shape. Given figures are used instead of measuring."""
    if gops is not None and gbs is not None:
        return CpuSpeed(gops, gops, gbs, "given")
    s = model.shape
    types = {t.name: t.type for t in model.tensors}
    if gops is None:
        C = s.canvas_length
        per_expert = max(1, round(C * s.top_k / s.n_experts))
        dense = _matmul_gops(s.dense_ff, s.hidden_size, types.get("blk.0.ffn_gate.weight", "F32"), C, threads,
                             repeats)
        expert = _matmul_gops(2 * s.expert_ff, s.hidden_size, types.get("blk.0.ffn_gate_up_exps.weight", "F32"),
                              per_expert, threads, repeats)
    else:
        dense = expert = gops
    if gbs is None:
        src = np.ones(16 * MIB, dtype=np.float32)   # 64 MiB: beyond any last-level cache
        dst = np.empty_like(src)
        best = _best(lambda: np.copyto(dst, src), repeats)
        gbs = 2 * src.nbytes / best / 1e9           # read + write
    return CpuSpeed(dense, expert, gbs, f"measured, {threads} threads" if gops is None else "gops given")


def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()                                            # warm-up: first-touch pages, pool start
    return best_of(fn, repeats)


def _matmul_gops(rows: int, k: int, type_name: str, columns: int, threads: int, repeats: int) -> float:
    from dgguf.core import native
    from dgguf.format.quant_types import TENSOR_TYPES

    rows = min(rows, 1024)        # enough rows for full-speed tiles, quick to quantize
    t = TENSOR_TYPES[type_name]
    rng = np.random.default_rng(0)
    w = np.ascontiguousarray(native.encode(rng.standard_normal((rows, k), dtype=np.float32), t.ggml)).view(np.uint8)
    x = rng.standard_normal((columns, k), dtype=np.float32)
    best = _best(lambda: native.matmul(w, t.ggml, (rows, k), x, threads), repeats)
    return 2 * rows * k * columns / best / 1e9


# ------------------------------------------------------------------------------------------ the cost model

def _gpu_seconds(w: Work, card: Card, gemm: str) -> float:
    if w.kind == "pcie":
        return w.bytes / (card.pcie_gbs * 1e9 * PCIE_EFF)
    tensor = {"tf32": card.tf32_tflops, "fp16": card.fp16_tflops, "int8": card.int8_tops}[gemm]
    peak = {"gemm": tensor, "moe": tensor, "attention": card.fp32_tflops if gemm == "tf32" else card.fp16_tflops,
            "plain": card.fp32_tflops, "memory": 1.0}[w.kind] * 1e12
    eff = {"gemm": GEMM_EFF, "moe": MOE_EFF, "attention": ATTN_EFF, "plain": PLAIN_EFF, "memory": 1.0}[w.kind]
    return max(w.flops / (peak * eff), w.bytes / (card.mem_gbs * 1e9 * MEM_EFF))


def _cpu_seconds(w: Work, cpu: CpuSpeed) -> float:
    rate = cpu.gops_expert if w.kind == "moe" else cpu.gops_dense
    return max(w.flops / (rate * 1e9), w.bytes / (cpu.gbs * 1e9))


def pass_seconds(work, placement: list[str], card: Card | None, cpu: CpuSpeed | None, gemm: str = "tf32") -> float:
    """Seconds of one pass (without the host's sampler between passes). placement[i] is where layer i's experts
    run: gpu, cpu or stream.

    Layers run in order and each needs the previous one's output, so CPU-computed experts overlap only with
    their own layer's dense MLP on the GPU (both read the same residual); their time adds to the pass.
    Streamed layers are double-buffered: the copies overlap the GPU's compute and the slower one sets the pace;
    the logits' copies down and the self-conditioning input's up add to it. With no card, everything runs on the
    CPU and nothing crosses."""
    glob, layers = work
    if card is None:
        return sum(_cpu_seconds(w, cpu) for w in glob.values() if w.kind not in ("pcie", "host")) + \
            sum(_cpu_seconds(w, cpu) for ly in layers for w in ly.values() if w.kind != "pcie")
    pcie = card.pcie_gbs * 1e9 * PCIE_EFF
    gpu = sum(_gpu_seconds(w, card, gemm) for w in glob.values() if w.kind not in ("pcie", "host"))
    io = sum(_gpu_seconds(w, card, gemm) for w in glob.values() if w.kind == "pcie")
    link = 0.0
    for ly, where in zip(layers, placement):
        gpu += LAYER_OVERHEAD_S + sum(_gpu_seconds(ly[p], card, gemm) for p in ("attn_proj", "attention", "router")
                                      if p in ly)
        if "dense" not in ly:      # the encoder's last layer: K/V only
            continue
        dense = _gpu_seconds(ly["dense"], card, gemm)
        if where == "cpu":
            cpu_side = _cpu_seconds(ly["experts"], cpu) + ly["expert_io"].bytes / pcie
            gpu += max(dense, cpu_side) + OFFLOAD_SYNC_S
        else:
            gpu += dense + _gpu_seconds(ly["experts"], card, gemm)
            if where == "stream":
                link += ly["experts"].bytes
    return max(gpu, link / pcie) + io


def sampler_seconds(work, cpu: CpuSpeed) -> float:
    """The host's sampler between two decoder passes (runtime/sampler.py over the [C, V] logits)."""
    return sum(w.bytes for w in work[0].values() if w.kind == "host") / (cpu.gbs * 1e9)


# ----------------------------------------------------------------------------------------------- plans

@dataclass(frozen=True)
class Group:
    name: str
    bytes: int
    placement: str    # gpu, cpu or stream


@dataclass
class Plan:
    model: str
    file_type: str
    card: str
    budget_bytes: int
    vram_bytes: int
    ctx: int
    steps_per_canvas: int
    seconds_per_step: float          # one decoder pass, its copies included (what scripts/gpu_check.sh times)
    seconds_per_encoder_pass: float
    sampler_seconds_per_step: float  # the host's sampler between passes
    tokens_per_s: float
    offload: str                  # none, cpu or stream (where expert layers that do not fit go); mixed: both
    reason: str
    alternatives: dict            # mode → predicted seconds per step, None where it does not fit
    gpu_expert_layers: int
    kv_cache: str
    gemm: str
    cpu: CpuSpeed | None
    groups: list[Group]
    layers: list[str]             # where each layer's experts run: gpu, cpu or stream
    reserve_bytes: int            # the reserve group (not allocated by the executor: the CUDA context's)
    step_h2d_bytes: int           # a decoder step's copies (the executor's counters): up, with the SC input
    step_d2h_bytes: int           # and down

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["groups"] = [{"name": g.name, "bytes": g.bytes, "placement": g.placement} for g in self.groups]
        d["cpu"] = None if self.cpu is None else {f.name: getattr(self.cpu, f.name) for f in fields(self.cpu)}
        return d

    @property
    def device_bytes(self) -> int:
        """What the executor allocates: the GPU groups but the reserve."""
        return self.vram_bytes - self.reserve_bytes


class Predictor:
    """The cost model bound to one model, context and GEMM path: seconds of a decoder step, an encoder pass and
    the sampler for a placement. The CPU's speed is measured (or looked up) only when some work lands on the CPU:
    a CPU layer, the CPU card, or the host sampler."""

    def __init__(self, model: PlannedModel, ctx: int, gemm: str, cpu: CpuSpeed | Callable[[], CpuSpeed] | None):
        self.model, self.ctx, self.gemm = model, ctx, gemm
        self._cpu, self.speed = cpu, (cpu if not callable(cpu) else None)
        self.part_bytes = part_bytes(model)

    def cpu_speed(self) -> CpuSpeed:
        if self.speed is None:
            if self._cpu is None:
                raise DggufError("the plan computes on the CPU but no CPU speed was given")
            self.speed = self._cpu()
        return self.speed

    def times(self, placement: list[str], card: Card | None, kv: KVLayout) -> tuple[float, float, float]:
        """(decoder step, encoder pass, sampler) seconds."""
        s = self.model.shape
        c = self.cpu_speed()
        dec = pass_work(s, s.canvas_length, self.ctx, True, self.part_bytes, kv)
        step = pass_seconds(dec, placement, card, c, self.gemm)
        enc = pass_seconds(pass_work(s, s.canvas_length, self.ctx, False, self.part_bytes, kv), placement, card, c,
                           self.gemm)
        return step, enc, sampler_seconds(dec, c)


@dataclass
class Placement:
    """Where every group lives: the search's result, before its speed is predicted."""
    card: str
    vram_bytes: int
    groups: list[Group]
    layers: list[str]        # where each layer's experts run: gpu, cpu or stream
    offload: str
    reason: str
    alternatives: dict
    kv: KVLayout


def place_on_cpu(model: PlannedModel, ctx: int, kv: KVLayout) -> Placement:
    n = model.shape.n_layers
    groups = [Group(name, b, "cpu") for name, b in mandatory_groups(model, ctx, kv, 0)[1:5]]
    groups += [Group(f"blk.{i}.experts", expert_layer_bytes(model, i, False), "cpu") for i in range(n)]
    return Placement(card="CPU", vram_bytes=0, groups=groups, layers=["cpu"] * n, offload="cpu",
                     reason="no GPU: every group runs on the CPU", alternatives={}, kv=kv)


def _groups_for(model: PlannedModel, mandatory, layers: list[str]) -> list[Group]:
    groups = [Group(name, b, "gpu") for name, b in mandatory]
    if "stream" in layers:
        groups.append(Group("staging", staging_bytes(model, layers), "gpu"))
    return groups + [Group(f"blk.{i}.experts", expert_layer_bytes(model, i, w == "gpu"), w)
                     for i, w in enumerate(layers)]


def _offload_name(layers: list[str]) -> str:
    off = {w for w in layers if w != "gpu"}
    return "none" if not off else off.pop() if len(off) == 1 else "mixed"


def place_on_gpu(model: PlannedModel, budget: int, card: Card, ctx: int, kv: KVLayout, reserve: int,
                 predictor: Predictor, offload: str = "auto", layers: list[str] | None = None) -> Placement:
    """The mandatory groups first, then whole expert layers in order while they fit; the rest computed on the CPU
    or streamed (double-buffered), whichever the predictor says is faster (offload auto) or as asked (cpu,
    stream). layers: an explicit placement (gpu, cpu or stream per layer: -ngl, --n-cpu-moe), checked against
    the budget."""
    n = model.shape.n_layers
    mandatory = mandatory_groups(model, ctx, kv, reserve)
    base = sum(b for _, b in mandatory)
    if base > budget:
        detail = ", ".join(f"{name} {fmt_size(b)}" for name, b in mandatory)
        raise DggufError(f"--vram {fmt_size(budget)} is too small: the GPU needs at least {fmt_size(base)} "
                         f"before any expert layer ({detail}) at --ctx {ctx}")
    resident = [expert_layer_bytes(model, i, True) for i in range(n)]

    def used(ls: list[str]) -> int:
        return base + sum(resident[i] for i, w in enumerate(ls) if w == "gpu") + staging_bytes(model, ls)

    if layers is not None:
        if len(layers) != n or set(layers) - {"gpu", "cpu", "stream"}:
            raise DggufError(f"a placement names gpu, cpu or stream for each of the {n} layers")
        if used(layers) > budget:
            raise DggufError(f"--vram {fmt_size(budget)} is too small for this placement: it needs "
                             f"{fmt_size(used(layers))} ({layers.count('gpu')} expert layers on the GPU)")
        mode = _offload_name(layers)
        where = list(layers)
        reason = (f"as asked: {layers.count('gpu')} expert layers on the GPU, {layers.count('cpu')} on the CPU, "
                  f"{layers.count('stream')} streamed")
        alternatives = {}
    else:
        if offload not in ("auto", "cpu", "stream"):
            raise DggufError(f"offload {offload!r} must be auto, cpu or stream")
        options = {}
        for m in ("cpu", "stream"):
            k = next((k for k in range(n, -1, -1) if used(["gpu"] * k + [m] * (n - k)) <= budget), -1)
            if k >= 0:
                ls = ["gpu"] * k + [m] * (n - k)
                options[m] = (k, ls, predictor.times(ls, card, kv)[0])
        alternatives = {m: (o[2] if o[0] < n else None) for m, o in options.items()}
        how = {"cpu": "computing them on the CPU", "stream": f"streaming them over PCIe {card.pcie}"}
        if options.get("cpu", (-1,))[0] == n:
            mode, reason = "none", f"all {n} expert layers fit on the GPU"
            where = ["gpu"] * n
        elif offload != "auto":
            if offload not in options:
                raise DggufError(f"--vram {fmt_size(budget)} is too small to stream: the staging slots do not fit")
            mode, where = offload, options[offload][1]
            reason = f"{n - options[mode][0]} of {n} expert layers do not fit; {how[mode]}, as asked"
        else:
            mode = min(options, key=lambda m: options[m][2])
            other = "stream" if mode == "cpu" else "cpu"
            off = n - options[mode][0]
            where = options[mode][1]
            if other in options:
                reason = (f"{off} of {n} expert layers do not fit; {how[mode]} ({options[mode][2]:.3f} s/step) "
                          f"beats {how[other]} ({options[other][2]:.3f} s/step)")
            else:
                reason = (f"{off} of {n} expert layers do not fit; {how[mode]}: streaming's two staging buffers "
                          f"do not fit")
    groups = _groups_for(model, mandatory, where)
    return Placement(card=card.name, vram_bytes=sum(g.bytes for g in groups if g.placement == "gpu"), groups=groups,
                     layers=where, offload=mode, reason=reason, alternatives=alternatives, kv=kv)


def make_plan(model: PlannedModel, budget: int | None, card: str, ctx: int = DEFAULT_CTX,
              steps: int = DEFAULT_STEPS, cpu: CpuSpeed | Callable[[], CpuSpeed] | None = None,
              kv_type: str | None = None, reserve: int = DEFAULT_RESERVE, gemm: str = "tf32",
              offload: str = "auto", layers: list[str] | None = None) -> Plan:
    """Place the model's groups for a VRAM budget on `card` (a CARDS key, or cpu) and predict its speed.

    cpu: the CPU's speed, or a function measuring it (called only if some work lands on the CPU).
    kv_type: f16 or f32; default f16 on a GPU (GPU_KV), the CPU runtime's f32 (CPU_KV) on the CPU.
    gemm: tf32 (native/cuda's kernels) or fp16 / int8 (kernels it does not have; see GEMMS).
    offload, layers: place_on_gpu's."""
    s = model.shape
    if not 1 <= ctx <= s.context_length:
        raise DggufError(f"--ctx {ctx} is outside 1..{s.context_length} (the model's context length)")
    if steps < 1:
        raise DggufError(f"--steps {steps} must be positive")
    if gemm not in GEMMS:
        raise DggufError(f"gemm {gemm!r} must be one of {', '.join(GEMMS)}")
    if kv_type not in (None, "f16", "f32"):
        raise DggufError(f"KV cache type {kv_type!r} must be f16 or f32")
    predictor = Predictor(model, ctx, gemm, cpu)
    if card == CPU_CARD:
        gpu_card = None
        where = place_on_cpu(model, ctx, KVLayout(kv_type or CPU_KV.type))
    else:
        gpu_card = CARDS[card]
        if budget is None:
            raise DggufError("a VRAM budget is needed (--vram SIZE or --vram auto)")
        if budget > gpu_card.vram_gib * GIB:
            raise DggufError(f"--vram {fmt_size(budget)} is more than the {gpu_card.name}'s "
                             f"{gpu_card.vram_gib:g} GiB")
        where = place_on_gpu(model, budget, gpu_card, ctx, KVLayout(kv_type or GPU_KV.type), reserve, predictor,
                             offload, layers)
    step, enc, sampler = predictor.times(where.layers, gpu_card, where.kv)
    up, down = pass_traffic(model, where.layers, s.canvas_length, True) if gpu_card else (0, 0)
    return Plan(model=model.source, file_type=model.file_type, card=where.card, budget_bytes=budget or 0,
                vram_bytes=where.vram_bytes, ctx=ctx, steps_per_canvas=steps, seconds_per_step=step,
                seconds_per_encoder_pass=enc, sampler_seconds_per_step=sampler,
                tokens_per_s=s.canvas_length / (steps * (step + sampler) + enc),
                offload=where.offload, reason=where.reason, alternatives=where.alternatives,
                gpu_expert_layers=where.layers.count("gpu") if gpu_card else 0, kv_cache=where.kv.type, gemm=gemm,
                cpu=predictor.speed, groups=where.groups, layers=where.layers,
                reserve_bytes=reserve if gpu_card else 0, step_h2d_bytes=up, step_d2h_bytes=down)


# ------------------------------------------------------------------------------------ sizes and the GPU

_BINARY = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str, option: str = "--vram", zero: bool = False) -> int:
    """Bytes from '12GiB', '12288 MiB', '11.5GiB' or a plain byte count. Decimal units (GB, MB) and bare
    letters (12G) are refused: GPU memory comes in binary units, and 12 GB would silently plan 0.8 GiB less."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _BINARY:
        hint = ""
        if unit and unit.rstrip("b") in ("k", "m", "g", "t"):
            hint = f"; decimal or bare units are not accepted, write {m.group(1)}{unit[0].upper()}iB"
        raise DggufError(f"{option} {text!r} is not a size such as 12GiB, 12288MiB or a byte count{hint}")
    try:
        value = Decimal(m.group(1)) * _BINARY[unit]
    except InvalidOperation:
        raise DggufError(f"{option} {text!r} is not a number") from None
    if value != value.to_integral_value() or value < (0 if zero else 1):
        raise DggufError(f"{option} {text!r} must be a {'' if zero else 'positive '}whole number of bytes")
    return int(value)


def fmt_size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def format_plan(p: Plan) -> str:
    """The plan as a table: one row per group, runs of expert layers with the same placement merged."""
    rows, i = [], 0
    while i < len(p.groups):
        g = p.groups[i]
        j = i
        if g.name.endswith(".experts"):
            while j + 1 < len(p.groups) and p.groups[j + 1].name.endswith(".experts") \
                    and p.groups[j + 1].placement == g.placement:
                j += 1
        run = p.groups[i:j + 1]
        name = g.name if j == i else f"blk.{run[0].name.split('.')[1]}-{run[-1].name.split('.')[1]}.experts"
        rows.append(f"  {name:<20} {fmt_size(sum(r.bytes for r in run)):>12}  {g.placement}")
        i = j + 1
    budget = f"budget {fmt_size(p.budget_bytes)}, " if p.budget_bytes else ""
    cpu = ""
    if p.cpu is not None:
        cpu = (f"\nCPU: {p.cpu.gops_dense:.0f} GOP/s over the canvas, {p.cpu.gops_expert:.0f} per expert, "
               f"{p.cpu.gbs:.1f} GB/s ({p.cpu.source})")
    moved = ""
    if p.step_h2d_bytes or p.step_d2h_bytes:
        moved = (f"\nper step: {fmt_size(p.step_h2d_bytes)} to the GPU, {fmt_size(p.step_d2h_bytes)} back; "
                 f"sampler on the CPU {p.sampler_seconds_per_step:.4f} s")
    return (f"{p.model} ({p.file_type}) on {p.card}: {budget}planned {fmt_size(p.vram_bytes)} of VRAM, "
            f"ctx {p.ctx}, KV cache {p.kv_cache}, {p.gemm} GEMMs\n" + "\n".join(rows) +
            f"\noffload: {p.offload} ({p.reason})\n"
            f"predicted: {p.seconds_per_step:.4f} s/step, encoder pass {p.seconds_per_encoder_pass:.4f} s, "
            f"{p.tokens_per_s:.1f} tok/s at {p.steps_per_canvas} steps per canvas" + moved + cpu)
