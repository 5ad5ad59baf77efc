"""`dgguf card`: a model card (README.md for the Hugging Face hub: YAML front matter, then Markdown) for a set of
quants: each file's type, size and bits per weight, and with `--eval REF --text FILE` the quality card's rows
(`dgguf eval`'s figures, runtime/quality.py; the same columns as scripts/quality_card.py)."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from dgguf.core.errors import DggufError
from dgguf.core.native import MAX_THREADS

from .args import integer, positive, read_text

TAGS = ["gguf", "dgguf", "diffusion-gemma", "text-diffusion", "block-diffusion", "quantized"]


def _yaml_str(s: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is a subset of it)."""
    return json.dumps(str(s), ensure_ascii=False)


def _hub_id(url) -> str | None:
    """org/name from a Hugging Face hub URL or id, else None."""
    if not isinstance(url, str):
        return None
    m = re.fullmatch(r"(?:https?://(?:www\.)?huggingface\.co/)?([\w.-]+/[\w.-]+)/?", url.strip())
    return m.group(1) if m and (url.startswith("http") or "://" not in url) else None


def base_models(g) -> list[str]:
    """The hub ids the GGUF names as its source (general.source.*) or else its base models (general.base_model.N.*)."""
    src = _hub_id(g.get("general.source.huggingface.repository")) or _hub_id(g.get("general.source.repo_url"))
    if src:
        return [src]
    out = []
    n = g.get("general.base_model.count", 0)
    for i in range(n if isinstance(n, int) and not isinstance(n, bool) and 0 < n < 100 else 0):
        hub = _hub_id(g.get(f"general.base_model.{i}.repo_url"))
        if hub and hub not in out:
            out.append(hub)
    return out


def _file_type(g) -> str:
    from dgguf.format.quant_types import FILE_TYPES
    ftype = g.get("general.file_type")
    names = {ft.ftype: name for name, ft in FILE_TYPES.items()}
    return names.get(ftype, f"file_type {ftype}" if ftype is not None else "unknown")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def describe(path) -> dict:
    """A file's (or split set's) row: name, parts, type, size on disk, bits per weight, and its metadata."""
    from dgguf.format.gguf_file import read_gguf
    g = read_gguf(path)
    try:
        paths = list(getattr(g, "paths", [g.path]))
        weights = sum(t.nvalues for t in g.tensors)
        return {"path": Path(path), "parts": len(paths), "type": _file_type(g),
                "size_bytes": sum(os.stat(p).st_size for p in paths),
                "bits_per_weight": 8 * sum(t.nbytes for t in g.tensors) / max(weights, 1),
                "name": g.get("general.name"), "license": g.get("general.license"), "tags": g.get("general.tags"),
                "languages": g.get("general.languages"), "base_models": base_models(g)}
    finally:
        g.close()


def _strings(v) -> list[str]:
    return [x for x in v if isinstance(x, str) and x.strip()] if isinstance(v, list) else []


def render(rows: list[dict], quality: dict | None = None, title: str | None = None,
           base_model: list[str] | None = None) -> str:
    """The card. quality: {"ref": path, "text": path, "prompts": n, "rows": [eval dict per file, as rows]}."""
    from dgguf.format.gguf_file import printable
    first = rows[0]
    name = title or first["name"] or first["path"].name
    bases = base_model or next((r["base_models"] for r in rows if r["base_models"]), [])
    tags = list(TAGS)
    for r in rows:
        tags += [t for t in _strings(r["tags"]) if t not in tags]
    meta = []
    if bases:
        meta += ["base_model:"] + [f"- {_yaml_str(b)}" for b in bases] + ["base_model_relation: quantized"]
    lic = next((r["license"] for r in rows if isinstance(r["license"], str) and r["license"].strip()), None)
    if lic:
        meta.append(f"license: {_yaml_str(lic)}")
    langs = next((_strings(r["languages"]) for r in rows if _strings(r["languages"])), [])
    if langs:
        meta += ["language:"] + [f"- {_yaml_str(x)}" for x in langs]
    meta += ["library_name: gguf", "pipeline_tag: text-generation", "tags:"] + [f"- {_yaml_str(t)}" for t in tags]

    def cell(s) -> str:
        return printable(s, None).replace("|", "\\|")

    out = ["---", *meta, "---", "", f"# {cell(name)} GGUF", ""]
    src = f" of [{bases[0]}](https://huggingface.co/{bases[0]})" if bases else f" of {cell(name)}"
    out += [f"GGUF quantizations{src}: a DiffusionGemma (block-diffusion text model on the Gemma 4 MoE backbone, "
            "GGUF architecture `diffusion-gemma`), made and checked with dgguf.", ""]
    out += ["## Files", "", "| file | type | size | bits/weight |", "|---|---|---|---|"]
    for r in rows:
        parts = f" ({r['parts']} parts)" if r["parts"] > 1 else ""
        out.append(f"| `{cell(r['path'].name)}`{parts} | {cell(r['type'])} | {_size(r['size_bytes'])} | "
                   f"{r['bits_per_weight']:.2f} |")
    if any(r["parts"] > 1 for r in rows):
        out += ["", "Split sets are in llama.cpp's gguf-split layout (`-00001-of-0000N.gguf`): download every part "
                "and open the first."]
    if quality:
        q = quality["rows"]
        r0 = q[0]
        out += ["", "## Quality", "",
                f"Each file against `{cell(Path(quality['ref']).name)}` on the held-out text "
                f"`{cell(Path(quality['text']).name)}` ({r0['tokens']} tokens, {r0['positions']} canvas positions at "
                f"4 noise levels; {quality['prompts']} generation{'s' if quality['prompts'] > 1 else ''}, the "
                "reference taking "
                f"{r0['ref_steps_per_canvas']:.2f} steps per canvas), measured by `dgguf eval`: kl = KL(p_ref ‖ "
                "p_quant) over canvas positions in nats (mean and 99th percentile), top1 = agreement of the two "
                "argmaxes, committed = agreement of the ids generated with the same seed, steps_ratio = denoising "
                "steps per canvas over the reference's, s/step = seconds per denoising step on the machine that "
                "made this card.", "",
                "| file | type | size (MiB) | bits/weight | kl mean | kl p99 | top1 | committed | steps_ratio "
                "| s/step |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r, e in zip(rows, q):
            out.append(f"| `{cell(r['path'].name)}` | {cell(r['type'])} | {r['size_bytes'] / 2**20:.2f} | "
                       f"{r['bits_per_weight']:.2f} | "
                       f"{e['kl_mean']:.2e} | {e['kl_p99']:.2e} | {e['top1']:.4f} | {e['committed']:.4f} | "
                       f"{e['steps_ratio']:.3f} | {e['quant_seconds_per_step']:.4f} |")
    out += ["", "## Use", "", "With dgguf:", "", "```sh",
            f"dgguf run -m {cell(first['path'].name)} -p \"Hello\" -n 64", "```", ""]
    return "\n".join(out)


def run(a) -> None:
    if (a.eval is None) != (a.text is None):
        raise DggufError("--eval REF and --text FILE go together")
    if a.output is not None:
        from dgguf.format.gguf_file import check_output_path
        check_output_path(Path(a.output), a.force, _inputs(a))
    rows = [describe(f) for f in a.files]
    quality = None
    if a.eval is not None:
        quality = {"ref": a.eval, "text": a.text, "prompts": a.prompts, "rows": evaluate_all(a)}
    text = render(rows, quality, a.title, a.base_model)
    if a.output is None:
        sys.stdout.write(text)
        return
    from dgguf.format.manifest import write_text
    write_text(Path(a.output), text, a.force, _inputs(a))
    print(f"wrote {a.output}")


def _inputs(a) -> list[Path]:
    """What the card is made from, which -o must never replace (a split set's every part)."""
    from dgguf.format.split import set_paths
    return [p for f in [*a.files, a.eval, a.text] if f is not None for p in {Path(f), *set_paths(f)}]


def evaluate_all(a) -> list[dict]:
    from dgguf.runtime.model import Model
    from dgguf.runtime.quality import evaluate
    text = read_text(a.text, "--text")
    ref = Model.load(a.eval, threads=a.threads)
    rows = []
    try:
        for path in a.files:
            quant = Model.load(path, threads=a.threads)
            try:
                rows.append(evaluate(ref, quant, text, seed=a.seed, max_tokens=a.max_tokens,
                                     prompts=a.prompts).as_dict())
            finally:
                quant.close()
    finally:
        ref.close()
    return rows


def add_parser(sub) -> None:
    c = sub.add_parser("card", help="a model card (hub README.md) for a set of quants, with quality rows if asked")
    c.add_argument("files", nargs="+", metavar="FILE", help="GGUFs (a split set by its first file)")
    c.add_argument("--eval", default=None, metavar="REF", help="reference GGUF (BF16/F32) to measure each file against")
    c.add_argument("--text", default=None, metavar="FILE", help="held-out UTF-8 text for --eval")
    c.add_argument("--max-tokens", type=positive("--max-tokens"), default=None,
                   help="score only the first N tokens of the text")
    c.add_argument("--prompts", type=positive("--prompts", 1000), default=8, help="generations compared")
    c.add_argument("--seed", type=integer("--seed", 0, 2**32 - 1), default=0)
    c.add_argument("--threads", type=positive("--threads", MAX_THREADS), default=None)
    c.add_argument("--title", default=None, help="the card's title (default: general.name of the first file)")
    c.add_argument("--base-model", action="append", default=None, metavar="ORG/NAME",
                   help="the hub model these are quants of (default: what the GGUF names; repeatable)")
    c.add_argument("-o", "--output", default=None, help="write the card here (atomically) instead of stdout")
    c.add_argument("--force", action="store_true", help="overwrite an existing output file")
    c.set_defaults(func=run)
