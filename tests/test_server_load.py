"""scripts/load_test.py with small numbers: concurrent streaming clients against `dgguf serve` on models/small,
more clients than the queue holds (so 429s come and are retried), every stream checked."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("uvicorn")
from test_server_support import ROOT, convert_small  # noqa: E402


def test_load_test_small(tmp_path):
    model = convert_small(tmp_path)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "load_test.py"), "-m", str(model), "--clients", "6",
                        "--duration", "15", "--warmup", "4", "--queue", "2", "--max-tokens", "40", "--steps", "12",
                        "--threads", "2", "--max-rss-growth", "50", "--json"],
                       capture_output=True, text=True, timeout=600)
    summary = json.loads(r.stdout)
    assert r.returncode == 0, (summary, r.stderr[-2000:])
    assert summary["passed"] and summary["requests_ok"] >= 3
    assert summary["errors"] == summary["malformed_streams"] == summary["nondeterministic"] == 0
    assert summary["server_errors_logged"] == 0
    assert summary["rejected_429"] > 0                  # 6 clients, 1 running + 2 waiting: the rest are turned away
    assert summary["ttft_s"]["p50"] is not None and summary["ttft_s"]["p99"] >= summary["ttft_s"]["p50"]
    rss = summary["rss_mib"]
    assert rss["after_warmup"] > 0 and rss["after_run"] > 0
