"""Bounded matmul shapes (engine/shape_buckets.py): every GEMM a CPU model runs, counted at the aten level over a
random mixed workload (requests of random lengths, options and cache modes joining a running batch), stays within
(distinct weight shapes) x (row buckets up to the largest forward), while the same workload without bucketing runs
far more. Results: BucketedLinear equals nn.Linear up to rounding here; that the engine's tokens stay the same is
checked by the reference-exact tests (tests/test_sampler_exact.py, tests/test_model_parity.py), which run with it."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from engine import LLM, SamplingParams
from engine.head_linear import HeadLinear, thin_wins
from engine.model import cpu_kernel
from engine.shape_buckets import (MIN_ROWS, STEPS_PER_OCTAVE, BucketedLinear, attention_groups, bucket_linears,
                                  length_bucket, row_bucket, row_buckets_up_to)
from tests.test_batch_invariance import CACHES, random_params, random_prompt

aten = torch.ops.aten


class GemmShapes(TorchDispatchMode):
    """Records the (M, K, N) of every 2-D GEMM and the query/key shapes of every SDPA call."""

    def __init__(self) -> None:
        super().__init__()
        self.gemms: Counter[tuple[int, int, int]] = Counter()
        self.sdpa: Counter[tuple[int, ...]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (aten.linear.default, torch.ops.mkldnn._linear_pointwise.default):  # (x [..., K], weight [N, K])
            x, w = args[0], args[1]
            self.gemms[(x.numel() // x.shape[-1], x.shape[-1], w.shape[0])] += 1
        elif func in (aten.mm.default, aten.matmul.default, aten.addmm.default):  # (a [M, K], b [K, N])
            a, b = args[-2:] if func is aten.addmm.default else args[:2]
            self.gemms[(a.numel() // a.shape[-1], a.shape[-1], b.shape[-1])] += 1
        elif "scaled_dot_product" in func.__name__:
            self.sdpa[(*args[0].shape, args[1].shape[2])] += 1
        return func(*args, **(kwargs or {}))


def test_bucket_sizes():
    seen = row_buckets_up_to(16384)
    assert seen == sorted(set(seen)) and seen[0] == MIN_ROWS
    # STEPS_PER_OCTAVE sizes per doubling from MIN_ROWS to 16384: 2 * 10 + 1
    assert len(seen) == STEPS_PER_OCTAVE * 10 + 1
    for m in [1, 2, 3, 15, 16, 17, 23, 24, 25, 100, 1000, 1023, 1025, 5000, 16383, 16384, 20000]:
        b = row_bucket(m)
        assert b >= m and b == row_bucket(b)
        assert b == MIN_ROWS or b < m * (1 + 1 / STEPS_PER_OCTAVE)
    assert row_bucket(0) == 0
    assert [length_bucket(n) for n in (1, 8, 9, 13, 17, 33)] == [8, 8, 12, 16, 24, 48]


def test_bucketed_linear_matches_linear():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        plain = nn.Linear(37, 29, bias=True).to(dtype)
        bucketed = nn.Linear(37, 29, bias=True).to(dtype)
        bucketed.load_state_dict(plain.state_dict())
        bucket_linears(bucketed)
        assert isinstance(bucketed, BucketedLinear) and bucketed.state_dict().keys() == plain.state_dict().keys()
        for rows in (1, 3, 16, 17, 50):
            x = torch.randn(rows, 37).to(dtype)
            ref = F.linear(x.float(), plain.weight.float(), plain.bias.float())
            got = bucketed(x)
            assert got.shape == (rows, 29) and got.dtype == dtype
            torch.testing.assert_close(got.float(), ref, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)
        x = torch.randn(2, 5, 37)
        assert bucketed.float()(x).shape == (2, 5, 29)


def test_attention_groups_layout():
    q_lens, k_lens = [5, 1, 33, 5, 8], [40, 7, 33, 13, 41]
    groups = attention_groups(q_lens, k_lens)
    starts = [0, 5, 6, 39, 44]
    covered = torch.cat([g.tokens for g in groups]).sort().values
    assert torch.equal(covered, torch.arange(sum(q_lens)))  # every query in exactly one group
    for g in groups:
        for j, r in enumerate(g.rows.tolist()):
            assert length_bucket(k_lens[r]) == g.key_len and g.q_index.shape[1] == length_bucket(q_lens[r])
            assert g.q_index[j, :q_lens[r]].tolist() == list(range(starts[r], starts[r] + q_lens[r]))
        assert torch.equal(g.q_index.reshape(-1)[g.unpad], g.tokens)


def test_self_keyed_rows_group_apart():
    """Rows flagged as attending over their own new K/V (refresh passes) never share a group with pool-reading
    rows of the same buckets, and must have as many keys as queries."""
    q_lens, k_lens = [12, 12, 12, 5], [12, 12, 12, 12]
    groups = attention_groups(q_lens, k_lens, [True, False, True, False])
    by_rows = {tuple(g.rows.tolist()): g.self_keys for g in groups}
    assert by_rows == {(0, 2): True, (1,): False, (3,): False}
    with pytest.raises(AssertionError):
        attention_groups([5], [12], [True])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens", [[24, 24, 24], [24], [13], [13, 24, 7]])
def test_self_keyed_attention_equals_each_row_alone(dtype, lens):
    """Refresh rows attending over their own K/V (v a strided view of a fused qkv output, as in the model): one
    group of unpadded rows runs on views of the packed tensors, other layouts gather; every row's output is bitwise
    the same attention of that row alone at its own padded length (SDPA, or the bf16 C kernel where it runs)."""
    from engine.model.attention import AttnGroup, _attend, _grouped
    gen = torch.Generator().manual_seed(sum(lens))
    T, H, Hkv, D = sum(lens), 4, 2, 16
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=gen).to(dtype)
    q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))
    groups = []
    for g in attention_groups(lens, lens, [True] * len(lens)):
        L = g.q_index.shape[1]
        valid = torch.arange(L)[None, :] < torch.tensor([lens[r] for r in g.rows.tolist()])[:, None]
        groups.append(AttnGroup(g.q_index, g.unpad, g.tokens, torch.zeros_like(g.q_index), valid, self_keys=True))
    out = _grouped(q, k, v, None, None, groups, D ** -0.5)  # [T, H, D]
    start = 0
    for n in lens:
        L = length_bucket(n)
        pad = lambda x: F.pad(x[start:start + n], (0, 0, 0, 0, 0, L - n))[None]  # [1, L, h, D]
        mask = (torch.arange(L) < n)[None, :]  # [1, L]
        ref = _attend(pad(q), pad(k), pad(v), mask, None, D ** -0.5)[0, :n]
        assert torch.equal(out[start:start + n], ref), (lens, n)
        start += n


def test_no_cache_steps_skip_the_pool_and_cached_refreshes_fill_it(make_checkpoint):
    """A step of no-cache requests only computes attention from its own K/V and writes nothing to the K/V pool
    (nothing reads it back); a dual-cache request's refresh still fills the pool for its block passes, and the
    no-cache request's tokens are the same alone and batched with it."""
    llm = LLM(make_checkpoint("llada"), dtype="float32", kernels="torch")
    pool = llm.engine.pool.tensors
    for t in (*pool.k, *pool.v):
        t.fill_(7.0)
    rng = random.Random(3)
    prompt = random_prompt(rng, llm, 9)
    none = SamplingParams(max_tokens=8, steps=8, block_length=4, cache="none", ignore_eos=True)
    alone = llm.generate([prompt], none)[0].token_ids
    assert all(bool((t == 7.0).all()) for t in (*pool.k, *pool.v)), "a no-cache step wrote K/V to the pool"
    dual = SamplingParams(max_tokens=8, steps=8, block_length=4, cache="dual", ignore_eos=True)
    outs = llm.generate([prompt, random_prompt(rng, llm, 6)], [none, dual])
    assert outs[0].token_ids == alone
    assert any(bool((t != 7.0).any()) for t in pool.k), "the dual-cache refresh wrote nothing"


def _workload(llm: LLM, seed: int, requests: int) -> None:
    """Random requests joining a running batch at random steps, until all finish."""
    rng = random.Random(seed)
    eng = llm.engine
    arrivals = sorted(rng.randint(0, 8) for _ in range(requests))
    step, added = 0, 0
    while added < len(arrivals) or eng.has_unfinished():
        while added < len(arrivals) and arrivals[added] <= step:
            cache = rng.choice(CACHES)
            eng.add_request(f"r{added}", random_prompt(rng, llm, rng.randint(1, 40)),
                            random_params(rng, "llada", cache, rng.choice([0.0, 0.8])).resolve(llm.defaults))
            added += 1
        eng.step()
        step += 1


def _weight_shapes(net: nn.Module) -> set[tuple[int, int]]:
    return {(m.in_features, m.out_features) for m in net.modules() if isinstance(m, nn.Linear)}


def test_distinct_gemm_shapes_are_bounded(make_checkpoint):
    llm = LLM(make_checkpoint("llada"), dtype="float32", kv_cache_memory=1 << 23, page_size=4)
    net = llm.model.net
    assert all(isinstance(m, BucketedLinear) for m in net.modules() if isinstance(m, nn.Linear))
    with GemmShapes() as rec:
        _workload(llm, seed=5, requests=12)
    weights = _weight_shapes(net)
    head = (net.lm_head.in_features, net.lm_head.out_features)
    assert type(net.lm_head) is HeadLinear
    if cpu_kernel.available() and thin_wins(net.lm_head.weight):  # the head runs through the C kernel
        # (engine/head_linear.py; float32 where MKL runs GEMMs), no torch GEMM at all
        assert not any((k, n) == head for _, k, n in rec.gemms)
        weights.discard(head)
    largest = max(m for m, _, _ in rec.gemms)
    rows = {m for m, _, _ in rec.gemms}
    assert rows <= set(row_buckets_up_to(largest)), sorted(rows)
    assert {(k, n) for _, k, n in rec.gemms} <= weights
    bound = len(weights) * len(row_buckets_up_to(largest))
    assert len(rec.gemms) <= bound
    # every SDPA call runs at bucketed query and key lengths
    assert all(lq == length_bucket(lq) and lk == length_bucket(lk) for _, _, lq, _, lk in rec.sdpa)
    # the control: the same workload with plain Linears runs many more distinct GEMM shapes
    for m in net.modules():
        if isinstance(m, BucketedLinear):
            m.__class__ = nn.Linear
            if m.weight.is_mkldnn:  # oneDNN's blocked layout (pack_linears) back to the plain one
                m.weight = nn.Parameter(m.weight.to_dense(), requires_grad=False)
    with GemmShapes() as plain:
        _workload(llm, seed=5, requests=12)
    assert len({m for m, _, _ in plain.gemms}) > 2 * len(rows), (sorted(rows), sorted({m for m, _, _ in plain.gemms}))
    print(f"distinct GEMM shapes: {len(rec.gemms)} bucketed (bound {bound}), {len(plain.gemms)} plain")
