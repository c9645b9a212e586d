"""Flash attention over packed variable-length queries, keys read through the paged KV pool: non-causal, or
block-causal (LLaDA2-style block diffusion: full attention inside a block, causal across blocks).

One launch serves every request of an engine step: queries are packed back to back ([T, H, D] with cu_seqlens
offsets, no padding to the longest row); each row's keys and values are read straight out of the pool
([slots, Hkv, D]) through its block table, so no gathered [B, Lk, Hkv, D] copy exists. Refresh passes (queries =
the whole canvas) and block passes (a few queries against a long cached prefix) are the same kernel. GQA/MHA by
head grouping; softmax is online in fp32 whatever the input dtype (fp32 dots run in IEEE precision, not TF32).
`store_kv` is the companion kernel that writes the step's new K/V rows into the pool before attention reads it.

Block-causal (`block_len`, an int > 0 or a per-row [B] tensor, with `q_positions`, the packed queries' canvas
positions [T]): query position i of row b sees key position j iff j // block_len[b] <= i // block_len[b]. Paged rows: key j of a row is canvas position j (its
block table maps position j to its slot); varlen rows: a key's position is its token's entry in q_positions.
Paged programs stop reading keys after the last block their queries can see (later blocks cost nothing).

`paged_attention_ref` / `varlen_attention_ref` are the plain-PyTorch references (per-row loops, fp32 by default).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import dot_settings

_LOG2E = 1.4426950408889634


# ------------------------------------------------------------------------------------------------------------------
# kernels

@triton.jit
def _attn_fwd_kernel(
    # pointers
    Q, K, V, Out, CU_Q, CU_K, SEQ_LENS_K, BLOCK_TABLE, POS, BLOCK_LENS,
    # sizes
    sm_scale_log2, head_dim, group,
    # strides
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_bt,
    # meta-parameters
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_CAUSAL: tl.constexpr,
):
    """One program: BLOCK_M queries of one row x every query head of one KV head (GQA: the group shares each
    K/V tile it loads). Tile rows r = (query r // GROUP_PAD, head r % GROUP_PAD of the group).
    BLOCK_CAUSAL: key j is visible to query i iff pos(j) // BLOCK_LENS[row] <= pos(i) // BLOCK_LENS[row]."""
    pid_m, row, kv_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(CU_Q + row)
    q_len = tl.load(CU_Q + row + 1) - q_start
    if pid_m * BLOCK_M >= q_len:
        return
    k_len = tl.load(SEQ_LENS_K + row)
    offs_r = tl.arange(0, BLOCK_M * GROUP_PAD)  # [BR] tile rows
    q_idx = pid_m * BLOCK_M + offs_r // GROUP_PAD  # query index within the row
    g_idx = offs_r % GROUP_PAD
    heads = kv_head * group + g_idx
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    r_mask, d_mask = (q_idx < q_len) & (g_idx < group), offs_d < head_dim
    q_rows = (q_start + q_idx).to(tl.int64)
    q_off = q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(Q + q_off, mask=r_mask[:, None] & d_mask[None, :], other=0.0)  # [BR, BD]
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_PAD, BLOCK_D], tl.float32)
    if not PAGED:
        k_start = tl.load(CU_K + row).to(tl.int64)
    k_end = k_len
    if BLOCK_CAUSAL:
        block_len = tl.load(BLOCK_LENS + row)
        q_blk = tl.load(POS + q_rows, mask=r_mask, other=0) // block_len  # [BR] block of each query
        if PAGED:  # key j sits at position j: nothing past the last block a query of this tile sees
            k_end = tl.minimum(k_len, (tl.max(q_blk, 0) + 1) * block_len)
    for start_n in range(0, k_end, BLOCK_N):
        kn = start_n + offs_n  # [BN] key index within the row
        n_mask = kn < k_end
        if PAGED:
            page = tl.load(BLOCK_TABLE + row * stride_bt + kn // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
            k_rows = page * PAGE_SIZE + kn % PAGE_SIZE  # [BN] pool slots
        else:
            k_rows = k_start + kn
        k = tl.load(K + k_rows[None, :] * stride_kt + kv_head * stride_kh + offs_d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0).to(q.dtype)  # [BD, BN]
        qk = tl.dot(q, k, input_precision=PRECISION) * sm_scale_log2  # [BR, BN] fp32, log2 units
        if BLOCK_CAUSAL:
            if PAGED:
                k_blk = kn // block_len  # [BN]
            else:
                k_blk = tl.load(POS + k_rows, mask=n_mask, other=0) // block_len
            qk = tl.where(n_mask[None, :] & (k_blk[None, :] <= q_blk[:, None]), qk, float("-inf"))
        else:
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + k_rows[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(q.dtype)  # [BN, BD]
        p_in = p.to(Q.dtype.element_ty).to(q.dtype)  # probabilities rounded to the input dtype, as FA does
        acc = acc * alpha[:, None] + tl.dot(p_in, v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    o_off = q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(Out + o_off, out.to(Out.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])


@triton.jit
def _store_kv_kernel(
    # pointers
    K, V, PoolK, PoolV, Slots,
    # sizes
    num_tokens, row_size,
    # strides
    stride_kt, stride_vt, stride_pk, stride_pv,
    # meta-parameters
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] tokens
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] elements of a [Hkv * D] row
    t_mask = offs_t < num_tokens
    mask = t_mask[:, None] & (offs_r < row_size)[None, :]
    slot = tl.load(Slots + offs_t, mask=t_mask, other=0).to(tl.int64)
    src = offs_t.to(tl.int64)[:, None]
    k = tl.load(K + src * stride_kt + offs_r[None, :], mask=mask)
    v = tl.load(V + src * stride_vt + offs_r[None, :], mask=mask)
    tl.store(PoolK + slot[:, None] * stride_pk + offs_r[None, :], k.to(PoolK.dtype.element_ty), mask=mask)
    tl.store(PoolV + slot[:, None] * stride_pv + offs_r[None, :], v.to(PoolV.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------------------
# launchers

def _tiles(head_dim: int, max_q: int, group_pad: int) -> tuple[int, int, int, int]:
    """BLOCK_M (queries), BLOCK_N, BLOCK_D, num_warps. A tile holds BLOCK_M * group_pad (query, head) rows:
    16-64 of them (at least 16 for tl.dot); block passes, with few queries per row, get the small tiles."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    need = max_q * group_pad
    rows = 16 if need <= 16 else (32 if need <= 32 else 64)
    block_m = max(1, rows // group_pad)
    block_n = 64 if block_d <= 64 else 32
    return block_m, block_n, block_d, 4 if block_d <= 64 else 8


def _check_heads(q: torch.Tensor, k: torch.Tensor) -> int:
    if q.dim() != 3 or k.dim() != 3 or q.shape[2] != k.shape[2]:
        raise ValueError(f"q must be [T, H, D] and keys [*, Hkv, D] with the same D; got {list(q.shape)}, "
                         f"{list(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")
    assert q.stride(2) == 1 and k.stride(2) == 1, "head_dim must be contiguous"
    return q.shape[1] // k.shape[1]


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
            seq_lens_k: torch.Tensor, block_table: torch.Tensor | None, page_size: int, max_q: int,
            scale: float, block_len: int | torch.Tensor, q_positions: torch.Tensor | None) -> torch.Tensor:
    group = _check_heads(q, k)
    B = seq_lens_k.shape[0]
    causal = isinstance(block_len, torch.Tensor) or block_len != 0
    if causal != (q_positions is not None) or (not isinstance(block_len, torch.Tensor) and block_len < 0):
        raise ValueError(f"block-causal attention needs block_len > 0 and q_positions together (got block_len="
                         f"{block_len}, q_positions {'given' if q_positions is not None else 'None'})")
    if q_positions is not None and q_positions.shape != (q.shape[0],):
        raise ValueError(f"q_positions must be [T] = [{q.shape[0]}], got {list(q_positions.shape)}")
    if isinstance(block_len, torch.Tensor) and block_len.shape != (B,):
        raise ValueError(f"block_len must be an int or one per row [{B}], got {list(block_len.shape)}")
    if causal and not isinstance(block_len, torch.Tensor):
        block_len = torch.full((B,), block_len, dtype=torch.int32, device=q.device)
    assert v.shape == k.shape and v.stride(2) == 1
    T, _, D = q.shape
    out = torch.empty_like(q)
    if T == 0 or B == 0:
        return out
    group_pad = triton.next_power_of_2(group)
    bm, bn, bd, warps = _tiles(D, max_q, group_pad)
    precision, upcast = dot_settings(q.dtype)
    paged = block_table is not None
    table = block_table if paged else seq_lens_k  # unused pointer when not paged
    grid = (triton.cdiv(max_q, bm), B, k.shape[1])
    _attn_fwd_kernel[grid](
        q, k, v, out, cu_q, cu_k, seq_lens_k, table, seq_lens_k if q_positions is None else q_positions,
        block_len if causal else seq_lens_k, scale * _LOG2E, D, group,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        table.stride(0),
        PAGED=paged, PAGE_SIZE=page_size, BLOCK_M=bm, GROUP_PAD=group_pad, BLOCK_N=bn, BLOCK_D=bd,
        PRECISION=precision, UPCAST=upcast, BLOCK_CAUSAL=causal, num_warps=warps)
    return out


def paged_attention(q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    block_table: torch.Tensor, seq_lens_k: torch.Tensor, page_size: int, max_q: int,
                    scale: float, block_len: int | torch.Tensor = 0, q_positions: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """q [T, H, D] packed rows (row b = q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]); pool_k/pool_v [S, Hkv, D];
    block_table [B, P] int32 page ids; seq_lens_k [B] int32 keys per row (slot j of row b is
    block_table[b, j // page_size] * page_size + j % page_size). -> [T, H, D] in q.dtype.
    max_q: the longest row (host-known, sizes the grid). Non-causal, or with block_len (> 0, or [B] per row)
    block-causal over the queries' canvas positions q_positions [T] (key j of a row is position j)."""
    assert block_table.dim() == 2 and block_table.stride(1) == 1 and cu_seqlens_q.shape[0] == block_table.shape[0] + 1
    return _launch(q, pool_k, pool_v, cu_seqlens_q, cu_seqlens_q, seq_lens_k, block_table, page_size, max_q, scale,
                   block_len, q_positions)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_q: int,
                     scale: float, block_len: int | torch.Tensor = 0, q_positions: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Self-attention of packed rows without a cache: q [T, H, D], k/v [T, Hkv, D], cu_seqlens [B + 1] int32.
    block_len (> 0, or [B] per row): block-causal over the tokens' positions q_positions [T] (keys are the same
    tokens)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int32)  # [B]
    return _launch(q, k, v, cu_seqlens, cu_seqlens, lens, None, 1, max_q, scale, block_len, q_positions)


def store_kv(k: torch.Tensor, v: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """pool_k[slots[t]] = k[t] (and v): k/v [T, Hkv, D], pools [S, Hkv, D] with contiguous rows, slots [T]."""
    T = k.shape[0]
    assert k.shape[1:] == pool_k.shape[1:] and v.shape == k.shape and slots.shape == (T,)
    for t in (k, v, pool_k, pool_v):
        assert t.stride(2) == 1 and t.stride(1) == t.shape[2], "rows must be contiguous [Hkv, D]"
    if T == 0:
        return
    row = k.shape[1] * k.shape[2]
    block_r = min(1024, triton.next_power_of_2(row))
    block_t = max(1, 4096 // block_r)
    _store_kv_kernel[(triton.cdiv(T, block_t), triton.cdiv(row, block_r))](
        k, v, pool_k, pool_v, slots, T, row, k.stride(0), v.stride(0), pool_k.stride(0), pool_v.stride(0),
        BLOCK_T=block_t, BLOCK_R=block_r)


# ------------------------------------------------------------------------------------------------------------------
# references

def _row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   visible: torch.Tensor | None = None) -> torch.Tensor:
    """q [Lq, H, D], k/v [Lk, Hkv, D] -> [Lq, H, D]; plain softmax attention in the inputs' dtype.
    visible [Lq, Lk] bool: which keys each query may attend (None: all)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [Lk, H, D]
    s = torch.einsum("qhd,khd->hqk", q, k) * scale  # [H, Lq, Lk]
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v)


def _row_block_lens(block_len: int | torch.Tensor, rows: int) -> list[int]:
    return block_len.tolist() if isinstance(block_len, torch.Tensor) else [block_len] * rows


def block_causal_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, block_len: int) -> torch.Tensor | None:
    """[Lq, Lk] bool: key position j visible to query position i iff j // block_len <= i // block_len.
    None when block_len is 0 (non-causal)."""
    if block_len <= 0:
        return None
    return (k_pos[None, :] // block_len) <= (q_pos[:, None] // block_len)


def paged_attention_ref(q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        block_table: torch.Tensor, seq_lens_k: torch.Tensor, page_size: int, scale: float,
                        upcast: bool = True, block_len: int | torch.Tensor = 0,
                        q_positions: torch.Tensor | None = None) -> torch.Tensor:
    """paged_attention's contract, one row at a time (fp32 when upcast, else in q.dtype)."""
    dt = torch.float32 if upcast else q.dtype
    out = torch.empty_like(q)
    cu, lens = cu_seqlens_q.tolist(), seq_lens_k.tolist()
    bls = _row_block_lens(block_len, len(lens))
    for b, n in enumerate(lens):
        j = torch.arange(n, device=q.device)
        slots = block_table[b].long()[j // page_size] * page_size + j % page_size  # [Lk]
        qb = q[cu[b]:cu[b + 1]].to(dt)
        vis = None if not bls[b] else block_causal_visible(q_positions[cu[b]:cu[b + 1]].long(), j, bls[b])
        out[cu[b]:cu[b + 1]] = _row_attention(qb, pool_k[slots].to(dt), pool_v[slots].to(dt), scale, vis).to(q.dtype)
    return out


def varlen_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         scale: float, upcast: bool = True, block_len: int | torch.Tensor = 0,
                         q_positions: torch.Tensor | None = None) -> torch.Tensor:
    dt = torch.float32 if upcast else q.dtype
    out = torch.empty_like(q)
    cu = cu_seqlens.tolist()
    bls = _row_block_lens(block_len, len(cu) - 1)
    for r, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        vis = None
        if bls[r]:
            pos = q_positions[a:b].long()
            vis = block_causal_visible(pos, pos, bls[r])
        out[a:b] = _row_attention(q[a:b].to(dt), k[a:b].to(dt), v[a:b].to(dt), scale, vis).to(q.dtype)
    return out
