"""Faults injected into a running LocalEngineClient's engine thread by wrapping its parts (tests/fault_injection.py).

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
from tests.fault_injection import FaultyExecutor, installed


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


class StepFault:
    """step_fault's handle: arm() makes the next model step (the runner's executor, wrapped) raise InjectedFault."""

    def __init__(self, executor: FaultyExecutor, scheduler: Any) -> None:
        self._executor, self._scheduler = executor, scheduler
        self.fired = executor.fired
        self.victims: list[str] = []
        """Request ids that were running in the step the fault hit."""

    def arm(self) -> None:
        self._executor.fail_run(InjectedFault("injected fault in a model step"), on_fire=self._record)

    def _record(self) -> None:  # on the engine thread, inside the step
        self.victims = [s.request_id for s in self._scheduler.running]


@contextlib.contextmanager
def step_fault(client: LocalEngineClient) -> Iterator[StepFault]:
    """When armed, the next batched forward (the executor's run, inside LLMEngine.step) raises InjectedFault once."""
    engine = client.engine.llm.engine
    with installed(engine) as executor:
        yield StepFault(executor, engine.scheduler)


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
