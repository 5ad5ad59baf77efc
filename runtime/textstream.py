"""Final ids → final text, as deltas that are never taken back (`dgguf run`'s output and `dgguf serve`'s stream).

A `TextStream` gets the ids that can no longer change (whole committed canvases, and for the server the pinned
prefix of the canvas being denoised: see sampler.denoise_canvas(pin_prefix=True)); they only ever grow at the
end. Their text is sent once it can no longer change either:
- a trailing run of byte-fallback tokens waits for the token that closes it (until then its bytes may still
  turn out invalid UTF-8, and decode to U+FFFD), and so does a trailing U+FFFD (a partial character);
- text that could be the start of a stop string waits, and generation ends at the stop string that ends first
  (the one a token-by-token server meets first), which is cut off with everything after it;
- chat replies are split into content, reasoning and tool calls by the template's markers (runtime/chat.py's
  parse_reply), and a part is sent only when no later text can move it to another part: a possible marker at
  the end waits, a tool call is sent whole once parsed, text after an unclosed `<|tool_call>` waits for its
  close.
So the deltas, concatenated, are exactly the final text (content, reasoning; tool calls in order).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .chat import (END_MARKERS, ToolCall, _CALL_CLOSE, _CALL_OPEN, _CH_CLOSE, _CH_OPEN, _TURN_START, parse_reply,
                   walk_reply)

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Strings whose beginning at the end of the text must wait: the reply's markers and its end markers.
CHAT_MARKERS = (_CH_OPEN, _CH_CLOSE, _CALL_OPEN, _CALL_CLOSE, _TURN_START, *END_MARKERS)


def held_back(text: str, words) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of words (0 if none)."""
    best = 0
    for w in words:
        for k in range(min(len(w) - 1, len(text)), best, -1):
            if text.endswith(w[:k]):
                best = k
                break
    return best


def first_stop(text: str, stops) -> tuple[int, int] | None:
    """(start, end) of the stop string occurrence that ends first in text (ties: the longer one), or None."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < (best[1], best[0])):
            best = (i, i + len(s))
    return best


def partial_reply(s: str) -> tuple[str, str, list[ToolCall]]:
    """(content, reasoning, tool calls) of a reply's beginning `s` that no continuation can change: each is a
    prefix (for calls, the first calls) of parse_reply(s + t)'s for every t, provided s has no end marker and
    does not end with a proper prefix of a marker (CHAT_MARKERS; the caller holds that back). The walk is
    parse_reply's, stopping where what follows is not decided yet."""
    content, reasoning, calls = walk_reply(s, final=False)
    return content, reasoning or "", calls


def open_tail_for(tokenizer, special: bool):
    """For a byte-fallback tokenizer, a function giving how many trailing ids may still change their text: a run of
    byte tokens (`<0xE2>`) decodes as one byte string, and a byte that is text now (`<0x3D>` is "=") turns into
    U+FFFD when a following byte makes the run invalid UTF-8. The run is closed by a token the decoder keeps that
    is not a byte (special tokens are dropped, so they do not close it, unless decoded with special=True).
    None where no token is a byte token (byte-level BPE decodes all text at once: only a trailing U+FFFD waits)."""
    tok = getattr(tokenizer, "_tok", None)
    if tok is None:
        return None
    byte_ids = {i for t, i in tok.get_vocab(with_added_tokens=False).items() if _BYTE_TOKEN.fullmatch(t)}
    if not byte_ids:
        return None
    skipped = set() if special else {i for i, t in tok.get_added_tokens_decoder().items() if t.special}

    def open_tail(ids) -> int:
        n = has_byte = 0
        for i in reversed(ids):
            if i in byte_ids:
                has_byte = 1
            elif i not in skipped:
                break
            n += 1
        return n if has_byte else 0
    return open_tail


@dataclass
class Delta:
    """New final text since the last delta: content (a completion's text), reasoning, whole tool calls."""
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


class TextStream:
    """Text of append-only final ids. `update(ids)` with all final ids so far returns the Delta that became final;
    `finish(ids)` the rest once generation has ended. `stopped` turns true when a stop string (or, for a chat
    reply, an end marker) is final: nothing after it matters, generation can end."""

    def __init__(self, decode, *, chat: bool = False, stop=(), open_tail=None):
        self.decode, self.chat, self.stop = decode, chat, [s for s in stop if s]
        self.open_tail = open_tail   # open_tail_for(tokenizer, special): trailing ids whose text may change
        self.hold_words = self.stop + (list(CHAT_MARKERS) if chat else [])
        self.stopped = False
        self.stop_end: int | None = None   # where the stop string ended in the text, when stopped
        self.text = ""                     # the final text so far (before any stop string)
        self.sent = Delta()                # everything sent: content, reasoning, calls
        self.reply = None                  # chat: parse_reply of the final text, after finish
        self._raw = ""                     # the decoded text so far, before the stop cut
        self._n_ids = -1

    def _cut(self, text: str) -> str:
        hit = first_stop(text, self.stop)
        if hit is not None:
            self.stopped, self.stop_end = True, hit[1]
            text = text[:hit[0]]
        if self.chat:
            end = min((k for k in (text.find(m) for m in END_MARKERS) if k >= 0), default=-1)
            if end >= 0:
                self.stopped = True
        return text

    def _emit(self, content: str, reasoning: str, calls: list[ToolCall]) -> Delta:
        d = Delta()
        if content.startswith(self.sent.content) and reasoning.startswith(self.sent.reasoning) and \
                calls[:len(self.sent.tool_calls)] == self.sent.tool_calls:
            d = Delta(content[len(self.sent.content):], reasoning[len(self.sent.reasoning):],
                      calls[len(self.sent.tool_calls):])
        # else: the decoder's text of more ids does not extend its text of fewer (never seen); send nothing now,
        # finish() sends what extends (and tests check the concatenation)
        self.sent.content += d.content
        self.sent.reasoning += d.reasoning
        self.sent.tool_calls += d.tool_calls
        return d

    def _parts(self, text: str, final: bool):
        if not self.chat:
            return text, "", []
        if final:
            r = parse_reply(text)
            self.reply = r
            return r.content, r.reasoning or "", r.tool_calls
        return partial_reply(text)

    def update(self, ids) -> Delta:
        if self.stopped or len(ids) == self._n_ids:
            return Delta()
        self._n_ids = len(ids)
        hold = self.open_tail(ids) if self.open_tail is not None else 0
        raw = self.decode(ids[:len(ids) - hold]).rstrip("\ufffd")
        if not raw.startswith(self._raw):
            return Delta()
        self._raw = raw
        text = self.text = self._cut(raw)
        if self.stopped:
            return self._emit(*self._parts(text, final=True))
        safe = text[:len(text) - held_back(text, self.hold_words)]
        return self._emit(*self._parts(safe, final=False))

    def finish(self, ids) -> Delta:
        """The rest of the text once no more ids come (ids: all final ids)."""
        if not self.stopped:
            self.text = self._cut(self.decode(ids))
        return self._emit(*self._parts(self.text, final=True))
