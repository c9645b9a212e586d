"""A scripted EngineClient for route tests that need behaviour the real engine does not show on demand (a stall,
a failure after the stream started, a dead loop, a full queue)."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from engine.async_engine import EngineError, EngineStats
from engine.outputs import RequestOutput
from engine.sampling_params import GenerationDefaults, SamplingParams
from engine.sequence import SeqStats
from server.engine_client import ModelInfo

WORDS = ["alpha", " beta", " gamma", " delta", " epsilon", " zeta"]


class FakeEngine:
    """Answers every request with WORDS (one word per token), one block of `block` tokens per `delay` seconds.
    fail_after: raise EngineError after that many blocks. hang: never finish (until aborted)."""

    def __init__(self, block: int = 2, delay: float = 0.0, fail_after: int | None = None, hang: bool = False,
                 alive: bool = True, max_running: int = 1000, fail_only: str | None = None) -> None:
        self.info = ModelInfo(path="/fake", family="llada", dtype="float32", device="cpu", vocab_size=100,
                              max_model_len=64, defaults=GenerationDefaults(max_tokens=6, steps=6, block_length=6),
                              has_tokenizer=True, has_chat_template=True)
        self.block, self.delay, self.fail_after, self.hang, self.alive = block, delay, fail_after, hang, alive
        self.max_running = max_running
        self.fail_only = fail_only
        """With fail_after: only requests whose id ends with this fail."""
        self.live: dict[str, asyncio.Event] = {}
        self.added: list[tuple[list[int], SamplingParams, str]] = []
        self.aborted: list[str] = []

    def encode(self, prompt: str | list[int], where: str) -> list[int]:
        if isinstance(prompt, str):
            return [ord(c) % 100 for c in prompt]
        for t in prompt:
            if not 0 <= t < 100:
                raise ValueError(f"{where}: token id {t} is outside the vocabulary (size 100)")
        return list(prompt)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode("".join(m["content"] for m in messages), "messages")

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        if not self.alive:
            raise RuntimeError("the engine thread has died")
        self.added.append((prompt_ids, params, request_id))
        self.live[request_id] = asyncio.Event()
        return self._stream(prompt_ids, params, request_id)

    async def _stream(self, ids: list[int], params: SamplingParams, rid: str) -> AsyncIterator[RequestOutput]:
        n = min(params.max_tokens or 6, len(WORDS))
        stats = SeqStats()
        blocks = 0
        try:
            for end in range(self.block, 10 ** 9, self.block):
                aborted = self.live[rid]
                try:
                    await asyncio.wait_for(aborted.wait(), self.delay)
                except asyncio.TimeoutError:
                    pass
                if aborted.is_set():  # as AsyncEngine: a final output with finish_reason 'abort'
                    k = min(end - self.block, n)
                    yield RequestOutput(rid, ids, list(range(k)), "".join(WORDS[:k]), "abort", stats)
                    return
                fails = self.fail_only is None or rid.endswith(self.fail_only)
                if self.fail_after is not None and blocks >= self.fail_after and fails:
                    raise EngineError(f"request {rid}: engine step failed: injected")
                blocks += 1
                stats.steps += self.block
                stats.tokens_committed += self.block
                if self.hang or end < n:
                    k = min(end, n)
                    yield RequestOutput(rid, ids, list(range(k)), "".join(WORDS[:k]), None, stats, finished=False)
                    continue
                yield RequestOutput(rid, ids, list(range(n)), "".join(WORDS[:n]), "length", stats)
                return
        finally:
            self.live.pop(rid, None)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        ev = self.live.get(request_id)
        if ev is not None:
            ev.set()

    def stats(self) -> EngineStats:
        running = min(len(self.live), self.max_running)
        return EngineStats(running=running, waiting=len(self.live) - running, kv_pages_total=10,
                           kv_pages_used=running)

    def healthy(self) -> bool:
        return self.alive

    async def shutdown(self) -> None:
        self.alive = False
