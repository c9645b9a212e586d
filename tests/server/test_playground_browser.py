"""The playground in a real browser: Debian's headless Chromium driven by playwright, against a real `unmask serve`.

The page must show the canvas filling in (intermediate states with masked cells), and the bundled model's correct
answer. Set UNMASK_PLAYGROUND_SCREENSHOT=path to also save the mid-generation screenshot used by the README.
"""
from __future__ import annotations

import os
import shutil
import time
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

RECORD_FRAMES = """() => {
  window.__frames = [];
  const canvasOf = () => document.querySelector('.run:last-child .canvas');
  const snap = () => {
    const c = canvasOf();
    if (!c) return;
    const cells = [...c.children].map(x => x.classList.contains('masked') ? null : x.textContent);
    const key = JSON.stringify(cells);
    const last = window.__frames[window.__frames.length - 1];
    if (!last || last.key !== key) window.__frames.push({key, cells});
  };
  new MutationObserver(snap).observe(document.getElementById('runs'),
                                     {subtree: true, childList: true, characterData: true, attributes: true});
}"""


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which("chromium") if not Path(CHROMIUM).exists() else CHROMIUM,
                              headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server():
    proc = ServeProcess("--dtype", "float32")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def keyed_server():
    proc = ServeProcess("--dtype", "float32", "--api-key", "pg-key-123")
    yield proc
    proc.stop()


def _page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    outside: list[str] = []  # requests to other origins, page errors, console errors: all must stay empty
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(url) else None)
    page.on("pageerror", lambda e: outside.append(f"page error: {e}"))
    expected = ("status of 400", "status of 401")  # the refused settings and keys these tests send on purpose
    page.on("console", lambda m: outside.append(f"console {m.type}: {m.text}")
            if m.type == "error" and not any(e in m.text for e in expected) else None)
    return page, outside


def _generate(page, question: str, button: str = "#generate") -> dict:
    """Type the question, generate, wait for the run to finish; returns the recorded canvas states and the answer."""
    page.evaluate(RECORD_FRAMES)
    page.fill("#message", question)
    page.click(button)
    run = page.locator(".run").last
    sync_api.expect(run).to_have_attribute("data-status", "done", timeout=60_000)
    frames = page.evaluate("window.__frames.map(f => f.cells)")
    return {"frames": frames, "answer": run.locator(".answer").text_content(), "run": run}


def _intermediate(frames: list[list]) -> list[list]:
    """Canvas states with some cells committed and some still masked."""
    return [f for f in frames if any(c is None for c in f) and any(c is not None for c in f)]


def test_playground_shows_decoding_live_and_the_answer(browser, server):
    page, outside = _page(browser, server.url)
    page.goto(server.url + "/")
    assert page.url == server.url + "/playground"
    sync_api.expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=30_000)
    assert page.input_value("#max_tokens") == "16" and page.input_value("#steps") == "16"  # the model's defaults
    (q, a), (q2, a2) = task.make_problems(2, seed=5, split="held_out")

    got = _generate(page, q)
    mids = _intermediate(got["frames"])
    assert len(mids) >= 2, got["frames"]
    assert len({str(f) for f in mids}) == len(mids)
    assert sum(c is not None for c in mids[0]) < sum(c is not None for c in mids[-1])  # it fills in
    assert got["answer"].strip() == a, (q, got["answer"])
    run = got["run"]
    assert run.locator(".s-step").inner_text() == "16"

    # replay: step 1 shows the canvas after the first step
    slider = run.locator(".slider")
    assert slider.get_attribute("max") == "16" and not slider.is_disabled()
    slider.evaluate("(s) => { s.value = '1'; s.dispatchEvent(new Event('input')); }")
    assert run.locator(".canvas .cell:not(.masked)").count() >= 1 and run.locator(".canvas .cell.masked").count() >= 8
    assert run.locator(".canvas .cell.in-block").count() == 16
    slider.evaluate("(s) => { s.value = s.max; s.dispatchEvent(new Event('input')); }")
    assert run.locator(".canvas .cell.masked").count() < 16

    # a second run beside the first, with other settings
    page.fill("#steps", "4")
    page.fill("#block_length", "4")
    second = _generate(page, q2, "#compare")
    assert page.locator(".run").count() == 2
    assert page.locator(".run").first.locator(".answer").inner_text().strip() == a
    assert 1 <= int(second["run"].locator(".s-step").inner_text()) <= 4  # one step per block of 4; EOS may end early
    assert "steps 4" in second["run"].locator(".run-settings").inner_text()
    page.locator(".run").last.locator(".close").click()
    assert page.locator(".run").count() == 1

    # Stop ends a long run: the page says so and the server aborts the request
    page.fill("#max_tokens", "480")
    page.fill("#steps", "480")
    page.fill("#block_length", "480")
    page.click("#compare")
    long_run = page.locator(".run").last
    page.wait_for_function("() => Number(document.querySelector('.run:last-child').dataset.frame || 0) >= 2",
                           timeout=60_000)
    page.click("#stop")
    sync_api.expect(long_run).to_have_attribute("data-status", "stopped", timeout=30_000)
    assert int(long_run.get_attribute("data-frame")) < 480
    for _ in range(100):  # the server notices the closed connection and aborts the request
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
        if 'finished_reason="abort"' in metrics:
            break
        time.sleep(0.1)
    assert 'finished_reason="abort"' in metrics, metrics
    long_run.locator(".close").click()
    page.fill("#max_tokens", "16")
    page.fill("#block_length", "16")
    page.fill("#steps", "16")

    # a setting the model cannot take: the server's 400 shows in the run, the page stays usable
    page.select_option("#remasking", "origin")
    page.fill("#message", q)
    page.click("#compare")
    bad = page.locator(".run").last
    sync_api.expect(bad).to_have_attribute("data-status", "error", timeout=30_000)
    sync_api.expect(bad.locator(".run-error")).to_contain_text("400")
    sync_api.expect(bad.locator(".run-error")).to_contain_text("remasking")
    bad.locator(".close").click()
    page.select_option("#remasking", "low_confidence")
    shot = os.environ.get("UNMASK_PLAYGROUND_SCREENSHOT")
    if shot:  # mid-generation screenshot for the README, in slow motion so the canvas is caught half-filled
        page.fill("#steps", "16")
        page.fill("#block_length", "8")
        page.select_option("#playback", "500")
        page.fill("#message", "sort 9 3 7 1 8 2")
        page.click("#compare")
        run = page.locator(".run").last
        page.wait_for_function("() => { const c = document.querySelector('.run:last-child .canvas');"
                               " return c && c.querySelectorAll('.cell:not(.masked)').length >= 6; }",
                               timeout=60_000)
        box = page.locator("#runs").bounding_box()
        page.screenshot(path=shot, clip={"x": 0, "y": 0, "width": 1280, "height": box["y"] + box["height"] + 12})
        sync_api.expect(run).to_have_attribute("data-status", "done", timeout=60_000)
        assert run.locator(".answer").inner_text().strip() == "1 2 3 7 8 9"
    assert outside == [], outside
    page.close()


def test_playground_asks_for_the_api_key(browser, keyed_server):
    url = keyed_server.url
    page, outside = _page(browser, url)
    page.goto(url + "/playground")
    sync_api.expect(page.locator("#key-form")).to_be_visible(timeout=30_000)
    page.fill("#api-key", "wrong")
    page.click("#key-submit")
    sync_api.expect(page.locator("#key-error")).to_contain_text("refused", timeout=30_000)
    page.fill("#api-key", "pg-key-123")
    page.click("#key-submit")
    sync_api.expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=30_000)
    assert page.locator("#key-form").is_hidden()
    (q, a), = task.make_problems(1, seed=9, split="held_out")
    got = _generate(page, q)
    assert len(_intermediate(got["frames"])) >= 2
    assert got["answer"].strip() == a

    # raw prompt: /v1/completions, the same text as the API gives for the same settings
    page.check("#raw")
    raw = _generate(page, "sort 2 1")
    assert len(raw["frames"]) >= 2 and "raw prompt" in raw["run"].locator(".run-settings").inner_text()
    api = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer pg-key-123"}, timeout=60,
                     json={"prompt": "sort 2 1", "max_tokens": 16, "steps": 16, "block_length": 16}).json()
    assert raw["answer"] == api["choices"][0]["text"]
    assert outside == []
    page.close()


def test_api_docs_render_offline_with_every_operation(browser, keyed_server):
    """/docs is Swagger UI from the installed swagger-ui-bundle-v2 files: it renders every operation of
    /openapi.json (the diffusion fields included) with no request outside the server, even with an API key set."""
    page, outside = _page(browser, keyed_server.url)
    page.goto(keyed_server.url + "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=30_000)
    paths = set(page.locator(".opblock-summary-path").all_inner_texts())
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= paths
    schemas = page.locator("section.models").inner_text(timeout=30_000)  # the request schemas' names
    assert "ChatCompletionRequest" in schemas and "CompletionRequest" in schemas
    model = page.locator("section.models article.json-schema-2020-12").filter(
        has=page.locator(".json-schema-2020-12__title", has_text="ChatCompletionRequest")).first
    model.locator(".json-schema-2020-12-expand-deep-button").first.click()  # its fields: the diffusion options too
    page.wait_for_timeout(500)
    fields = model.inner_text(timeout=30_000)
    assert all(f in fields for f in ("steps", "block_length", "remasking", "threshold", "cache", "cfg_scale")), fields
    assert outside == []
    page.close()


def test_playground_output_constraint_box(browser, server):
    """The constraint box sends structured_outputs: a regex keeps the bundled model's answer, a JSON schema gives
    valid JSON, and an invalid regex shows the server's 400 naming the field."""
    import json

    import jsonschema

    page, outside = _page(browser, server.url)
    page.goto(server.url + "/playground")
    sync_api.expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=30_000)
    assert page.locator("#constraint").is_disabled()
    (q, a), = task.make_problems(1, seed=21, split="held_out")
    page.select_option("#constraint-kind", "regex")
    page.fill("#constraint", "[0-9]( [0-9]){1,7}")
    got = _generate(page, q)
    assert got["answer"].strip() == a and "constrained: regex" in got["run"].locator(".run-settings").inner_text()

    schema = {"type": "integer", "minimum": 10, "maximum": 99}  # JSON this vocabulary (digits) can spell
    page.select_option("#constraint-kind", "json")
    page.fill("#constraint", json.dumps(schema))
    got = _generate(page, q, "#compare")
    jsonschema.validate(json.loads(got["answer"]), schema)

    page.select_option("#constraint-kind", "regex")
    page.fill("#constraint", "(unclosed")
    page.click("#compare")
    bad = page.locator(".run").last
    sync_api.expect(bad).to_have_attribute("data-status", "error", timeout=30_000)
    sync_api.expect(bad.locator(".run-error")).to_contain_text("structured_outputs.regex")
    assert outside == [], outside
    page.close()
