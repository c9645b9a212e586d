"""TPExecutor: rank 0's side of tensor parallelism. Each step it broadcasts ("run", batch) on the control group,
then runs the same `run_batch` on its own shard; the collectives inside the forward line the ranks up and the
logits are gathered to rank 0 only.

Faults: a worker that raises reports its traceback on an error queue and exits; rank 0's next collective then
fails (peer closed, or the timeout), the executor is marked broken and every later call raises ParallelError
naming the rank and its error. `shutdown()` broadcasts "stop", joins the workers and kills any that linger.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ParallelError
from ..forward_batch import Consume, ForwardBatch, run_batch
from ..model.attention import KVPoolTensors
from .memory import memory_of


class TPExecutor:
    """Rank 0's side: runs each ForwardBatch on every rank (one control broadcast, then its own shard)."""

    def __init__(self, net: torch.nn.Module, control: Any, world_size: int, procs: list[Any], errors: Any,
                 saved_threads: int | None) -> None:
        self.net, self.control, self.world_size = net, control, world_size
        self.procs, self.errors = procs, errors
        self.broken: str | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._saved_threads = saved_threads

    # the executor interface (engine/forward_batch.py) ------------------------------------------------------
    def run(self, batch: ForwardBatch, kv: KVPoolTensors | None, consume: Consume | None = None
            ) -> torch.Tensor | None:
        with self._lock:
            self.check()
            try:  # the batch carries its attention layout: the workers bind it to their own pool shards
                self._send(("run", batch.to("cpu")))
                return run_batch(self.net, kv, batch, consume)
            except Exception as exc:
                raise self._fail(exc) from exc

    def init_pool(self, num_pages: int, page_size: int) -> None:
        self.call("init_pool", num_pages, page_size)

    def check(self) -> None:
        """Raise ParallelError if a worker is known lost."""
        if self._closed:
            raise ParallelError("the tensor-parallel workers are shut down")
        if self.broken is None:
            for rank, p in enumerate(self.procs, start=1):
                if not p.is_alive():
                    self.broken = self._describe("")
                    break
        if self.broken is not None:
            raise ParallelError(self.broken)

    @property
    def healthy(self) -> bool:
        try:
            self.check()
        except ParallelError:
            return False
        return True

    def call(self, method: str, *args: Any, collect: bool = False) -> list[Any] | None:
        """Run `method` on every worker (and nothing on rank 0); with collect, return each rank's result (rank 0's
        entry is None)."""
        with self._lock:
            self.check()
            try:
                self._send((method, *args))
                if not collect:
                    return None
                out: list[Any] = [None] * self.world_size
                dist.gather_object(None, out, dst=0, group=self.control)
                return out
            except Exception as exc:
                raise self._fail(exc) from exc

    def memory_report(self, pool_bytes: int) -> list[dict[str, int]]:
        """Per rank: parameter bytes, KV pool bytes and resident set size (bytes) of the process."""
        reports = self.call("memory", collect=True) or []
        reports[0] = memory_of(0, self.net, pool_bytes)
        return reports

    def shutdown(self) -> None:
        """Stop every worker (idempotent): broadcast stop, join, then kill any that linger."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.broken is None:
                try:
                    self._send(("stop",))
                except Exception:  # noqa: BLE001 - a worker already gone; kill below
                    pass
            for p in self.procs:  # a broken group's workers may be stuck in a collective: don't wait long
                p.join(timeout=10 if self.broken is None else 1)
            for p in self.procs:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group may not tear down cleanly
                pass
            if self._saved_threads is not None:
                torch.set_num_threads(self._saved_threads)

    # internals -----------------------------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        dist.broadcast_object_list([msg], src=0, group=self.control)

    def _fail(self, exc: BaseException) -> ParallelError:
        self.broken = self._describe(f"a collective failed on rank 0 ({type(exc).__name__}: {exc})")
        return ParallelError(self.broken)

    def _describe(self, fallback: str) -> str:
        """What happened to the workers: the first error a worker reported on the queue, else a worker that exited
        (waiting briefly for either: a worker that raised needs a moment to report and exit), else `fallback`."""
        deadline = time.monotonic() + 2.0
        while True:
            if self.errors is not None:
                try:
                    if not self.errors.empty():
                        rank, text = self.errors.get()
                        return f"tensor-parallel worker rank {rank} failed: {text}"
                except (OSError, EOFError, ValueError):
                    pass
            dead = [(r, p.exitcode) for r, p in enumerate(self.procs, start=1) if not p.is_alive()]
            if time.monotonic() > deadline or (dead and time.monotonic() > deadline - 1.5):
                if dead:
                    return f"tensor-parallel worker rank {dead[0][0]} exited with code {dead[0][1]}"
                return f"tensor-parallel execution failed: {fallback}"
            time.sleep(0.05)
