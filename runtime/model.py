"""The public model: load a DiffusionGemma GGUF, get canvas logits, generate text block by block.

    from dgguf.runtime import Model
    m = Model.load("model.gguf")
    out = m.generate(m.tokenizer.encode("def add(a, b):"), max_new_tokens=64, seed=0)

Generation is autoregressive over canvases: the prompt is encoded once into the native KV cache; each canvas
is denoised by the entropy-bound sampler (runtime/sampler.py) with decoder passes that read the cache, then
its committed tokens are encoded (one encoder pass) before the next canvas. Nothing is ever re-encoded.
A Context keeps that cache between calls (a conversation): the next prompt is encoded from where it stops
agreeing with what the cache holds.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from dgguf.core.errors import DggufError
from dgguf.format.gguf_file import read_gguf
from dgguf.core.native import default_threads

from .model_config import ModelConfig, read_model_config
from .native_model import NativeModel, token_ids
from .sampler import SamplerConfig, SeededDraws, commit_canvas, denoise_canvas

if TYPE_CHECKING:
    from .chat import Reply

DEFAULT_CTX = 8192

# transformers' generation-config names → SamplerConfig fields
_OVERRIDES = {"max_denoising_steps": "steps", "t_min": "t_min", "t_max": "t_max", "entropy_bound": "entropy_bound",
              "stability_threshold": "stability_threshold", "confidence_threshold": "confidence_threshold"}


def working_bytes(cfg: ModelConfig, ctx: int) -> dict[str, int]:
    """What generation allocates beyond the mapped file, by what sizes it: the canvas buffers (logits, the
    sampler's two scaled copies and the self-conditioning input: 4 x canvas x vocabulary float32) and a KV cache
    of ctx positions (float32 K and V; sliding layers hold their window)."""
    kv = sum(2 * 4 * kvh * d * (min(cfg.sliding_window - 1, ctx) if s else ctx)
             for kvh, d, s in zip(cfg.kv_heads, cfg.head_dims, cfg.sliding))
    return {"canvas": 4 * 4 * cfg.canvas_length * cfg.vocab_size, "kv_cache": kv}


def _check_memory(path, cfg: ModelConfig, ctx: int) -> None:
    """A clear error, before any allocation, when the file's sizes ask for more memory than this machine has."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):   # not POSIX: nothing to compare with
        return
    need = working_bytes(cfg, ctx)
    if sum(need.values()) > total:
        raise DggufError(
            f"{path}: generation needs {sum(need.values()) / 2**30:.1f} GiB beyond the weights "
            f"(canvas buffers {need['canvas'] / 2**30:.1f} GiB for diffusion.canvas_length {cfg.canvas_length} x "
            f"vocabulary {cfg.vocab_size}; KV cache {need['kv_cache'] / 2**30:.1f} GiB for ctx {ctx}) and this "
            f"machine has {total / 2**30:.1f} GiB" + ("; lower --ctx" if need["kv_cache"] > need["canvas"] else ""))


class Context:
    """A KV cache that outlives one generate call: `ids` are the positions it holds. `sync(prompt)` makes it
    hold exactly `prompt`, keeping the longest common prefix and encoding only the rest."""

    def __init__(self, model: "Model", capacity: int):
        self.model, self.capacity = model, capacity
        self.cache = model.native.new_cache(capacity)
        self.ids: list[int] = []

    def sync(self, prompt: np.ndarray) -> int:
        """Hold exactly `prompt`; returns how many positions were encoded for it."""
        keep = 0
        for a, b in zip(self.ids, prompt.tolist()):
            if a != b:
                break
            keep += 1
        if keep < len(self.ids):
            try:
                self.cache.truncate(keep)
            except DggufError:   # a sliding layer no longer holds the window before `keep`: start over
                self.cache, keep = self.model.native.new_cache(self.capacity), 0
            del self.ids[keep:]
        self.append(prompt[keep:])
        return len(prompt) - keep

    def prompt_for(self, text: str) -> list[int]:
        """Ids for `text` that reuse the longest run of held ids whose text begins it, then the rest tokenized.

        A chat template renders the model's earlier replies as text, and tokenizing that text need not give back
        the ids the model generated; matching on text instead keeps those ids, so a conversation's earlier turns
        are never encoded again (unless the template rewrites them, e.g. drops their reasoning)."""
        tok = self.model.tokenizer
        if tok.add_bos and tok.bos_text and not text.startswith(tok.bos_text):
            text = tok.bos_text + text   # what encode(text) holds: BOS, then the text
        lo, hi = 0, len(self.ids)        # the longest held prefix whose decoded text is a prefix of `text`
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if text.startswith(tok.decode(self.ids[:mid], special=True)):
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            return tok.encode(text)
        return self.ids[:lo] + tok.encode(text[len(tok.decode(self.ids[:lo], special=True)):], bos=False)

    def append(self, ids) -> None:
        ids = np.asarray(ids, dtype=np.int32)
        if ids.size:
            self.cache.encode(ids)
            self.ids.extend(int(i) for i in ids)


@dataclass
class GenerationStats:
    steps_per_canvas: list[int] = field(default_factory=list)
    tokens_per_forward: float = 0.0
    seconds_per_step: float = 0.0
    tokens_per_s: float = 0.0
    max_steps: int = 0


@dataclass
class GenerationResult:
    ids: list[int]
    stats: GenerationStats
    text: str | None = None


@dataclass
class ChatResult:
    """A chat turn's reply parsed by the template's conventions (content, reasoning, tool calls), with the
    generated ids and their raw text (special tokens kept)."""
    reply: "Reply"
    ids: list[int]
    raw: str
    stats: GenerationStats


class Model:
    def __init__(self, path, gguf, cfg: ModelConfig, native: NativeModel, ctx: int):
        self.path, self.gguf, self.config, self.native, self.ctx = path, gguf, cfg, native, ctx
        self._tokenizer = None

    @classmethod
    def load(cls, path, threads: int | None = None, ctx: int | None = None) -> "Model":
        """Map and validate a GGUF. ctx (default 8192, capped by the model) bounds prompt + output length."""
        g = read_gguf(path)
        try:
            cfg = read_model_config(g)
            if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1):
                raise DggufError(f"ctx must be a positive integer, got {ctx!r}")
            n_ctx = min(ctx or DEFAULT_CTX, cfg.context_length)
            _check_memory(g.path, cfg, n_ctx)
            native = NativeModel(g, cfg, threads if threads is not None else default_threads())
        except BaseException:
            g.close()
            raise
        return cls(path, g, cfg, native, n_ctx)

    @property
    def has_tokenizer(self) -> bool:
        """Whether the file carries a tokenizer (embedded HF JSON or llama.cpp's vocabulary)."""
        from .tokenizer import has_tokenizer
        return has_tokenizer(self.gguf)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import Tokenizer
            self._tokenizer = Tokenizer(self.gguf)
        return self._tokenizer

    def _ids(self, ids, what: str) -> np.ndarray:
        return token_ids(ids, self.config.vocab_size, what, allow_empty=False)

    def canvas_logits(self, context_ids, canvas_ids, self_conditioning_logits=None) -> np.ndarray:
        """Softcapped logits [len(canvas), V] of a canvas after a context, as transformers'
        model(input_ids=context, decoder_input_ids=canvas, self_conditioning_logits=sc).logits[0]. Stateless."""
        ctx_ids = self._ids(context_ids, "context_ids")
        canvas = self._ids(canvas_ids, "canvas_ids")
        if len(canvas) > self.config.canvas_length:
            raise DggufError(f"canvas of {len(canvas)} tokens is longer than the model's canvas_length "
                             f"{self.config.canvas_length}")
        if len(ctx_ids) + len(canvas) > self.ctx:
            raise DggufError(f"context ({len(ctx_ids)}) plus canvas ({len(canvas)}) exceeds ctx {self.ctx}")
        cache = self.native.new_cache(len(ctx_ids))
        cache.encode(ctx_ids)
        return cache.decode(canvas, self_conditioning_logits)

    def sampler_config(self, **overrides) -> SamplerConfig:
        """The file's sampler defaults with overrides given by transformers' names."""
        unknown = set(overrides) - set(_OVERRIDES)
        if unknown:
            raise DggufError(f"unknown sampler option {sorted(unknown)[0]!r}; known: {', '.join(_OVERRIDES)}")
        values = {_OVERRIDES[k]: v for k, v in self.config.sampler.items()}
        values.update({_OVERRIDES[k]: v for k, v in overrides.items() if v is not None})
        return SamplerConfig(**values)

    def new_context(self, capacity: int | None = None) -> Context:
        """A KV cache for a conversation: pass it to generate() turn after turn (capacity: ctx by default)."""
        return Context(self, capacity or self.ctx)

    def generate(self, prompt_ids, max_new_tokens: int = 256, seed: int | None = None, draws=None,
                 early_stop: bool = True, on_step=None, on_canvas=None, context: Context | None = None,
                 pin_prefix: bool = False, on_report=None, sc_top_k: int = 0, head_reuse: float = 0.0,
                 **overrides) -> GenerationResult:
        """Generate whole canvases after the prompt (no BOS added: ids are used verbatim).

        draws(kind, canvas_index, step, scaled_logits=None) replaces the seeded random source (see
        sampler.denoise_canvas). early_stop=False runs every canvas for max_denoising_steps steps.
        on_step(canvas_index, canvas_ids) is called before each decoder pass (the CLI's --visual);
        on_canvas(canvas_index, ids) with each canvas's committed ids (cut at max_new_tokens and after an EOS,
        pads dropped) as soon as it is committed. context: a Context to encode the prompt into, keeping what it
        already holds of it (a conversation); by default a fresh cache.
        pin_prefix and on_report(canvas_index, StepReport) are the sampler's (sampler.denoise_canvas): a prefix
        of each canvas made final before it ends, and what each step decided (dgguf serve streams with them).
        Cheaper steps, off by default (approximations; docs/benchmarks.md measures what they cost): sc_top_k > 0
        self-conditions on each position's sc_top_k most probable tokens; head_reuse > 0 recomputes the logits
        only of positions not yet settled (sampler.denoise_canvas).
        """
        prompt = self._ids(prompt_ids, "prompt_ids")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise DggufError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if isinstance(sc_top_k, bool) or not isinstance(sc_top_k, int) or not 0 <= sc_top_k <= self.config.vocab_size:
            raise DggufError(f"sc_top_k must be an integer in 0..{self.config.vocab_size} (0: exact), got {sc_top_k!r}")
        if isinstance(head_reuse, bool) or not isinstance(head_reuse, (int, float)) or not 0 <= head_reuse < math.inf:
            raise DggufError(f"head_reuse must be a finite number >= 0 (nats; 0: exact), got {head_reuse!r}")
        sc = self.sampler_config(**overrides)
        if not early_stop:
            sc = replace(sc, confidence_threshold=0.0)   # mean entropy is never below 0: no early stop
        C = self.config.canvas_length
        n_canvases = math.ceil(max_new_tokens / C)
        if len(prompt) + n_canvases * C > self.ctx:
            raise DggufError(f"prompt ({len(prompt)} tokens) plus {n_canvases} canvas(es) of {C} exceeds ctx "
                             f"{self.ctx}; raise --ctx (model limit {self.config.context_length}) or lower -n")
        if draws is None:
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
                raise DggufError(f"seed must be an integer in 0..2^64-1, got {seed!r}")
            draws = SeededDraws(seed if seed is not None else int.from_bytes(os.urandom(8), "little"),
                                self.config.vocab_size, C)
        if context is None:
            context = Context(self, len(prompt) + (n_canvases - 1) * C)
        elif len(prompt) + (n_canvases - 1) * C > context.capacity:
            raise DggufError(f"prompt ({len(prompt)} tokens) plus {n_canvases} canvas(es) of {C} exceeds the "
                             f"context's capacity {context.capacity}")
        t0 = time.perf_counter()
        context.sync(prompt)
        cache = context.cache
        stats = GenerationStats(max_steps=sc.steps)
        out: list[int] = []
        decode_time = 0.0
        logits_buf = np.empty((C, self.config.vocab_size), dtype=np.float32)   # reused by every step
        for c in range(n_canvases):
            if c > 0:
                context.append(out[-C:])

            def logits_fn(canvas, sc_logits, rows=None, c=c):
                nonlocal decode_time
                if on_step is not None:
                    on_step(c, canvas)
                t = time.perf_counter()
                logits = cache.decode(np.asarray(canvas, dtype=np.int32), sc_logits, out=logits_buf,
                                      sc_top_k=sc_top_k, head_rows=rows)
                decode_time += time.perf_counter() - t
                return logits

            report = None if on_report is None else (lambda r, c=c: on_report(c, r))
            res = denoise_canvas(logits_fn, draws, sc, canvas_index=c, threads=self.native.threads,
                                 pin_prefix=pin_prefix, on_report=report, head_reuse=head_reuse)
            ids, stop = commit_canvas(res.tokens, self.config.eos_token_ids, self.config.pad_token_id)
            out.extend(int(i) for i in ids)
            stats.steps_per_canvas.append(res.steps)
            if on_canvas is not None:
                budget = max(0, max_new_tokens - c * C)
                on_canvas(c, [int(i) for i in ids[:budget] if i != self.config.pad_token_id or not stop])
            if stop:
                break
        elapsed = time.perf_counter() - t0
        n_steps = sum(stats.steps_per_canvas)
        produced = sum(1 for i in out if i != self.config.pad_token_id)
        stats.tokens_per_forward = produced / n_steps
        stats.seconds_per_step = decode_time / n_steps
        stats.tokens_per_s = min(len(out), max_new_tokens) / elapsed if elapsed > 0 else 0.0
        return GenerationResult(ids=out[:max_new_tokens], stats=stats)

    def chat_prompt(self, messages: list[dict], tools=None, enable_thinking=None,
                    add_generation_prompt: bool = True, context: Context | None = None) -> list[int]:
        """The ids of `messages` rendered with the file's chat template (as transformers' apply_chat_template).
        With a context, the ids it already holds for the rendered text are reused (Context.prompt_for)."""
        from .chat import render
        tok = self.tokenizer
        if not tok.template:
            raise DggufError(f"{self.path}: this model has no chat template (tokenizer.chat_template)")
        text = render(tok.template, messages, add_generation_prompt=add_generation_prompt, bos_token=tok.bos_text,
                      eos_token=tok.eos_text, tools=tools, enable_thinking=enable_thinking)
        return context.prompt_for(text) if context is not None else tok.encode(text)

    def chat(self, messages: list[dict], tools=None, enable_thinking=None, context: Context | None = None,
             max_new_tokens: int = 256, **generate_args) -> ChatResult:
        """One assistant turn after `messages` (OpenAI-style dicts): rendered with the file's template,
        generated, and parsed into content, reasoning and tool calls. Pass the same `context` turn after turn to
        keep the conversation's KV cache (earlier turns are not encoded again)."""
        from .chat import parse_reply
        prompt = self.chat_prompt(messages, tools=tools, enable_thinking=enable_thinking, context=context)
        res = self.generate(prompt, max_new_tokens=max_new_tokens, context=context, **generate_args)
        raw = self.tokenizer.decode([i for i in res.ids if i != self.config.pad_token_id], special=True)
        return ChatResult(reply=parse_reply(raw), ids=res.ids, raw=raw, stats=res.stats)

    def close(self) -> None:
        self.gguf.close()
