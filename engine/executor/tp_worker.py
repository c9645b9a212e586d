"""Ranks > 0 of tensor parallelism: join the groups, load this rank's shard, then run whatever rank 0 broadcasts
(a step's ForwardBatch, pool set-up, a memory report) until "stop". A spawned worker also exits when its parent
process is gone (a watchdog thread); any exception is reported to rank 0 (error queue and stderr) and ends the
worker, which fails rank 0's next collective instead of leaving it waiting."""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist

from ..forward_batch import ForwardBatch, run_batch
from ..kv_pool import KVPool
from ..loaded_model import DiffusionModel
from ..model.parallel import Shard
from .config import rank_device
from .memory import memory_of
from .rendezvous import WorkerArgs, join


def worker_main(args: WorkerArgs, rank: int, errors: Any, parent_pid: int) -> None:
    """Entry point of a spawned worker: serve, and exit when the parent process goes away."""
    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    code = serve(args, rank, errors)
    os._exit(code)  # skip interpreter teardown (gloo threads, CUDA contexts): nothing is left to flush


def serve(args: WorkerArgs, rank: int, errors: Any) -> int:
    """Join the group, load this rank's shard, then run whatever rank 0 broadcasts until "stop". Returns the exit
    code. Any exception is reported (error queue and stderr) and ends the worker, which fails rank 0's next
    collective instead of leaving it waiting."""
    from ..loader import load_model
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        device = rank_device(torch.device(args.device), rank) if args.init_method != "env://" \
            else torch.device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        args.device = str(device)
        control = join(args, rank, [])
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
    """A worker rank's state: its shard of the model and of the KV pool."""

    def __init__(self, model: DiffusionModel | None, shard: Shard, device: torch.device) -> None:
        self.model, self.shard, self.device = model, shard, device
        self.pool: KVPool | None = None

    def init_pool(self, num_pages: int, page_size: int) -> None:
        assert self.model is not None
        self.pool = KVPool(self.model.config, num_pages, page_size, self.model.dtype, self.device, self.shard)

    def run(self, batch: ForwardBatch) -> None:
        assert self.model is not None
        run_batch(self.model.net, None if self.pool is None else self.pool.tensors, batch.to(self.device))

    def memory(self) -> dict[str, int]:
        assert self.model is not None
        return memory_of(self.shard.rank, self.model.net, 0 if self.pool is None else self.pool.nbytes)
