"""The playground in a real browser (Debian's headless Chromium via playwright) against `unmask serve` on a tiny
random LLaDA2 (`llada2_moe`, block diffusion) checkpoint, used as a person would: the page fills in the family's
defaults (steps left to the model: "32 per block"), the person types a message, sets a short generation and blocks
of 4, presses Generate and sees the canvas fill in block by block and the answer, which is the engine's own
LLM.chat answer for the same settings; the replay slider's last frame is that answer's tokens."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.conftest import FAMILY_DIMS

from .serve_process import ServeProcess
from .test_playground_browser import CHROMIUM, _intermediate, _page, browser, sync_api  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

MESSAGE = "What is 12 + 30?"


@pytest.fixture(scope="module")
def path(make_checkpoint):
    return make_checkpoint("llada2_moe", **FAMILY_DIMS["llada2_moe"])


@pytest.fixture(scope="module")
def server(path):
    proc = ServeProcess("--model", str(path), "--served-model-name", "l2")
    yield proc
    proc.stop()


RECORD = """() => {
  window.__frames = [];
  const snap = () => {
    const c = document.querySelector('.run:last-child .canvas');
    if (!c) return;
    const cells = [...c.children].map(x => x.classList.contains('masked') ? null : x.textContent);
    const key = JSON.stringify(cells);
    const last = window.__frames[window.__frames.length - 1];
    if (!last || last.key !== key) window.__frames.push({key, cells});
  };
  new MutationObserver(snap).observe(document.getElementById('runs'),
                                     {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def test_playground_generates_the_llm_answer_block_by_block(browser, server, path):  # noqa: F811
    page, outside = _page(browser, server.url)
    page.goto(server.url + "/playground")
    sync_api.expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=30_000)
    # the family's defaults: 2048 tokens in blocks of 32, threshold 0.95, the exact block cache; steps per block
    assert page.input_value("#max_tokens") == "2048" and page.input_value("#block_length") == "32"
    assert page.input_value("#steps") == "" and page.get_attribute("#steps", "placeholder") == "32 per block"
    assert page.input_value("#cache") == "block" and page.input_value("#threshold") == "0.95"

    page.fill("#max_tokens", "14")
    page.fill("#block_length", "4")
    page.fill("#threshold", "0.5")
    page.evaluate(RECORD)
    page.fill("#message", MESSAGE)
    page.click("#generate")
    run = page.locator(".run").last
    sync_api.expect(run).to_have_attribute("data-status", "done", timeout=60_000)
    frames = page.evaluate("window.__frames.map(f => f.cells)")

    llm = LLM(path)  # dtype auto, as the server
    want = llm.chat([{"role": "user", "content": MESSAGE}],
                    SamplingParams(max_tokens=14, block_length=4, threshold=0.5, temperature=0.0, cache="block"))[0]
    assert run.locator(".answer").text_content() == want.text
    assert run.locator(".s-step").inner_text() == str(want.steps)
    assert run.locator(".canvas .cell").count() == 14
    mids = _intermediate(frames)
    assert len(mids) >= 3, frames  # it fills in over several steps
    filled = [sum(c is not None for c in f) for f in mids]
    assert filled == sorted(filled) and filled[0] < filled[-1]
    # block by block: a step never commits past the block being denoised, so a masked cell never lies left of a
    # cell committed in a later block (blocks of 4 after the prompt's tail block)
    for f in mids:
        last = max(i for i, c in enumerate(f) if c is not None)
        first_masked = min(i for i, c in enumerate(f) if c is None)
        assert last < first_masked + 4, f
    # replay: the last frame is the answer's tokens, the first step shows the start of the first block only
    slider = run.locator(".slider")
    assert slider.get_attribute("max") == str(want.steps)
    slider.evaluate("(s) => { s.value = '1'; s.dispatchEvent(new Event('input')); }")
    assert 1 <= run.locator(".canvas .cell:not(.masked)").count() <= 4
    slider.evaluate("(s) => { s.value = s.max; s.dispatchEvent(new Event('input')); }")
    assert run.locator(".canvas .cell.masked").count() == 0
    assert outside == [], outside
    page.close()


@pytest.fixture(scope="module")
def editing_server(path):
    """A LLaDA2.1-style deployment: token editing on by default for every request."""
    proc = ServeProcess("--model", str(path), "--served-model-name", "l2", "--editing-threshold", "0.05",
                        "--max-post-steps", "2")
    yield proc
    proc.stop()


def test_playground_shows_token_edits(browser, editing_server, path):  # noqa: F811
    """With token editing the canvas shows the edits: the last frame holds the answer's tokens (edited cells
    marked), not just the first commit of each position."""
    page, outside = _page(browser, editing_server.url)
    page.goto(editing_server.url + "/playground")
    sync_api.expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=30_000)
    page.fill("#max_tokens", "12")
    page.fill("#block_length", "4")
    page.fill("#threshold", "0.5")
    page.fill("#message", MESSAGE)
    page.click("#generate")
    run = page.locator(".run").last
    sync_api.expect(run).to_have_attribute("data-status", "done", timeout=60_000)
    want = LLM(path).chat([{"role": "user", "content": MESSAGE}],
                          SamplingParams(max_tokens=12, block_length=4, threshold=0.5, temperature=0.0,
                                         editing_threshold=0.05, max_post_steps=2))[0]
    assert run.locator(".answer").text_content() == want.text
    titles = run.locator(".canvas .cell").evaluate_all("(cs) => cs.map(c => c.title)")
    shown = [int(t.split(" · token ")[1].split(" ")[0]) for t in titles[:len(want.token_ids)]]
    assert shown == want.token_ids
    assert run.locator(".canvas .cell.edited").count() >= 1
    # step 1 shows the first commit, before any edit
    run.locator(".slider").evaluate("(s) => { s.value = '1'; s.dispatchEvent(new Event('input')); }")
    assert run.locator(".canvas .cell.edited").count() == 0
    assert outside == [], outside
    page.close()
