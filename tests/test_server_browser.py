"""The page at / in headless Chromium (Debian's package, driven by Playwright): a prompt submitted to a real
server on loopback, the canvas drawn as it denoises, and the committed text equal to the API's for the same
seed. A screenshot is kept in $DGGUF_ARTIFACTS (.ci/run sets it) or the test's temporary directory."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
from test_server_support import LiveServer, convert_small, engine_for  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-dev-shm-usage", "--disable-extensions", "--no-first-run", "--disable-sync",
         "--disable-component-update", "--disable-default-apps", "--mute-audio"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = engine_for(convert_small(tmp_path_factory.mktemp("small")))
    srv = LiveServer(engine, api_key="page-key")
    yield srv
    srv.close()
    engine.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def artifacts(tmp_path) -> Path:
    d = Path(os.environ.get("DGGUF_ARTIFACTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_page_shows_the_canvas_and_the_apis_text(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server.url + "/")
    page.fill("#api_key", "page-key")
    page.fill("#prompt", "def parse(")
    page.fill("#max_tokens", "80")
    page.fill("#seed", "7")
    canvases = []
    page.expose_function("noteCanvas", lambda n: canvases.append(n))
    page.evaluate("""() => new MutationObserver(() => window.noteCanvas(
        document.querySelectorAll('#canvas .tok').length)).observe(document.getElementById('canvas'),
        {childList: true, subtree: true, characterData: true, attributes: true})""")
    page.click("#go")
    page.wait_for_selector("body[data-state=done]", timeout=120_000)
    shown = page.inner_text("#committed")
    committed = page.evaluate("document.getElementById('committed').textContent")
    status = page.inner_text("#status")
    n_committed_cells = page.locator("#canvas .tok.committed").count()
    page.screenshot(path=str(artifacts(tmp_path) / "serve-page.png"), full_page=True)

    api = server.client(api_key="page-key").completions.create(model="x", prompt="def parse(", max_tokens=80,
                                                               seed=7)
    assert committed == api.choices[0].text and committed.strip()
    assert shown.strip() == committed.strip()
    assert status.startswith("done: ") and "tok/s" in status and "steps per canvas" in status
    C = server.engine.model.config.canvas_length
    assert canvases and max(canvases) == C          # the canvas was drawn, one cell per position
    assert n_committed_cells > 0
    assert not errors, errors
    assert all(u.startswith(server.url) for u in requests), requests   # nothing from elsewhere


def test_page_reports_a_wrong_key(server, browser):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.fill("#api_key", "wrong")
    page.click("#go")
    page.wait_for_selector("body[data-state=error]", timeout=30_000)
    assert "401" in page.inner_text("#status")
