"""Text in and out: the checkpoint's own HF tokenizer when the GGUF embeds it (`tokenizer.huggingface.json`,
dgguf's files), else the same tokenizer rebuilt from llama.cpp's `tokenizer.ggml.*` keys (runtime/ggml_vocab.py;
the published files written by PR #24423's converter)."""
from __future__ import annotations

from dgguf.core.errors import DggufError
from dgguf.format.gguf_file import GGUFFile

from . import ggml_vocab

HF_JSON = "tokenizer.huggingface.json"


def has_tokenizer(g: GGUFFile) -> bool:
    return HF_JSON in g.fields or "tokenizer.ggml.tokens" in g.fields


def tokenizer_source(g: GGUFFile) -> str:
    """Where the file's tokenizer comes from, in a few words (dgguf inspect)."""
    if HF_JSON in g.fields:
        return "embedded HF tokenizer.json"
    if "tokenizer.ggml.tokens" in g.fields:
        return ggml_vocab.describe_source({k: g.get(k) for k in g.fields if k.startswith("tokenizer.ggml.")})
    return "none (only --prompt-ids can be used)"


class Tokenizer:
    def __init__(self, g: GGUFFile):
        from tokenizers import Tokenizer as HFTokenizer
        raw = g.get(HF_JSON)
        if raw is not None:
            try:
                self._tok = HFTokenizer.from_str(raw)
            except Exception as e:   # the tokenizers library raises plain Exception on malformed JSON
                raise DggufError(f"{g.path}: embedded {HF_JSON} is invalid ({e})") from e
            self.source = tokenizer_source(g)
        else:
            kv = {k: g.get(k) for k in g.fields if k.startswith("tokenizer.ggml.")}
            if "tokenizer.ggml.tokens" not in kv:
                raise DggufError(f"{g.path}: no tokenizer (neither {HF_JSON} nor tokenizer.ggml.tokens); "
                                 "use --prompt-ids")
            try:
                self._tok = ggml_vocab.build_tokenizer(kv)
            except ValueError as e:
                raise DggufError(f"{g.path}: cannot build the tokenizer: {e}") from e
            self.source = tokenizer_source(g)
        tokens = g.get("tokenizer.ggml.tokens") or []
        self.bos_id = g.get("tokenizer.ggml.bos_token_id")
        self.bos_text = tokens[self.bos_id] if self.bos_id is not None and self.bos_id < len(tokens) else ""
        eos_id = g.get("tokenizer.ggml.eos_token_id")
        self.eos_text = tokens[eos_id] if eos_id is not None and eos_id < len(tokens) else ""
        self.add_bos = bool(g.get("tokenizer.ggml.add_bos_token", True))
        self.template = g.get("tokenizer.chat_template")

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Ids as the HF tokenizer gives them, with BOS first when the model wants one (added once) and bos."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if bos and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, special: bool = False) -> str:
        """Text of ids; special tokens (turn and channel markers, pad) are dropped unless special."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=not special)
