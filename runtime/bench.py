"""What the benchmarks share: best-of-N timing, the multiply-adds of a decoder step, and a check for foreign
CPU load before timing (the machines are shared, and a busy core halves a 2-thread figure)."""
from __future__ import annotations

import os
import time


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
    None where /proc/stat is missing."""
    try:
        hz = os.sysconf("SC_CLK_TCK")
        busy0, _ = _busy_and_total_ticks()
        own0, wall0 = sum(os.times()[:2]), time.perf_counter()
        time.sleep(seconds)
        busy1, _ = _busy_and_total_ticks()
        own1, wall1 = sum(os.times()[:2]), time.perf_counter()
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, ((busy1 - busy0) / hz - (own1 - own0)) / (wall1 - wall0))


def load_note(seconds: float = 0.5) -> str:
    """One line on the foreign load measured now, flagged when the figures that follow will be low."""
    load = foreign_load(seconds)
    if load is None:
        return "foreign load unknown (no /proc/stat)"
    return f"foreign load {load:.2f} cores" + ("  (another process is busy: figures are low)" if load > 0.2 else "")


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


def step_macs(c, canvas: int, context: int) -> float:
    """Multiply-adds of one decoder step over a canvas after `context` cached tokens (matmuls and attention)."""
    H, F, I, nh = c.hidden_size, c.dense_ff, c.expert_ff, c.n_heads
    per_token = 2 * H * F + F * H                      # self-conditioning MLP
    per_token += 2 * c.vocab_size * H                  # soft embedding + tied head
    attention = 0.0
    for i in range(c.n_layers):
        d, kv = c.head_dims[i], c.kv_heads[i]
        per_token += H * nh * d + H * kv * d * (2 if c.sliding[i] else 1) + nh * d * H   # q, k, (v), o
        per_token += 3 * H * F + H * c.n_experts + c.top_k * 3 * H * I                  # dense, router, experts
        keys = canvas + (min(context, c.sliding_window - 1) if c.sliding[i] else context)
        attention += 2 * canvas * nh * keys * d                                        # scores and values
    return per_token * canvas + attention
