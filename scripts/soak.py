"""Soak: many load/close cycles and many generations in one process, with resident memory, open descriptors and
memory mappings sampled throughout; a verdict on whether they stay flat.

    dgguf convert models/small -o /tmp/small-Q8_0.gguf --type Q8_0 --force
    python scripts/soak.py /tmp/small-Q8_0.gguf [--cycles 200] [--generations 1000] [--json OUT]

Phase 1, `cycles` times: Model.load, build the tokenizer, one canvas forward, close. Phase 2: one model,
`generations` generations of one canvas from prompts and seeds that vary (so the tokenizer, sampler, KV cache
and native buffers are exercised with different lengths each time).

Flat means, after a warm-up (the first 10% of each phase, at least 2 iterations, where allocator pools and
caches settle): open descriptors never above the warm-up's level; at most 4 more memory mappings at the end
than at the warm-up's end; resident memory at the end at most FLAT_MIB (8 MiB) above the warm-up's end, and its
least-squares slope over the samples after the warm-up below SLOPE_KIB (8 KiB) per iteration, so a steady leak
fails even when the phase is short. Exit status 0 when both phases are flat, 1 otherwise.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

FLAT_MIB = 8.0
SLOPE_KIB = 8.0
MAX_NEW_MAPS = 4
PROMPTS = ["def ", "import os\n", "class Parser:\n    def __init__(self", "# Copyright", "    return ",
           "for i in range(", "if __name__ == '__main__':\n", "x = [", "try:\n    ", "@property\ndef "]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@dataclass
class Phase:
    name: str
    iterations: int
    samples: list[tuple[int, int, int, int]] = field(default_factory=list)   # (iteration, rss, fds, maps)
    seconds: float = 0.0
    verdict: dict = field(default_factory=dict)

    def sample(self, i: int) -> None:
        gc.collect()
        self.samples.append((i, rss_bytes(), open_fds(), mappings()))

    def judge(self, flat_mib: float = FLAT_MIB, slope_kib: float = SLOPE_KIB) -> dict:
        warm = max(2, self.iterations // 10)
        base = next(s for s in self.samples if s[0] >= warm)
        after = [s for s in self.samples if s[0] >= warm]
        end = self.samples[-1]
        growth_mib = (end[1] - base[1]) / 2**20
        slope = _slope([s[0] for s in after], [s[1] for s in after]) / 1024   # KiB per iteration
        max_fds = max(s[2] for s in after)
        checks = {
            "rss_growth_mib": round(growth_mib, 2), "rss_slope_kib_per_iteration": round(slope, 3),
            "fds_after_warmup": base[2], "fds_max": max_fds, "fds_end": end[2],
            "maps_after_warmup": base[3], "maps_end": end[3],
        }
        reasons = []
        if growth_mib > flat_mib:
            reasons.append(f"resident memory grew {growth_mib:.1f} MiB after the warm-up (limit {flat_mib})")
        if slope > slope_kib:
            reasons.append(f"resident memory grows {slope:.1f} KiB per iteration (limit {slope_kib})")
        if max_fds > base[2]:
            reasons.append(f"open descriptors rose from {base[2]} to {max_fds}")
        if end[3] - base[3] > MAX_NEW_MAPS:
            reasons.append(f"memory mappings rose from {base[3]} to {end[3]}")
        self.verdict = dict(checks, flat=not reasons, reasons=reasons)
        return self.verdict


def _slope(x: list[int], y: list[int]) -> float:
    n = len(x)
    if n < 2:
        return 0.0
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx if sxx else 0.0


def _every(n: int) -> int:
    return max(1, n // 50)     # about 50 samples per phase


def load_cycles(path: Path, cycles: int, threads: int, load=None) -> Phase:
    from dgguf.runtime.model import Model
    load = load or Model.load
    ph = Phase("load/close", cycles)
    ph.sample(0)
    t = time.perf_counter()
    for i in range(1, cycles + 1):
        m = load(path, threads=threads)
        ids = m.tokenizer.encode(PROMPTS[i % len(PROMPTS)]) if m.has_tokenizer else [0, 1]
        m.canvas_logits(ids, [(i + k) % m.config.vocab_size for k in range(min(8, m.config.canvas_length))])
        m.close()
        del m
        if i % _every(cycles) == 0 or i == cycles:
            ph.sample(i)
    ph.seconds = time.perf_counter() - t
    return ph


def generations(path: Path, n: int, threads: int, max_new_tokens: int | None = None) -> Phase:
    from dgguf.runtime.model import Model
    ph = Phase("generations", n)
    m = Model.load(path, threads=threads)
    try:
        new = max_new_tokens or m.config.canvas_length
        ph.sample(0)
        t = time.perf_counter()
        for i in range(1, n + 1):
            prompt = PROMPTS[i % len(PROMPTS)] * (1 + i % 3)
            ids = m.tokenizer.encode(prompt) if m.has_tokenizer else [0, 1 + i % 7]
            res = m.generate(ids, max_new_tokens=new, seed=i)
            if m.has_tokenizer:
                m.tokenizer.decode(res.ids)
            if i % _every(n) == 0 or i == n:
                ph.sample(i)
        ph.seconds = time.perf_counter() - t
    finally:
        m.close()
    return ph


def report(phases: list[Phase], out=None) -> None:
    out = out or sys.stdout
    for ph in phases:
        print(f"{ph.name}: {ph.iterations} iterations in {ph.seconds:.1f} s "
              f"({ph.iterations / ph.seconds if ph.seconds else 0:.1f}/s)", file=out)
        print(f"  {'iteration':>9} {'RSS MiB':>9} {'fds':>5} {'maps':>6}", file=out)
        step = max(1, len(ph.samples) // 10)
        shown = ph.samples[::step] + ([ph.samples[-1]] if (len(ph.samples) - 1) % step else [])
        for i, rss, fds, maps in shown:
            print(f"  {i:>9} {rss / 2**20:>9.1f} {fds:>5} {maps:>6}", file=out)
        v = ph.verdict
        print(f"  after warm-up: RSS {v['rss_growth_mib']:+.2f} MiB, slope {v['rss_slope_kib_per_iteration']:+.3f} "
              f"KiB/iteration; fds {v['fds_after_warmup']} -> max {v['fds_max']}; maps {v['maps_after_warmup']} "
              f"-> {v['maps_end']}: {'FLAT' if v['flat'] else 'NOT FLAT: ' + '; '.join(v['reasons'])}", file=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="a GGUF (e.g. models/small converted to Q8_0)")
    p.add_argument("--cycles", type=int, default=200, help="load/close cycles (default 200)")
    p.add_argument("--generations", type=int, default=1000, help="generations (default 1000)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="per generation (default: one canvas)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="write samples and verdicts here")
    a = p.parse_args(argv)
    phases = []
    if a.cycles:
        phases.append(load_cycles(a.model, a.cycles, a.threads))
    if a.generations:
        phases.append(generations(a.model, a.generations, a.threads, a.max_new_tokens))
    for ph in phases:
        ph.judge()
    report(phases)
    if a.json:
        a.json.write_text(json.dumps([asdict(ph) for ph in phases], indent=1))
    flat = all(ph.verdict["flat"] for ph in phases)
    print("soak: " + ("PASS (flat)" if flat else "FAIL (not flat)"))
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
