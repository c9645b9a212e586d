"""kernels/attention.py's block-causal mode (LLaDA2 block diffusion) against the per-row torch reference.

Query position i sees key position j iff j // block_len <= i // block_len. Cases mirror the engine's passes: a
block pass (the current block's queries against the whole canvas, later blocks present in the pool), a full pass
over a canvas prefix, rows whose queries start mid-block, GQA, odd block lengths and page sizes."""
from __future__ import annotations

import pytest
import torch

from kernels.attention import (block_causal_visible, paged_attention, paged_attention_ref, varlen_attention,
                               varlen_attention_ref)
from tests.kernels.test_attention import cu_seqlens, paged_case
from tests.kernels.tolerance import DEVICE, DTYPES, assert_within_rule


def query_positions(starts: list[int], lens_q: list[int]) -> torch.Tensor:
    """[T] long: row b's queries are canvas positions starts[b] .. starts[b] + lens_q[b] - 1."""
    return torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens_q)]).to(DEVICE)


# (query start positions, query lengths, key lengths, heads, kv heads, head_dim, page size, block length)
CASES = [
    pytest.param([64, 0, 30], [32, 37, 5], [160, 37, 35], 4, 2, 32, 16, 32, id="block-pass-later-blocks-present"),
    pytest.param([0, 10], [29, 11], [29, 21], 6, 2, 12, 7, 5, id="full-prefix-odd-block-and-page"),
    pytest.param([7, 3], [6, 2], [50, 9], 4, 4, 16, 3, 7, id="queries-start-mid-block-mha"),
    pytest.param([33], [31], [97], 8, 1, 64, 16, 11, id="mqa-group-8-several-query-tiles"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("starts,lens_q,lens_k,H,Hkv,D,page_size,block_len", CASES)
def test_paged_block_causal_matches_reference(starts, lens_q, lens_k, H, Hkv, D, page_size, block_len, dtype):
    c = paged_case(lens_q, lens_k, H, Hkv, D, page_size, dtype, seed=5)
    pos = query_positions(starts, lens_q)
    scale = D ** -0.5
    out = paged_attention(c["q"], c["pool_k"], c["pool_v"], c["cu_seqlens_q"], c["block_table"], c["seq_lens_k"],
                          page_size, max(lens_q), scale, block_len=block_len, q_positions=pos)
    args = (c["q"], c["pool_k"], c["pool_v"], c["cu_seqlens_q"], c["block_table"], c["seq_lens_k"], page_size, scale)
    ref32 = paged_attention_ref(*args, block_len=block_len, q_positions=pos)
    assert_within_rule(out, ref32, paged_attention_ref(*args, upcast=False, block_len=block_len, q_positions=pos),
                       dtype, "block-causal paged attention")
    if dtype == torch.float32:  # the mask matters: non-causal attention over the same keys is far off
        full = paged_attention_ref(*args)
        assert (full - ref32).abs().max() > 1e-2


def test_block_length_per_row():
    """One launch, rows with different block lengths (requests with their own block_length)."""
    c = paged_case([9, 6, 4], [40, 30, 12], 4, 2, 16, 4, torch.float32, seed=11)
    pos = query_positions([16, 20, 8], [9, 6, 4])
    bl = torch.tensor([8, 5, 3], dtype=torch.int32, device=DEVICE)
    args = (c["q"], c["pool_k"], c["pool_v"], c["cu_seqlens_q"], c["block_table"], c["seq_lens_k"], 4)
    out = paged_attention(*args, 9, 0.25, block_len=bl, q_positions=pos)
    torch.testing.assert_close(out, paged_attention_ref(*args, 0.25, block_len=bl, q_positions=pos))
    lens = [9, 6, 4]
    cu = cu_seqlens(lens)
    vpos = query_positions([0, 0, 0], lens)
    q, k = c["q"], c["q"][:, :2].contiguous()
    out = varlen_attention(q, k, k, cu, 9, 0.25, block_len=bl, q_positions=vpos)
    torch.testing.assert_close(out, varlen_attention_ref(q, k, k, cu, 0.25, block_len=bl, q_positions=vpos))


def test_later_blocks_are_never_read():
    """Poisoning (NaN) every key in a block after a row's last query block leaves the output unchanged: the
    kernel masks those keys and stops reading at the end of the last visible block."""
    B, page = 8, 4
    c = paged_case([8, 3], [64, 40], 4, 2, 16, page, torch.float32, seed=7)
    pos = query_positions([16, 25], [8, 3])  # row 0: block 2; row 1: positions 25..27 (block 3)
    args = (c["q"], c["pool_k"], c["pool_v"], c["cu_seqlens_q"], c["block_table"], c["seq_lens_k"], page, 8, 0.25)
    before = paged_attention(*args, block_len=B, q_positions=pos)
    for b, first_hidden in enumerate([24, 32]):
        j = torch.arange(first_hidden, [64, 40][b], device=DEVICE)
        slots = c["block_table"][b].long()[j // page] * page + j % page
        c["pool_k"][slots] = float("nan")
        c["pool_v"][slots] = float("nan")
    after = paged_attention(*args, block_len=B, q_positions=pos)
    assert torch.isfinite(after).all() and torch.equal(before, after)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lens,H,Hkv,D,block_len", [([13, 61, 2], 4, 2, 32, 8), ([1, 29, 7], 6, 3, 24, 5)])
def test_varlen_block_causal_matches_reference(lens, H, Hkv, D, block_len, dtype):
    g = torch.Generator().manual_seed(9)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, D, generator=g).to(dtype).to(DEVICE) for h in (H, Hkv, Hkv))
    cu = cu_seqlens(lens)
    pos = query_positions([0] * len(lens), lens)
    out = varlen_attention(q, k, v, cu, max(lens), D ** -0.5, block_len=block_len, q_positions=pos)
    assert_within_rule(out, varlen_attention_ref(q, k, v, cu, D ** -0.5, block_len=block_len, q_positions=pos),
                       varlen_attention_ref(q, k, v, cu, D ** -0.5, upcast=False, block_len=block_len,
                                            q_positions=pos), dtype, "block-causal varlen attention")


def test_reference_mask_is_the_published_block_causal_mask():
    """block_causal_visible equals LLaDA2's generate mask tril(ones(nb, nb)) kron ones(B, B) on an aligned canvas."""
    B, nb = 4, 5
    want = torch.kron(torch.tril(torch.ones(nb, nb)), torch.ones(B, B)).bool()
    pos = torch.arange(nb * B)
    assert torch.equal(block_causal_visible(pos, pos, B), want)


def test_block_causal_arguments_are_checked():
    c = paged_case([4], [8], 2, 2, 16, 4, torch.float32)
    args = (c["q"], c["pool_k"], c["pool_v"], c["cu_seqlens_q"], c["block_table"], c["seq_lens_k"], 4, 4, 0.25)
    with pytest.raises(ValueError, match="q_positions"):
        paged_attention(*args, block_len=4)
    with pytest.raises(ValueError, match="q_positions must be"):
        paged_attention(*args, block_len=4, q_positions=torch.arange(3, device=DEVICE))
