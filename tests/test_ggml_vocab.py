"""runtime/ggml_vocab.py: an HF tokenizer rebuilt from llama.cpp's tokenizer.ggml.* keys gives the same ids and
the same decoded text as the checkpoint's own HF tokenizer.json.

Three vocabularies, each checked on the same deterministic corpus of >= 20,000 lines (stdlib Python source,
prose in ten scripts, emoji, whitespace runs, control-token texts written as plain text, random code points):
- the PR #24423 fixture GGUFs (gemma4), against their HF tokenizer.json;
- a Gemma-style byte-fallback BPE trained here (~6k pieces, real Gemma 4 pre-tokenizer, extra added tokens
  beyond the base vocabulary, [PADn] padding), converted to the ggml layout as the PR's converter does;
- models/small/tokenizer.json (byte-level BPE, tokenizer.ggml.model = "gpt2").
"""
import json
import random
import sysconfig
import unicodedata
from pathlib import Path

import gguf
import pytest
from dgguf.runtime import ggml_vocab as gv
from tokenizers import Tokenizer, models, normalizers, trainers

ROOT = Path(__file__).resolve().parents[1]
PR_TINY = ROOT / "tests" / "fixtures" / "pr24423-tiny"
SMALL_TOKENIZER = ROOT / "models" / "small" / "tokenizer.json"
SEED = 24423
CONTROL_TEXTS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>"]




# ---------------------------------------------------------------------------------------------------------------
# GGUF keys as plain Python values

def read_kv(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    out = {}
    for name, f in reader.fields.items():
        t = f.types
        if not t:
            continue
        if t[0] == gguf.GGUFValueType.ARRAY:
            if len(t) > 1 and t[1] == gguf.GGUFValueType.STRING:
                out[name] = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            else:
                out[name] = [f.parts[i].tolist()[0] for i in f.data]
        elif t[0] == gguf.GGUFValueType.STRING:
            out[name] = bytes(f.parts[f.data[0]]).decode("utf-8")
        else:
            out[name] = f.parts[f.data[0]].tolist()[0]
    return {k: v for k, v in out.items() if k.startswith("tokenizer.")}


def ggml_layout(tok_json: dict, model: str, *, pad_to: int | None = None, pre: str | None = None,
                visible: tuple[str, ...] = ()) -> dict:
    """tokenizer.ggml.* for an HF tokenizer.json, as llama.cpp's converters write them: tokens in id order,
    <0xNN> → BYTE, HF special added tokens → CONTROL, other added tokens beyond the base vocabulary →
    USER_DEFINED, ids without a token → "[PADn]" UNUSED; merges "A B"; scores -1000. `visible` names tokens
    retyped USER_DEFINED (the Gemma 4 converter does this to `<|channel>`, `<|tool_call>`, ...)."""
    vocab = tok_json["model"]["vocab"]
    base_size = len(vocab)
    added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
    tokens = {i: t for t, i in vocab.items()}
    for i, a in added.items():
        tokens[i] = a["content"]
    n = max(max(tokens) + 1, pad_to or 0)
    names, types = [], []
    for i in range(n):
        t = tokens.get(i)
        if t is None:
            names.append(f"[PAD{i}]")
            types.append(5)
            continue
        names.append(t)
        if t in visible:
            types.append(4)
        elif i in added and added[i]["special"]:
            types.append(3)
        elif i in added and i >= base_size:
            types.append(4)
        elif model == "gemma4" and gv._BYTE_TOKEN.fullmatch(t):
            types.append(6)
        else:
            types.append(1)
    merges = []
    for m in tok_json["model"]["merges"]:
        if isinstance(m, str):
            merges.append(m)
        else:
            merges.append(" ".join(p.replace(" ", "\u0120") for p in m))
    ids = {t: i for i, t in tokens.items()}
    kv = {
        "tokenizer.ggml.model": model,
        "tokenizer.ggml.tokens": names,
        "tokenizer.ggml.scores": [-1000.0] * n,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    if pre is not None:
        kv["tokenizer.ggml.pre"] = pre
    for key, text in (("bos", "<bos>"), ("eos", "<eos>"), ("unknown", "<unk>"), ("padding", "<pad>"),
                      ("mask", "<mask>")):
        if text in ids:
            kv[f"tokenizer.ggml.{key}_token_id"] = ids[text]
    return kv


# ---------------------------------------------------------------------------------------------------------------
# The corpus

def _chars(*ranges):
    out = []
    for r in ranges:
        if isinstance(r, str):
            out.extend(r)
        else:
            out.extend(chr(c) for c in range(r[0], r[1] + 1))
    return out


SCRIPTS = {
    "latin": _chars((0x61, 0x7A), "àáâãäåæçèéêëìíîïðñòóôõöøùúûüýþÿßœłşğčřžšőű"),
    "cyrillic": _chars((0x430, 0x44F), "ёіїєґў"),
    "greek": _chars((0x3B1, 0x3C9), "άέήίόύώϊϋ"),
    "arabic": _chars((0x621, 0x63A), (0x641, 0x64A)),
    "hebrew": _chars((0x5D0, 0x5EA)),
    "devanagari": _chars((0x915, 0x939)),
    "cjk": _chars((0x4E00, 0x4FFF)),
    "hangul": _chars((0xAC00, 0xAFFF)),
    "thai": _chars((0xE01, 0xE2E)),
    "armenian": _chars((0x561, 0x586)),
}
DEVANAGARI_SIGNS = _chars((0x93E, 0x94D), "ंँः")
THAI_MARKS = _chars((0xE31, 0xE31), (0xE34, 0xE3A), (0xE47, 0xE4E))
PUNCT = [", ", ". ", "! ", "? ", "; ", ": ", " — ", " - ", "… ", "« ", " »", "“", "”", "„", "「", "」", "。", "、",
         "，", "؟ ", "، ", "। ", " (", ") ", "'", "\"", "¿", "¡"]
EMOJI = _chars((0x1F600, 0x1F64F), (0x1F300, 0x1F3FA), (0x1F680, 0x1F6C5), (0x1F90C, 0x1F9FF), "✅❤☀⭐✨⚡")
SKIN = _chars((0x1F3FB, 0x1F3FF))
ZWJ_SEQUENCES = ["👨\u200d👩\u200d👧\u200d👦", "👩\u200d💻", "🏳️\u200d🌈", "😶\u200d🌫️", "🧑🏽\u200d🚀",
                 "👩🏿\u200d🔬", "❤️\u200d🔥", "🐻\u200d❄️", "👁️\u200d🗨️", "🫱🏼\u200d🫲🏿"]
FLAGS = ["🇫🇷", "🇯🇵", "🇧🇷", "🇺🇦", "🇮🇳", "🏴\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F"]
KEYCAPS = ["1\ufe0f\u20e3", "#\ufe0f\u20e3", "*\u20e3"]
WHITESPACE = [" ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r", " \n", "\t\n", "\n ",
              "\u00a0", "\u3000", "\u2581", "\u2581\u2581", "\x0b", "\x0c", "\u200b", "\ufeff", "\u2028", "\x00"]
TOKEN_TEXTS = CONTROL_TEXTS + ["<|turn>user\n", "<|turn>model\n", "<turn|>\n", "<0x41>", "<0x0A>", "<0xZZ>",
                               "<|channel>", "<channel|>", "<|\"|>", "<|think|>", "<|image|>", "[[cite]]", "<br>",
                               "[PAD300]", "[PAD7001]",
                               "<bos><bos>", "<<bos>>", "< bos>", "<BOS>", "<|turn", "turn|>", "<|", "|>", "▁<bos>",
                               "<start_of_turn>", "</s>", "<s>", "\u2581\u2581", "[[cite]]", "[[cite]"]


def _word(rng, script):
    chars = SCRIPTS[script]
    n = rng.choice([1, 1, 2, 2, 3, 3, 4, 5, 6, 8]) if script in ("cjk", "hangul") else rng.randint(1, 10)
    if script == "devanagari":
        return "".join(rng.choice(chars) + (rng.choice(DEVANAGARI_SIGNS) if rng.random() < 0.6 else "")
                       for _ in range(max(1, n // 2)))
    if script == "thai":
        return "".join(rng.choice(chars) + (rng.choice(THAI_MARKS) if rng.random() < 0.3 else "") for _ in range(n))
    w = "".join(rng.choice(chars) for _ in range(n))
    if script in ("latin", "cyrillic", "greek", "armenian") and rng.random() < 0.2:
        w = w[:1].upper() + w[1:]
    return w


def _lexicon(rng):
    # A few hundred words per script, drawn Zipf-like, so that a trained BPE learns multi-character pieces.
    return {s: [_word(rng, s) for _ in range(400)] for s in SCRIPTS}


def _prose(rng, lex):
    script = rng.choice(list(SCRIPTS))
    words = lex[script]
    n = rng.randint(1, 25)
    parts = []
    for _ in range(n):
        w = words[min(int(rng.paretovariate(1.2)) - 1, len(words) - 1)] if rng.random() < 0.85 \
            else _word(rng, script)
        parts.append(w)
        r = rng.random()
        parts.append(rng.choice(PUNCT) if r < 0.15 else "" if script in ("cjk", "thai") and r < 0.6 else " ")
    line = "".join(parts).rstrip(" ") if rng.random() < 0.7 else "".join(parts)
    if rng.random() < 0.1:
        line = unicodedata.normalize("NFD", line)
    if rng.random() < 0.1:
        line = " " * rng.randint(1, 3) + line
    return line


def _emoji(rng):
    parts = []
    for _ in range(rng.randint(1, 8)):
        r = rng.random()
        if r < 0.35:
            parts.append(rng.choice(EMOJI))
        elif r < 0.5:
            parts.append(rng.choice(["👍", "👋", "🤝", "💪", "🙏", "👩", "🧑"]) + rng.choice(SKIN))
        elif r < 0.65:
            parts.append(rng.choice(ZWJ_SEQUENCES))
        elif r < 0.72:
            parts.append(rng.choice(FLAGS))
        elif r < 0.76:
            parts.append(rng.choice(KEYCAPS))
        elif r < 0.8:
            parts.append(rng.choice(EMOJI) + "\ufe0f")
        else:
            parts.append(rng.choice([" ", "", "  ", " ok ", "!", " (emoji) ", "\n"]))
    return "".join(parts)


def _whitespace(rng):
    parts = []
    for _ in range(rng.randint(1, 12)):
        parts.append(rng.choice(WHITESPACE) if rng.random() < 0.75 else rng.choice(["a", "x = 1", "Hello", "нет",
                                                                                     "中文", "\u2581a", "3"]))
    return "".join(parts)


def _token_texts(rng, lex):
    parts = []
    for _ in range(rng.randint(1, 8)):
        r = rng.random()
        if r < 0.5:
            parts.append(rng.choice(TOKEN_TEXTS))
        elif r < 0.8:
            parts.append(rng.choice(lex[rng.choice(["latin", "cyrillic", "cjk"])]))
        else:
            parts.append(rng.choice(WHITESPACE[:10]))
    return "".join(parts)


def _random_codepoints(rng):
    out = []
    for _ in range(rng.randint(1, 30)):
        plane = rng.random()
        if plane < 0.15:
            c = rng.randint(0, 0x7F)
        elif plane < 0.7:
            c = rng.randint(0x80, 0xFFFF)
        elif plane < 0.9:
            c = rng.randint(0x10000, 0x2FFFF)
        else:
            c = rng.choice([0xE000, 0xF8FF, 0xFFFD, 0xFFFE, 0xFFFF, 0x10FFFF, 0xE0001, 0x1D11E,
                            rng.randint(0xE0000, 0x10FFFF)])
        if 0xD800 <= c <= 0xDFFF:   # unpaired surrogates are not valid str for tokenizers
            continue
        out.append(chr(c))
    return "".join(out)


def _numbers(rng):
    forms = [lambda: str(rng.randint(0, 10 ** rng.randint(1, 15))),
             lambda: f"{rng.uniform(-1e6, 1e6):.{rng.randint(0, 6)}f}", lambda: f"{rng.randint(1, 999):,}",
             lambda: "3" * rng.randint(1, 12), lambda: "3..3", lambda: "1e-9",
             lambda: "٣٤٥", lambda: "१२३", lambda: "½ ¾ ²"]
    return " ".join(rng.choice(forms)() for _ in range(rng.randint(1, 6)))


def _stdlib_lines(rng):
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.glob("*.py"))
    rng.shuffle(files)
    lines = []
    for p in files[:60]:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        lines.extend(text.split("\n"))
    return lines


def build_corpus(seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    lex = _lexicon(rng)
    src = _stdlib_lines(rng)
    out = []
    # Python source: single lines (indentation, trailing spaces kept) and chunks with embedded newlines.
    for _ in range(8000):
        i = rng.randrange(len(src))
        if rng.random() < 0.7:
            line = src[i]
        else:
            line = rng.choice(["\n", "\r\n", "\n\n"]).join(src[i:i + rng.randint(2, 6)])
        if rng.random() < 0.05:
            line = line.replace("    ", "\t")
        out.append(line)
    out += [_prose(rng, lex) for _ in range(6500)]
    out += [_emoji(rng) for _ in range(1500)]
    out += [_whitespace(rng) for _ in range(1500)]
    out += [_token_texts(rng, lex) for _ in range(1500)]
    out += [_random_codepoints(rng) for _ in range(1000)]
    out += [_numbers(rng) for _ in range(500)]
    for _ in range(1500):   # mixtures
        gens = [lambda: rng.choice(src), lambda: _prose(rng, lex), lambda: _emoji(rng), lambda: _whitespace(rng),
                lambda: _token_texts(rng, lex), lambda: _random_codepoints(rng), lambda: _numbers(rng)]
        out.append(rng.choice(["", " ", "\n", "\t"]).join(rng.choice(gens)() for _ in range(rng.randint(2, 5))))
    out += ["", " ", "  ", "\n", "\t", "\r\n", "\u2581", " a", "a ", " a ", "<bos>", " <bos> ",
            "<|turn>user\nhi<turn|>\n"]
    out += [" ".join(rng.choice(src) for _ in range(40)) for _ in range(20)]   # long lines
    return out


@pytest.fixture(scope="module")
def corpus():
    lines = build_corpus()
    assert len(lines) >= 20_000
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Comparison

def assert_same(ours: Tokenizer, ref: Tokenizer, lines: list[str], label: str, n_ids: int) -> list[list[int]]:
    a = ours.encode_batch(lines, add_special_tokens=False)
    b = ref.encode_batch(lines, add_special_tokens=False)
    bad = [i for i, (x, y) in enumerate(zip(a, b)) if x.ids != y.ids]
    if bad:
        i = bad[0]
        pytest.fail(f"{label}: {len(bad)}/{len(lines)} lines encode differently; first {lines[i]!r}: "
                    f"ours {a[i].ids[:40]} HF {b[i].ids[:40]}")
    ids = [e.ids for e in b]
    rng = random.Random(SEED + 1)
    ids_random = [[rng.randrange(n_ids) for _ in range(rng.randint(1, 24))] for _ in range(3000)]
    for seqs, what in ((ids, "corpus ids"), (ids_random, "random ids")):
        for skip in (True, False):
            da = ours.decode_batch(seqs, skip_special_tokens=skip)
            db = ref.decode_batch(seqs, skip_special_tokens=skip)
            bad = [i for i, (x, y) in enumerate(zip(da, db)) if x != y]
            if bad:
                i = bad[0]
                pytest.fail(f"{label}: {len(bad)}/{len(seqs)} {what} decode differently "
                            f"(skip_special_tokens={skip}); first {seqs[i][:40]}: ours {da[i]!r} HF {db[i]!r}")
    return ids


# ---------------------------------------------------------------------------------------------------------------
# 1. The PR #24423 fixture GGUFs

@pytest.fixture(scope="module")
def fixture_hf():
    return Tokenizer.from_file(str(PR_TINY / "hf" / "tokenizer.json"))


def test_pr_fixture_matches_hf(corpus, fixture_hf):
    kv = read_kv(PR_TINY / "tiny-f32.gguf")
    assert kv["tokenizer.ggml.model"] == "gemma4" and "tokenizer.huggingface.json" not in kv
    ours = gv.build_tokenizer(kv)
    ids = assert_same(ours, fixture_hf, corpus, "tiny-f32.gguf", len(kv["tokenizer.ggml.tokens"]))
    # The corpus reaches byte fallback, every control token and most learned pieces.
    seen = {i for seq in ids for i in seq}
    types = kv["tokenizer.ggml.token_type"]
    assert all(i in seen for i in range(7))
    assert sum(1 for i in seen if types[i] == 6) > 128   # most bytes that UTF-8 text can need as fallback
    assert sum(1 for i in seen if types[i] == 1) > 0.9 * types.count(1)


@pytest.mark.parametrize("name", ["tiny-Q8_0.gguf", "tiny-Q4_K_M.gguf"])
def test_pr_fixture_quantized_files(name, corpus, fixture_hf):
    # llama-quantize copies the vocabulary: the same keys as the F32 file, so the same tokenizer.
    kv = read_kv(PR_TINY / name)
    assert kv == read_kv(PR_TINY / "tiny-f32.gguf")
    assert_same(gv.build_tokenizer(kv), fixture_hf, corpus[::5], name, len(kv["tokenizer.ggml.tokens"]))


def test_pr_fixture_rebuilds_tokenizer_json(fixture_hf):
    # Structurally the same tokenizer: the serialized JSON equals the checkpoint's tokenizer.json.
    ours = gv.build_tokenizer(read_kv(PR_TINY / "tiny-f32.gguf"))
    assert json.loads(ours.to_str()) == json.loads((PR_TINY / "hf" / "tokenizer.json").read_text(encoding="utf-8"))


def test_pr_fixture_examples(fixture_hf):
    kv = read_kv(PR_TINY / "tiny-Q8_0.gguf")
    tok = gv.build_tokenizer(kv)
    enc = tok.encode("<|turn>user\n<bos>Hi <mask> there<turn|>\n", add_special_tokens=False)
    assert enc.ids[0] == 5 and 2 in enc.ids and 4 in enc.ids and 6 in enc.ids
    assert enc.ids == fixture_hf.encode("<|turn>user\n<bos>Hi <mask> there<turn|>\n", add_special_tokens=False).ids
    assert tok.decode(enc.ids, skip_special_tokens=True) == "user\nHi  there\n"
    assert tok.encode("", add_special_tokens=False).ids == []
    assert gv.describe_source(kv) == "llama.cpp vocabulary (gemma4 BPE, 512 tokens, 129 merges)"


# ---------------------------------------------------------------------------------------------------------------
# 2. A larger Gemma-style tokenizer trained here

# Added beyond the base vocabulary, all special as in Gemma 4's tokenizer.json; the ggml layout retypes
# EXTRA_USER user-defined, as the Gemma 4 converter does to <|channel>, <|tool_call>, <|"|>, ...
EXTRA_SPECIAL = ["<|think|>", "<|image|>"]
EXTRA_USER = ["<|channel>", "<channel|>", "<|\"|>", "[[cite]]"]


def _without(line: str, texts: list[str]) -> str:
    # Training text without the added tokens, so that none of them becomes a learned piece as well.
    while any(t in line for t in texts):
        for t in texts:
            line = line.replace(t, "")
    return line


def gemma_style_tokenizer_json(lines: list[str], vocab_size: int = 6000) -> dict:
    bpe = models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CONTROL_TEXTS, limit_alphabet=400,
                                  show_progress=False)
    tok.train_from_iterator([_without(line, EXTRA_SPECIAL + EXTRA_USER) for line in lines], trainer=trainer)
    trained = json.loads(tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(CONTROL_TEXTS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in sorted(trained["vocab"].items(), key=lambda x: x[1]):
        if t not in vocab:
            vocab[t] = len(vocab)
    added = [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
             for i, t in enumerate(CONTROL_TEXTS)]
    for k, t in enumerate(EXTRA_SPECIAL + EXTRA_USER):   # ids after the base vocabulary
        assert t not in vocab
        added.append(dict(id=len(vocab) + k, content=t, single_word=False, lstrip=False, rstrip=False,
                          normalized=False, special=True))
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        # What the real Gemma 4 tokenizer.json has; a no-op after the normalizer (the fixture has null here).
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                          "invert": False},
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": trained["merges"]},
    }


@pytest.fixture(scope="module")
def gemma_style(corpus):
    tj = gemma_style_tokenizer_json(corpus[::2])
    ref = Tokenizer.from_str(json.dumps(tj))
    n = len(tj["model"]["vocab"]) + len(EXTRA_SPECIAL) + len(EXTRA_USER)
    kv = ggml_layout(tj, "gemma4", pad_to=n + 5, visible=tuple(EXTRA_USER))
    return tj, ref, kv


def test_gemma_style_larger_vocab_matches_hf(corpus, gemma_style):
    tj, ref, kv = gemma_style
    assert len(tj["model"]["merges"]) > 4000
    types = kv["tokenizer.ggml.token_type"]
    assert types.count(3) == 9 and types.count(4) == 4 and types.count(5) == 5 and types.count(6) == 256
    ours = gv.build_tokenizer(kv)
    ids = assert_same(ours, ref, corpus, "gemma-style", len(types))
    seen = {i for seq in ids for i in seq}
    assert all(i in seen for i, t in enumerate(types) if t in (3, 4))
    assert not any(types[i] == 5 for i in seen)


def test_gemma_style_merges_in_ggml_form_split_unambiguously(gemma_style):
    tj, _, kv = gemma_style
    ours = json.loads(gv.build_tokenizer(kv).to_str())
    assert ours["model"]["merges"] == tj["model"]["merges"]


# ---------------------------------------------------------------------------------------------------------------
# 3. Byte-level BPE (tokenizer.ggml.model = "gpt2")

@pytest.mark.parametrize("pre", [None, "default", "gpt-2"])
def test_gpt2_small_model_matches_hf(pre, corpus):
    tj = json.loads(SMALL_TOKENIZER.read_text(encoding="utf-8"))
    ref = Tokenizer.from_str(json.dumps(tj))
    kv = ggml_layout(tj, "gpt2", pad_to=len(tj["model"]["vocab"]) + 3, pre=pre)
    ours = gv.build_tokenizer(kv)
    lines = corpus if pre == "gpt-2" else corpus[::10]
    assert_same(ours, ref, lines, f"gpt2 pre={pre}", len(kv["tokenizer.ggml.tokens"]))
    assert gv.describe_source(kv).startswith("llama.cpp vocabulary (gpt2")


def test_gpt2_with_added_tokens_beyond_vocab(corpus):
    tj = json.loads(SMALL_TOKENIZER.read_text(encoding="utf-8"))
    n = len(tj["model"]["vocab"])
    for k, (t, special) in enumerate([("<|im_start|>", True), ("  return", False), ("ünï", False)]):
        tj["added_tokens"].append(dict(id=n + k, content=t, single_word=False, lstrip=False, rstrip=False,
                                       normalized=False, special=special))
    ref = Tokenizer.from_str(json.dumps(tj))
    kv = ggml_layout(tj, "gpt2", pre="gpt-2")
    assert kv["tokenizer.ggml.token_type"][n:] == [3, 4, 4]
    lines = corpus[::4] + ["<|im_start|>  return ünï", "x  returnünï<|im_start|>"]
    assert_same(gv.build_tokenizer(kv), ref, lines, "gpt2+added", len(kv["tokenizer.ggml.tokens"]))


# ---------------------------------------------------------------------------------------------------------------
# Token types, merges and errors on small hand-made vocabularies

def tiny_kv(tokens, types, merges, **extra):
    kv = {"tokenizer.ggml.model": "gemma4", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
          "tokenizer.ggml.scores": [-1000.0] * len(tokens), "tokenizer.ggml.merges": merges}
    kv.update(extra)
    return kv


BYTES = [f"<0x{b:02X}>" for b in range(256)]


def test_unused_tokens_are_never_produced():
    tokens = ["<unk>", "a", "b", "ab", "c", "▁", "▁a", "[PAD7]"] + BYTES
    types = [3, 1, 1, 5, 5, 1, 1, 5] + [6] * 256
    kv = tiny_kv(tokens, types, ["a b", "▁ a"], **{"tokenizer.ggml.unknown_token_id": 0})
    tok = gv.build_tokenizer(kv)
    assert tok.encode("ab", add_special_tokens=False).ids == [1, 2]          # the merge into an unused token is gone
    assert tok.encode("c", add_special_tokens=False).ids == [8 + 0x63]        # byte fallback, not the unused "c"
    assert tok.encode("[PAD7] a", add_special_tokens=False).tokens[-1] == "▁a"
    assert 7 not in tok.encode("[PAD7]", add_special_tokens=False).ids
    assert tok.decode([1, 3, 7, 2]) == "ab"                                   # unused ids decode to nothing


def test_control_and_user_defined_tokens():
    tokens = ["<unk>", "<bos>", "<x>", "a", "▁", "<", ">", "x"] + BYTES
    types = [2, 3, 4, 1, 1, 1, 1, 1] + [6] * 256
    tok = gv.build_tokenizer(tiny_kv(tokens, types, [], **{"tokenizer.ggml.unknown_token_id": 0}))
    ids = tok.encode("<bos>a<x> <bos>", add_special_tokens=False).ids
    assert ids == [1, 3, 2, 4, 1]
    # gemma4: user-defined tokens are special (Gemma 4's added tokens all are), so decode drops them too
    assert tok.decode(ids, skip_special_tokens=True) == "a "
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>a<x> <bos>"
    assert tok.encode("<unk>", add_special_tokens=False).ids == [0]


def test_merges_with_spaces_inside_tokens():
    # "a  b" could be "a"+" b" or "a "+"b" (both give "a b"): the first split wins, as in llama.cpp (find(' ', 1)).
    tokens = ["<unk>", "a", " b", "a b", "a ", "b", "x y", "z", "x yz", " ", "  ", "x", "y", "yz"] + BYTES
    types = [3] + [1] * 13 + [6] * 256
    merges = ["a  b", "x y z", "   ", "y z"]
    tok = gv.build_tokenizer(tiny_kv(tokens, types, merges))
    got = json.loads(tok.to_str())["model"]["merges"]
    assert got == [["a", " b"], ["x y", "z"], [" ", " "], ["y", "z"]]
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.merges\[1\]"):
        gv.build_tokenizer(tiny_kv(tokens, types, ["a  b", "  "]))   # " " + "" is no merge


@pytest.mark.parametrize("change, key", [
    ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.model"),
    ({"tokenizer.ggml.model": "bert"}, "tokenizer.ggml.model"),
    ({"tokenizer.ggml.pre": "qwen2"}, "tokenizer.ggml.pre"),
    ({"tokenizer.ggml.merges": ["a b", "a c"]}, "tokenizer.ggml.merges"),
    ({"tokenizer.ggml.merges": ["ab"]}, "tokenizer.ggml.merges"),
    ({"tokenizer.ggml.merges": ["b a"]}, "tokenizer.ggml.merges"),
    ({"tokenizer.ggml.token_type": [3, 1, 1]}, "tokenizer.ggml.token_type"),
    ({"tokenizer.ggml.token_type": [3, 1, 1, 9]}, "tokenizer.ggml.token_type"),
    ({"tokenizer.ggml.scores": [0.0]}, "tokenizer.ggml.scores"),
    ({"tokenizer.ggml.bos_token_id": 4}, "tokenizer.ggml.bos_token_id"),
    ({"tokenizer.ggml.unknown_token_id": 99}, "tokenizer.ggml.unknown_token_id"),
    ({"tokenizer.ggml.tokens": ["<unk>", "a", "a", "ab"]}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens"),
])
def test_errors_name_the_key(change, key):
    kv = tiny_kv(["<unk>", "a", "b", "ab"], [3, 1, 1, 1], ["a b"], **{"tokenizer.ggml.unknown_token_id": 0})
    gv.build_tokenizer(kv)   # the unchanged vocabulary is fine
    kv.update(change)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as e:
        gv.build_tokenizer(kv)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("missing", ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                     "tokenizer.ggml.merges"])
def test_missing_keys(missing):
    kv = tiny_kv(["<unk>", "a", "b", "ab"], [3, 1, 1, 1], ["a b"])
    del kv[missing]
    with pytest.raises(ValueError, match=missing.replace(".", r"\.")):
        gv.build_tokenizer(kv)


def test_converter_writes_a_vocabulary_llama_cpp_reads(corpus):
    """dgguf convert's tokenizer.ggml.* for models/small (byte-level) say "gpt2", and built alone (without the
    embedded tokenizer.huggingface.json) they tokenize as the checkpoint's tokenizer.json does."""
    from dgguf.convert.checkpoint import read_config, read_generation_config
    from dgguf.convert.metadata import tokenizer_fields
    hf = SMALL_TOKENIZER.parent
    cfg, _ = read_config(hf)
    fields = tokenizer_fields(hf, cfg, read_generation_config(hf, cfg.vocab_size))
    kv = {k: f.value for k, f in fields.items() if k != "tokenizer.huggingface.json"}
    assert kv["tokenizer.ggml.model"] == "gpt2"
    ref = Tokenizer.from_file(str(SMALL_TOKENIZER))
    assert_same(gv.build_tokenizer(kv), ref, corpus[::10], "converted gpt2", len(kv["tokenizer.ggml.tokens"]))
