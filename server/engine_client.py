"""The one interface the routes use to reach an engine, and its implementation over an in-process AsyncEngine.

Tests run the app against the real engine (LocalEngineClient) and against fakes implementing EngineClient.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Protocol

from engine.async_engine import EngineStats
from engine.outputs import RequestOutput
from engine.sampling_params import GenerationDefaults, SamplingParams

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine
    from engine.constraints.spec import StructuredOutputs


@dataclass(frozen=True, slots=True)
class ModelInfo:
    path: str
    family: str
    dtype: str
    device: str
    vocab_size: int
    max_model_len: int
    """Prompt + generated tokens the model can attend over (its position limit)."""
    defaults: GenerationDefaults
    has_tokenizer: bool
    has_chat_template: bool
    max_token_chars: int | None = None
    """Characters of the vocabulary's longest token (bounds the tokens a text can need from below); None: unknown."""
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    max_num_seqs: int | None = None
    """Requests in the engine's running batch at most (None: unknown)."""


class EngineClient(Protocol):
    info: ModelInfo

    def encode(self, prompt: str | list[int], where: str) -> list[int]:
        """Token ids of a text prompt (or validated ids); ValueError/TypeError name `where`. May be slow (call it
        off the event loop for long inputs)."""

    def encode_chat(self, messages: list[dict[str, str]], tools: list[dict] | None = None) -> list[int]:
        """The chat template applied to the messages, with the generation prompt, as token ids (with `tools`
        rendered when the template has a tool format)."""

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """Queue a request; its stream yields one unfinished output per finished block, then the final output.
        Invalid params or a request that can never fit raise here. Stopping iteration early aborts it.
        Implementations that support step streams also take `record_steps=True` (see AsyncEngine.add_request):
        then every output carries `step_log` (a StepLog)."""

    def abort(self, request_id: str) -> None:
        """End a request (its pages are free by the next step); unknown ids are ignored."""

    def stats(self) -> EngineStats:
        """Running / waiting requests, KV pages, cumulative steps and tokens."""

    def healthy(self) -> bool:
        """Whether the engine loop is alive and admitting requests."""

    async def shutdown(self) -> None:
        """Abort what is left and stop the engine loop."""


class LocalEngineClient:
    """EngineClient over an AsyncEngine in this process (its loop runs on the engine's background thread)."""

    def __init__(self, engine: "AsyncEngine") -> None:
        self.engine = engine
        llm = engine.llm
        model = llm.model
        cfg = model.config
        tok = model.tokenizer
        self.info = ModelInfo(
            path=str(model.path), family=cfg.family, dtype=str(model.dtype).removeprefix("torch."),
            device=str(model.device), vocab_size=cfg.vocab_size, max_model_len=cfg.max_position_embeddings,
            defaults=llm.defaults, has_tokenizer=tok is not None,
            has_chat_template=getattr(tok, "chat_template", None) is not None,
            max_token_chars=max(map(len, tok.get_vocab()), default=None) if tok is not None else None,
            mask_token_id=cfg.mask_id, eos_token_id=cfg.eos_id, stop_token_ids=tuple(cfg.stop_ids),
            max_num_seqs=engine._engine.scheduler.cfg.max_num_seqs)
        self._pieces: dict[int, str] = {}

    @classmethod
    def from_model(cls, model: str | Path | None, **kwargs) -> "LocalEngineClient":
        from engine.async_engine import AsyncEngine
        return cls(AsyncEngine.from_model(model, **kwargs))

    def encode(self, prompt: str | list[int], where: str) -> list[int]:
        return self.engine.llm.prompt_ids(prompt, where)

    def encode_chat(self, messages: list[dict[str, str]], tools: list[dict] | None = None) -> list[int]:
        llm = self.engine.llm
        return llm.prompt_ids(llm.model.apply_chat_template(messages, tools=tools), "messages")

    def compile_structured(self, spec: "StructuredOutputs") -> None:
        """Compile a structured-output spec for the served model (cached); raises StructuredOutputsError."""
        from engine.constraints.build import compile_for
        compile_for(spec, self.engine.llm.model)

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str, *,
            record_steps: bool = False) -> AsyncIterator[RequestOutput]:
        return self.engine.add_request(prompt_ids, params, request_id, record_steps=record_steps)

    def token_pieces(self, ids: list[int]) -> list[str] | None:
        """The text of each token on its own (special tokens as their names); None without a tokenizer."""
        tok = self.engine.llm.model.tokenizer
        if tok is None:
            return None
        pieces = self._pieces
        for t in ids:
            if t not in pieces:
                pieces[t] = tok.decode([t], skip_special_tokens=False)
        return [pieces[t] for t in ids]

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats

    def healthy(self) -> bool:
        return self.engine.healthy

    def unhealthy_reason(self) -> str | None:
        return self.engine.unhealthy_reason

    async def shutdown(self) -> None:
        await self.engine.aclose()
