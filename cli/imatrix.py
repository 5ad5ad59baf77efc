"""`dgguf imatrix`: an importance matrix gathered from canvas denoising (or the encoder alone), in llama.cpp's
imatrix GGUF layout, for `dgguf convert/quantize --imatrix`."""
from __future__ import annotations

from pathlib import Path

from dgguf.core.native import MAX_THREADS

from .args import integer, positive, read_text


def run(a) -> None:
    from tqdm import tqdm

    from dgguf.format.gguf_file import check_output_path
    from dgguf.format.imatrix import write_imatrix
    from dgguf.runtime.imatrix import gather
    from dgguf.runtime.model import Model
    out = Path(a.output)
    check_output_path(out, a.force, [Path(a.model), Path(a.text)])
    text = read_text(a.text, "--text")
    model = Model.load(a.model, threads=a.threads, ctx=a.ctx)
    try:
        n = len(model.tokenizer.encode(text, bos=False))
        total = min(n, a.max_tokens) if a.max_tokens else n
        with tqdm(total=total, unit="tok", disable=True if a.quiet else None, dynamic_ncols=True) as bar:
            im, st = gather(model, text, encoder_only=a.encoder_only, seed=a.seed, max_tokens=a.max_tokens,
                            dataset=Path(a.text).name, progress=bar.update)
    finally:
        model.close()
    write_imatrix(out, im, a.force, [Path(a.model), Path(a.text)])
    how = ("encoder passes only" if a.encoder_only
           else f"{st.canvases} canvases denoised ({st.decoder_passes} decoder passes)")
    print(f"wrote {out}: {len(im.sums)} weights, {st.tokens} tokens, {how}")


def add_parser(sub) -> None:
    p = sub.add_parser("imatrix", help="importance matrix from canvas denoising (llama.cpp's imatrix GGUF layout)")
    p.add_argument("-m", "--model", required=True, help="the reference GGUF (BF16/F16/F32)")
    p.add_argument("--text", required=True, help="calibration text (UTF-8)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--encoder-only", action="store_true",
                   help="encoder passes over the text only (the autoregressive way), no canvas denoising")
    p.add_argument("--max-tokens", type=positive("--max-tokens"), default=None, help="read only the first N tokens")
    p.add_argument("--seed", type=integer("--seed", 0, 2**32 - 1), default=0, help="noise of the canvases")
    p.add_argument("--threads", type=positive("--threads", MAX_THREADS), default=None)
    p.add_argument("--ctx", type=positive("--ctx"), default=None, help="context limit (default 8192)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
