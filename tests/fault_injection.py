"""Test-side fault injection: wrappers around the engine's parts, so the product carries no test hooks.

- `FaultyExecutor` wraps the runner's executor (engine/executor): a step's forward raises once armed, or (tensor
  parallel) a worker rank raises / hangs on the next step, because the batch sent to it is a `PoisonedBatch`.
- `failing(obj, name, ...)` wraps any method (the scheduler's schedule / update, the runner's canvas reads) so that
  its n-th call raises.
Install with `installed(...)` / `failing(...)` (context managers that restore the original on exit).
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Any, Callable, Iterator

import torch

from engine.forward_batch import ForwardBatch

HANG = "hang"
"""A worker fault that sleeps instead of taking part in the step's collectives."""


@dataclasses.dataclass(slots=True)
class PoisonedBatch(ForwardBatch):
    """A ForwardBatch that rank 0 runs as usual but whose copy sent to the workers fails there: the worker's
    `batch.to(device)` raises RuntimeError(fault), or with fault HANG sleeps for an hour."""
    fault: str = ""
    at_worker: bool = False

    def to(self, device: torch.device | str) -> ForwardBatch:
        if self.at_worker:
            if self.fault == HANG:
                time.sleep(3600)
            raise RuntimeError(self.fault)
        plain = _plain(self).to(device)
        return PoisonedBatch(**_fields(plain), fault=self.fault, at_worker=True)


def _fields(batch: ForwardBatch) -> dict[str, Any]:
    return {f.name: getattr(batch, f.name) for f in dataclasses.fields(ForwardBatch)}


def _plain(batch: ForwardBatch) -> ForwardBatch:
    return ForwardBatch(**_fields(batch))


class FaultyExecutor:
    """Wraps an executor: everything is delegated, except that an armed fault fires on a later `run`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._raise_on: tuple[int, BaseException, Callable[[], None] | None] | None = None
        self._worker_fault: str | None = None
        self.runs = 0
        self.fired = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def fail_run(self, exc: BaseException, after: int = 0, on_fire: Callable[[], None] | None = None) -> None:
        """The (after + 1)-th run from now raises `exc` on this process, before the forward (on the thread that
        steps the engine; on_fire() runs there first)."""
        with self._lock:
            self._raise_on = (self.runs + after + 1, exc, on_fire)
            self.fired.clear()

    def fail_worker(self, fault: str) -> None:
        """Tensor parallel: on the next run, every worker rank raises RuntimeError(fault) (HANG: hangs)."""
        self._worker_fault = fault

    def run(self, batch: ForwardBatch, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.runs += 1
            armed = self._raise_on
            if armed is not None and armed[0] == self.runs:
                self._raise_on = None
                if armed[2] is not None:
                    armed[2]()
                self.fired.set()
                raise armed[1]
            fault, self._worker_fault = self._worker_fault, None
        if fault is not None:
            batch = PoisonedBatch(**_fields(batch), fault=fault)
        return self.inner.run(batch, *args, **kwargs)


@contextlib.contextmanager
def installed(engine: Any) -> Iterator[FaultyExecutor]:
    """Wrap an LLMEngine's executor (the runner's) for the duration of the block."""
    runner = engine.runner
    inner = runner.executor
    wrapper = FaultyExecutor(inner)
    runner.executor = wrapper
    try:
        yield wrapper
    finally:
        runner.executor = inner


@contextlib.contextmanager
def failing(obj: Any, name: str, exc: Callable[[], BaseException], on_call: int | Callable[[int], bool] = 1
            ) -> Iterator[list[int]]:
    """Wrap obj.name so that the calls for which `on_call` holds (an int: that call, counting from 1) raise exc()
    before reaching the real method. Yields the list of call numbers so far (its length is the count)."""
    real, own = getattr(obj, name), vars(obj).get(name, _MISSING)
    calls: list[int] = []
    hit = (lambda n: n == on_call) if isinstance(on_call, int) else on_call

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(calls) + 1)
        if hit(len(calls)):
            raise exc()
        return real(*args, **kwargs)

    setattr(obj, name, wrapper)
    try:
        yield calls
    finally:
        if own is _MISSING:
            delattr(obj, name)  # the class's method shows again
        else:
            setattr(obj, name, own)


_MISSING = object()
