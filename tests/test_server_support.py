"""Shared pieces of the server tests (no tests here): a real server on a loopback port in a thread, the models,
a scripted generate, and a raw SSE reader."""
from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from dgguf.runtime.sampler import StepReport  # noqa: E402
from dgguf.server import create_app, listen, load_engine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "pr24423-tiny" / "tiny-Q4_K_M.gguf"
GEMMA4_TEMPLATE = ROOT / "tests" / "fixtures" / "chat" / "gemma4-style.jinja"


class LiveServer:
    """uvicorn serving create_app(engine) on 127.0.0.1:<free port>, in a thread of this process (so a test can
    replace engine.generate)."""

    def __init__(self, engine, api_key=None):
        self.engine = engine
        sock = listen("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(engine, api_key=api_key, loopback=True), log_level="warning",
                                lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def client(self, api_key="none", **kw):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def request(port, method, path, body=None, headers=None, raw: bytes | None = None, timeout=60):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"Content-Type": "application/json"} if body is not None or raw is not None else {}
    h.update(headers or {})
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=h)
    r = conn.getresponse()
    text = r.read().decode("utf-8", "replace")
    conn.close()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    return r.status, {k.lower(): v for k, v in r.getheaders()}, parsed


def sse_events(port, path, body, headers=None, timeout=120):
    """All (event, data) of a streaming request, in order; data parsed from JSON except [DONE]."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"Content-Type": "application/json", **(headers or {})}
    conn.request("POST", path, body=json.dumps(body).encode(), headers=h)
    r = conn.getresponse()
    assert r.status == 200, (r.status, r.read())
    assert r.getheader("content-type").startswith("text/event-stream")
    events, event, data = [], None, []
    for raw in r:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line == "":
            if data:
                text = "\n".join(data)
                events.append((event, text if text == "[DONE]" else json.loads(text)))
            event, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
    conn.close()
    return events


def scripted_generate(engine, text: str, prompts: list | None = None, step_delay: float = 0.0):
    """A generate() that 'generates' `text` (tokenized with the model's tokenizer, then the EOS): canvas by canvas,
    its pinned prefix growing over 4 steps per canvas, as the real one reports. Records each prompt."""
    m = engine.model
    C, pad, eos = m.config.canvas_length, m.config.pad_token_id, m.config.eos_token_ids[0]
    ids = m.tokenizer.encode(text, bos=False) + [eos]

    def generate(prompt_ids, max_new_tokens=256, seed=None, early_stop=True, on_step=None, on_canvas=None,
                 pin_prefix=False, on_report=None, **overrides):
        import numpy as np
        if prompts is not None:
            prompts.append(list(prompt_ids))
        n_canvases = -(-max_new_tokens // C)
        for c in range(n_canvases):
            canvas = np.array((ids[c * C:(c + 1) * C] + [pad] * C)[:C], dtype=np.int64)
            for step in range(1, 5):
                if on_step:
                    on_step(c, canvas)
                time.sleep(step_delay)
                pinned = C * step // 4 if pin_prefix else 0
                if on_report:
                    on_report(c, StepReport(step, np.ones(C, bool), canvas, np.ones(C, bool), pinned, canvas))
            if on_canvas:
                on_canvas(c, [int(i) for i in canvas[:max(0, max_new_tokens - c * C)]])
            if eos in canvas:
                break
    return generate


def convert_small(out_dir: Path) -> Path:
    out = out_dir / "small-Q8_0.gguf"
    subprocess.run([sys.executable, "-m", "dgguf.cli", "convert", str(ROOT / "models" / "small"), "-o", str(out),
                    "--type", "Q8_0", "--force"], check=True, capture_output=True)
    return out


def engine_for(path, **kw):
    return load_engine(path, threads=kw.pop("threads", 2), **kw)
