"""Tensor-parallel faults and shutdown: a worker that raises, dies or hangs fails the requests with an error naming
it, never hangs the caller (collectives time out); shutdown, `with`, and the parent process exiting end every
worker. Each test starts real worker processes, so the module is marked slow."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine import LLM, AsyncEngine, SamplingParams
from engine.async_engine import EngineError
from engine.errors import ParallelError
from tests.fault_injection import HANG, FaultyExecutor

pytestmark = pytest.mark.slow
PARAMS = SamplingParams(max_tokens=8, block_length=4, steps=8, seed=1, ignore_eos=True)
ROOT = Path(__file__).resolve().parents[1]


def workers(llm: LLM) -> list:
    return llm.engine.executor.procs


def gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # reap it if it is our child (a zombie still answers kill 0)
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.1)
    return False


@pytest.fixture
def ckpt(make_checkpoint):
    return make_checkpoint("llada")


def test_raising_worker_fails_requests_with_its_error(ckpt):
    llm = LLM(ckpt, tensor_parallel_size=2, parallel_timeout=30, kv_cache_memory=1 << 22)
    try:
        good = llm.generate([[1, 2, 3]], PARAMS)[0]
        assert len(good.token_ids) == 8
        faulty = FaultyExecutor(llm.engine.runner.executor)  # the next step's batch fails on the worker
        llm.engine.runner.executor = faulty
        faulty.fail_worker("injected failure 1234")
        t = time.monotonic()
        with pytest.raises(ParallelError, match=r"rank 1 failed: RuntimeError: injected failure 1234"):
            llm.generate([[1, 2, 3]], PARAMS)
        assert time.monotonic() - t < 15  # the worker's exit fails rank 0's collective; no timeout needed
        t = time.monotonic()
        with pytest.raises(ParallelError, match="injected failure 1234"):  # later calls fail at once
            llm.generate([[4, 5]], PARAMS)
        assert time.monotonic() - t < 1
        pid = workers(llm)[0].pid
    finally:
        llm.shutdown()
    assert gone(pid, 10)
    with pytest.raises(ParallelError, match="shut down"):
        llm.generate([[1, 2, 3]], PARAMS)


def test_hung_worker_times_out_and_with_block_cleans_up(ckpt):
    with LLM(ckpt, tensor_parallel_size=2, parallel_timeout=3, kv_cache_memory=1 << 22) as llm:
        pid = workers(llm)[0].pid
        faulty = FaultyExecutor(llm.engine.runner.executor)  # the worker sleeps through the next step
        llm.engine.runner.executor = faulty
        faulty.fail_worker(HANG)
        t = time.monotonic()
        with pytest.raises(ParallelError, match="collective failed"):
            llm.generate([[1, 2, 3]], PARAMS)
        assert time.monotonic() - t < 3 + 10
    assert gone(pid, 10)  # leaving the block killed the stuck worker


def test_killed_worker_fails_async_requests_and_health(ckpt):
    async def main() -> None:
        engine = AsyncEngine.from_model(ckpt, tensor_parallel_size=2, parallel_timeout=30, kv_cache_memory=1 << 22)
        try:
            assert engine.healthy
            assert len((await engine.generate([1, 2, 3], PARAMS)).token_ids) == 8
            pid = engine.llm.engine.executor.procs[0].pid
            long = SamplingParams(max_tokens=64, block_length=4, steps=64, seed=2, ignore_eos=True)
            stream = engine.add_request([1, 2, 3], long)
            first = await stream.__anext__()  # one block done: the request is running
            assert not first.finished
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(EngineError) as info:
                async for _ in stream:
                    pass
            assert isinstance(info.value.__cause__, ParallelError)
            assert "rank 1" in str(info.value.__cause__)
            assert not engine.healthy
            with pytest.raises(ParallelError, match="rank 1"):
                engine.add_request([1, 2], PARAMS)
        finally:
            await engine.aclose()
        assert not engine.llm.engine.executor.procs[0].is_alive()

    asyncio.run(asyncio.wait_for(main(), 120))


SCRIPT = textwrap.dedent("""
    import sys, time
    from engine import LLM
    llm = LLM(sys.argv[1], tensor_parallel_size=2, kv_cache_memory=1 << 22)
    print(llm.engine.executor.procs[0].pid, flush=True)
    if sys.argv[2] == "sleep":
        time.sleep(600)
""")  # no __main__ guard on purpose: workers must not re-run the script


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_parent_exit_ends_workers(ckpt, tmp_path, how):
    script = tmp_path / "parent.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt), "sleep" if how == "sigkill" else "exit"],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        pid = int(proc.stdout.readline())
        if how == "sigkill":
            proc.kill()
        assert proc.wait(timeout=60) in (0, -signal.SIGKILL)
        assert gone(pid, 15)
    finally:
        proc.kill()
