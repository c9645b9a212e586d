"""ForwardBatch: one step's model inputs as plain tensors, and run_batch, the forward every rank runs on them.

The runner (rank 0) builds a ForwardBatch from its host state, the attention layout (AttnContext) included, once
per step; a single process runs it directly, tensor-parallel ranks receive it in one broadcast and run the same
function on their shards (engine/executor/). An executor (engine/executor/base.py) is what runs it. Nothing in it
refers to requests, so workers need no scheduler or canvas state.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

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
    attn: AttnContext
    """The attention layout of the packed rows, built once per step by the batch's builder (the runner's paged
    layout, or AttnContext.from_lengths); each rank binds it to its own KV pool (AttnContext.bind)."""
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
    logit_chunk: int = 0
    """Logit rows computed (and handed to run_batch's consume) at once; 0: all of them."""
    cfg_splits: list[int] | None = None
    """Host-known index into cfg_sel at each chunk boundary (len = chunks + 1); None: one chunk."""
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
        out.attn = self.attn.to(device)
        if self.shard_decode is not None:
            out.shard_decode = self.shard_decode.to(device)
        return out


Consume = Callable[[int, int, torch.Tensor], None]
"""consume(a, b, out): rank 0 receives the logits [b - a, V] (or the shard statistics [R, b - a, 8]) of logit rows
[a, b) as soon as they are computed."""


def run_batch(net: Transformer, kv: KVPoolTensors | None, batch: ForwardBatch, consume: Consume | None = None,
              forward: Callable[[ForwardBatch], torch.Tensor] | None = None) -> torch.Tensor | None:
    """Forward, then the logits at batch.logit_rows (CFG combined) in chunks of batch.logit_chunk rows, each handed
    to `consume` on rank 0 (so the [N, V] working set stays bounded). Without consume, rank 0 gets them all at once:
    [N, V] float32, or with shard_decode [R, N, 8]. Sharded nets: every rank must call it with the same batch (the
    chunks are collective); the other ranks get None. `forward` replaces the network forward (a captured CUDA graph
    of the same computation, one process only)."""
    if forward is not None:
        hidden = forward(batch)  # [T, D]
    else:
        ctx = batch.attn.bind(kv, batch.positions)
        hidden = net(batch.tokens, batch.positions, ctx, max_pos=batch.max_pos)  # [T, D]
    rows = batch.logit_rows if batch.logit_rows is not None else torch.arange(hidden.shape[0], device=hidden.device)
    n = rows.shape[0]
    chunk = batch.logit_chunk if batch.logit_chunk > 0 else max(n, 1)
    parts: list[torch.Tensor] = []
    for c, a in enumerate(range(0, n, chunk)):
        b = min(a + chunk, n)
        logits = net.local_logits(hidden[rows[a:b]])  # [n, Vc]
        if batch.twin_rows is not None:  # elementwise, so each rank combines its own columns
            s0, s1 = (batch.cfg_splits[c], batch.cfg_splits[c + 1]) if batch.cfg_splits else (0, len(batch.cfg_sel))
            if s1 > s0:
                un = net.local_logits(hidden[batch.twin_rows[s0:s1]])  # [nc, Vc]
                sel = batch.cfg_sel[s0:s1] - a
                logits[sel] = un + (batch.cfg_w[s0:s1] + 1) * (logits[sel] - un)
        if batch.shard_decode is not None:
            v0, v1 = net.shard.vocab(net.cfg.vocab_size)
            stats = shard_stats(logits[:, :v1 - v0], v0, batch.shard_decode.rows(a, b))  # [n, 8]
            shards = net.gather_to_rank0(stats)  # R x [n, 8]
            out = None if shards is None else torch.stack(shards)
        else:
            out = net.gather_logits(logits)
        if out is not None:
            if consume is not None:
                consume(a, b, out)
            else:
                parts.append(out)
    if consume is not None or parts == [] and not _is_rank0(net):
        return None
    if not parts:
        return torch.zeros(0, net.cfg.vocab_size, device=hidden.device)
    return torch.cat(parts, dim=0 if batch.shard_decode is None else 1)


def _is_rank0(net: Transformer) -> bool:
    return not net.shard.active or net.shard.rank == 0
