"""When and how long to wait before sending a request again.

Retried: 429 and 503 answers and connection failures (refused, reset, connect timeout) before any response
byte arrived. A stream is retried only until its 200 arrives: once events may have been seen, it is never sent
again (the caller gets the error). Read timeouts are not retried: the server may be generating the answer.
"""
from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass, field

import httpx

RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 3
    """Attempts after the first; 0 disables retries."""
    initial_delay: float = 0.5
    """Backoff before the first retry when the server gives no Retry-After; doubles each attempt."""
    max_delay: float = 8.0
    """Cap on any single wait, a server's Retry-After included."""
    jitter: float = 0.25
    """Backoff waits are scaled by a random factor in [1 - jitter, 1] (Retry-After is used as given)."""
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.initial_delay < 0 or self.max_delay < 0:
            raise ValueError("initial_delay and max_delay must be >= 0")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_delay)
        backoff = min(self.initial_delay * 2 ** attempt, self.max_delay)
        return backoff * (1 - self.jitter * self.rng.random())


def parse_retry_after(response: httpx.Response, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date; also retry-after-ms), or None."""
    ms = response.headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000, 0.0)
        except ValueError:
            pass
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def is_retryable_exception(exc: Exception) -> bool:
    """Failures where the request cannot have reached the engine, or the connection dropped before a response."""
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError,
                            httpx.PoolTimeout, httpx.WriteError))
