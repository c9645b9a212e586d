"""A request's stream of outputs between the AsyncEngine's thread and the caller's event loop.

- `StreamState`: one live request as the AsyncEngine sees it (its ids and params, its Sequence once added, the
  latest undelivered output). The engine thread posts outputs to it with `loop.call_soon_threadsafe(state.post, item)`;
  a newer cumulative output replaces an unread unfinished one, so a slow consumer holds one output, not a queue.
- `RequestStream`: the caller's async iterator over those outputs, which aborts its request (through the `abandon`
  callback the AsyncEngine passes in) as soon as its consumer is gone.
"""
from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass
from typing import Callable

from .outputs import RequestOutput
from .sampling_params import ResolvedParams
from .sequence import Sequence
from .step_log import StepLog

@dataclass(eq=False, slots=True)
class StreamState:
    request_id: str
    prompt_ids: list[int]
    params: ResolvedParams
    prompt: str | None
    loop: asyncio.AbstractEventLoop
    ready: asyncio.Event
    """Set (on the caller's loop) when `pending` holds an item."""
    seq: Sequence | None = None
    last: RequestOutput | None = None
    done: bool = False
    """Retired by the engine thread (finished, aborted or failed)."""
    step_log: StepLog | None = None
    """record_steps: the request's per-step commits."""
    steps_notified: int = 0
    """Steps of step_log the consumer has been woken for (engine thread)."""
    pending: "RequestOutput | BaseException | None" = None
    """The latest undelivered item: outputs are cumulative, so a newer one replaces an unread unfinished one and a
    slow consumer holds one output, not a queue. The final output (or error) is never replaced."""
    ended: bool = False
    """The final output or error has been posted (caller's loop)."""
    consumed: bool = False
    """The consumer has taken the final output or error."""

    def post(self, item: "RequestOutput | BaseException") -> None:
        """Caller's loop: keep only the latest output."""
        if self.ended:
            return
        self.ended = isinstance(item, BaseException) or item.finished
        self.pending = item
        self.ready.set()


Abandon = Callable[[StreamState], None]
"""Ends a stream's request because its consumer is gone (AsyncEngine._abandon)."""


class RequestStream:
    """The outputs of one request, as an async iterator: unfinished cumulative outputs (at most the latest one is
    kept while the consumer is busy), then the final output; or EngineError if the engine failed the request.

    The request is aborted (its pages freed) as soon as its consumer is gone, that is when, before the final
    output was taken:
    - an `async for` over the stream is left by `break` (each `async for` gets its own iterator, dropped then);
    - the task awaiting the next output is cancelled;
    - `await stream.aclose()` is called;
    - the stream, or an `async for` iterator over it, is garbage-collected (a stream never iterated and dropped;
      a loop left by an exception, once its traceback is released).
    Only this request is aborted, never a later request that reuses its id. Iterating the stream itself
    (`await stream.__anext__()`) keeps the request alive for as long as the stream object is referenced.
    """

    def __init__(self, req: StreamState, abandon: Abandon) -> None:
        """abandon(req): end the request now (any thread); called at most once it matters, when the consumer goes
        away before taking the final output."""
        self._req, self._abandon = req, abandon
        weakref.finalize(self, _abandon_unless_consumed, abandon, req)

    @property
    def request_id(self) -> str:
        return self._req.request_id

    def __aiter__(self) -> "_StreamIterator":
        return _StreamIterator(self)

    async def __anext__(self) -> RequestOutput:
        req = self._req
        while req.pending is None:
            if req.consumed:
                raise StopAsyncIteration
            req.ready.clear()
            try:
                await req.ready.wait()
            except asyncio.CancelledError:  # the consumer was cancelled while waiting: it is gone
                self._abandon(req)
                raise
        item, req.pending = req.pending, None
        if req.ended:
            req.consumed = True
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        if not self._req.consumed:
            self._abandon(self._req)


class _StreamIterator:
    """One `async for` over a RequestStream; dropping it before the final output aborts the request."""

    def __init__(self, stream: RequestStream) -> None:
        self._stream = stream
        self._finalizer = weakref.finalize(self, _abandon_unless_consumed, stream._abandon, stream._req)

    def __aiter__(self) -> "_StreamIterator":
        return self

    async def __anext__(self) -> RequestOutput:
        return await self._stream.__anext__()


def _abandon_unless_consumed(abandon: Abandon, req: StreamState) -> None:
    if not req.consumed:
        abandon(req)
