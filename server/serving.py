"""OpenAI request -> prompt ids + SamplingParams -> engine -> OpenAI response or SSE stream.

Each choice (prompt x n) is one engine request. Streams send one content delta per finished block of a choice,
text only ever extended; the request is aborted in the engine as soon as its client is gone (streaming or not).
A request's choices run through a ChoiceRunner (server/choice_runner.py): bounded memory for slow readers, finished
work accounted at once, and at most max_live of them in the batch at a time.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from jinja2 import TemplateError
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.async_engine import EngineError
from engine.outputs import RequestOutput
from engine.param_schema import api_names
from engine.errors import RequestTooLargeError, TokenizerMissingError
from engine.sampling_params import SamplingParams, SamplingParamsError, check_context, step_budget

from .config import ServerConfig
from .engine_client import EngineClient
from .errors import APIError, bad_request
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from .choice_runner import ChoiceRunner
from .sse import SSEResponse
from .structured import ToolCalls, ToolStream, compile_checked, request_constraint
from .step_events import step_event

log = logging.getLogger("unmask.server")

PARAM_FIELDS = tuple(f for f in api_names() if f != "max_tokens")
"""Request fields passed to SamplingParams under the same name, from its schema (max_tokens is handled apart: chat
also takes max_completion_tokens)."""
SEED_MASK = 2 ** 63 - 1
UNSUPPORTED_LOGPROBS = ("logprobs are not supported by this server (refused rather than ignored, so that "
                        "log-likelihood evaluations do not get silently wrong answers)")


@dataclass(slots=True)
class Choice:
    """One engine request: a prompt and one of its n samples."""
    index: int
    prompt_idx: int
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    stream: AsyncIterator[RequestOutput] | None = None
    final: RequestOutput | None = None
    sent: str = ""
    """Text streamed so far."""
    t_first: float | None = None
    done: bool = False
    steps_sent: int = 0
    """Denoising steps already streamed (stream_options.include_steps)."""
    tools: ToolStream | None = None
    """A forced tool call's stream state (chat with tool_choice required / named)."""


@dataclass(slots=True)
class Job:
    """One HTTP request: its choices and timing."""
    kind: str  # "chat" | "completion"
    id: str
    created: int
    t0: float
    prompts: list[list[int]]
    choices: list[Choice] = field(default_factory=list)
    tool_calls: ToolCalls | None = None
    """Set when the request forces a tool call (chat tool_choice required / named)."""


class OpenAIServing:
    def __init__(self, engine: EngineClient, config: ServerConfig, metrics: Metrics) -> None:
        self.engine, self.config, self.metrics = engine, config, metrics
        self.inflight = 0
        """Engine requests (choices) submitted and not yet ended."""
        self.draining = False
        """Set on shutdown: new requests are refused with 503."""
        self._idle = asyncio.Event()
        self._idle.set()
        self.limits = config.limits.resolve(engine.info.max_model_len)
        self.max_live = self.limits.request_slots(engine.info.max_num_seqs)
        """Choices of one request in the engine at once (None: no cap)."""
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unmask-tokenize")

    # entry points --------------------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        self._check_common(req)
        if req.logprobs or req.top_logprobs:
            raise bad_request(UNSUPPORTED_LOGPROBS, "logprobs" if req.logprobs else "top_logprobs")
        if not self.engine.info.has_chat_template:
            raise bad_request("this model has no chat template; use /v1/completions", "messages")
        max_tokens = req.max_completion_tokens or req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        size = sum(len(m["content"]) for m in messages)
        self.limits.check_prompt_size("".join(m["content"] for m in messages), "messages",
                                      self.engine.info.max_token_chars)
        if req.tools:  # the template renders every tool's JSON schema: its cost is not the messages' length
            size = sys.maxsize
        ids = await self._offload(size, self._encode_chat, messages, req.tools)
        return await self._run("chat", req, [ids], max_tokens, param, raw)

    async def completion(self, req: CompletionRequest, raw: Request) -> Response:
        self._check_common(req)
        if req.logprobs is not None:
            raise bad_request(UNSUPPORTED_LOGPROBS, "logprobs")
        if req.echo:
            raise bad_request("echo is not supported by this server", "echo")
        prompts: list[str | list[int]] = req.prompt
        size = sum(len(p) for p in prompts)
        many = len(prompts) > 1
        for p in prompts:
            self.limits.check_prompt_size(p, "prompt", self.engine.info.max_token_chars)
        ids = await self._offload(size, lambda: [self._encode(p, f"prompt[{i}]" if many else "prompt")
                                                 for i, p in enumerate(prompts)])
        return await self._run("completion", req, ids, req.max_tokens, "max_tokens", raw)

    # validation and translation -------------------------------------------------------------------------
    def _check_common(self, req: SamplingFields) -> None:
        try:
            check_unicode(req)
        except APIError as e:  # one prompt is named `prompt` (as in every other error), several `prompt[i]`
            if e.param and e.param.startswith("prompt[0]") and len(getattr(req, "prompt", ())) == 1:
                e.param, e.message = "prompt", "prompt" + e.message.removeprefix("prompt[0]")
            raise
        if req.model is not None and req.model not in self.config.served_model_names:
            raise APIError(404, f"The model `{req.model}` does not exist.", "model")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options can only be set when stream is true", "stream_options")
        if self.draining:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
        if not self.engine.healthy():
            reason = getattr(self.engine, "unhealthy_reason", lambda: None)()
            raise APIError(503, "the engine is not running" + (f" ({reason})" if reason else ""),
                           headers={"Retry-After": "5"})
        self.limits.check_fields(req)

    async def _offload(self, size: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Run tokenization inline when short, else on the tokenizer thread (the event loop stays free)."""
        if size <= self.config.tokenize_inline_chars:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn, *args)

    def _encode(self, prompt: str | list[int], where: str) -> list[int]:
        try:
            return self.engine.encode(prompt, where)
        except TokenizerMissingError as e:
            raise bad_request(f"{where}: this model has no tokenizer; send token ids ({e})", where.split("[")[0])
        except (ValueError, TypeError) as e:
            if isinstance(prompt, str) and not str(e).startswith(where):  # the tokenizer's own words: not ours
                raise bad_request(f"{where}: the tokenizer cannot encode this text ({type(e).__name__})",
                                  where.split("[")[0])
            raise bad_request(str(e), where.split("[")[0])
        except Exception as e:  # noqa: BLE001 - anything else the tokenizer rejects is the input's fault
            log.warning("tokenizer rejected %s: %s: %s", where, type(e).__name__, e)
            raise bad_request(f"{where}: the tokenizer cannot encode this text ({type(e).__name__})",
                              where.split("[")[0])

    def _encode_chat(self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        try:
            if tools:  # rendered by the chat template when it has a tool format (EngineClient.encode_chat)
                return self.engine.encode_chat(messages, tools=tools)
            return self.engine.encode_chat(messages)
        except (ValueError, TypeError, TokenizerMissingError, TemplateError) as e:  # the request's fault
            raise bad_request(f"messages: cannot apply the chat template: {e}", "messages")

    def _params(self, req: SamplingFields, max_tokens: int | None, structured: Any = None) -> SamplingParams:
        values: dict[str, Any] = {k: v for k, v in self.config.sampling_defaults.items() if v is not None}
        if structured is not None:
            values["structured_outputs"] = structured
        for name in PARAM_FIELDS:
            v = getattr(req, name)
            if v is not None:
                values[name] = v
        if max_tokens is not None:
            values["max_tokens"] = max_tokens
        if values.get("top_k") == -1:
            values["top_k"] = 0
        try:
            return SamplingParams(**values)
        except SamplingParamsError as e:
            raise _params_error(e, structured)
        except (ValueError, TypeError) as e:
            raise bad_request(str(e))

    def _step_budget(self, params: SamplingParams, prompts: list[list[int]]) -> int:
        """The most denoising steps one choice of this request can take (engine/sampling_params.step_budget: the
        resolved block plan, block diffusion's per-block steps and token editing's post steps included)."""
        try:
            resolved = params.resolve(self.engine.info.defaults)
        except SamplingParamsError as e:
            raise _params_error(e, params.structured_outputs)
        return max(step_budget(resolved, len(ids)) for ids in prompts)

    def _check_length(self, ids: list[int], params: SamplingParams, param: str, prompt_param: str) -> None:
        """The engine's context check (engine/sampling_params.check_context), before any choice is queued."""
        defaults = self.engine.info.defaults
        gen = params.max_tokens if params.max_tokens is not None else defaults.max_tokens
        block = None
        if defaults.algorithm == "llada2":  # block diffusion: the canvas is rounded up to whole blocks
            block = params.block_length if params.block_length is not None else defaults.block_length
        try:
            check_context(len(ids), gen, self.engine.info.max_model_len, prompt_param, param, block)
        except RequestTooLargeError as e:
            raise bad_request(str(e), e.param)

    async def _run(self, kind: str, req: SamplingFields, prompts: list[list[int]], max_tokens: int | None,
                   param: str, raw: Request) -> Response:
        structured, tool_calls = request_constraint(req)
        base = self._params(req, max_tokens, structured)  # before compiling: a model without constraints says so
        if structured is not None:
            await compile_checked(self.engine, structured)
        prompt_param = "messages" if kind == "chat" else "prompt"
        for ids in prompts:
            self.limits.check_prompt_tokens(len(ids), prompt_param)
            self._check_length(ids, base, param, prompt_param)
        n_new = len(prompts) * req.n
        self.limits.check_work(n_new, self._step_budget(base, prompts))
        if n_new > max(self.config.max_queue, 1):
            raise bad_request(f"n x prompts = {n_new} choices exceed the server's queue limit "
                              f"({self.config.max_queue})", "n")
        waiting = self.inflight - self.engine.stats().running
        if waiting + n_new > self.config.max_queue:
            raise APIError(503, f"the server is overloaded ({waiting} requests waiting); retry later",
                           headers={"Retry-After": "1"})
        job = Job(kind, f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()),
                  time.monotonic(), prompts, tool_calls=tool_calls)
        for p, ids in enumerate(prompts):
            for i in range(req.n):
                params = base
                if i > 0 and base.seed is not None:
                    params = SamplingParams(**{**_fields(base), "seed": choice_seed(base.seed, i)})
                job.choices.append(Choice(len(job.choices), p, ids, params, f"{job.id}-{len(job.choices)}"))
        include_steps = bool(req.stream and req.stream_options and req.stream_options.include_steps)
        runner = self._start(job, include_steps)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return SSEResponse(self._stream(job, runner, include_usage, include_steps),
                               on_close=lambda: self._release(job))
        try:
            await _until_disconnected(raw, self._collect(job, runner))
        finally:
            await runner.aclose()
            self._release(job)
        return JSONResponse(self._response(job))

    def _start(self, job: Job, record_steps: bool = False) -> ChoiceRunner:
        """Count the job's choices in flight and submit the first ones (at most max_request_slots at once)."""
        extra = {"record_steps": True} if record_steps else {}  # plain requests: the EngineClient call as before

        def submit(c: Any) -> None:
            c.stream = self.engine.add(c.prompt_ids, c.params, c.request_id, **extra)

        for _ in job.choices:
            self._acquire()
        runner = ChoiceRunner(job.choices, submit, lambda c, out: self._finished(job, c, out), self.max_live)
        try:
            runner.start()
        except SamplingParamsError as e:
            self._release(job)
            raise bad_request(str(e).removeprefix("SamplingParams."), e.field)
        except MemoryError as e:  # the canvas can never fit the KV pool
            self._release(job)
            raise bad_request(str(e), "max_tokens")
        except (ValueError, TypeError) as e:
            self._release(job)
            raise bad_request(str(e), getattr(e, "field", None) or getattr(e, "param", None))
        except RuntimeError as e:  # the engine is shut down or dead
            self._release(job)
            raise APIError(503, f"the engine cannot take requests: {e}", headers={"Retry-After": "5"})
        return runner

    def _acquire(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def _release(self, job: Job) -> None:
        """Abort every choice still running (client gone, error), drop the job's unfinished choices from the
        in-flight count (submitted or not). Idempotent."""
        for c in job.choices:
            if c.done:
                continue
            c.done = True
            if c.stream is not None:
                self.engine.abort(c.request_id)
                self.metrics.request_aborted()
            self._end_one()

    def _end_one(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    # engine outputs -----------------------------------------------------------------------------------------
    def _finished(self, job: Job, c: Choice, out: RequestOutput) -> None:
        """A choice's final output, as soon as the engine produced it (whether or not its client reads)."""
        if c.done:  # already released (aborted) by the server
            return
        c.final, c.done = out, True
        self._end_one()
        now = time.monotonic()
        if out.finish_reason == "abort":  # not the client's doing: shutdown (the client's own aborts end earlier)
            self.metrics.request_aborted()
            return
        self.metrics.request_finished(out.finish_reason or "stop", len(c.prompt_ids), len(out.token_ids),
                                      now - job.t0, (c.t_first or now) - job.t0, out.stats.tokens_per_forward)

    @staticmethod
    def _check_aborted(out: RequestOutput) -> None:
        if out.finished and out.finish_reason == "abort":
            raise APIError(503, "the request was aborted: the server is shutting down")

    async def _collect(self, job: Job, runner: ChoiceRunner) -> None:
        try:
            async for c, out in runner:
                if c.t_first is None:
                    c.t_first = time.monotonic()
                self._check_aborted(out)
        except EngineError as e:
            log.error("engine failure in %s: %s", job.id, e, exc_info=e)
            raise APIError(500, f"the engine failed while running this request: {e}")

    async def _stream(self, job: Job, runner: ChoiceRunner, include_usage: bool,
                      include_steps: bool = False) -> AsyncIterator[bytes]:
        try:
            async for c, out in runner:
                first = c.t_first is None
                if first:
                    c.t_first = time.monotonic()
                self._check_aborted(out)
                if first and job.kind == "chat":  # with the first block, as vLLM does after prefill: clients
                    # (vllm bench, guidellm) time TTFT to the first chunk that has choices
                    yield self._chunk(job, c.index, {"role": "assistant", "content": ""}, None)
                if include_steps and out.step_log is not None:  # the steps so far, before the block's text
                    for step in out.step_log.since(c.steps_sent):
                        c.steps_sent += 1
                        yield self._chunk(job, c.index, {}, None, {
                            "diffusion_step": step_event(self.engine, step, out.step_log.gen_len)})
                text = self._new_text(c, out)
                if job.tool_calls is not None:  # a forced call: tool_calls deltas instead of content
                    for chunk in self._tool_chunks(job, c, out):
                        yield chunk
                    continue
                if out.finished:
                    extra = {"diffusion": _diffusion([out])}
                    if out.text is None:
                        extra["token_ids"] = out.token_ids
                    delta = {"content": text} if text else {}
                    yield self._chunk(job, c.index, delta, out.finish_reason, extra)
                elif text:
                    yield self._chunk(job, c.index, {"content": text}, None)
            if include_usage:
                yield _sse({"id": job.id, "object": self._chunk_object(job), "created": job.created,
                            "model": self.config.model_name, "choices": [], "usage": self._usage(job),
                            "diffusion": _diffusion([c.final for c in job.choices if c.final])})
        except APIError as e:
            yield _sse(e.body())
        except EngineError as e:
            log.error("engine failure in %s: %s", job.id, e, exc_info=e)
            yield _sse(APIError(500, f"the engine failed while running this request: {e}").body())
        except Exception as e:  # noqa: BLE001 - the 200 has gone out: report in-band, log the traceback
            log.exception("error while streaming %s", job.id)
            yield _sse(APIError(500, f"internal error: {type(e).__name__}").body())
        finally:
            await runner.aclose()
            self._release(job)
        yield b"data: [DONE]\n\n"

    @staticmethod
    def _new_text(c: Choice, out: RequestOutput) -> str:
        """The text added since the last delta; held back while it would retract what was sent or ends inside a
        multi-byte character."""
        text = out.text or ""
        if not out.finished:
            text = text.rstrip("\ufffd")
        if not text.startswith(c.sent):
            return ""
        new, c.sent = text[len(c.sent):], text
        return new

    def _tool_chunks(self, job: Job, c: Choice, out: RequestOutput) -> list[bytes]:
        if c.tools is None:
            c.tools = ToolStream(job.tool_calls)
        text = (out.text or "").rstrip("\ufffd") if not out.finished else (out.text or "")
        deltas = c.tools.deltas(text)
        chunks = [self._chunk(job, c.index, {"tool_calls": [d]}, None) for d in deltas]
        if out.finished:
            extra = {"diffusion": _diffusion([out])}
            if out.finish_reason == "stop" and c.tools.head is not None:
                chunks.append(self._chunk(job, c.index, {}, "tool_calls", extra))
            else:  # not a complete call (the canvas was too short): what is left as content
                chunks.append(self._chunk(job, c.index, {"content": text} if c.tools.head is None else {},
                                          out.finish_reason, extra))
        return chunks

    def _chunk_object(self, job: Job) -> str:
        return "chat.completion.chunk" if job.kind == "chat" else "text_completion"

    def _chunk(self, job: Job, index: int, delta: dict[str, Any], finish: str | None,
               extra: dict[str, Any] | None = None) -> bytes:
        choice: dict[str, Any] = {"index": index}
        if job.kind == "chat":
            choice["delta"] = delta
        else:
            choice["text"] = delta.get("content", "")
        choice.update(logprobs=None, finish_reason=finish, **(extra or {}))
        return _sse({"id": job.id, "object": self._chunk_object(job), "created": job.created,
                     "model": self.config.model_name, "choices": [choice]})

    def _usage(self, job: Job) -> dict[str, int]:
        prompt = sum(len(p) for p in job.prompts)
        completion = sum(len(c.final.token_ids) for c in job.choices if c.final is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _response(self, job: Job) -> dict[str, Any]:
        choices = []
        for c in job.choices:
            out = c.final
            assert out is not None
            finish = out.finish_reason
            if job.kind == "chat":
                ch: dict[str, Any] = {"index": c.index, "message": {"role": "assistant", "content": out.text or ""}}
                calls = job.tool_calls.parse(out.text or "") if job.tool_calls and finish == "stop" else None
                if calls is not None:
                    ch["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
                    finish = "tool_calls"
            else:
                ch = {"index": c.index, "text": out.text or ""}
                if out.text is None:
                    ch["token_ids"] = out.token_ids
            ch.update(logprobs=None, finish_reason=finish, diffusion=_diffusion([out]))
            choices.append(ch)
        return {"id": job.id, "object": "chat.completion" if job.kind == "chat" else "text_completion",
                "created": job.created, "model": self.config.model_name, "choices": choices,
                "usage": self._usage(job), "diffusion": _diffusion([c.final for c in job.choices if c.final])}


def check_unicode(value: Any, path: str = "") -> None:
    """400 naming the field when a string of the request holds a lone surrogate (JSON allows escapes such as
    "\\ud800" that are not Unicode text: no tokenizer or response could carry them). The message shows the offending
    code point, never the text itself."""
    if isinstance(value, str):
        if value.isascii():
            return
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = ord(value[e.start])
            param = path or None
            raise bad_request(f"{path or 'the request'}: contains a lone surrogate (U+{bad:04X}) at character "
                              f"{e.start}; text must be valid Unicode", param) from None
    elif isinstance(value, BaseModel):
        for k in type(value).model_fields:
            check_unicode(getattr(value, k), f"{path}.{k}" if path else k)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_unicode(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        if value and isinstance(value[0], int):
            return  # token ids
        for i, v in enumerate(value):
            check_unicode(v, f"{path}[{i}]")


def choice_seed(seed: int, i: int) -> int:
    """The seed of choice i of a request with `seed`: seed + i modulo 2**64, as a signed 64-bit integer (the range
    a request's `seed` accepts, so a choice is replayed alone with n=1 and this seed). Seeds equal modulo 2**64 give
    the same noise (engine/sampling_params.py)."""
    return (seed + i + (1 << 63)) % (1 << 64) - (1 << 63)


def _params_error(e: SamplingParamsError, structured: Any) -> APIError:
    """The 400 of an invalid SamplingParams field; a refused constraint names the field the client sent it in
    (response_format, tools or structured_outputs: StructuredOutputs.param)."""
    message, field = str(e).removeprefix("SamplingParams."), e.field
    if field == "structured_outputs" and structured is not None:
        sent = re.match(r"\w+", structured.param).group(0)
        message, field = sent + message.removeprefix(field), sent
    return bad_request(message, field)


def _fields(p: SamplingParams) -> dict[str, Any]:
    return {k: getattr(p, k) for k in p.__dataclass_fields__}


def _diffusion(outs: list[RequestOutput]) -> dict[str, Any]:
    steps = sum(o.stats.steps for o in outs)
    committed = sum(o.stats.tokens_committed for o in outs)
    return {"steps": steps, "forward_passes": sum(o.stats.forward_passes for o in outs),
            "tokens_committed": committed, "tokens_per_forward": round(committed / steps, 4) if steps else 0.0}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def _until_disconnected(raw: Request, work: Any) -> None:
    """Run `work` (a coroutine) unless the client disconnects first; then cancel it (the caller aborts)."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # an error after the client left: not logged
    watcher = asyncio.ensure_future(_disconnected(raw))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
            return
        task.cancel()
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


class ClientDisconnected(Exception):
    """The client went away before its response was ready."""


async def _disconnected(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return
