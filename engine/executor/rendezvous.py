"""The process groups every rank joins: the model's collectives (NCCL on CUDA, gloo on CPU) with a timeout, so a
lost rank surfaces as an error instead of a hang, and a gloo control group that carries rank 0's one
`broadcast_object_list` per step. Workers idle in that broadcast, so it has no practical timeout."""
from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ParallelError
from .config import ParallelConfig

CONTROL_TIMEOUT = timedelta(days=365)
"""Workers wait for rank 0's next step in the control broadcast; idling is not a fault."""
STARTUP_TIMEOUT = timedelta(seconds=300)
"""How long the spawned ranks may take to start (import torch, load their shards) on a busy machine; independent of
the collective timeout (rank 0 fails the start at once if a worker process dies meanwhile)."""


@dataclass(slots=True)
class WorkerArgs:
    model_dir: str
    device: str
    dtype: str
    config: ParallelConfig
    world_size: int
    init_method: str
    threads: int | None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(args: WorkerArgs, rank: int, procs: list[Any]) -> Any:
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
            kwargs: dict[str, Any] = dict(backend=backend, timeout=timeout)
            if args.init_method.startswith("tcp://"):  # spawned ranks: the rendezvous waits for start-up, not
                host, port = args.init_method.removeprefix("tcp://").rsplit(":", 1)  # the collective timeout
                kwargs.update(world_size=args.world_size, rank=rank, store=dist.TCPStore(
                    host, int(port), args.world_size, rank == 0, timeout=max(timeout, STARTUP_TIMEOUT)))
            else:
                kwargs["init_method"] = args.init_method
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
