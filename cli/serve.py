"""`dgguf serve`: an OpenAI-compatible HTTP server (completions, chat, SSE streaming of committed text and of the
canvas) with a page at / that shows the denoising. One model, one generation at a time, a bounded queue."""
from __future__ import annotations

import argparse
import os
import sys

from dgguf.core.errors import DggufError
from dgguf.core.native import MAX_THREADS, default_threads

from .args import integer, number, positive, read_text


def serve(a) -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise DggufError("dgguf serve needs its extra: pip install 'dgguf[serve]' (starlette, uvicorn)") from None
    from dgguf.server import listen, load_engine, serve as run_server
    template = None
    if a.chat_template_file is not None:
        template = read_text(a.chat_template_file, "--chat-template-file")
    api_key = a.api_key if a.api_key is not None else os.environ.get("DGGUF_API_KEY") or None
    sock = listen(a.host, a.port)   # before loading: a port in use fails at once
    try:
        engine = load_engine(a.model, threads=a.threads, ctx=a.ctx, queue=a.queue, timeout=a.timeout or None,
                             chat_template=template, alias=a.alias, pin=not a.no_pin)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host

    def ready():
        print(f"dgguf serve: http://{shown}:{port}/ (model {engine.model_id}, ctx {engine.model.ctx}, "
              f"{engine.model.native.threads} threads, queue {a.queue}"
              + (f", timeout {a.timeout:g} s" if a.timeout else "") + (", API key required" if api_key else "")
              + "); Ctrl-C stops", file=sys.stderr, flush=True)

    try:
        run_server(engine, sock, api_key=api_key, log_level=a.log_level, on_ready=ready)
    except KeyboardInterrupt:   # uvicorn stops gracefully on Ctrl-C, then raises it again: a normal end here
        pass
    print("dgguf serve: stopped", file=sys.stderr)


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server, with a page that shows the denoising",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("-m", "--model", required=True, help="the GGUF (dgguf's or a published one)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=integer("--port", 0, 65535), default=8080, help="TCP port (0: any free one)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health and the page's files; "
                        "when not given, $DGGUF_API_KEY if set")
    s.add_argument("-t", "--threads", type=positive("--threads", MAX_THREADS), default=default_threads(),
                   help="CPU threads")
    s.add_argument("-c", "--ctx-size", "--ctx", dest="ctx", type=positive("--ctx"), default=None,
                   help="context limit in tokens, prompt plus output (8192 when not given, capped by the model)")
    s.add_argument("--queue", type=integer("--queue", 0, 100000), default=16,
                   help="requests that may wait while one generates; beyond: 429 with Retry-After")
    s.add_argument("--timeout", type=number("--timeout", zero=True), default=0,
                   help="seconds a request may take, queue included (0: no limit); generation then ends at the "
                        "next step with what is final (finish_reason length, dgguf.timed_out)")
    s.add_argument("--chat-template-file", default=None,
                   help="a Jinja chat template to use instead of the file's (or for a file without one)")
    s.add_argument("-a", "--alias", default=None, help="the model id the API reports (default: the file name)")
    s.add_argument("--no-pin", action="store_true",
                   help="stream text only as whole canvases commit: outputs then equal dgguf run's token for "
                        "token (by default a canvas's stable prefix is made final and streamed early)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info logs each request)")
    s.set_defaults(func=serve)
