"""Chat templates and replies: render a GGUF's `tokenizer.chat_template` the way transformers'
`apply_chat_template(..., tokenize=False)` does, within time and size limits, and parse a Gemma 4 reply into
content, reasoning and tool calls.

Rendering reproduces transformers 5.x (`utils/chat_template_utils.py`, `tokenization_utils_base.py`) with jinja2
alone:
- environment: `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the `loopcontrols`
  extension and a `{% generation %}...{% endgeneration %}` tag that renders its body unchanged; other options at
  jinja2's defaults (no autoescape, trailing newline of the template dropped, `Undefined` renders as "");
- `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)` = `json.dumps` with those
  arguments (no HTML escaping, unlike jinja2's own filter);
- globals `raise_exception(msg)` (a TemplateError), `strftime_now(fmt)` (local time), `dict` (callable, with
  `fromkeys`), `namespace` (refusing names that start with `_`), and jinja2's `range` (at most 100,000 items,
  as in the sandbox), `lipsum`, `cycler`, `joiner`;
- variables: `messages`, `tools` (None when not given: defined but None), `documents` (None when not given),
  `add_generation_prompt`, the special tokens (`bos_token`, `eos_token`; pass `pad_token=...` etc. in `extra`;
  None leaves a token undefined) and every other keyword (`enable_thinking` only when not None, so templates see
  it undefined by default, as when apply_chat_template is called without it);
- messages: objects converted to dicts (mappings, dataclasses, pydantic `model_dump`), keys whose value is None
  dropped, then every value rebuilt from plain JSON types (str/int/float/bool subclasses cast to the base type,
  numpy scalars to Python scalars, anything else replaced by the string `<TypeName>`), and reasoning aliased: a
  message with `reasoning_content`, `thinking` or `reasoning` (the first not None, in that order) becomes
  `{"thinking": r, **message, "reasoning_content": r}`; tools, documents and keywords get the same rebuild.

Bounded rendering: templates come from downloaded files, so a render stops with DggufError when it runs longer
than `RenderLimits.max_seconds`, when its output or any value it builds (a string, list or dict, or what a value
turns into as text) exceeds `RenderLimits.max_output_chars`, when all the text written into output buffers
(macros and `{% set %}` blocks included) exceeds 16 times that, or when `range()` asks for more than
`RenderLimits.max_range` items. The checks run from the environment's hooks: the sandbox's `call` (every
function, method, macro call), `call_binop` (`+ * % **`, checked before they run, with the operands' sizes),
wrapped filters and globals, and a code generator that adds a check at the top of every block body (each loop
iteration, each macro and if-branch), around every output expression and every `~` concatenation.

Replies (Gemma 4): `parse_reply` splits decoded text (special tokens kept) into content, reasoning and tool calls
as llama.cpp's `peg-gemma4` parser does; see its docstring for the whitespace rules.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache, wraps
from string import Formatter
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from dgguf.core.errors import DggufError

__all__ = ["RenderLimits", "render", "Reply", "ToolCall", "parse_reply", "format_tool_call_args",
           "END_MARKERS"]


# ---------------------------------------------------------------------------------------------------------------
# Limits and per-render state
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RenderLimits:
    """Bounds on one render. `max_output_chars` also bounds every intermediate value (characters of a string,
    items of a list or dict, the text a value converts to); 16 times it bounds all text written to output
    buffers; integers from `*`/`**` are bounded to `max_int_bits`."""
    max_seconds: float = 5.0
    max_output_chars: int = 4 * 1024 * 1024
    max_range: int = 100_000
    max_int_bits: int = 1 << 16


_WRITTEN_FACTOR = 16   # all text written to output buffers, in units of max_output_chars
_BUILT_FACTOR = 32     # the sizes of all values built by calls, filters and operators, added up


class _State:
    __slots__ = ("limits", "deadline", "written", "built")

    def __init__(self, limits: RenderLimits, deadline: float):
        self.limits, self.deadline, self.written, self.built = limits, deadline, 0, 0


_STATE: ContextVar[_State | None] = ContextVar("dgguf_chat_render", default=None)
_monotonic = time.monotonic
_SMALL_TYPES = frozenset({str, int, float, bool, type(None)})   # their text is bounded (str: where it was built)
_COMPILE_STATE = _State(RenderLimits(), math.inf)   # constant folding at compile time: sizes only


def _state() -> _State:
    st = _STATE.get()
    return _COMPILE_STATE if st is None else st


def _fail(msg: str):
    raise DggufError(f"chat template: {msg}")


def _tick() -> _State:
    st = _STATE.get()
    if st is None:
        return _COMPILE_STATE
    if _monotonic() > st.deadline:
        _fail(f"rendering took longer than {st.limits.max_seconds:g} s (RenderLimits.max_seconds)")
    return st


def _size(value: Any) -> int:
    """Characters of a string, items of a container, a third of a big integer's bits; 0 for anything else."""
    t = type(value)
    if t is str or t is list or t is dict or t is tuple:
        return len(value)
    if t is int:
        return value.bit_length() // 3
    if t is bool or t is float or value is None:
        return 0
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
        return len(value)
    if isinstance(value, Namespace):
        return len(object.__getattribute__(value, "_Namespace__attrs"))
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() // 3
    return 0


def _check_value(value: Any, st: _State, what: str = "a value", built: bool = False) -> Any:
    n = _size(value)
    if built:
        st.built += n
        if st.built > _BUILT_FACTOR * st.limits.max_output_chars:
            _fail(f"the template built values of more than {_BUILT_FACTOR * st.limits.max_output_chars} "
                  f"characters/items in all ({_BUILT_FACTOR} x RenderLimits.max_output_chars)")
    if n > st.limits.max_output_chars:
        _fail(f"{what} of {n} characters/items exceeds {st.limits.max_output_chars} (RenderLimits.max_output_chars)")
    if n * 3 > st.limits.max_int_bits - 3 and isinstance(value, int) and not isinstance(value, bool) \
            and value.bit_length() > st.limits.max_int_bits:
        _fail(f"an integer of {value.bit_length()} bits exceeds {st.limits.max_int_bits} (RenderLimits.max_int_bits)")
    return value


def _text_bound(value: Any, budget: int) -> int:
    """About how many characters str(value) has (a lower estimate for escaped strings inside containers, never
    off by more than ~10x), counted only until `budget` is passed; shared references count each time, as str()
    repeats them."""
    total = 0
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v) + 2
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + len(v)
            if total > budget:
                return total
            stack.extend(v)
        elif isinstance(v, dict):
            total += 2 + 2 * len(v)
            if total > budget:
                return total
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, Namespace):
            stack.append(object.__getattribute__(v, "_Namespace__attrs"))
            total += 12
        elif isinstance(v, bytes):
            total += 4 * len(v) + 3
        elif isinstance(v, int) and not isinstance(v, bool):
            total += v.bit_length() // 3 + 2
        else:
            total += 24
        if total > budget:
            return total
    return total


def _check_text(value: Any, st: _State, what: str = "a value") -> Any:
    """Before a value is converted to text (output, `~`, `|string`, `|join`, `|tojson`)."""
    if not isinstance(value, str):   # a str converts to itself; its size was checked where it was built
        n = _text_bound(value, st.limits.max_output_chars)
        if n > st.limits.max_output_chars:
            _fail(f"{what} would convert to more than {st.limits.max_output_chars} characters "
                  "(RenderLimits.max_output_chars)")
    return value


def _check_width(n: Any, st: _State, what: str) -> None:
    if isinstance(n, int) and not isinstance(n, bool) and n > st.limits.max_output_chars:
        _fail(f"{what} {n} exceeds {st.limits.max_output_chars} (RenderLimits.max_output_chars)")


def _check_bound(n: int, st: _State, what: str) -> None:
    if n > st.limits.max_output_chars:
        _fail(f"{what} would make more than {st.limits.max_output_chars} characters/items "
              "(RenderLimits.max_output_chars)")


_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_printf(fmt: str, args: Any, st: _State) -> None:
    """`fmt % args`: no field width or precision beyond the limit, written or taken from args (`*`)."""
    for m in _PRINTF_SPEC.finditer(fmt):
        for g in m.groups():
            if g and g != "*":
                _check_width(int(g), st, "a printf width")
    if "*" in fmt:
        for a in (args if isinstance(args, tuple) else (args,)):
            _check_width(a, st, "a printf width")
    _check_text(args, st, "the arguments of `%`")


def _check_str_format(fmt: str, args: tuple, kwargs: dict, st: _State) -> None:
    """`fmt.format(...)`: widths and precisions in the format specs, literal or nested `{}` fields."""
    try:
        parsed = list(Formatter().parse(fmt))
    except ValueError:
        return   # str.format raises the same error itself
    for _, _, spec, _ in parsed:
        for digits in re.findall(r"\d+", spec or ""):
            _check_width(int(digits), st, "a format width")
    for a in list(args) + list(kwargs.values()):
        _check_width(a, st, "a format width")
    _check_text([args, kwargs], st, "the arguments of format()")


def _check_join(items: Any, sep: str, st: _State) -> None:
    if isinstance(items, (list, tuple)):
        budget = st.limits.max_output_chars
        total = len(sep) * max(len(items) - 1, 0)
        for x in items:
            total += len(x) if isinstance(x, str) else _text_bound(x, budget)
            if total > budget:
                _check_bound(total, st, "join()")


def _check_replace(s: str, old: Any, new: Any, count: Any, st: _State) -> None:
    if isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
        n = len(s) // max(len(old), 1) + 1
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        _check_bound(len(s) + n * (len(new) - len(old)), st, "replace()")


def _check_str_method(s: str, name: str, args: tuple, kwargs: dict, st: _State) -> None:
    if name in ("center", "ljust", "rjust", "zfill"):
        for a in list(args[:1]) + [kwargs.get("width")]:
            _check_width(a, st, f"{name}() width")
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int) and size > 0:
            _check_bound(len(s) + s.count("\t") * size, st, "expandtabs()")
    elif name == "replace":
        a = list(args) + [None] * 3
        _check_replace(s, a[0] if args else kwargs.get("old"), a[1] if len(args) > 1 else kwargs.get("new"),
                       a[2] if len(args) > 2 else kwargs.get("count", -1), st)
    elif name == "join":
        _check_join(args[0] if args else None, s, st)
    elif name in ("format", "format_map"):
        _check_str_format(s, args, kwargs, st)


# ---------------------------------------------------------------------------------------------------------------
# The environment
# ---------------------------------------------------------------------------------------------------------------

class _BoundedCodeGenerator(CodeGenerator):
    """jinja2's code generator, with a time check at the top of every block body (each loop iteration, macro
    call, if-branch) and size checks around every output expression and `~` concatenation."""

    def blockvisit(self, nodes, frame):
        self.writeline("environment.dgguf_tick()")
        super().blockvisit(nodes, frame)

    def _output_const_repr(self, group):
        return f"environment.dgguf_out({super()._output_const_repr(group)})"

    def _output_child_pre(self, node, frame, finalize):
        self.write("environment.dgguf_out(")
        super()._output_child_pre(node, frame, finalize)
        self.write("environment.dgguf_text(")

    def _output_child_post(self, node, frame, finalize):
        self.write(")")
        super()._output_child_post(node, frame, finalize)
        self.write(")")

    def visit_Concat(self, node, frame):
        # `a ~ b`: each part is checked before it is converted to text, and the joined result after
        parts = [jinja2.nodes.Call(jinja2.nodes.ExtensionAttribute(_SizeCheck.identifier, "text_part"),
                                   [n], [], None, None, lineno=n.lineno) for n in node.nodes]
        self.write("environment.dgguf_value(")
        super().visit_Concat(jinja2.nodes.Concat(parts, lineno=node.lineno), frame)
        self.write(")")


class _SizeCheck(jinja2.ext.Extension):
    """Holds `text_part`, the check that the code generator puts around each part of a `~` concatenation."""
    tags: set = set()

    def text_part(self, value):
        return _check_text(value, _state(), "a part of `~`")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag): renders its body as is."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict` inside templates: builds plain dicts, exposes nothing else of the type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """`namespace(...)`: refuses attribute names that start with `_`; stored values are size-checked."""

    def __init__(*args, **kwargs):
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        _check_value(value, _tick(), "a namespace value")
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"namespace attributes cannot start with an underscore (got {name!r})")


def _arg(args: tuple, kwargs: dict, i: int, name: str, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _precheck_filter(name: str, args: tuple, kwargs: dict, st: _State) -> None:
    """Checks before a filter runs, for the filters whose arguments can multiply the size of their input.
    `args` starts with the filtered value (context/environment arguments removed)."""
    value = args[0] if args else None
    if name == "center":
        _check_width(_arg(args, kwargs, 1, "width", 80), st, "center() width")
    elif name == "indent":
        width = _arg(args, kwargs, 1, "width", 4)
        if isinstance(width, str):
            lines = str(value).count("\n") + 1 if isinstance(value, str) else 1
            _check_bound(len(width) * lines, st, "indent()")
        else:
            _check_width(width, st, "indent() width")
    elif name == "format" and isinstance(value, str):
        _check_printf(value, tuple(args[1:]) + tuple(kwargs.values()), st)
    elif name == "replace" and isinstance(value, str):
        _check_replace(value, _arg(args, kwargs, 1, "old"), _arg(args, kwargs, 2, "new"),
                       _arg(args, kwargs, 3, "count"), st)
    elif name == "join":
        sep = _arg(args, kwargs, 1, "d", "")
        _check_join(value, sep if isinstance(sep, str) else "", st)
    elif name in ("batch", "slice"):
        _check_width(args[1] if len(args) > 1 else kwargs.get("linecount", kwargs.get("slices")), st,
                     f"{name}() count")
    elif name == "tojson":
        indent = _arg(args, kwargs, 2, "indent")
        n = _text_bound(value, st.limits.max_output_chars)
        if isinstance(indent, str):
            indent = len(indent)
        if isinstance(indent, int) and indent > 0:
            n *= indent + 1   # a rough bound: each item on its own line, indented
        _check_bound(n, st, "tojson()")
    elif name == "sum":
        start = _arg(args, kwargs, 2, "start", 0)
        if isinstance(start, (str, list, tuple)) and isinstance(value, (list, tuple)):
            _check_bound(sum(_size(x) for x in value[: st.limits.max_output_chars]), st, "sum()")
    elif name in ("string", "pprint", "list", "wordcount", "urlize", "urlencode", "striptags", "xmlattr"):
        _check_text(value, st, f"the value of |{name}")


def _wrap_filter(name: str, func):
    offset = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @wraps(func)
    def checked(*args, **kwargs):
        st = _tick()
        _precheck_filter(name, args[offset:], kwargs, st)
        return _check_value(func(*args, **kwargs), st, f"the result of |{name}", built=True)
    return checked


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "%", "**"})

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True,
                         extensions=[_GenerationTag, _SizeCheck, jinja2.ext.loopcontrols])
        self.filters["tojson"] = _tojson
        self.filters = {name: _wrap_filter(name, f) for name, f in self.filters.items()}
        lipsum = self.globals["lipsum"]
        self.globals.update(
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
            dict=_TemplateDict(),
            namespace=_TemplateNamespace,
            range=self._range,
            lipsum=lambda n=5, html=True, min=20, max=100: self._lipsum(lipsum, n, html, min, max),
        )

    # hooks called by the generated code -------------------------------------------------------------------
    def dgguf_tick(self):
        _tick()

    def dgguf_text(self, value):
        if type(value) in _SMALL_TYPES:
            return value
        return _check_text(value, _tick(), "an output value")

    def dgguf_out(self, text):
        st = _tick()
        st.written += len(text)
        if st.written > _WRITTEN_FACTOR * st.limits.max_output_chars:
            _fail(f"the template wrote more than {_WRITTEN_FACTOR * st.limits.max_output_chars} characters "
                  "(16 x RenderLimits.max_output_chars)")
        return text

    def dgguf_value(self, value):
        return _check_value(value, _tick(), "a `~` concatenation", built=True)

    # sandbox hooks ------------------------------------------------------------------------------------------
    def call(self, context, obj, /, *args, **kwargs):
        st = _tick()
        target = getattr(obj, "__wrapped__", obj)   # the sandbox wraps str.format
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            _check_str_method(owner, getattr(target, "__name__", ""), args, kwargs, st)
        for a in args:
            _check_value(a, st, "an argument")
        for a in kwargs.values():
            _check_value(a, st, "an argument")
        return _check_value(super().call(context, obj, *args, **kwargs), st, "a call's result", built=True)

    def call_binop(self, context, operator, left, right):
        st = _tick()
        lim = st.limits
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                    _check_bound(len(seq) * max(n, 0), st, "`*`")
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > lim.max_int_bits:
                    _fail(f"`*` would make an integer of more than {lim.max_int_bits} bits (RenderLimits.max_int_bits)")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                if right * left.bit_length() > lim.max_int_bits:
                    _fail(f"`**` would make an integer of more than {lim.max_int_bits} bits "
                          "(RenderLimits.max_int_bits)")
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                _check_bound(len(left) + len(right), st, "`+`")
        elif operator == "%" and isinstance(left, str):
            _check_printf(left, right, st)
        return _check_value(super().call_binop(context, operator, left, right), st, f"the result of `{operator}`",
                            built=True)

    # globals ------------------------------------------------------------------------------------------------
    def _range(self, *args):
        rng = range(*args)
        st = _tick()
        if len(rng) > st.limits.max_range:
            _fail(f"range() of {len(rng)} items exceeds {st.limits.max_range} (RenderLimits.max_range)")
        return rng

    def _lipsum(self, lipsum, n, html, min, max):
        st = _tick()
        if isinstance(n, int) and isinstance(max, int) and isinstance(min, int):
            _check_bound(n * (abs(max) + abs(min)) * 12, st, "lipsum()")
        return lipsum(n=n, html=html, min=min, max=max)


_JINJA_MIN = (3, 1, 6)   # older versions have known sandbox escapes; chat templates come from downloaded files


def _jinja_version() -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3])


@lru_cache(maxsize=1)
def _environment() -> _BoundedEnvironment:
    if _jinja_version() < _JINJA_MIN:
        raise DggufError(f"chat template: jinja2 >= 3.1.6 is needed (installed: {jinja2.__version__}); "
                         "older versions have known sandbox escapes")
    return _BoundedEnvironment()


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


# ---------------------------------------------------------------------------------------------------------------
# Inputs as transformers prepares them
# ---------------------------------------------------------------------------------------------------------------

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _to_dicts(value: Any) -> Any:
    """Message objects (mappings, dataclasses, pydantic models) and what they hold, as dicts and lists."""
    if isinstance(value, Mapping):
        return {k: _to_dicts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_dicts(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_dicts(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _to_dicts(value.model_dump())
    return value


def _plain(value: Any) -> Any:
    """What the template may see: plain JSON types only (exact str/int/float/bool, dicts, lists, tuples);
    anything else becomes a placeholder string naming its type."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if any(c.__name__ == "generic" and c.__module__ == "numpy" for c in type(value).__mro__):
        return _plain(value.item())   # numpy scalars (np.bool_(False) must not become a truthy placeholder)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Any) -> list[dict]:
    messages = _to_dicts(getattr(messages, "messages", messages))
    if not isinstance(messages, (list, tuple)):
        _fail(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        _fail("cannot render an empty conversation")
    chat = []
    for m in messages:
        if not isinstance(m, dict):
            _fail(f"each message must be a dict, got {m!r}")
        m = _plain({k: v for k, v in m.items() if v is not None})
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        chat.append(m)
    return chat


# ---------------------------------------------------------------------------------------------------------------
# render
# ---------------------------------------------------------------------------------------------------------------

def render(template: str, messages: list[dict], *, add_generation_prompt: bool = True, bos_token: str | None = "",
           eos_token: str | None = "", tools: list[dict] | None = None, enable_thinking: bool | None = None,
           limits: RenderLimits = RenderLimits(), **extra) -> str:
    """`messages` rendered with the chat `template`, byte for byte as transformers'
    `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=..., tools=...,
    enable_thinking=..., **extra)` renders it for a tokenizer whose special tokens are `bos_token`, `eos_token`
    (and any `*_token` given in `extra`).

    `tools`: JSON-schema dicts (`{"type": "function", "function": {...}}` or whatever the template reads);
    `enable_thinking=None` leaves the variable undefined; `extra` reaches the template as variables
    (`documents=` included). Errors of the template (syntax, `raise_exception`, a failing expression) and runs
    past `limits` raise DggufError("chat template: ...")."""
    if not isinstance(template, str) or not template:
        _fail("no template (tokenizer.chat_template is missing or empty)")
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        _fail(f"syntax error at line {e.lineno}: {e.message}")
    except (jinja2.TemplateError, RecursionError, ValueError) as e:
        _fail(f"cannot compile: {e}")
    chat = _prepare_messages(messages)
    if tools is not None:
        if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools):
            _fail("tools must be a list of JSON-schema dicts")
        tools = _plain(list(tools))
    documents = extra.pop("documents", None)
    if documents is not None:
        if not isinstance(documents, (list, tuple)) or not all(isinstance(d, dict) for d in documents):
            _fail("documents must be a list of dicts")
        documents = _plain(documents)
    variables = {}
    if bos_token is not None:
        variables["bos_token"] = bos_token
    if eos_token is not None:
        variables["eos_token"] = eos_token
    if enable_thinking is not None:
        variables["enable_thinking"] = enable_thinking
    variables.update(extra)
    variables = _plain(variables)

    state = _State(limits, time.monotonic() + limits.max_seconds)
    token = _STATE.set(state)
    try:
        out, n = [], 0
        for chunk in compiled.generate(messages=chat, tools=tools, documents=documents,
                                       add_generation_prompt=add_generation_prompt, **variables):
            n += len(chunk)
            if n > limits.max_output_chars:
                _fail(f"the output exceeds {limits.max_output_chars} characters (RenderLimits.max_output_chars)")
            out.append(chunk)
        return "".join(out)
    except DggufError:
        raise
    except jinja2.TemplateError as e:
        _fail(str(e.message if getattr(e, "message", None) is not None else e))
    except RecursionError:
        _fail("recursion too deep (a macro or recursive loop that never ends?)")
    except MemoryError:
        _fail("out of memory while rendering")
    except Exception as e:   # TypeError, ZeroDivisionError, ... raised by the template's own expressions
        _fail(f"{type(e).__name__}: {e}")
    finally:
        _STATE.reset(token)


# ---------------------------------------------------------------------------------------------------------------
# Gemma 4 replies
# ---------------------------------------------------------------------------------------------------------------

Q = '<|"|>'                   # Gemma 4's string delimiter in tool calls
END_MARKERS = ("<turn|>", "<eos>", "<|tool_response>")
_TURN_START = "<|turn>model\n"
_CH_OPEN, _CH_CLOSE = "<|channel>", "<channel|>"
_CALL_OPEN, _CALL_CLOSE = "<|tool_call>", "<tool_call|>"
_WS = " \t\n\r\f\v"           # C isspace(), as llama.cpp's parser skips
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_BARE_KEY = re.compile(r"[^:{}\[\],<>\n]+")
_CALL_NAME = re.compile(r"call:([^\s{}<>:,]+)(?=\{)")


@dataclass
class ToolCall:
    name: str
    arguments: dict


@dataclass
class Reply:
    content: str
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


class _Malformed(Exception):
    pass


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _parse_value(s: str, i: int) -> tuple[Any, int]:
    if s.startswith(Q, i):
        j = s.find(Q, i + len(Q))
        if j < 0:
            raise _Malformed("unterminated string")
        return s[i + len(Q):j], j + len(Q)
    c = s[i:i + 1]
    if c == "{":
        return _parse_dict(s, i)
    if c == "[":
        return _parse_list(s, i)
    for word, value in (("true", True), ("false", False), ("null", None)):
        if s.startswith(word, i):
            return value, i + len(word)
    m = _NUMBER.match(s, i)
    if m:
        text = m.group(0)
        return (float(text) if m.group(1) or m.group(2) else int(text)), m.end()
    raise _Malformed(f"no value at {i}")


def _parse_key(s: str, i: int) -> tuple[str, int]:
    if s.startswith(Q, i):
        key, i = _parse_value(s, i)
    else:
        m = _BARE_KEY.match(s, i)
        if not m or not m.group(0).strip():
            raise _Malformed(f"no key at {i}")
        key, i = m.group(0).rstrip(_WS), m.end()
    i = _skip_ws(s, i)
    if not s.startswith(":", i):
        raise _Malformed(f"no ':' after key at {i}")
    return key, i + 1


def _parse_dict(s: str, i: int) -> tuple[dict, int]:
    out: dict = {}
    i = _skip_ws(s, i + 1)
    if s.startswith("}", i):
        return out, i + 1
    while True:
        key, i = _parse_key(s, i)
        value, i = _parse_value(s, _skip_ws(s, i))
        out[key] = value
        i = _skip_ws(s, i)
        if s.startswith(",", i):
            i = _skip_ws(s, i + 1)
        elif s.startswith("}", i):
            return out, i + 1
        else:
            raise _Malformed(f"expected ',' or '}}' at {i}")


def _parse_list(s: str, i: int) -> tuple[list, int]:
    out: list = []
    i = _skip_ws(s, i + 1)
    if s.startswith("]", i):
        return out, i + 1
    while True:
        value, i = _parse_value(s, i)
        out.append(value)
        i = _skip_ws(s, i)
        if s.startswith(",", i):
            i = _skip_ws(s, i + 1)
        elif s.startswith("]", i):
            return out, i + 1
        else:
            raise _Malformed(f"expected ',' or ']' at {i}")


def _parse_call(s: str, i: int) -> tuple[ToolCall, int]:
    """A tool call starting at `<|tool_call>` (index i) → the call and the index after `<tool_call|>`."""
    m = _CALL_NAME.match(s, i + len(_CALL_OPEN))
    if not m:
        raise _Malformed("no call:NAME{")
    args, j = _parse_dict(s, m.end())
    j = _skip_ws(s, j)
    if not s.startswith(_CALL_CLOSE, j):
        raise _Malformed("no <tool_call|> after the arguments")
    return ToolCall(m.group(1), args), j + len(_CALL_CLOSE)


def parse_reply(text: str) -> Reply:
    """A Gemma 4 reply, decoded with its special tokens kept, split into content, reasoning and tool calls.

    - The reply ends at the first `<turn|>`, `<eos>` or `<|tool_response>` (the model's stop tokens; what
      follows is dropped). A leading `<|turn>model\\n` is dropped.
    - `<|channel>thought` + whitespace + REASONING + `<channel|>` is reasoning; several blocks are joined in
      order; one without `<channel|>` (a reply cut while thinking) runs to the end. `reasoning` is None when the
      reply has no thought block, "" for an empty one (`<|channel>thought\\n<channel|>`). A `<|channel>` not
      followed by `thought`, and a `<channel|>` outside a block, are dropped (llama.cpp drops the first; at the
      second it stops parsing and loses the rest of the reply, which here stays in content).
    - `<|tool_call>call:NAME{ARGS}<tool_call|>` is a tool call; ARGS use Gemma 4's syntax (bare keys, strings
      between `<|"|>` markers taken verbatim, JSON numbers, true/false/null, nested {...} and [...], whitespace
      allowed after `{ [ , :` and before `} ] ,`). A call that does not parse stays in content verbatim, up to
      and including its `<tool_call|>` (to the end when there is none).
    - Whitespace as llama.cpp's peg-gemma4 parser leaves it: the whitespace after `<|channel>thought` is
      skipped; nothing else is trimmed, so content is every character outside the markers, in order, and
      reasoning keeps its trailing whitespace.
    """
    cut = min((k for k in (text.find(m) for m in END_MARKERS) if k >= 0), default=len(text))
    return Reply(*walk_reply(text[:cut]))


_MARKERS = re.compile("|".join(re.escape(m) for m in (_CH_OPEN, _CH_CLOSE, _CALL_OPEN)))


def walk_reply(s: str, final: bool = True) -> tuple[str, str | None, list[ToolCall]]:
    """(content, reasoning or None, tool calls) of a reply without end markers, by parse_reply's rules. With
    final=False, s is a reply's beginning and the walk stops where what follows could still change the result
    (a thought block or a tool call not yet closed, `<|channel>` + part of "thought"): what it returns is then a
    prefix of what parse_reply gives for any continuation (textstream's partial_reply)."""
    i = len(_TURN_START) if s.startswith(_TURN_START) else 0
    content: list[str] = []
    reasoning: list[str] | None = None
    calls: list[ToolCall] = []
    while i < len(s):
        m = _MARKERS.search(s, i)
        if not m:
            content.append(s[i:])
            break
        content.append(s[i:m.start()])
        i = m.end()
        if m.group(0) == _CH_OPEN:
            if s.startswith("thought", i):
                start = _skip_ws(s, i + len("thought"))
                end = s.find(_CH_CLOSE, start)
                reasoning = reasoning if reasoning is not None else []
                reasoning.append(s[start:] if end < 0 else s[start:end])
                i = len(s) if end < 0 else end + len(_CH_CLOSE)
            elif not final and "thought".startswith(s[i:]):
                break
        elif m.group(0) == _CALL_OPEN:
            try:
                call, i = _parse_call(s, m.start())
                calls.append(call)
            except _Malformed:
                end = s.find(_CALL_CLOSE, m.end())
                if end < 0 and not final:    # may still become a call (or content up to a later close)
                    break
                i = len(s) if end < 0 else end + len(_CALL_CLOSE)
                content.append(s[m.start():i])
    return "".join(content), None if reasoning is None else "".join(reasoning), calls


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, str):
        if Q in v:
            raise ValueError(f"a string containing {Q} cannot be written in Gemma 4's tool-call syntax")
        return Q + v + Q
    if isinstance(v, int):
        return str(int(v))
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{v} is not a JSON number")
        return repr(float(v))
    if isinstance(v, Mapping):
        parts = []
        for k, x in sorted(v.items(), key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0]):
            if not isinstance(k, str):
                raise TypeError(f"tool-call argument keys must be strings, got {k!r}")
            bare = _BARE_KEY.fullmatch(k) and k.strip(_WS) == k and Q not in k
            parts.append((k if bare else _format_value(k)) + ":" + _format_value(x))
        return "{" + ",".join(parts) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_format_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} in Gemma 4's tool-call syntax")


def format_tool_call_args(args: dict) -> str:
    """The inverse of the argument parsing in parse_reply: `{key:value,...}` as the Gemma 4 template writes a
    tool call's arguments (keys sorted case-insensitively as jinja2's dictsort does, bare; strings between
    `<|"|>` markers; JSON numbers, true/false/null; nested dicts and lists). A key that cannot be bare (one with
    `: { } [ ] , < >`, a newline, or surrounding whitespace) is written between `<|"|>` markers, which
    parse_reply also reads. Raises ValueError for strings containing `<|"|>` and non-finite floats."""
    if not isinstance(args, Mapping):
        raise TypeError("tool-call arguments must be a dict")
    return _format_value(args)
