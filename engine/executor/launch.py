"""start_parallel: bring up tensor / expert parallelism over torch.distributed.

Rank 0 is the user's process: it owns the scheduler, the canvases and every piece of host state, and its own shard
of the model. `start_parallel` spawns ranks 1..N-1 (torch.multiprocessing, spawn) on one machine, or, under
`torchrun`, every process calls it and ranks > 0 serve until rank 0 stops them (env:// rendezvous, any nodes).
Rank 0 gets back its shard of the model and the TPExecutor that drives every rank; the executor's shutdown()
also runs at interpreter exit.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import weakref
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ..errors import ParallelError
from ..loaded_model import DiffusionModel
from ..model.parallel import Shard
from .config import ParallelConfig, torchrun_rank
from .rendezvous import WorkerArgs, free_port, join
from .tp_driver import TPExecutor
from .tp_worker import serve, worker_main


def start_parallel(model_dir: Path, device: torch.device, dtype: str | torch.dtype, cfg: ParallelConfig,
                   kernels: str | None = None) -> tuple[DiffusionModel, TPExecutor]:
    """Start (or, under torchrun, join) the tensor-parallel group; load rank 0's shard; return its model (whose
    `logits` run on every rank) and the TPExecutor that drives the ranks. Under torchrun a rank > 0 serves here
    until rank 0 shuts down, then the process exits."""
    from ..loader import load_model, read_config
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
        args = WorkerArgs(str(model_dir), str(device), dtype_name, cfg, n, "env://", None)
        if rank != 0:
            code = serve(args, rank, None)
            raise SystemExit(code)
        procs, errors = [], None
    else:
        import torch.multiprocessing as mp
        ctx = mp.get_context("spawn")
        errors = ctx.Queue()
        args = WorkerArgs(str(model_dir), str(device), dtype_name, cfg, n, f"tcp://127.0.0.1:{free_port()}",
                           threads)
        procs = [ctx.Process(target=worker_main, args=(args, r, errors, os.getpid()), daemon=True,
                             name=f"unmask-tp{r}") for r in range(1, n)]
        with _main_module_hidden():
            for p in procs:
                p.start()
    saved = None
    if threads is not None and run is None:
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        control = join(args, 0, procs)
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
    atexit.register(_shutdown_at_exit, weakref.ref(executor))
    return model.with_executor(executor), executor


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
