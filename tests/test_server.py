"""dgguf serve against the official `openai` client and plain HTTP: a real server on a loopback port."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")

from test_server_support import (GEMMA4_TEMPLATE, ROOT, TINY, LiveServer, convert_small, engine_for,  # noqa: E402
                                 request, scripted_generate, sse_events)


@pytest.fixture(scope="module")
def tiny():
    engine = engine_for(TINY, queue=4)
    srv = LiveServer(engine)
    yield srv
    srv.close()
    engine.close()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    engine = engine_for(convert_small(tmp_path_factory.mktemp("small")))
    srv = LiveServer(engine)
    yield srv
    srv.close()
    engine.close()


@pytest.fixture
def scripted(tiny, monkeypatch):
    """The tiny server with the Gemma-4-style template and a scripted reply (set with scripted(text))."""
    monkeypatch.setattr(tiny.engine.model.tokenizer, "template", GEMMA4_TEMPLATE.read_text())
    prompts = []

    def script(text, **kw):
        monkeypatch.setattr(tiny.engine, "generate", scripted_generate(tiny.engine, text, prompts, **kw))
        return prompts
    return script


FAST = {"max_denoising_steps": 12}   # fewer steps per canvas: the same paths, sooner


def direct(engine, prompt_ids, max_tokens, seed, **kw):
    """What the server must answer: Model.generate with the pinned prefix, cut at max_tokens."""
    res = engine.model.generate(prompt_ids, max_new_tokens=max_tokens, seed=seed, pin_prefix=engine.pin, **kw)
    pad = engine.model.config.pad_token_id
    return [i for i in res.ids[:max_tokens] if i != pad]


# --- completions ---------------------------------------------------------------------------------------------------

def test_completions_exact_max_tokens_and_usage(tiny):
    client = tiny.client()
    tok = tiny.engine.model.tokenizer
    for max_tokens, seed in [(1, 0), (5, 1), (16, 2), (17, 3), (40, 4)]:
        r = client.completions.create(model="x", prompt="hello", max_tokens=max_tokens, seed=seed, extra_body=FAST)
        ids = direct(tiny.engine, tok.encode("hello"), max_tokens, seed, **FAST)
        eos = set(tiny.engine.model.config.eos_token_ids)
        if any(i in eos for i in ids):
            ids = ids[:next(k for k, i in enumerate(ids) if i in eos) + 1]
        assert r.choices[0].text == tok.decode(ids)
        assert r.usage.prompt_tokens == len(tok.encode("hello"))
        assert r.usage.completion_tokens == len(ids) <= max_tokens
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.choices[0].finish_reason == ("stop" if any(i in eos for i in ids) else "length")
        if r.choices[0].finish_reason == "length":
            assert r.usage.completion_tokens == max_tokens
        assert r.object == "text_completion" and r.id.startswith("cmpl-")


def test_completions_seed_reproducible_stream_or_not(tiny):
    client = tiny.client()
    kw = dict(model="x", prompt="The canvas", max_tokens=24, seed=1234, extra_body=FAST)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert a == b == streamed
    assert client.completions.create(**{**kw, "seed": 4321}).choices[0].text != a
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and chunks[-1].usage.completion_tokens <= 24
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_token_id_prompt(tiny):
    tok = tiny.engine.model.tokenizer
    ids = tok.encode("hello")
    a = tiny.client().completions.create(model="x", prompt=ids, max_tokens=8, seed=5).choices[0].text
    b = tiny.client().completions.create(model="x", prompt="hello", max_tokens=8, seed=5).choices[0].text
    assert a == b


def test_stop_strings(tiny):
    client = tiny.client()
    kw = dict(model="x", prompt="hello", max_tokens=48, seed=11, extra_body=FAST)
    full = client.completions.create(**kw).choices[0].text
    visible = [k for k in range(3, len(full) - 2) if full[k] not in "\ufffd"]
    stop = full[visible[len(visible) // 2]:visible[len(visible) // 2] + 2]
    want = full[:full.index(stop)]
    r = client.completions.create(stop=[stop, "never-there"], **kw)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 48
    streamed = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "stop"
    assert client.completions.create(stop="never-there", **kw).choices[0].text == full


def test_temperature_maps_as_the_cli_does(tiny):
    """temperature T: t_max = T, t_min scaled with it (0: near greedy), exactly as dgguf run --temp."""
    from dgguf.cli.run import NEAR_GREEDY
    tok, m = tiny.engine.model.tokenizer, tiny.engine.model
    sc = m.sampler_config()
    for temp in (0.0, 0.5, 1.3):
        t_max = temp or NEAR_GREEDY
        want = tok.decode(direct(tiny.engine, tok.encode("hi"), 16, 9, t_max=t_max, t_min=t_max * sc.t_min / sc.t_max,
                                 **FAST))
        got = tiny.client().completions.create(model="x", prompt="hi", max_tokens=16, seed=9, temperature=temp,
                                               extra_body=FAST)
        assert got.choices[0].text == want


def test_sampler_options_as_extra_body(tiny):
    r = tiny.client().completions.create(model="x", prompt="hi", max_tokens=16, seed=2, extra_body={
        "max_denoising_steps": 5, "entropy_bound": 0.3, "stability_threshold": 2})
    assert r.model_extra["dgguf"]["steps_per_canvas"][0] <= 5
    for bad in ({"max_denoising_steps": 0}, {"t_min": 0.9, "t_max": 0.5}, {"entropy_bound": "big"},
                {"stability_threshold": 1.5}, {"early_stop": "no"}):
        with pytest.raises(openai.BadRequestError):
            tiny.client().completions.create(model="x", prompt="hi", max_tokens=4, extra_body=bad)


# --- chat ----------------------------------------------------------------------------------------------------------

def test_chat_stream_and_not(tiny):
    client = tiny.client()
    kw = dict(model="x", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
              max_tokens=40, seed=3, extra_body=FAST)
    r = client.chat.completions.create(**kw)
    m = tiny.engine.model
    prompt = m.chat_prompt(kw["messages"])
    from dgguf.runtime.chat import parse_reply
    ids = direct(tiny.engine, prompt, 40, 3, **FAST)
    eos = set(m.config.eos_token_ids)
    if any(i in eos for i in ids):
        ids = ids[:next(k for k, i in enumerate(ids) if i in eos) + 1]
    assert r.choices[0].message.content == parse_reply(m.tokenizer.decode(ids, special=True)).content
    assert r.usage.prompt_tokens == len(prompt)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [r.choices[0].finish_reason]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}, "required": ["city"]}}}]
REPLY = ('<|channel>thought\nThe user wants weather.<channel|>Checking.<|tool_call>call:get_weather{city:<|"|>Paris'
         '<|"|>}<tool_call|><|tool_call>call:get_time{zone:<|"|>CET<|"|>,precise:true}<tool_call|><turn|>')


def test_chat_tool_calls_parsed(tiny, scripted):
    prompts = scripted(REPLY)
    client = tiny.client()
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model="x", messages=msgs, tools=TOOLS, tool_choice="auto", max_tokens=200)
    assert "get_weather" in tiny.engine.model.tokenizer.decode(prompts[-1], special=True)   # declared to the model
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.content == "Checking."
    assert msg.model_extra["reasoning_content"] == "The user wants weather."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET", "precise": True})]
    assert len({c.id for c in msg.tool_calls}) == 2 and all(c.type == "function" for c in msg.tool_calls)

    chunks = list(client.chat.completions.create(model="x", messages=msgs, tools=TOOLS, max_tokens=200,
                                                 stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert (content, reasoning) == ("Checking.", "The user wants weather.")
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
        (0, "get_weather", {"city": "Paris"}), (1, "get_time", {"zone": "CET", "precise": True})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # the next turn: the assistant's calls (arguments as JSON text, as OpenAI sends them) and the tool's answer
    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
        for c in msg.tool_calls]}, {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "18 C"}]
    scripted("It is 18 C in Paris.")
    r2 = client.chat.completions.create(model="x", messages=follow, tools=TOOLS, max_tokens=64)
    assert r2.choices[0].message.content == "It is 18 C in Paris." and r2.choices[0].finish_reason == "stop"
    rendered = tiny.engine.model.tokenizer.decode(prompts[-1], special=True)
    assert "18 C" in rendered and "Paris" in rendered


def test_chat_thinking_switch_reaches_the_template(tiny, scripted):
    prompts = scripted("ok")
    client = tiny.client()
    for on in (True, False):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": on}})
    a, b = (tiny.engine.model.tokenizer.decode(p, special=True) for p in prompts[-2:])
    assert a != b


def test_chat_without_template_is_a_clear_400(small):
    with pytest.raises(openai.BadRequestError) as e:
        small.client().chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 400 and "no chat template" in e.value.message
    assert e.value.body["code"] == "no_chat_template"
    r = small.client().completions.create(model="x", prompt="def ", max_tokens=40, seed=0)   # completions work
    assert r.usage.completion_tokens <= 40 and r.choices[0].text


# --- errors --------------------------------------------------------------------------------------------------------

BAD_BODIES = [
    ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": True}, "max_tokens"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "temperature": 3}, "temperature"),
    ({"prompt": "hi", "stop": 5}, "stop"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "seed": 1.5}, "seed"),
    ({"prompt": "hi", "seed": "x"}, "seed"),
    ({"prompt": "hi", "n": 2}, "n"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": "hi", "stream_options": []}, "stream_options"),
    ({"prompt": "hi", "logprobs": 3}, "logprobs"),
    ({"prompt": "hi", "echo": True}, "echo"),
    ({"prompt": "hi", "logit_bias": {"5": 10}}, "logit_bias"),
    ({"prompt": "hi", "model": 7}, "model"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": {"text": "hi"}}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "hi " * 2000}, "prompt"),           # longer than ctx (1024)
    ({"prompt": "hi", "max_tokens": 5000}, "max_tokens"),
]
BAD_CHAT = [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": "all"}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": 3}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "max_completion_tokens": 20},
     "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"enable_thinking": "yes"}},
     "chat_template_kwargs"),
    ({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"limits": {"max_seconds": 1e9}}},
     "chat_template_kwargs"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}]},
     "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "hi " * 2000}]}, "messages"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES)
def test_bad_completion_requests_are_400(tiny, body, param):
    status, _, err = request(tiny.port, "POST", "/v1/completions", body)
    assert status == 400, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    assert err["error"]["type"] == "invalid_request_error"
    assert err["error"]["param"] == param


@pytest.mark.parametrize("body,param", BAD_CHAT)
def test_bad_chat_requests_are_400(tiny, body, param):
    status, _, err = request(tiny.port, "POST", "/v1/chat/completions", body)
    assert status == 400, err
    assert err["error"]["param"] == param and err["error"]["message"]


def test_malformed_http_is_4xx_with_openai_bodies(tiny):
    cases = [("POST", "/v1/completions", b"{not json", None, 400),
             ("POST", "/v1/completions", b'"a string"', None, 400),
             ("POST", "/v1/completions", b"[1, 2]", None, 400),
             ("POST", "/v1/completions", b"\xff\xfe", None, 400),
             ("POST", "/v1/completions", b"[" * 100000 + b"]" * 100000, None, 400),
             ("POST", "/v1/completions", b'{"prompt": "hi"}', {"Content-Type": "text/plain"}, 415),
             ("GET", "/v1/completions", None, None, 405),
             ("GET", "/v1/nothing", None, None, 404),
             ("GET", "/v1/models/other-model", None, None, 404)]
    for method, path, raw, headers, want in cases:
        status, _, err = request(tiny.port, method, path, raw=raw, headers=headers)
        assert status == want, (path, raw[:20] if raw else None, err)
        assert err["error"]["message"], err
    # the model's own name works, unknown fields are ignored (clients send new ones)
    assert request(tiny.port, "GET", f"/v1/models/{tiny.engine.model_id}")[0] == 200
    status, _, r = request(tiny.port, "POST", "/v1/completions",
                           {"prompt": "hi", "max_tokens": 2, "some_new_field": {"x": 1}, "top_p": 0.9})
    assert status == 200 and r["usage"]["completion_tokens"] <= 2


def test_models_and_health(tiny):
    models = tiny.client().models.list()
    assert [m.id for m in models.data] == [tiny.engine.model_id]
    meta = models.data[0].model_extra["meta"]
    assert meta["canvas_length"] == 16 and meta["ctx"] == tiny.engine.model.ctx
    status, _, h = request(tiny.port, "GET", "/health")
    assert status == 200 and h["status"] == "ok" and h["queue"]["limit"] == 4


def test_host_header_checked_on_loopback(tiny):
    status, _, err = request(tiny.port, "GET", "/health", headers={"Host": "evil.example:8080"})
    assert status == 403 and err["error"]["code"] == "forbidden_host"
    assert request(tiny.port, "GET", "/health", headers={"Host": f"localhost:{tiny.port}"})[0] == 200


def test_api_key():
    engine = engine_for(TINY)
    srv = LiveServer(engine, api_key="sekret-1")
    try:
        assert request(srv.port, "GET", "/health")[0] == 200                     # no key needed
        for path in ("/v1/models", "/v1/nothing"):
            status, _, err = request(srv.port, "GET", path)
            assert status == 401 and err["error"]["code"] == "invalid_api_key"
            assert request(srv.port, "GET", path, headers={"Authorization": "Bearer wrong"})[0] == 401
        status, _, err = request(srv.port, "POST", "/v1/completions", {"prompt": "hi"},
                                 headers={"Authorization": "Bearer sekret-2"})
        assert status == 401
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="wrong").completions.create(model="x", prompt="hi", max_tokens=2)
        r = srv.client(api_key="sekret-1").completions.create(model="x", prompt="hi", max_tokens=2)
        assert r.usage.completion_tokens <= 2
        assert request(srv.port, "GET", "/")[0] == 200                             # the page's static files
    finally:
        srv.close()
        engine.close()


# --- queue, cancel, timeout ----------------------------------------------------------------------------------------

def blocking_generate(release: threading.Event, started: list, steps: list):
    """A generate that reports its prompt, then steps (every 10 ms) until released, honouring on_step's aborts."""
    def generate(prompt_ids, max_new_tokens=256, seed=None, on_step=None, on_canvas=None, **kw):
        started.append(list(prompt_ids))
        while not release.is_set():
            on_step(0, None)
            steps.append(time.monotonic())
            time.sleep(0.01)
        on_canvas(0, [])
    return generate


def _post_async(port, body, results, key):
    def go():
        results[key] = request(port, "POST", "/v1/completions", body)
    t = threading.Thread(target=go)
    t.start()
    return t


def _wait(cond, timeout=10):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_queue_bound_429_and_arrival_order(monkeypatch):
    engine = engine_for(TINY, queue=2)
    srv = LiveServer(engine)
    release, started, steps, results, threads = threading.Event(), [], [], {}, []
    monkeypatch.setattr(engine, "generate", blocking_generate(release, started, steps))
    tok = engine.model.tokenizer
    try:
        threads.append(_post_async(srv.port, {"prompt": "first", "max_tokens": 4}, results, 0))
        _wait(lambda: len(started) == 1)
        for k, word in enumerate(["second", "third"], 1):        # two may wait
            threads.append(_post_async(srv.port, {"prompt": word, "max_tokens": 4}, results, k))
            _wait(lambda: engine.status()["waiting"] == k)
        status, headers, err = request(srv.port, "POST", "/v1/completions", {"prompt": "fourth", "max_tokens": 4})
        assert status == 429 and err["error"]["type"] == "rate_limit_error"
        assert int(headers["retry-after"]) >= 1
        with pytest.raises(openai.RateLimitError):
            srv.client().completions.create(model="x", prompt="fifth", max_tokens=4)
        release.set()
        for t in threads:
            t.join(30)
        assert all(results[k][0] == 200 for k in range(3))
        assert [tok.decode(p) for p in started] == ["first", "second", "third"]   # arrival order
    finally:
        release.set()
        srv.close()
        engine.close()


def test_disconnect_cancels_at_the_next_step(monkeypatch):
    engine = engine_for(TINY, queue=4)
    srv = LiveServer(engine)
    release, started, steps = threading.Event(), [], []
    monkeypatch.setattr(engine, "generate", blocking_generate(release, started, steps))
    try:
        for stream in (True, False):
            n = len(started)
            sock = socket.create_connection(("127.0.0.1", srv.port))
            body = json.dumps({"prompt": "x", "max_tokens": 4, "stream": stream}).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            _wait(lambda: len(started) == n + 1 and len(steps) > 3)
            sock.close()
            closed = time.monotonic()
            _wait(lambda: not engine.status()["running"], timeout=5)
            assert not release.is_set()                  # it stopped because the client went, not by itself
            assert time.monotonic() - closed < 2
            late = [t for t in steps if t > closed + 0.5]
            assert not late, "steps ran on after the client disconnected"
        # a request that only waits in the queue leaves it when its client goes
        t = _post_async(srv.port, {"prompt": "runs", "max_tokens": 4}, {}, 0)
        _wait(lambda: engine.status()["running"])
        sock = socket.create_connection(("127.0.0.1", srv.port))
        body = json.dumps({"prompt": "waits", "max_tokens": 4, "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        _wait(lambda: engine.status()["waiting"] == 1)
        sock.close()
        _wait(lambda: engine.status()["waiting"] == 0, timeout=15)
        release.set()
        t.join(30)
        assert [engine.model.tokenizer.decode(p) for p in started][-1] == "runs"
    finally:
        release.set()
        srv.close()
        engine.close()


def test_timeout_ends_cleanly(monkeypatch):
    engine = engine_for(TINY, queue=4, timeout=0.5)
    srv = LiveServer(engine)
    try:
        # a real generation that cannot finish in time (6 canvases of 400 steps, a few seconds): what was final is
        # returned, finish_reason length
        slow = {"early_stop": False, "max_denoising_steps": 400}
        t0 = time.monotonic()
        r = srv.client().completions.create(model="x", prompt="hello", max_tokens=96, seed=8, extra_body=slow)
        took = time.monotonic() - t0
        assert took < 4, took
        assert r.model_extra["dgguf"]["timed_out"] is True and r.choices[0].finish_reason == "length"
        # its canvases are those of the full generation (the draws depend on the seed, canvas and step only)
        n = r.usage.completion_tokens + 16
        full = engine.model.tokenizer.decode(direct(engine, engine.model.tokenizer.encode("hello"), n, 8, **slow))
        assert full.startswith(r.choices[0].text) and len(r.choices[0].text) < len(full)
        chunks = list(srv.client().completions.create(model="x", prompt="hello", max_tokens=96, seed=8,
                                                      stream=True, extra_body=slow))
        assert chunks[-1].choices[0].finish_reason == "length"
        assert full.startswith("".join(c.choices[0].text for c in chunks))

        # a request still queued at its deadline: 503 with code timeout
        release, started, steps = threading.Event(), [], []
        monkeypatch.setattr(engine, "generate", blocking_generate(release, started, steps))
        engine.timeout = 30
        res = {}
        t = _post_async(srv.port, {"prompt": "long", "max_tokens": 4}, res, 0)
        _wait(lambda: engine.status()["running"])
        engine.timeout = 0.5
        status, _, err = request(srv.port, "POST", "/v1/completions", {"prompt": "late", "max_tokens": 4})
        assert status == 503 and err["error"]["code"] == "timeout"
        assert engine.status()["waiting"] == 0
        release.set()
        t.join(30)
    finally:
        srv.close()
        engine.close()


# --- SSE canvas events and the page's files ------------------------------------------------------------------------

def test_canvas_events_only_when_asked(tiny):
    plain = sse_events(tiny.port, "/v1/completions", {"prompt": "hi", "max_tokens": 20, "seed": 1, "stream": True})
    assert all(e is None for e, _ in plain) and plain[-1] == (None, "[DONE]")
    events = sse_events(tiny.port, "/v1/completions", {"prompt": "hi", "max_tokens": 20, "seed": 1, "stream": True,
                                                       "canvas": True})
    kinds = [e for e, _ in events]
    assert kinds[0] == "start" and "canvas" in kinds and kinds[-2] == "stats" and events[-1][1] == "[DONE]"
    text = "".join(d["choices"][0]["text"] for e, d in events if e is None and d != "[DONE]" and d["choices"])
    assert text == "".join(d["choices"][0]["text"] for _, d in plain if d != "[DONE]" and d["choices"])
    canvases = [d for e, d in events if e == "canvas"]
    C = tiny.engine.model.config.canvas_length
    for d in canvases:
        assert len(d["ids"]) == len(d["pieces"]) == len(d["accepted"]) == len(d["stable"]) == C
        assert 0 <= d["pinned"] <= C and d["offset"] == d["canvas"] * C
    steps = [d["step"] for d in canvases if d["canvas"] == 0]
    assert steps == list(range(1, len(steps) + 1))
    stats = next(d for e, d in events if e == "stats")
    assert stats["seed"] == 1 and sum(stats["steps_per_canvas"]) == len(canvases)


def test_page_is_static_and_self_contained(tiny):
    for path in ("/", "/static/app.js", "/static/style.css"):
        status, headers, body = request(tiny.port, "GET", path)
        assert status == 200 and "://" not in body, path   # nothing fetched from elsewhere (no CDN)
    assert request(tiny.port, "GET", "/static/../engine.py")[0] == 404


# --- the command ---------------------------------------------------------------------------------------------------

def test_dgguf_serve_command(tmp_path):
    env = dict(os.environ, DGGUF_API_KEY="k1")
    p = subprocess.Popen([sys.executable, "-m", "dgguf.cli", "serve", "-m", str(TINY), "--port", "0", "-t", "1",
                          "--log-level", "warning"], stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        line = p.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m and "API key required" in line, line
        port = int(m.group(1))
        import openai as oa
        client = oa.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1", max_retries=0)
        r = client.completions.create(model="x", prompt="hello", max_tokens=8, seed=0)
        assert r.usage.completion_tokens <= 8
        assert request(port, "GET", "/v1/models")[0] == 401
        p.send_signal(signal.SIGINT)
        assert p.wait(20) == 0
        # the port is taken now by another listener: a one-line error, status 2
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            busy = s.getsockname()[1]
            q = subprocess.run([sys.executable, "-m", "dgguf.cli", "serve", "-m", str(TINY), "--port", str(busy)],
                               capture_output=True, text=True, timeout=60)
        assert q.returncode == 2 and q.stderr.startswith("error: cannot listen") and "Traceback" not in q.stderr
        q = subprocess.run([sys.executable, "-m", "dgguf.cli", "serve", "-m", str(tmp_path / "none.gguf"),
                            "--port", "0"], capture_output=True, text=True, timeout=60)
        assert q.returncode == 2 and q.stderr.startswith("error:") and "Traceback" not in q.stderr
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        assert ROOT.exists()
