"""Errors raised for bad user input (checkpoints, requests, parameters) and for engine faults.

Request faults (`RequestError` and its subclasses) are the caller's fault: a server maps them to HTTP 400 naming
`.param`. `EngineError` is the engine's fault (a step failed while the request was running)."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint directory cannot be loaded: the message names the file and the key."""


class RequestError(ValueError):
    """A request cannot be served as asked, through the caller's fault; `.param` names the offending input
    ('prompt', 'messages[1].content', a SamplingParams field, ...) when one is to blame."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class FieldError(RequestError):
    """One request field is invalid: the message is "<prefix><field>: <message>" and `.field` (also `.param`)
    names the field. Subclasses set `prefix` (SamplingParamsError, StructuredOutputsError)."""
    prefix = ""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{self.prefix}{field}: {message}", field)
        self.field = field


class RequestTypeError(RequestError, TypeError):
    """A request input has the wrong type (a TypeError as well, for callers that catch that)."""


class RequestTooLargeError(RequestError):
    """A request exceeds a limit (the model's context length, the KV pool, a configured bound). Raised before
    any memory is committed for it."""


class TokenizerMissingError(RequestError, RuntimeError):
    """A text prompt (or stop strings, or chat messages) was given but the checkpoint ships no tokenizer files."""


class EngineError(RuntimeError):
    """A step of the engine failed while the request was running (the original exception is the __cause__)."""


class EngineStepError(EngineError):
    """An engine step raised (the original exception is the __cause__). The engine is consistent again: every
    request of the step ended exactly once. `outputs` are the finished outputs the step produced before the fault
    (deliver them as usual); `failed` the ids of the requests it failed (removed, their KV pages freed)."""

    def __init__(self, message: str, outputs: list, failed: list[str]) -> None:
        super().__init__(message)
        self.outputs, self.failed = outputs, failed


class ChatMessageError(RequestError):
    """A chat message is malformed; `.param` names the message index and field ('messages[2].content')."""


class ParallelError(RuntimeError):
    """A tensor-parallel worker died, raised, or stopped answering: the model can no longer run."""
