"""Tensor / expert parallelism over torch.distributed: rank 0 drives, N-1 workers mirror its forwards.

Processes and groups:
- Rank 0 is the user's process: it owns the scheduler, the canvases and every piece of host state, and its own
  shard of the model. `start_parallel` spawns ranks 1..N-1 (torch.multiprocessing, spawn) on one machine, or, under
  `torchrun`, every process calls it and ranks > 0 serve until rank 0 stops them (env:// rendezvous, any nodes).
- Two process groups over the same ranks: the default one for the model's collectives (NCCL on CUDA, gloo on CPU;
  all-reduce after row-parallel layers, the logits gather) with a timeout, so a lost rank surfaces as an error
  instead of a hang; and a gloo control group that carries one `broadcast_object_list` per step (the step's
  ForwardBatch as CPU tensors). Workers idle in that broadcast, so it has no practical timeout; a dead rank 0 closes
  its sockets, which ends the broadcast with an error, and a watchdog thread exits a spawned worker whose parent is
  gone.
- Each step: rank 0 broadcasts ("run", batch) and runs the same `run_batch` on its shard; the collectives inside
  the forward line the ranks up; the logits are gathered to rank 0 only.

Faults: a worker that raises reports its traceback on an error queue and exits; rank 0's next collective then
fails (peer closed, or the timeout), the executor is marked broken and every later call raises ParallelError
naming the rank and its error. `shutdown()` broadcasts "stop", joins the workers and kills any that linger;
it also runs at interpreter exit.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import socket
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .errors import ParallelError
from .forward_batch import Consume, ForwardBatch, run_batch
from .kv_pool import KVPool
from .model.attention import KVPoolTensors
from .model.diffusion_model import DiffusionModel
from .model.parallel import Shard

CONTROL_TIMEOUT = timedelta(days=365)
"""Workers wait for rank 0's next step in the control broadcast; idling is not a fault."""


@dataclass(slots=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    """Ranks (processes, one device each) that share the model."""
    expert_parallel: bool = False
    """MoE layers: partition whole experts over the ranks instead of splitting each expert's intermediate size."""
    timeout_s: float = 120.0
    """Collective timeout: a rank that stops answering for this long fails the step (and the engine)."""
    backend: str | None = None
    """torch.distributed backend of the model collectives; None: nccl on CUDA, gloo on CPU."""

    def __post_init__(self) -> None:
        n = self.tensor_parallel_size
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {n!r}")
        if not isinstance(self.expert_parallel, bool):
            raise ValueError(f"expert_parallel must be a bool, got {self.expert_parallel!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"parallel timeout must be > 0 seconds, got {self.timeout_s!r}")
        if self.backend not in (None, "gloo", "nccl"):
            raise ValueError(f"parallel backend must be 'gloo' or 'nccl', got {self.backend!r}")


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when started by torchrun with more than one process, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "RANK" not in os.environ:
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: cuda:(base + r) for a CUDA base device, the CPU otherwise."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


@dataclass(slots=True)
class _WorkerArgs:
    model_dir: str
    device: str
    dtype: str
    config: ParallelConfig
    world_size: int
    init_method: str
    threads: int | None


# rank 0 ---------------------------------------------------------------------------------------------------------
class TPExecutor:
    """Rank 0's side: runs each ForwardBatch on every rank (one control broadcast, then its own shard)."""

    def __init__(self, net: torch.nn.Module, control: Any, world_size: int, procs: list[Any], errors: Any,
                 saved_threads: int | None) -> None:
        self.net, self.control, self.world_size = net, control, world_size
        self.procs, self.errors = procs, errors
        self.broken: str | None = None
        self._last_layout: torch.Tensor | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._saved_threads = saved_threads

    # the executor interface (engine/forward_batch.py) ------------------------------------------------------
    def run(self, batch: ForwardBatch, kv: KVPoolTensors | None, consume: Consume | None = None
            ) -> torch.Tensor | None:
        with self._lock:
            self.check()
            reuse = batch.read_slots is not None and batch.read_slots is self._last_layout
            sent = batch.to("cpu")
            if reuse:  # the batch layout (block tables) is unchanged since the last step: workers keep theirs
                sent.read_slots = sent.key_valid = None
            try:
                self._send(("run", sent, reuse))
                out = run_batch(self.net, kv, batch, consume)
            except Exception as exc:
                raise self._fail(exc) from exc
            if batch.read_slots is not None:
                self._last_layout = batch.read_slots
            return out

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


def start_parallel(model_dir: Path, device: torch.device, dtype: str | torch.dtype, cfg: ParallelConfig,
                   kernels: str | None = None) -> DiffusionModel:
    """Start (or, under torchrun, join) the tensor-parallel group; load rank 0's shard; return its model with a
    TPExecutor. Under torchrun a rank > 0 serves here until rank 0 shuts down, then the process exits."""
    from .loader import load_model, read_config
    n = cfg.tensor_parallel_size
    mcfg = read_config(model_dir)  # config errors surface before any process starts
    Shard(0, n, cfg.expert_parallel).check(mcfg.num_heads, mcfg.num_kv_heads, mcfg.num_experts, str(model_dir))
    dtype_name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if device.type == "cuda" and (device.index or 0) + n > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size {n} needs {n} CUDA devices from {device}, "
                         f"{torch.cuda.device_count()} visible")
    threads = max(1, (os.cpu_count() or 1) // n) if device.type == "cpu" else None
    run = torchrun_rank()
    if run is None and dist.is_initialized():
        raise ValueError("a tensor-parallel model is already running in this process (one per process): "
                         "shut it down first (llm.shutdown())")
    if run is not None:
        rank, world, local = run
        if world != n:
            raise ValueError(f"tensor_parallel_size {n} must equal torchrun's WORLD_SIZE {world}")
        if device.type == "cuda":
            device = torch.device("cuda", local)
        args = _WorkerArgs(str(model_dir), str(device), dtype_name, cfg, n, "env://", None)
        if rank != 0:
            code = _serve(args, rank, None)
            raise SystemExit(code)
        procs, errors = [], None
    else:
        import torch.multiprocessing as mp
        ctx = mp.get_context("spawn")
        errors = ctx.Queue()
        args = _WorkerArgs(str(model_dir), str(device), dtype_name, cfg, n, f"tcp://127.0.0.1:{_free_port()}",
                           threads)
        procs = [ctx.Process(target=_worker_main, args=(args, r, errors, os.getpid()), daemon=True,
                             name=f"unmask-tp{r}") for r in range(1, n)]
        with _main_module_hidden():
            for p in procs:
                p.start()
    saved = None
    if threads is not None and run is None:
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        control = _join(args, 0, procs)
        shard = Shard(0, n, cfg.expert_parallel)
        status = "ok"
        model = None
        try:
            model = load_model(model_dir, device, dtype, shard, kernels=kernels)
        except Exception as exc:  # noqa: BLE001 - reported to every rank, re-raised below
            status = f"{type(exc).__name__}: {exc}"
            load_error = exc
        statuses: list[Any] = [None] * n
        dist.all_gather_object(statuses, status, group=control)
        bad = [(r, s) for r, s in enumerate(statuses) if s != "ok"]
        if bad:
            dist.broadcast_object_list([("stop",)], src=0, group=control)
            if bad[0][0] == 0:
                raise load_error
            raise ParallelError(f"tensor-parallel worker rank {bad[0][0]} could not load {model_dir}: {bad[0][1]}")
    except BaseException:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        if saved is not None:
            torch.set_num_threads(saved)
        raise
    assert model is not None
    executor = TPExecutor(model.net, control, n, procs, errors, saved)
    model.executor = executor
    atexit.register(_shutdown_at_exit, weakref.ref(executor))
    return model


def _shutdown_at_exit(ref: "weakref.ref[TPExecutor]") -> None:
    executor = ref()
    if executor is not None:
        executor.shutdown()


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Spawned workers need nothing from the user's script, so don't let spawn re-run it in them: a script that
    builds an LLM at top level (no `if __name__ == "__main__":` guard) would otherwise start workers recursively."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__spec__ = None
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)
            if "__spec__" not in saved:
                main.__dict__.pop("__spec__", None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(args: _WorkerArgs, rank: int, procs: list[Any]) -> Any:
    """init_process_group (model group) + the gloo control group. Rank 0 watches the spawned workers meanwhile,
    so a worker that dies on start-up fails the start instead of waiting for the rendezvous timeout."""
    device = torch.device(args.device)
    backend = args.config.backend or ("nccl" if device.type == "cuda" else "gloo")
    timeout = timedelta(seconds=args.config.timeout_s)
    box: dict[str, Any] = {}

    def init() -> None:
        try:
            if dist.is_initialized():  # a torchrun script that set up its own group: use it
                box["control"] = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
                return
            kwargs: dict[str, Any] = dict(backend=backend, init_method=args.init_method, timeout=timeout)
            if args.init_method != "env://":
                kwargs.update(world_size=args.world_size, rank=rank)
            if device.type == "cuda":
                kwargs["device_id"] = device
            dist.init_process_group(**kwargs)
            box["control"] = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = exc

    t = threading.Thread(target=init, daemon=True)
    t.start()
    while t.is_alive():
        t.join(timeout=0.1)
        dead = [(r, p.exitcode) for r, p in enumerate(procs, start=1) if not p.is_alive()]
        if dead:
            raise ParallelError(f"tensor-parallel worker rank {dead[0][0]} exited during start-up "
                                f"(exit code {dead[0][1]})")
    if "error" in box:
        raise box["error"]
    return box["control"]


# workers --------------------------------------------------------------------------------------------------------
def _worker_main(args: _WorkerArgs, rank: int, errors: Any, parent_pid: int) -> None:
    """Entry point of a spawned worker: serve, and exit when the parent process goes away."""
    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    code = _serve(args, rank, errors)
    os._exit(code)  # skip interpreter teardown (gloo threads, CUDA contexts): nothing is left to flush


def _serve(args: _WorkerArgs, rank: int, errors: Any) -> int:
    """Join the group, load this rank's shard, then run whatever rank 0 broadcasts until "stop". Returns the exit
    code. Any exception is reported (error queue and stderr) and ends the worker, which fails rank 0's next
    collective instead of leaving it waiting."""
    from .loader import load_model
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        device = rank_device(torch.device(args.device), rank) if args.init_method != "env://" \
            else torch.device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        args.device = str(device)
        control = _join(args, rank, [])
        shard = Shard(rank, args.world_size, args.config.expert_parallel)
        status, model = "ok", None
        try:
            model = load_model(args.model_dir, device, args.dtype, shard)
        except Exception as exc:  # noqa: BLE001 - reported to rank 0
            status = f"{type(exc).__name__}: {exc}"
        dist.all_gather_object([None] * args.world_size, status, group=control)
    except Exception:  # noqa: BLE001
        _report(errors, rank, traceback.format_exc())
        return 1
    worker = _Worker(model, shard, device)
    try:
        with torch.inference_mode():
            while True:
                box: list[Any] = [None]
                dist.broadcast_object_list(box, src=0, group=control)
                method, *rest = box[0]
                if method == "stop":
                    break
                result = getattr(worker, method)(*rest)
                if method in _COLLECTED:
                    dist.gather_object(result, None, dst=0, group=control)
    except Exception:  # noqa: BLE001
        _report(errors, rank, traceback.format_exc())
        return 1
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    return 0


def _report(errors: Any, rank: int, text: str) -> None:
    last = text.strip().splitlines()[-1] if text.strip() else "unknown error"
    print(f"[unmask tp rank {rank}] {text}", file=sys.stderr, flush=True)
    if errors is not None:
        try:
            errors.put((rank, last))
            errors.close()
            errors.join_thread()  # flushed before the worker exits
        except Exception:  # noqa: BLE001
            pass


_COLLECTED = frozenset({"memory"})


class _Worker:
    """A worker rank's state: its shard of the model and of the KV pool, and the last batch layout."""

    def __init__(self, model: DiffusionModel | None, shard: Shard, device: torch.device) -> None:
        self.model, self.shard, self.device = model, shard, device
        self.pool: KVPool | None = None
        self.layout: tuple[torch.Tensor, torch.Tensor] | None = None
        self.fault: str | None = None

    def init_pool(self, num_pages: int, page_size: int) -> None:
        assert self.model is not None
        self.pool = KVPool(self.model.config, num_pages, page_size, self.model.dtype, self.device, self.shard)

    def run(self, batch: ForwardBatch, reuse: bool) -> None:
        assert self.model is not None
        if self.fault == "hang":
            time.sleep(3600)
        if self.fault is not None:
            raise RuntimeError(self.fault)
        batch = batch.to(self.device)
        if reuse:
            assert self.layout is not None, "rank 0 reused a batch layout this worker never received"
            batch.read_slots, batch.key_valid = self.layout
        elif batch.read_slots is not None:
            self.layout = (batch.read_slots, batch.key_valid)
        run_batch(self.model.net, None if self.pool is None else self.pool.tensors, batch)

    def memory(self) -> dict[str, int]:
        assert self.model is not None
        return memory_of(self.shard.rank, self.model.net, 0 if self.pool is None else self.pool.nbytes)

    def inject_fault(self, message: str) -> None:
        """Testing hook: the next run raises RuntimeError(message) in this worker (mid-step for rank 0), or with
        message "hang", sleeps instead of taking part in the step's collectives."""
        self.fault = message


def memory_of(rank: int, net: torch.nn.Module, pool_bytes: int) -> dict[str, int]:
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    rss = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return dict(rank=rank, param_bytes=params, kv_pool_bytes=pool_bytes, rss_bytes=rss)
