"""AsyncEngine: block-by-block streaming, continuous batching equal to running alone, abort, a responsive event
loop, immediate errors, engine failures and shutdown. Tiny random checkpoint; asyncio.run in plain tests."""
from __future__ import annotations

import asyncio
import os
import random
import time

import pytest

from engine import LLM, RequestTooLargeError, SamplingParams, SamplingParamsError
from engine.async_engine import AsyncEngine, EngineError


@pytest.fixture(scope="module")
def llm(make_checkpoint):
    return LLM(make_checkpoint("llada"), dtype="float32", kv_cache_memory=1 << 22, page_size=4)


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def prompt(rng: random.Random, llm: LLM, n: int) -> list[int]:
    cfg = llm.model.config
    banned = {cfg.mask_id, *cfg.stop_ids}
    return [t for t in (rng.randrange(cfg.vocab_size) for _ in range(3 * n)) if t not in banned][:n]


def same_output(a, b) -> None:
    assert (a.token_ids, a.text, a.finish_reason, a.stats, a.prompt_token_ids, a.prompt, a.finished) == \
           (b.token_ids, b.text, b.finish_reason, b.stats, b.prompt_token_ids, b.prompt, b.finished)


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_stream_yields_one_delta_per_block_then_the_generate_output(llm, cache):
    p = SamplingParams(max_tokens=16, block_length=4, steps=16, cache=cache, ignore_eos=True)
    expected = llm.generate(["hello there", [5, 6, 7]], p)

    async def main():
        async with AsyncEngine(llm) as eng:
            streams = []
            for pr in ("hello there", [5, 6, 7]):
                streams.append([o async for o in eng.add_request(pr, p)])
            return streams

    for outs, exp in zip(run(main()), expected):
        # a consumer slower than the engine sees only the latest cumulative output, so some deltas may be skipped
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert [len(o.token_ids) for o in outs[:-1]] == sorted({len(o.token_ids) for o in outs[:-1]} & {4, 8, 12})
        assert all(o.finish_reason is None and exp.token_ids[:len(o.token_ids)] == o.token_ids for o in outs[:-1])
        assert all(o.stats.steps == len(o.token_ids) for o in outs[:-1])  # a snapshot, not the live counters
        same_output(outs[-1], exp)
    eng = llm.engine  # requests added as LLM.generate adds them still get their final output only (no deltas)
    eng.add_request("after-async", [5, 6, 7], llm.resolve_params(p, 1)[0])
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert [o.finished for o in outs] == [True]


def test_concurrent_requests_with_mixed_params_equal_running_alone(llm):
    rng = random.Random(7)
    params = [
        SamplingParams(max_tokens=16, block_length=4, steps=16, ignore_eos=True),
        SamplingParams(max_tokens=12, block_length=3, steps=6, remasking="margin", ignore_eos=True),
        SamplingParams(max_tokens=20, block_length=5, steps=20, cache="prefix", ignore_eos=True),
        SamplingParams(max_tokens=16, block_length=8, threshold=0.2, cache="dual", ignore_eos=True),
        SamplingParams(max_tokens=10, block_length=4, steps=10, temperature=0.9, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=8, block_length=8, steps=4, remasking="entropy", cfg_scale=1.5),
        SamplingParams(max_tokens=24, block_length=6, steps=12, remasking="random", seed=11, cache="dual"),
        SamplingParams(max_tokens=12, block_length=4, factor=1.0, cache="prefix", ignore_eos=True),
        SamplingParams(max_tokens=9, steps=9, temperature=0.5, top_k=5, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=16, block_length=4, steps=8, temperature=1.0, top_p=0.8, seed=9, cache="dual"),
    ]
    prompts = [prompt(rng, llm, rng.randint(1, 30)) for _ in params]
    alone = [llm.generate([pr], p)[0] for pr, p in zip(prompts, params)]

    async def main():
        async with AsyncEngine.from_model(llm.model.path, dtype="float32", kv_cache_memory=1 << 22, page_size=4,
                                          max_num_seqs=4) as eng:
            tasks = []
            for pr, p in zip(prompts, params):  # staggered arrivals: requests join a batch already running
                tasks.append(asyncio.create_task(eng.generate(pr, p)))
                await asyncio.sleep(0.002)
            outs = await asyncio.gather(*tasks)
            return outs, eng.stats

    outs, stats = run(main())
    for out, exp in zip(outs, alone):
        same_output(out, exp)
    assert stats.finished == len(params) and stats.running == stats.waiting == stats.kv_pages_used == 0
    assert stats.tokens_committed == sum(o.stats.tokens_committed for o in outs)
    assert stats.positions_computed == sum(o.stats.positions_computed for o in outs)
    assert stats.steps < sum(o.stats.steps for o in outs), "requests were never batched together"


def test_abort_mid_stream_ends_the_stream_and_frees_pages(llm):
    long = SamplingParams(max_tokens=64, block_length=4, steps=64, ignore_eos=True)
    other_p = SamplingParams(max_tokens=32, block_length=8, steps=32, cache="dual", ignore_eos=True)
    expected_other = llm.generate([[9, 8, 7]], other_p)[0]

    async def main():
        async with AsyncEngine(llm) as eng:
            other = asyncio.create_task(eng.generate([9, 8, 7], other_p))
            outs = []
            async for out in eng.add_request([1, 2, 3], long, request_id="long"):
                outs.append(out)
                if len(outs) == 2:
                    eng.abort("long")
            freed = eng.stats
            done = await other
            # a consumer that walks away early aborts its request too
            async for out in eng.add_request([4, 5], long, request_id="walk-away"):
                break
            for _ in range(500):
                if eng.stats.kv_pages_used == 0 and eng.stats.aborted == 2:
                    break
                await asyncio.sleep(0.01)
            return outs, freed, done, eng.stats

    outs, freed, done, stats = run(main())
    # a block may complete between the consumer's abort and the engine handling it: one more delta may come
    assert [o.finished for o in outs] in ([False, False, True], [False, False, False, True])
    # the abort output carries the latest completed blocks (the consumer may not have seen the newest delta)
    assert outs[-1].finish_reason == "abort" and outs[-1].token_ids[:len(outs[1].token_ids)] == outs[1].token_ids
    assert outs[-1].stats.steps < 64
    pages_other = llm.engine.allocator.pages_for(3 + 32)
    assert freed.kv_pages_used in (0, pages_other) and freed.aborted == 1  # only the other request's pages left
    same_output(done, expected_other)
    assert stats.kv_pages_used == 0 and stats.aborted == 2 and stats.running == 0


def test_event_loop_stays_responsive_during_a_long_generation(llm):
    p = SamplingParams(max_tokens=192, block_length=32, steps=192, ignore_eos=True)

    async def main():
        async with AsyncEngine(llm) as eng:
            ticks, gaps, stop = [], [], asyncio.Event()

            async def ticker():
                last = time.perf_counter()
                while not stop.is_set():
                    await asyncio.sleep(0.01)
                    now = time.perf_counter()
                    ticks.append(now)
                    gaps.append(now - last)
                    last = now

            t = asyncio.create_task(ticker())
            t0 = time.perf_counter()
            outs = await asyncio.gather(*(eng.generate([i + 1] * (10 + i), p) for i in range(3)))
            elapsed = time.perf_counter() - t0
            stop.set()
            await t
            return outs, [g for g, at in zip(gaps, ticks) if at <= t0 + elapsed], elapsed, eng.stats.steps

    outs, gaps, elapsed, steps = run(main())
    assert all(len(o.token_ids) == 192 for o in outs) and steps == 192
    # had the steps run on the event loop, the ticker could not tick until the generation was over
    assert len(gaps) >= min(10, elapsed / 0.05), (len(gaps), elapsed)
    assert max(gaps) < 0.5, max(gaps)


def test_bad_requests_raise_at_once_and_others_are_unaffected(llm):
    p = SamplingParams(max_tokens=16, block_length=4, steps=16, ignore_eos=True)
    expected = llm.generate([[3, 3, 3]], p)[0]
    vocab, mask = llm.model.config.vocab_size, llm.model.config.mask_id
    pool_tokens = llm.engine.allocator.num_pages * llm.engine.allocator.page_size

    async def main():
        async with AsyncEngine(llm) as eng:
            good = asyncio.create_task(eng.generate([3, 3, 3], p, request_id="good"))
            await asyncio.sleep(0)
            with pytest.raises(ValueError, match="outside the vocabulary"):
                eng.add_request([1, vocab], p)
            with pytest.raises(ValueError, match="mask token"):
                eng.add_request([mask], p)
            with pytest.raises(TypeError):
                eng.add_request(3.5, p)
            with pytest.raises(TypeError, match="SamplingParams"):
                eng.add_request([1], {"max_tokens": 4})
            with pytest.raises(SamplingParamsError, match="remasking"):
                eng.add_request([1], SamplingParams(remasking="origin", algorithm="dream", threshold=0.5))
            with pytest.raises(RequestTooLargeError, match="context length"):  # a request fault, not MemoryError
                eng.add_request([1], SamplingParams(max_tokens=pool_tokens))
            with pytest.raises(ValueError, match="already in use"):
                eng.add_request([1], p, request_id="good")
            return await good, eng.stats

    out, stats = run(main())
    same_output(out, expected)
    assert stats.finished == 1 and stats.failed == stats.aborted == 0 and stats.kv_pages_used == 0


def test_a_failing_step_fails_the_running_requests_and_the_engine_goes_on(llm, monkeypatch):
    p = SamplingParams(max_tokens=16, block_length=4, steps=16, ignore_eos=True)
    expected = llm.generate([[2, 4, 6]], p)[0]
    real, calls = llm.engine.runner.step, []

    def flaky(reqs):
        calls.append(len(reqs))
        if len(calls) == 3:
            raise RuntimeError("device fell over")
        return real(reqs)

    monkeypatch.setattr(llm.engine.runner, "step", flaky)

    async def main():
        async with AsyncEngine(llm) as eng:
            streams = [eng.add_request([1, 2], p), eng.add_request([3, 4, 5], p)]
            errors = []
            for s in streams:
                with pytest.raises(EngineError, match="device fell over") as e:
                    async for _ in s:
                        pass
                errors.append(e.value)
            after = eng.stats
            out = await eng.generate([2, 4, 6], p)
            return errors, after, out

    errors, after, out = run(main())
    assert all(isinstance(e.__cause__, RuntimeError) for e in errors)
    assert after.failed == 2 and after.kv_pages_used == 0 and after.running == 0
    same_output(out, expected)


def test_idle_engine_thread_sleeps(llm):
    async def main():
        async with AsyncEngine(llm) as eng:
            await eng.generate([1, 2, 3], SamplingParams(max_tokens=8, steps=8, block_length=4))
            await asyncio.sleep(0.05)
            return eng._thread.native_id, eng.stats.steps, await idle_cpu(eng._thread.native_id)

    async def idle_cpu(tid: int) -> int | None:
        path = f"/proc/self/task/{tid}/stat"
        if not os.path.exists(path):
            return None
        def ticks() -> int:
            fields = open(path).read().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])  # utime + stime
        before = ticks()
        await asyncio.sleep(0.5)
        return ticks() - before

    tid, steps, cpu = run(main())
    assert steps > 0
    if cpu is not None:
        assert cpu <= 2, f"the idle engine thread used {cpu} clock ticks in 0.5 s"


def test_shutdown_aborts_unfinished_requests_and_returns_the_llm(llm):
    p = SamplingParams(max_tokens=256, block_length=8, steps=256, ignore_eos=True)

    async def main():
        eng = AsyncEngine(llm)
        stream = eng.add_request([1, 2, 3], p)
        first = await stream.__anext__()
        await eng.aclose()
        rest = [o async for o in stream]
        with pytest.raises(RuntimeError, match="shut down"):
            eng.add_request([1], p)
        await eng.aclose()  # idempotent
        return first, rest, eng

    first, rest, eng = run(main())
    assert not first.finished and [o.finish_reason for o in rest] == ["abort"]
    assert not eng._thread.is_alive()
    assert llm.engine.allocator.num_used == 0 and not llm.engine.has_unfinished()
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8, steps=8, block_length=4))[0]
    assert out.finished and len(out.token_ids) <= 8
