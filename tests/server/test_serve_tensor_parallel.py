"""`unmask serve --tensor-parallel-size 2`: a real server over two gloo ranks answers like one process, and a
lost worker turns /health and new requests into 503s instead of a hang."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from engine import LLM, SamplingParams
from engine.bundled import task

from .serve_process import ServeProcess, wait_for

pytestmark = pytest.mark.slow


def spawned_children(pid: int) -> list[int]:
    """The multiprocessing-spawned children of `pid` (the tensor-parallel workers; not the resource tracker)."""
    kids = []
    for task_dir in Path(f"/proc/{pid}/task").iterdir():
        for child in (task_dir / "children").read_text().split():
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"multiprocessing" in cmd and b"resource_tracker" not in cmd:
                kids.append(int(child))
    return kids


def test_serve_tensor_parallel_matches_one_process_and_fails_cleanly():
    problems = task.make_problems(12, seed=77, split="held_out")
    params = dict(max_tokens=16, steps=16, block_length=8, temperature=0)
    one = LLM(dtype="float32")
    want = [o.text for o in one.chat([task.messages_for(q) for q, _ in problems], SamplingParams(**params))]
    server = ServeProcess("--tensor-parallel-size", "2", "--dtype", "float32", timeout=240)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            assert http.get("/health").status_code == 200
            got = []
            for q, _ in problems:
                r = http.post("/v1/chat/completions", json={"messages": task.messages_for(q), **params})
                assert r.status_code == 200, r.text
                got.append(r.json()["choices"][0]["message"]["content"])
            assert got == want  # the same greedy tokens as one process
            assert sum(task.check(q, text) for (q, _), text in zip(problems, got)) >= 10

            workers = spawned_children(server.proc.pid)
            assert len(workers) == 1
            os.kill(workers[0], signal.SIGKILL)
            assert wait_for(lambda: http.get("/health").status_code == 503, timeout=60)
            r = http.post("/v1/chat/completions", json={"messages": task.messages_for(problems[0][0]), **params})
            assert r.status_code == 503, r.text
            assert "error" in r.json() and "worker" in r.json()["error"]["message"]
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.output
