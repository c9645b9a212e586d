"""The bf16 CPU attention kernel (engine/model/attention_avx512.c through engine/model/attention_cpu.py) against a
float32 reference and torch's own bf16 SDPA, and its batch and thread invariance. Runs where the CPU has
AVX512-BF16 (the kernel's only target); elsewhere the engine runs SDPA and these tests skip."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model import cpu_kernel
from engine.model.attention_cpu import _splits, applies, cpu_attention

pytestmark = pytest.mark.skipif(not cpu_kernel.bf16_dot(), reason="no AVX512-BF16 on this CPU: SDPA runs instead")


def _draw(gen: torch.Generator, G: int, Lq: int, Lk: int, H: int, Hkv: int, D: int, spread: float = 1.0):
    q = (torch.randn(G, Lq, H, D, generator=gen) * spread).bfloat16()
    k = (torch.randn(G, Lk, Hkv, D, generator=gen) * spread).bfloat16()
    v = torch.randn(G, Lk, Hkv, D, generator=gen).bfloat16()
    valid = torch.rand(G, Lk, generator=gen) < 0.75  # holes anywhere, not only a padded tail
    valid[torch.arange(G), torch.randint(0, Lk, (G,), generator=gen)] = True  # every row keeps a key
    return q, k, v, valid


def _sdpa(q, k, v, valid, scale, dtype):
    """torch's SDPA in dtype over the [G, L, H, D] layout -> [G, Lq, H, D] float32."""
    t = lambda x: x.to(dtype).transpose(1, 2)
    out = F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=valid[:, None, None, :], scale=scale,
                                         enable_gqa=True)
    return out.transpose(1, 2).float()


SHAPES = [  # G, Lq, Lk, H, Hkv, D
    (1, 128, 128, 16, 16, 64),
    (3, 37, 53, 4, 2, 32),
    (2, 5, 200, 8, 1, 128),
    (1, 1, 1, 2, 2, 16),
    (2, 17, 33, 6, 3, 48),
    (1, 9, 300, 2, 2, 256),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_float32_attention_as_closely_as_sdpa_bf16(shape):
    """Error against float32 attention of the same bf16 inputs no larger than torch's bf16 SDPA's (plus a bf16
    rounding of the output), and the two bf16 results a rounding apart."""
    gen = torch.Generator().manual_seed(sum(shape))
    q, k, v, valid = _draw(gen, *shape)
    scale = shape[-1] ** -0.5
    out = cpu_attention(q, k, v, valid, scale)
    assert out is not None and out.dtype == torch.bfloat16 and out.shape == q.shape
    ref = _sdpa(q, k, v, valid, scale, torch.float32)
    sdpa = _sdpa(q, k, v, valid, scale, torch.bfloat16)
    err, sdpa_err = (out.float() - ref).abs().max().item(), (sdpa - ref).abs().max().item()
    ulp = 2 ** -8 * ref.abs().max().item()  # one bf16 rounding at the output's scale
    assert err <= sdpa_err + ulp, (err, sdpa_err)
    assert (out.float() - sdpa).abs().max().item() <= 2 * ulp


def test_peaked_scores_and_one_key():
    """Large scores (a near one-hot softmax: exp underflows for most keys) stay finite and pick the top key's
    value; a row with one valid key returns that key's value."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, valid = _draw(gen, 2, 7, 40, 2, 2, 32, spread=6.0)
    out = cpu_attention(q, k, v, valid, 1.0)
    ref = _sdpa(q, k, v, valid, 1.0, torch.float32)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max().item() <= 2 ** -7 * ref.abs().max().item() + 1e-2
    one = torch.zeros_like(valid)
    one[:, 11] = True
    out = cpu_attention(q, k, v, one, 1.0)  # [G, Lq, H, D]
    want = v[:, 11][:, None].expand_as(out)  # [G, Lq, H, D] (Hkv == H here)
    assert torch.equal(out, want)


def test_masked_keys_are_ignored_exactly():
    """What masked-out keys and values hold does not change a single bit of the output."""
    gen = torch.Generator().manual_seed(5)
    q, k, v, valid = _draw(gen, 2, 19, 45, 4, 2, 64)
    out = cpu_attention(q, k, v, valid, 0.125)
    k2, v2 = k.clone(), v.clone()
    k2[~valid] = torch.randn(k2[~valid].shape, generator=gen).bfloat16() * 100
    v2[~valid] = float("nan")
    assert torch.equal(cpu_attention(q, k2, v2, valid, 0.125), out)


def test_a_row_is_the_same_alone_batched_and_over_any_thread_split():
    """Batch invariance: each row's output is bitwise that of the row alone, whatever rows share the call; and the
    heads' split over threads does not change a bit either."""
    gen = torch.Generator().manual_seed(7)
    q, k, v, valid = _draw(gen, 5, 23, 61, 8, 4, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [cpu_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], valid[i:i + 1], 0.125) for i in range(5)]
        torch.set_num_threads(3)  # three workers over four kv heads: uneven ranges
        batched = cpu_attention(q, k, v, valid, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batched, torch.cat(alone))


def test_strided_views_read_in_place():
    """q/k/v as views of one fused projection output (rows strided, heads contiguous) give the bits of
    contiguous copies."""
    gen = torch.Generator().manual_seed(11)
    G, L, H, Hkv, D = 2, 29, 4, 2, 32
    qkv = torch.randn(G, L, (H + 2 * Hkv) * D, generator=gen).bfloat16()
    q, k, v = (t.view(G, L, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))
    valid = torch.ones(G, L, dtype=torch.bool)
    assert not q.is_contiguous()
    assert torch.equal(cpu_attention(q, k, v, valid, 0.2),
                       cpu_attention(q.contiguous(), k.contiguous(), v.contiguous(), None, 0.2))


def test_outside_its_domain_it_declines():
    """float32, float16, head dims off a multiple of 16 or above 256, and autograd go to SDPA (None)."""
    x = torch.randn(1, 4, 2, 32)
    assert cpu_attention(x, x, x, None, 1.0) is None
    assert cpu_attention(x.half(), x.half(), x.half(), None, 1.0) is None
    y = torch.randn(1, 4, 2, 24).bfloat16()
    assert cpu_attention(y, y, y, None, 1.0) is None
    z = torch.randn(1, 4, 1, 272).bfloat16()
    assert cpu_attention(z, z, z, None, 1.0) is None
    g = torch.randn(1, 4, 2, 32).bfloat16().requires_grad_()
    assert not applies(g, g, g)


def test_head_splits_cover_every_head_at_kv_boundaries():
    for H, Hkv, n in [(16, 16, 2), (8, 4, 3), (8, 1, 2), (32, 8, 5), (4, 2, 1), (2, 2, 8)]:
        parts = _splits(H, Hkv, n)
        assert parts[0][0] == 0 and parts[-1][1] == H and len(parts) <= n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        if Hkv > 1:
            assert all(a % (H // Hkv) == 0 for a, _ in parts)


@pytest.mark.parametrize("block", [4, 7, 16])
def test_block_causal_limits_match_the_masked_float32_attention(block):
    """Block-causal attention (LLaDA2 / SDAR groups): query i of a row sees keys j < its block's end. The kernel's
    limit against float32 SDPA with _block_mask's mask (j // b <= i // b) over random canvas positions; a query
    whose limit admits no valid key gets zeros."""
    from engine.model.attention import _block_mask
    gen = torch.Generator().manual_seed(block)
    G, Lq, Lk, H, Hkv, D = 3, 21, 45, 4, 2, 32
    q, k, v, valid = _draw(gen, G, Lq, Lk, H, Hkv, D)
    valid[:, :block] = True  # the first block is always visible: every query has a key
    q_pos = torch.randint(0, Lk, (G, Lq), generator=gen)  # [G, Lq] canvas positions
    bl = torch.full((G,), block)
    limit = (q_pos // block + 1) * block  # [G, Lq]
    out = cpu_attention(q, k, v, valid, 0.2, limit)
    mask = _block_mask(q_pos, torch.arange(Lk)[None, :], bl, valid)  # [G, 1, Lq, Lk]
    t = lambda x: x.float().transpose(1, 2)
    ref = F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=mask, scale=0.2, enable_gqa=True)
    ref = ref.transpose(1, 2)
    assert (out.float() - ref).abs().max().item() <= 2 ** -6 * ref.abs().max().item()
    none = torch.zeros(G, Lk, dtype=torch.bool)
    none[:, block:] = True  # the only valid keys lie past every query's limit (block)
    assert torch.equal(cpu_attention(q, k, v, none, 0.2, torch.full((G, Lq), block)), torch.zeros_like(q))


def test_grouped_block_causal_attention_kernel_and_sdpa_agree(monkeypatch):
    """The runner's block-causal groups: the kernel (limits from bind) and the SDPA fallback (a mask built from the
    same limits) give the same attention within bf16 rounding, and in float32 the fallback is exactly the mask
    rule's SDPA."""
    import engine.model.attention as A
    from engine.model.attention import _block_mask
    from engine.shape_buckets import attention_groups
    gen = torch.Generator().manual_seed(2)
    lens, H, Hkv, D, block = [9, 16, 5], 4, 2, 32, 4
    T = sum(lens)
    q = torch.randn(T, H, D, generator=gen)
    k, v = torch.randn(T, Hkv, D, generator=gen), torch.randn(T, Hkv, D, generator=gen)
    positions = torch.cat([torch.arange(n) for n in lens])  # each row's canvas from 0 (self-keyed refresh rows)
    groups = []
    for g in attention_groups(lens, lens, [True] * len(lens)):
        L = g.q_index.shape[1]
        n_of = torch.tensor([lens[r] for r in g.rows.tolist()])
        valid = torch.arange(L)[None, :] < n_of[:, None]
        grp = A.AttnGroup(g.q_index, g.unpad, g.tokens, torch.zeros_like(g.q_index), valid,
                          block_len=torch.full((len(n_of),), block), self_keys=True)
        groups.append(grp)
    ctx = A.AttnContext(None, None, None, len(lens), max(lens), groups=groups, block_len=torch.full((3,), block))
    ctx = ctx.bind(None, positions)
    assert all(g.q_limit is not None for g in ctx.groups)
    kernel = A._grouped(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, None, ctx.groups, D ** -0.5)
    monkeypatch.setattr(A, "cpu_attention", lambda *a: None)
    sdpa = A._grouped(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, None, ctx.groups, D ** -0.5)
    assert (kernel.float() - sdpa.float()).abs().max().item() <= 2 ** -6 * sdpa.float().abs().max().item()
    f32 = A._grouped(q, k, v, None, None, ctx.groups, D ** -0.5)  # [T, H, D]
    start = 0
    for n in lens:  # each row alone against the mask rule
        pos = torch.arange(n)[None]  # [1, n]: a row's canvas positions, its keys' too
        mask = _block_mask(pos, pos, torch.tensor([block]), None)  # [1, 1, n, n]
        t = lambda x: x[start:start + n].transpose(0, 1)[None]
        ref = F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=mask, scale=D ** -0.5, enable_gqa=True)
        assert torch.allclose(f32[start:start + n], ref[0].transpose(0, 1), atol=1e-6, rtol=1e-5)
        start += n
