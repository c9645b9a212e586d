"""ForwardBatch: one step's model inputs as plain tensors, and run_batch, the forward every rank runs on them.

The runner (rank 0) builds a ForwardBatch from its host state; a single process runs it directly, tensor-parallel
ranks receive it in one broadcast and run the same function on their shards (engine/parallel.py). Nothing in it
refers to requests, so workers need no scheduler or canvas state.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .decoding.candidates import ShardDecode, shard_stats
from .model.attention import AttnContext, KVPoolTensors
from .model.transformer import Transformer


@dataclass(slots=True)
class ForwardBatch:
    tokens: torch.Tensor
    """[T] long: query tokens of every forward row, packed."""
    positions: torch.Tensor
    """[T] long: their canvas positions (RoPE)."""
    lengths: list[int]
    """Query tokens per forward row."""
    max_pos: int
    """Upper bound of positions (host-known, so RoPE needs no device sync)."""
    logit_rows: torch.Tensor | None = None
    """[N] long: hidden rows whose logits are wanted; None: all."""
    twin_rows: torch.Tensor | None = None
    """[Nc] long: hidden rows of the unconditional (CFG) twins of the logit rows cfg_sel."""
    cfg_sel: torch.Tensor | None = None
    """[Nc] long: which of the N logit rows get classifier-free guidance."""
    cfg_w: torch.Tensor | None = None
    """[Nc, 1] float32 guidance scale per guided row: un + (w + 1)(cond - un)."""
    write_slots: torch.Tensor | None = None
    """[T] long: KV pool slot each token's K/V is written to (paged passes); None: no pool."""
    read_slots: torch.Tensor | None = None
    """[R, Lk] long: pool slots each forward row attends over."""
    key_valid: torch.Tensor | None = None
    """[R, Lk] bool."""
    shard_decode: ShardDecode | None = None
    """Set (batches without top-k/top-p over a sharded vocabulary): return each vocabulary shard's decoding
    statistics [R, N, 8] (decoding/candidates.shard_stats) instead of gathering the full logits."""

    def to(self, device: torch.device | str) -> "ForwardBatch":
        """A copy on `device` (host copies are synchronous: the batch is pickled right after)."""
        out = ForwardBatch(**{f.name: getattr(self, f.name) for f in fields(self)})
        async_ok = torch.device(device).type != "cpu"
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                setattr(out, f.name, v.to(device, non_blocking=async_ok))
        if self.shard_decode is not None:
            out.shard_decode = self.shard_decode.to(device)
        return out


def run_batch(net: Transformer, kv: KVPoolTensors | None, batch: ForwardBatch) -> torch.Tensor | None:
    """Forward + logits at batch.logit_rows (CFG combined) -> [N, V] float32, or with shard_decode [R, N, 8].
    Sharded nets: every rank must call it with the same batch; rank 0 gets the result, the others None."""
    device = batch.tokens.device
    ctx = AttnContext.from_lengths(batch.lengths, device)
    if batch.write_slots is not None:
        ctx.key_valid, ctx.read_slots, ctx.write_slots = batch.key_valid, batch.read_slots, batch.write_slots
        ctx.kv_pool = kv
    hidden = net(batch.tokens, batch.positions, ctx, max_pos=batch.max_pos)  # [T, D]
    logits = net.local_logits(hidden if batch.logit_rows is None else hidden[batch.logit_rows])  # [N, Vc]
    if batch.twin_rows is not None:  # elementwise, so each rank combines its own columns
        un = net.local_logits(hidden[batch.twin_rows])  # [Nc, Vc]
        sel = batch.cfg_sel
        logits[sel] = un + (batch.cfg_w + 1) * (logits[sel] - un)
    if batch.shard_decode is not None:
        v0, v1 = net.shard.vocab(net.cfg.vocab_size)
        parts = net.gather_to_rank0(shard_stats(logits[:, :v1 - v0], v0, batch.shard_decode))  # R x [N, 8]
        return None if parts is None else torch.stack(parts)
    return net.gather_logits(logits)


class LocalExecutor:
    """One process holds the whole model: run_batch directly."""

    world_size = 1

    def __init__(self, net: Transformer) -> None:
        self.net = net

    def run(self, batch: ForwardBatch, kv: KVPoolTensors | None) -> torch.Tensor:
        out = run_batch(self.net, kv, batch)
        assert out is not None
        return out

    def init_pool(self, num_pages: int, page_size: int) -> None:
        pass

    def check(self) -> None:
        """Raise if the model can no longer run (a lost worker); a single process always can."""

    healthy = True

    def shutdown(self) -> None:
        pass
