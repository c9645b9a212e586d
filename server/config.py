"""ServerConfig: everything `unmask serve` decides about the HTTP layer (the engine has its own configs)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .api_docs import DOCS_PATHS
from .connection import ConnectionLimits
from .limits import RequestLimits

PUBLIC_PATHS = ("/health", "/metrics", "/version", *DOCS_PATHS, "/openapi.json")
"""Paths that answer without an API key (probes, scrapers, the API description)."""
PUBLIC_PATHS += ("/", "/playground", "/playground.js", "/playground.css")
"""The playground's static page is public too: it holds no data, asks the user for the key and sends it with its
API calls."""


@dataclass(slots=True)
class ServerConfig:
    served_model_names: list[str]
    """Names accepted in a request's `model` field; the first is reported in responses and metric labels."""
    api_key: str | None = None
    """When set, every route but PUBLIC_PATHS needs `Authorization: Bearer <key>` (compared in constant time)."""
    allowed_origins: list[str] | None = None
    """CORS origins; None = no CORS headers at all."""
    max_queue: int = 1000
    """Sequences (choices) accepted but not yet running; beyond it new requests get 503 with Retry-After."""
    max_body_bytes: int = 32 << 20
    """Largest request body accepted (413 beyond)."""
    drain_timeout: float = 30.0
    """On SIGTERM / Ctrl-C: seconds in-flight requests get to finish before they are aborted."""
    limits: RequestLimits = field(default_factory=RequestLimits)
    """Per-request limits (n, messages, prompt tokens, max_tokens, steps, stop strings); see server/limits.py."""
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    """Server-wide values for unset SamplingParams fields (then the model's defaults apply)."""
    keep_alive_timeout: float = 30.0
    """Seconds an idle keep-alive connection stays open. Longer than the 5 s after which httpx / openai clients
    drop idle pooled connections, so a client never reuses a connection the server is closing (a lost request)."""
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    """Header / body / send timeouts and the connection cap (server/connection.py)."""
    tokenize_inline_chars: int = 4096
    """Prompts up to this many characters (or token ids) are tokenized on the event loop; longer ones in a thread."""

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(isinstance(n, str) and n for n in self.served_model_names):
            raise ValueError("served_model_names: need at least one non-empty name")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]
