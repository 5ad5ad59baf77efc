"""OpenAI's request and response shapes: validation into engine.Params (errors are ApiError: a status and an
OpenAI-style body), and the bodies of responses and stream chunks."""
from __future__ import annotations

import json
import math
import os
import uuid
from numbers import Real

from dgguf.cli.run import NEAR_GREEDY   # --temp's mapping: temperature 0 means this
from dgguf.core.errors import DggufError

from .engine import Final, Params
from dgguf.runtime.textstream import Delta

SAMPLER_OPTIONS = ("max_denoising_steps", "t_min", "t_max", "entropy_bound", "stability_threshold",
                   "confidence_threshold")
MAX_STEPS = 4096
MAX_STOPS = 16
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"the body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise bad("the body is not valid JSON: nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    return body


# --- field checks ------------------------------------------------------------------------------------------------

def _kind(v) -> str:
    return {bool: "a boolean", str: "a string", list: "an array", dict: "an object", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _int(body: dict, name: str, lo: int, hi: int, default=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{name}' must be an integer, got {_kind(v)}", name)
    if not lo <= v <= hi:
        raise bad(f"'{name}' must be in {lo}..{hi}, got {v}", name)
    return v


def _number(body: dict, name: str, lo: float, hi: float, default=None, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
        raise bad(f"'{name}' must be a number, got {_kind(v)}", name)
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean, got {_kind(v)}", name)
    return v


def _str(body: dict, name: str):
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise bad(f"'{name}' must be a string, got {_kind(v)}", name)
    return v


def _unsupported(body: dict, name: str, ok, what: str) -> None:
    v = body.get(name)
    if v is not None and not ok(v):
        raise bad(f"'{name}': {what}", name)


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("'stop' must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"'stop' takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise bad("'stop' strings must not be empty", "stop")
    return stops


def _common(body: dict, model) -> dict:
    """The fields both endpoints share → engine.Params keyword arguments (all but prompt and max_tokens)."""
    _str(body, "model")
    _str(body, "user")
    n = _int(body, "n", 1, 128, 1)
    if n != 1:
        raise bad(f"'n' must be 1 (one generation per request), got {n}", "n")
    stream = _bool(body, "stream")
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not isinstance(so, dict):
            raise bad(f"'stream_options' must be an object, got {_kind(so)}", "stream_options")
        include_usage = _bool(so, "include_usage")
    for name in ("presence_penalty", "frequency_penalty"):   # accepted; this sampler has no penalties
        _number(body, name, -2.0, 2.0)
    _number(body, "top_p", 0.0, 1.0)                        # accepted; the entropy bound decides what is kept
    _unsupported(body, "logit_bias", lambda v: isinstance(v, dict) and not v, "token biases are not supported")
    seed = _int(body, "seed", -(2**63), 2**64 - 1)
    if seed is not None and seed < 0 and seed != -1:
        raise bad(f"'seed' must be in 0..2^64-1 (or -1: random), got {seed}", "seed")
    if seed is None or seed == -1:
        seed = int.from_bytes(os.urandom(8), "little")

    overrides = {}
    for name in SAMPLER_OPTIONS:
        v = body.get(name)
        if v is None:
            continue
        if name in ("max_denoising_steps", "stability_threshold"):
            overrides[name] = _int(body, name, 1, MAX_STEPS)
        else:
            overrides[name] = _number(body, name, 0.0, 1e6)
    temp = _number(body, "temperature", 0.0, 2.0)
    if temp is not None:   # dgguf run --temp: the schedule's first-step temperature, t_min scaled with it
        sc = model.sampler_config()
        t_max = temp if temp > 0 else NEAR_GREEDY
        overrides.setdefault("t_max", t_max)
        overrides.setdefault("t_min", t_max * sc.t_min / sc.t_max)
    try:
        model.sampler_config(**overrides)
    except DggufError as e:
        raise bad(str(e).replace("sampler option ", "")) from None
    return dict(seed=seed, stream=stream, stop=_stop(body), overrides=overrides,
                early_stop=_bool(body, "early_stop", True), include_usage=include_usage and stream,
                canvas=_bool(body, "canvas") and stream)


def _check_ids(ids: list, vocab: int, param: str) -> list[int]:
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab:
            raise bad(f"'{param}' token ids must be integers in 0..{vocab - 1}, got {i!r}", param)
    if not ids:
        raise bad(f"'{param}' is empty", param)
    return ids


def _max_tokens(body: dict, model, prompt: list[int], default: int | None, names=("max_tokens",)) -> int:
    C, ctx = model.config.canvas_length, model.ctx
    room = (ctx - len(prompt)) // C * C    # whole canvases after the prompt
    given = [(n, body.get(n)) for n in names if body.get(n) is not None]
    if len(given) > 1 and given[0][1] != given[1][1]:
        raise bad(f"'{given[0][0]}' and '{given[1][0]}' disagree", given[1][0])
    value = _int(body, given[0][0], 1, 2**31) if given else None
    if room < 1:
        raise bad(f"the prompt ({len(prompt)} tokens) leaves no room for a canvas of {C} tokens in the context "
                  f"of {ctx} tokens (--ctx)", "messages" if "messages" in body else "prompt",
                  "context_length_exceeded")
    if value is None:
        return room if default is None else min(default, room)
    need = math.ceil(value / C) * C
    if len(prompt) + need > ctx:
        raise bad(f"the prompt ({len(prompt)} tokens) plus max_tokens {value} (generated as {need // C} canvas(es) "
                  f"of {C}) exceeds the context of {ctx} tokens (--ctx); at most {room} fit",
                  given[0][0], "context_length_exceeded")
    return value


def _need_tokenizer(model) -> None:
    if not model.has_tokenizer:
        raise bad(f"{os.path.basename(str(model.path))} has no tokenizer: it cannot read or write text")


# --- the two requests ----------------------------------------------------------------------------------------------

def completion_params(body: dict, model, model_id: str) -> Params:
    _need_tokenizer(model)
    _unsupported(body, "echo", lambda v: v is False, "echo is not supported")
    _unsupported(body, "logprobs", lambda v: v is False or v == 0, "logprobs are not supported")
    _unsupported(body, "best_of", lambda v: v == 1, "best_of must be 1")
    _unsupported(body, "suffix", lambda v: v == "", "suffix (insertion) is not supported")
    common = _common(body, model)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                   # a batch of one
    if isinstance(prompt, str):
        ids = model.tokenizer.encode(prompt)
    elif isinstance(prompt, list):
        if prompt and all(isinstance(p, (str, list)) for p in prompt):
            raise bad("'prompt' holds several prompts; send one per request (n = 1)", "prompt")
        ids = _check_ids(prompt, model.config.vocab_size, "prompt")
    elif prompt is None:
        raise bad("'prompt' is required", "prompt")
    else:
        raise bad(f"'prompt' must be a string or an array of token ids, got {_kind(prompt)}", "prompt")
    return Params(kind="completion", prompt=ids, max_tokens=_max_tokens(body, model, ids, 16), model=model_id,
                  **common)


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty array", "messages")
    out = []
    for k, m in enumerate(msgs):
        where = f"messages[{k}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object, got {_kind(m)}", where)
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        m = dict(m)
        if role == "developer":
            m["role"] = "system"
        content = m.get("content")
        if isinstance(content, list):   # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"'{where}.content': only text parts are supported (this model reads text)",
                              f"{where}.content")
                texts.append(part["text"])
            m["content"] = "".join(texts)
        elif content is not None and not isinstance(content, str):
            raise bad(f"'{where}.content' must be a string, an array of text parts or null, got {_kind(content)}",
                      f"{where}.content")
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise bad(f"'{where}.tool_calls' must be an array", f"{where}.tool_calls")
            fixed = []
            for c in calls:
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise bad(f"'{where}.tool_calls' entries need function.name", f"{where}.tool_calls")
                args = fn.get("arguments")
                if isinstance(args, str):   # OpenAI sends JSON text; templates read an object
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except ValueError:
                        raise bad(f"'{where}.tool_calls': arguments of {fn['name']!r} are not valid JSON",
                                  f"{where}.tool_calls") from None
                fixed.append({**c, "function": {**fn, "arguments": args}})
            m["tool_calls"] = fixed
        out.append(m)
    return out


def chat_params(body: dict, model, model_id: str) -> tuple[Params, list[dict]]:
    """Params (prompt rendered with the template and tokenized) and the messages as rendered."""
    from dgguf.runtime.chat import render
    _need_tokenizer(model)
    tok = model.tokenizer
    if not tok.template:
        raise bad(f"{os.path.basename(str(model.path))} has no chat template (tokenizer.chat_template): use "
                  "/v1/completions, or start the server with --chat-template-file", "messages", "no_chat_template")
    _unsupported(body, "logprobs", lambda v: v is False, "logprobs are not supported")
    _unsupported(body, "top_logprobs", lambda v: v == 0, "logprobs are not supported")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise bad("'response_format': only {\"type\": \"text\"} is supported (no constrained decoding)",
                  "response_format")
    common = _common(body, model)
    messages = _messages(body)
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise bad("'tools' must be an array of objects", "tools")
    choice = body.get("tool_choice")
    if choice is not None and not (choice in ("none", "auto", "required") or isinstance(choice, dict)):
        raise bad("'tool_choice' must be \"none\", \"auto\", \"required\" or an object", "tool_choice")
    if choice == "none":
        tools = None
    _bool(body, "parallel_tool_calls", True)
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise bad("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    kwargs = dict(kwargs or {})
    for reserved in ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "limits", "template"):
        if reserved in kwargs:
            raise bad(f"'chat_template_kwargs' cannot set {reserved!r}", "chat_template_kwargs")
    enable_thinking = kwargs.pop("enable_thinking", None)
    if enable_thinking is not None and not isinstance(enable_thinking, bool):
        raise bad("'chat_template_kwargs.enable_thinking' must be a boolean", "chat_template_kwargs")
    try:
        text = render(tok.template, messages, add_generation_prompt=True, bos_token=tok.bos_text,
                      eos_token=tok.eos_text, tools=tools or None, enable_thinking=enable_thinking, **kwargs)
    except DggufError as e:
        raise bad(str(e), "messages") from None
    ids = tok.encode(text)
    return Params(kind="chat", prompt=ids, max_tokens=_max_tokens(
        body, model, ids, None, ("max_completion_tokens", "max_tokens")), model=model_id, **common), messages


# --- responses -----------------------------------------------------------------------------------------------------

def _usage(f: Final) -> dict:
    return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
            "total_tokens": f.prompt_tokens + f.completion_tokens}


def _stats(f: Final, seed: int) -> dict:
    n = sum(f.steps_per_canvas)
    return {"seed": seed, "steps_per_canvas": f.steps_per_canvas,
            "tokens_per_s": round(f.completion_tokens / f.seconds, 2) if f.seconds > 0 else None,
            "seconds": round(f.seconds, 4), "steps": n, "timed_out": f.timed_out}


def tool_call_json(call, k: int, job_id: str) -> dict:
    return {"id": f"call_{job_id[:16]}_{k}", "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}


def completion_response(job, f: Final) -> dict:
    p = job.params
    return {"id": f"cmpl-{job.id}", "object": "text_completion", "created": job.created, "model": p.model,
            "choices": [{"index": 0, "text": f.text, "logprobs": None, "finish_reason": f.finish_reason}],
            "usage": _usage(f), "dgguf": _stats(f, p.seed)}


def chat_response(job, f: Final) -> dict:
    p = job.params
    r = f.reply
    msg = {"role": "assistant", "content": r.content if r is not None else f.text}
    if r is not None and r.reasoning is not None:
        msg["reasoning_content"] = r.reasoning
    if r is not None and r.tool_calls:
        msg["tool_calls"] = [tool_call_json(c, k, job.id) for k, c in enumerate(r.tool_calls)]
    return {"id": f"chatcmpl-{job.id}", "object": "chat.completion", "created": job.created, "model": p.model,
            "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": f.finish_reason}],
            "usage": _usage(f), "dgguf": _stats(f, p.seed)}


class ChunkWriter:
    """The stream's chunks (`data:` events) for one job; tool calls are numbered across the stream."""

    def __init__(self, job):
        self.job, self.p = job, job.params
        self.n_calls = 0
        chat = self.p.kind == "chat"
        self.base = {"id": ("chatcmpl-" if chat else "cmpl-") + job.id,
                     "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": job.created, "model": self.p.model}

    def _chunk(self, choice: dict | None, usage=None, extra=None) -> dict:
        c = dict(self.base, choices=[] if choice is None else [choice])
        if self.p.include_usage:
            c["usage"] = usage
        if extra:
            c.update(extra)
        return c

    def first(self) -> list[dict]:
        if self.p.kind != "chat":
            return []
        return [self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})]

    def delta(self, d: Delta, finish_reason=None) -> list[dict]:
        out = []
        if self.p.kind != "chat":
            if d.content or finish_reason:
                out.append(self._chunk({"index": 0, "text": d.content, "logprobs": None,
                                        "finish_reason": finish_reason}))
            return out
        if d.reasoning:
            out.append(self._chunk({"index": 0, "delta": {"reasoning_content": d.reasoning}, "logprobs": None,
                                    "finish_reason": None}))
        if d.content:
            out.append(self._chunk({"index": 0, "delta": {"content": d.content}, "logprobs": None,
                                    "finish_reason": None}))
        for call in d.tool_calls:
            tc = tool_call_json(call, self.n_calls, self.job.id)
            out.append(self._chunk({"index": 0, "delta": {"tool_calls": [{"index": self.n_calls, **tc}]},
                                    "logprobs": None, "finish_reason": None}))
            self.n_calls += 1
        if finish_reason:
            out.append(self._chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}))
        return out

    def end(self, f: Final) -> list[dict]:
        out = self.delta(f.delta, f.finish_reason)
        if self.p.include_usage:
            out.append(self._chunk(None, usage=_usage(f)))
        return out

    def stats(self, f: Final) -> dict:
        return _stats(f, self.p.seed)


def new_id() -> str:
    return uuid.uuid4().hex
