"""Engine faults through the app (in-process, real engine on the bundled model), injected by the hooks in
tests/server/faults.py:
- an exception inside one model step fails exactly the requests of that step (a shaped 500, or an SSE error
  event then [DONE] for a stream); requests waiting outside that step finish with the same answer as the offline
  LLM; every KV page returns; the loop keeps serving;
- a dead engine loop: in-flight requests end with an error (no hang), /health is 503, new requests are 503."""
from __future__ import annotations

import asyncio
import threading

import pytest

from engine import LLM, SamplingParams
from engine.bundled import DEFAULT_MODEL_DIR, task
from server.app import build_app
from server.config import ServerConfig
from server.engine_client import LocalEngineClient

from .faults import loop_killer, step_fault
from .helpers import assert_error, client, parse_sse, run, wait_until

DTYPE = "float32"
LONG = {"max_tokens": 256, "steps": 256, "block_length": 8, "ignore_eos": True}


def make_engine(max_num_seqs: int) -> LocalEngineClient:
    return LocalEngineClient.from_model(DEFAULT_MODEL_DIR, dtype=DTYPE, max_num_seqs=max_num_seqs,
                                        kv_cache_memory=1 << 24, page_size=4)


@pytest.fixture(scope="module")
def ref():
    return LLM(DEFAULT_MODEL_DIR, dtype=DTYPE)


def chat(q: str, **kw) -> dict:
    return {"messages": task.messages_for(q), **kw}


def test_step_fault_fails_only_that_steps_requests(ref):
    engine = make_engine(max_num_seqs=2)
    app = build_app(engine, ServerConfig(served_model_names=["tiny"]))
    questions = ["sort 3 1 2", "reverse 4 5 6 7"]

    async def main():
        async with client(app) as c:
            with step_fault(engine) as fault:
                # two long requests fill the running batch (one streamed, one not) ...
                plain = asyncio.create_task(c.post("/v1/chat/completions", json=chat("sort 9 8", **LONG)))
                streamed = asyncio.create_task(c.post("/v1/chat/completions",
                                                      json=chat("sort 7 6", stream=True, **LONG)))
                await wait_until(lambda: engine.stats().running == 2 and engine.stats().steps >= 3)
                # ... two short ones wait behind them
                waiting = [asyncio.create_task(c.post("/v1/chat/completions", json=chat(q))) for q in questions]
                await wait_until(lambda: engine.stats().waiting == 2)
                fault.arm()
                results = await asyncio.gather(plain, streamed, *waiting)
                assert fault.fired.is_set()
                victims = list(fault.victims)
            after = await c.post("/v1/chat/completions", json=chat("reverse 1 2 3"))
            return results, victims, after

    try:
        (plain, streamed, *short), victims, after = run(main(), timeout=300)
        stats = engine.stats()
    finally:
        run(engine.shutdown())
    assert len(victims) == 2  # the two long requests were the step's batch
    err = assert_error(plain, 500)
    assert "engine" in err["message"] and "injected fault" in err["message"]
    events = parse_sse(streamed.text)
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    assert set(events[-2]) == {"error"} and events[-2]["error"]["code"] == 500
    assert "injected fault" in events[-2]["error"]["message"]
    assert all("finish_reason" not in str(e) or e["choices"][0]["finish_reason"] is None
               for e in events[:-2] if isinstance(e, dict) and e.get("choices"))
    # the waiting requests were not in the step: same answers as the offline engine
    expected = [o.text for o in ref.chat([task.messages_for(q) for q in questions], SamplingParams())]
    assert [r.status_code for r in short] == [200, 200]
    assert [r.json()["choices"][0]["message"]["content"] for r in short] == expected
    assert all(task.check(q, a) for q, a in zip(questions, expected))
    assert after.status_code == 200 and task.check("reverse 1 2 3", after.json()["choices"][0]["message"]["content"])
    assert stats.failed == 2 and stats.kv_pages_used == 0 and stats.running == 0 and stats.waiting == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_engine_loop_ends_in_flight_requests_and_answers_503():
    engine = make_engine(max_num_seqs=4)
    app = build_app(engine, ServerConfig(served_model_names=["tiny"]))

    async def main():
        async with client(app) as c:
            with loop_killer(engine) as kill:
                plain = asyncio.create_task(c.post("/v1/completions", json={"prompt": "sort 1 2", **LONG}))
                streamed = asyncio.create_task(c.post("/v1/completions",
                                                      json={"prompt": "sort 3 4", "stream": True, **LONG}))
                await wait_until(lambda: engine.stats().running == 2)
                kill.arm()
                done = await asyncio.wait_for(asyncio.gather(plain, streamed), 30)  # no hang
            health = await c.get("/health")
            new = await c.post("/v1/completions", json={"prompt": "sort 2 1"})
            new_stream = await c.post("/v1/completions", json={"prompt": "sort 2 1", "stream": True})
            return done, health, new, new_stream

    try:
        (plain, streamed), health, new, new_stream = run(main(), timeout=120)
    finally:
        run(engine.shutdown())
    assert "died" in assert_error(plain, 500)["message"]
    events = parse_sse(streamed.text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 500
    assert health.status_code == 503
    assert_error(new, 503)
    assert_error(new_stream, 503)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_engine_reports_dead_before_its_requests_learn_of_it():
    """Regression: the dying thread fails its requests before it exits; in that window is_running (and so /health)
    said the engine was alive. Here the thread is held alive after delivering the errors."""
    engine = make_engine(max_num_seqs=2)
    eng = engine.engine
    hold, delivered = threading.Event(), threading.Event()
    real_deliver = eng._deliver

    def deliver(items):
        real_deliver(items)
        if eng._dead is not None:
            delivered.set()
            hold.wait(30)

    eng._deliver = deliver

    async def main():
        with loop_killer(engine) as kill:
            stream = engine.add([1, 2, 3], SamplingParams(**LONG), "r0")
            await wait_until(lambda: engine.stats().running == 1)
            kill.arm()
            with pytest.raises(Exception, match="died"):
                async for _ in stream:
                    pass
            assert delivered.wait(30) and eng._thread.is_alive()
            return engine.healthy()

    try:
        assert run(main(), timeout=60) is False
    finally:
        hold.set()
        run(engine.shutdown())
