"""Decoder steps on a busy machine: 1 thread against 2, with and without other processes holding cores.

    python scripts/bench_busy.py -m FILE [--busy 1] [--repeats 7] [--baseline DIR]

A thread pool that waits for a descheduled worker turns a 2-thread step into a wait for the scheduler; this
prints the median decoder step for 1 and 2 threads with no foreign load and with --busy processes spinning on
the CPU (pure Python loops), each case in its own child process. --baseline DIR times another build (installed
with `pip install --target DIR <checkout>`) in the same run, case by case, so the load hits both alike.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

CHILD = r"""
import json, statistics, sys, time
import numpy as np
if sys.argv[1]:
    sys.path.insert(0, sys.argv[1])
from dgguf.runtime import Model
m = Model.load(sys.argv[2], threads=int(sys.argv[3]))
c = m.config
cache = m.native.new_cache(23 + c.canvas_length)
cache.encode(np.arange(3, 26, dtype=np.int32) % c.vocab_size)
canvas = np.arange(c.canvas_length, dtype=np.int32) % c.vocab_size
sc = np.random.default_rng(0).standard_normal((c.canvas_length, c.vocab_size)).astype(np.float32)
out = np.empty_like(sc)
cache.decode(canvas, sc, out=out)
times = []
for _ in range(int(sys.argv[4])):
    t = time.perf_counter()
    cache.decode(canvas, sc, out=out)
    times.append(time.perf_counter() - t)
print(json.dumps(statistics.median(times)))
"""


def spin() -> None:
    while True:
        pass


def step(build: str, model: str, threads: int, repeats: int) -> float:
    r = subprocess.run([sys.executable, "-c", CHILD, build, model, str(threads), str(repeats)], capture_output=True,
                       text=True, check=True)
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--busy", type=int, default=1, help="spinning processes in the loaded cases")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--baseline", default=None, help="another build's install directory, timed in turn")
    a = ap.parse_args()
    builds = {"this build": ""} | ({"baseline": a.baseline} if a.baseline else {})
    print(f"{a.model}: median decoder step of {a.repeats}; {os.cpu_count()} CPUs; load average before: "
          f"{os.getloadavg()[0]:.2f}")
    for busy in (0, a.busy):
        spinners = [mp.Process(target=spin, daemon=True) for _ in range(busy)]
        for p in spinners:
            p.start()
        time.sleep(0.5)
        try:
            for name, build in builds.items():
                t1, t2 = step(build, a.model, 1, a.repeats), step(build, a.model, 2, a.repeats)
                print(f"{busy} busy process(es), {name:>10}: 1 thread {t1:.4f} s, 2 threads {t2:.4f} s "
                      f"(2 threads / 1 thread: {t2 / t1:.2f})")
        finally:
            for p in spinners:
                p.terminate()


if __name__ == "__main__":
    main()
