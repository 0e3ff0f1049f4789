"""The page at ``/`` in a real browser: Debian's Chromium (``/usr/bin/chromium``) driven by Playwright
through ``executable_path`` (no Playwright browser download). Types a query, waits for the three result
columns (R4T-Diffusion, dense, MMR) and checks each holds k distinct items.

Skips with the reason where Chromium or Playwright is missing, unless ``R4T_REQUIRE_BROWSER=1`` (set by
``scripts/test.sh`` when it runs as root, after ``scripts/setup.sh`` installed the package): then it fails.
``R4T_SCREENSHOT=PATH`` saves a screenshot of the page there; ``R4T_SERVE_MODEL=DIR`` serves that retriever
instead of the tiny one (how ``benchmarks/results/serve/page.png`` was made: see its README).
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("R4T_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _require(ok: bool, reason: str) -> None:
    if not ok:
        if os.environ.get("R4T_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason} (R4T_REQUIRE_BROWSER=1: the browser test must run)")
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread (for the browser and the load test)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def check_page(url: str, query: str, k: int, screenshot: str | None = None) -> dict[str, list[str]]:
    """Open the page, type ``query``, set k, submit, wait for three columns of k items; returns the ids
    per column (and saves a screenshot when asked)."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        # an empty profile directory (Playwright passes it as --user-data-dir)
        browser = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 720},
        )
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            page.goto(url, wait_until="load")
            page.wait_for_function("document.querySelector('#info').textContent.includes('items')")
            page.fill("#k", str(k))
            page.fill("#q", query)
            page.press("#q", "Enter")
            page.wait_for_function("document.body.dataset.state === 'done'", timeout=30_000)
            out = {}
            for method in ("r4t", "dense", "mmr"):
                col = page.locator(f'.col[data-method="{method}"]')
                out[method] = col.locator("li").evaluate_all("els => els.map(e => e.dataset.id || '')")
                assert "ms" in col.locator(".lat").inner_text()
            if screenshot:
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=screenshot, full_page=True)
            return out
        finally:
            browser.close()


def test_page_shows_three_columns_of_k_distinct_items(tmp_path) -> None:
    _require(Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK), f"no Chromium at {CHROMIUM}")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _require(False, "playwright (the Python package) is not installed: pip install '.[browser]'")
    try:
        import uvicorn  # noqa: F401

        from r4t_fast.serve.app import create_app
        from r4t_fast.serve.state import ServeState
    except ImportError:
        _require(False, "the serve extra is not installed: pip install '.[serve]'")
    from serve_helpers import tiny_retriever

    model = os.environ.get("R4T_SERVE_MODEL")  # a real retriever dir for the committed screenshot
    if model:
        from r4t_fast.diffusion.retriever import Retriever

        state, query, k = (
            ServeState(Retriever.from_pretrained(model), model_path=model),
            "summer beach outfit",
            10,
        )
    else:
        state, query, k = ServeState(tiny_retriever()), "red shirt", 5
    with LiveServer(create_app(state)) as srv:
        cols = check_page(srv.url, query, k, os.environ.get("R4T_SCREENSHOT"))
    assert set(cols) == {"r4t", "dense", "mmr"}
    for method, ids in cols.items():
        assert len(ids) == k and len(set(ids)) == k and all(ids), (method, ids)
    assert cols["dense"] != cols["mmr"] or cols["dense"] != cols["r4t"]  # three methods, not one copied
