"""Test hooks that inject faults into a running LocalEngineClient's engine thread.

    with step_fault(client) as fault:   # the next model step raises
        fault.arm()
    with loop_killer(client) as kill:   # the engine loop itself dies (outside any step)
        kill.arm()
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

from server.engine_client import LocalEngineClient


class InjectedFault(RuntimeError):
    """Raised by an armed hook inside the engine thread."""


class Hook:
    def __init__(self) -> None:
        self._armed = threading.Event()
        self.fired = threading.Event()
        self.victims: list[str] = []
        """Request ids that were running in the step the fault hit."""

    def arm(self) -> None:
        self.fired.clear()
        self._armed.set()

    def take(self) -> bool:
        if self._armed.is_set():
            self._armed.clear()
            self.fired.set()
            return True
        return False


@contextlib.contextmanager
def step_fault(client: LocalEngineClient) -> Iterator[Hook]:
    """When armed, the next batched forward (ModelRunner.step, inside LLMEngine.step) raises InjectedFault once."""
    runner = client.engine.llm.engine.runner
    hook = Hook()
    real = runner.step

    def step(seqs: list[Any], *a: Any, **kw: Any) -> Any:  # list[ScheduledRequest]
        if hook.take():
            hook.victims = [r.seq.request_id for r in seqs]
            raise InjectedFault("injected fault in a model step")
        return real(seqs, *a, **kw)

    runner.step = step
    try:
        yield hook
    finally:
        del runner.step


@contextlib.contextmanager
def loop_killer(client: LocalEngineClient) -> Iterator[Hook]:
    """When armed, the engine loop raises outside any step (where no request-level recovery applies): the engine
    thread dies."""
    engine = client.engine
    hook = Hook()
    real = engine._publish

    def publish() -> None:
        if hook.take():
            raise InjectedFault("injected fault in the engine loop")
        real()

    engine._publish = publish
    try:
        yield hook
    finally:
        with contextlib.suppress(AttributeError):
            del engine._publish
