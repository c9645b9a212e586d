"""unmask_client and benchmarks/serve.py against a real `unmask serve` process (the bundled model, CPU).

References: the official `openai` package on the same requests (same text, usage and diffusion field), the
non-streamed answer for the stream's deltas, the bundled model's task accuracy, the server's own /metrics
counters for the benchmark's token counts.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from unmask_client import (AsyncClient, AuthenticationError, BadRequestError, Client, NotFoundError, RetryPolicy,
                           ServiceUnavailableError)

ROOT = Path(__file__).resolve().parents[1]
TASK_Q = [("sort 3 1 2", "1 2 3"), ("reverse 5 9 7 1", "1 7 9 5"), ("sort 8 6 4 2 0", "0 2 4 6 8")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("UNMASK_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(self.port),
                                      "--dtype", "float32", "--log-level", "warning", *flags],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            Client(self.url).wait_until_ready(timeout=120)
        except Exception:
            self.stop()
            raise

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


KEY = "sk-test-1"


@pytest.fixture(scope="module")
def server():
    s = Server("--api-key", KEY)  # one server for the module; auth on, so every client below sends the key
    yield s
    s.stop()


def test_chat_matches_the_official_openai_client(server):
    openai = pytest.importorskip("openai")
    options = {"max_tokens": 16, "steps": 16, "block_length": 16, "cache": "dual", "threshold": 0.9}
    with Client(server.url, KEY) as c:
        model = c.models()[0].id
        ours = c.chat([{"role": "user", "content": "sort 7 3 9 1"}], temperature=0, **options)
    ref = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "sort 7 3 9 1"}], temperature=0,
        max_tokens=options["max_tokens"], extra_body={k: v for k, v in options.items() if k != "max_tokens"})
    assert ours.text == ref.choices[0].message.content == "1 3 7 9"
    assert ours.usage.model_dump() == ref.usage.model_dump(include={"prompt_tokens", "completion_tokens",
                                                                       "total_tokens"})
    assert ours.diffusion.model_dump(exclude_none=True) == ref.model_extra["diffusion"]
    assert ours.diffusion.steps >= 1 and ours.diffusion.tokens_per_forward > 0


def test_stream_deltas_rebuild_the_answer(server):
    with Client(server.url, KEY) as c:
        msgs = [{"role": "user", "content": "reverse 1 2 3 4 5 6"}]
        full = c.chat(msgs, temperature=0, max_tokens=16, block_length=4, steps=16)
        chunks = list(c.chat(msgs, stream=True, temperature=0, max_tokens=16, block_length=4, steps=16))
    content = [ch.text for ch in chunks if ch.text]
    assert "".join(content) == full.text == "6 5 4 3 2 1"
    assert 1 < len(content) <= 16 // 4  # block deltas: more than one, at most one per block
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_completion_with_token_ids_and_text(server):
    with Client(server.url, KEY) as c:
        a = c.complete([1, 2, 3], max_tokens=8, steps=8, temperature=0)
        stream = list(c.complete([1, 2, 3], max_tokens=8, steps=8, temperature=0, stream=True))
    assert a.usage.prompt_tokens == 3 and a.usage.completion_tokens <= 8
    assert "".join(ch.text for ch in stream) == a.text


@pytest.mark.slow
def test_async_client_concurrent_requests_answer_the_task(server):
    from engine.bundled import task
    problems = task.make_problems(40, seed=7, split="held_out")

    async def main():
        async with AsyncClient(server.url, KEY) as c:
            return await asyncio.gather(*(c.chat(task.messages_for(q), temperature=0) for q, _ in problems))

    answers = asyncio.run(main())
    correct = sum(task.check(q, r.text) for (q, _), r in zip(problems, answers))
    assert correct >= 38, f"{correct}/40"


def test_server_errors_are_typed_with_param(server):
    with Client(server.url, KEY) as c:
        with pytest.raises(BadRequestError) as e:
            c.chat([{"role": "user", "content": "sort 1 2"}], steps=0)
        assert e.value.status == 400 and e.value.param == "steps"
        with pytest.raises(BadRequestError) as e:
            c.chat([{"role": "user", "content": "sort 1 2"}], threshold=1.5)
        assert e.value.param == "threshold"
        with pytest.raises(NotFoundError) as e:
            c.chat([{"role": "user", "content": "sort 1 2"}], model="no-such-model")
        assert e.value.status == 404 and e.value.param == "model" and "no-such-model" in e.value.message
        assert c.health() is True


def test_api_key_is_required_and_sent(server):
    for key in (None, "sk-wrong"):
        with pytest.raises(AuthenticationError) as e:
            Client(server.url, key, model="x").chat([{"role": "user", "content": "sort 2 1"}])
        assert e.value.status == 401
    with Client(server.url, KEY) as c:
        assert c.chat([{"role": "user", "content": "sort 2 1"}], temperature=0).text == "1 2"
    assert Client(server.url).health() is True  # /health stays open


@pytest.mark.slow
def test_queue_full_503_is_retried_until_served():
    """--max-num-seqs 1 --max-queue 1: a burst of 6 overflows the queue (requests decode the whole 64-token canvas,
    so the first is still running when the others arrive). Without retries some get 503 with Retry-After; with
    them every request is served, with the answer it gets alone."""
    s = Server("--max-num-seqs", "1", "--max-queue", "1")
    msgs = [{"role": "user", "content": "sort 9 8 7 6 5"}]
    opts = {"temperature": 0, "max_tokens": 64, "steps": 64, "block_length": 64, "ignore_eos": True}

    async def burst(retry: RetryPolicy) -> list:
        async with AsyncClient(s.url, retry=retry) as c:
            return await asyncio.gather(*(c.chat(msgs, **opts) for _ in range(6)), return_exceptions=True)

    try:
        alone = Client(s.url).chat(msgs, **opts)
        no_retry = asyncio.run(burst(RetryPolicy(max_retries=0)))
        refused = [r for r in no_retry if isinstance(r, ServiceUnavailableError)]
        assert refused and all(r.status == 503 and r.retry_after is not None for r in refused)
        assert all(isinstance(r, ServiceUnavailableError) or r.text == alone.text for r in no_retry)
        retried = asyncio.run(burst(RetryPolicy(max_retries=50, max_delay=0.5)))
        assert all(not isinstance(r, Exception) and r.text == alone.text for r in retried), retried
        assert alone.usage.completion_tokens == 64
    finally:
        s.stop()


@pytest.mark.slow
def test_serve_benchmark_against_the_server(server, tmp_path):
    from benchmarks import serve
    out = tmp_path / "r.json"
    with Client(server.url, KEY) as c:
        before = serve.parse_counters(c.metrics())
    r = serve.main(["--base-url", server.url, "--api-key", KEY, "--dataset-name", "task", "--num-prompts", "16",
                    "--max-concurrency", "8", "--request-rate", "50", "--cache", "dual", "--threshold", "0.9",
                    "--result-file", str(out), "--no-progress", "--num-warmups", "0"])
    with Client(server.url, KEY) as c:
        after = serve.parse_counters(c.metrics())
    saved = json.loads(out.read_text())
    assert saved["completed"] == 16 and saved["failed"] == 0 and saved["accuracy"] >= 0.9
    # the server's own count of generated tokens matches the usage the benchmark summed
    assert after["generation_tokens"] - before["generation_tokens"] == saved["total_output_tokens"]
    assert saved["diffusion"]["denoising_steps"] > 0 and saved["diffusion"]["tokens_committed"] > 0
    for k in ("request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
              "mean_tpot_ms", "p99_itl_ms", "median_e2el_ms", "p99_e2el_ms"):
        assert saved[k] >= 0, k
    assert 0 < saved["median_ttft_ms"] <= saved["median_e2el_ms"] <= saved["duration"] * 1000
    assert r["options"]["threshold"] == 0.9

    from benchmarks import plot
    png = tmp_path / "lat.png"
    plot.main(["latency", str(out), "-o", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
