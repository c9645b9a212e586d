"""LLM: the offline API. `LLM(model_dir).generate(prompts, params)` and `.chat(messages, params)`."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator, Sequence as Seq

import torch

from .input_processor import InputProcessor, Prompt, PromptIds
from .llm_engine import CacheConfig, EngineConfig, LLMEngine
from .hub import resolve_model_path
from .loader import load_model, read_generation_config, resolve_device, resolve_dtype
from .outputs import RequestOutput
from .sampling_params import GenerationDefaults, ModelLimits, ResolvedParams, SamplingParams, model_defaults
from .scheduler import SchedulerConfig
from .sequence import Sequence

Messages = list[dict[str, str]]


def default_model_dir() -> Path:
    from .bundled import DEFAULT_MODEL_DIR
    return DEFAULT_MODEL_DIR


class LLM:
    def __init__(self, model: str | Path | None = None, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "auto", *, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 16384, kv_cache_memory: int | None = None,
                 page_size: int = 16, kernels: str | None = None, tensor_parallel_size: int = 1, expert_parallel: bool = False,
                 parallel_timeout: float = 120.0, logits_memory: int | None = None,
                 enable_prefix_caching: bool = True) -> None:
        """kernels: "auto" (Triton on CUDA, torch on CPU) | "triton" | "torch"; None reads $UNMASK_KERNELS,
        else auto. "triton" on CPU runs the interpreted kernels and needs TRITON_INTERPRET=1.
        tensor_parallel_size N > 1 shards the model over N processes (this one is rank 0, the engine starts
        N-1 workers; under torchrun every rank calls this and ranks > 0 serve, then exit). expert_parallel: MoE
        experts partitioned over the ranks. parallel_timeout: seconds before a silent rank fails a step.
        Call shutdown() (or use `with LLM(...) as llm:`) to stop the workers; they also stop at exit.
        logits_memory: bytes the per-step candidate pass may use (the decoded positions are scored in chunks).
        enable_prefix_caching: block-causal models (LLaDA2) share the KV pages of common prompt prefixes between
        requests (engine/prefix_cache.py); other families never share."""
        from .executor import LocalExecutor, ParallelConfig, torchrun_rank
        model_dir = resolve_model_path(model) if model is not None else default_model_dir()  # dir or HF repo id
        self.parallel = ParallelConfig(tensor_parallel_size, expert_parallel, parallel_timeout)
        if self.parallel.tensor_parallel_size > 1 or torchrun_rank() is not None:
            from .executor.launch import start_parallel
            resolve_dtype(dtype)
            self.model, executor = start_parallel(model_dir, resolve_device(device), dtype, self.parallel, kernels)
        else:
            self.model = load_model(model_dir, device=device, dtype=dtype, kernels=kernels)
            executor = LocalExecutor(self.model.net)
        try:
            cfg = self.model.config
            self.defaults: GenerationDefaults = model_defaults(cfg.family, read_generation_config(model_dir))
            self.limits = ModelLimits(vocab_size=cfg.vocab_size, max_model_len=cfg.max_position_embeddings,
                                      has_tokenizer=self.model.tokenizer is not None)
            extra = {} if logits_memory is None else {"logits_memory": logits_memory}
            self.engine = LLMEngine(self.model, EngineConfig(
                cache=CacheConfig(kv_cache_memory=kv_cache_memory, page_size=page_size,
                                  enable_prefix_caching=enable_prefix_caching),
                scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
                **extra), executor)
            self.processor = InputProcessor(self.model, self.engine.scheduler, self.defaults, self.limits)
            """Requests -> Sequences (resolve, tokenise and check, build), shared with AsyncEngine."""
        except BaseException:
            executor.shutdown()
            raise
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (no-op for one process). Idempotent; the LLM cannot generate after."""
        self.engine.executor.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def memory_report(self) -> list[dict[str, int]]:
        """Per rank (one entry per process): param_bytes, kv_pool_bytes and rss_bytes (the process's resident set)."""
        return self.engine.executor.memory_report(self.engine.pool.nbytes)

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    def prompt_ids(self, prompt: Prompt, where: str = "prompt", max_tokens: int = 0) -> PromptIds:
        """Text or token ids, checked against this model (InputProcessor.prompt_ids)."""
        return self.processor.prompt_ids(prompt, where, max_tokens)

    def resolve_params(self, params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[ResolvedParams]:
        """One SamplingParams, or one per prompt (n of them), resolved against this model's defaults."""
        return self.processor.resolve(params, n)

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Generate for each prompt (a string or a list of token ids). Outputs come back in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        resolved = self.processor.resolve(params, len(prompts))
        seqs = [self.processor.sequence(f"gen-{next(self._ids)}", self.processor.prompt_ids(p, f"prompts[{i}]",
                                                                                         r.max_tokens), r)
                for i, (p, r) in enumerate(zip(prompts, resolved))]
        return self._run(seqs, prompts)

    def chat(self, messages: Messages | Seq[Messages],
             params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Apply the checkpoint's chat template (with the generation prompt) and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        resolved = self.processor.resolve(params, len(convs))
        seqs = [self.processor.sequence(f"gen-{next(self._ids)}",
                                        self.processor.chat_ids(c, f"messages[{i}]", r.max_tokens), r)
                for i, (c, r) in enumerate(zip(convs, resolved))]
        return self._run(seqs, [None] * len(convs))

    def iter_steps(self, prompt: Prompt, params: SamplingParams | None = None, *, chat: bool = False,
                   ) -> Iterator[tuple[list[int], RequestOutput | None]]:
        """Generate one prompt step by step: yields (generated canvas with masks, None) after each step, then
        (final canvas, output) once it finishes. Used by `unmask generate --show-steps`."""
        resolved = self.processor.resolve(params, 1)[0]
        if chat:
            ids = self.processor.chat_ids([{"role": "user", "content": prompt}], "prompt", resolved.max_tokens)
        else:
            ids = self.processor.prompt_ids(prompt, max_tokens=resolved.max_tokens)
        self._check_not_served()
        rid = f"gen-{next(self._ids)}"
        seq = self.engine.add(self.processor.sequence(rid, ids, resolved), keep_canvas=True)
        try:
            while True:
                finished = [o for o in self.engine.step() if o.request_id == rid and o.finished]
                if finished:
                    yield seq.final_canvas if seq.final_canvas is not None else finished[0].token_ids, finished[0]
                    return
                if self.engine.runner.has(seq):
                    yield self.engine.runner.generated(seq), None
        finally:
            self.engine.abort(rid)

    def _check_not_served(self) -> None:
        if self.engine.owner is not None:
            raise RuntimeError("this LLM is being served by an AsyncEngine, whose thread owns its engine; submit "
                               "requests through the AsyncEngine, or shut it down first")

    def _run(self, seqs: list[Sequence], prompts: list[Any]) -> list[RequestOutput]:
        """Add the requests, step until all finish. Whatever is raised (a step fault, KeyboardInterrupt), none of
        these requests is left in the engine: their pages are free and the engine is usable by the next call."""
        self._check_not_served()
        order: dict[str, int] = {}
        results: list[RequestOutput | None] = [None] * len(seqs)
        try:
            for i, seq in enumerate(seqs):
                self.engine.add(seq)
                order[seq.request_id] = i
            while any(r is None for r in results):
                for out in self.engine.step():
                    if out.request_id in order and out.finished:
                        i = order[out.request_id]
                        out.prompt = prompts[i] if isinstance(prompts[i], str) else None
                        results[i] = out
        finally:
            for rid in order:
                self.engine.abort(rid)
        return results  # type: ignore[return-value]
