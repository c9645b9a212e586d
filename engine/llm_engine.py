"""LLMEngine: the step loop (schedule -> run -> update) over the scheduler, the runner and the KV pool."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from .cache_manager import PageAllocator
from .errors import EngineStepError, ParallelError, RequestError
from .input_processor import build_sequence
from .executor import Executor, LocalExecutor
from .kv_pool import KVPool, kv_bytes_per_token
from .loaded_model import DiffusionModel
from .outputs import RequestOutput, cut_at_stop_token
from .prefix_cache import PrefixCache
from .runner import DEFAULT_LOGITS_MEMORY, ModelRunner
from .sampling_params import ResolvedParams
from .scheduler import ScheduleOutput, ScheduledRequest, Scheduler, SchedulerConfig
from .sequence import Sequence
from .stop_strings import StopStrings, decode, prefix_ids, stream_safe

DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass(slots=True)
class CacheConfig:
    kv_cache_memory: int | None = None
    """Bytes for the KV pool (per rank under tensor parallelism, each rank holding its KV heads). None: 1 GiB on
    CPU; on CUDA, gpu_memory_utilization of free memory."""
    gpu_memory_utilization: float = 0.9
    page_size: int = 16
    enable_prefix_caching: bool = True
    """Block-causal models: share the KV pages of common prompt prefixes between requests (prefix_cache.py)."""

    def __post_init__(self) -> None:
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")


@dataclass(slots=True)
class EngineConfig:
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    logits_memory: int = DEFAULT_LOGITS_MEMORY
    """Bytes for one step's candidate pass over the vocabulary: the decoded positions are processed in chunks of
    logits_memory / (vocab_size * 64 bytes) positions (at least one), whatever the batch."""

    def __post_init__(self) -> None:
        if not isinstance(self.logits_memory, int) or self.logits_memory <= 0:
            raise ValueError(f"logits_memory must be > 0 bytes, got {self.logits_memory!r}")


class LLMEngine:
    def __init__(self, model: DiffusionModel, cfg: EngineConfig | None = None, executor: Executor | None = None
                 ) -> None:
        """executor: runs the model's forwards (engine/executor; None: this process, LocalExecutor)."""
        self.model, self.cfg = model, cfg or EngineConfig()
        cc = self.cfg.cache
        memory = cc.kv_cache_memory
        if memory is None:
            if model.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(model.device)
                memory = int(free * cc.gpu_memory_utilization)
            else:
                memory = DEFAULT_CPU_KV_BYTES
        shard = model.net.shard
        num_pages = KVPool.pages_for_memory(model.config, model.dtype, cc.page_size, memory, shard)
        if num_pages < 1:
            per_page = kv_bytes_per_token(model.config, model.dtype, shard) * cc.page_size
            raise ValueError(f"kv_cache_memory {memory} bytes is less than one KV page ({per_page} bytes)")
        self.allocator = PageAllocator(num_pages, cc.page_size)
        self.pool = KVPool(model.config, num_pages, cc.page_size, model.dtype, model.device, shard)
        self.prefix_cache = (PrefixCache(self.allocator)
                             if cc.enable_prefix_caching and getattr(model.config, "block_causal", False) else None)
        """Prompt-prefix reuse (block-causal families only: bidirectional K/V depend on the whole canvas)."""
        self.scheduler = Scheduler(self.cfg.scheduler, self.allocator, self.prefix_cache)
        self.runner = ModelRunner(model, self.pool, executor if executor is not None else LocalExecutor(model.net),
                                  self.cfg.logits_memory)
        self.requests: dict[str, Sequence] = {}
        self._owner: object | None = None

    @property
    def owner(self) -> object | None:
        """Who holds the engine exclusively (an AsyncEngine stepping it from its thread), if anyone."""
        return self._owner

    def claim(self, owner: object) -> None:
        """Take the engine for `owner` (an AsyncEngine): nobody else may add requests or step it until release().
        Raises RuntimeError if another owner holds it or requests are unfinished."""
        if self._owner is not None:
            raise RuntimeError("this LLM is already served by an AsyncEngine; shut that one down first")
        if self.has_unfinished():
            raise RuntimeError("the LLM's engine has unfinished requests")
        self._owner = owner

    def release(self, owner: object) -> None:
        if self._owner is owner:
            self._owner = None

    @property
    def executor(self) -> Executor:
        """The runner's executor (health checks, memory reports, shutdown of tensor-parallel workers)."""
        return self.runner.executor

    def add_request(self, request_id: str, prompt_ids: list[int], params: ResolvedParams, *, stream: bool = False,
                    keep_canvas: bool = False) -> Sequence:
        """Queue a request from checked ids and resolved params (its Sequence built by the input processor's
        build_sequence). stream / keep_canvas: see add()."""
        if request_id in self.requests:
            raise RequestError(f"request_id {request_id!r} is already in use", "request_id")
        return self.add(build_sequence(self.model, self.scheduler, request_id, prompt_ids, params), stream=stream,
                        keep_canvas=keep_canvas)

    def add(self, seq: Sequence, *, stream: bool = False, keep_canvas: bool = False) -> Sequence:
        """Queue a Sequence built by the input processor (engine/input_processor.py). stream: step() also returns
        an unfinished output each time it completes a block (what AsyncEngine streams). keep_canvas: once
        finished, seq.final_canvas holds its whole generated canvas (past EOS; `unmask generate --show-steps`)."""
        if seq.request_id in self.requests:
            raise RequestError(f"request_id {seq.request_id!r} is already in use", "request_id")
        seq.stream, seq.keep_canvas = stream, keep_canvas
        self.scheduler.add(seq)
        self.requests[seq.request_id] = seq
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is None or seq.finished:
            return
        if self.runner.has(seq):
            self.runner.remove(seq)
        self.scheduler.finish(seq, "abort")

    def step(self) -> list[RequestOutput]:
        """One engine step: schedule, one batched forward, update. Returns the requests that finished in it and,
        for streaming requests, one unfinished output for each that completed a block.

        If anything in the step raises, every request of the step that did not finish is failed (removed, its
        pages freed) and EngineStepError carries the finished outputs and the failed ids; the engine stays usable.
        A BaseException that is not an Exception (KeyboardInterrupt), and a ParallelError (a lost tensor-parallel
        worker: no later step can run either), are re-raised as they are after the same cleanup."""
        sched: ScheduleOutput | None = None
        outs: list[RequestOutput] = []
        try:
            sched = self.scheduler.schedule()
            for seq in sched.admitted:
                self.runner.add(seq)
            if not sched.scheduled:
                return []
            recorded = [r for r in sched.scheduled if r.seq.step_log is not None]
            before = [self.runner.block_tokens(r.seq, r.block).clone() for r in recorded]
            result = self.runner.step(sched.scheduled)
            if recorded:
                self._record_steps(recorded, before)
            upd = self.scheduler.update(sched, result)
            for seq in upd.finished:
                outs.append(self._finish(seq))
            for seq in upd.blocks_done:
                out = self._block_done(seq)
                if out is not None:
                    outs.append(out)
            return outs
        except BaseException as exc:
            failed = self._fail_step(sched)
            if not isinstance(exc, Exception) or isinstance(exc, ParallelError):  # the model can no longer run
                raise
            raise EngineStepError(f"engine step failed: {exc!r}", [o for o in outs if o.finished], failed) from exc

    def _fail_step(self, sched: "ScheduleOutput | None") -> list[str]:
        """End every unfinished request of a failed step (finish_reason 'error'). Without a schedule (scheduling
        itself failed): the running requests, or every request when none runs, so a request that breaks
        admission cannot wedge the engine. Returns the failed request ids."""
        if sched is not None:
            victims = [r.seq for r in sched.scheduled] + [s for s in sched.admitted if s not in sched.seqs]
        else:
            victims = list(self.scheduler.running) or list(self.scheduler.waiting)
        failed = []
        for seq in victims:
            if seq.finished:
                continue
            self.runner.discard(seq)
            self.scheduler.finish(seq, "error")
            if self.requests.get(seq.request_id) is seq:
                del self.requests[seq.request_id]
            failed.append(seq.request_id)
        self.runner.reset_layout()  # the batch layout is rebuilt from the canvases left
        return failed

    def _record_steps(self, recorded: list[ScheduledRequest], before: list[torch.Tensor]) -> None:
        """Append this step's commits to each recording request's StepLog: the block positions that were masked
        before the step and hold a token after it (and, token editing, the committed ones it replaced). One
        device-to-host copy for all of them."""
        mask_id = self.model.config.mask_id
        old = torch.cat(before)  # [Nr] block tokens before the step, recorded requests concatenated
        new = torch.cat([self.runner.block_tokens(r.seq, r.block) for r in recorded])  # [Nr]
        changed = torch.nonzero(new != old)[:, 0]  # [C] ascending: commits and edits
        flat, toks, was = torch.stack([changed, new[changed], old[changed]]).tolist() if changed.numel() else ([],) * 3
        start = 0
        for r in recorded:
            bs, be = r.block
            end = start + be - bs
            lo, hi = bisect.bisect_left(flat, start), bisect.bisect_left(flat, end)
            off, g = bs - r.seq.prompt_len, r.seq.gen_len
            pos = [f - start + off for f in flat[lo:hi]]
            n = bisect.bisect_left(pos, g)  # block-causal canvases run past max_tokens to whole blocks: not output
            fills = [j for j in range(n) if was[lo + j] == mask_id]
            edits = [(pos[j], toks[lo + j]) for j in range(n) if was[lo + j] != mask_id]
            r.seq.step_log.record((max(off, 0), min(off + be - bs, g)), [pos[j] for j in fills],
                                  [toks[lo + j] for j in fills], edits)
            start = end

    def _text_state(self, seq: Sequence) -> "_TextState":
        if seq.text is None:
            p = seq.params
            # a constrained answer ends where its grammar does: stop strings do not cut it (the cut text would not
            # match the constraint)
            cut = p.stop and self.model.tokenizer is not None and p.structured_outputs is None
            seq.text = _TextState(StopStrings(p.stop) if cut else None)
        return seq.text

    def _block_done(self, seq: Sequence) -> RequestOutput | None:
        """A block of seq completed: finish it if its committed text now holds a stop string (searching only the
        new text), else (streaming) its unfinished output."""
        st = self._text_state(seq)
        if st.stops is None and not seq.stream:
            return None
        done = self.runner.generated(seq)[:seq.block_bounds()[0] - seq.prompt_len]
        ids = done if seq.params.ignore_eos else cut_at_stop_token(done, self.model.config.stop_ids)[0]
        tok = self.model.tokenizer
        text = decode(tok, ids) if tok is not None else None
        if st.stops is not None:
            if st.stops.find(text, st.searched) >= 0:
                return self._finish(seq)
            st.searched = len(text)
        if not seq.stream:
            return None
        if text is not None:  # stream only text that can no longer change or be cut, at a token boundary
            safe = stream_safe(text, st.stops)
            if not safe.startswith(st.emitted):  # a tokenizer whose prefix decodes differ: never retract
                safe = st.emitted
            if safe != text:
                ids = prefix_ids(ids, safe, tok)
                text = decode(tok, ids)
            st.emitted = text
        return RequestOutput(seq.request_id, seq.prompt_ids, ids, text, None, seq.stats, finished=False,
                             seed=seq.params.seed)

    def _finish(self, seq: Sequence) -> RequestOutput:
        gen = self.runner.remove(seq)
        if seq.keep_canvas:
            seq.final_canvas = gen
        ids, stopped = (gen, False) if seq.params.ignore_eos else cut_at_stop_token(gen, self.model.config.stop_ids)
        tok = self.model.tokenizer
        text = None
        if tok is not None:
            stops = self._text_state(seq).stops
            if stops is not None:
                ids, text, hit = stops.cut(ids, tok)
                stopped = stopped or hit
            else:
                text = decode(tok, ids)
        self.scheduler.finish(seq, "stop" if stopped else "length")
        self.requests.pop(seq.request_id, None)
        return RequestOutput(seq.request_id, seq.prompt_ids, ids, text, seq.finish_reason, seq.stats,
                             seed=seq.params.seed)


@dataclass(slots=True)
class _TextState:
    """A request's committed text, for stop strings and streaming."""
    stops: StopStrings | None
    searched: int = 0
    """Characters of the committed text already searched for stop strings."""
    emitted: str = ""
    """The text of the last unfinished output (each one extends the previous)."""
