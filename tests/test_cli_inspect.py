"""`dgguf inspect`: what a file holds, with names and strings from the file escaped (a key or tensor name cannot
drive the terminal), the file type by name and the tokenizer's source."""
import json

import numpy as np
from gguf.constants import GGUFValueType as V

from dgguf.cli import main
from dgguf.format.gguf_file import Field, GGUFWriter, TensorInfo
from dgguf.format.quant_types import TENSOR_TYPES

from conftest import PR_TINY


def test_published_file_shows_its_type_and_tokenizer(capsys):
    assert main(["inspect", str(PR_TINY / "tiny-Q4_K_M.gguf")]) == 0
    out = capsys.readouterr().out
    assert "file type: Q4_K_M; tokenizer: llama.cpp vocabulary (gemma4 BPE, 512 tokens, 129 merges)" in out
    assert "general.file_type" in out and "15 (Q4_K_M)" in out
    assert main(["inspect", str(PR_TINY / "tiny-Q4_K_M.gguf"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["file_type"] == "Q4_K_M" and d["tokenizer"].startswith("llama.cpp vocabulary")


def test_names_and_strings_from_the_file_are_escaped(tmp_path, capsys):
    p = tmp_path / "evil.gguf"
    fields = {"general.architecture": Field(V.STRING, "diffusion-gemma"),
              "evil\x1b]0;pwned\x07.key": Field(V.STRING, "clear\x1b[2J\r\nscreen"),
              "general.file_type": Field(V.UINT32, 12345)}
    with GGUFWriter(p, fields, [TensorInfo("t\x1b[31mred", (4,), TENSOR_TYPES["F32"])]) as w:
        w.write(np.zeros(4, np.float32))
    assert main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "evil\\x1b]0;pwned\\x07.key" in out and "clear\\x1b[2J\\r\\nscreen" in out and "t\\x1b[31mred" in out
    assert "file type: unknown to dgguf; tokenizer: none" in out
