"""kernels/attention.py against its per-row torch reference (interpreted on CPU, compiled on CUDA)."""
from __future__ import annotations

import pytest
import torch

from kernels.attention import (paged_attention, paged_attention_ref, store_kv, varlen_attention,
                               varlen_attention_ref)
from tests.kernels.tolerance import DEVICE, DTYPES, assert_within_rule


def cu_seqlens(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def paged_case(lens_q: list[int], lens_k: list[int], H: int, Hkv: int, D: int, page_size: int, dtype: torch.dtype,
               seed: int = 0) -> dict:
    """A pool whose pages are handed to the rows in shuffled order (tables point backwards and forwards)."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // page_size) for n in lens_k]
    num_pages = sum(pages) + 3  # a few pages nobody owns
    slots = num_pages * page_size + 1
    pool_k = torch.randn(slots, Hkv, D, generator=g).to(dtype)
    pool_v = torch.randn(slots, Hkv, D, generator=g).to(dtype)
    perm = torch.randperm(num_pages, generator=g)
    table = torch.zeros(len(lens_k), max(pages), dtype=torch.int32)
    start = 0
    for b, n in enumerate(pages):
        table[b, :n] = perm[start:start + n].int()
        start += n
    q = torch.randn(sum(lens_q), H, D, generator=g).to(dtype)
    return dict(q=q.to(DEVICE), pool_k=pool_k.to(DEVICE), pool_v=pool_v.to(DEVICE), cu_seqlens_q=cu_seqlens(lens_q),
                block_table=table.to(DEVICE), seq_lens_k=torch.tensor(lens_k, dtype=torch.int32, device=DEVICE),
                page_size=page_size)


# (query lengths, key lengths, heads, kv heads, head_dim, page size)
PAGED_CASES = [
    pytest.param([7, 32, 1], [301, 37, 128], 4, 2, 64, 16, id="block-pass-long-prefix-gqa"),
    pytest.param([13, 61, 2], [13, 61, 2], 4, 4, 32, 5, id="refresh-pass-mha-prime-lengths"),
    pytest.param([3, 17], [97, 17], 6, 2, 12, 7, id="rnd1-like-head-dim-12"),
    pytest.param([5], [131], 2, 1, 128, 16, id="head-dim-128-mqa"),
    pytest.param([41, 3], [41, 77], 8, 1, 16, 3, id="group-8-several-query-tiles"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lens_q,lens_k,H,Hkv,D,page_size", PAGED_CASES)
def test_paged_attention_matches_reference(lens_q, lens_k, H, Hkv, D, page_size, dtype):
    c = paged_case(lens_q, lens_k, H, Hkv, D, page_size, dtype)
    scale = D ** -0.5
    out = paged_attention(c["q"], c["pool_k"], c["pool_v"], c["cu_seqlens_q"], c["block_table"], c["seq_lens_k"],
                          page_size, max(lens_q), scale)
    args = (c["q"], c["pool_k"], c["pool_v"], c["cu_seqlens_q"], c["block_table"], c["seq_lens_k"], page_size, scale)
    assert_within_rule(out, paged_attention_ref(*args), paged_attention_ref(*args, upcast=False), dtype,
                       "paged attention")


def test_paged_attention_reads_only_the_rows_pages():
    """Poisoning every slot a row does not own (NaN) must not change its output."""
    c = paged_case([9, 4], [53, 20], 4, 2, 32, 8, torch.float32, seed=3)
    args = (c["q"], c["pool_k"], c["pool_v"], c["cu_seqlens_q"], c["block_table"], c["seq_lens_k"], 8, 9, 0.2)
    before = paged_attention(*args)
    owned = torch.zeros(c["pool_k"].shape[0], dtype=torch.bool, device=DEVICE)
    for b, n in enumerate([53, 20]):
        j = torch.arange(n, device=DEVICE)
        owned[c["block_table"][b].long()[j // 8] * 8 + j % 8] = True
    c["pool_k"][~owned] = float("nan")
    c["pool_v"][~owned] = float("nan")
    after = paged_attention(*args)
    assert torch.equal(before, after)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lens,H,Hkv,D", [([13, 61, 2], 4, 2, 64), ([1, 29, 7, 3], 6, 6, 48)])
def test_varlen_attention_matches_reference(lens, H, Hkv, D, dtype):
    g = torch.Generator().manual_seed(1)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, D, generator=g).to(dtype).to(DEVICE) for h in (H, Hkv, Hkv))
    cu = cu_seqlens(lens)
    out = varlen_attention(q, k, v, cu, max(lens), D ** -0.5)
    assert_within_rule(out, varlen_attention_ref(q, k, v, cu, D ** -0.5),
                       varlen_attention_ref(q, k, v, cu, D ** -0.5, upcast=False), dtype, "varlen attention")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_store_kv_writes_exactly_the_given_slots(dtype):
    g = torch.Generator().manual_seed(2)
    S, T, Hkv, D = 211, 37, 3, 24
    pool_k, pool_v = (torch.randn(S, Hkv, D, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    k, v = (torch.randn(T, Hkv, D, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    slots = torch.randperm(S, generator=g)[:T].to(DEVICE)  # out of order, scattered
    want_k, want_v = pool_k.clone(), pool_v.clone()
    want_k[slots], want_v[slots] = k, v
    store_kv(k, v, pool_k, pool_v, slots)
    assert torch.equal(pool_k, want_k) and torch.equal(pool_v, want_v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_paged_attention_under_cuda_graph_capture():
    c = paged_case([7, 32, 1], [301, 37, 128], 4, 2, 64, 16, torch.bfloat16)
    args = (c["q"], c["pool_k"], c["pool_v"], c["cu_seqlens_q"], c["block_table"], c["seq_lens_k"], 16, 32, 0.125)
    eager = paged_attention(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = paged_attention(*args)
    c["q"].mul_(-1)  # replay reads the new inputs
    graph.replay()
    torch.testing.assert_close(captured, paged_attention(*args))
    assert not torch.equal(captured, eager)
