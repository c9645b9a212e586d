"""unmask_client: Python client for the unmask OpenAI-compatible server (masked-diffusion LMs).

Needs only httpx and pydantic. See Client and AsyncClient.
"""
from .async_client import AsyncClient
from .client import Client
from .errors import (APIConnectionError, APIError, APITimeoutError, AuthenticationError, BadRequestError,
                     InternalServerError, NotFoundError, RateLimitError, ReadyTimeoutError, ServiceUnavailableError,
                     StreamError, UnmaskError)
from .retry import RetryPolicy
from .steps import StepCanvas
from .streaming import AsyncStream, Stream
from .types import (ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, DiffusionStats, DiffusionStep,
                    ModelCard, ToolCall, ToolFunction, Usage)

__version__ = "0.1.0"

__all__ = [
    "Client", "AsyncClient", "RetryPolicy", "Stream", "AsyncStream",
    "ChatCompletion", "ChatCompletionChunk", "Completion", "CompletionChunk", "DiffusionStats", "DiffusionStep",
    "ModelCard", "Usage", "StepCanvas", "ToolCall", "ToolFunction",
    "UnmaskError", "APIError", "BadRequestError", "AuthenticationError", "NotFoundError", "RateLimitError",
    "InternalServerError", "ServiceUnavailableError", "StreamError", "APIConnectionError", "APITimeoutError",
    "ReadyTimeoutError",
]
