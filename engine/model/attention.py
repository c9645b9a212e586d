"""Attention over packed variable-length sequences, optionally through a paged KV pool: bidirectional, or
block-causal (LLaDA2, SDAR) with an explicit mask (block_causal_mask), or per attention group a limit on each
query's keys (group_block_limit).

A forward pass carries B sequences whose query tokens are packed into one [T] axis. `AttnContext` says how to
lay them out as [B, Lq] for attention and, for cached passes, where each new K/V row is written in the pool
and which pool slots each sequence reads its keys from (the block table, expanded to slots).

The layout is built once per step by whoever builds the step (the runner, engine/runner.py; or from_lengths for a
plain packed forward), travels inside the ForwardBatch (to tensor-parallel workers too, `to`), and each rank
`bind`s it to its own KV pool and positions for the forward (which also derives the block-causal mask there).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from .attention_cpu import cpu_attention


@dataclass(slots=True)
class AttnContext:
    q_index: torch.Tensor | None
    """[B, Lq] long: packed index of each padded query slot (any value where q_valid is False). None: dense."""
    q_valid: torch.Tensor | None
    """[B, Lq] bool. None: every slot is valid (T == B * Lq)."""
    unpad_index: torch.Tensor | None
    """[T] long: position of each packed token in the flattened [B * Lq] layout."""
    batch: int
    max_q: int
    key_valid: torch.Tensor | None = None
    """[B, Lk] bool mask over keys; None: all keys valid."""
    write_slots: torch.Tensor | None = None
    """[T] long: pool slot that receives each token's K/V (paged passes)."""
    read_slots: torch.Tensor | None = None
    """[B, Lk] long: pool slots each sequence attends over (paged passes)."""
    kv_pool: "KVPoolTensors | None" = None
    """This rank's K/V pools (set by `bind`, never shipped)."""
    backend: str = "torch"
    """"torch" (SDPA over a padded layout) or "triton" (kernels/attention.py over the packed layout)."""
    cu_seqlens_q: torch.Tensor | None = None
    """[B + 1] int32 offsets of each row's packed queries (triton; built on first use when None)."""
    block_table: torch.Tensor | None = None
    """[B, P] int32 page ids of each row's keys (triton, paged passes)."""
    seq_lens_k: torch.Tensor | None = None
    """[B] int32 keys per row (triton, paged passes)."""
    page_size: int = 0
    attn_mask: torch.Tensor | None = None
    """[B, 1, Lq, Lk] bool (True = attend): replaces key_valid when set (block-causal torch passes; `bind` derives
    it from block_len)."""
    block_len: torch.Tensor | None = None
    """[B] long: block length of each row's block-causal attention; None: bidirectional."""
    positions: torch.Tensor | None = None
    """[T] canvas positions of the packed queries (triton, block-causal; set by `bind`)."""
    groups: "list[AttnGroup] | None" = None
    """Paged torch passes: the rows split into groups that each run one SDPA at their own padded lengths (the
    runner's engine/shape_buckets.py); replaces q_index/q_valid/read_slots/key_valid, and attn_mask: block-causal
    groups carry their rows' block lengths and `bind` derives each group's own mask."""

    @staticmethod
    def dense(batch: int, length: int, key_valid: torch.Tensor | None = None) -> "AttnContext":
        return AttnContext(None, None, None, batch, length, key_valid=key_valid)

    @staticmethod
    def from_lengths(lengths: list[int], device: torch.device | str, backend: str = "torch",
                     block_len: torch.Tensor | None = None) -> "AttnContext":
        """Self-attention over sequences packed back to back (no cache); block_len [B] long: block-causal."""
        ctx = AttnContext._packed(lengths, device)
        ctx.backend, ctx.block_len = backend, block_len
        return ctx

    @staticmethod
    def _packed(lengths: list[int], device: torch.device | str) -> "AttnContext":
        batch, max_q = len(lengths), max(lengths)
        if all(n == max_q for n in lengths):
            return AttnContext.dense(batch, max_q)
        lens = torch.tensor(lengths, device=device)  # [B]
        starts = torch.cumsum(lens, 0) - lens  # [B]
        ar = torch.arange(max_q, device=device)  # [Lq]
        q_valid = ar[None, :] < lens[:, None]  # [B, Lq]
        q_index = torch.where(q_valid, starts[:, None] + ar[None, :], 0)  # [B, Lq]
        unpad = (torch.arange(batch, device=device)[:, None] * max_q + ar[None, :])[q_valid]  # [T]
        return AttnContext(q_index, q_valid, unpad, batch, max_q, key_valid=q_valid)

    def bind(self, kv_pool: "KVPoolTensors | None", positions: torch.Tensor) -> "AttnContext":
        """This layout for one forward on this rank: a copy that reads and writes `kv_pool` (paged passes) and,
        block-causal, masks by the packed queries' canvas positions [T] (the kernel's positions, or SDPA's mask)."""
        ctx = replace(self, kv_pool=kv_pool if self.write_slots is not None else None)
        if self.block_len is not None and self.backend == "triton":  # the kernel masks by positions
            ctx.positions = positions
        elif self.groups is not None and self.block_len is not None:  # each group's mask at its own lengths
            ctx.groups = [replace(g, q_limit=group_block_limit(g, positions)) for g in self.groups]
        elif self.block_len is not None:
            ctx.attn_mask = block_causal_mask(ctx, positions, self.block_len, self.write_slots is not None)
        return ctx

    def to(self, device: torch.device | str) -> "AttnContext":
        """A copy of the layout on `device` (the pool and the derived mask stay behind: `bind` adds them)."""
        async_ok = torch.device(device).type != "cpu"

        def move(v: object) -> object:
            return v.to(device, non_blocking=async_ok) if isinstance(v, torch.Tensor) else v

        out = replace(self, kv_pool=None, attn_mask=None, positions=None)
        for f in fields(self):
            v = getattr(out, f.name)
            if isinstance(v, torch.Tensor):
                setattr(out, f.name, move(v))
        if self.groups is not None:
            out.groups = [AttnGroup(*(move(getattr(g, f.name)) for f in fields(g))) for g in self.groups]
        return out


@dataclass(slots=True)
class AttnGroup:
    """Forward rows whose attention runs as one SDPA call at one padded (query, key) length."""
    q_index: torch.Tensor
    """[G, Lq] long: packed index of each padded query slot (any value where padded)."""
    unpad: torch.Tensor
    """[Tg] long: position of each real query in the flattened [G * Lq] layout."""
    tokens: torch.Tensor
    """[Tg] long: packed index of each real query (the output rows this group fills)."""
    read_slots: torch.Tensor
    """[G, Lk] long: pool slots each row attends over (the scratch slot where padded)."""
    key_valid: torch.Tensor
    """[G, Lk] bool."""
    block_len: torch.Tensor | None = None
    """[G] long: each row's block length (block-causal groups); None: bidirectional."""
    q_limit: torch.Tensor | None = None
    """[G, Lq] int32: block-causal groups' mask, derived by AttnContext.bind (never shipped): a padded query sees the
    keys j < q_limit (keys are canvas positions 0..Lk-1; the limit is the end of the query's block)."""
    self_keys: bool = False
    """Every row's keys are its own queries in order (Lk == Lq): K/V come from this forward's k/v, not the pool."""


@dataclass(slots=True)
class KVPoolTensors:
    """Per-layer K and V pools: k[layer] and v[layer] are [num_slots, Hkv, D] (pages × page_size slots)."""
    k: list[torch.Tensor]
    v: list[torch.Tensor]


def pad_tokens(x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """[T, ...] packed -> [B, Lq, ...] padded."""
    if ctx.q_index is None:
        return x.view(ctx.batch, ctx.max_q, *x.shape[1:])
    return gather_rows(x, ctx.q_index)


def unpad_tokens(x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """[B, Lq, ...] padded -> [T, ...] packed."""
    flat = x.reshape(ctx.batch * ctx.max_q, *x.shape[2:])
    return flat if ctx.unpad_index is None else flat.index_select(0, ctx.unpad_index)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for an integer index of any shape over x's first dim ([*index.shape, *x.shape[1:]]), through
    index_select: the same values, several times faster on the CPU than advanced indexing (measured, one thread,
    bf16 pool [8192, 16, 64]: [16, 192] slots 1019 -> 159 us, [1, 192] 58 -> 13 us; [256, 1024] rows 78 -> 8 us)."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext, layer: int,
              scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] (new tokens, RoPE applied) -> [T, H, D]. Non-causal."""
    if ctx.backend == "triton":
        return _attention_triton(q, k, v, ctx, layer, scale)
    pool_k = pool_v = None
    if ctx.kv_pool is not None:  # paged passes write the new K/V (a step of no-cache rows only has no pool)
        pool_k, pool_v = ctx.kv_pool.k[layer], ctx.kv_pool.v[layer]  # [S, Hkv, D]
        pool_k.index_copy_(0, ctx.write_slots, k.to(pool_k.dtype))
        pool_v.index_copy_(0, ctx.write_slots, v.to(pool_v.dtype))
    if ctx.groups is not None:
        return _grouped(q, k, v, pool_k, pool_v, ctx.groups, scale)
    if pool_k is not None:
        keys, vals = gather_rows(pool_k, ctx.read_slots), gather_rows(pool_v, ctx.read_slots)  # [B, Lk, Hkv, D]
    else:
        keys, vals = pad_tokens(k, ctx), pad_tokens(v, ctx)  # [B, Lq, Hkv, D]
    out = _attend(pad_tokens(q, ctx), keys.to(q.dtype), vals.to(q.dtype), ctx.key_valid, ctx.attn_mask,
                  scale)  # [B, Lq, H, D]
    return unpad_tokens(out, ctx)  # [T, H, D]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None,
            attn_mask: torch.Tensor | None, scale: float, q_limit: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, Hkv, D] -> [B, Lq, H, D]: each row over its keys, masked by key_valid [B, Lk]
    and, block-causal, by q_limit [B, Lq] (query i sees keys j < q_limit[b, i]), or by attn_mask [B, 1, Lq, Lk]
    when set. bf16 on AVX512-BF16 CPUs runs the C kernel (attention_cpu.py) unless attn_mask is set, the rest
    SDPA."""
    if attn_mask is None:
        out = cpu_attention(q, k, v, key_valid, scale, q_limit)
        if out is not None:
            return out
        if q_limit is not None:
            attn_mask = torch.arange(k.shape[1], device=q.device)[None, None, :] < q_limit[:, :, None]  # [B, Lq, Lk]
            attn_mask = (attn_mask if key_valid is None else attn_mask & key_valid[:, None, :])[:, None]
        elif key_valid is not None:
            attn_mask = key_valid[:, None, None, :]  # [B, 1, 1, Lk]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
                                         scale=scale, enable_gqa=q.shape[2] != k.shape[2])  # [B, H, Lq, D]
    return out.transpose(1, 2)


def block_causal_mask(ctx: AttnContext, positions: torch.Tensor, block_len: torch.Tensor, paged: bool
                      ) -> torch.Tensor:
    """[B, 1, Lq, Lk] bool for the batch's padded layout (see _block_mask). positions [T] (packed queries);
    block_len [B] long. Keys are canvas positions 0..Lk-1 (paged passes) or the row's own queries (self-attention)."""
    q_pos = pad_tokens(positions, ctx)  # [B, Lq]
    k_pos = torch.arange(ctx.read_slots.shape[1], device=positions.device)[None, :] if paged else q_pos  # [1|B, Lk]
    return _block_mask(q_pos, k_pos, block_len, ctx.key_valid)


def group_block_limit(g: "AttnGroup", positions: torch.Tensor) -> torch.Tensor:
    """[G, Lq] int32 (the kernel's type, made once per forward rather than per layer) for one attention group: the end of each padded query's block in canvas positions (padded
    queries read some row's position: their outputs are dropped). With keys at canvas positions 0..Lk-1, key j is
    visible iff j < the limit, which is _block_mask's rule j // b <= i // b."""
    bl = g.block_len[:, None]  # [G, 1]
    return ((gather_rows(positions, g.q_index) // bl + 1) * bl).to(torch.int32)


def _block_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, block_len: torch.Tensor,
                key_valid: torch.Tensor | None) -> torch.Tensor:
    """[R, 1, Lq, Lk] bool: a query at canvas position i may attend key position j iff j // b <= i // b (b = its
    row's block length: full attention inside a block, causal across blocks), and the key is valid.
    q_pos [R, Lq], k_pos [R or 1, Lk], block_len [R], key_valid [R, Lk] or None."""
    bl = block_len[:, None]  # [R, 1]
    allowed = (k_pos // bl)[:, None, :] <= (q_pos // bl)[:, :, None]  # [R, Lq, Lk]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    return allowed[:, None]


def _grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool_k: torch.Tensor | None,
             pool_v: torch.Tensor | None, groups: list[AttnGroup], scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]: one SDPA per group over its own padded layout, scattered back
    to packed rows. Self-keyed groups read this forward's k/v at their queries' layout (padded keys read some
    real token and are masked out, as the scratch slot's are); the others read the pool."""
    # one group holding every token (host-known shapes): unpadded, its layout is the packed one (queries and its own
    # keys are views); unpadded or one row, its real queries come first in order (the output needs no scatter)
    one = len(groups) == 1 and groups[0].tokens.shape[0] == q.shape[0]
    dense = one and groups[0].q_index.numel() == q.shape[0]
    out = None if dense or (one and groups[0].q_index.shape[0] == 1) else torch.zeros_like(q)

    def rows(x: torch.Tensor, g: AttnGroup) -> torch.Tensor:  # [T, h, D] -> [G, Lq, h, D]
        return x.view(*g.q_index.shape, *x.shape[1:]) if dense else gather_rows(x, g.q_index)

    for g in groups:
        if g.self_keys:
            keys, vals = rows(k, g), rows(v, g)  # [G, Lk = Lq, Hkv, D]
        else:
            assert pool_k is not None, "a group that reads cached keys needs the K/V pool"
            keys = gather_rows(pool_k, g.read_slots).to(q.dtype)  # [G, Lk, Hkv, D]
            vals = gather_rows(pool_v, g.read_slots).to(q.dtype)  # [G, Lk, Hkv, D]
        o = _attend(rows(q, g), keys, vals, g.key_valid, None, scale, g.q_limit)  # [G, Lq, H, D]
        flat = o.reshape(-1, q.shape[1], q.shape[2])  # [G * Lq, H, D]
        if out is None:
            return flat[:q.shape[0]]  # [T, H, D]
        out.index_copy_(0, g.tokens, flat.index_select(0, g.unpad))
    return out


def _cu_seqlens(ctx: AttnContext, device: torch.device) -> torch.Tensor:
    """[B + 1] int32 packed-query offsets, derived once per forward from the padded layout."""
    if ctx.cu_seqlens_q is None:
        if ctx.q_valid is None:
            lens = torch.full((ctx.batch,), ctx.max_q, dtype=torch.int32, device=device)
        else:
            lens = ctx.q_valid.sum(1, dtype=torch.int32)
        ctx.cu_seqlens_q = F.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
    return ctx.cu_seqlens_q


def _attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext, layer: int,
                      scale: float) -> torch.Tensor:
    from kernels.attention import paged_attention, store_kv, varlen_attention
    cu = _cu_seqlens(ctx, q.device)
    causal = {} if ctx.block_len is None else dict(block_len=ctx.block_len, q_positions=ctx.positions)
    if ctx.kv_pool is None:
        return varlen_attention(q, k, v, cu, ctx.max_q, scale, **causal)
    pool_k, pool_v = ctx.kv_pool.k[layer], ctx.kv_pool.v[layer]  # [S, Hkv, D]
    store_kv(k, v, pool_k, pool_v, ctx.write_slots)
    return paged_attention(q, pool_k, pool_v, cu, ctx.block_table, ctx.seq_lens_k, ctx.page_size, ctx.max_q, scale,
                           **causal)
