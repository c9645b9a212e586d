"""Large request bodies do not leave the server bigger: 20 concurrent 31 MiB bodies to a real `unmask serve`
(default flags) leave its resident memory within a small margin of where it was (it used to keep ~300 MiB)."""
from __future__ import annotations

import json
import threading

import httpx
import pytest

from .serve_process import ServeProcess


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.slow
def test_concurrent_large_bodies_leave_no_resident_memory_behind():
    proc = ServeProcess()
    try:
        httpx.post(proc.url + "/v1/completions", json={"prompt": "sort 2 1", "max_tokens": 4}, timeout=60)
        before = _rss_kib(proc.proc.pid)
        body = json.dumps({"prompt": "7" * (31 << 20), "max_tokens": 4}).encode()
        codes: list[int] = []

        def one() -> None:
            codes.append(httpx.post(proc.url + "/v1/completions", content=body, timeout=600,
                                    headers={"content-type": "application/json"}).status_code)

        threads = [threading.Thread(target=one) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = _rss_kib(proc.proc.pid)
    finally:
        proc.stop()
    assert codes == [400] * 20  # refused (too long for the context) before tokenizing
    assert after - before < 100 * 1024, (before, after)  # KiB
