"""ChoiceRunner: runs one HTTP request's choices in the engine and hands their outputs to the response, in bounded
memory and with a bounded share of the running batch.

    runner = ChoiceRunner(choices, submit=..., on_final=..., max_live=32)
    runner.start()                                # submits the first max_live choices (errors raise here)
    async for c, out in runner:                   # (choice, latest output) pairs, until every choice has ended
        ...
    await runner.aclose()                         # cancels the pumps (the caller aborts what is still running)

- Every submitted choice has a pump task that reads its engine stream as fast as the engine produces, whatever the
  HTTP client does. Outputs are cumulative, so the pump keeps only the latest undelivered output of each choice
  (`pending`, at most one entry per choice): a client that reads slowly or not at all costs one output per choice,
  never a queue (`max_pending` records the high-water mark, for tests).
- A choice's final output is handed to `on_final` by its pump at once, so the server's accounting (in-flight count,
  metrics) sees finished work as finished even while the client is not reading.
- At most `max_live` choices of the request are in the engine at once; the next is submitted when one ends. A
  request with many choices thus leaves batch slots to other requests (server/limits.py: --max-request-slots).
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Protocol, Sequence


class RunnableChoice(Protocol):
    index: int
    stream: AsyncIterator[Any] | None
    done: bool


class ChoiceRunner:
    def __init__(self, choices: Sequence[RunnableChoice], submit: Callable[[RunnableChoice], None],
                 on_final: Callable[[RunnableChoice, Any], None], max_live: int | None = None) -> None:
        self.choices = list(choices)
        self._submit, self._on_final = submit, on_final
        self.max_live = max(1, max_live or len(self.choices))
        self._next = 0
        """Index of the next choice to submit."""
        self._tasks: dict[int, asyncio.Task] = {}
        self.pending: dict[int, tuple[RunnableChoice, Any]] = {}
        """Choice index -> its latest undelivered output (or the exception that ended its stream)."""
        self.max_pending = 0
        self._ended = 0
        self._failure: BaseException | None = None
        """A later submission failed (the engine is gone): raised once the pending outputs are taken."""
        self._wake = asyncio.Event()

    @property
    def live(self) -> int:
        """Choices submitted whose stream has not ended."""
        return len(self._tasks)

    def start(self) -> None:
        """Submit the first choices (up to max_live); the submit callback's errors propagate."""
        self._fill()

    def _fill(self) -> None:
        while self._next < len(self.choices) and len(self._tasks) < self.max_live:
            c = self.choices[self._next]
            self._next += 1
            self._submit(c)
            self._tasks[c.index] = asyncio.ensure_future(self._pump(c))

    async def _pump(self, c: RunnableChoice) -> None:
        try:
            assert c.stream is not None
            async for out in c.stream:
                if out.finished:
                    self._on_final(c, out)
                self._put(c, out)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(c, e)
        finally:
            if self._tasks.get(c.index) is asyncio.current_task():
                del self._tasks[c.index]
            self._ended += 1
            self._wake.set()
        try:
            self._fill()
        except BaseException as e:  # noqa: BLE001 - a later submission failed (engine gone): the consumer raises
            self._failure = e
            self._wake.set()

    def _put(self, c: RunnableChoice, item: Any) -> None:
        prev = self.pending.get(c.index)
        if prev is not None and (isinstance(prev[1], BaseException) or prev[1].finished):
            return  # an end is never replaced
        self.pending[c.index] = (c, item)
        self.max_pending = max(self.max_pending, len(self.pending))
        self._wake.set()

    def __aiter__(self) -> "ChoiceRunner":
        return self

    async def __anext__(self) -> tuple[RunnableChoice, Any]:
        while not self.pending:
            if self._failure is not None:
                raise self._failure
            if self._ended >= len(self.choices):
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()
        index = next(iter(self.pending))
        c, item = self.pending.pop(index)
        if isinstance(item, BaseException):
            raise item
        return c, item

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except BaseException:  # noqa: BLE001 - cancelled pumps
                pass
