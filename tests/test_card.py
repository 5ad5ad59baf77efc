"""`dgguf card` (issue 19, item 3): a hub model card for a set of quants of models/small, with the quality rows."""
import json
import re
from pathlib import Path

import pytest
import yaml

from dgguf.cli import main
from dgguf.cli.card import base_models, render

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "models" / "small"


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def quants(tmp_path_factory):
    """models/small as BF16 (the reference), Q8_0 (one file) and Q4_K_M (a 2-part set); a short held-out text."""
    d = tmp_path_factory.mktemp("card")
    for t, extra in (("BF16", []), ("Q8_0", []), ("Q4_K_M", ["--split-max-tensors", "60"])):
        assert main(["convert", str(SMALL), "-o", str(d / f"small-{t}.gguf"), "--type", t, "-q", *extra]) == 0
    (d / "heldout.txt").write_text(Path(json.__file__).read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return d


def front_matter(card: str) -> tuple[dict, str]:
    m = re.match(r"---\n(.*?)\n---\n(.*)", card, flags=re.S)
    assert m, card[:200]
    return yaml.safe_load(m.group(1)), m.group(2)


def table(body: str, header: str) -> list[list[str]]:
    lines = body.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_card_with_quality_rows(capsys, quants):
    files = [quants / "small-Q8_0.gguf", quants / "small-Q4_K_M-00001-of-00002.gguf"]
    common = ["--text", quants / "heldout.txt", "--max-tokens", "64", "--prompts", "1", "--threads", "2"]
    out_md = quants / "README.md"
    code, out, err = cli(capsys, "card", *files, "--eval", quants / "small-BF16.gguf", *common, "-o", out_md)
    assert code == 0, err
    assert out.strip() == f"wrote {out_md}"
    meta, body = front_matter(out_md.read_text(encoding="utf-8"))
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "gguf"
    assert {"gguf", "diffusion-gemma"} <= set(meta["tags"])
    assert "base_model" not in meta                 # the files name none
    assert body.lstrip().startswith("# Small GGUF")

    rows = table(body, "| file | type | size | bits/weight |")
    assert [r[:2] for r in rows] == [["`small-Q8_0.gguf`", "Q8_0"],
                                     ["`small-Q4_K_M-00001-of-00002.gguf` (2 parts)", "Q4_K_M"]]
    parts = [[files[0]], sorted(quants.glob("small-Q4_K_M-*-of-00002.gguf"))]
    for r, ps in zip(rows, parts):
        assert r[2] == f"{sum(p.stat().st_size for p in ps) / 2**20:.2f} MiB"

    quality = table(body, "| file | type | size (MiB) |")
    assert len(quality) == 2
    for r, f, ps in zip(quality, files, parts):
        code, out, err = cli(capsys, "eval", "-m", f, "--ref", quants / "small-BF16.gguf", *common, "--json")
        assert code == 0, err
        e = json.loads(out)
        assert r[2] == f"{sum(p.stat().st_size for p in ps) / 2**20:.2f}"
        assert r[3] == f"{e['bits_per_weight']:.2f}"
        assert r[4:9] == [f"{e['kl_mean']:.2e}", f"{e['kl_p99']:.2e}", f"{e['top1']:.4f}", f"{e['committed']:.4f}",
                          f"{e['steps_ratio']:.3f}"]
    assert "| Q4_K_M |" in body and f"({json.loads(out)['tokens']} tokens" in body
    assert float(quality[0][4]) < float(quality[1][4])        # Q8_0 is closer to the reference than Q4_K_M


def test_card_without_eval_to_stdout(capsys, quants):
    code, out, err = cli(capsys, "card", quants / "small-BF16.gguf", "--base-model", "google/diffusiongemma-26b-a4b",
                         "--title", "DiffusionGemma | 26B")
    assert code == 0, err
    meta, body = front_matter(out)
    assert meta["base_model"] == ["google/diffusiongemma-26b-a4b"] and meta["base_model_relation"] == "quantized"
    assert "## Quality" not in body and "# DiffusionGemma \\| 26B GGUF" in body
    assert table(body, "| file | type |")[0][1] == "BF16"


def test_base_model_from_the_gguf_keys():
    class G(dict):
        def get(self, k, default=None):
            return super().get(k, default)
    assert base_models(G({"general.source.huggingface.repository": "org/model"})) == ["org/model"]
    assert base_models(G({"general.base_model.count": 2, "general.base_model.0.repo_url": "https://huggingface.co/a/b",
                          "general.base_model.1.repo_url": "https://example.com/c/d"})) == ["a/b"]
    assert base_models(G({})) == []
    row = {"path": Path("x.gguf"), "parts": 1, "type": "Q8_0", "size_bytes": 2**20, "bits_per_weight": 8.5,
           "name": "X", "license": "apache-2.0", "tags": ["code", 3], "languages": ["en"], "base_models": ["a/b"]}
    meta, _ = front_matter(render([row]))
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"] and meta["base_model"] == ["a/b"]
    assert "code" in meta["tags"]


def test_card_errors(capsys, quants, tmp_path):
    for argv in (["--eval", quants / "small-BF16.gguf"], ["--text", quants / "heldout.txt"]):
        code, _, err = cli(capsys, "card", quants / "small-Q8_0.gguf", *argv)
        assert code == 2 and err.strip() == "error: --eval REF and --text FILE go together"
    (tmp_path / "README.md").write_text("keep")
    code, _, err = cli(capsys, "card", quants / "small-Q8_0.gguf", "-o", tmp_path / "README.md")
    assert code == 2 and "--force" in err and (tmp_path / "README.md").read_text() == "keep"
    code, _, err = cli(capsys, "card", quants / "small-Q8_0.gguf", "-o", quants / "small-Q8_0.gguf", "--force")
    assert code == 2 and "input file" in err
    code, _, err = cli(capsys, "card", tmp_path / "missing.gguf")
    assert code == 2 and "missing.gguf" in err and len(err.strip().splitlines()) == 1
