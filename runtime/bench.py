"""What the benchmarks share: best-of-N timing, the multiply-adds of a decoder step, and a check for foreign
CPU load before timing (the machines are shared, and a busy core halves a 2-thread figure)."""
from __future__ import annotations

import os
import time

import numpy as np


def best_of(fn, repeat: int = 3) -> float:
    """Seconds of the fastest of `repeat` calls (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _busy_and_total_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)          # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def foreign_load(seconds: float = 0.5) -> float | None:
    """Cores kept busy by other processes over the next `seconds` (this process's own CPU time is subtracted);
    None where /proc/stat is missing (or os.sysconf: Windows)."""
    try:
        hz = os.sysconf("SC_CLK_TCK")
        busy0, _ = _busy_and_total_ticks()
        own0, wall0 = sum(os.times()[:2]), time.perf_counter()
        time.sleep(seconds)
        busy1, _ = _busy_and_total_ticks()
        own1, wall1 = sum(os.times()[:2]), time.perf_counter()
    except (AttributeError, OSError, ValueError, IndexError):
        return None
    return max(0.0, ((busy1 - busy0) / hz - (own1 - own0)) / (wall1 - wall0))


def load_note(seconds: float = 0.5) -> str:
    """One line on the foreign load measured now, flagged when the figures that follow will be low."""
    load = foreign_load(seconds)
    if load is None:
        return "foreign load unknown (no /proc/stat)"
    return f"foreign load {load:.2f} cores" + ("  (another process is busy: figures are low)" if load > 0.2 else "")


def measured_peaks(threads: int, repeats: int = 10, read_mib: int = 256) -> dict:
    """This machine's peaks on `threads` threads: GOP/s of the active matmul kernel's fp32, int8 and bf16
    instructions (None where it has none; native/peak.c) and GB/s of reading `read_mib` MiB (far beyond the
    caches, so DRAM). Best of `repeats` rounds, each timing every kind once, so that a slow spell of the machine
    does not land on one kind alone."""
    from dgguf.core import native
    from dgguf.core.errors import DggufError
    rounds = 1 << 21
    words = np.ones(read_mib << 17, dtype=np.uint64)
    runs = {"read": lambda: native.read_words(words, threads)}
    ops = {"read": words.nbytes}
    peaks = {}
    for kind in native.PEAK_KINDS:
        try:
            ops[kind], check = native.peak(kind, rounds, threads)
        except DggufError:
            peaks[kind] = None
            continue
        if check != ops[kind] / 2:
            raise RuntimeError(f"the {kind} peak loop summed {check}, not {ops[kind] / 2}: it skipped rounds")
        runs[kind] = lambda kind=kind: native.peak(kind, rounds, threads)
    if native.read_words(words, threads) != words.size:
        raise RuntimeError("the read-bandwidth loop missed words")
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for kind, run in runs.items():
            best[kind] = min(best[kind], best_of(run, 1))
    peaks.update({kind: ops[kind] / best[kind] / 1e9 for kind in runs})
    return peaks


def peaks_note(p: dict) -> str:
    """One line of measured_peaks()."""
    f = lambda v, unit: "-" if v is None else f"{v:.0f} {unit}"  # noqa: E731
    return (f"measured peaks: int8 {f(p['int8'], 'GOP/s')}, fp32 {f(p['fp32'], 'GFLOP/s')}, "
            f"bf16 {f(p['bf16'], 'GFLOP/s')}, DRAM read {p['read']:.1f} GB/s")


def denoise_step(model, prompt, steps: int) -> float:
    """Seconds per denoising step of one canvas generated after `prompt` with `steps` forced steps (no early
    stop): the decoder pass plus the sampler, the self-conditioning hand-off and the draws, timed from the first
    decoder pass to the end of generation (the prompt encode is left out)."""
    marks = []
    model.generate(prompt, max_new_tokens=model.config.canvas_length, seed=0, early_stop=False,
                   max_denoising_steps=steps, on_step=lambda c, ids: marks.append(time.perf_counter()))
    end = time.perf_counter()
    return (end - marks[0]) / steps


def one_token_bytes(gguf, c) -> int:
    """Weight bytes a one-token encoder pass reads: one embedding row, every layer's attention, dense FFN and
    router, top_k of its n_experts experts, and of the last layer only what its K/V need (no FFN, no queries)."""
    last = c.n_layers - 1
    kv_only = {"attn_norm.weight", "attn_k.weight", "attn_v.weight", "attn_k_norm.weight"}
    total = 0
    for t in gguf.tensors:
        if t.name == "token_embd.weight":
            total += t.nbytes // c.vocab_size
        elif t.name.startswith("blk."):
            layer, name = t.name[4:].split(".", 1)
            if int(layer) == last and name not in kv_only:
                continue
            total += t.nbytes * c.top_k // c.n_experts if "_exps." in name else t.nbytes
    return total


def step_macs_by_part(c, canvas: int, context: int) -> dict:
    """Multiply-adds of one decoder step over a canvas after `context` cached tokens, by what runs them: "matmul"
    (projections, MLPs, experts, router, the tied head: vocab x hidden x canvas of it), "soft_embed"
    (softmax(sc) @ E) and "attention" (scores and values, half each)."""
    H, F, I, nh = c.hidden_size, c.dense_ff, c.expert_ff, c.n_heads
    per_token = 2 * H * F + F * H + c.vocab_size * H   # self-conditioning MLP, tied head
    attention = 0.0
    for i in range(c.n_layers):
        d, kv = c.head_dims[i], c.kv_heads[i]
        per_token += H * nh * d + H * kv * d * (2 if c.sliding[i] else 1) + nh * d * H   # q, k, (v), o
        per_token += 3 * H * F + H * c.n_experts + c.top_k * 3 * H * I                  # dense, router, experts
        keys = canvas + (min(context, c.sliding_window - 1) if c.sliding[i] else context)
        attention += 2 * canvas * nh * keys * d                                        # scores and values
    return {"matmul": per_token * canvas, "soft_embed": c.vocab_size * H * canvas, "attention": attention}


def step_floor(gguf, parts: dict, peaks: dict) -> dict | None:
    """Seconds of each part of a decoder step (step_macs_by_part) at measured_peaks(), for this file's weight
    types under the active matmul kernel: the matmuls at the int8 peak for quantized weights under an int8
    kernel, at the bf16 peak for BF16 weights under a bf16 one, else at the FP32 FMA peak; the soft embedding at
    the bf16 peak where it runs in bfloat16, else FP32; attention's scores at half the FP32 peak (they sum in
    double) and its values at the FP32 peak. None where a peak it needs was not measured."""
    from dgguf.core import native
    kernel = native.matmul_kernel()
    types = {t.name: t.type.name for t in gguf.tensors}
    float_types = ("F32", "F16", "BF16")
    layer, embedding = types.get("blk.0.attn_q.weight", "F32"), types.get("token_embd.weight", "F32")
    bf16 = "bf16" in kernel
    matmul = ("int8" if kernel.startswith("int8") and layer not in float_types else
              "bf16" if bf16 and layer == "BF16" else "fp32")
    soft = "bf16" if bf16 and embedding not in ("F32", "F16") else "fp32"
    if peaks.get(matmul) is None or peaks.get(soft) is None or peaks.get("fp32") is None:
        return None
    fp32 = peaks["fp32"] * 1e9
    return {"matmuls": 2 * parts["matmul"] / (peaks[matmul] * 1e9),
            "soft embedding": 2 * parts["soft_embed"] / (peaks[soft] * 1e9),
            "attention": parts["attention"] / (fp32 / 2) + parts["attention"] / fp32}


def floor_note(floor: dict, step: float) -> str:
    """One line of a step_floor() against the step's measured seconds."""
    total = sum(floor.values())
    parts = ", ".join(f"{k} {v:.4f} s" for k, v in floor.items())
    note = f"decoder step floor at the measured peaks {total:.4f} s ({parts}): the step runs at {total / step:.2f} " \
           "of the peak rate"
    # faster than the peaks allow: the peak loops were slowed (another process, or a core shared for a while)
    return note + ("  (the peaks read low: run again)" if total > step else "")


def step_macs(c, canvas: int, context: int) -> float:
    """Multiply-adds of one decoder step over a canvas after `context` cached tokens (matmuls and attention)."""
    return sum(step_macs_by_part(c, canvas, context).values())


def rss_anon() -> int | None:
    """Bytes of this process's anonymous resident memory (what is not a mapped file); None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def drop_file_cache(path) -> bool:
    """Ask the kernel to forget the file's cached pages (so the next read comes from disk); False where it
    cannot be asked (no posix_fadvise)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def part_seconds(model, repeats: int) -> dict:
    """Seconds of the parts of a decoder step that run over the vocabulary, each timed alone with the step's own
    kernels on the model's threads: the tied head (the embedding times the canvas), the soft embedding
    (softmax(sc) @ E) and the sampler's per-step reductions (scale, argmax, entropy, sampling)."""
    from dgguf.core import native
    c, threads = model.config, model.native.threads
    C, V, H = c.canvas_length, c.vocab_size, c.hidden_size
    emb = next(t for t in model.gguf.tensors if t.name == "token_embd.weight")
    raw = model.gguf.tensor_bytes(emb)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((C, H), dtype=np.float32)
    logits = rng.standard_normal((C, V), dtype=np.float32)
    scaled = np.empty_like(logits)
    uniforms = rng.random(C)
    return {"head": best_of(lambda: native.matmul(raw, emb.type.ggml, (V, H), x, threads), repeats),
            "soft embedding": best_of(lambda: native.soft_embed(raw, emb.type.ggml, (V, H), logits, 1.0, threads),
                                      repeats),
            "sampler": best_of(lambda: native.sample_step(logits, 0.8, uniforms, threads, out=scaled), repeats)}
