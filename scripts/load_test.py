#!/usr/bin/env python3
"""Load test for `dgguf serve`: concurrent streaming clients for a while, every stream checked.

    python scripts/load_test.py -m small-Q8_0.gguf                 # 32 clients, 3 minutes, its own server
    python scripts/load_test.py --url http://127.0.0.1:8080 --pid 1234 --clients 8 --duration 30

Each client loops: a streaming completion (a prompt and a seed drawn from small sets, so the same request comes
back many times), and on 429 it waits Retry-After and tries again. Every stream is checked: only `data:` events,
valid JSON, one id and object, text chunks, exactly one finish_reason, the usage chunk last, then [DONE]; usage
within max_tokens; the same (prompt, seed) always gives the same text. Reported: requests, 429s, errors, time to
the first committed token (p50/p99; from the request that was admitted, queue wait included), and the server's
RSS after the warm-up and after the run. Exit status 1 when anything failed (--max-rss-growth: 10% by default).
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

PROMPTS = ["def ", "import os\n", "class Parser:\n    def ", "for i in range(", "    return ", "if __name__ == ",
           "# Copyright", "def __init__(self, "]


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = 0
        self.rejected = 0
        self.errors: list[str] = []
        self.malformed: list[str] = []
        self.mismatch: list[str] = []
        self.ttft: list[tuple[float, float]] = []     # (finish time, seconds to the first committed text)
        self.latency: list[tuple[float, float]] = []
        self.tokens = 0
        self.texts: dict[tuple, str] = {}

    def add(self, name: str, value) -> None:
        with self.lock:
            getattr(self, name).append(value)


def check_stream(resp, max_tokens: int, t0: float):
    """(text, completion tokens, seconds to the first text) of an SSE response, or raise ValueError."""
    blocks, cur = [], []
    first = None
    text = []
    for raw in resp:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line == "":
            if cur:
                blocks.append(cur)
                data = [x for x in cur if x.startswith("data:")]
                if data and data[0] != "data: [DONE]":
                    try:
                        chunk = json.loads(data[0][5:])
                    except ValueError:
                        raise ValueError(f"not JSON: {data[0][:80]!r}") from None
                    if chunk.get("choices") and chunk["choices"][0].get("text") and first is None:
                        first = time.monotonic() - t0
            cur = []
        elif not line.startswith(":"):
            cur.append(line)
    if cur:
        raise ValueError("the stream ends inside an event")
    if not blocks or blocks[-1] != ["data: [DONE]"]:
        raise ValueError("the stream does not end with data: [DONE]")
    chunks = []
    for b in blocks[:-1]:
        if len(b) != 1 or not b[0].startswith("data: "):
            raise ValueError(f"unexpected event lines {b!r}")
        c = json.loads(b[0][6:])
        if "error" in c:
            raise ValueError(f"error event: {c['error']}")
        chunks.append(c)
    if len({c["id"] for c in chunks}) != 1 or {c["object"] for c in chunks} != {"text_completion"}:
        raise ValueError("ids or objects differ across chunks")
    usage = chunks[-1]
    if usage["choices"] != [] or not usage.get("usage"):
        raise ValueError("the last chunk is not the usage chunk")
    finishes = []
    for c in chunks[:-1]:
        if len(c["choices"]) != 1 or c["choices"][0]["index"] != 0 or not isinstance(c["choices"][0]["text"], str):
            raise ValueError(f"bad choice {c['choices']!r}")
        if c.get("usage") is not None:
            raise ValueError("usage before the last chunk")
        text.append(c["choices"][0]["text"])
        if c["choices"][0]["finish_reason"] is not None:
            finishes.append(c["choices"][0]["finish_reason"])
    if len(finishes) != 1 or chunks[-2]["choices"][0]["finish_reason"] not in ("stop", "length"):
        raise ValueError(f"finish reasons {finishes}")
    n = usage["usage"]["completion_tokens"]
    if not 0 <= n <= max_tokens or usage["usage"]["total_tokens"] != n + usage["usage"]["prompt_tokens"]:
        raise ValueError(f"usage {usage['usage']}")
    return "".join(text), n, first


def client(k: int, host: str, port: int, args, end: float, stats: Stats, headers: dict) -> None:
    rng = random.Random(k)
    while time.monotonic() < end:
        prompt = rng.choice(PROMPTS)
        seed = rng.randrange(args.seeds)
        body = {"prompt": prompt, "max_tokens": args.max_tokens, "seed": seed, "stream": True,
                "stream_options": {"include_usage": True}}
        if args.steps:
            body["max_denoising_steps"] = args.steps
        t0 = time.monotonic()
        try:
            conn = http.client.HTTPConnection(host, port, timeout=args.request_timeout)
            conn.request("POST", "/v1/completions", body=json.dumps(body), headers=headers)
            resp = conn.getresponse()
            if resp.status == 429:
                if not (resp.getheader("Retry-After") or "").isdigit():
                    stats.add("errors", f"429 without a Retry-After in seconds: {resp.getheader('Retry-After')!r}")
                wait = float(resp.getheader("Retry-After") or 1)
                resp.read()
                conn.close()
                with stats.lock:
                    stats.rejected += 1
                time.sleep(max(0.0, min(wait * rng.uniform(0.5, 1.5), end - time.monotonic())))
                continue
            if resp.status != 200:
                stats.add("errors", f"HTTP {resp.status}: {resp.read()[:200]!r}")
                conn.close()
                continue
            try:
                text, n, first = check_stream(resp, args.max_tokens, t0)
            except ValueError as e:
                stats.add("malformed", str(e))
                conn.close()
                continue
            conn.close()
        except (OSError, http.client.HTTPException) as e:
            stats.add("errors", f"{type(e).__name__}: {e}")
            time.sleep(0.5)
            continue
        done = time.monotonic()
        with stats.lock:
            stats.ok += 1
            stats.tokens += n
            stats.latency.append((done, done - t0))
            if first is not None:
                stats.ttft.append((done, first))
            key = (prompt, seed)
            if stats.texts.setdefault(key, text) != text:
                stats.mismatch.append(f"{key}: {stats.texts[key]!r} then {text!r}")


def start_server(args) -> tuple[subprocess.Popen, str, list[str]]:
    cmd = [sys.executable, "-m", "dgguf.cli", "serve", "-m", args.model, "--port", "0", "--queue", str(args.queue),
           "--log-level", "warning"] + (["-t", str(args.threads)] if args.threads else []) + args.server_arg
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    m = re.search(r"(http://\S+?)/ ", line)
    if not m:
        p.kill()
        sys.exit(f"the server did not start: {line}{p.stderr.read()}")
    log: list[str] = []

    def drain():
        for ln in p.stderr:
            log.append(ln.rstrip("\n"))
    threading.Thread(target=drain, daemon=True).start()
    return p, m.group(1), log


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("-m", "--model", help="start `dgguf serve -m MODEL` on a free port and test it")
    src.add_argument("--url", help="test a running server (its RSS only with --pid)")
    ap.add_argument("--pid", type=int, help="the running server's process id (RSS)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds before the first RSS reading")
    ap.add_argument("--queue", type=int, default=16, help="the server's --queue (with -m)")
    ap.add_argument("--threads", type=int, default=None, help="the server's --threads (with -m)")
    ap.add_argument("--server-arg", action="append", default=[], help="another argument for dgguf serve")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=4, help="seeds drawn per prompt")
    ap.add_argument("--steps", type=int, default=None, help="max_denoising_steps sent (default: the file's)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--request-timeout", type=float, default=900.0)
    ap.add_argument("--max-rss-growth", type=float, default=10.0, help="percent, after the run against warm-up")
    ap.add_argument("--server-log", default=None, help="write the server's stderr to this file (with -m)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)

    proc, log = None, []
    if args.model:
        proc, url, log = start_server(args)
        pid = proc.pid
    else:
        url, pid = args.url.rstrip("/"), args.pid
    u = urlsplit(url)
    host, port = u.hostname, u.port or 80
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    stats = Stats()
    t_start = time.monotonic()
    end = t_start + args.duration
    threads = [threading.Thread(target=client, args=(k, host, port, args, end, stats, headers), daemon=True)
               for k in range(args.clients)]
    for t in threads:
        t.start()
    rss_warm, rss_max, samples = None, 0.0, []
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        now = time.monotonic() - t_start
        r = rss_mib(pid) if pid else None
        if r is not None:
            rss_max = max(rss_max, r)
            samples.append((round(now, 1), round(r, 1)))
            if rss_warm is None and now >= args.warmup:
                rss_warm = r
    wall = time.monotonic() - t_start
    rss_end = rss_mib(pid) if pid else None
    if rss_warm is None:
        rss_warm = samples[-1][1] if samples else None
    warm_at = t_start + args.warmup
    ttft = [s for t, s in stats.ttft if t >= warm_at] or [s for _, s in stats.ttft]
    lat = [s for t, s in stats.latency if t >= warm_at] or [s for _, s in stats.latency]
    server_errors = [ln for ln in log if "Traceback" in ln or "ERROR" in ln]
    if args.server_log and proc is not None:
        with open(args.server_log, "w") as f:
            f.write("\n".join(log) + "\n")
    growth = None if not (rss_warm and rss_end) else 100.0 * (rss_end - rss_warm) / rss_warm
    summary = {
        "url": url, "clients": args.clients, "duration_s": args.duration, "wall_s": round(wall, 1),
        "max_tokens": args.max_tokens, "requests_ok": stats.ok, "rejected_429": stats.rejected,
        "errors": len(stats.errors), "malformed_streams": len(stats.malformed), "nondeterministic": len(stats.mismatch),
        "server_errors_logged": len(server_errors), "tokens": stats.tokens,
        "tokens_per_s": round(stats.tokens / wall, 1) if wall else None,
        "ttft_s": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99), "max": max(ttft) if ttft else None,
                   "n": len(ttft)},
        "latency_s": {"p50": percentile(lat, 50), "p99": percentile(lat, 99)},
        "rss_mib": {"after_warmup": rss_warm, "after_run": rss_end, "max": rss_max or None,
                    "growth_pct": None if growth is None else round(growth, 2)},
        "examples": {"errors": stats.errors[:5], "malformed": stats.malformed[:5], "mismatch": stats.mismatch[:3],
                     "server": server_errors[:5]},
    }
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    failed = (stats.errors or stats.malformed or stats.mismatch or server_errors or stats.ok == 0
              or (growth is not None and growth > args.max_rss_growth))
    summary["passed"] = not failed
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        t, r = summary["ttft_s"], summary["rss_mib"]
        fmt = lambda x: "-" if x is None else f"{x:.2f}"
        print(f"{args.clients} clients, {wall:.0f} s: {stats.ok} streams ok, {stats.rejected} x 429, "
              f"{len(stats.errors)} errors, {len(stats.malformed)} malformed, {len(stats.mismatch)} nondeterministic, "
              f"{len(server_errors)} server errors; {stats.tokens} tokens ({summary['tokens_per_s']} tok/s)")
        print(f"time to first committed token: p50 {fmt(t['p50'])} s, p99 {fmt(t['p99'])} s, max {fmt(t['max'])} s "
              f"(n={t['n']}); request latency p50 {fmt(summary['latency_s']['p50'])} s, "
              f"p99 {fmt(summary['latency_s']['p99'])} s")
        print(f"server RSS: {fmt(r['after_warmup'])} MiB after warm-up, {fmt(r['after_run'])} MiB after the run "
              f"({fmt(r['growth_pct'])}%), max {fmt(r['max'])} MiB")
        for name, xs in summary["examples"].items():
            for x in xs:
                print(f"  {name}: {x}")
        print("PASSED" if not failed else "FAILED")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
