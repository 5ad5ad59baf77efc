"""runtime/chat.py: chat templates rendered byte for byte as transformers' apply_chat_template renders them,
rendering bounded in time and size, and Gemma 4 replies parsed into content, reasoning and tool calls.

Templates: (a) the PR #24423 fixture's own template (tests/fixtures/pr24423-tiny/hf/tokenizer_config.json),
(b) tests/fixtures/chat/gemma4-style.jinja, a template in the Gemma 4 format written for these tests, (c)
tests/fixtures/chat/features.jinja, which prints what transformers' environment exposes (normalised messages,
tojson options, globals, loop controls, the generation tag, operators).
"""
import copy
import json
import math
import random
import time
from pathlib import Path

import pytest
from dgguf.core.errors import DggufError
from dgguf.runtime import chat
from dgguf.runtime.chat import RenderLimits, Reply, ToolCall, format_tool_call_args, parse_reply, render

ROOT = Path(__file__).resolve().parents[1]
HF_DIR = ROOT / "tests" / "fixtures" / "pr24423-tiny" / "hf"
CHAT_DIR = ROOT / "tests" / "fixtures" / "chat"
SPECIAL = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
Q = '<|"|>'

TEMPLATES = {
    "fixture": json.loads((HF_DIR / "tokenizer_config.json").read_text())["chat_template"],
    "gemma4-style": (CHAT_DIR / "gemma4-style.jinja").read_text(),
    "features": (CHAT_DIR / "features.jinja").read_text(),
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "nullable": True},
        "days": {"type": "integer", "description": "Forecast days"}},
        "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web: returns {title, url} items",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string"},
        "filters": {"type": "object", "properties": {"site": {"type": "string"}, "after": {"type": "string"}}},
        "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["query", "filters"]}}}
NO_PARAMS = {"type": "function", "function": {"name": "now", "description": "The time"}}


def call(name, args, id=None):
    c = {"type": "function", "function": {"name": name, "arguments": args}}
    if id is not None:
        c["id"] = id
    return c


U = lambda text: {"role": "user", "content": text}
A = lambda text, **kw: {"role": "assistant", "content": text, **kw}
S = lambda text: {"role": "system", "content": text}

CONVERSATIONS = {
    "single-user": [U("Hello!")],
    "system-user": [S("You are a helpful assistant.\n"), U("What is 2+2?")],
    "multi-turn": [S("Be terse."), U("Hi"), A("Hello."), U("Name a colour."), A("Blue."), U("Another?")],
    "tools-given": [U("What's the weather in Paris?")],
    "tool-call-and-response": [
        S("Use tools when needed."), U("Weather in Paris, in celsius?"),
        A("", tool_calls=[call("get_weather", {"city": "Paris", "unit": "celsius", "days": 2}, id="call_1")]),
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
        A("It is 18C and sunny in Paris."), U("Thanks!")],
    "parallel-calls-open-turn": [
        U("Weather in Paris and Rome; also search for museums."),
        A("Let me check.", reasoning_content="Two cities and a search.", tool_calls=[
            call("get_weather", {"city": "Paris"}, id="a"), call("get_weather", {"city": "Rome"}, id="b"),
            call("search", {"query": "museums: \"best\", {top} 10", "filters": {"site": "example.org"},
                            "tags": ["art", "history"]})]),
        {"role": "tool", "tool_call_id": "b", "content": "21C"},
        {"role": "tool", "name": "get_weather", "content": "17C"},
        {"role": "tool", "content": {"results": [{"title": "Louvre", "url": "https://louvre.fr"}], "n": 1}}],
    "call-without-response": [
        U("Search for llamas"),
        A(None, tool_calls=[call("search", {"query": "llamas", "filters": {}, "tags": []})])],
    "string-arguments": [
        U("What time is it?"), A("", tool_calls=[call("now", '{"tz":"UTC"}')]),
        {"role": "tool", "content": "12:00"}, U("And now?")],
    "unicode-emoji": [S("Réponds en français 🇫🇷"), U("Ça va? 你好，世界 — مرحبا 👩‍👩‍👧 e\u0301"),
                      A("Très bien 😀 \u200b zero-width"), U("🙂" * 20)],
    "empty-content": [U(""), A(""), U("   ")],
    "template-looking-text": [
        S("{{ bos_token }} {% if true %}x{% endif %} {# c #}"),
        U("Say '<|turn>model\n' and '<turn|>' and {{ messages }} and <|channel>thought\nx<channel|>"),
        A("{% raw %}{{ not rendered }}{% endraw %} <bos>")],
    "thinking-in-history": [
        U("Riddle?"), A("<|channel>thought\nHmm, tricky.<channel|>A shadow.", reasoning_content="Hmm, tricky."),
        U("Another riddle?")],
    "content-parts": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]},
        A([{"type": "text", "text": "A cat."}]),
        {"role": "user", "content": [{"type": "audio"}, {"type": "video"}, {"type": "text", "text": "And these?"}]}],
    "developer-role": [{"role": "developer", "content": "Only answer in JSON."}, U("List two primes.")],
    "reasoning-aliases": [U("q1"), A("a1", thinking="t1"), U("q2"), A("a2", reasoning="r2", tool_calls=None),
                          U("q3")],
    "system-later": [U("Hi"), A("Hello"), S("From now on, answer in capitals."), U("ok?")],
    "long-history": [S("Count with me.")] + [m for k in range(1, 7) for m in (U(f"{k}?"), A(f"{k}."))] + [U("7?")],
    "responses-by-order": [
        U("Weather in Oslo and Lima?"),
        A("", tool_calls=[call("get_weather", {"city": "Oslo"}), call("search", {"query": "Lima weather",
                                                                                "filters": {"site": None}})]),
        {"role": "tool", "content": "-3C"}, {"role": "tool", "content": "19C"},
        A("Oslo -3C, Lima 19C."), U("Warmer one?"), A("Lima.")],
    "whitespace-edges": [S("\n\n  spaced system \t\n"), U("\r\nline one\r\n\tline two  \n\n"), A("\n answer \n"),
                         U(" \u3000 full-width space, nbsp\u00a0 ")],
    "special-tokens-in-content": [
        U("<bos><eos><pad> and <|tool_call>call:x{a:<|\"|>b<|\"|>}<tool_call|> and <|think|>"),
        A("<|tool_response>response:x{}<tool_response|> <|image|>")],
    "none-values-dropped": [{"role": "user", "content": "x", "name": None, "tool_calls": None},
                            {"role": "assistant", "content": None, "tool_calls": [call("now", {})]},
                            {"role": "tool", "content": "noon", "tool_call_id": None}],
}

VARIANTS = {
    "gen": dict(add_generation_prompt=True),
    "nogen": dict(add_generation_prompt=False),
    "think": dict(add_generation_prompt=True, enable_thinking=True),
    "nothink": dict(add_generation_prompt=True, enable_thinking=False),
    "tools": dict(add_generation_prompt=True, tools=[WEATHER, SEARCH, NO_PARAMS]),
    "tools-think": dict(add_generation_prompt=True, tools=[WEATHER], enable_thinking=True),
    "empty-tools": dict(add_generation_prompt=True, tools=[]),
    "extra": dict(add_generation_prompt=False, documents=[{"title": "T", "text": "Doc ✓"}], custom_var={"k": [1]}),
}

# every conversation under 3 variants, each on all three templates
CASES = []
for i, (conv_name, conv) in enumerate(CONVERSATIONS.items()):
    names = list(VARIANTS)
    for var_name in ("gen", names[(i % (len(names) - 1)) + 1], names[((i + 3) % (len(names) - 1)) + 1]):
        CASES.append((conv_name, var_name))
CASES = sorted(set(CASES))


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(HF_DIR / "tokenizer.json"), **SPECIAL)


def hf_render(tok, template, messages, variant):
    tok.chat_template = template
    return tok.apply_chat_template(copy.deepcopy(messages), tokenize=False, **copy.deepcopy(variant))


def test_case_coverage():
    assert len(CONVERSATIONS) >= 20 and len(CASES) >= 50
    assert {v for _, v in CASES} == set(VARIANTS)


@pytest.mark.parametrize("template_name", list(TEMPLATES))
@pytest.mark.parametrize("conv_name,variant_name", CASES)
def test_render_matches_transformers(hf_tokenizer, template_name, conv_name, variant_name):
    template, messages, variant = TEMPLATES[template_name], CONVERSATIONS[conv_name], VARIANTS[variant_name]
    expected = hf_render(hf_tokenizer, template, messages, variant)
    original = copy.deepcopy(messages)
    got = render(template, messages, **SPECIAL, **variant)
    assert got == expected
    assert messages == original   # the caller's messages are not modified


def test_gemma4_style_template_shape():
    """The test template writes the Gemma 4 format the notes describe."""
    t = TEMPLATES["gemma4-style"]
    conv = CONVERSATIONS["tool-call-and-response"]
    out = render(t, conv, bos_token="<bos>", tools=[WEATHER], enable_thinking=True)
    assert out.startswith("<bos><|turn>system\n<|think|>\nUse tools when needed.<|tool>declaration:get_weather{")
    assert ('parameters:{properties:{city:{description:<|"|>City name, e.g. Paris<|"|>,type:<|"|>STRING<|"|>},'
            in out)
    assert 'required:[<|"|>city<|"|>],type:<|"|>OBJECT<|"|>}}<tool|><turn|>\n' in out
    assert ("<|turn>model\n<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>,days:2,unit:<|\"|>celsius<|\"|>}"
            "<tool_call|><|tool_response>response:get_weather{value:<|\"|>18C and sunny<|\"|>}<tool_response|>"
            "It is 18C and sunny in Paris.<turn|>\n") in out
    assert out.endswith("<|turn>user\nThanks!<turn|>\n<|turn>model\n")
    off = render(t, conv, bos_token="<bos>", enable_thinking=False)
    assert off.startswith("<bos><|turn>system\nUse tools")
    assert off.endswith("<|turn>model\n<|channel>thought\n<channel|>")
    assert render(t, [U("hi")], bos_token="<bos>").endswith("<|turn>model\n<|channel>thought\n<channel|>")
    # no model header after an unanswered call or an open turn with tool responses
    assert render(t, CONVERSATIONS["call-without-response"]).endswith("<tool_call|><|tool_response>")
    assert render(t, CONVERSATIONS["parallel-calls-open-turn"]).endswith("<tool_response|>")


def test_format_tool_call_args_matches_template_and_parses_back():
    args = {"city": "São Paulo", "Days": 3, "opts": {"metric": True, "none": None, "ratio": 0.25,
                                                         "list": [1, "a, b", {"x": -2}]}, "b": []}
    out = render(TEMPLATES["gemma4-style"], [U("go"), A("", tool_calls=[call("f", args)])])
    expected = "<|tool_call>call:f" + format_tool_call_args(args) + "<tool_call|><|tool_response>"
    assert out.endswith(expected)
    reply = parse_reply(out[out.index("<|tool_call>"):])
    assert reply == Reply("", None, [ToolCall("f", args)])


def test_template_errors_raise_dggufError(hf_tokenizer):
    bad_role = [{"role": "robot", "content": "beep"}]
    with pytest.raises(Exception, match="unknown role: robot"):
        hf_render(hf_tokenizer, TEMPLATES["gemma4-style"], bad_role, {})
    with pytest.raises(DggufError, match=r"^chat template: unknown role: robot$"):
        render(TEMPLATES["gemma4-style"], bad_role)
    with pytest.raises(DggufError, match=r"^chat template: syntax error at line 2"):
        render("ok\n{% if %}", [U("x")])
    with pytest.raises(DggufError, match="chat template: .*undefined"):
        render("{{ nothing.at.all }}", [U("x")])
    with pytest.raises(DggufError, match="chat template: ZeroDivisionError"):
        render("{{ 1 // 0 }}", [U("x")])
    with pytest.raises(DggufError, match="underscore"):
        render("{% set ns = namespace() %}{% set ns._x = 1 %}", [U("x")])
    with pytest.raises(DggufError, match="unsafe|access"):
        render("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", [U("x")])
    with pytest.raises(DggufError, match="empty conversation"):
        render("x", [])
    with pytest.raises(DggufError, match="tools"):
        render("x", [U("x")], tools=[print])


def test_variables_and_undefined():
    t = "{{ bos_token is defined }} {{ enable_thinking is defined }} {{ tools is defined }} {{ tools is none }}"
    assert render(t, [U("x")]) == "True False True True"
    assert render(t, [U("x")], bos_token=None, enable_thinking=False) == "False True True True"
    assert render("{{ enable_thinking }}{{ foo }}", [U("x")], enable_thinking=True, foo=3) == "True3"


# ---------------------------------------------------------------------------------------------------------------
# bounded rendering
# ---------------------------------------------------------------------------------------------------------------

def run_bounded(template, limits=RenderLimits(), match=None):
    t0 = time.monotonic()
    with pytest.raises(DggufError, match=match) as e:
        render(template, [U("x")], limits=limits)
    elapsed = time.monotonic() - t0
    assert elapsed < 10, elapsed
    assert str(e.value).startswith("chat template: ")
    return elapsed


def test_nested_range_loops_with_output_stop():
    run_bounded("{% for i in range(100000) %}{% for j in range(100000) %}{{ j }},{% endfor %}{% endfor %}",
                match="RenderLimits")


def test_nested_range_loops_without_output_stop_at_the_time_limit():
    elapsed = run_bounded("{% for i in range(100000) %}{% for j in range(100000) %}{% set k = j %}{% endfor %}"
                          "{% endfor %}", match="longer than 5 s")
    assert elapsed >= 5


def test_huge_string_multiplication_stops_before_allocating():
    assert run_bounded("{{ 'x' * 4000000000 }}", match="max_output_chars") < 1


def test_recursive_macro_stops():
    run_bounded("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", match="recursion")
    # a finite but exponential one runs into the time limit
    run_bounded("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
                RenderLimits(max_seconds=1), match="longer than 1 s")


S4M = "{% set s = 'x' * 4000000 %}"


@pytest.mark.parametrize("template", [
    "{{ 'x' | center(4000000000) }}",
    "{{ 'x'.ljust(4000000000) }}",
    "{{ 'x'.zfill(4000000000) }}",
    "{{ '{:>4000000000}'.format('x') }}",
    "{{ '%4000000000s' % 'x' }}",
    "{{ '%*s' % (4000000000, 'x') }}",
    "{{ 'a\nb' | indent(4000000000) }}",
    "{{ [1, 2] | tojson(indent=4000000000) }}",
    "{{ range(100001) | list | length }}",
    "{{ lipsum(1000000000) }}",
    "{{ [1] * 4000000000 }}",
    "{{ 7 ** 1000000 }}",
    S4M + "{{ ([s] * 1000) | join }}",
    S4M + "{{ '-'.join([s] * 1000) }}",
    S4M + "{{ [s] * 1000 }}",
    S4M + "{{ s ~ s }}",
    S4M + "{{ s + s }}",
    S4M + "{{ s.replace('x', 'yy') }}",
    S4M + "{{ s | replace('x', 'yy') }}",
    S4M + "{% macro m(a) %}{% endmacro %}{{ m(s ~ s) }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(n=3) %}{% for i in range(100) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    S4M + "{% set ns = namespace() %}{% set ns.t %}{% for i in range(100000) %}{{ s }}{% endfor %}{% endset %}",
    "{% for i in range(100000) recursive %}{{ loop([i]) }}{% endfor %}",
    S4M + "{{ ([s] * 1000) | map('upper') | list | length }}",
    S4M + "{{ '%s' % ([s] * 1000,) }}",
    S4M + "{{ '{}'.format([s] * 1000) }}",
    S4M + "{{ dict.fromkeys(range(1000), s) | tojson }}",
])
def test_amplifiers_stop_quickly(template):
    assert run_bounded(template, RenderLimits(max_seconds=3)) < 3


def test_output_limit_is_exact():
    limits = RenderLimits(max_output_chars=100)
    assert render("{{ 'x' * 100 }}", [U("x")], limits=limits) == "x" * 100
    assert render("{% for i in range(100) %}y{% endfor %}", [U("x")], limits=limits) == "y" * 100
    with pytest.raises(DggufError, match="exceeds 100"):
        render("{% for i in range(101) %}y{% endfor %}", [U("x")], limits=limits)
    with pytest.raises(DggufError, match="range"):
        render("{{ range(11) | list }}", [U("x")], limits=RenderLimits(max_range=10))


# ---------------------------------------------------------------------------------------------------------------
# parse_reply / format_tool_call_args
# ---------------------------------------------------------------------------------------------------------------

def tc(body):
    return f"<|tool_call>call:{body}<tool_call|>"


@pytest.mark.parametrize("text,expected", [
    ("Hello there.", Reply("Hello there.")),
    ("Hello there.<turn|>", Reply("Hello there.")),
    ("<|turn>model\n  Indented answer\n<turn|>\n<|turn>user\nignored", Reply("  Indented answer\n")),
    ("Four.<eos><pad><pad>", Reply("Four.")),
    ("<|channel>thought\nLet me think: 2+2.\n<channel|>The answer is 4.<turn|>",
     Reply("The answer is 4.", "Let me think: 2+2.\n")),
    ("<|channel>thought\n<channel|>Direct answer.", Reply("Direct answer.", "")),
    ("<|channel>thought\n  step 1<channel|>A<|channel>thought more<channel|>B", Reply("AB", "step 1more")),
    ("<|channel>thought\nstill thinking when cut", Reply("", "still thinking when cut")),
    ("<|channel><|channel>thought\nx<channel|>Y<channel|>", Reply("Y", "x")),
    ("before <channel|>after", Reply("before after")),
    ("Checking." + tc('get_weather{city:<|"|>Paris<|"|>}') + "<|tool_response>",
     Reply("Checking.", None, [ToolCall("get_weather", {"city": "Paris"})])),
    (tc("f{arg1:-7}") + tc("g{orig:3.14}") + tc("h{enabled:true}") + tc("i{}"),
     Reply("", None, [ToolCall("f", {"arg1": -7}), ToolCall("g", {"orig": 3.14}), ToolCall("h", {"enabled": True}),
                      ToolCall("i", {})])),
    ("<|channel>thought\nNeed two calls.<channel|>" + tc(
        'search{filters:{after:<|"|>2024-01-01<|"|>,site:null},query:<|"|>a, b: {c} [d]\n"e"<|"|>,'
        'tags:[<|"|>x<|"|>,[1,2.5e3,-0.5],{deep:{deeper:[false]}}]}') + tc("now{n:0}"),
     Reply("", "Need two calls.", [
         ToolCall("search", {"filters": {"after": "2024-01-01", "site": None}, "query": 'a, b: {c} [d]\n"e"',
                             "tags": ["x", [1, 2500.0, -0.5], {"deep": {"deeper": [False]}}]}),
         ToolCall("now", {"n": 0})])),
    (tc('f{ a : 1 ,\n b: [ 1 , 2 ] , c:{ } }'), Reply("", None, [ToolCall("f", {"a": 1, "b": [1, 2], "c": {}})])),
    (tc('f{s:<|"|><tool_call|> and }<|"|>}'), Reply("", None, [ToolCall("f", {"s": "<tool_call|> and }"})])),
    (tc('f{<|"|>odd key: x<|"|>:1}'), Reply("", None, [ToolCall("f", {"odd key: x": 1})])),
])
def test_parse_reply(text, expected):
    assert parse_reply(text) == expected


@pytest.mark.parametrize("bad", [
    tc("f{a:bare}"),                      # not a value
    tc('f{a:<|"|>unterminated}'),         # string never closed
    tc("f{a:1"),                          # dict never closed
    tc("f{a:1,}"),                        # trailing comma
    tc("f{a 1}"),                         # no colon
    tc("{a:1}"),                          # no name
    "<|tool_call>f{a:1}<tool_call|>",     # no call:
    "<|tool_call>call:f{a:1}",            # cut before <tool_call|>
    tc("f{a:01x}"),
])
def test_malformed_calls_stay_in_content(bad):
    text = "Before. " + bad + " After." + tc("ok{x:1}")
    reply = parse_reply(text)
    assert reply.content == "Before. " + bad + " After." or (
        not bad.endswith("<tool_call|>") and reply.content == "Before. " + bad + " After." + tc("ok{x:1}"))
    if bad.endswith("<tool_call|>"):
        assert reply.tool_calls == [ToolCall("ok", {"x": 1})]


ROUND_TRIP = [
    {},
    {"city": "Paris"},
    {"a": 1, "B": -2, "c": 0.1, "d": 1e20, "e": -0.0, "f": True, "g": False, "h": None},
    {"text": "commas, colons: braces {} [brackets]\nnew lines\n\ttabs and \"quotes\" and 'apostrophes' \\"},
    {"nested": {"list": [1, [2, [3, {"x": "y"}]], {}], "empty": [], "obj": {"k": {"k": {"k": "v"}}}}},
    {"unicode": "日本語 😀 é", "emoji_key_😀": 1, "with space": 2, "dash-key": 3, "dotted.key": 4},
    {"needs quotes: yes": 1, "{brace}": 2, " padded ": 3, "a,b": [None]},
    {"big": 123456789012345678901234567890, "small": 1e-300, "neg": -12.5},
]


@pytest.mark.parametrize("args", ROUND_TRIP)
def test_round_trip(args):
    text = "Sure." + "<|tool_call>call:tool_1" + format_tool_call_args(args) + "<tool_call|><|tool_response>"
    assert parse_reply(text) == Reply("Sure.", None, [ToolCall("tool_1", args)])


def test_round_trip_random():
    rng = random.Random(15)
    alphabet = "abcXYZ019 ,:{}[]<>|\"'\n\t\\é😀-_."

    def value(depth):
        kind = rng.randrange(8 if depth < 4 else 6)
        if kind == 0:
            return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        if kind == 1:
            return rng.randint(-10**6, 10**6)
        if kind == 2:
            return rng.choice([0.5, -1.25, 3.0e8, 1e-7, rng.uniform(-1e3, 1e3)])
        if kind == 3:
            return rng.choice([True, False])
        if kind in (4, 5) and depth > 0:
            return None
        if kind in (4, 6):
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {"".join(rng.choice(alphabet) for _ in range(1 + rng.randrange(6))): value(depth + 1)
                for _ in range(rng.randrange(4))}

    for _ in range(300):
        args = {f"k{j}": value(1) for j in range(rng.randrange(5))}
        text = tc("fn" + format_tool_call_args(args))
        assert parse_reply(text).tool_calls == [ToolCall("fn", args)], text


def test_format_tool_call_args_errors():
    assert format_tool_call_args({"b": 1, "A": "x", "a": [True, None]}) == '{A:<|"|>x<|"|>,a:[true,null],b:1}'
    with pytest.raises(ValueError):
        format_tool_call_args({"s": "has " + Q + " inside"})
    with pytest.raises(ValueError):
        format_tool_call_args({"x": math.nan})
    with pytest.raises(TypeError):
        format_tool_call_args({"x": object()})


def test_end_markers():
    assert chat.END_MARKERS == ("<turn|>", "<eos>", "<|tool_response>")
    assert parse_reply("a<|tool_response>b<turn|>c").content == "a"
