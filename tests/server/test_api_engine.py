"""The app in-process (httpx ASGITransport) over the real engine serving the bundled model. Reference: the offline
`LLM` API on the same checkpoint and dtype (chat template, tokenization, sampling are its own path)."""
from __future__ import annotations

import asyncio
import random

import pytest

from engine import LLM, SamplingParams
from engine.bundled import DEFAULT_MODEL_DIR, task
from server.app import build_app
from server.config import ServerConfig
from server.engine_client import LocalEngineClient

from .helpers import assert_error, call_and_leave, client, local_engine, parse_sse, run

DTYPE = "float32"


@pytest.fixture(scope="module")
def engine():
    with local_engine(DEFAULT_MODEL_DIR, dtype=DTYPE, max_num_seqs=16, kv_cache_memory=1 << 24) as eng:
        yield eng


@pytest.fixture(scope="module")
def app(engine):
    return build_app(engine, ServerConfig(served_model_names=["tiny", "alias"]))


@pytest.fixture(scope="module")
def ref():
    return LLM(DEFAULT_MODEL_DIR, dtype=DTYPE)


OPTIONS = [{}, {"block_length": 4}, {"cache": "dual", "threshold": 0.9, "block_length": 8},
           {"steps": 8, "remasking": "margin"}, {"cache": "prefix", "block_length": 4, "steps": 8},
           {"temperature": 0.7, "seed": 123, "top_k": 5}]


def _params(opts: dict, max_tokens: int | None = None) -> SamplingParams:
    return SamplingParams(**opts, **({"max_tokens": max_tokens} if max_tokens else {}))


def test_chat_equals_offline_llm_for_each_option_set(app, ref):
    problems = task.make_problems(len(OPTIONS), seed=77, split="held_out")

    async def main():
        async with client(app) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json={
                "model": "tiny", "messages": task.messages_for(q), **opts}) for (q, _), opts in zip(problems, OPTIONS)))

    resps = run(main())
    for (q, _), opts, r in zip(problems, OPTIONS, resps):
        assert r.status_code == 200, r.text
        body = r.json()
        exp = ref.chat(task.messages_for(q), _params(opts))[0]
        choice = body["choices"][0]
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "tiny"
        assert choice["message"] == {"role": "assistant", "content": exp.text}
        assert choice["finish_reason"] == exp.finish_reason
        prompt_ids = ref.tokenizer.apply_chat_template(task.messages_for(q), add_generation_prompt=True, tokenize=True)
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
            prompt_ids = prompt_ids["input_ids"]
        assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": len(exp.token_ids),
                                 "total_tokens": len(prompt_ids) + len(exp.token_ids)}
        assert body["diffusion"]["steps"] == exp.steps and body["diffusion"]["forward_passes"] == exp.forward_passes
    assert sum(task.check(q, r.json()["choices"][0]["message"]["content"]) for (q, _), r in zip(problems, resps)) >= 5


def test_completion_prompt_forms_and_n(app, ref):
    tok = ref.tokenizer
    ids = tok.encode("sort 4 2")

    async def main():
        async with client(app) as c:
            return await asyncio.gather(
                c.post("/v1/completions", json={"prompt": "reverse 1 2", "max_tokens": 6}),
                c.post("/v1/completions", json={"prompt": ["sort 3 1", "sort 9 8 7"], "n": 2, "max_tokens": 5}),
                c.post("/v1/completions", json={"prompt": ids, "max_tokens": 4, "block_length": 2}),
                c.post("/v1/completions", json={"prompt": [ids, ids[:3]], "max_tokens": 4}))

    single, multi, token_ids, token_lists = run(main())
    exp = ref.generate("reverse 1 2", SamplingParams(max_tokens=6))[0]
    assert single.json()["choices"][0]["text"] == exp.text and single.json()["object"] == "text_completion"
    choices = multi.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    exp2 = ref.generate(["sort 3 1", "sort 9 8 7"], SamplingParams(max_tokens=5))
    assert [c["text"] for c in choices] == [exp2[0].text] * 2 + [exp2[1].text] * 2  # greedy: n copies
    assert multi.json()["usage"]["prompt_tokens"] == len(tok.encode("sort 3 1")) + len(tok.encode("sort 9 8 7"))
    assert token_ids.json()["choices"][0]["text"] == ref.generate(ids, SamplingParams(max_tokens=4,
                                                                                    block_length=2))[0].text
    exp4 = ref.generate([ids, ids[:3]], SamplingParams(max_tokens=4))
    assert [c["text"] for c in token_lists.json()["choices"]] == [e.text for e in exp4]


def test_n_choices_use_derived_seeds(app):
    body = {"prompt": "sort 5 5 1 0", "max_tokens": 12, "temperature": 1.5, "seed": 41, "n": 3}

    async def main():
        async with client(app) as c:
            many = await c.post("/v1/completions", json=body)
            singles = [await c.post("/v1/completions", json={**body, "n": 1, "seed": 41 + i}) for i in range(3)]
            return many, singles

    many, singles = run(main())
    texts = [c["text"] for c in many.json()["choices"]]
    assert texts == [s.json()["choices"][0]["text"] for s in singles]
    assert len(set(texts)) > 1


def test_chat_stream_one_delta_per_block_and_usage(app):
    q = "reverse 1 2 3 4 5 6 7 8"
    base = {"messages": task.messages_for(q), "block_length": 4, "max_tokens": 16}

    async def main():
        async with client(app) as c:
            plain = await c.post("/v1/chat/completions", json=base)
            streamed = await c.post("/v1/chat/completions", json={**base, "stream": True,
                                                                   "stream_options": {"include_usage": True}})
            return plain, streamed

    plain, streamed = run(main())
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(streamed.text)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:]]
    assert "".join(deltas) == plain.json()["choices"][0]["message"]["content"] == task.solve(q)
    assert 2 <= len([d for d in deltas if d]) <= 4  # one delta per finished block of 4 (16 tokens)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert usage["choices"] == [] and usage["usage"] == plain.json()["usage"]


def test_completion_stream_n2_merges_choices(app):
    body = {"prompt": "sort 3 1 2", "max_tokens": 8, "block_length": 2, "n": 2, "temperature": 1.0, "seed": 7,
            "ignore_eos": True}

    async def main():
        async with client(app) as c:
            plain = await c.post("/v1/completions", json=body)
            streamed = await c.post("/v1/completions", json={**body, "stream": True})
            return plain, streamed

    plain, streamed = run(main())
    events = parse_sse(streamed.text)
    assert events[-1] == "[DONE]" and all(e == "[DONE]" or e["object"] == "text_completion" for e in events)
    texts, finish = {0: "", 1: ""}, {}
    for e in events[:-1]:
        (ch,) = e["choices"]
        texts[ch["index"]] += ch["text"]
        if ch["finish_reason"]:
            finish[ch["index"]] = ch["finish_reason"]
    assert [texts[0], texts[1]] == [c["text"] for c in plain.json()["choices"]]
    assert finish == {0: "length", 1: "length"}
    assert not any("usage" in e for e in events[:-1])


def test_stop_string_cuts_text(app, ref):
    q = "reverse 1 2 3 4 5"
    msgs = task.messages_for(q)

    async def main():
        async with client(app) as c:
            return await c.post("/v1/chat/completions", json={"messages": msgs, "stop": [" 3", "zz"]})

    r = run(main())
    exp = ref.chat(msgs, SamplingParams(stop=[" 3", "zz"]))[0]
    assert r.json()["choices"][0]["message"]["content"] == exp.text == "5 4"
    assert r.json()["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/completions", {"prompt": "x", "steps": 0}, 400, "steps"),
    ("/v1/completions", {"prompt": "x", "steps": -3}, 400, "steps"),
    ("/v1/completions", {"prompt": "x", "remasking": "sideways"}, 400, "remasking"),
    ("/v1/completions", {"prompt": "x", "remasking": "origin"}, 400, "remasking"),
    ("/v1/completions", {"prompt": "x", "threshold": 0}, 400, "threshold"),
    ("/v1/completions", {"prompt": "x", "threshold": 1.5}, 400, "threshold"),
    ("/v1/completions", {"prompt": "x", "threshold": 0.5, "factor": 1.0}, 400, "factor"),
    ("/v1/completions", {"prompt": "x", "cache": "full"}, 400, "cache"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "seed": 2 ** 64}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10 ** 6},
     400, "max_completion_tokens"),
    ("/v1/completions", {"prompt": "x " * 600}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 64]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, -1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1], [2, 35]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": {"a": 1}}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ""}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "x", "logprobs": 1}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "nope"}, 404, "model"),
])
def test_bad_requests_are_shaped_errors_naming_the_param(app, path, body, status, param):
    async def main():
        async with client(app) as c:
            return await c.post(path, json=body)

    assert_error(run(main()), status, param)


def test_unknown_fields_ignored_and_alias_model_name(app):
    async def main():
        async with client(app) as c:
            return await c.post("/v1/completions", json={"prompt": "sort 2 1", "model": "alias", "max_tokens": 4,
                                                         "repetition_penalty": 1.1, "logit_bias": {"1": 2}})

    r = run(main())
    assert r.status_code == 200 and r.json()["model"] == "tiny"


def test_protocol_level_errors_are_shaped(app):
    async def main():
        async with client(app) as c:
            return (await c.post("/v1/chat/completions", content=b"{not json",
                                 headers={"content-type": "application/json"}),
                    await c.post("/v1/chat/completions", content=b"[1, 2]",
                                 headers={"content-type": "application/json"}),
                    await c.get("/no/such/path"), await c.get("/v1/chat/completions"),
                    await c.delete("/v1/models"))

    bad_json, not_object, missing, wrong_method, delete = run(main())
    assert "JSON" in assert_error(bad_json, 400)["message"]
    assert_error(not_object, 400)
    assert assert_error(missing, 404)["type"] == "NotFoundError"
    assert_error(wrong_method, 405)
    assert_error(delete, 405)


def test_models_health_version_metrics_and_openapi(app, engine):
    async def main():
        async with client(app) as c:
            await c.post("/v1/chat/completions", json={"messages": task.messages_for("sort 2 1"), "stream": True})
            return [await c.get(p) for p in ("/v1/models", "/health", "/version", "/metrics", "/openapi.json")]

    models, health, version, metrics, openapi = run(main())
    cards = models.json()["data"]
    assert [m["id"] for m in cards] == ["tiny", "alias"] and cards[0]["max_model_len"] == 512
    assert cards[0]["family"] == "llada" and models.json()["object"] == "list"
    assert health.status_code == 200 and version.json()["version"]
    text = metrics.text
    for name in ("unmask:num_requests_running", "unmask:num_requests_waiting", "unmask:kv_cache_usage_perc",
                 "unmask:prompt_tokens_total", "unmask:generation_tokens_total", "unmask:request_success_total",
                 "unmask:time_to_first_token_seconds_bucket", "unmask:e2e_request_latency_seconds_count",
                 "unmask:time_per_output_token_seconds_count", "unmask:tokens_per_forward_bucket",
                 "unmask:denoising_steps_total", "unmask:positions_computed_total", "unmask:tokens_committed_total",
                 "unmask:prefix_cache_queries_total", "unmask:prefix_cache_hits_total"):
        assert f'{name}{{' in text, name
    assert 'model_name="tiny"' in text and 'finished_reason="stop"' in text
    steps = float(next(line.split()[-1] for line in text.splitlines()
                       if line.startswith("unmask:denoising_steps_total")))
    assert steps == engine.stats().steps > 0
    schemas = openapi.json()["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    for field in ("steps", "block_length", "remasking", "threshold", "factor", "cfg_scale", "cache", "top_k",
                  "ignore_eos", "algorithm", "alg_temp", "temperature", "top_p", "seed", "stop", "n", "stream",
                  "max_tokens", "max_completion_tokens", "messages"):
        assert chat[field].get("description"), field
    assert chat["steps"]["anyOf"][0]["minimum"] == 1
    assert chat["threshold"]["anyOf"][0]["exclusiveMinimum"] == 0 and chat["threshold"]["anyOf"][0]["maximum"] == 1
    assert "prompt" in schemas["CompletionRequest"]["properties"]


def test_disconnect_aborts_and_frees_pages_by_next_step(app, engine):
    """A client that leaves (non-streaming, then streaming) has its request aborted; its KV pages are free once
    the engine step running at that moment has ended."""
    body = {"prompt": "sort 1 2 3", "max_tokens": 400, "steps": 400, "block_length": 8, "ignore_eos": True}
    for stream in (False, True):
        before = engine.stats()

        async def main():
            task_ = asyncio.create_task(call_and_leave(app, "/v1/completions", {**body, "stream": stream}, 0.6))
            while engine.stats().kv_pages_used == 0:  # admitted
                await asyncio.sleep(0.01)
            sent = await task_
            at_abort = engine.stats().steps
            while engine.stats().kv_pages_used:
                await asyncio.sleep(0.005)
            return sent, at_abort, engine.stats()

        sent, at_abort, after = run(main())
        assert after.steps <= at_abort + 1 and after.running == 0 and after.kv_pages_used == 0
        assert after.aborted == before.aborted + 1 and after.finished == before.finished
        assert not any(m["type"] == "http.response.body" and b'"finish_reason":"length"' in m.get("body", b"")
                       for m in sent)


@pytest.mark.slow
def test_event_loop_answers_health_while_a_long_batch_runs(app, engine):
    async def main():
        async with client(app) as c:
            long = [asyncio.create_task(c.post("/v1/completions", json={
                "prompt": "sort 1 2", "max_tokens": 128, "steps": 128, "ignore_eos": True, "seed": i,
                "temperature": 1.0})) for i in range(2)]
            while engine.stats().running == 0:
                await asyncio.sleep(0.01)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            health = await c.get("/health")
            metrics = await c.get("/metrics")
            dt = loop.time() - t0
            busy = engine.stats().running
            done = await asyncio.gather(*long)
            return health, metrics, dt, busy, done

    health, metrics, dt, busy, done = run(main())
    assert health.status_code == 200 and metrics.status_code == 200 and busy > 0
    assert all(r.status_code == 200 for r in done)
    print(f"\n/health + /metrics answered in {dt * 1000:.1f} ms during a running batch")


def test_random_option_mixes_never_500(app):
    """Random combinations of valid and invalid option values: every answer is a 200 or a shaped 4xx."""
    rng = random.Random(5)
    values = {"steps": [1, 3, 0, -1, 1000, "x"], "block_length": [1, 2, 5, 64, 0], "threshold": [0.5, 1, 0, 2, None],
              "remasking": ["random", "entropy", "origin", "x"], "cache": ["none", "dual", "prefix", 3],
              "cfg_scale": [0, 1.5, -1], "max_tokens": [1, 7, 16, 0, 600], "temperature": [0, 0.9, -0.1],
              "top_k": [-1, 0, 3, -5], "algorithm": ["llada", "dream", "rnd1", "x"], "alg_temp": [0, 0.5, -1],
              "ignore_eos": [True, False, "yes?"], "factor": [None, 1.0, 0]}

    async def main():
        async with client(app) as c:
            out = []
            for _ in range(24):
                body = {"prompt": "sort 3 2", **{k: rng.choice(v) for k, v in rng.sample(sorted(values.items()), 5)}}
                out.append((body, await c.post("/v1/completions", json=body)))
            return out

    for body, r in run(main(), timeout=300):
        assert r.status_code in (200, 400), (body, r.status_code, r.text)
        if r.status_code == 400:
            err = assert_error(r, 400)
            assert err["param"] in body or err["param"] is None, (body, err)


def test_request_larger_than_the_kv_pool_is_400_max_tokens():
    """A KV pool of 5 pages of 4 tokens: a chat prompt plus 16 tokens can never fit."""
    eng = LocalEngineClient.from_model(DEFAULT_MODEL_DIR, dtype=DTYPE, kv_cache_memory=5 * 4 * 6144, page_size=4)
    try:
        app = build_app(eng, ServerConfig(served_model_names=["tiny"]))

        async def main():
            async with client(app) as c:
                return (await c.post("/v1/chat/completions", json={"messages": task.messages_for("sort 2 1")}),
                        await c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 4}))

        too_big, fits = run(main())
        assert eng.stats().kv_pages_total == 5
        assert "KV pages" in assert_error(too_big, 400, "max_tokens")["message"]
        assert fits.status_code == 200
    finally:
        run(eng.shutdown())


def test_model_without_tokenizer_takes_token_ids_only(make_checkpoint):
    ckpt = make_checkpoint("llada", tokenizer=False, vocab_size=101)
    eng = LocalEngineClient.from_model(ckpt, dtype=DTYPE, kv_cache_memory=1 << 22, page_size=4)
    try:
        app = build_app(eng, ServerConfig(served_model_names=["raw"]))
        ref = LLM(ckpt, dtype=DTYPE).generate([[5, 6, 7]], SamplingParams(max_tokens=6, block_length=3,
                                                                          ignore_eos=True))[0]
        body = {"prompt": [5, 6, 7], "max_tokens": 6, "block_length": 3, "ignore_eos": True}

        async def main():
            async with client(app) as c:
                return (await c.post("/v1/completions", json=body),
                        await c.post("/v1/completions", json={**body, "stream": True}),
                        await c.post("/v1/completions", json={"prompt": "text"}),
                        await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}))

        plain, streamed, text, chat = run(main())
        choice = plain.json()["choices"][0]
        assert choice["text"] == "" and choice["token_ids"] == ref.token_ids
        assert plain.json()["usage"]["completion_tokens"] == 6
        final = [e for e in parse_sse(streamed.text)[:-1] if e["choices"][0]["finish_reason"]]
        assert final[0]["choices"][0]["token_ids"] == ref.token_ids
        assert "token ids" in assert_error(text, 400, "prompt")["message"]
        assert_error(chat, 400, "messages")
    finally:
        run(eng.shutdown())
