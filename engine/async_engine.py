"""AsyncEngine: continuous batching behind an asyncio API.

    async with AsyncEngine.from_model(model_dir, max_num_seqs=32) as engine:
        async for out in engine.add_request("Hello", SamplingParams(max_tokens=64, block_length=16)):
            print(out.finished, out.token_ids)

How it works:
- One background thread owns the LLMEngine (scheduler, runner, KV pool) and runs its step loop
  (schedule -> one batched forward -> update), so forward passes never run on the event loop and an asyncio
  server stays responsive. Requests join and leave the running batch between steps.
- `add_request` runs the input processor shared with `LLM.generate` (engine/input_processor.py: resolve, tokenise
  and check, build the Sequence with its KV-pool fit check and parameter row) on the caller's thread: a bad request
  raises there and then and never reaches the engine. The finished Sequence is handed to the thread through a
  lock-protected inbox, which only queues it; `abort` goes the same way. The thread drains
  the inbox before every step, so an aborted request's pages are free before the next step is scheduled.
- The thread hands outputs to each request's one-item slot on the caller's loop with `loop.call_soon_threadsafe`.
- With nothing queued or unfinished the thread sleeps on a Condition (no spinning); add/abort/shutdown wake it.
- An exception raised by a step fails every request of that step that had not finished (its stream raises
  EngineError, its pages are freed); requests that finished in the step before the fault get their output, and
  waiting requests carry on. If the step failed before anything was scheduled, the running requests fail (every
  request when none runs), so a request that breaks admission cannot wedge the loop (LLMEngine.step).

Streams (RequestStream, engine/request_stream.py): every completed block that is not the last yields an unfinished RequestOutput
(finished=False, finish_reason None) whose token_ids and text are everything generated so far (cumulative, cut at
the first stop token, never retracting earlier text); the stream then ends with the final output (finished=True,
finish_reason 'stop' or 'length'), the same output LLM.generate returns for that request. A consumer slower than
the engine sees only the latest cumulative output (intermediate ones are replaced, never queued). After
`abort(request_id)` (or `shutdown()`) the stream ends with a final output whose finish_reason is 'abort' and whose
token_ids are the completed blocks streamed so far. A consumer that goes away aborts its request: see
RequestStream for the exact rule.

Step streams (`add_request(..., record_steps=True)`, used by the playground and `stream_options.include_steps`):
every output of the request carries `step_log`, its StepLog (engine/step_log.py), which the engine thread extends
after each denoising step; besides the block outputs, the stream is woken after every step of the request with an
unfinished output carrying the completed blocks so far (the same content as the last block output), and the
consumer reads the new steps with `out.step_log.since(cursor)`. Memory does not grow with a slow consumer: these
wake-ups are cumulative outputs like the others, so at most the latest one waits (a consumer that falls behind
reads every step it missed from the log in one go), and the log holds each committed position once: at most
max_tokens + steps entries per request. Requests that do not ask carry no log and get no extra outputs.

While an AsyncEngine runs, its LLM's engine belongs to the background thread: that LLM's generate / chat and a
second AsyncEngine on it are refused (after `shutdown()` they are usable again).
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import EngineError, EngineStepError, ParallelError, RequestError, RequestTypeError
from .llm import LLM, Prompt
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .request_stream import RequestStream, StreamState
from .sampling_params import SamplingParams
from .sequence import SeqStats
from .step_log import StepLog

log = logging.getLogger("unmask.engine")


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot taken by the engine thread after each step (and after handling requests and aborts)."""
    running: int = 0
    waiting: int = 0
    """Queued in the scheduler (not yet admitted, or preempted)."""
    kv_pages_used: int = 0
    kv_pages_total: int = 0
    steps: int = 0
    """Engine steps (one batched forward each) since start."""
    positions_computed: int = 0
    """Query positions fed through the network, over every request (CFG twins included)."""
    tokens_committed: int = 0
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache (block-causal models with prefix caching on)."""
    prefix_cache_hits: int = 0
    """Prompt tokens found there (their K/V not computed again)."""
    preemptions: int = 0
    finished: int = 0
    aborted: int = 0
    failed: int = 0


@dataclass(slots=True)
class _Totals:
    positions: int = 0
    tokens: int = 0
    finished: int = 0
    aborted: int = 0
    failed: int = 0
    steps: int = 0


Delivery = tuple[StreamState, "RequestOutput | BaseException"]


class AsyncEngine:
    def __init__(self, llm: LLM, *, owns_llm: bool = False) -> None:
        """Serve `llm`'s model and engine (its scheduler, KV pool and options) from a background thread.
        owns_llm: shutdown() also stops the LLM (its tensor-parallel workers), as from_model does."""
        self.llm = llm
        self._engine: LLMEngine = llm.engine
        self._engine.claim(self)  # released when the engine thread ends
        self._cond = threading.Condition()
        self._inbox: list[tuple[str, Any]] = []
        self._requests: dict[str, StreamState] = {}
        """Live requests by id: added on the caller's thread, removed by the engine thread (under _cond)."""
        self._ids = itertools.count()
        self._recording: dict[str, StreamState] = {}
        """Live requests with record_steps (engine thread only)."""
        self._closing = False
        self._owns_llm = owns_llm
        self._dead: BaseException | None = None
        self._totals = _Totals()
        self._stats = EngineStats(kv_pages_total=self._engine.allocator.num_pages)
        self._thread = threading.Thread(target=self._run, name="unmask-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_model(cls, model: str | Path | None = None, device: str | torch.device = "cpu",
                   dtype: str | torch.dtype = "auto", **engine_options: Any) -> "AsyncEngine":
        """Load a checkpoint like `LLM(model, device, dtype, **engine_options)` (including tensor_parallel_size,
        expert_parallel) and serve it; shutdown() then also stops the LLM's tensor-parallel workers."""
        llm = LLM(model, device, dtype, **engine_options)
        try:
            return cls(llm, owns_llm=True)
        except BaseException:
            llm.shutdown()
            raise

    # public API (caller's side) --------------------------------------------------------------------------
    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def is_running(self) -> bool:
        # _dead is set before the dying thread fails its requests: their clients must not see a live engine
        return self._thread.is_alive() and not self._closing and self._dead is None

    @property
    def healthy(self) -> bool:
        """Running, and able to run the model (False once a tensor-parallel worker is lost): what /health reports."""
        return self.is_running and self._dead is None and self._engine.executor.healthy

    @property
    def unhealthy_reason(self) -> str | None:
        """Why `healthy` is False (None while healthy): the engine thread's fatal error, a lost tensor-parallel
        worker, or shutdown."""
        if self._dead is not None:
            return f"the engine loop died: {type(self._dead).__name__}: {self._dead}"
        try:
            self._engine.executor.check()
        except Exception as exc:  # noqa: BLE001 - the executor's own description of the lost worker
            return str(exc)
        return None if self.is_running else "the engine is shut down"

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None, *, record_steps: bool = False) -> "RequestStream":
        """Queue one request (a string or a list of token ids) and return its stream of outputs. Must be called
        from a running event loop; the outputs arrive on it. Invalid prompts or params, a canvas larger than the
        whole KV pool and a request_id already in use raise here, before anything is queued. record_steps: keep
        the request's per-step commits and wake the stream after every step (see the module docstring)."""
        if params is not None and not isinstance(params, SamplingParams):
            raise RequestTypeError(f"params: expected a SamplingParams, got {type(params).__name__}", "params")
        self._engine.executor.check()  # a lost tensor-parallel worker fails new requests at once
        rid = request_id if request_id is not None else f"async-{next(self._ids)}"
        seq = self.llm.processor.process(rid, prompt, params)  # validated, tokenised, built once, here
        if not isinstance(rid, str):
            raise RequestTypeError(f"request_id: expected a string, got {type(rid).__name__}", "request_id")
        loop = asyncio.get_running_loop()
        req = StreamState(rid, seq.prompt_ids, seq.params, prompt if isinstance(prompt, str) else None, loop,
                          asyncio.Event(), seq=seq)
        if record_steps:
            req.step_log = seq.step_log = StepLog(seq.params.max_tokens)
        with self._cond:
            if self._dead is not None:
                raise RuntimeError("the engine thread has died") from self._dead
            if self._closing:
                raise RuntimeError("the AsyncEngine is shut down")
            if rid in self._requests:
                raise RequestError(f"request_id {rid!r} is already in use", "request_id")
            self._requests[rid] = req
            self._inbox.append(("add", req))
            self._cond.notify()
        return RequestStream(req, self._abandon)

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> RequestOutput:
        """The final output of one request."""
        out = None
        stream = self.add_request(prompt, params, request_id)
        try:
            async for out in stream:
                pass
        finally:
            await stream.aclose()  # a no-op once the final output was taken
        assert out is not None and out.finished
        return out

    def abort(self, request_id: str) -> None:
        """End a request: its pages are freed before the next engine step and its stream ends with a final
        output whose finish_reason is 'abort'. Unknown or already finished ids are ignored. Any thread."""
        with self._cond:
            if request_id in self._requests:
                self._inbox.append(("abort", request_id))
                self._cond.notify()

    def shutdown(self) -> None:
        """Abort every unfinished request, stop the engine thread and wait for it. Idempotent. Blocks for up to
        one engine step; from a coroutine prefer `await engine.aclose()`."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()
            if self._owns_llm:
                self.llm.shutdown()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.shutdown)

    async def __aenter__(self) -> "AsyncEngine":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def _abandon(self, req: StreamState) -> None:
        """The consumer of `req` is gone: abort that very request (not a later one reusing its id). Any thread."""
        with self._cond:
            if not req.done and self._requests.get(req.request_id) is req:
                self._inbox.append(("abort", req))
                self._cond.notify()

    # engine thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        eng = self._engine
        try:
            while True:
                with self._cond:
                    while not self._inbox and not self._closing and not eng.has_unfinished():
                        self._cond.wait()
                    cmds, self._inbox = self._inbox, []
                    closing = self._closing
                deliveries: list[Delivery] = []
                for kind, arg in cmds:
                    if kind == "add":
                        self._add(arg, deliveries)
                    elif isinstance(arg, StreamState):  # a stream's consumer went away: that request only
                        if self._requests.get(arg.request_id) is arg:
                            self._abort(arg.request_id, deliveries)
                    else:
                        self._abort(arg, deliveries)
                if closing:
                    for rid in self._live_ids():
                        self._abort(rid, deliveries)
                elif eng.has_unfinished():
                    self._step(deliveries)
                self._publish()
                if self._deliver(deliveries):
                    self._publish()
                if closing:
                    return
                del cmds, deliveries  # hold no request's outputs (nor its event loop) while waiting for work
        except BaseException as exc:  # a bug in this loop: fail everything rather than hang the callers
            with self._cond:
                self._dead = exc
                reqs = list(self._requests.values())
                self._requests.clear()
            err = EngineError(f"the engine thread died: {exc!r}")
            err.__cause__ = exc
            for req in reqs:
                req.done = True
                self._totals.failed += 1
            for rid in list(eng.requests):  # leave the LLM's engine empty and its pages free
                try:
                    eng.abort(rid)
                except Exception:  # noqa: BLE001 - best effort on a broken engine
                    pass
            self._publish()
            self._deliver([(r, err) for r in reqs])
            if isinstance(exc, ParallelError):  # an expected way to die (a lost worker): said once, no traceback
                log.error("engine stopped: %s", exc)
                return
            raise
        finally:
            eng.release(self)

    def _add(self, req: StreamState, deliveries: list[Delivery]) -> None:
        if req.done:
            return
        try:
            self._engine.add(req.seq, stream=True)
            if req.step_log is not None:
                self._recording[req.request_id] = req
        except Exception as exc:  # built on the caller's side already; only an engine invariant breaks here
            self._retire(req)
            self._totals.failed += 1
            deliveries.append((req, _error(req, exc)))

    def _abort(self, request_id: str, deliveries: list[Delivery]) -> None:
        req = self._requests.get(request_id)
        if req is None or req.done:
            return
        self._engine.abort(request_id)
        self._retire(req)
        self._totals.aborted += 1
        last, stats = req.last, copy.copy(req.seq.stats) if req.seq is not None else SeqStats()
        tok = self._engine.model.tokenizer
        deliveries.append((req, RequestOutput(
            request_id, req.prompt_ids, list(last.token_ids) if last else [],
            last.text if last else ("" if tok is not None else None), "abort", stats, req.prompt, finished=True,
            seed=req.params.seed, step_log=req.step_log)))

    def _step(self, deliveries: list[Delivery]) -> None:
        eng = self._engine
        try:
            outs = eng.step()
        except EngineStepError as exc:  # the engine cleaned up: deliver what finished, fail what it failed
            self._totals.steps += 1
            self._outputs(exc.outputs, deliveries)
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            for rid in exc.failed:
                req = self._requests.get(rid)
                if req is not None and not req.done:
                    self._retire(req)
                    self._totals.failed += 1
                    deliveries.append((req, _error(req, cause)))
            return
        self._totals.steps += 1
        self._outputs(outs, deliveries)

    def _outputs(self, outs: list[RequestOutput], deliveries: list[Delivery]) -> None:
        delivered = set()
        for out in outs:
            req = self._requests.get(out.request_id)
            if req is None:
                continue
            out.prompt = req.prompt
            out.step_log = req.step_log
            delivered.add(out.request_id)
            if out.finished:
                self._retire(req)
                self._totals.finished += 1
            else:
                out = dataclasses.replace(out, stats=copy.copy(out.stats))
                req.last = out
            deliveries.append((req, out))
        self._notify_steps(delivered, deliveries)

    def _notify_steps(self, delivered: set[str], deliveries: list[Delivery]) -> None:
        """Wake the consumers of recording requests that took a step but got no output in it (the wake-up is a
        cumulative output, so an unread one is replaced, never queued; the steps themselves are in the log)."""
        tok = self._engine.model.tokenizer
        for req in list(self._recording.values()):
            log = req.step_log
            assert log is not None
            if log.num_steps == req.steps_notified:
                continue
            req.steps_notified = log.num_steps
            if req.request_id in delivered:
                continue
            last = req.last
            deliveries.append((req, RequestOutput(
                req.request_id, req.prompt_ids, last.token_ids if last else [],
                last.text if last else ("" if tok is not None else None), None,
                copy.copy(req.seq.stats) if req.seq is not None else SeqStats(), req.prompt, finished=False,
                seed=req.params.seed, step_log=log)))

    def _live_ids(self) -> list[str]:
        with self._cond:
            return list(self._requests)

    def _retire(self, req: StreamState) -> None:
        req.done = True
        self._recording.pop(req.request_id, None)
        if req.seq is not None:
            self._totals.positions += req.seq.stats.positions_computed
            self._totals.tokens += req.seq.stats.tokens_committed
        with self._cond:
            self._requests.pop(req.request_id, None)

    def _publish(self) -> None:
        eng, t = self._engine, self._totals
        live = list(eng.requests.values())
        pc = eng.prefix_cache
        self._stats = EngineStats(
            running=len(eng.scheduler.running), waiting=len(eng.scheduler.waiting),
            kv_pages_used=eng.allocator.num_used if pc is None else pc.num_used,
            kv_pages_total=eng.allocator.num_pages, steps=t.steps,
            prefix_cache_queries=0 if pc is None else pc.queries, prefix_cache_hits=0 if pc is None else pc.hits,
            positions_computed=t.positions + sum(s.stats.positions_computed for s in live),
            tokens_committed=t.tokens + sum(s.stats.tokens_committed for s in live),
            preemptions=eng.scheduler.num_preemptions, finished=t.finished, aborted=t.aborted, failed=t.failed)

    def _deliver(self, deliveries: list[Delivery]) -> bool:
        """Hand each item to its request's loop; returns True if a request was aborted because its loop is gone."""
        aborted = False
        for req, item in deliveries:
            try:
                req.loop.call_soon_threadsafe(req.post, item)
            except RuntimeError:  # the caller's event loop is closed: nobody will read this request
                if not req.done:
                    self._abort(req.request_id, [])
                    aborted = True
        return aborted


def _error(req: StreamState, exc: BaseException) -> EngineError:
    err = EngineError(f"request {req.request_id}: engine step failed: {exc!r}")
    err.__cause__ = exc
    return err
