"""ForwardBatch: one step's model inputs as plain tensors, and run_batch, the forward every rank runs on them.

The runner (rank 0) builds a ForwardBatch from its host state; a single process runs it directly, tensor-parallel
ranks receive it in one broadcast and run the same function on their shards (engine/executor/). An executor
(engine/executor/base.py) is what runs it. Nothing in it
refers to requests, so workers need no scheduler or canvas state.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from .decoding.candidates import ShardDecode, shard_stats
from .model.attention import AttnContext, AttnGroup, KVPoolTensors
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
    backend: str = "torch"
    """Kernel backend (kernels/dispatch.py): "torch" (SDPA over a padded layout) or "triton" (packed layout)."""
    cu_seqlens_q: torch.Tensor | None = None
    """[R + 1] int32 packed-query offsets (triton)."""
    block_table: torch.Tensor | None = None
    """[R, P] int32 page ids of each row's keys (triton, paged passes)."""
    seq_lens_k: torch.Tensor | None = None
    """[R] int32 keys per row (triton, paged passes)."""
    page_size: int = 0
    q_index: torch.Tensor | None = None
    """Padded query layout (torch backend), when the runner uploaded it with the step's metadata; else built here."""
    q_valid: torch.Tensor | None = None
    unpad_index: torch.Tensor | None = None
    attn_groups: "list[AttnGroup] | None" = None
    """Paged torch passes: the rows' attention groups at bucketed lengths (engine/shape_buckets.py)."""
    logit_chunk: int = 0
    """Logit rows computed (and handed to run_batch's consume) at once; 0: all of them."""
    cfg_splits: list[int] | None = None
    """Host-known index into cfg_sel at each chunk boundary (len = chunks + 1); None: one chunk."""
    block_len: torch.Tensor | None = None
    """[R] long: block-causal attention with this block length per forward row (LLaDA2); None: bidirectional."""
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
        if self.attn_groups is not None:
            out.attn_groups = [AttnGroup(*(getattr(g, f.name).to(device, non_blocking=async_ok) for f in fields(g)))
                               for g in self.attn_groups]
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
        hidden = net(batch.tokens, batch.positions, _attn_context(batch, kv), max_pos=batch.max_pos)  # [T, D]
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


def _attn_context(batch: ForwardBatch, kv: KVPoolTensors | None) -> AttnContext:
    """The attention context of a batch: packed offsets + block tables (triton) or a padded layout (torch)."""
    paged = batch.write_slots is not None
    if batch.backend == "triton" and paged:
        ctx = AttnContext(None, None, None, len(batch.lengths), max(batch.lengths), backend="triton",
                          cu_seqlens_q=batch.cu_seqlens_q, block_table=batch.block_table,
                          seq_lens_k=batch.seq_lens_k, page_size=batch.page_size)
    elif batch.q_index is not None or batch.q_valid is not None:
        ctx = AttnContext(batch.q_index, batch.q_valid, batch.unpad_index, len(batch.lengths), max(batch.lengths),
                          backend=batch.backend)
    else:
        ctx = AttnContext.from_lengths(batch.lengths, batch.tokens.device)
        ctx.backend = batch.backend
    if paged and batch.backend != "triton":
        ctx.key_valid, ctx.read_slots, ctx.groups = batch.key_valid, batch.read_slots, batch.attn_groups
    if paged:
        ctx.write_slots, ctx.kv_pool = batch.write_slots, kv
    if batch.block_len is not None and batch.backend == "triton":  # the kernel masks by positions
        ctx.block_len, ctx.positions = batch.block_len, batch.positions
    elif batch.block_len is not None:
        from .model.attention import block_causal_mask
        ctx.attn_mask = block_causal_mask(ctx, batch.positions, batch.block_len, paged)
    return ctx
