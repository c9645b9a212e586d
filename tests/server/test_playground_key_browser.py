"""The playground with --api-key as a person uses it, in real Chromium: type the key into the key field (no "Use
key" press), type the question, press Generate, see the bundled model's correct answer; then empty the numeric
settings (meaning "the model's default") and generate again: no error, the server's defaults are used."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from engine.bundled import task

from .serve_process import ServeProcess

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("UNMASK_CHROMIUM", "/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)

KEY = "pg-typed-key-7"


@pytest.fixture(scope="module")
def keyed_server():
    proc = ServeProcess("--api-key", KEY)  # default flags otherwise (dtype auto)
    yield proc
    proc.stop()


def test_typed_key_and_empty_fields_just_work(keyed_server):
    url = keyed_server.url
    (q, a), = task.make_problems(1, seed=9, split="held_out")  # one the model solves
    with sync_api.sync_playwright() as p:
        exe = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(url + "/playground")
            sync_api.expect(page.locator("#key-form")).to_be_visible(timeout=30_000)
            assert page.input_value("#max_tokens") == ""  # no defaults without a key

            page.locator("#api-key").type(KEY)  # typed, never submitted
            page.locator("#message").click()
            page.keyboard.press("Control+A")  # replace the example question
            page.locator("#message").type(q)
            page.locator("#generate").click()
            run = page.locator(".run").last
            sync_api.expect(run).to_have_attribute("data-status", "done", timeout=60_000)
            assert page.locator("#form-error").inner_text() == ""
            assert run.locator(".answer").inner_text().strip() == a, (q, page.input_value("#message"),
                                                                      run.inner_text())
            assert page.locator("#key-form").is_hidden()
            assert page.input_value("#max_tokens") != ""  # the defaults arrived with the working key

            for field in ("max_tokens", "steps", "block_length", "temperature"):
                page.fill(f"#{field}", "")
            page.locator("#generate").click()
            sync_api.expect(page.locator(".run").last).to_have_attribute("data-status", "done", timeout=60_000)
            assert page.locator("#form-error").inner_text() == ""
            answer = page.locator(".run").last.locator(".answer").inner_text()
            assert "max_tokens default" in page.locator(".run").last.locator(".run-settings").inner_text()
            api = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                             json={"messages": [{"role": "user", "content": q}]}).json()
            assert answer == api["choices"][0]["message"]["content"] and answer.strip() == a
            assert problems == []
        finally:
            browser.close()
