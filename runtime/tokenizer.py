"""Text in and out: the checkpoint's own HF tokenizer (embedded in the GGUF) and its jinja2 chat template."""
from __future__ import annotations

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dgguf.core.errors import DggufError
from dgguf.format.gguf_file import GGUFFile


class Tokenizer:
    def __init__(self, g: GGUFFile):
        from tokenizers import Tokenizer as HFTokenizer
        raw = g.get("tokenizer.huggingface.json")
        if raw is None:
            raise DggufError(f"{g.path}: no embedded HF tokenizer (tokenizer.huggingface.json); "
                             "use --prompt-ids, or re-convert the checkpoint with dgguf")
        try:
            self._tok = HFTokenizer.from_str(raw)
        except Exception as e:   # the tokenizers library raises plain Exception on malformed JSON
            raise DggufError(f"{g.path}: embedded tokenizer.huggingface.json is invalid ({e})") from e
        tokens = g.get("tokenizer.ggml.tokens") or []
        self.bos_id = g.get("tokenizer.ggml.bos_token_id")
        self.bos_text = tokens[self.bos_id] if self.bos_id is not None and self.bos_id < len(tokens) else ""
        self.add_bos = bool(g.get("tokenizer.ggml.add_bos_token", True))
        self.template = g.get("tokenizer.chat_template")

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Ids as the HF tokenizer gives them, with BOS first when the model wants one (added once) and bos."""
        ids = self._tok.encode(text).ids
        if bos and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def chat_prompt(self, user_text: str) -> str:
        """One user turn rendered with the model's chat template, ready for the model's reply."""
        if not self.template:
            raise DggufError("this model has no chat template (tokenizer.chat_template)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            tpl = env.from_string(self.template)
            return tpl.render(messages=[{"role": "user", "content": user_text}], add_generation_prompt=True,
                              bos_token=self.bos_text)
        except jinja2.TemplateError as e:
            raise DggufError(f"chat template failed: {e}") from e
