"""A real `unmask serve` process on 127.0.0.1 serving the bundled model, driven by the official `openai` client
(and raw httpx where the client hides the wire): chat, completions, streaming with usage, extra_body options, n,
stop strings, each error class, disconnects, auth, SIGTERM. The model's answers are checked by the task itself."""
from __future__ import annotations

import asyncio
import signal
import socket
import time

import httpx
import openai
import pytest

from engine.bundled import task

from .serve_process import ServeProcess, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    srv = ServeProcess("--served-model-name", "tiny", "--max-num-seqs", "32")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def metric(server: ServeProcess, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_startup_prints_where_it_listens_and_what_it_serves(server):
    assert "model 'tiny' (family llada" in server.output and "listening on http://127.0.0.1:" in server.output


def test_chat_completions_and_models(oai):
    assert [m.id for m in oai.models.list().data] == ["tiny"]
    r = oai.chat.completions.create(model="tiny", messages=task.messages_for("sort 9 3 5 1"))
    assert r.choices[0].message.content == "1 3 5 9" and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model_extra["diffusion"]["steps"] > 0  # the extra field rides along


def test_extra_body_diffusion_options_and_n(oai):
    r = oai.chat.completions.create(
        model="tiny", messages=task.messages_for("reverse 4 8 1 6"), n=2, max_tokens=16,
        extra_body={"steps": 16, "block_length": 8, "cache": "dual", "threshold": 0.9, "remasking": "low_confidence"})
    assert [c.message.content for c in r.choices] == ["6 1 8 4"] * 2 and [c.index for c in r.choices] == [0, 1]
    assert r.model_extra["diffusion"]["tokens_per_forward"] > 1  # threshold decoding commits several per step


def test_completions_with_stop(oai):
    full = oai.completions.create(model="tiny", prompt="sort 1 2", max_tokens=8, extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length" and len(full.choices[0].text) > 0
    piece = full.choices[0].text[3:5]
    cut = oai.completions.create(model="tiny", prompt="sort 1 2", max_tokens=8, stop=[piece],
                                 extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full.choices[0].text[:full.choices[0].text.find(piece)]


def test_streaming_with_usage(oai):
    stream = oai.chat.completions.create(model="tiny", messages=task.messages_for("reverse 1 2 3 4 5 6 7"),
                                         stream=True, stream_options={"include_usage": True},
                                         extra_body={"block_length": 4})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "7 6 5 4 3 2 1"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_completion_streaming(oai):
    parts = [c.choices[0].text for c in oai.completions.create(model="tiny", prompt="sort 3 2", max_tokens=6,
                                                                stream=True, extra_body={"block_length": 2})
             if c.choices]
    plain = oai.completions.create(model="tiny", prompt="sort 3 2", max_tokens=6, extra_body={"block_length": 2})
    assert "".join(parts) == plain.choices[0].text


def test_error_classes(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny", messages=task.messages_for("sort 1"), extra_body={"steps": 0})
    assert e.value.status_code == 400 and e.value.body["param"] == "steps"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny", messages=task.messages_for("sort 1"),
                                    extra_body={"remasking": "nope"})
    assert e.value.body["param"] == "remasking"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tiny", prompt="x", max_tokens=100000)
    assert e.value.body["param"] == "max_tokens" and "context" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tiny", prompt=[1, 2, 10 ** 6])
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="gpt-4o", messages=task.messages_for("sort 1"))
    assert e.value.body["param"] == "model"
    bad = openai.OpenAI(base_url=oai.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        bad.get("/nope", cast_to=object)


def test_client_disconnect_aborts_request(server):
    """A raw socket sends a long request and closes: the engine aborts it and frees its pages."""
    aborted0 = metric(server, "unmask:request_success_total") - 0
    host, port = server.url.removeprefix("http://").split(":")
    body = (b'{"prompt": "sort 1 2", "max_tokens": 500, "steps": 500, "block_length": 4, "ignore_eos": true'
            b', "stream": %s}')
    for stream in (b"false", b"true"):
        payload = body % stream
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            assert wait_for(lambda: metric(server, "unmask:kv_cache_usage_perc") > 0, 30)
        t0 = time.monotonic()
        assert wait_for(lambda: metric(server, "unmask:kv_cache_usage_perc") == 0
                        and metric(server, "unmask:num_requests_running") == 0, 30)
        print(f"\nstream={stream.decode()}: pages free {time.monotonic() - t0:.2f} s after the client left")
    text = httpx.get(server.url + "/metrics").text
    assert 'unmask:request_success_total{finished_reason="abort",model_name="tiny"} 2.0' in text, text
    assert metric(server, "unmask:request_success_total") >= aborted0 + 2


def test_sigterm_lets_in_flight_requests_finish():
    srv = ServeProcess("--drain-timeout", "60")

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            long = asyncio.create_task(c.post("/v1/chat/completions", json={
                "messages": task.messages_for("sort 5 4 3"), "max_tokens": 300, "steps": 300, "block_length": 8,
                "ignore_eos": True}))
            while metric(srv, "unmask:num_requests_running") == 0:
                await asyncio.sleep(0.02)
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            refused = await c.post("/v1/chat/completions", json={"messages": task.messages_for("sort 1 2")})
            return await long, refused

    try:
        done, refused = asyncio.run(main())
    finally:
        code = srv.proc.wait(60)
    assert done.status_code == 200 and done.json()["choices"][0]["finish_reason"] == "length"
    assert done.json()["usage"]["completion_tokens"] == 300
    assert refused.status_code == 503 and refused.json()["error"]["code"] == 503
    assert code == 0, srv.output


def test_bundled_model_accuracy_over_concurrent_chat_requests(server):
    problems = task.make_problems(100, seed=2024, split="held_out")
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)

    async def ask(q: str) -> str:
        r = await client.chat.completions.create(model="tiny", messages=task.messages_for(q))
        return r.choices[0].message.content

    async def main():
        return await asyncio.gather(*(ask(q) for q, _ in problems))

    t0 = time.monotonic()
    answers = asyncio.run(main())
    correct = sum(task.check(q, a) for (q, _), a in zip(problems, answers))
    print(f"\nbundled model through the server: {correct}/100 exact, 100 concurrent chats in "
          f"{time.monotonic() - t0:.1f} s")
    assert correct >= 95


def test_auth_on_then_sigterm_past_the_drain_timeout_ends_streams_with_an_error_and_exits_0():
    """One process: the API key from the environment, then SIGTERM while a long stream runs past the drain
    timeout (the stream gets a 503 error event and [DONE]; the process exits 0)."""
    srv = ServeProcess("--drain-timeout", "0.5", env={"UNMASK_API_KEY": "k-123"})
    body = {"messages": task.messages_for("sort 1 2"), "max_tokens": 480, "steps": 480, "block_length": 4,
            "ignore_eos": True, "stream": True}
    try:
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="k-123", max_retries=0)
        wrong = openai.OpenAI(base_url=srv.url + "/v1", api_key="k-12", max_retries=0)
        assert ok.chat.completions.create(model="tiny-llada-sort", messages=task.messages_for("sort 2 1")
                                          ).choices[0].message.content == "1 2"
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.chat.completions.create(model="tiny-llada-sort", messages=task.messages_for("sort 2 1"))
        assert e.value.status_code == 401 and "k-12" not in str(e.value.body)
        assert httpx.get(srv.url + "/health").status_code == 200  # open without a key
        headers = {"Authorization": "Bearer k-123"}
        with httpx.Client(base_url=srv.url, timeout=120, headers=headers) as c, \
                c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(lines)
            srv.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
    finally:
        code = srv.proc.wait(60)
    assert first.startswith("data: ") and '"role":"assistant"' in first
    assert rest[-1] == "data: [DONE]"
    assert '"error"' in rest[-2] and '"code":503' in rest[-2] and "shutting down" in rest[-2]
    assert code == 0, srv.output
    assert "stopped" in srv.output and "k-123" not in srv.output


@pytest.mark.parametrize("args, needle", [
    (["--steps", "0"], "--steps"),
    (["--model", "/no/such/dir"], "/no/such/dir"),
    (["--kv-cache-memory", "lots"], "--kv-cache-memory"),
    (["--api-key", ""], "--api-key"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
])
def test_serve_bad_flags_are_one_clear_line(args, needle):
    import subprocess
    import sys

    from .serve_process import ROOT
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--port", "0", *args], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr
