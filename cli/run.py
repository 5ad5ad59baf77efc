"""`dgguf run`: generate text with a DiffusionGemma GGUF."""
from __future__ import annotations

import argparse
import json
import sys

from dgguf.core.errors import DggufError
from dgguf.core.native import MAX_THREADS

from .args import integer, positive


def _id_list(v: str) -> list[int]:
    try:
        ids = [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, not {v!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty")
    return ids


def run(a) -> None:
    from dgguf.runtime.model import Model
    m = Model.load(a.model, threads=a.threads, ctx=a.ctx)
    if a.prompt_ids is not None:
        prompt = a.prompt_ids
    else:
        text = m.tokenizer.chat_prompt(a.prompt) if a.chat else a.prompt
        prompt = m.tokenizer.encode(text)
    overrides = {"max_denoising_steps": a.steps} if a.steps else {}
    show = _visual(m) if a.visual else None
    res = m.generate(prompt, max_new_tokens=a.n, seed=a.seed, early_stop=not a.no_early_stop, on_step=show,
                     **overrides)
    text = _decode(m, res.ids)
    st = res.stats
    if a.json:
        json.dump({"ids": res.ids, "text": text, "steps_per_canvas": st.steps_per_canvas,
                   "tokens_per_forward": st.tokens_per_forward, "seconds_per_step": st.seconds_per_step,
                   "tokens_per_s": st.tokens_per_s, "max_steps": st.max_steps}, sys.stdout)
        print()
        return
    if a.visual:
        sys.stderr.write("\n")
    print(text if text is not None else ",".join(map(str, res.ids)))
    print(f"[{len(res.ids)} tokens, steps per canvas {st.steps_per_canvas} (max {st.max_steps}), "
          f"{st.seconds_per_step:.3f} s/step, {st.tokens_per_s:.1f} tok/s]", file=sys.stderr)


def _decode(m, ids):
    try:
        return m.tokenizer.decode(ids)
    except DggufError:
        return None   # a file without the embedded tokenizer: ids only


def _visual(m):
    """Redraw the canvas in place on stderr before every denoising step."""
    def show(canvas_index, canvas):
        text = _decode(m, canvas)
        line = text if text is not None else " ".join(map(str, canvas))
        line = line.replace("\n", "\u21b5")[:200]
        sys.stderr.write(f"\r\x1b[2K[canvas {canvas_index}] {line}")
        sys.stderr.flush()
    return show


def add_parser(sub) -> None:
    r = sub.add_parser("run", help="generate text with a DiffusionGemma GGUF")
    r.add_argument("-m", "--model", required=True)
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="prompt text (tokenized with the model's own tokenizer)")
    src.add_argument("--prompt-ids", type=_id_list, help="prompt token ids, e.g. 2,17,42 (used verbatim)")
    r.add_argument("-n", type=positive("-n"), default=256, help="new tokens (whole canvases are generated)")
    r.add_argument("--seed", type=integer("--seed", 0, 2**64 - 1), default=None)
    r.add_argument("--threads", type=positive("--threads", MAX_THREADS), default=None)
    r.add_argument("--ctx", type=positive("--ctx"), default=None, help="context limit (default 8192)")
    r.add_argument("--steps", type=positive("--steps"), default=None, help="max denoising steps per canvas")
    r.add_argument("--no-early-stop", action="store_true", help="always run --steps steps per canvas")
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    r.add_argument("--json", action="store_true", help="print ids, text and stats as JSON")
    r.add_argument("--visual", action="store_true", help="show the canvas being denoised")
    r.set_defaults(func=run)
