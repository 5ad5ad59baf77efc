"""One model, one generation at a time, in arrival order, behind a bounded queue.

The worker thread runs the model (its native calls release the GIL, so the event loop keeps serving) and turns
each step into events for the request's asyncio queue: deltas of final text (runtime/textstream.py), whole
canvases for viewers, and the end. Requests are cancelled (client gone) or timed out at the next step.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from dgguf.core.errors import DggufError

from dgguf.runtime.textstream import Delta, TextStream, open_tail_for

log = logging.getLogger("dgguf.server")


@dataclass
class Params:
    """A validated request (server/protocol.py builds it)."""
    kind: str                      # "completion" or "chat"
    prompt: list[int]
    max_tokens: int
    seed: int
    stream: bool = False
    stop: list[str] = field(default_factory=list)
    overrides: dict = field(default_factory=dict)   # sampler options, transformers' names
    early_stop: bool = True
    include_usage: bool = False
    canvas: bool = False           # SSE `event: canvas` (and queue/stats events) for viewers
    model: str = ""


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("queue full")
        self.retry_after = retry_after


class _Abort(Exception):
    """Raised from the step callbacks to end a generation: 'done' (the rest cannot change the answer),
    'cancelled' (the client went away), 'timeout'."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Final:
    """How a generation ended, for the response: the last delta and the totals."""
    delta: Delta
    text: str
    reply: object | None            # chat: runtime.chat.Reply
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    steps_per_canvas: list[int]
    seconds: float
    timed_out: bool = False


class Job:
    def __init__(self, params: Params, loop: asyncio.AbstractEventLoop, timeout: float | None):
        self.params, self.loop = params, loop
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.arrival = time.monotonic()
        self.deadline = self.arrival + timeout if timeout else None
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.state = "queued"      # queued → running → done

    def put(self, *event) -> None:
        """From any thread: an event for the request's handler."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:       # the loop is closed (server shutting down)
            pass


class Engine:
    """The model, its worker thread and the queue in front of it. `generate` is the model's generate (tests may
    replace it with a scripted one of the same signature)."""

    def __init__(self, model, queue_size: int = 16, timeout: float | None = None, pin: bool = True,
                 model_id: str | None = None):
        self.model, self.queue_size, self.timeout, self.pin = model, queue_size, timeout, pin
        self.model_id = model_id or os.path.basename(str(model.path))
        self.generate = model.generate
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._closing = False
        self._mean_seconds = 5.0   # a generation's duration, averaged (for Retry-After)
        self._pieces: dict[int, str] = {}
        self._tails: dict[bool, object] = {}
        self._thread = threading.Thread(target=self._work, name="dgguf-generate", daemon=True)
        self._thread.start()

    # --- the queue (event loop side) ---------------------------------------------------------------------------

    def submit(self, params: Params) -> Job:
        """Queue a request (QueueFull beyond the limit: waiting requests, besides the one running)."""
        job = Job(params, asyncio.get_running_loop(), self.timeout)
        with self._cond:
            if self._closing:
                raise QueueFull(self.retry_after())
            if len(self._waiting) >= self.queue_size and (self._running is not None or self._waiting):
                raise QueueFull(self.retry_after())
            self._waiting.append(job)
            position = len(self._waiting) - (self._running is None)
            self._cond.notify()
        if params.canvas and position > 0:
            job.put("queue", {"position": position})
        return job

    def retry_after(self) -> int:
        return max(1, math.ceil(self._mean_seconds))

    def cancel(self, job: Job) -> bool:
        """The client is gone or out of time: drop the job if it waits (True), else stop it at its next step."""
        job.cancelled.set()
        with self._cond:
            try:
                self._waiting.remove(job)
                job.state = "done"
                return True
            except ValueError:
                return False

    def status(self) -> dict:
        with self._cond:
            return {"waiting": len(self._waiting), "running": self._running is not None, "limit": self.queue_size}

    def close(self) -> None:
        with self._cond:
            self._closing = True
            jobs = list(self._waiting) + ([self._running] if self._running else [])
            self._waiting.clear()
            self._cond.notify_all()
        for job in jobs:
            job.cancelled.set()
            job.put("error", 503, "the server is shutting down", "server_error", "shutting_down")
        self._thread.join(timeout=30)

    # --- the worker --------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                job = self._waiting.popleft()
                self._running, job.state = job, "running"
                for pos, other in enumerate(self._waiting, 1):
                    if other.params.canvas:
                        other.put("queue", {"position": pos})
            t0 = time.monotonic()
            try:
                self._run(job)
            except Exception as e:   # a bug: the request gets a 500 body, the worker lives on
                log.exception("generation failed")
                job.put("error", 500, f"internal error: {type(e).__name__}: {e}", "server_error", None)
            finally:
                with self._cond:
                    self._running, job.state = None, "done"
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.monotonic() - t0)

    def _open_tail(self, special: bool):
        if special not in self._tails:
            self._tails[special] = open_tail_for(self.model.tokenizer, special)
        return self._tails[special]

    def piece(self, i: int) -> str:
        """One token's text (special tokens shown), for canvas viewers."""
        p = self._pieces.get(i)
        if p is None:
            p = self._pieces[i] = self.model.tokenizer.decode([i], special=True)
        return p

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        p = job.params
        if job.deadline is not None and time.monotonic() >= job.deadline:
            job.put("error", 503, "timed out waiting in the queue (--timeout)", "server_error", "timeout")
            return
        job.put("start")
        m = self.model
        cfg = m.config
        C, pad, eos = cfg.canvas_length, cfg.pad_token_id, set(cfg.eos_token_ids)
        chat = p.kind == "chat"
        tok = m.tokenizer
        text = TextStream((lambda ids: tok.decode(ids, special=True)) if chat else tok.decode, chat=chat,
                          stop=p.stop, open_tail=self._open_tail(chat))
        done: list[int] = []          # final ids of finished canvases
        ids: list[int] = []           # all final ids: done + the pinned prefix of the current canvas
        state = {"eos": False, "steps": [], "abort": None}
        t0 = time.monotonic()

        def final_ids(c: int, tokens) -> list[int]:
            """Canvas c's tokens as output ids: within max_tokens, through the first EOS, pads dropped."""
            out = []
            for t in tokens[:max(0, p.max_tokens - c * C)]:
                t = int(t)
                if t == pad:
                    continue
                out.append(t)
                if t in eos:
                    state["eos"] = True
                    break
            return out

        def advance(new_ids: list[int], positions: int) -> None:
            """new_ids are final, and so are the first `positions` positions of the output (pads included)."""
            if len(new_ids) > len(ids):
                ids[:] = new_ids
                d = text.update(ids)
                if d:
                    job.put("delta", d)
            if text.stopped or state["eos"] or positions >= p.max_tokens:
                raise _Abort("done")   # nothing after this can change the answer

        def on_step(c, canvas):
            if job.cancelled.is_set():
                raise _Abort("cancelled")
            if job.deadline is not None and time.monotonic() >= job.deadline:
                raise _Abort("timeout")

        def on_report(c, r):
            steps = state["steps"]
            if len(steps) <= c:
                steps.append(0)
            steps[c] = r.step
            if p.canvas:
                job.put("canvas", {
                    "canvas": c, "step": r.step, "offset": c * C, "pinned": int(r.pinned),
                    "accepted": "".join("1" if a else "0" for a in r.accept),
                    "stable": "".join("1" if a else "0" for a in r.stable),
                    "ids": [int(t) for t in r.tokens], "pieces": [self.piece(int(t)) for t in r.tokens]})
            if self.pin and r.pinned:
                advance(done + final_ids(c, r.tokens[:r.pinned]), c * C + int(r.pinned))

        def on_canvas(c, canvas_ids):
            done.extend(final_ids(c, canvas_ids))
            advance(list(done), (c + 1) * C)

        try:
            self.generate(p.prompt, max_new_tokens=p.max_tokens, seed=p.seed, early_stop=p.early_stop,
                          on_step=on_step, on_report=on_report, on_canvas=on_canvas, pin_prefix=self.pin,
                          **p.overrides)
        except _Abort as a:
            state["abort"] = a.reason
        except DggufError as e:   # e.g. a sampler option the checks let through
            job.put("error", 400, str(e), "invalid_request_error", None)
            return
        if state["abort"] == "cancelled":
            return
        last = text.finish(ids)
        n_tokens = len(ids)
        if text.stop_end is not None:   # the tokens that made the text up to the stop string's end
            lo, hi = 0, len(ids)
            while lo < hi:
                mid = (lo + hi) // 2
                if len(text.decode(ids[:mid]).rstrip("\ufffd")) >= text.stop_end:
                    hi = mid
                else:
                    lo = mid + 1
            n_tokens = lo
        if text.reply is not None and text.reply.tool_calls:
            reason = "tool_calls"
        elif text.stopped or state["eos"]:
            reason = "stop"
        else:
            reason = "length"
        job.put("done", Final(delta=last, text=text.text, reply=text.reply, finish_reason=reason,
                              prompt_tokens=len(p.prompt), completion_tokens=n_tokens,
                              steps_per_canvas=list(state["steps"]), seconds=time.monotonic() - t0,
                              timed_out=state["abort"] == "timeout"))
