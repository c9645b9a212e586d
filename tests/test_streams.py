"""AsyncEngine streams: a consumer that is gone aborts its request, a slow consumer holds only the latest
cumulative output, a stale stream cannot abort a new request that reuses its id, one AsyncEngine per LLM, and
stats are right after the engine loop stops (even when it dies)."""
from __future__ import annotations

import asyncio
import gc

import pytest

from engine import LLM, AsyncEngine, EngineError, SamplingParams
from tests.fault_injection import failing

LONG = SamplingParams(max_tokens=200, block_length=4, steps=200, ignore_eos=True)
SHORT = SamplingParams(max_tokens=16, block_length=2, steps=16, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(make_checkpoint):
    return LLM(make_checkpoint("llada"), kv_cache_memory=1 << 22, page_size=4)


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(cond, limit: float = 60.0) -> None:
    for _ in range(int(limit / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_a_stream_never_iterated_and_dropped_aborts_its_request(llm):
    async def main():
        async with AsyncEngine(llm) as eng:
            eng.add_request([1, 2, 3], LONG)  # the stream is dropped at once
            gc.collect()
            await until(lambda: eng.stats.aborted == 1 and eng.stats.kv_pages_used == 0)
            return eng.stats

    stats = run(main())
    assert stats.finished == 0 and stats.aborted == 1 and stats.steps < 200


def test_breaking_out_of_a_stream_still_referenced_aborts_its_request(llm):
    async def main():
        async with AsyncEngine(llm) as eng:
            stream = eng.add_request([1, 2, 3], LONG)
            async for out in stream:
                assert not out.finished
                break
            await until(lambda: eng.stats.aborted == 1 and eng.stats.kv_pages_used == 0)
            rest = [o async for o in stream]  # the stream ends with the abort output
            return stream, rest, eng.stats

    stream, rest, stats = run(main())
    assert [o.finish_reason for o in rest] == ["abort"] and stats.finished == 0 and stats.steps < 200


def test_a_cancelled_consumer_aborts_its_request(llm):
    async def main():
        async with AsyncEngine(llm) as eng:
            task = asyncio.create_task(eng.generate([1, 2, 3], LONG))
            await until(lambda: eng.stats.steps >= 2)
            task.cancel()
            await until(lambda: eng.stats.aborted == 1 and eng.stats.kv_pages_used == 0)
            return eng.stats

    assert run(main()).finished == 0


def test_a_slow_consumer_holds_only_the_latest_output(llm):
    expected = llm.generate([[4, 5, 6]], SHORT)[0]

    async def main():
        async with AsyncEngine(llm) as eng:
            stream = eng.add_request([4, 5, 6], SHORT)
            await until(lambda: eng.stats.finished == 1)  # 7 block deltas and the final output were produced
            await until(lambda: stream._req.ended)  # ... and handed to this loop
            return [o async for o in stream]

    outs = run(main())
    assert len(outs) == 1 and outs[0].finished and outs[0].token_ids == expected.token_ids


def test_deltas_are_cumulative_and_end_with_the_generate_output(llm):
    expected = llm.generate([[7, 8]], SHORT)[0]

    async def main():
        async with AsyncEngine(llm) as eng:
            return [o async for o in eng.add_request([7, 8], SHORT)]

    outs = run(main())
    assert outs[-1].finished and outs[-1].token_ids == expected.token_ids
    for a, b in zip(outs, outs[1:]):
        assert b.token_ids[:len(a.token_ids)] == a.token_ids and len(b.token_ids) > len(a.token_ids)


def test_a_stale_stream_does_not_abort_a_new_request_reusing_its_id(llm):
    expected = llm.generate([[3, 1]], SHORT)[0]

    async def main():
        async with AsyncEngine(llm) as eng:
            old = eng.add_request([1, 2, 3], LONG, request_id="x")
            await old.__anext__()
            eng.abort("x")
            await until(lambda: eng.stats.aborted == 1)
            new = eng.add_request([3, 1], SHORT, request_id="x")
            await old.aclose()  # stale: its request is long gone
            del old
            gc.collect()
            outs = [o async for o in new]
            return outs, eng.stats

    outs, stats = run(main())
    assert outs[-1].finish_reason == "length" and outs[-1].token_ids == expected.token_ids
    assert stats.aborted == 1 and stats.finished == 1


def test_one_async_engine_per_llm_and_no_generate_while_served(llm):
    async def main():
        async with AsyncEngine(llm):
            with pytest.raises(RuntimeError, match="already served"):
                AsyncEngine(llm)
            with pytest.raises(RuntimeError, match="served by an AsyncEngine"):
                llm.generate([[1]], SHORT)
        async with AsyncEngine(llm) as again:  # free once shut down
            return await again.generate([1], SHORT)

    assert run(main()).finished


class Fatal(BaseException):
    """Not an Exception: escapes the step's error handling and kills the engine loop."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_stats_are_right_after_the_engine_loop_dies(llm):
    async def main():
        eng = AsyncEngine(llm)
        streams = [eng.add_request([1, 2], LONG), eng.add_request([3, 4], LONG)]
        await streams[0].__anext__()

        errors = []
        with failing(llm.engine.scheduler, "schedule", lambda: Fatal("engine loop killed"), on_call=lambda n: True):
            for s in streams:
                with pytest.raises(EngineError, match="died") as e:
                    async for _ in s:
                        pass
                errors.append(e.value)
            await asyncio.to_thread(eng._thread.join, 30)
        with pytest.raises(RuntimeError, match="died"):
            eng.add_request([1], SHORT)
        return eng.stats

    stats = run(main())
    assert stats.running == stats.waiting == stats.kv_pages_used == 0 and stats.failed == 2
    assert not llm.engine.has_unfinished() and llm.engine.allocator.num_used == 0
    assert llm.generate([[5]], SHORT)[0].finished  # the LLM is usable again
