"""OpenAI request and response schemas (pydantic), with the diffusion options as top-level request fields.

Every field has a description and its range, so `/openapi.json` and `/docs` describe the whole surface. The
sampling and diffusion fields are not written here: `SamplingFields` is built from the engine's request schema
(SamplingParams' `param(...)` fields, engine/param_schema.py; structured_outputs included), their enums from the
decoding registry. Structured outputs' OpenAI-shaped aliases (response_format, tools) are declared here with the
JSON Schemas of engine/constraints/spec.py, which also reads and validates them (server/structured.py). Unknown
request fields are ignored (as vLLM does). Ranges checked here are the ones a schema can state; the engine's
SamplingParams validation runs afterwards and its errors come back as 400s naming the same field.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model, field_validator

from engine.constraints.spec import RESPONSE_FORMAT_SCHEMA, TOOLS_SCHEMA
from engine.param_schema import http_specs

ROLES = ("system", "developer", "user", "assistant", "tool")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="Send one last chunk with `usage` (and `choices: []`) before "
                                                   "`data: [DONE]`.")
    include_steps: bool = Field(False, description="unmask extension: also send one chunk per denoising step whose "
                                                   "choice has an empty delta and `diffusion_step`: {step, block "
                                                   "[start, end), length, positions, token_ids, tokens}, positions "
                                                   "and block as offsets into the generated tokens. Replaying the "
                                                   "steps over an all-mask canvas rebuilds the output. Only "
                                                   "requests that ask pay for it.")


_STOP_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]}


class OpenAIFields(_Request):
    """OpenAI's request fields that are not sampling parameters."""
    model: str | None = Field(None, description="Served model name (see /v1/models). Omitted: the served model.")
    n: int = Field(1, ge=1, description="Number of choices to generate for each prompt. When sampling with a "
                                        "`seed`, choice i uses seed + i.")
    stream: bool = Field(False, description="Stream the answer as server-sent events, one content delta per "
                                            "finished diffusion block.")
    stream_options: StreamOptions | None = Field(None, description="Only with `stream: true`.")
    user: str | None = Field(None, description="End-user id (accepted, unused).")
    # structured outputs' OpenAI-shaped form (server/structured.py): read and validated by engine/constraints/spec.py
    # like the schema's own `structured_outputs` field, and documented from there
    response_format: Annotated[dict[str, Any] | None, WithJsonSchema(RESPONSE_FORMAT_SCHEMA)] = Field(
        None, description="OpenAI: {\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": "
                          "\"json_schema\", \"json_schema\": {\"name\", \"schema\", \"strict\"}}: the output is "
                          "guaranteed to parse (and validate) when finish_reason is stop. Alternative to "
                          "structured_outputs.")

    @field_validator("stop", mode="before", check_fields=False)
    @classmethod
    def _check_stop(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(s, str) for s in v):
            return v
        raise ValueError("must be a string or a list of strings")


SOURCES = {"model": "Unset: the model's default (or the server's, see /v1/models `diffusion_defaults`).",
           "random": "Unset: random.", "fixed": "Unset: the server's default (see /v1/models `diffusion_defaults`)."}


def request_field(name: str, description: str | None = None) -> tuple[Any, Any]:
    """The pydantic (annotation, Field) of a request parameter, from its SamplingParams schema: type, bounds, enum
    and help, every one nullable (unset: the server's or the model's default)."""
    spec, _ = http_specs()[name]
    bounds: dict[str, Any] = {}
    lo = spec.http_lo if spec.http_lo is not None else spec.lo
    hi = spec.http_hi if spec.http_hi is not None else spec.hi
    if spec.kind in ("int", "float"):
        if lo is not None:
            bounds["gt" if spec.lo_open and spec.http_lo is None else "ge"] = lo
        if hi is not None and not math.isinf(hi):
            bounds["lt" if spec.hi_open and spec.http_hi is None else "le"] = hi
    if spec.kind == "choice":
        values = (*spec.choice_values(), *spec.alias_map())
        # always an `enum` in the schema (pydantic writes a one-value Literal as `const`: editing has one rule today)
        annotation: Any = Annotated[Literal[values], WithJsonSchema(  # type: ignore[valid-type]
            {"type": "string", "enum": list(values)})] | None
    elif spec.kind == "stop":
        annotation = Annotated[Any, WithJsonSchema(_STOP_SCHEMA)]
    elif spec.kind == "object":  # validated by the spec's own code (its `convert`) when the server maps it
        assert spec.json_schema is not None, f"{name}: an HTTP object field needs its json_schema"
        annotation = Annotated[dict[str, Any] | None,
                               WithJsonSchema({"anyOf": [spec.json_schema(), {"type": "null"}]})]
    else:
        annotation = {"int": int, "float": float, "bool": bool}[spec.kind] | None
    text = description or (f"{spec.help} {SOURCES[spec.source]}" if spec.api else spec.help)
    return annotation, Field(None, description=text, **bounds)


def sampling_fields_model() -> type[OpenAIFields]:
    """The request model of the schema's parameters (max_tokens is declared per endpoint)."""
    return create_model(
        "SamplingFields", __base__=OpenAIFields,
        __doc__="Fields shared by chat and completions requests: OpenAI's plus every request parameter of the "
                "engine's schema (SamplingParams, engine/param_schema.py; OpenAI clients send the diffusion "
                "options through `extra_body`). Unset fields take the server's defaults, then the model's.",
        **{name: request_field(name) for name in http_specs() if name != "max_tokens"})


SamplingFields = sampling_fields_model()


_CONTENT_SCHEMA = {"anyOf": [
    {"type": "string"},
    {"type": "array", "items": {"type": "object", "required": ["type", "text"], "properties": {
        "type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}},
    {"type": "null"}]}


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        ..., description="Who wrote the message.")
    content: Annotated[Any, WithJsonSchema(_CONTENT_SCHEMA)] = Field(
        "", description="A string, or OpenAI's list of text parts `[{\"type\": \"text\", \"text\": ...}]` "
                          "(joined).")
    name: str | None = Field(None, description="Accepted, unused.")

    @field_validator("content", mode="before")
    @classmethod
    def _join_parts(cls, v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, str):
            return v
        if isinstance(v, list):
            texts = []
            for i, part in enumerate(v):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"part {i} must be a text part {{\"type\": \"text\", \"text\": \"...\"}} "
                                     f"(only text is supported)")
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError("must be a string or a list of text parts")


class ChatCompletionRequest(SamplingFields):  # type: ignore[misc,valid-type]
    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation so far.")
    logprobs: bool | None = Field(None, description="Not supported (true is refused with 400).")
    top_logprobs: int | None = Field(None, description="Not supported (a value > 0 is refused with 400).")
    max_tokens: int | None = request_field("max_tokens", "Generation length: the number of masked positions "
                                           "appended to the prompt (deprecated by OpenAI in favour of "
                                           "max_completion_tokens, which wins if both are set).")[1]
    max_completion_tokens: int | None = request_field("max_tokens", "Generation length (same as max_tokens).")[1]
    tools: Annotated[list[dict[str, Any]] | None, WithJsonSchema(TOOLS_SCHEMA)] = Field(
        None, description="OpenAI function tools [{\"type\": \"function\", \"function\": {name, description, "
                          "parameters}}] (read by engine/constraints/spec.py).")
    tool_choice: str | dict[str, Any] | None = Field(
        None, description="none | auto (default with tools: unconstrained answer, tools rendered when the chat "
                          "template supports them) | required (one call of one tool) | {\"type\": \"function\", "
                          "\"function\": {\"name\"}} (that tool). Forced calls come back as message.tool_calls.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted; a forced call is always a single call.")


_PROMPT_SCHEMA = {"anyOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1},
    {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}, "minItems": 1}]}


class CompletionRequest(SamplingFields):  # type: ignore[misc,valid-type]
    prompt: Annotated[Any, WithJsonSchema(_PROMPT_SCHEMA)] = Field(
        ..., description="A string, a list of strings, a list of token ids, or a list of token-id lists "
                         "(one completion per prompt, times n).")
    max_tokens: int | None = request_field("max_tokens")[1]
    logprobs: int | None = Field(None, description="Not supported (a value is refused with 400).")
    echo: bool | None = Field(None, description="Not supported (true is refused with 400).")

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v: Any) -> list[str | list[int]]:
        """Normalised to a list of prompts, each a string or a list of token ids."""
        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and v:
            if is_ids(v):
                return [v]
            if all(isinstance(p, str) for p in v) or all(is_ids(p) and p for p in v):
                return v
        raise ValueError("must be a string, a non-empty list of strings, a non-empty list of token ids, or a "
                         "list of non-empty token-id lists")


# responses ---------------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class DiffusionStats(BaseModel):
    """Per-request diffusion statistics (an extra field that OpenAI clients ignore)."""
    steps: int = Field(description="Denoising steps taken (summed over choices).")
    forward_passes: int = Field(description="Forward passes run (CFG counts two per step).")
    tokens_committed: int = Field(description="Tokens committed over all steps.")
    tokens_per_forward: float = Field(description="tokens_committed / steps.")


class ChatMessageOut(BaseModel):
    role: str = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    diffusion: DiffusionStats


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    diffusion: DiffusionStats


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "unmask"
    root: str
    parent: str | None = None
    max_model_len: int
    vocab_size: int | None = Field(None, description="unmask extension: token ids are in [0, vocab_size).")
    family: str = Field(description="Model family (llada, llada_moe, dream, rnd1).")
    diffusion_defaults: dict[str, Any] = Field(default_factory=dict, description="unmask extension: the value each "
                                               "unset sampling field takes (server-wide defaults over the model's).")
    special_tokens: dict[str, Any] = Field(default_factory=dict, description="unmask extension: mask_token_id, "
                                           "eos_token_id and stop_token_ids (ids that end generation).")


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
