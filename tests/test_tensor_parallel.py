"""Tensor and expert parallelism (gloo, 2 processes on the CPU): a sharded model computes what one process does.

Reference: the same checkpoint in one process (itself checked against transformers in test_model_parity). Logits
agree within fp32 noise (the row-parallel all-reduce sums partial products in another order: observed ~4e-7
relative); tokens at temperature 0 and with seeded sampling are identical in every cache mode, batched with mixed
parameters (they would differ only if two candidates tied within that noise), both when rank 0 gathers the logits
(top-k/top-p in the batch) and when each rank reduces its vocabulary shard (any other batch). Every case starts real worker
processes, so the module is marked slow.
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model.parallel import Shard, shard_range

pytestmark = pytest.mark.slow

TP_REL_TOL = 1e-5
CACHES = ("none", "prefix", "dual")
# (family, expert_parallel, checkpoint overrides). Dream has 2 KV heads (one per rank); the kv1 case has fewer KV
# heads than ranks, so the KV head is replicated. Vocab sizes are odd, so the last vocabulary chunk is padded.
CASES = [("llada", False, {}), ("dream", False, {}), ("dream", False, {"num_kv_heads": 1}),
         ("llada_moe", False, {}), ("llada_moe", True, {}), ("rnd1", False, {}), ("rnd1", True, {})]
IDS = [f"{f}{'-ep' if ep else ''}{'-kv1' if o else ''}" for f, ep, o in CASES]


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def pair(request, make_checkpoint):
    family, ep, over = request.param
    path = make_checkpoint(family, **over)
    opts = dict(kv_cache_memory=1 << 22, page_size=4, dtype="float32")
    one = LLM(path, **opts)
    with LLM(path, tensor_parallel_size=2, expert_parallel=ep, parallel_timeout=60, **opts) as tp:
        yield family, tp, one


def mixed_requests(llm: LLM, cache: str, seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    cfg = llm.model.config
    banned = {cfg.mask_id, *cfg.stop_ids}
    prompts, params = [], []
    for i in range(4):
        n = rng.randint(2, 9)
        prompts.append([t for t in (rng.randrange(cfg.vocab_size) for _ in range(3 * n)) if t not in banned][:n])
        block = rng.choice([3, 4, 8])
        gen = block * rng.randint(1, 2)
        kw: dict = dict(max_tokens=gen, block_length=block, steps=rng.choice([gen, max(gen // 2, 1)]), cache=cache,
                        remasking=rng.choice(["low_confidence", "margin", "entropy"]), seed=rng.randrange(1 << 20),
                        temperature=0.0, ignore_eos=True)
        if i == 1:
            kw.update(threshold=0.5, steps=gen)
        if i == 2:
            kw.update(cfg_scale=1.5)
        if i == 3:
            kw.update(temperature=0.8, top_p=0.9)
        params.append(SamplingParams(**kw))
    return prompts, params


def test_logits_match_one_rank(pair):
    _, tp, one = pair
    V = one.model.config.vocab_size
    ids = torch.randint(0, V, (3, 13), generator=torch.Generator().manual_seed(5))
    a, b = tp.model.logits(ids), one.model.logits(ids)
    assert a.shape == b.shape == (3, 13, V) and b.abs().max() > 1.0
    assert rel(a, b) < TP_REL_TOL
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    a, b = tp.model.logits(ids, mask), one.model.logits(ids, mask)
    assert rel(a, b) < TP_REL_TOL
    # the check can fail: dropping one rank's share (half the vocabulary) is far outside the tolerance
    assert rel(torch.cat([a[..., :V // 2], torch.zeros_like(a[..., V // 2:])], -1), b) > 1e-2


@pytest.mark.parametrize("cache", CACHES)
def test_same_tokens_batched_mixed_params(pair, cache, monkeypatch):
    _, tp, one = pair
    prompts, params = mixed_requests(one, cache, seed=CACHES.index(cache))
    ex, seen = tp.engine.executor, []
    run = ex.run
    monkeypatch.setattr(ex, "run", lambda batch, kv, consume=None: (seen.append(batch.shard_decode is None),
                                                                    run(batch, kv, consume))[1])
    a = [o.token_ids for o in tp.generate(prompts, params)]
    b = [o.token_ids for o in one.generate(prompts, params)]
    assert a == b
    assert all(len(x) == p.max_tokens for x, p in zip(a, params))
    assert any(seen)  # the top-p request made rank 0 gather the logits


@pytest.mark.parametrize("cache", CACHES)
def test_batches_without_top_k_top_p_decode_from_vocab_shards(pair, cache, monkeypatch):
    """Batches without top-k/top-p (greedy and sampled rows mixed) never gather the full logits: each rank reduces
    its vocabulary shard (its columns of the Gumbel noise included)."""
    _, tp, one = pair
    prompts, params = mixed_requests(one, cache, seed=7 + len(cache))
    params = [dataclasses.replace(p, top_p=None) for p in params]
    assert any(p.temperature > 0 for p in params)
    ex, seen = tp.engine.executor, []
    run = ex.run
    monkeypatch.setattr(ex, "run", lambda batch, kv, consume=None: (seen.append(batch.shard_decode is not None),
                                                                    run(batch, kv, consume))[1])
    a = [o.token_ids for o in tp.generate(prompts, params)]
    b = [o.token_ids for o in one.generate(prompts, params)]
    assert a == b
    assert seen and all(seen)


def test_each_rank_holds_its_share(pair):
    """Sum of the ranks' parameters = the full model + what is replicated (norms, router, KV heads shared by
    ranks) + the vocabulary padding; computed from the config, independently of the sharding code."""
    family, tp, one = pair
    cfg, n = one.model.config, 2
    rep = tp.memory_report()
    assert [r["rank"] for r in rep] == [0, 1]
    full = sum(p.numel() for p in one.model.net.parameters())
    d, hd, L = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    replicated = (2 * L + 1) * d + (2 * L * hd if cfg.qk_norm else 0) + sum(cfg.moe_layers) * cfg.num_experts * d
    if cfg.num_kv_heads < n:  # each KV head held by n / num_kv_heads ranks
        kv = 2 * L * (d * hd + (hd if cfg.qkv_bias else 0)) * cfg.num_kv_heads
        replicated += kv * (n // cfg.num_kv_heads - 1)
    pad = (-(-cfg.vocab_size // n) * n - cfg.vocab_size) * d * (1 if cfg.tie_embeddings else 2)
    elt = 4
    assert sum(r["param_bytes"] for r in rep) == (full + replicated + pad) * elt
    assert max(r["param_bytes"] for r in rep) < 0.75 * full * elt
    # each rank's pool holds only its KV heads, and the page count follows from the per-rank budget
    kv_local = max(1, cfg.num_kv_heads // n)
    assert tp.engine.pool.tensors.k[0].shape[1] == kv_local
    assert tp.engine.allocator.num_pages == (1 << 22) // (2 * L * kv_local * hd * elt * 4)
    assert all(r["rss_bytes"] > 0 for r in rep)


def test_shard_ranges():
    assert [shard_range(11, r, 3) for r in range(3)] == [(0, 4), (4, 8), (8, 11)]
    s = [Shard(r, 4) for r in range(4)]
    assert [x.kv_heads(2) for x in s] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [x.kv_heads(8) for x in s] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [x.vocab(10) for x in s] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    with pytest.raises(ValueError, match="attention heads"):
        Shard(0, 4).check(6, 2, 0, "m")
    with pytest.raises(ValueError, match="KV heads"):
        Shard(0, 4).check(12, 6, 0, "m")
    with pytest.raises(ValueError, match="at least 4 experts"):
        Shard(0, 4, expert_parallel=True).check(4, 4, 3, "m")
    with pytest.raises(ValueError, match="no experts"):
        Shard(0, 2, expert_parallel=True).check(4, 4, 0, "m")
