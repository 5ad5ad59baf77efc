"""The VRAM planner and its cost model: what of a DiffusionGemma lives on the GPU at a memory budget, how the
rest runs, and how long a denoising step takes on a named card.

Sizes are exact: a GGUF's own tensor table (`-m`), or the tensors `dgguf convert` would write for a config and
a file type (`--config --type`: the CLI builds that PlannedModel with the converter's own tables). Placement: the
mandatory groups (reserve, embedding/head, globals, the layers' non-expert weights, KV cache, canvas buffers)
go to the GPU first, then whole expert layers in layer order while they fit; the remaining expert layers are
either computed on the CPU or streamed over PCIe every pass, whichever the cost model predicts is faster.
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


# Spec-sheet figures. Tensor throughputs are dense (no 2:4 sparsity); where NVIDIA lists only clocks, they are
# SMs x boost clock x per-SM rate (Ampere/Ada GeForce: 512 FP16-with-FP32-accumulate and 2048 INT8 ops per SM
# per clock; the GeForce whitepapers' 3090/4090 figures, 71/165 TFLOPS, follow this). PCIe: 3.94 GB/s per
# 4.0 lane, 7.88 per 5.0 lane.
CARDS = {
    # AD107, 24 SMs, boost up to 2370 MHz at 115 W (lower at lower TGP), 8 GB GDDR6 128-bit 16 Gbps, PCIe 4.0 x8
    "rtx4060-laptop": Card("RTX 4060 Laptop 8 GB", 8, 256, 29.1, 116.5, "4.0 x8", 15.75),
    # GA106, 28 SMs, 1777 MHz, 12 GB GDDR6 192-bit 15 Gbps
    "rtx3060": Card("RTX 3060 12 GB", 12, 360, 25.5, 101.9, "4.0 x16", 31.5),
    # AD104, 46 SMs, 2475 MHz, 12 GB GDDR6X 192-bit 21 Gbps
    "rtx4070": Card("RTX 4070 12 GB", 12, 504, 58.3, 233.2, "4.0 x16", 31.5),
    # AD103, 76 SMs, 2505 MHz, 16 GB GDDR6X 256-bit 22.4 Gbps
    "rtx4080": Card("RTX 4080 16 GB", 16, 716.8, 97.5, 389.9, "4.0 x16", 31.5),
    # GA102, 82 SMs, 1695 MHz, 24 GB GDDR6X 384-bit 19.5 Gbps (Ampere GA102 whitepaper: 71 / 284)
    "rtx3090": Card("RTX 3090 24 GB", 24, 936.2, 71.2, 284.7, "4.0 x16", 31.5),
    # AD102, 128 SMs, 2520 MHz, 24 GB GDDR6X 384-bit 21 Gbps (Ada whitepaper: 165.2 / 660.6)
    "rtx4090": Card("RTX 4090 24 GB", 24, 1008, 165.2, 660.6, "4.0 x16", 31.5),
    # GB202, 170 SMs, 2407 MHz, 32 GB GDDR7 512-bit 28 Gbps, PCIe 5.0 x16 (838 FP16 TFLOPS is the sparse,
    # FP16-accumulate figure; FP32 accumulate runs at half rate on GeForce)
    "rtx5090": Card("RTX 5090 32 GB", 32, 1792, 209.5, 838, "5.0 x16", 63),
    # H100 SXM5 80 GB HBM3: 3.35 TB/s, 989 dense FP16/BF16 TFLOPS, 1979 dense INT8 TOPS, PCIe 5.0 x16
    "h100": Card("H100 SXM 80 GB", 80, 3350, 989.4, 1979, "5.0 x16", 63),
    # H200 SXM 141 GB HBM3e (~140 GiB as the driver reports it): 4.8 TB/s, the H100's tensor rates; the kind
    # of machine the project's GPU checks run on
    "h200": Card("H200 SXM 141 GB", 140, 4800, 989.4, 1979, "5.0 x16", 63),
    # Cards of the published measurements the model is compared with (docs/planner.md):
    # GA104 laptop, 40 SMs, boost up to 1620 MHz at 125 W, 8 GB GDDR6 256-bit 14 Gbps
    "rtx3070-laptop": Card("RTX 3070 Laptop 8 GB", 8, 448, 33.2, 132.7, "4.0 x16", 31.5),
    # GA102, 84 SMs, 1860 MHz, 24 GB GDDR6X 384-bit 21 Gbps
    "rtx3090ti": Card("RTX 3090 Ti 24 GB", 24, 1008, 80.0, 320.0, "4.0 x16", 31.5),
    # AD104 data-centre card, 24 GB GDDR6 300 GB/s, 121 dense FP16 TFLOPS (full rate with FP32 accumulate),
    # 242 dense INT8 TOPS
    "l4": Card("L4 24 GB", 24, 300, 121, 242, "4.0 x16", 31.5),
}
CPU_CARD = "cpu"   # --card cpu: no GPU, everything on the CPU the planner runs on

# Efficiency factors of the cost model (assumptions, not measurements; docs/planner.md says why each).
MEM_EFF = 0.80          # fraction of spec memory bandwidth a streaming kernel reaches
GEMM_EFF = 0.50         # fraction of tensor peak for GEMMs over the whole canvas (dequantize-in-tile)
MOE_EFF = 0.25          # per-expert GEMMs over ~C*k/E tokens each, plus gather and scatter
ATTN_EFF = 0.30         # flash-style attention (scores never stored), FP16 tensor cores
PCIE_EFF = 0.80         # large copies from pinned host memory
LAYER_OVERHEAD_S = 60e-6   # kernel launches and gaps per layer and pass (about 20 kernels)
OFFLOAD_SYNC_S = 100e-6    # host round trip per CPU-computed expert layer (two copies, a wake-up)
SAMPLER_PASSES = 4      # [C, V] float32 passes per step: softmax, entropy, argmax and sample, SC softmax


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
    """How the KV cache is stored: element size and whether K=V (full) layers keep one tensor."""
    type: str              # f16 or f32
    shared_full: bool

    @property
    def elem(self) -> int:
        return {"f16": 2, "f32": 4}[self.type]


GPU_KV = KVLayout("f16", True)      # the planned CUDA cache: raw K of full layers once, normed and roped on read
CPU_KV = KVLayout("f32", False)     # the CPU runtime today (native/model.c): f32, K and V apart in every layer


def kv_positions(s: ModelShape, layer: int, ctx: int) -> int:
    """Positions a layer's cache holds: sliding layers the last W-1, full layers all ctx."""
    return min(s.sliding_window - 1, ctx) if s.sliding[layer] else ctx


def kv_tensors(s: ModelShape, layer: int, kv: KVLayout) -> int:
    return 1 if kv.shared_full and not s.sliding[layer] else 2


def kv_cache_bytes(s: ModelShape, ctx: int, kv: KVLayout) -> int:
    return sum(kv_positions(s, i, ctx) * s.kv_heads[i] * s.head_dims[i] * kv_tensors(s, i, kv) * kv.elem
               for i in range(s.n_layers))


def buffer_bytes(s: ModelShape) -> int:
    """Canvas and activation buffers of a step: [C, V] float32 logits and self-conditioning input, and one
    layer's float32 activations over the canvas (attention is flash-style: no [C, keys] scores)."""
    C, H, F, I = s.canvas_length, s.hidden_size, s.dense_ff, s.expert_ff
    d, kvh = max(s.head_dims), max(s.kv_heads)
    per_token = (4 * H                      # residual, normed input, attention and MLP outputs
                 + 2 * s.n_heads * d         # q and the attention output
                 + 2 * kvh * d               # canvas K and V
                 + 2 * F                     # dense gate and up
                 + s.top_k * (2 * I + 2 * H)  # routed copies: inputs, gate/up, outputs
                 + 8)                        # sampler per position: entropy, argmax, sample, accept, ...
    return 2 * C * s.vocab_size * 4 + C * per_token * 4


# ------------------------------------------------------------------------------------------ pass work

@dataclass(frozen=True)
class Work:
    flops: float
    bytes: float
    kind: str      # gemm, moe, attention or memory (bytes only)


def pass_work(s: ModelShape, tokens: int, context: int, decoder: bool,
              pb: dict | None = None, kv: KVLayout = GPU_KV) -> tuple[dict[str, Work], list[dict[str, Work]]]:
    """The work of one pass over `tokens` new positions after `context` cached ones: the global parts and,
    per layer, its parts. Decoder: bidirectional canvas with self-conditioning, head and sampler; encoder:
    causal, K/V only. Bytes are weight bytes (pb: part_bytes) plus the KV and [C, V] traffic."""
    pb = pb or {}
    T, H, F, I, E, k, V = (tokens, s.hidden_size, s.dense_ff, s.expert_ff, s.n_experts, s.top_k, s.vocab_size)
    glob: dict[str, Work] = {}
    if decoder:
        emb, logits = pb.get((None, "embedding"), 0), T * V * 4
        glob["soft_embedding"] = Work(2 * T * V * H, emb + logits, "gemm")
        glob["self_conditioning"] = Work(2 * T * 3 * H * F, pb.get((None, "self_conditioning"), 0), "gemm")
        glob["head"] = Work(2 * T * V * H, emb + logits, "gemm")
        glob["sampler"] = Work(0, SAMPLER_PASSES * logits, "memory")
    touched = 1 - (1 - k / E) ** T      # expected share of experts some token routes to
    layers = []
    for i in range(s.n_layers):
        d, kvh, nh = s.head_dims[i], s.kv_heads[i], s.n_heads
        cached = kv_positions(s, i, context)
        if decoder:
            keys = T * (cached + T)
        else:   # causal over the new tokens; sliding layers see at most W keys
            keys = sum(min(context + j + 1, s.sliding_window) if s.sliding[i] else context + j + 1
                       for j in range(T))
        proj = H * nh * d + H * kvh * d * (2 if s.sliding[i] else 1) + nh * d * H
        kv_read = cached * kvh * d * kv_tensors(s, i, kv) * kv.elem
        layers.append({
            "attn_proj": Work(2 * T * proj, pb.get((i, "attention"), 0) + pb.get((i, "norms"), 0), "gemm"),
            "attention": Work(2 * 2 * nh * keys * d, kv_read, "attention"),
            "dense": Work(2 * T * 3 * H * F, pb.get((i, "dense"), 0), "gemm"),
            "router": Work(2 * T * H * E, pb.get((i, "router"), 0), "gemm"),
            "experts": Work(2 * T * k * 3 * H * I, pb.get((i, "experts"), 0) * touched, "moe"),
            # what crosses PCIe when the CPU computes this layer's experts: the normed input and the weighted
            # sum as float32 [T, H], the routing as T x k (id, weight)
            "expert_io": Work(0, T * (2 * H * 4 + k * 8), "memory"),
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
    peak = (card.int8_tops if gemm == "int8" and w.kind in ("gemm", "moe") else card.fp16_tflops) * 1e12
    eff = {"gemm": GEMM_EFF, "moe": MOE_EFF, "attention": ATTN_EFF, "memory": 1.0}[w.kind]
    return max(w.flops / (peak * eff), w.bytes / (card.mem_gbs * 1e9 * MEM_EFF))


def _cpu_seconds(w: Work, cpu: CpuSpeed) -> float:
    rate = cpu.gops_expert if w.kind == "moe" else cpu.gops_dense
    return max(w.flops / (rate * 1e9), w.bytes / (cpu.gbs * 1e9))


def pass_seconds(work, placement: list[str], card: Card | None, cpu: CpuSpeed | None, gemm: str = "fp16") -> float:
    """Seconds of one pass. placement[i] is where layer i's experts run: gpu, cpu or stream.

    Layers run in order and each needs the previous one's output, so CPU-computed experts overlap only with
    their own layer's dense MLP on the GPU (both read the same residual); their time adds to the pass.
    Streamed layers are double-buffered: the copies overlap the GPU's compute and the slower one sets the pace.
    With no card, everything runs on the CPU."""
    glob, layers = work
    if card is None:
        return sum(_cpu_seconds(w, cpu) for w in glob.values()) + \
            sum(_cpu_seconds(w, cpu) for ly in layers for p, w in ly.items() if p != "expert_io")
    pcie = card.pcie_gbs * 1e9 * PCIE_EFF
    gpu, link = sum(_gpu_seconds(w, card, gemm) for w in glob.values()), 0.0
    for ly, where in zip(layers, placement):
        gpu += LAYER_OVERHEAD_S + sum(_gpu_seconds(ly[p], card, gemm) for p in ("attn_proj", "attention", "router"))
        dense = _gpu_seconds(ly["dense"], card, gemm)
        if where == "cpu":
            cpu_side = _cpu_seconds(ly["experts"], cpu) + ly["expert_io"].bytes / pcie
            gpu += max(dense, cpu_side) + OFFLOAD_SYNC_S
        else:
            gpu += dense + _gpu_seconds(ly["experts"], card, gemm)
            if where == "stream":
                link += ly["experts"].bytes
    return max(gpu, link / pcie)


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
    seconds_per_step: float
    seconds_per_encoder_pass: float
    tokens_per_s: float
    offload: str                  # none, cpu or stream (where expert layers that do not fit go)
    reason: str
    alternatives: dict            # mode → predicted seconds per step, None where it does not fit
    gpu_expert_layers: int
    kv_cache: str
    gemm: str
    cpu: CpuSpeed | None
    groups: list[Group]

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["groups"] = [{"name": g.name, "bytes": g.bytes, "placement": g.placement} for g in self.groups]
        d["cpu"] = None if self.cpu is None else {f.name: getattr(self.cpu, f.name) for f in fields(self.cpu)}
        return d


def _layer_groups(model: PlannedModel, ctx: int, kv: KVLayout, reserve: int) -> list[tuple[str, int]]:
    """The mandatory groups, in placement order, with their bytes."""
    pb = part_bytes(model)
    per_layer = sum(b for (layer, _), b in pb.items() if layer is not None and _ != "experts")
    return [("reserve", reserve), ("embedding", pb.get((None, "embedding"), 0)),
            ("globals", pb.get((None, "self_conditioning"), 0) + pb.get((None, "norms"), 0)),
            ("layers", per_layer), ("kv_cache", kv_cache_bytes(model.shape, ctx, kv)),
            ("buffers", buffer_bytes(model.shape))]


class Predictor:
    """The cost model bound to one model, context and GEMM path: seconds of a decoder step and an encoder pass
    for a placement. The CPU's speed is measured (or looked up) only when some work lands on the CPU."""

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

    def times(self, placement: list[str], card: Card | None, kv: KVLayout) -> tuple[float, float]:
        """(decoder step, encoder pass) seconds."""
        s = self.model.shape
        c = self.cpu_speed() if card is None or "cpu" in placement else None
        step = pass_seconds(pass_work(s, s.canvas_length, self.ctx, True, self.part_bytes, kv), placement, card, c,
                            self.gemm)
        enc = pass_seconds(pass_work(s, s.canvas_length, self.ctx, False, self.part_bytes, kv), placement, card, c,
                           self.gemm)
        return step, enc


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


def _expert_bytes(model: PlannedModel) -> list[int]:
    pb = part_bytes(model)
    return [pb.get((i, "experts"), 0) for i in range(model.shape.n_layers)]


def place_on_cpu(model: PlannedModel, ctx: int, kv: KVLayout) -> Placement:
    experts = _expert_bytes(model)
    groups = [Group(n, b, "cpu") for n, b in _layer_groups(model, ctx, kv, 0)[1:]]
    groups += [Group(f"blk.{i}.experts", b, "cpu") for i, b in enumerate(experts)]
    return Placement(card="CPU", vram_bytes=0, groups=groups, layers=["cpu"] * model.shape.n_layers, offload="cpu",
                     reason="no GPU: every group runs on the CPU", alternatives={}, kv=kv)


def place_on_gpu(model: PlannedModel, budget: int, card: Card, ctx: int, kv: KVLayout, reserve: int,
                 predictor: Predictor) -> Placement:
    """The mandatory groups first, then whole expert layers in order while they fit; the rest computed on the CPU
    or streamed (double-buffered), whichever the predictor says is faster."""
    n = model.shape.n_layers
    experts = _expert_bytes(model)
    mandatory = _layer_groups(model, ctx, kv, reserve)
    base = sum(b for _, b in mandatory)
    if base > budget:
        detail = ", ".join(f"{name} {fmt_size(b)}" for name, b in mandatory)
        raise DggufError(f"--vram {fmt_size(budget)} is too small: the GPU needs at least {fmt_size(base)} "
                         f"before any expert layer ({detail}) at --ctx {ctx}")

    def resident(extra: Callable[[int], int]) -> int:
        """The most leading expert layers that fit beside the mandatory groups and extra(k) bytes."""
        return next((k for k in range(n, -1, -1) if base + sum(experts[:k]) + extra(k) <= budget), -1)

    def staging(k: int) -> int:
        """Streaming's double buffer: room for two streamed layers (one if only one is streamed)."""
        return min(2, n - k) * max(experts[k:], default=0)

    k_cpu, k_stream = resident(lambda k: 0), resident(staging)
    options = {}
    for mode, k in (("cpu", k_cpu), ("stream", k_stream)):
        if k >= 0:
            layers = ["gpu"] * k + [mode] * (n - k)
            options[mode] = (k, layers, predictor.times(layers, card, kv)[0])
    alternatives = {m: (o[2] if o[0] < n else None) for m, o in options.items()}
    if k_cpu == n:
        mode, reason = "none", f"all {n} expert layers fit on the GPU"
    else:
        mode = min(options, key=lambda m: options[m][2])
        other = "stream" if mode == "cpu" else "cpu"
        off = n - options[mode][0]
        how = {"cpu": "computing them on the CPU", "stream": f"streaming them over PCIe {card.pcie}"}
        if other in options:
            reason = (f"{off} of {n} expert layers do not fit; {how[mode]} ({options[mode][2]:.3f} s/step) beats "
                      f"{how[other]} ({options[other][2]:.3f} s/step)")
        else:
            reason = (f"{off} of {n} expert layers do not fit; {how[mode]}: streaming's two staging buffers "
                      f"({fmt_size(staging(k_cpu))}) do not fit")
    k, layers = (n, ["gpu"] * n) if mode == "none" else options[mode][:2]
    groups = [Group(name, b, "gpu") for name, b in mandatory]
    if mode == "stream":
        groups.append(Group("staging", staging(k), "gpu"))
    groups += [Group(f"blk.{i}.experts", b, layers[i]) for i, b in enumerate(experts)]
    return Placement(card=card.name, vram_bytes=sum(g.bytes for g in groups if g.placement == "gpu"), groups=groups,
                     layers=layers, offload=mode, reason=reason, alternatives=alternatives, kv=kv)


def make_plan(model: PlannedModel, budget: int | None, card: str, ctx: int = DEFAULT_CTX,
              steps: int = DEFAULT_STEPS, cpu: CpuSpeed | Callable[[], CpuSpeed] | None = None,
              kv_type: str | None = None, reserve: int = DEFAULT_RESERVE, gemm: str = "fp16") -> Plan:
    """Place the model's groups for a VRAM budget on `card` (a CARDS key, or cpu) and predict its speed.

    cpu: the CPU's speed, or a function measuring it (called only if some work lands on the CPU).
    kv_type: f16 or f32; default f16 on a GPU (GPU_KV), the CPU runtime's layout (CPU_KV) on the CPU."""
    s = model.shape
    if not 1 <= ctx <= s.context_length:
        raise DggufError(f"--ctx {ctx} is outside 1..{s.context_length} (the model's context length)")
    if steps < 1:
        raise DggufError(f"--steps {steps} must be positive")
    if gemm not in ("fp16", "int8"):
        raise DggufError(f"gemm {gemm!r} must be fp16 or int8")
    if kv_type not in (None, "f16", "f32"):
        raise DggufError(f"KV cache type {kv_type!r} must be f16 or f32")
    predictor = Predictor(model, ctx, gemm, cpu)
    if card == CPU_CARD:
        gpu_card = None
        where = place_on_cpu(model, ctx, KVLayout(kv_type or CPU_KV.type, CPU_KV.shared_full))
    else:
        gpu_card = CARDS[card]
        if budget is None:
            raise DggufError("a VRAM budget is needed (--vram SIZE or --vram auto)")
        if budget > gpu_card.vram_gib * GIB:
            raise DggufError(f"--vram {fmt_size(budget)} is more than the {gpu_card.name}'s "
                             f"{gpu_card.vram_gib:g} GiB")
        where = place_on_gpu(model, budget, gpu_card, ctx, KVLayout(kv_type or GPU_KV.type, GPU_KV.shared_full),
                             reserve, predictor)
    step, enc = predictor.times(where.layers, gpu_card, where.kv)
    return Plan(model=model.source, file_type=model.file_type, card=where.card, budget_bytes=budget or 0,
                vram_bytes=where.vram_bytes, ctx=ctx, steps_per_canvas=steps, seconds_per_step=step,
                seconds_per_encoder_pass=enc, tokens_per_s=s.canvas_length / (steps * step + enc),
                offload=where.offload, reason=where.reason, alternatives=where.alternatives,
                gpu_expert_layers=where.layers.count("gpu") if gpu_card else 0, kv_cache=where.kv.type, gemm=gemm,
                cpu=predictor.speed, groups=where.groups)


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
    return (f"{p.model} ({p.file_type}) on {p.card}: {budget}planned {fmt_size(p.vram_bytes)} of VRAM, "
            f"ctx {p.ctx}, KV cache {p.kv_cache}\n" + "\n".join(rows) +
            f"\noffload: {p.offload} ({p.reason})\n"
            f"predicted: {p.seconds_per_step:.4f} s/step, encoder pass {p.seconds_per_encoder_pass:.4f} s, "
            f"{p.tokens_per_s:.1f} tok/s at {p.steps_per_canvas} steps per canvas" + cpu)
