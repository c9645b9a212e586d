"""Cleanup after a failed engine step: whatever a step raises (an error, KeyboardInterrupt, a fault injected at any
phase), every request of the step ends exactly once (finished or failed), its KV pages return to the pool and the
engine stays usable: by LLM.generate, and by an AsyncEngine on the same LLM. Faults are injected by wrapping the
engine's parts (tests/fault_injection.py)."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Iterator

import pytest

from engine import LLM, AsyncEngine, EngineError, SamplingParams
from engine.errors import EngineStepError
from engine.llm_engine import LLMEngine
from tests.fault_injection import failing, installed


@pytest.fixture(scope="module")
def llm(make_checkpoint):
    return LLM(make_checkpoint("llada"), kv_cache_memory=1 << 22, page_size=4)


P = SamplingParams(max_tokens=8, block_length=4, steps=8, ignore_eos=True)


def clean(llm: LLM) -> None:
    eng = llm.engine
    assert not eng.has_unfinished() and not eng.requests and eng.runner.num_canvases == 0
    assert eng.allocator.num_used == 0


def failing_after(llm: LLM, monkeypatch, n: int, exc: BaseException) -> None:
    real, calls = llm.engine.runner.step, []

    def flaky(reqs):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return real(reqs)

    monkeypatch.setattr(llm.engine.runner, "step", flaky)


@pytest.mark.parametrize("exc", [RuntimeError("device fell over"), KeyboardInterrupt(), MemoryError("oom")])
def test_generate_leaves_nothing_behind_when_a_step_raises(llm, monkeypatch, exc):
    expected = llm.generate([[1, 2, 3], [4, 5]], P)
    failing_after(llm, monkeypatch, 3, exc)
    with pytest.raises(EngineError if isinstance(exc, Exception) else type(exc)):
        llm.generate([[1, 2, 3], [4, 5]], P)
    clean(llm)
    monkeypatch.undo()
    again = llm.generate([[1, 2, 3], [4, 5]], P)  # later calls compute only their own requests
    assert [o.token_ids for o in again] == [o.token_ids for o in expected]
    AsyncEngine(llm).shutdown()  # the LLM is accepted again


@contextlib.contextmanager
def fault_at(eng, phase: str, n: int, exc) -> Iterator[None]:
    """The n-th entry into a step phase raises exc(): scheduling, the forward (a wrapped executor), the
    scheduler's update, or building a finished request's output."""
    if phase == "forward":
        with installed(eng) as ex:
            ex.fail_run(exc(), after=n - 1)
            yield
        return
    obj, name = {"schedule": (eng.scheduler, "schedule"), "update": (eng.scheduler, "update"),
                 "output": (eng, "_finish")}[phase]
    with failing(obj, name, exc, on_call=n):
        yield


@pytest.mark.parametrize("phase", ["schedule", "forward", "update", "output"])
def test_injected_fault_at_each_phase_ends_every_request_of_the_step_once(llm, phase):
    eng = llm.engine
    with fault_at(eng, phase, 3, lambda: RuntimeError(f"injected at {phase}")):
        with pytest.raises(EngineStepError, match=f"injected at {phase}") as e:
            llm.generate([[1, 2, 3], [4, 5], [6]], P)
    assert isinstance(e.value.__cause__, RuntimeError)
    clean(llm)
    assert llm.generate([[6]], P)[0].finished


def test_a_fault_after_one_request_finished_keeps_its_output_and_fails_the_rest(llm, monkeypatch):
    """Both requests finish in the same step; building the second output raises. The first request's stream gets
    its final output, the second's raises EngineError; neither waits forever."""
    expected = llm.generate([[1, 2, 3]], P)[0]
    real, calls = LLMEngine._finish, []

    def finish(self, seq):
        calls.append(seq.request_id)
        if len(calls) == 2:
            raise RuntimeError("detokenizer broke")
        return real(self, seq)

    monkeypatch.setattr(LLMEngine, "_finish", finish)

    async def main():
        async with AsyncEngine(llm) as eng:
            a = asyncio.create_task(eng.generate([1, 2, 3], P, request_id="a"))
            b = asyncio.create_task(eng.generate([1, 2, 3], P, request_id="b"))
            done = await asyncio.wait_for(asyncio.gather(a, b, return_exceptions=True), 60)
            return done, eng.stats

    (out_a, err_b), stats = asyncio.run(main())
    assert out_a.finished and out_a.token_ids == expected.token_ids
    assert isinstance(err_b, EngineError) and "detokenizer broke" in str(err_b)
    assert stats.finished == 1 and stats.failed == 1 and stats.kv_pages_used == 0 and stats.running == 0
    clean(llm)


def test_async_engine_keeps_serving_after_faults_in_every_phase(llm):
    expected = llm.generate([[9, 9, 9]], P)[0]
    faults = {"schedule": 2, "forward": 5, "update": 8, "output": 3}

    async def main():
        async with AsyncEngine(llm) as eng:
            with contextlib.ExitStack() as faulty:
                for where, n in faults.items():
                    faulty.enter_context(fault_at(llm.engine, where, n, lambda w=where: RuntimeError(f"boom at {w}")))
                results = await asyncio.wait_for(asyncio.gather(
                    *(eng.generate([i + 1, 2], P) for i in range(6)), return_exceptions=True), 60)
            after = await eng.generate([9, 9, 9], P)
            return results, after, eng.stats

    results, after, stats = asyncio.run(main())
    failed = [r for r in results if isinstance(r, BaseException)]
    assert failed and all(isinstance(r, EngineError) for r in failed)
    assert all(r.finished for r in results if not isinstance(r, BaseException))
    assert after.token_ids == expected.token_ids
    assert stats.failed == len(failed) and stats.finished == len(results) - len(failed) + 1
    assert stats.kv_pages_used == 0 and stats.running == stats.waiting == 0
