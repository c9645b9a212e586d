"""A client that stops reading a big stream, against a real `unmask serve` process at its default dtype (issue 18
item 2): once the engine has finished the stalled request's choices they no longer count as waiting, so other
clients are served (no 503 "overloaded" at --max-queue); SIGTERM during the stall exits 0 once the stream is dropped
at --send-timeout, well before the drain timeout, without tracebacks in the log.

The stall is real: the client's receive buffer and the server socket's send buffer are shrunk to 4 KiB
(small_sndbuf_serve.py; loopback otherwise absorbs megabytes) and the stream carries every denoising step of its
choices (tens of KiB of events), so the server's writes wait; the stream never reaching [DONE] shows it.
test_connections.py checks the same limit on a synthetic app."""
from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from engine.bundled import task

from .serve_process import ServeProcess, wait_for
from .test_connections import read_all

pytestmark = pytest.mark.slow

SEND_TIMEOUT = 20.0
DRAIN_TIMEOUT = 90.0
N = 4
STEPS = 64


def stalled_stream(url: str) -> socket.socket:
    """Open a step-streaming n=N request on a socket with a 4 KiB receive buffer and never read it."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "tiny-llada-sort", "messages": task.messages_for("sort 3 1 2"), "n": N,
                       "max_tokens": STEPS, "steps": STEPS, "block_length": STEPS, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_steps": True}}).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return s


def metric(url: str, *names: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(tuple(n + "{" for n in names)))


def engine_done(url: str) -> bool:
    """The stalled request's steps all ran and nothing is running or queued in the engine."""
    return (metric(url, "unmask:denoising_steps_total") >= STEPS
            and metric(url, "unmask:num_requests_running", "unmask:num_requests_waiting") == 0)


def test_a_stalled_stream_neither_locks_others_out_nor_holds_up_shutdown():
    srv = ServeProcess("--send-timeout", str(SEND_TIMEOUT), "--drain-timeout", str(DRAIN_TIMEOUT),
                       "--max-queue", str(N), module="tests.server.small_sndbuf_serve")
    s = stalled_stream(srv.url)
    try:
        # the engine finishes the stalled choices (only their latest output is kept for the stream)
        assert wait_for(lambda: engine_done(srv.url), timeout=120, every=0.2), srv.output
        oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for q in ("sort 9 3 5 1", "reverse 4 8 1 6", "sort 2 1"):  # a full queue's worth was in flight: not 503
            r = oai.chat.completions.create(model="tiny-llada-sort", messages=task.messages_for(q))
            assert task.check(q, r.choices[0].message.content)
        t0 = time.monotonic()
        code = srv.terminate(timeout=DRAIN_TIMEOUT + 30)
        took = time.monotonic() - t0
        data, closed = read_all(s, 10)
    finally:
        s.close()
        srv.stop()
    assert b"data: [DONE]" not in data, "the stream completed: it never stalled (too little output to fill buffers)"
    assert closed
    assert code == 0, srv.output
    assert took < SEND_TIMEOUT + 15 < DRAIN_TIMEOUT, f"shutdown waited {took:.1f} s for a client that does not read"
    assert "Traceback" not in srv.output and "Exception in ASGI" not in srv.output, srv.output
