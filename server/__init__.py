"""`dgguf serve`: an OpenAI-compatible HTTP server for one DiffusionGemma GGUF, with live canvas streaming and a
page at / that shows the denoising. Needs the `serve` extra (starlette, uvicorn).

    from dgguf.server import load_engine, create_app
    engine = load_engine("model.gguf", threads=2)
    app = create_app(engine)            # an ASGI app: uvicorn.run(app, ...)
"""
from __future__ import annotations

import socket

from dgguf.core.errors import DggufError

from .app import create_app
from .engine import Engine

__all__ = ["Engine", "create_app", "load_engine", "listen", "serve"]


def load_engine(path, threads: int | None = None, ctx: int | None = None, queue: int = 16,
                timeout: float | None = None, chat_template: str | None = None, alias: str | None = None,
                pin: bool = True) -> Engine:
    """The model loaded behind its queue. chat_template replaces the file's (or gives one to a file without)."""
    from dgguf.runtime.model import Model
    m = Model.load(path, threads=threads, ctx=ctx)
    if chat_template is not None:
        if not m.has_tokenizer:
            m.close()
            raise DggufError(f"{path}: no tokenizer, so a chat template cannot be used")
        m.tokenizer.template = chat_template
    return Engine(m, queue_size=queue, timeout=timeout, pin=pin, model_id=alias)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), or a one-line error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise DggufError(f"cannot resolve --host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise DggufError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(engine: Engine, sock: socket.socket, api_key: str | None = None, log_level: str = "info",
          on_ready=None) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers: a graceful stop), then stop the engine."""
    import uvicorn
    host = sock.getsockname()[0]
    app = create_app(engine, api_key=api_key, loopback=is_loopback(host))
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3, lifespan="off",
                            timeout_keep_alive=30)
    server = uvicorn.Server(config)
    if on_ready is not None:
        orig = server.startup

        async def startup(sockets=None):
            await orig(sockets=sockets)
            on_ready()
        server.startup = startup
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
