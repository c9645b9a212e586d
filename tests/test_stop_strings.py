"""Stop strings: the cut equals a brute-force reference, detection decodes O(blocks + log n) times instead of one
decode per prefix, stop strings without a tokenizer are refused, and streamed text only ever extends (random stop
strings that straddle block boundaries, random block lengths)."""
from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams, SamplingParamsError
from engine.stop_strings import StopStrings, stream_safe


@pytest.fixture(scope="module")
def llm(make_checkpoint):
    return LLM(make_checkpoint("llada"), kv_cache_memory=1 << 22, page_size=8)


def brute_force_cut(ids, stops, tok):
    """The shortest prefix whose text contains a stop; text cut at the first one. Written plainly."""
    text = tok.decode(ids, skip_special_tokens=True)
    hits = [text.find(s) for s in stops if s in text]
    if not hits:
        return ids, text, False
    n = next(n for n in range(1, len(ids) + 1)
             if any(s in tok.decode(ids[:n], skip_special_tokens=True) for s in stops))
    return ids[:n], text[:min(hits)], True


def blockwise_reference(ids, stops, tok, block_length):
    """Generation stops after the first completed block whose committed text holds a stop string (blocks are
    decoded in order, so the committed blocks equal those of a run without stops); the cut is made there."""
    for end in list(range(block_length, len(ids), block_length)) + [len(ids)]:
        out = brute_force_cut(ids[:end], stops, tok)
        if out[2]:
            return out
    return ids, tok.decode(ids, skip_special_tokens=True), False


def stream(llm: LLM, prompt, params: SamplingParams):
    """Every output of one request stepped by the engine with streaming on (no delta can be skipped)."""
    eng = llm.engine
    eng.add_request("s", prompt, llm.resolve_params(params, 1)[0], stream=True)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    return outs


def test_streamed_text_only_extends_and_the_cut_matches_the_reference(llm):
    rng = random.Random(5)
    tok = llm.tokenizer
    cfg = llm.model.config
    checked_hits = 0
    for case in range(10):
        prompt = [t for t in (rng.randrange(cfg.vocab_size) for _ in range(8)) if t not in (cfg.mask_id, *cfg.stop_ids)]
        gen, block = rng.choice([12, 16]), rng.choice([1, 2, 3, 5, 8])
        base = dict(max_tokens=gen, steps=-(-gen // block), block_length=block, ignore_eos=True)
        full = llm.generate([prompt], SamplingParams(**base))[0]
        stops = []
        for _ in range(rng.randint(1, 4)):  # substrings of the text: they hit, often across block boundaries
            a = rng.randrange(max(1, len(full.text) - 1))
            stops.append(full.text[a:a + rng.randint(1, 5)] or "x")
        stops.append("~~~never~~~")
        p = SamplingParams(stop=stops, **base)
        outs = stream(llm, prompt, p)
        final = outs[-1]
        assert final.finished and all(not o.finished for o in outs[:-1])
        ids, text, hit = blockwise_reference(full.token_ids, stops, tok, base["block_length"])
        assert (final.token_ids, final.text, final.finish_reason == "stop") == (ids, text, hit), (case, stops)
        assert llm.generate([prompt], p)[0].text == text
        checked_hits += hit
        texts = [o.text for o in outs]
        for a, b in zip(texts, texts[1:]):
            assert b.startswith(a), (case, stops, texts)  # never retracted
        for o in outs[:-1]:
            assert final.token_ids[:len(o.token_ids)] == o.token_ids
            assert tok.decode(o.token_ids, skip_special_tokens=True) == o.text, (case, stops, o.token_ids, texts)
    assert checked_hits >= 6


def test_a_stop_straddling_a_block_boundary_is_held_back_not_retracted(llm):
    tok = llm.tokenizer
    base = dict(max_tokens=16, steps=16, block_length=1, ignore_eos=True)
    full = llm.generate([[5, 6, 7]], SamplingParams(**base))[0]
    ids = full.token_ids
    # a stop that starts inside token 5's text and ends inside a later token's text
    pre = tok.decode(ids[:5], skip_special_tokens=True)
    stop = full.text[len(pre) - 1:len(pre) + 2]
    outs = stream(llm, [5, 6, 7], SamplingParams(stop=[stop], **base))
    cut = full.text.find(stop)
    assert outs[-1].text == full.text[:cut]
    assert all(o.text == outs[-1].text[:len(o.text)] for o in outs)


def test_stop_detection_decodes_per_block_and_bisects_the_cut(llm, monkeypatch):
    tok = llm.tokenizer
    base = dict(max_tokens=96, steps=12, block_length=16, ignore_eos=True)
    full = llm.generate([[9, 8]], SamplingParams(**base))[0]
    stop = full.text[-6:-3]  # late in the text
    calls = []
    real = tok.decode

    def counting(ids, **kw):
        calls.append(len(ids))
        return real(ids, **kw)

    monkeypatch.setattr(tok, "decode", counting)
    out = llm.generate([[9, 8]], SamplingParams(stop=[stop] * 16, **base))[0]
    monkeypatch.undo()
    assert out.finish_reason == "stop" and out.text == full.text[:full.text.find(stop)]
    # 6 completed blocks: one decode each, then one full decode and ~log2(96) bisection decodes; one decode per
    # prefix (the old rule) would be ~90
    assert len(calls) <= 6 + 1 + 8, calls


def test_stop_strings_need_a_tokenizer(make_checkpoint):
    llm = LLM(make_checkpoint("llada", tokenizer=False), kv_cache_memory=1 << 22, page_size=8)
    with pytest.raises(SamplingParamsError, match="tokenizer") as e:
        llm.generate([[1, 2]], SamplingParams(max_tokens=4, stop=["x"]))
    assert e.value.field == "stop" and not llm.engine.has_unfinished()


def test_stream_safe_holds_incomplete_characters_and_stop_prefixes():
    stops = StopStrings(("4 3", "abc"))
    assert stream_safe(" 1 4", stops) == " 1 "
    assert stream_safe(" 1 4 ", stops) == " 1 "
    assert stream_safe("xxab", stops) == "xx"
    assert stream_safe("xxab\ufffd", stops) == "xx"
    assert stream_safe("caf\ufffd", None) == "caf"
    assert stream_safe("x4 3y", stops) == "x4 3y"  # a whole stop is the finder's business, not held
    assert stops.find("zz4 3", searched=2) == 2 and stops.find("zz4 3y", searched=4) == 2  # ends past searched
    assert stops.find("4 3zzzzz", searched=6) == -1  # already searched up to where no new match can start
