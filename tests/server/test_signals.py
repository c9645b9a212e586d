"""Signals to a real `unmask serve` process: a second Ctrl-C exits at once (no drain wait); SIGTERM / SIGINT while
the model loads exit 0 with one line and no traceback."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from .serve_process import ROOT, ServeProcess


def _catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler installed for `sig` (/proc/PID/status SigCgt)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(mask >> (sig - 1) & 1)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_model_load_exits_cleanly(sig):
    env = {k: v for k, v in os.environ.items() if k != "UNMASK_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", "0"], cwd=ROOT,
                            env={**env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 120
        while not _catches(proc.pid, signal.SIGTERM):  # our handler is in: the model load is under way
            assert proc.poll() is None and time.monotonic() < end, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.005)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "listening on" not in out
    assert f"{signal.Signals(sig).name} while loading the model; exiting" in out


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once():
    proc = ServeProcess("--drain-timeout", "300")
    results: list[int] = []

    def busy() -> None:  # a request that runs for a long while (aborted by the exit)
        try:
            r = httpx.post(proc.url + "/v1/completions", json={"prompt": "sort 1 2", "n": 4, "max_tokens": 1,
                                                               "steps": 8192, "ignore_eos": True}, timeout=300)
            results.append(r.status_code)
        except httpx.HTTPError:
            results.append(-1)

    t = threading.Thread(target=busy, daemon=True)
    try:
        t.start()
        end = time.monotonic() + 60
        while "running{" not in (m := httpx.get(proc.url + "/metrics", timeout=10).text) or \
                'num_requests_running{model_name="tiny-llada-sort"} 0.0' in m:
            assert time.monotonic() < end
            time.sleep(0.1)
        proc.proc.send_signal(signal.SIGINT)
        end = time.monotonic() + 30
        while "shutting down" not in proc.output:
            assert time.monotonic() < end
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.proc.send_signal(signal.SIGINT)
        rc = proc.proc.wait(60)
        took = time.monotonic() - t0
    finally:
        proc.stop()
    t.join(30)
    assert rc == 0 and took < 30, (rc, took)  # not the 300 s drain
    assert "Traceback" not in proc.output and "Exception in ASGI" not in proc.output, proc.output
    assert results and results[0] in (503, -1)
