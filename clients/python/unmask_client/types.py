"""Typed responses: the OpenAI shapes plus the diffusion statistics the unmask server adds.

Every model keeps fields it does not know (extra="allow"), so a newer server never breaks an older client.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .params import Algorithm, CacheMode, Remasking  # noqa: F401 (re-exported; generated from the schema)


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())


class DiffusionStats(_Model):
    """How the request was decoded (the server's `diffusion` field, ignored by OpenAI clients)."""
    steps: int | None = None
    """Denoising steps the request ran."""
    forward_passes: int | None = None
    """Forward passes run for it (classifier-free guidance counts two per step)."""
    tokens_committed: int | None = None
    """Tokens committed over all steps."""
    tokens_per_forward: float | None = None
    """Committed tokens per forward pass: above 1 means parallel decoding paid off."""


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ToolFunction(_Model):
    name: str | None = None
    arguments: str | None = None
    """The call's arguments as a JSON string (valid against the tool's parameters)."""


class ToolCall(_Model):
    index: int | None = None
    """Streams only: which call a delta belongs to."""
    id: str | None = None
    type: str | None = "function"
    function: ToolFunction


class ChatMessage(_Model):
    role: str
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    """A forced tool call (tool_choice "required" or named); content is then None."""


class ChatChoice(_Model):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None = None


class ChatCompletion(_Model):
    id: str
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[ChatChoice]
    usage: Usage | None = None
    diffusion: DiffusionStats | None = None

    @property
    def text(self) -> str:
        """The first choice's content ('' when empty)."""
        return (self.choices[0].message.content or "") if self.choices else ""


class CompletionChoice(_Model):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None


class Completion(_Model):
    id: str
    object: str = "text_completion"
    created: int = 0
    model: str = ""
    choices: list[CompletionChoice]
    usage: Usage | None = None
    diffusion: DiffusionStats | None = None

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""


class DiffusionStep(_Model):
    """One denoising step of a choice (`stream_options.include_steps`): the positions it committed and their
    tokens. Positions and block are offsets into the generated tokens; replay with StepCanvas."""
    step: int
    """1-based; every step of the choice comes once, in order, before the content of the block it completes."""
    block: tuple[int, int]
    """The block decoded in this step, [start, end)."""
    length: int
    """Generated positions (max_tokens)."""
    positions: list[int] = Field(default_factory=list)
    token_ids: list[int] = Field(default_factory=list)
    tokens: list[str] | None = None
    """Text pieces of token_ids (special tokens by name); None for a model without a tokenizer."""
    edited_positions: list[int] = Field(default_factory=list)
    """Token editing (LLaDA2.1): committed positions this step replaced; their new tokens follow."""
    edited_token_ids: list[int] = Field(default_factory=list)
    edited_tokens: list[str] | None = None


class ChatDelta(_Model):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChunkChoice(_Model):
    index: int = 0
    delta: ChatDelta = Field(default_factory=ChatDelta)
    finish_reason: str | None = None
    diffusion_step: DiffusionStep | None = None
    """Only in step chunks (include_steps=True)."""


class ChatCompletionChunk(_Model):
    """One streamed event: a finished block's text delta, the role (first), the finish reason (last) or, with
    `choices == []`, the usage."""
    id: str = ""
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChatChunkChoice] = Field(default_factory=list)
    usage: Usage | None = None
    diffusion: DiffusionStats | None = None

    @property
    def text(self) -> str:
        """The first choice's content delta ('' for role-only, finish-only and usage chunks)."""
        return (self.choices[0].delta.content or "") if self.choices else ""

    @property
    def step(self) -> DiffusionStep | None:
        """The first choice's denoising step, in a step chunk (include_steps=True); else None."""
        return self.choices[0].diffusion_step if self.choices else None


class CompletionChunkChoice(_Model):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    diffusion_step: DiffusionStep | None = None
    """Only in step chunks (include_steps=True)."""


class CompletionChunk(_Model):
    id: str = ""
    object: str = "text_completion"
    created: int = 0
    model: str = ""
    choices: list[CompletionChunkChoice] = Field(default_factory=list)
    usage: Usage | None = None
    diffusion: DiffusionStats | None = None

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @property
    def step(self) -> DiffusionStep | None:
        """The first choice's denoising step, in a step chunk (include_steps=True); else None."""
        return self.choices[0].diffusion_step if self.choices else None


class ModelCard(_Model):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = ""
    root: str | None = None
    max_model_len: int | None = None
    vocab_size: int | None = None
    """Token ids are in [0, vocab_size) (unmask servers only)."""
    family: str | None = None
    """llada, llada_moe, dream or rnd1 (unmask servers only)."""
    diffusion_defaults: dict[str, Any] | None = None
    """The value each unset request field takes (unmask servers only)."""
    special_tokens: dict[str, Any] | None = None
    """mask_token_id, eos_token_id, stop_token_ids (unmask servers only)."""


class ModelList(_Model):
    object: str = "list"
    data: list[ModelCard]


Message = dict[str, Any] | ChatMessage
