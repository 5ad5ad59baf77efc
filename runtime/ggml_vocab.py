"""An HF `tokenizers.Tokenizer` rebuilt from llama.cpp's `tokenizer.ggml.*` GGUF keys.

GGUFs written by llama.cpp's converter (e.g. the DiffusionGemma draft PR #24423) carry no
`tokenizer.huggingface.json`. This module rebuilds, from the vocabulary, token types and merges alone, the
tokenizer the checkpoint's HF `tokenizer.json` describes, so that encode ids and decode text are the same as
HF's `Tokenizer.encode(text, add_special_tokens=False)` / `Tokenizer.decode(ids, ...)`.

Supported `tokenizer.ggml.model` values:

- ``"gemma4"``: SentencePiece-style BPE over raw UTF-8 (Gemma 4 / DiffusionGemma). Normalizer Replace(" " → "▁"),
  no pre-tokenizer (Gemma 4's own Split(" ") pre-tokenizer is a no-op once every space is "▁"), BPE with
  byte_fallback and fuse_unk, decoder Sequence[Replace("▁" → " "), ByteFallback, Fuse].
- ``"gpt2"``: byte-level BPE (ByteLevel pre-tokenizer with the GPT-2 regex, no prefix space; ByteLevel decoder),
  with `tokenizer.ggml.pre` absent, "default" or "gpt-2".

Token types (llama.cpp's): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
Control and unknown tokens become special added tokens, user-defined ones non-special added tokens (both
matched whole on the raw text, normalized=False, as HF saves them), except under "gemma4": Gemma 4's HF
tokenizer marks every added token special, and llama.cpp's converter retypes seven of them (`<|channel>`,
`<|tool_call>`, `<|"|>`, ...) user-defined only so that llama.cpp prints them; they are special here too, so
`decode(skip_special_tokens=True)` drops them as HF does. Unused tokens (converter padding such as
`[PAD123]`) are left out of the model entirely: encode never produces them and they decode to "" (as in
llama.cpp). No BOS/EOS is added here (no post-processor): the caller adds BOS from
`tokenizer.ggml.bos_token_id` / `tokenizer.ggml.add_bos_token`.

Only the standard library and `tokenizers` are imported.
"""
from __future__ import annotations

import re
from typing import Mapping

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

__all__ = ["build_tokenizer", "describe_source", "SUPPORTED_MODELS"]

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_TYPE_NAMES = {NORMAL: "normal", UNKNOWN: "unknown", CONTROL: "control", USER_DEFINED: "user-defined",
               UNUSED: "unused", BYTE: "byte"}

SUPPORTED_MODELS = ("gemma4", "gpt2")
_PRE = {"gemma4": (None, "default", "gemma4"), "gpt2": (None, "default", "gpt-2")}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPECIAL_ID_KEY = re.compile(r"tokenizer\.ggml\.[a-z_]+_token_id")

K_MODEL = "tokenizer.ggml.model"
K_PRE = "tokenizer.ggml.pre"
K_TOKENS = "tokenizer.ggml.tokens"
K_TYPES = "tokenizer.ggml.token_type"
K_SCORES = "tokenizer.ggml.scores"
K_MERGES = "tokenizer.ggml.merges"
K_UNK = "tokenizer.ggml.unknown_token_id"


def _is_int(v) -> bool:
    """A Python int (not a bool) or a numpy integer scalar."""
    return (isinstance(v, int) and not isinstance(v, bool)) or type(v).__name__.startswith(("int", "uint"))


def _model_name(kv: Mapping[str, object]) -> str:
    model = kv.get(K_MODEL)
    if model is None:
        raise ValueError(f"{K_MODEL} is missing: cannot tell which tokenizer the vocabulary is for")
    if not isinstance(model, str):
        raise ValueError(f"{K_MODEL} must be a string, not {type(model).__name__}")
    if model not in SUPPORTED_MODELS:
        raise ValueError(f"{K_MODEL} = {model!r} is not supported (supported: {', '.join(SUPPORTED_MODELS)})")
    pre = kv.get(K_PRE)
    if pre not in _PRE[model]:
        allowed = ", ".join("absent" if p is None else repr(p) for p in _PRE[model])
        raise ValueError(f"{K_PRE} = {pre!r} is not supported with {K_MODEL} = {model!r} (supported: {allowed})")
    return model


def _str_list(kv: Mapping[str, object], key: str, *, required: bool = True) -> list[str] | None:
    v = kv.get(key)
    if v is None:
        if required:
            raise ValueError(f"{key} is missing")
        return None
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise ValueError(f"{key} must be a list of strings, not {type(v).__name__}")
    v = list(v)
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise ValueError(f"{key}[{i}] must be a string, not {type(s).__name__}")
    return v


def _tokens_and_types(kv: Mapping[str, object]) -> tuple[list[str], list[int]]:
    tokens = _str_list(kv, K_TOKENS)
    if not tokens:
        raise ValueError(f"{K_TOKENS} is empty")
    types = kv.get(K_TYPES)
    if types is None:
        raise ValueError(f"{K_TYPES} is missing (needed to tell control, user-defined and unused tokens apart)")
    if isinstance(types, (str, bytes)) or not hasattr(types, "__iter__"):
        raise ValueError(f"{K_TYPES} must be a list of integers, not {type(types).__name__}")
    types = list(types)
    if len(types) != len(tokens):
        raise ValueError(f"{K_TYPES} has {len(types)} entries but {K_TOKENS} has {len(tokens)}")
    out = [int(t) if _is_int(t) else None for t in types]
    if not set(out) <= _TYPE_NAMES.keys():
        i = next(i for i, t in enumerate(out) if t not in _TYPE_NAMES)
        raise ValueError(f"{K_TYPES}[{i}] = {types[i]!r} is not a llama.cpp token type (1..6)")
    scores = kv.get(K_SCORES)
    if scores is not None:
        if isinstance(scores, (str, bytes)) or not hasattr(scores, "__len__"):
            raise ValueError(f"{K_SCORES} must be a list of numbers, not {type(scores).__name__}")
        if len(scores) != len(tokens):
            raise ValueError(f"{K_SCORES} has {len(scores)} entries but {K_TOKENS} has {len(tokens)}")
    return tokens, out


def _check_special_ids(kv: Mapping[str, object], n: int) -> None:
    for key in sorted(k for k in kv if isinstance(k, str) and _SPECIAL_ID_KEY.fullmatch(k)):
        v = kv[key]
        if not _is_int(v):
            raise ValueError(f"{key} must be an integer, not {type(v).__name__}")
        if not 0 <= int(v) < n:
            raise ValueError(f"{key} = {int(v)} is outside the vocabulary ({K_TOKENS} has {n} tokens)")


def _split_merge(m: str, index: int, ids: Mapping[str, int]) -> tuple[str, str]:
    """The (left, right) pair of a merge written as "left right": the first split at a space where both halves
    and their concatenation are tokens (a token may itself contain spaces)."""
    if m.count(" ") == 1:
        a, b = m.split(" ")
        if a and b and a in ids and b in ids and a + b in ids:
            return a, b
    else:
        pos = m.find(" ", 1)
        while pos != -1:
            a, b = m[:pos], m[pos + 1:]
            if b and a in ids and b in ids and a + b in ids:
                return a, b
            pos = m.find(" ", pos + 1)
    raise ValueError(f"{K_MERGES}[{index}] = {m!r} is not a merge of two tokens into a token "
                     f"(no split at a space gives two tokens whose concatenation is a token)")


def _parse(kv: Mapping[str, object]):
    model = _model_name(kv)
    tokens, types = _tokens_and_types(kv)
    n = len(tokens)
    _check_special_ids(kv, n)

    ids: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if types[i] == UNUSED:
            continue
        j = ids.setdefault(t, i)
        if j != i:
            raise ValueError(f"{K_TOKENS}: token {t!r} appears twice (ids {j} and {i})")
        if model == "gemma4" and types[i] == BYTE and not _BYTE_TOKEN.fullmatch(t):
            raise ValueError(f"{K_TOKENS}[{i}] = {t!r} has {K_TYPES} 6 (byte) but is not of the form <0xNN>")
    # Every string a merge may name (unused tokens too, so that merges touching them parse and are dropped).
    known: dict[str, int] = dict(ids)
    for i, t in enumerate(tokens):
        if types[i] == UNUSED:
            known.setdefault(t, i)

    raw_merges = _str_list(kv, K_MERGES)
    merges: list[tuple[str, str]] = []
    append = merges.append
    for k, m in enumerate(raw_merges):
        a, _, b = m.partition(" ")   # the first candidate split, and the only one in the usual case
        if a and b and a in ids and b in ids and a + b in ids:
            append((a, b))
            continue
        a, b = _split_merge(m, k, known)
        if a in ids and b in ids and a + b in ids:
            merges.append((a, b))
        # else: the merge involves an unused token; dropping it keeps encode from ever producing one.

    unk = None
    if K_UNK in kv:
        u = int(kv[K_UNK])
        if types[u] == UNUSED:
            raise ValueError(f"{K_UNK} = {u} names an unused token ({tokens[u]!r})")
        unk = tokens[u]

    special = (CONTROL, UNKNOWN, USER_DEFINED) if model == "gemma4" else (CONTROL, UNKNOWN)
    added = [(i, tokens[i], types[i] in special)
             for i in range(n) if types[i] in (CONTROL, UNKNOWN, USER_DEFINED) and tokens[i]]
    return model, ids, merges, unk, added


def build_tokenizer(kv: Mapping[str, object]) -> Tokenizer:
    """The HF tokenizer that `kv` (GGUF key → plain Python value) describes. Raises ValueError naming the key
    for a missing, inconsistent or unsupported entry."""
    model, ids, merges, unk, added = _parse(kv)
    if model == "gemma4":
        bpe = models.BPE(vocab=ids, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True,
                         ignore_merges=False)
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    else:   # gpt2: GPT-2 style byte-level BPE. HF byte-level models carry no unk token (every byte is a piece).
        bpe = models.BPE(vocab=ids, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False,
                         ignore_merges=False)
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
    # Added tokens in id order, as HF's tokenizer.json lists them; each keeps its vocabulary id.
    tok.add_tokens([AddedToken(text, special=special, normalized=False, lstrip=False, rstrip=False,
                               single_word=False) for _, text, special in added])
    for i, text, _ in added:
        got = tok.token_to_id(text)
        if got != i:   # cannot happen with distinct token texts; a guard against a tokenizers change
            raise ValueError(f"{K_TOKENS}[{i}] = {text!r}: added token got id {got}")
    return tok


def describe_source(kv: Mapping[str, object]) -> str:
    """One short phrase saying where the tokenizer comes from, for `dgguf inspect`."""
    model = kv.get(K_MODEL)
    tokens = kv.get(K_TOKENS)
    merges = kv.get(K_MERGES)
    kind = {"gemma4": "gemma4 BPE", "gpt2": "gpt2 byte-level BPE"}.get(model, f"{model!r}, unsupported")
    parts = [kind]
    if tokens is not None and hasattr(tokens, "__len__"):
        parts.append(f"{len(tokens)} tokens")
    if merges is not None and hasattr(merges, "__len__"):
        parts.append(f"{len(merges)} merges")
    return f"llama.cpp vocabulary ({', '.join(parts)})"
